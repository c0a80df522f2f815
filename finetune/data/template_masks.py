"""Masks from a tokenizer's own chat template: which parts of its render are trained, found by rendering.

A probe first finds the template's traits (cached per template): how it takes a reasoning trace
(`reasoning_content`, or inline as <think>...</think> in the content; or not at all: it strips it),
whether it keeps the reasoning of past turns, and its end-of-turn token. Then each record is rendered with the
first strategy that applies, and the strategy is counted in stats.json:

- "prefix": for every trained turn, the render of the turns before it with the generation prompt is a prefix of
  the render with it; the difference is the answer. Turns share one sample as long as the template renders the
  history the way it rendered the turns when they were current; a template that renders past turns differently
  (Qwen3 drops past reasoning, and writes an empty <think></think> only into the last turn) starts a new sample
  there ("per_turn"), so every sample is exactly what the model sees at inference: history as the template
  renders it, the current turn with its reasoning.
- a template that strips the reasoning, or opens a <think> block in its generation prompt (DeepSeek-R1), gets the
  reasoning put back right after the generation prompt (also "per_turn" when it splits the record): a reasoning
  dataset is never trained without its reasoning.
- "located": otherwise (a hand-written template whose generation prompt differs from the assistant header inside
  a conversation, e.g. in whitespace), the conversation is rendered once and each trained turn is located in it
  in order: trained from its content through its end-of-turn token. A turn that cannot be located is refused,
  naming it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from finetune.data.conversations import think_block
from finetune.data.segments import EOS, RecordError, Samples, Segment

logger = logging.getLogger(__name__)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
AFTER_REASONING = re.compile(r"\s*(</think>)?\s*")  # what a masked reasoning trace takes with it


@dataclass(frozen=True)
class TemplateTraits:
    reasoning: str  # how a reasoning trace reaches the template: "reasoning_content" (also read as `thinking`) or "inline"
    renders_reasoning: bool  # False: the template strips it (it is put back after the generation prompt)
    keeps_past_reasoning: bool  # False: earlier turns lose theirs (Qwen3), so such records are split per turn
    end_token: str | None  # the end-of-turn token; None: the template writes none (EOS is appended, trained)
    string_arguments: bool = False  # tool-call arguments passed as a JSON string (templates that concatenate them)

    def describe(self) -> str:
        reasoning = (f"reasoning passed as {self.reasoning!r}" + ("" if self.keeps_past_reasoning else
                     ", dropped from past turns (records with reasoning are split per turn)")
                     if self.renders_reasoning else "reasoning stripped by the template (put back after the "
                     "generation prompt, one sample per turn)")
        end = f"end-of-turn token {self.end_token!r}" if self.end_token else "no end-of-turn token: EOS is appended and trained"
        return f"{reasoning}; {end}"


_TRAITS: dict[tuple, TemplateTraits] = {}
REASONING_PROBE = [
    {"role": "user", "content": "First question?"},
    {"role": "assistant", "content": "First answer.", "reasoning_content": "Earlier reasoning zq."},
    {"role": "user", "content": "Second question?"},
    {"role": "assistant", "content": "Second answer.", "reasoning_content": "Current reasoning zq."},
]


def template_traits(tokenizer) -> TemplateTraits:
    """The template's traits, probed once per template and set of special tokens (the end token is one of them)."""
    key = (tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, tuple(tokenizer.all_special_tokens))
    if key not in _TRAITS:
        _TRAITS[key] = probe_traits(tokenizer)
    return _TRAITS[key]


CALL_PROBE = [
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "call00001", "function": {
        "name": "probe_zq_tool", "arguments": {"city": "Probe-zq-city"}}}]},
    {"role": "tool", "tool_call_id": "call00001", "name": "probe_zq_tool", "content": "sunny"},
    {"role": "assistant", "content": "Sunny."},
]


def probe_traits(tokenizer) -> TemplateTraits:
    end = template_end_token(tokenizer)
    string_arguments = False  # transformers drops None-valued keys, so a text-less tool call always has content ""
    for as_string in (False, True):
        text = quiet_render(tokenizer, [shown(m, TemplateTraits("inline", True, True, end, as_string)) for m in CALL_PROBE])
        if "probe_zq_tool" in text and "Probe-zq-city" in text:
            string_arguments = as_string
            break
    for form in ("reasoning_content", "inline"):  # transformers passes reasoning_content as `thinking` too (gpt-oss)
        traits = TemplateTraits(form, True, True, end, string_arguments)
        text = quiet_render(tokenizer, [shown(m, traits) for m in REASONING_PROBE])
        if "Current reasoning zq." in text:
            return TemplateTraits(form, True, "Earlier reasoning zq." in text, end, string_arguments)
    return TemplateTraits("inline", False, False, end, string_arguments)


def quiet_render(tokenizer, messages: list[dict]) -> str:
    try:
        return render_template(tokenizer, messages, False)
    except RecordError:  # a template may refuse a key or a shape it does not know; the probe tries the next
        return ""


def shown(message: dict, traits: TemplateTraits) -> dict:
    """A message as the template gets it: our own keys removed, the reasoning in the form the template reads,
    tool calls in the shape it renders."""
    out = {key: value for key, value in message.items() if key not in ("train", "reasoning_content")}
    reasoning = message.get("reasoning_content")
    if reasoning is not None:
        if traits.reasoning == "inline":
            out["content"] = think_block(reasoning) + out["content"]
        else:
            out[traits.reasoning] = reasoning
    if out.get("tool_calls"):
        if traits.string_arguments:
            out["tool_calls"] = [dict(call, function=dict(call["function"], arguments=json.dumps(
                call["function"]["arguments"], ensure_ascii=False))) for call in out["tool_calls"]]
    return out


def render_template(tokenizer, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # noqa: BLE001 - Jinja raises TemplateError, TypeError... from inside the template
        raise RecordError(f"the model's chat template refuses this conversation ({type(error).__name__}: {error}); "
                          "fix the record or pick a layout format (chatml, llama2_chat, vicuna)") from error


def template_segments(tokenizer, messages: list[dict], tools: list[dict] | None = None,
                      roles: tuple[str, ...] = ("assistant",), train_reasoning: bool = True) -> Samples:
    """The record's samples (see the module doc). `roles`: the roles trained unless a turn's own `train` says
    otherwise; `train_reasoning` False masks each reasoning trace (with its closing tag): only the answer is
    trained. Tool schemas go to the template as `tools=`; tool results, like every untrained turn, are masked."""
    traits = template_traits(tokenizer)
    view = [shown(message, traits) for message in messages]
    trained = [k for k, message in enumerate(messages) if message.get("train", message["role"] in roles)]
    if not trained:
        raise RecordError(f"no turn of this conversation is trained (--roles_to_train {' '.join(roles)}, and no "
                          "turn says 'train': true)")
    pieces = [turn_piece(tokenizer, messages, view, k, tools, traits) for k in trained]
    if any(piece is None for piece in pieces):
        return located_segments(tokenizer, messages, view, trained, tools, train_reasoning)
    samples: list[list[Segment]] = []
    done = None
    for k, (prompt, answer) in zip(trained, pieces):
        if done is not None and prompt.startswith(done):
            samples[-1].append(Segment(prompt[len(done):], False, template=True))
        else:
            samples.append([Segment(prompt, False, template=True)])
        answer_segments, kept = trained_answer(tokenizer, answer, messages[k], train_reasoning, k)
        samples[-1] += answer_segments
        done = prompt + kept
    return Samples(samples, "prefix" if len(samples) == 1 else "per_turn")


def turn_piece(tokenizer, messages, view, k, tools, traits) -> tuple[str, str] | None:
    """(prompt, answer) of trained turn k: the prompt is what inference renders before it (assistant turns: the
    generation prompt), the answer what the model must produce after it. None: the template's generation prompt
    differs from the conversation only in whitespace (the record is then located instead)."""
    message = messages[k]
    assistant = message["role"] == "assistant"
    prompt = render_template(tokenizer, view[:k], assistant, tools)
    after = render_template(tokenizer, view[: k + 1], False, tools)
    reasoning = message.get("reasoning_content") if assistant else None
    if after.startswith(prompt):
        answer = after[len(prompt):]
    elif assistant and prompt.rstrip().endswith(THINK_OPEN):  # the generation prompt opens the reasoning itself
        base = prompt[: prompt.rstrip().rfind(THINK_OPEN)]
        if not after.startswith(base):
            base = after[: turn_start(tokenizer, view, k, tools, after)]
        rest = after[len(base):]
        rest = rest[len(THINK_OPEN):].lstrip("\n") if rest.startswith(THINK_OPEN) else rest
        if reasoning and reasoning in rest:
            return prompt, rest
        return prompt, (reasoning or "") + "\n" + THINK_CLOSE + "\n\n" + rest.lstrip()
    elif not prompt[common_prefix(prompt, after):].strip():
        return None  # whitespace apart, the same text: train on the conversation as the template renders it
    else:  # the template renders the history differently once the turn follows (Mistral's system prompt)
        answer = after[turn_start(tokenizer, view, k, tools, after):]
    if reasoning and reasoning not in answer:  # stripped by the template: put back where the answer starts
        answer = think_block(reasoning) + answer
    return prompt, answer


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def turn_start(tokenizer, view, k, tools, after: str) -> int:
    """Where turn k's own text starts in `after` (the render that ends with it): where it stops agreeing with
    renders that end with a stand-in turn of the same role instead (two stand-ins, so a coincidence cannot move it)."""
    stand_ins = [view[:k] + [{"role": view[k]["role"], "content": text}] for text in ("Azq stand-in", "Bzq stand-in")]
    return min(common_prefix(after, render_template(tokenizer, other, False, tools)) for other in stand_ins)


def trained_answer(tokenizer, answer: str, message: dict, train_reasoning: bool, k: int) -> tuple[list[Segment], str]:
    """The answer's segments, trained through the first special token after its content (the end-of-turn token;
    a trained EOS when there is none), and the text they cover. Non-assistant turns are trained from their
    content on (their header stays masked)."""
    content = answer_content(message)
    cut = answer_end(tokenizer, answer, content, k)
    text = answer[:cut] if cut else answer
    assistant = message["role"] == "assistant"
    if message["content"].strip() and message["content"].strip() not in text:
        raise RecordError(f"turn {k} ({message['role']}): the chat template drops its text "
                          f"{message['content'].strip()[:40]!r} (e.g. templates that render only the tool calls of a "
                          "turn); move the text to its own turn, or use --dataset_format chatml")
    reasoning = message.get("reasoning_content") if assistant else None
    if reasoning:
        end = AFTER_REASONING.match(text, text.find(reasoning) + len(reasoning)).end()  # with its closing tag
        pieces = [(text[:end], train_reasoning, "reasoning"), (text[end:], True, "")]
    else:
        start = 0 if assistant else text.rfind(content.strip())
        pieces = [(text[:start], False, ""), (text[start:], True, "")]
    segments = [Segment(piece, trainable, template=True, kind=kind) for piece, trainable, kind in pieces if piece]
    return (segments, text) if cut else (segments + [EOS], text)


def located_segments(tokenizer, messages, view, trained, tools, train_reasoning) -> Samples:
    """Each trained turn located in ONE render of the whole conversation, in order (see the module doc)."""
    full = render_template(tokenizer, view, False, tools)
    segments: list[Segment] = []
    cursor = 0
    for k in trained:
        message = messages[k]
        if message["role"] == "assistant" and message.get("reasoning_content") and message["reasoning_content"] not in full:
            raise RecordError(f"turn {k} (assistant): the chat template drops its reasoning from the conversation and "
                              "its generation prompt does not match how it renders an assistant turn; pass "
                              "--train_on_reasoning false to train without it, or pick a layout format (chatml)")
        start = locate_turn(tokenizer, view, k, tools, full, cursor)
        answer, kept = trained_answer(tokenizer, full[start:], message, train_reasoning, k)
        segments += [Segment(full[cursor:start], False, template=True)] + answer
        cursor = start + len(kept)
    return Samples([segments], "located")


_DIFFERENCES_LOGGED: set[tuple[str, str]] = set()


def locate_turn(tokenizer, view, k, tools, full: str, cursor: int) -> int:
    """Where turn k's trained text starts in the full render: after the assistant header that the generation
    prompt writes (searched without its surrounding whitespace), else at the turn's content."""
    message = view[k]
    content = message["content"].strip() or answer_content(message)
    if message["role"] == "assistant":
        history = render_template(tokenizer, view[:k], False, tools)
        generation = render_template(tokenizer, view[:k], True, tools)
        header = generation[len(history):] if generation.startswith(history) else ""
        position = full.find(header.strip(), cursor) if header.strip() else -1
        if position >= 0:
            start = position + len(header.strip())
            while start < len(full) and full[start].isspace():
                start += 1
            written = full[position:start]
            if written != header and (header, written) not in _DIFFERENCES_LOGGED:
                _DIFFERENCES_LOGGED.add((header, written))
                logger.info("the chat template's generation prompt ends with %r, but inside a conversation it writes "
                            "%r before an answer; training follows the conversation (inference prompts differ there)",
                            header, written)
            if full.find(content, start) >= 0:
                return start
    position = full.find(content, cursor)
    if not content or position < 0:
        raise RecordError(f"turn {k} ({message['role']}) cannot be located in the chat template's render of the "
                          "conversation (the template changes or drops its text); pick a layout format (chatml, "
                          "llama2_chat, vicuna) or fix the template")
    return position


def answer_content(message: dict) -> str:
    """The last piece of a turn the template writes from the data: the last tool call's last argument value, or
    the content (where the end-of-turn token is searched from)."""
    calls = message.get("tool_calls") or []
    for call in reversed(calls):
        values = [value for value in call["function"]["arguments"].values() if isinstance(value, str) and value]
        if values:
            return values[-1]
        return call["function"]["name"]
    return message["content"]


def answer_end(tokenizer, answer: str, content: str, turn: int | None = None) -> int | None:
    """Where a rendered answer ends: just after the first special token that follows its content (None: none)."""
    found = answer.rfind(content.strip())
    if found < 0:
        where = f"turn {turn}" if turn is not None else "an answer"
        raise RecordError(f"the chat template does not write {content.strip()[:40]!r} of {where} as given (it changes "
                          "or drops it); pick a layout format (chatml, llama2_chat, vicuna)")
    content_end = found + len(content.strip())
    ends = [(answer.find(t, content_end), -len(t), t) for t in tokenizer.all_special_tokens if answer.find(t, content_end) >= 0]
    if not ends:
        return None
    position, _, token = min(ends)
    return position + len(token)


def template_end_token(tokenizer) -> str | None:
    """The end-of-turn token of the tokenizer's chat template (e.g. <|im_end|>), found by rendering a probe: the
    first special token after the answer's text (None: there is none, or the template refuses the probe)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    try:
        rendered = render_template(tokenizer, probe, False)
        cut = answer_end(tokenizer, rendered, probe[1]["content"])
    except RecordError:
        return None
    if cut is None:
        return None
    return next(t for t in tokenizer.all_special_tokens if rendered[:cut].endswith(t))
