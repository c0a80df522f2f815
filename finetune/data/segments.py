"""Segments: the text of one sample, piece by piece, with what is trained; and the one place where they become ids.

A dataset format (dataset_formats.py) turns a record into segments; `encode_segments` turns segments into token ids
and labels (IGNORE_INDEX where masked). Every later stage (length filtering, packing, statistics, training) reuses
those ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered sample: plain text, or a special token added as an id. `special` is "bos", "eos"
    (the tokenizer's own) or a literal token such as "<|im_end|>" that must be one id in the vocabulary."""

    text: str
    trainable: bool
    special: str | None = None
    template: bool = False  # text rendered by a chat template: special tokens written in it are parsed as tokens
    kind: str = ""  # "reasoning" for a reasoning trace (shown apart in previews); "" for everything else


class Samples(list):
    """What a format returns when one record becomes several samples (each a list of segments), e.g. one per
    assistant turn for chat templates that render past turns differently from the current one; `strategy` says
    how the record was rendered (counted in stats.json)."""

    def __init__(self, samples: list[list[Segment]], strategy: str):
        super().__init__(samples)
        self.strategy = strategy


def prompt(text: str) -> Segment:
    return Segment(text, trainable=False)


def response(text: str) -> Segment:
    return Segment(text, trainable=True)


def special(token: str, trainable: bool = False) -> Segment:
    return Segment("", trainable=trainable, special=token)


BOS = Segment("", trainable=False, special="bos")
EOS = Segment("", trainable=True, special="eos")  # the end token of a response is trained: models learn to stop


class RecordError(ValueError):
    """A record that a format cannot render; the message names the field and the fix."""


def prompt_segments(segments: list[Segment]) -> list[Segment]:
    """What an inference prompt is: everything before the last trained segment (the answer to generate)."""
    last = max(i for i, segment in enumerate(segments) if segment.trainable and segment.special is None)
    return segments[:last]


# --- rendering and encoding: the one place where text becomes ids and labels -----------------------------------------


def render_segments(segments: Iterable[Segment], bos: str = "<s>", eos: str = "</s>", mark: bool = True) -> str:
    """Human-readable rendering; with `mark`, trained text is wrapped in [[...]], a trained reasoning trace in
    {{...}} (for previews and golden tests)."""
    parts = []
    for segment in segments:
        text = {"bos": bos, "eos": eos}.get(segment.special, segment.special) if segment.special else segment.text
        if mark and segment.trainable and segment.special is None and text:
            text = f"{{{{{text}}}}}" if segment.kind == "reasoning" else f"[[{text}]]"
        parts.append(text)
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
    split_special = not any(segment.template for segment in run)  # data text never becomes special tokens
    for segment in run:
        text += segment.text
        current = tokenizer(text, add_special_tokens=False, split_special_tokens=split_special)["input_ids"]
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
        previous = merged[-1] if merged else None
        if (previous and segment.special is None and previous.special is None and previous.trainable == segment.trainable
                and previous.template == segment.template):
            merged[-1] = Segment(previous.text + segment.text, segment.trainable, template=segment.template,
                                 kind=segment.kind if segment.kind == previous.kind else "")
        else:
            merged.append(segment)
    return merged


def special_ids(tokenizer) -> dict[str, int | None]:
    """BOS is added only where the tokenizer has a BOS distinct from EOS (Llama, Mistral), never for GPT-2 style."""
    bos = tokenizer.bos_token_id
    if bos is not None and bos == tokenizer.eos_token_id:
        bos = None
    return {"bos": bos, "eos": tokenizer.eos_token_id}


def token_id(tokenizer, token: str) -> int:
    """The single id of a literal special token, or an error saying how to get it into the vocabulary."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or (ids[0] == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"the tokenizer has no token {token!r}; train.py adds a format's tokens (resizing the embeddings)")
    return ids[0]


def encode_segments(segments: list[Segment], tokenizer, train_on_source: bool = False) -> Encoded:
    """Segments -> ids and labels (IGNORE_INDEX where masked). BOS/EOS are ids, never parsed from text."""
    specials = special_ids(tokenizer) | {"end": None}
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
        token = specials[segment.special] if segment.special in specials else token_id(tokenizer, segment.special)
        if token is not None:
            input_ids.append(token)
            labels.append(token if segment.trainable else IGNORE_INDEX)
    if train_on_source:
        labels = list(input_ids)
    return Encoded(input_ids, labels, merges)
