"""Dataset formats: how one record becomes the text a model is trained on, and which parts of it are trained.

A format is a small pure function `record -> list[Segment]`, registered by name with `@register("name")`. It knows
nothing about tokenizers or torch: it says which text is prompt (masked out of the loss) and which is response
(trained), and where the BOS / EOS *ids* go (never as text). `encode_segments` is the one place where segments
become token ids and labels; every other stage (length filtering, statistics, training) reuses those ids.

    >>> render_segments(FORMATS["alpaca"]({"instruction": "Add 2 and 2.", "output": "4"}))[-10:]
    '\\n[[4]]</s>'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered sample: plain text, or a special token (`special` = "bos" | "eos") added as an id."""

    text: str
    trainable: bool
    special: str | None = None


def prompt(text: str) -> Segment:
    return Segment(text, trainable=False)


def response(text: str) -> Segment:
    return Segment(text, trainable=True)


BOS = Segment("", trainable=False, special="bos")
EOS = Segment("", trainable=True, special="eos")  # the end token of a response is trained: models learn to stop


class RecordError(ValueError):
    """A record that a format cannot render; the message names the field and the fix."""


FormatFn = Callable[[dict], list[Segment]]
FORMATS: dict[str, FormatFn] = {}


def register(name: str) -> Callable[[FormatFn], FormatFn]:
    def add(fn: FormatFn) -> FormatFn:
        if name in FORMATS:
            raise ValueError(f"dataset format {name!r} registered twice")
        FORMATS[name] = fn
        return fn

    return add


def get_format(name: str) -> FormatFn:
    if name not in FORMATS:
        raise KeyError(f"unknown --dataset_format {name!r}; known formats: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


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


@register("airoboros")
def airoboros(record: dict) -> list[Segment]:
    """{"instruction", "response", "system"?, "skip_prompt_formatting"?}: "{system}\\nUSER: {instruction}\\nASSISTANT:".

    The space after "ASSISTANT:" belongs to the response, so the prompt a model sees at inference tokenizes to
    exactly the ids it saw in training (a trailing space would be its own token there and merged here).
    """
    instruction = required_text(record, "instruction")
    answer = required_text(record, "response").strip()
    if record.get("skip_prompt_formatting"):
        return [BOS, prompt(instruction.strip() + "\n"), response(answer), EOS]
    system = (optional_text(record, "system") or AIROBOROS_DEFAULT_SYSTEM).strip()
    text = f"{system}\nUSER: {airoboros_instruction(instruction)}\nASSISTANT:"
    return [BOS, prompt(text), response(" " + answer), EOS]


# --- airoboros_chat (conversations, llama-2 chat layout) --------------------------------------------------------------

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
ROLE_ALIASES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def conversation_messages(record: dict, field: str = "conversations") -> list[dict]:
    """[{from|role, value|content}] -> [{"role": system|user|assistant, "content"}], with the role order checked."""
    turns = record.get(field)
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"field {field!r} must be a non-empty list of turns")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"{field}[{index}] must be an object with 'from' and 'value'")
        role = turn.get("from", turn.get("role"))
        if role not in ROLE_ALIASES:
            raise RecordError(f"{field}[{index}] has role {role!r}; expected one of {', '.join(ROLE_ALIASES)}")
        content = turn.get("value", turn.get("content"))
        if not isinstance(content, str):
            raise RecordError(f"{field}[{index}] ({role}) needs a string 'value'")
        messages.append({"role": ROLE_ALIASES[role], "content": content})
    check_role_order(messages, field)
    return messages


def check_role_order(messages: list[dict], field: str) -> None:
    start = 1 if messages[0]["role"] == "system" else 0
    dialog = messages[start:]
    if not dialog:
        raise RecordError(f"{field} has a system turn but no user/assistant turns")
    for offset, message in enumerate(dialog):
        expected = "user" if offset % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RecordError(
                f"{field}[{start + offset}] is a {message['role']} turn where a {expected} turn must be "
                "(optional system first, then user and assistant alternating)"
            )
        if expected == "assistant" and not message["content"].strip():
            raise RecordError(f"{field}[{start + offset}] is an empty assistant turn")
    if dialog[-1]["role"] != "assistant":
        raise RecordError(f"{field} must end with an assistant turn (the last turn is {dialog[-1]['role']})")


def llama2_chat_segments(messages: list[dict]) -> list[Segment]:
    """Meta's reference layout, turn by turn: <s>[INST] {user} [/INST] {assistant} </s>; every answer is trained.

    Mirrors llama/generation.py `chat_completion`: the system prompt is wrapped in <<SYS>> and put in front of the
    first user message; contents are stripped; each turn is encoded on its own with BOS and EOS ids.
    """
    if messages[0]["role"] == "system":
        first_user = B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]
        messages = [{"role": "user", "content": first_user}] + messages[2:]
    segments: list[Segment] = []
    for user, assistant in zip(messages[::2], messages[1::2]):
        segments += [
            BOS,
            prompt(f"{B_INST} {user['content'].strip()} {E_INST}"),
            response(f" {assistant['content'].strip()} "),
            EOS,
        ]
    return segments


@register("airoboros_chat")
def airoboros_chat(record: dict) -> list[Segment]:
    """{"conversations": [{"from": system|human|gpt, "value"}]}: llama-2 chat layout, every gpt turn trained."""
    return llama2_chat_segments(conversation_messages(record))


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


@register("alpaca")
def alpaca(record: dict) -> list[Segment]:
    """{"instruction", "input"?, "output"}: the Stanford alpaca prompt, with or without the input block."""
    instruction = required_text(record, "instruction")
    answer = required_text(record, "output")
    context = optional_text(record, "input")
    template = ALPACA_PROMPT_INPUT if context.strip() else ALPACA_PROMPT_NO_INPUT
    return [BOS, prompt(template.format(instruction=instruction, input=context)), response(answer), EOS]


@register("input-output")
def input_output(record: dict) -> list[Segment]:
    """{"input", "output"}: the text is used as is; input masked, output trained."""
    return [BOS, prompt(required_text(record, "input", allow_empty=True)), response(required_text(record, "output")), EOS]


def prompt_segments(segments: list[Segment]) -> list[Segment]:
    """What an inference prompt is: everything before the last trained segment (the answer to generate)."""
    last = max(i for i, segment in enumerate(segments) if segment.trainable and segment.special is None)
    return segments[:last]


# --- rendering and encoding: the one place where text becomes ids and labels -----------------------------------------


def render_segments(segments: Iterable[Segment], bos: str = "<s>", eos: str = "</s>", mark: bool = True) -> str:
    """Human-readable rendering; with `mark`, trained text is wrapped in [[...]] (for previews and golden tests)."""
    parts = []
    for segment in segments:
        text = {"bos": bos, "eos": eos}.get(segment.special or "", segment.text)
        parts.append(f"[[{text}]]" if mark and segment.trainable and segment.special is None else text)
    return "".join(parts)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    boundary_merges: int  # prompt/response boundaries where a token straddled both (counted in stats.json)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode_text_run(run: list[Segment], tokenizer) -> tuple[list[int], list[int], int]:
    """Encode adjacent text segments as ONE string, as the model will see them at inference.

    The trained/masked boundary is where the prompt alone stops being a prefix of the whole: encoding the prompt
    by itself gives exactly the ids inference will feed, so labels start right after them. If a token straddles
    the boundary, the prefix property breaks; the straddling token is then trained and the merge is counted.
    """
    ids: list[int] = []
    labels: list[int] = []
    merges = 0
    text = ""
    for segment in run:
        text += segment.text
        current = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        keep = _common_prefix_length(ids, current)
        if keep < len(ids):
            merges += 1
        new = current[keep:]
        labels = labels[:keep] + (list(new) if segment.trainable else [IGNORE_INDEX] * len(new))
        ids = list(current)
    return ids, labels, merges


def _merge_same_flag(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        if merged and segment.special is None and merged[-1].special is None and merged[-1].trainable == segment.trainable:
            merged[-1] = Segment(merged[-1].text + segment.text, segment.trainable)
        else:
            merged.append(segment)
    return merged


def special_ids(tokenizer) -> dict[str, int | None]:
    """BOS is added only where the tokenizer has a BOS distinct from EOS (Llama, Mistral), never for GPT-2 style."""
    bos = tokenizer.bos_token_id
    if bos is not None and bos == tokenizer.eos_token_id:
        bos = None
    return {"bos": bos, "eos": tokenizer.eos_token_id}


def encode_segments(segments: list[Segment], tokenizer, train_on_source: bool = False) -> Encoded:
    """Segments -> ids and labels (IGNORE_INDEX where masked). BOS/EOS are ids, never parsed from text."""
    specials = special_ids(tokenizer)
    if specials["eos"] is None:
        raise ValueError("the tokenizer has no EOS token; pass --eos_token (e.g. --eos_token '</s>')")
    input_ids: list[int] = []
    labels: list[int] = []
    merges = 0
    run: list[Segment] = []
    for segment in _merge_same_flag(segments) + [Segment("", False, special="end")]:
        if segment.special is None:
            run.append(segment)
            continue
        if run:
            ids, run_labels, run_merges = _encode_text_run(run, tokenizer)
            input_ids += ids
            labels += run_labels
            merges += run_merges
            run = []
        token = specials.get(segment.special)
        if token is not None:
            input_ids.append(token)
            labels.append(token if segment.trainable else IGNORE_INDEX)
    if train_on_source:
        labels = list(input_ids)
    return Encoded(input_ids, labels, merges)
