"""Masks from a tokenizer's own chat template: which parts of its render are trained, found by rendering."""

from __future__ import annotations

from finetune.data.segments import EOS, RecordError, Segment


def template_segments(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[Segment]:
    """Masks from the template itself: for every assistant turn, the text rendered for the messages before it
    with add_generation_prompt=True must be a prefix of the text with it (the prefix property, checked); the
    difference is the answer, trained up to and including the first special token after its content (the
    end-of-turn token). A template that ends an answer with no special token gets a trained EOS there. Tool
    schemas go to the template as `tools=`; tool results, like every non-assistant turn, are masked.
    """
    segments: list[Segment] = []
    done = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_template(tokenizer, messages[:index], True, tools)
        after = render_template(tokenizer, messages[: index + 1], False, tools)
        if not before.startswith(done) or not after.startswith(before):
            raise RecordError(f"the tokenizer's chat template breaks the prefix property at turn {index}; "
                              "pick a layout format (chatml, llama2_chat, vicuna) instead")
        answer = after[len(before):]
        cut = answer_end(tokenizer, answer, answer_content(message))
        segments.append(Segment(before[len(done):], False, template=True))
        segments += [Segment(answer[:cut], True, template=True)] if cut else [Segment(answer, True, template=True), EOS]
        done = before + answer[:cut] if cut else after
    return segments  # the sample ends with the last answer's end token; what the template adds after it is not trained


def render_template(tokenizer, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def answer_content(message: dict) -> str:
    """The last piece of an assistant turn the template writes from the data: the last tool call's last argument
    value, or the content (where the end-of-turn token is searched from)."""
    calls = message.get("tool_calls") or []
    for call in reversed(calls):
        values = [value for value in call["function"]["arguments"].values() if isinstance(value, str) and value]
        if values:
            return values[-1]
        return call["function"]["name"]
    return message["content"]


def answer_end(tokenizer, answer: str, content: str) -> int | None:
    """Where a rendered answer ends: just after the first special token that follows its content (None: none)."""
    content_end = answer.find(content.strip()) + len(content.strip())
    ends = [(answer.find(t, content_end), -len(t), t) for t in tokenizer.all_special_tokens if answer.find(t, content_end) >= 0]
    if not ends:
        return None
    position, _, token = min(ends)
    return position + len(token)


def template_end_token(tokenizer) -> str | None:
    """The end-of-turn token of the tokenizer's chat template (e.g. <|im_end|>), found by rendering a probe."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    before, after = render_template(tokenizer, probe[:1], True), render_template(tokenizer, probe, False)
    answer = after[len(before):]
    cut = answer_end(tokenizer, answer, probe[1]["content"])
    if cut is None:
        return None
    return next(t for t in tokenizer.all_special_tokens if answer[:cut].endswith(t))
