"""Dataset formats: how one record becomes the text a model is trained on, and which parts of it are trained.

A format is a small pure function `record -> list[Segment]`, registered by name with `@register("name")`. It knows
nothing about tokenizers or torch: it says which text is prompt (masked out of the loss) and which is response
(trained), and where the BOS / EOS *ids* go (never as text). `encode_segments` is the one place where segments
become token ids and labels; every other stage (length filtering, statistics, training) reuses those ids.

    >>> render_segments(FORMATS["alpaca"]({"instruction": "Add 2 and 2.", "output": "4"}))[-10:]
    '\\n[[4]]</s>'
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

# the pieces formats are built from, re-exported: this module is the public face of the data layer
from finetune.data.conversations import (  # noqa: F401
    CONVERSATION_FIELDS,
    ROLE_ALIASES,
    check_role_order,
    conversation_messages,
    conversation_tools,
    split_system,
    think_block,
    with_article,
)
from finetune.data.segments import (  # noqa: F401
    BOS,
    EOS,
    IGNORE_INDEX,
    Encoded,
    RecordError,
    Samples,
    Segment,
    encode_segments,
    prompt,
    prompt_segments,
    render_segments,
    response,
    special,
    special_ids,
    token_id,
)
from finetune.data.template_masks import answer_end, render_template, template_end_token, template_segments  # noqa: F401

FormatFn = Callable[[dict], list[Segment]]
FORMATS: dict[str, FormatFn] = {}


@dataclass(frozen=True)
class FormatInfo:
    """What the rest of the trainer must know about a format besides its function."""

    chat_layout: str | None = None  # conversation formats: the layout a chat template must reproduce
    special_tokens: tuple[str, ...] = ()  # tokens the layout needs as single ids (added to the vocabulary if missing)
    end_token: str = "eos"  # the token that ends every trained answer ("eos" = the tokenizer's EOS)
    # --rl: how a preference pair becomes two of this format's records (finetune/data/pairs.py): "conversation"
    # (the prompt turns + each answer), "transcript" (hh-rlhf: each side a whole dialogue), or (instruction field,
    # response field); None: no pairs
    pairs: str | tuple[str, str] | None = None


FORMAT_INFO: dict[str, FormatInfo] = {}


def register(name: str, **info) -> Callable[[FormatFn], FormatFn]:
    def add(fn: FormatFn) -> FormatFn:
        if name in FORMATS:
            raise ValueError(f"dataset format {name!r} registered twice")
        FORMATS[name] = fn
        FORMAT_INFO[name] = FormatInfo(**info)
        return fn

    return add


def get_format(name: str, options=None) -> FormatFn:
    """The format function; formats that take settings (e.g. completion's text field) get `options` bound."""
    if name not in FORMATS:
        raise KeyError(f"unknown --dataset_format {name!r}; known formats: {', '.join(sorted(FORMATS))}")
    fn = FORMATS[name]
    if "options" in inspect.signature(fn).parameters:
        return functools.partial(fn, options=options)
    return fn


def end_token_id(name: str, tokenizer) -> int:
    """The id that ends every trained answer of this format (EOS, or e.g. <|im_end|> for chatml)."""
    end = FORMAT_INFO[name].end_token
    if name == "chat_template" and getattr(tokenizer, "chat_template", None):
        end = template_end_token(tokenizer) or "eos"
    return tokenizer.eos_token_id if end == "eos" else token_id(tokenizer, end)


def required_text(record: dict, field: str, *, allow_empty: bool = False) -> str:
    """The string in `record[field]`, or a RecordError that says what is wrong with it."""
    if field not in record or record[field] is None:
        raise RecordError(f"missing field {field!r} (the record has: {', '.join(sorted(record)) or 'no fields'})")
    value = record[field]
    if not isinstance(value, str):
        raise RecordError(f"field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"field {field!r} is empty")
    return value


def optional_text(record: dict, field: str) -> str:
    value = record.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field {field!r} must be a string, got {type(value).__name__}")
    return value


# --- airoboros (instruction / response) ------------------------------------------------------------------------------

AIROBOROS_DEFAULT_SYSTEM = "A chat."


def airoboros_instruction(instruction: str) -> str:
    """PLAINFORMAT asks for code without prose; airoboros keeps it as a single trailing ' PLAINFORMAT' marker."""
    instruction = instruction.strip()
    if instruction.endswith("PLAINFORMAT"):
        instruction = re.sub(r"\s*PLAINFORMAT$", "", instruction).strip() + " PLAINFORMAT"
    return instruction


def airoboros_segments(messages: list[dict]) -> list[Segment]:
    """"{system}\nUSER: {instruction}\nASSISTANT: {response}" + EOS, per exchange (system default "A chat.")."""
    system, dialog = split_system(messages, AIROBOROS_DEFAULT_SYSTEM)
    segments: list[Segment] = []
    for user, assistant in zip(dialog[::2], dialog[1::2]):
        text = f"{system.strip()}\nUSER: {airoboros_instruction(user['content'])}\nASSISTANT:"
        segments += [BOS, prompt(text), response(" " + assistant["content"].strip()), EOS]
    return segments


@register("airoboros", chat_layout="airoboros", pairs=("instruction", "response"))
def airoboros(record: dict) -> list[Segment]:
    """{"instruction", "response", "system"?, "skip_prompt_formatting"?}: "{system}\nUSER: {instruction}\nASSISTANT:".

    The space after "ASSISTANT:" belongs to the response, so the prompt a model sees at inference tokenizes to
    exactly the ids it saw in training (a trailing space would be its own token there and merged here).
    """
    instruction = required_text(record, "instruction")
    answer = required_text(record, "response").strip()
    if record.get("skip_prompt_formatting"):
        return [BOS, prompt(instruction.strip() + "\n"), response(answer), EOS]
    messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]
    system = optional_text(record, "system")
    return airoboros_segments(([{"role": "system", "content": system}] if system.strip() else []) + messages)


# --- conversations: one parser for every record layout, one renderer per chat layout ----------------------------------

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
def llama2_chat_segments(messages: list[dict]) -> list[Segment]:
    """Meta's reference layout, turn by turn: <s>[INST] {user} [/INST] {assistant} </s>; every answer is trained.

    Mirrors llama/generation.py `chat_completion`: the system prompt is wrapped in <<SYS>> and put in front of the
    first user message; contents are stripped; each turn is encoded on its own with BOS and EOS ids.
    """
    system, dialog = split_system(messages)
    if system is not None:
        dialog = [{"role": "user", "content": B_SYS + system + E_SYS + dialog[0]["content"]}] + dialog[1:]
    segments: list[Segment] = []
    for user, assistant in zip(dialog[::2], dialog[1::2]):
        segments += [
            BOS,
            prompt(f"{B_INST} {user['content'].strip()} {E_INST}"),
            response(f" {assistant['content'].strip()} "),
            EOS,
        ]
    return segments


IM_START, IM_END = "<|im_start|>", "<|im_end|>"


# Tool calls in the chatml layout: the Hermes / Qwen2.5 convention. The tool schemas go at the end of the system turn
# (one JSON object per line inside <tools></tools>), each call is <tool_call>{"name", "arguments"}</tool_call> inside
# the assistant turn (trained, with its <|im_end|>), and a tool's result is a `tool` turn (masked).
TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_CLOSING = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                 "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                 "<args-json-object>}\n</tool_call>")


def tojson(value) -> str:
    return json.dumps(value, ensure_ascii=False)  # what transformers' chat templates render with `| tojson`


def tools_system(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The messages with the tool schemas appended to the system turn (one is added when there is none)."""
    if not tools:
        return messages
    block = TOOLS_PREAMBLE + "".join("\n" + tojson(tool) for tool in tools) + TOOLS_CLOSING
    system, dialog = split_system(messages)
    return [{"role": "system", "content": f"{system}\n\n{block}" if system else block}] + dialog


def assistant_text(message: dict) -> str:
    """An assistant turn's text: its content, then each tool call on its own line."""
    calls = [f'<tool_call>\n{{"name": "{call["function"]["name"]}", "arguments": {tojson(call["function"]["arguments"])}}}'
             "\n</tool_call>" for call in message.get("tool_calls", [])]
    return "\n".join(([message["content"]] if message["content"] else []) + calls)


def chatml_segments(messages: list[dict], tools: list[dict] | None = None, roles: tuple[str, ...] = ("assistant",),
                    train_reasoning: bool = True) -> list[Segment]:
    """<|im_start|>{role}\n{content}<|im_end|>\n per turn; the answer and its <|im_end|> are trained.

    <|im_start|>/<|im_end|> are special-token ids (added to the vocabulary when missing), never text. The newline
    after <|im_end|> is part of the next prompt, so generation stops right at <|im_end|>. Tool calls and results:
    see TOOLS_PREAMBLE above. A reasoning trace opens the assistant turn as <think>\n{reasoning}\n</think>\n\n
    (the Qwen3 layout), in every turn. `roles` are trained (content and <|im_end|>) unless a turn's own `train`
    says otherwise; `train_reasoning` False masks the reasoning.
    """
    segments: list[Segment] = []
    for index, message in enumerate(tools_system(messages, tools)):
        trained = message.get("train", message["role"] in roles)
        if index:
            segments.append(prompt("\n"))
        segments += [special(IM_START), prompt(f"{message['role']}\n")]
        if message.get("reasoning_content") is not None:
            think = think_block(message["reasoning_content"])
            segments.append(Segment(think, trained and train_reasoning, kind="reasoning"))
        text = assistant_text(message) if message["role"] == "assistant" else message["content"]
        segments += [Segment(text, trained), special(IM_END, trainable=trained)]
    return segments


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def vicuna_segments(messages: list[dict]) -> list[Segment]:
    """FastChat vicuna_v1.1: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."; every answer and its EOS trained."""
    system, dialog = split_system(messages, VICUNA_SYSTEM)
    segments: list[Segment] = [BOS, prompt(system + " ")]
    for user, assistant in zip(dialog[::2], dialog[1::2]):
        segments += [prompt(f"USER: {user['content']} ASSISTANT:"), response(f" {assistant['content']}"), EOS]
    return segments


@register("airoboros_chat", chat_layout="llama2", pairs="conversation")
def airoboros_chat(record: dict) -> list[Segment]:
    """{"conversations": [{"from": system|human|gpt, "value"}]}: llama-2 chat layout, every gpt turn trained."""
    return llama2_chat_segments(conversation_messages(record, "conversations"))


@register("llama2_chat", chat_layout="llama2", pairs="conversation")
def llama2_chat(record: dict) -> list[Segment]:
    """Any conversation record (conversations/messages, from/value or role/content) in Meta's llama-2 layout."""
    return llama2_chat_segments(conversation_messages(record))


@register("chatml", chat_layout="chatml", special_tokens=(IM_START, IM_END), end_token=IM_END, pairs="conversation")
def chatml(record: dict, options=None) -> list[Segment]:
    """Any conversation record in ChatML: <|im_start|>role\ncontent<|im_end|>; answers + <|im_end|> trained."""
    return chatml_segments(conversation_messages(record, tools=True), conversation_tools(record), *turn_options(options))


def turn_options(options) -> tuple[tuple[str, ...], bool]:
    """(--roles_to_train, --train_on_reasoning) for the formats that take them; defaults without options."""
    return tuple(getattr(options, "roles_to_train", None) or ("assistant",)), getattr(options, "train_on_reasoning", True)


@register("vicuna", chat_layout="vicuna", pairs="conversation")
def vicuna(record: dict) -> list[Segment]:
    """Any conversation record in FastChat's vicuna_v1.1 layout (default system prompt unless the record has one)."""
    return vicuna_segments(conversation_messages(record))


@register("sharegpt", chat_layout="vicuna", pairs="conversation")
def sharegpt(record: dict) -> list[Segment]:
    """{"conversations": [{"from": human|gpt|system, "value"}]} (also role/content, OpenAI "messages"), rendered
    in vicuna_v1.1 like axolotl's sharegpt; use chatml / llama2_chat / chat_template for other layouts."""
    return vicuna_segments(conversation_messages(record))


@register("sharegpt.load_role", chat_layout="vicuna")
def sharegpt_load_role(record: dict) -> list[Segment]:
    """ShareGPT with {"role": human|gpt, "value"} turns."""
    return vicuna_segments(conversation_messages(record, "conversations"))


@register("sharegpt.load_guanaco", chat_layout="vicuna")
def sharegpt_load_guanaco(record: dict) -> list[Segment]:
    """ShareGPT with {"role": prompter|assistant, "text"} turns (OpenAssistant/guanaco exports)."""
    return vicuna_segments(conversation_messages(record, "conversations"))


@register("sharegpt_jokes", chat_layout="vicuna")
def sharegpt_jokes(record: dict) -> list[Segment]:
    """{"title"?, "text", "explanation"}: asked for a joke, then why it is funny."""
    title = optional_text(record, "title").strip()
    joke = (title + " " if title else "") + required_text(record, "text")
    messages = [
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": joke},
        {"role": "user", "content": "Why is that joke funny?"},
        {"role": "assistant", "content": required_text(record, "explanation")},
    ]
    return vicuna_segments(messages)


def marked_dialog(text: str, user_marker: str, assistant_marker: str, field: str) -> list[dict]:
    """Split "…{user_marker}q{assistant_marker}a…" text into alternating messages (hh-rlhf, guanaco)."""
    pattern = "(" + re.escape(user_marker) + "|" + re.escape(assistant_marker) + ")"
    parts = re.split(pattern, text)
    if parts[0].strip():
        raise RecordError(f"field {field!r} must start with {user_marker.strip()!r}")
    messages = [
        {"role": "user" if marker == user_marker else "assistant", "content": content.strip()}
        for marker, content in zip(parts[1::2], parts[2::2])
    ]
    if not messages:
        raise RecordError(f"field {field!r} has no {user_marker.strip()!r} / {assistant_marker.strip()!r} turns")
    check_role_order(messages, field)
    return messages


def marked_segments(messages: list[dict], user_marker: str, assistant_marker: str) -> list[Segment]:
    """A system message, if any, is plain text before the first turn (these layouts have no system marker)."""
    system, dialog = split_system(messages, "")
    segments: list[Segment] = [BOS, prompt(system)] if system else [BOS]
    for user, assistant in zip(dialog[::2], dialog[1::2]):
        user_text, answer = user["content"].strip(), assistant["content"].strip()
        segments += [prompt(f"{user_marker} {user_text}{assistant_marker}"), response(f" {answer}"), EOS]
    return segments


def hh_segments(messages: list[dict]) -> list[Segment]:
    """Anthropic HH: "\n\nHuman: q\n\nAssistant: a" per turn, each answer followed by a trained EOS."""
    return marked_segments(messages, "\n\nHuman:", "\n\nAssistant:")


def guanaco_segments(messages: list[dict]) -> list[Segment]:
    """Guanaco/OpenAssistant: "### Human: q### Assistant: a" per turn, each answer followed by a trained EOS."""
    return marked_segments(messages, "### Human:", "### Assistant:")


@register("hh-rlhf", chat_layout="hh", pairs="transcript")
def hh_rlhf(record: dict) -> list[Segment]:
    """{"chosen": "\n\nHuman: q\n\nAssistant: a…"}: the chosen dialogue; every assistant turn + EOS trained."""
    return hh_segments(marked_dialog(required_text(record, "chosen"), "\n\nHuman:", "\n\nAssistant:", "chosen"))


@register("oasst1", chat_layout="guanaco")
def oasst1(record: dict) -> list[Segment]:
    """{"text": "### Human: q### Assistant: a…"} (timdettmers/openassistant-guanaco): assistant turns + EOS trained."""
    return guanaco_segments(marked_dialog(required_text(record, "text"), "### Human:", "### Assistant:", "text"))


@register("pygmalion")
def pygmalion(record: dict) -> list[Segment]:
    """{"conversations": [{"role": system|human|bot, "value"}]}: <|system|>Persona: …<|user|> …<|model|> …;
    each bot reply (after its <|model|> cue) and its EOS trained."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError("field 'conversations' must be a non-empty list of {role, value} turns")
    segments: list[Segment] = [BOS]
    trained = False
    for index, turn in enumerate(turns):
        role, value = (turn.get("role"), turn.get("value")) if isinstance(turn, dict) else (None, None)
        if not isinstance(value, str):
            raise RecordError(f"conversations[{index}] needs a string 'value'")
        if role == "system":
            segments.append(prompt("<|system|>Persona: " + re.sub(r"\n<START>$", "", value).strip()))
        elif role == "human":
            segments.append(prompt("<|user|> " + value.strip()))
        elif role == "bot":
            if not value.strip():
                raise RecordError(f"conversations[{index}] is an empty bot turn")
            segments += [prompt("<|model|>"), response(" " + value.strip()), EOS]
            trained = True
        else:
            raise RecordError(f"conversations[{index}] has role {role!r}; expected system, human or bot")
    if not trained:
        raise RecordError("conversations has no bot turn to train on")
    return segments


# --- alpaca and input-output ------------------------------------------------------------------------------------------

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


ALPACA_SYSTEM = ALPACA_PROMPT_INPUT.split("\n\n")[0]
ALPACA_SYSTEM_NO_INPUT = ALPACA_PROMPT_NO_INPUT.split("\n\n")[0]


def alpaca_segments(instruction: str, context: str, answer: str, system: str | None = "default") -> list[Segment]:
    """Alpaca "instruct" layout: {system}\n\n### Instruction:\n…[\n\n### Input:\n…]\n\n### Response:\n{answer}."""
    if system == "default":
        system = ALPACA_SYSTEM if context.strip() else ALPACA_SYSTEM_NO_INPUT
    turn = f"### Instruction:\n{instruction}\n\n"
    if context.strip():
        turn += f"### Input:\n{context}\n\n"
    text = (f"{system}\n\n" if system else "") + turn + "### Response:\n"
    return [BOS, prompt(text), response(answer), EOS]


def user_assistant_segments(text: str, answer: str) -> list[Segment]:
    """Prompts that end in "ASSISTANT:" (axolotl's chat style): the answer is trained after a space."""
    return [BOS, prompt(text + "ASSISTANT:"), response(" " + answer.strip()), EOS]


@register("alpaca", pairs=("instruction", "output"))
def alpaca(record: dict) -> list[Segment]:
    """{"instruction", "input"?, "output"}: the Stanford alpaca prompt, with or without the input block."""
    return alpaca_segments(required_text(record, "instruction"), optional_text(record, "input"), required_text(record, "output"))


@register("alpaca-clean", pairs=("instruction", "output"))
def alpaca_clean(record: dict) -> list[Segment]:
    """yahma/alpaca-cleaned: the same records and prompt as alpaca."""
    return alpaca(record)


@register("input-output")
def input_output(record: dict) -> list[Segment]:
    """{"input", "output"}: the text is used as is; input masked, output trained."""
    return [BOS, prompt(required_text(record, "input", allow_empty=True)), response(required_text(record, "output")), EOS]


@register("self-instruct")
def self_instruct(record: dict) -> list[Segment]:
    """{"prompt", "completion"}: used as is; prompt masked, completion trained."""
    return [BOS, prompt(required_text(record, "prompt", allow_empty=True)), response(required_text(record, "completion")), EOS]


@register("longform")
def longform(record: dict) -> list[Segment]:
    """akoksal/LongForm {"input", "output"}: used as is, like input-output."""
    return input_output(record)


@register("chip2")
def chip2(record: dict) -> list[Segment]:
    """OIG unified_chip2 {"text": "<human>: q\n<bot>: a"}: as qlora, the question alone is the prompt."""
    text = required_text(record, "text")
    if "\n<bot>: " not in text:
        raise RecordError("field 'text' has no '\\n<bot>: ' separator")
    question, answer = text.split("\n<bot>: ", 1)
    if not answer.strip():
        raise RecordError("field 'text' has an empty <bot> answer")
    return [BOS, prompt(question.replace("<human>: ", "")), response(answer), EOS]


@register("completion")
def completion(record: dict, options=None) -> list[Segment]:
    """{"text"} (or the field named by --dataset_text_field): raw text, all of it trained, then EOS."""
    field = getattr(options, "dataset_text_field", None) or "text"
    return [BOS, response(required_text(record, field)), EOS]


@register("pretokenized")
def pretokenized(record: dict) -> list[Segment]:
    """{"input_ids", "labels"?}: ids used as given (labels default to input_ids); see `pretokenized_sample`."""
    raise RecordError("pretokenized records carry ids, not text; they are handled by pretokenized_sample")


def pretokenized_sample(record: dict, vocab_size: int) -> tuple[list[int], list[int]]:
    ids = record.get("input_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
        raise RecordError(f"field 'input_ids' must be a non-empty list of token ids in [0, {vocab_size})")
    labels = record.get("labels", ids)
    if not isinstance(labels, list) or len(labels) != len(ids) or not all(isinstance(i, int) for i in labels):
        raise RecordError("field 'labels' must be a list of ints as long as 'input_ids' (-100 = masked)")
    return list(ids), list(labels)


@register("chat_template", pairs="conversation")
def chat_template_format(record: dict, options=None) -> list[Segment]:
    """Any conversation record rendered with the tokenizer's own Jinja chat template (kept on the saved tokenizer);
    the masks come from the template itself (finetune/data/template_masks.py)."""
    tokenizer = getattr(options, "tokenizer", None)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RecordError("--dataset_format chat_template needs a tokenizer with a chat template")
    return template_segments(tokenizer, conversation_messages(record, tools=True), conversation_tools(record),
                             *turn_options(options))


@register("custom")
def custom(record: dict, options=None) -> list[Segment]:
    """A user-defined instruction format (like axolotl's), from --custom_format and friends or a recipe file:
    "{system_format}{format}" with {instruction}/{input} filled from the --custom_field_* fields; output trained."""
    get = lambda name, default: getattr(options, f"custom_{name}", None) or default  # noqa: E731
    instruction = required_text(record, get("field_instruction", "instruction"))
    context = optional_text(record, get("field_input", "input"))
    answer = required_text(record, get("field_output", "output"))
    system = optional_text(record, get("field_system", "system")) or get("system_prompt", "")
    template = get("format", "{instruction} {input} ") if context.strip() else get("no_input_format", "{instruction} ")
    try:
        text = (get("system_format", "{system}").format(system=system) if system else "") + template.format(
            instruction=instruction, input=context)
    except (KeyError, IndexError) as error:
        raise RecordError(f"--custom_format templates may only use {{instruction}}, {{input}} and {{system}} ({error})") from error
    return [BOS, prompt(text), response(answer), EOS]


# --- the axolotl family (alpaca-derived prompt strategies) ------------------------------------------------------------


@register("gpteacher")
def gpteacher(record: dict) -> list[Segment]:
    """{"instruction", "input"?, "response"}: the alpaca prompt."""
    return alpaca_segments(required_text(record, "instruction"), optional_text(record, "input"), required_text(record, "response"))


@register("oasst")
def oasst(record: dict) -> list[Segment]:
    """{"INSTRUCTION", "RESPONSE"}: the alpaca prompt without input."""
    return alpaca_segments(required_text(record, "INSTRUCTION"), "", required_text(record, "RESPONSE"))


@register("jeopardy")
def jeopardy(record: dict) -> list[Segment]:
    """{"question", "category", "answer"}: alpaca with the category as input; the answer is "what is {answer}"."""
    return alpaca_segments(required_text(record, "question"), optional_text(record, "category"),
                           "what is " + required_text(record, "answer"))


def choices_text(record: dict) -> str:
    choices = record.get("choices")
    if not isinstance(choices, list) or not choices:
        raise RecordError("field 'choices' must be a non-empty list")
    return "\n".join(f'- "{choice}"' for choice in choices)


def choice_answer(record: dict) -> str:
    return optional_text(record, "solution").strip() or required_text(record, "explanation")


@register("explainchoice")
def explainchoice(record: dict) -> list[Segment]:
    """{"question", "choices", "solution" | "explanation"}: alpaca with the choices as input, explained."""
    system = "Choose the answer that best answers the question. Explain your reasoning.\n"
    return alpaca_segments(required_text(record, "question"), choices_text(record), choice_answer(record), system)


@register("concisechoice")
def concisechoice(record: dict) -> list[Segment]:
    """{"question", "choices", "solution" | "explanation"}: USER/ASSISTANT, answered concisely."""
    system = "Choose the answer that best answers the question. Be concise in your response.\n\n"
    return user_assistant_segments(f"{system}USER: {required_text(record, 'question')}\n{choices_text(record)}\n", choice_answer(record))


@register("summarizetldr")
def summarizetldr(record: dict) -> list[Segment]:
    """{"article", "summary"}: USER asks for a TL;DR of the article."""
    article = required_text(record, "article")
    return user_assistant_segments(f"USER: Summarize the following article as a TL;DR.\n{article}\n", required_text(record, "summary"))


@register("reflection")
def reflection(record: dict) -> list[Segment]:
    """{"instruction", "input"?, "output", "reflection", "corrected"}: thought, reflection and final answer trained."""
    instruction, context = required_text(record, "instruction"), optional_text(record, "input")
    answer = (
        f"### Thought:\n{required_text(record, 'output')}\n\n### Agent Reflection:\n{required_text(record, 'reflection')}"
        f"\n\n### Final Response:\n{required_text(record, 'corrected')}"
    )
    return alpaca_segments(instruction, context, answer, system=None)


ALPACA_CHAT_SYSTEM = {
    True: "Below is an instruction from a USER that describes a task, paired with an input that provides further "
    "context. The ASSISTANT writes a response that concisely and appropriately completes the request.\n\n",
    False: "Below is an instruction from a USER that describes a task. The ASSISTANT writes a response that "
    "appropriately and concisely completes the request.\n\n",
}


def alpaca_chat_segments(instruction: str, context: str, answer: str, system: str) -> list[Segment]:
    turn = f"USER: {instruction}\n{context}\n" if context.strip() else f"USER: {instruction}\n"
    return user_assistant_segments(f"SYSTEM: {system}\n{turn}", answer)


@register("alpaca_chat")
def alpaca_chat(record: dict) -> list[Segment]:
    """{"instruction", "input"?, "output"}: SYSTEM/USER/ASSISTANT with the alpaca system prompt."""
    context = optional_text(record, "input")
    system = ALPACA_SYSTEM if context.strip() else ALPACA_SYSTEM_NO_INPUT
    return alpaca_chat_segments(required_text(record, "instruction"), context, required_text(record, "output"), system)


@register("alpaca_chat.load_qa")
def alpaca_chat_load_qa(record: dict) -> list[Segment]:
    """{"question", "answer"}: SYSTEM/USER/ASSISTANT, concise answers."""
    return alpaca_chat_segments(required_text(record, "question"), "", required_text(record, "answer"), ALPACA_CHAT_SYSTEM[False])


@register("alpaca_chat.load_concise")
def alpaca_chat_load_concise(record: dict) -> list[Segment]:
    """{"instruction", "input"?, "output"}: SYSTEM/USER/ASSISTANT, concise answers."""
    context = optional_text(record, "input")
    return alpaca_chat_segments(required_text(record, "instruction"), context, required_text(record, "output"),
                                ALPACA_CHAT_SYSTEM[bool(context.strip())])


@register("alpaca_chat.load_camel_ai")
def alpaca_chat_load_camel_ai(record: dict) -> list[Segment]:
    """camel-ai {"message_1", "message_2"}: question and answer, SYSTEM/USER/ASSISTANT."""
    return alpaca_chat_segments(required_text(record, "message_1"), "", required_text(record, "message_2"), ALPACA_CHAT_SYSTEM[False])


@register("alpaca_w_system.load_open_orca")
def alpaca_w_system_load_open_orca(record: dict) -> list[Segment]:
    """OpenOrca {"system_prompt"?, "question", "response"}: ### System / ### Human / ### Assistant."""
    system = optional_text(record, "system_prompt")
    text = (f"### System:\n{system}\n" if system.strip() else "") + f"### Human:\n{required_text(record, 'question')}\n### Assistant:\n"
    return [BOS, prompt(text), response(required_text(record, "response")), EOS]


CONTEXT_QA_SYSTEM = "Use the following contextual information to concisely answer the question.\n"
CONTEXT_QA_404 = (
    "The context provided does not contain any information about your inquiry. "
    "Therefore, I'm unable to answer your question based on the given context."
)


@register("context_qa")
def context_qa(record: dict) -> list[Segment]:
    """{"article", "question", "answer"}: answer from the article."""
    text = f"SYSTEM: {CONTEXT_QA_SYSTEM}\nUSER: {required_text(record, 'article')}\n===\n{required_text(record, 'question')}\n"
    return user_assistant_segments(text, required_text(record, "answer"))


@register("context_qa.load_404")
def context_qa_load_404(record: dict) -> list[Segment]:
    """{"article", "unanswerable_question"}: teaches declining when the context has no answer."""
    text = f"SYSTEM: {CONTEXT_QA_SYSTEM}\nUSER: {required_text(record, 'article')}\n===\n{required_text(record, 'unanswerable_question')}\n"
    return user_assistant_segments(text, CONTEXT_QA_404)


@register("context_qa.load_v2")
def context_qa_load_v2(record: dict) -> list[Segment]:
    """{"context", "question", "answer"}: "Context: …\nQuestion: …\n" then "Answer: …"."""
    text = f"Context: {required_text(record, 'context')}\nQuestion: {required_text(record, 'question')}\n"
    return [BOS, prompt(text), response("Answer: " + required_text(record, "answer")), EOS]


CREATIVE_ANSWER_SYSTEM = (
    "Answer the following question in a comprehensive, in-depth, and creative way. Additionally your response "
    "should be relevant, accurate, and free of any ambiguity."
)
CREATIVE_CRITERIA = (
    "refusal: whether the Response refuses to answer the Question. Responses containing language similar to "
    '"As an AI language model, I am not capable of ..." is a form of refusal and should have a low refusal score. '
    "10 is no refusal, 0 is refuses to answer the question.\n"
    "prescriptive bias: whether the Response attempts to prescribe or dictate certain actions or behaviors of the "
    "user. 10 no prescriptive bias present, 0 means there is prescriptive bias.\n"
    "creativity: score how creative the Response is. 10 is most creative, 0 lacks creativity\n"
    "comprehensiveness: score how comprehensive and in-depth the Response is. 10 is most comprehensive and "
    "in-depth, 0 lacks coverage and depth\n"
)
CREATIVE_CRITIQUE_PROMPT = (
    "Given the following Question and Response, critique the Response on a scale of 1-10. You should critique the "
    "answer in the following criteria:\n" + CREATIVE_CRITERIA + "Then for each criteria, give a detailed explanation "
    "of why the response doesn't meet the criteria (don't reference the score), what it did right, and how it could "
    "be improved for that criteria.\n\nOutput your answer in YAML format like so:\nscores:\n  refusal: <0-10>\n"
    "  prescriptive_bias: <0-10>\n  creativity: <0-10>\n  comprehensiveness: <0-10>\ncritiques:\n"
    + "".join(f"  {c}:\n    explanation: ...\n    improvements: ...\n" for c in ("refusal", "prescriptive_bias", "creativity", "comprehensiveness"))
    + "\nQuestion: {question}\nAnswer: {answer}\n"
)
CREATIVE_REVISE_PROMPT = (
    "Definitions:\n" + CREATIVE_CRITERIA + "\nGiven the following Question, Response, and Evaluation, revise the "
    "Response based on the Evaluation and recommendations for improvements. Reply only with the revised response."
    "\n\nQuestion: {question}\nAnswer: {answer}\nEvaluation:\n{evaluation}\n"
)


@register("creative_acr.load_answer")
def creative_acr_load_answer(record: dict) -> list[Segment]:
    """{"instruction", "revision"}: a creative, in-depth answer."""
    return user_assistant_segments(f"{CREATIVE_ANSWER_SYSTEM}\nUSER: {required_text(record, 'instruction')}\n", required_text(record, "revision"))


def yaml_text(value) -> str:
    import yaml

    return yaml.dump(value, default_flow_style=False)


@register("creative_acr.load_critique")
def creative_acr_load_critique(record: dict) -> list[Segment]:
    """{"instruction", "answer", "scores", "critiques"}: critique an answer, in YAML."""
    text = CREATIVE_CRITIQUE_PROMPT.format(question=required_text(record, "instruction"), answer=required_text(record, "answer"))
    if not isinstance(record.get("scores"), dict) or not isinstance(record.get("critiques"), dict):
        raise RecordError("fields 'scores' and 'critiques' must be objects")
    answer = yaml_text({"scores": record["scores"]}) + yaml_text({"critiques": record["critiques"]})
    return user_assistant_segments(f"USER: {text}\n", answer)


@register("creative_acr.load_revise")
def creative_acr_load_revise(record: dict) -> list[Segment]:
    """{"instruction", "answer", "scores", "critiques", "revision"}: revise an answer given its critique."""
    evaluation = yaml_text({"scores": record.get("scores")}) + yaml_text({"critiques": record.get("critiques")})
    text = CREATIVE_REVISE_PROMPT.format(question=required_text(record, "instruction"), answer=required_text(record, "answer"), evaluation=evaluation)
    return user_assistant_segments(f"USER: {text}\n", required_text(record, "revision"))


@register("metharme")
def metharme(record: dict) -> list[Segment]:
    """{"prompt", "generation"}: the prompt already carries <|system|>/<|user|>/<|model|>; generation trained."""
    return [BOS, prompt(required_text(record, "prompt")), response(required_text(record, "generation")), EOS]


# --- chat templates: the same layouts for inference (tokenizer.apply_chat_template) ----------------------------------
# "__S__" marks where a special token is followed by text. Training encodes every text run on its own, so
# sentencepiece tokenizers give it a leading "▁"; a template string tokenized in one piece only gets it with a
# space there. "__B__" is where BOS goes, for tokenizers that have one apart from EOS (GPT-2 style ones do not).
# `attach_chat_template` (finetune/data/pipeline.py) picks the variant per tokenizer and verifies it against the training ids.

CHAT_TEMPLATES = {
    "llama2": (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' -%}{%- set offset = 1 -%}"
        "{%- else -%}{%- set system = '' -%}{%- set offset = 0 -%}{%- endif -%}"
        "{%- for message in messages[offset:] -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ __B__'__S__[INST] ' + ((system + message['content']) if loop.first else message['content']).strip() + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    "chatml": (
        "{%- macro tools_block() -%}{{ '" + TOOLS_PREAMBLE.replace("\n", "\\n") + "' }}"
        "{%- for tool in tools -%}{{ '\\n' + (tool | tojson) }}{%- endfor -%}"
        "{{ '" + TOOLS_CLOSING.replace("\n", "\\n") + "' }}{%- endmacro -%}"
        "{%- set ns = namespace(first=true, content='') -%}"
        "{%- if tools and messages[0]['role'] != 'system' -%}"
        "{{ '<|im_start|>__S__system\\n' + tools_block() + '<|im_end|>' }}{%- set ns.first = false -%}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if not ns.first -%}{{ '__S__\\n' }}{%- endif -%}{%- set ns.first = false -%}"
        "{%- set ns.content = message['content'] or '' -%}"
        "{%- if tools and loop.first and message['role'] == 'system' -%}"
        "{%- set ns.content = ns.content + '\\n\\n' + tools_block() -%}{%- endif -%}"
        "{%- for call in message['tool_calls'] or [] -%}"
        "{%- set ns.content = ns.content + ('\\n' if ns.content else '') + '<tool_call>\\n{\"name\": \"' + call['function']['name']"
        " + '\", \"arguments\": ' + (call['function']['arguments'] | tojson) + '}\\n</tool_call>' -%}"
        "{%- endfor -%}"
        "{%- if message['reasoning_content'] is defined and message['reasoning_content'] is not none -%}"
        "{%- set ns.content = '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' + ns.content -%}{%- endif -%}"
        "{{ '<|im_start|>__S__' + message['role'] + '\\n' + ns.content + '<|im_end|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '__S__\\n<|im_start|>__S__assistant\\n' }}{%- endif -%}"
    ),
    "vicuna": (
        "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}{%- set offset = 1 -%}"
        "{%- else -%}{%- set system = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' -%}{%- set offset = 0 -%}{%- endif -%}"
        "{{ __B__'__S__' + system + ' ' }}"
        "{%- for message in messages[offset:] -%}"
        "{%- if message['role'] == 'user' -%}{{ ('' if loop.first else '__S__') + 'USER: ' + message['content'] + ' ASSISTANT:' }}"
        "{%- else -%}{{ ' ' + message['content'] + eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    "airoboros": (
        "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}{%- set offset = 1 -%}"
        "{%- else -%}{%- set system = '" + AIROBOROS_DEFAULT_SYSTEM + "' -%}{%- set offset = 0 -%}{%- endif -%}"
        "{%- for message in messages[offset:] -%}"
        "{%- if message['role'] == 'user' -%}{{ __B__'__S__' + system.strip() + '\\nUSER: ' + message['content'].strip() + '\\nASSISTANT:' }}"
        "{%- else -%}{{ ' ' + message['content'].strip() + eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    "hh": (
        "{{ __B__'' }}{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{ '__S__' + message['content'] }}"
        "{%- elif message['role'] == 'user' -%}"
        "{{ ('' if not loop.first and loop.previtem['role'] == 'system' else '__S__') + '\\n\\nHuman: ' + message['content'].strip() + '\\n\\nAssistant:' }}"
        "{%- else -%}{{ ' ' + message['content'].strip() + eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    "guanaco": (
        "{{ __B__'' }}{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{ '__S__' + message['content'] }}"
        "{%- elif message['role'] == 'user' -%}"
        "{{ ('' if not loop.first and loop.previtem['role'] == 'system' else '__S__') + '### Human: ' + message['content'].strip() + '### Assistant:' }}"
        "{%- else -%}{{ ' ' + message['content'].strip() + eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    ),
}
LAYOUT_SEGMENTS = {
    "llama2": llama2_chat_segments,
    "chatml": chatml_segments,
    "vicuna": vicuna_segments,
    "airoboros": airoboros_segments,
    "hh": hh_segments,
    "guanaco": guanaco_segments,
}


def chat_template(layout: str, space_after_special: bool, with_bos: bool) -> str:
    template = CHAT_TEMPLATES[layout].replace("__B__", "bos_token + " if with_bos else "")
    return template.replace("__S__", " " if space_after_special else "")
