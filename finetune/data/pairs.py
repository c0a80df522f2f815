"""Preference pairs (--rl dpo|ipo|orpo|simpo): one record -> a chosen and a rejected sample that share their prompt ids;
and unpaired preference records (--rl kto): one record -> one sample with a desirable / undesirable label.

Each side is rendered as the SFT record the dataset's format already reads (a conversation ending in that side's
answer, an instruction record with that side as its response, or an hh-rlhf transcript) and goes through the one
encoder (`encode_segments`), so the prompt ids are exactly those SFT trains on and each answer keeps its trained
end token. Only the final answer is trained: earlier assistant turns become prompt. Where a token straddles the
prompt/answer boundary on one side only, the shared prompt ends before it on both sides (its ids are then trained),
so the two prompts are always the same ids.

Record layouts (the format's `pairs` says which it reads; dataset_formats.py):
- conversations: {prompt: str | turns, chosen, rejected} or {messages | conversations: turns, chosen, rejected},
  with `system` for a string prompt; a side is a string, an assistant turn, or turns: assistant turns appended to
  the prompt, or a whole conversation (UltraFeedback-binarized: [user, assistant]) used as it is.
- instruction formats (airoboros, alpaca): the record with the side as its response field; `prompt` stands for the
  instruction field when that is missing.
- transcripts (hh-rlhf): {chosen, rejected}, each a whole "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogue; the shared
  prefix ends at the last assistant turn.
- KTO: the same layouts with one `completion` (string, turn or turns; hh-rlhf: a whole transcript) and a boolean
  `label` instead of chosen / rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from finetune.data.conversations import CONVERSATION_FIELDS, ROLE_ALIASES
from finetune.data.segments import IGNORE_INDEX, RecordError, Segment, encode_segments

SIDES = ("chosen", "rejected")
UNPAIRED = ("completion", "label")  # KTO: one answer, desirable or not


def side_records(record: dict, layout, sides: tuple[str, ...] = SIDES) -> list[dict]:
    """One record per side (chosen and rejected; KTO: the completion), each in the layout its format reads."""
    for side in sides:
        if record.get(side) is None:
            raise RecordError(f"missing field {side!r}: " + (f"a preference pair needs {SIDES[0]!r} and {SIDES[1]!r}"
                              if sides == SIDES else f"an unpaired preference record needs {side!r} and 'label'")
                              + f" (the record has: {', '.join(sorted(record)) or 'no fields'})")
    if layout == "transcript":
        for side in sides:
            if not isinstance(record[side], str):
                raise RecordError(f"field {side!r} must be a whole dialogue as a string (hh-rlhf), got "
                                  f"{type(record[side]).__name__}")
        return [{"chosen": record[side]} for side in sides]
    rest = {key: value for key, value in record.items() if key not in (*SIDES, *UNPAIRED)}
    if isinstance(layout, tuple):
        prompt_field, response_field = layout
        if rest.get(prompt_field) is None and isinstance(rest.get("prompt"), str):
            rest[prompt_field] = rest.pop("prompt")
        out = []
        for side in sides:
            if not isinstance(record[side], str):
                raise RecordError(f"field {side!r} must be a string for this format (an answer to the instruction); "
                                  "for message lists use a conversation format such as chatml")
            out.append({**rest, response_field: record[side]})
        return out
    base = prompt_turns(rest)
    for name in ("prompt", "system", *CONVERSATION_FIELDS):
        rest.pop(name, None)
    return [rest | {"conversations": conversation_with(base, record[side], side)} for side in sides]


def prompt_turns(record: dict) -> list:
    """The prompt as conversation turns ([] when each side holds its whole conversation)."""
    value = record.get("prompt")
    if value is None:
        value = next((record[name] for name in CONVERSATION_FIELDS if record.get(name) is not None), None)
    if value is None:
        return []
    if isinstance(value, str):
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise RecordError(f"field 'system' must be a string, got {type(system).__name__}")
        return ([{"role": "system", "content": system}] if system and system.strip() else []) + [
            {"role": "user", "content": value}]
    if isinstance(value, list):
        return list(value)
    raise RecordError(f"field 'prompt' must be a string or a list of turns, got {type(value).__name__}")


def role_of(turn) -> str | None:
    return ROLE_ALIASES.get(turn.get("from", turn.get("role"))) if isinstance(turn, dict) else None


def conversation_with(base: list, value, side: str) -> list:
    """The prompt turns followed by this side's answer."""
    if isinstance(value, str):
        turns = base + [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        turns = base + [value]
    elif isinstance(value, list) and value:
        turns = base + value if role_of(value[0]) == "assistant" else list(value)
    else:
        raise RecordError(f"field {side!r} must be a string, an assistant turn or a non-empty list of turns, got "
                          f"{type(value).__name__ if not isinstance(value, list) else 'an empty list'}")
    if not base and not (isinstance(value, list) and role_of(value[0]) != "assistant"):
        raise RecordError(f"missing field 'prompt' (or 'messages' / 'conversations'): {side!r} is only an answer")
    if role_of(turns[-1]) != "assistant":
        raise RecordError(f"field {side!r} must end with an assistant turn (the answer compared)")
    return turns


def final_answer_only(samples: list[list[Segment]]) -> list[Segment]:
    """The sample holding the last answer, with everything before that answer's trained run made prompt."""
    segments = samples[-1]
    start = max((i for i, s in enumerate(segments) if s.trainable and (i == 0 or not segments[i - 1].trainable)),
                default=None)
    if start is None:
        raise RecordError("nothing in this side is trained")
    return [Segment(s.text, False, s.special, s.template, s.kind) if i < start and s.trainable else s
            for i, s in enumerate(segments)]


@dataclass
class EncodedPair:
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    prompt_length: int  # the ids both sides share before their first trained token
    boundary_merges: int

    @property
    def identical(self) -> bool:
        return self.chosen_ids == self.rejected_ids


def encode_pair(record: dict, layout, render: Callable[[dict], list[list[Segment]]], tokenizer) -> EncodedPair:
    """Both sides rendered (`render`: a side's record -> its samples) and encoded; the prompt ids made identical."""
    sides = [final_answer_only(render(side)) for side in side_records(record, layout)]
    prompts = [segments[:next(i for i, s in enumerate(segments) if s.trainable)] for segments in sides]
    if prompts[0] != prompts[1]:
        raise RecordError("chosen and rejected have different prompts: a pair must share everything before its "
                          "final answer (check the prompt / earlier turns of both sides)")
    encoded = [encode_segments(segments, tokenizer) for segments in sides]
    chosen, rejected = encoded
    shared = 0
    for a, b in zip(chosen.input_ids, rejected.input_ids):
        if a != b:
            break
        shared += 1
    prompt_length = min(shared, *(first_trained(e.labels) for e in encoded))
    labels = []
    for e in encoded:  # ids after the shared prompt but before this side's first trained one: a boundary merge
        side = list(e.labels)
        side[prompt_length:first_trained(e.labels)] = e.input_ids[prompt_length:first_trained(e.labels)]
        labels.append(side)
    return EncodedPair(chosen.input_ids, labels[0], rejected.input_ids, labels[1], prompt_length,
                       chosen.boundary_merges + rejected.boundary_merges)


def first_trained(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


@dataclass
class EncodedUnpaired:
    input_ids: list[int]
    labels: list[int]
    desirable: bool
    prompt_length: int
    boundary_merges: int


def encode_unpaired(record: dict, layout, render: Callable[[dict], list[list[Segment]]], tokenizer) -> EncodedUnpaired:
    """KTO: {prompt | messages | conversations, completion, label} -> the completion's sample (final answer
    trained) and whether it is desirable."""
    label = record.get("label")
    if not (isinstance(label, bool) or label in (0, 1)):
        raise RecordError(f"field 'label' must be true (desirable) or false (undesirable), got {label!r}")
    (side,) = side_records(record, layout, ("completion",))
    encoded = encode_segments(final_answer_only(render(side)), tokenizer)
    return EncodedUnpaired(encoded.input_ids, encoded.labels, bool(label), first_trained(encoded.labels),
                           encoded.boundary_merges)
