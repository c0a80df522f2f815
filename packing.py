"""Padding-free sample packing: tokenized samples bin-packed into rows of --model_max_len, attention kept per sample.

Separate from data.py because it changes what a training row *is*: several samples laid end to end, with
`position_ids` restarting at 0 for each and no attention mask. transformers 5 reads that layout as packed
sequences (masking_utils.find_packed_sequence_indices): flash-attention gets per-sample lengths, and sdpa/eager
get a block-diagonal causal mask, so no sample ever attends to another. The label of each sample's first token
is masked, since it would otherwise be predicted from the previous sample's last token.
"""

from __future__ import annotations

import bisect
import random

import torch

from dataset_formats import IGNORE_INDEX


def pack_sequences(samples: list[dict], max_len: int, seed: int) -> list[dict]:
    """Best-fit decreasing: longest samples first, each into the fullest row it still fits, else a new row.
    Deterministic for a given seed (rows are shuffled with it so lengths are not trained in order)."""
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i]["input_ids"]), i))
    free: list[tuple[int, int]] = []  # (room left, row index), kept sorted: the first with enough room is the best fit
    rows: list[list[int]] = []
    for index in order:
        length = len(samples[index]["input_ids"])
        if length > max_len:
            raise ValueError(f"a sample of {length} tokens cannot be packed into rows of {max_len}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            rows.append([index])
            bisect.insort(free, (max_len - length, len(rows) - 1))
        else:
            room, row = free.pop(slot)
            rows[row].append(index)
            bisect.insort(free, (room - length, row))
    random.Random(seed).shuffle(rows)
    return [concatenate([samples[i] for i in row]) for row in rows]


def concatenate(members: list[dict]) -> dict:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for sample in members:
        input_ids += sample["input_ids"]
        labels += [IGNORE_INDEX] + list(sample["labels"][1:])
        position_ids += list(range(len(sample["input_ids"])))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def packing_efficiency(rows: list[dict], max_len: int) -> float:
    """Real tokens / (rows x --model_max_len): the share of computed slots that hold data."""
    return sum(len(row["input_ids"]) for row in rows) / (len(rows) * max_len) if rows else 0.0


class PackedCollator:
    """Stacks packed rows. Rows shorter than the longest are filled with a padding pseudo-sample (positions from 0,
    labels masked), which only attends to itself. No attention_mask: position_ids carry the sample boundaries."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {name: [] for name in ("input_ids", "labels", "position_ids")}
        for feature in features:
            pad = longest - len(feature["input_ids"])
            batch["input_ids"].append(list(feature["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(feature["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(list(feature["position_ids"]) + list(range(pad)))
        return {name: torch.tensor(values, dtype=torch.long) for name, values in batch.items()}
