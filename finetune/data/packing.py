"""Padding-free sample packing: tokenized samples bin-packed into rows of --model_max_len, attention kept per sample.

Separate from the pipeline (pipeline.py) because it changes what a training row *is*: several samples laid end to end, with
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
    """The samples packed into rows (pack_indices on their lengths, then laid end to end)."""
    rows = pack_indices([len(sample["input_ids"]) for sample in samples], max_len, seed)
    return [concatenate([samples[i] for i in row]) for row in rows]


def pack_indices(lengths: list[int], max_len: int, seed: int) -> list[list[int]]:
    """Rows of sample indices, from the samples' lengths alone. Fill rows one at a time, largest sample that still fits first; then complete each row by trading its last
    sample for the pair of remaining samples that fills the gap best (bin completion). Plain best-fit decreasing
    leaves gaps smaller than the shortest sample in every row; the pair trade closes most of them (alpaca at 4096:
    99.37 % -> 99.74 %). Deterministic: ties go to the lower sample index; rows are shuffled with `seed`."""
    pool = LengthPool(lengths, max_len)
    rows: list[list[int]] = []
    while pool.lengths:
        gap, row = max_len, []
        while (length := pool.largest_at_most(gap)) is not None:
            row.append((length, pool.take(length)))
            gap -= length
        if row and pool.lengths and gap > 0:
            length, index = row.pop()
            pool.put(length, index)
            pair = pool.best_pair(gap + length)
            trade = pair is not None and sum(pair) > length
            row += [(n, pool.take(n)) for n in (pair if trade else (length,))]
        rows.append([index for _, index in row])
    random.Random(seed).shuffle(rows)
    return rows


class LengthPool:
    """The samples not yet placed, grouped by length: distinct lengths sorted, indices per length (lowest first)."""

    def __init__(self, lengths: list[int], max_len: int):
        self.indices: dict[int, list[int]] = {}
        for index, length in enumerate(lengths):
            if length > max_len:
                raise ValueError(f"a sample of {length} tokens cannot be packed into rows of {max_len}")
            self.indices.setdefault(length, []).append(index)
        for members in self.indices.values():
            members.reverse()  # pop() then yields the lowest index first
        self.lengths = sorted(self.indices)

    def largest_at_most(self, room: int) -> int | None:
        slot = bisect.bisect_right(self.lengths, room) - 1
        return self.lengths[slot] if slot >= 0 else None

    def take(self, length: int) -> int:
        members = self.indices[length]
        index = members.pop()
        if not members:
            del self.indices[length]
            self.lengths.pop(bisect.bisect_left(self.lengths, length))
        return index

    def put(self, length: int, index: int) -> None:
        if length not in self.indices:
            self.indices[length] = []
            bisect.insort(self.lengths, length)
        self.indices[length].append(index)

    def best_pair(self, room: int) -> tuple[int, int] | None:
        """The two lengths (two different samples) with the largest sum <= room."""
        best, low, high = None, 0, bisect.bisect_right(self.lengths, room) - 1
        while low <= high:
            a, b = self.lengths[low], self.lengths[high]
            if low == high and len(self.indices[a]) < 2:
                break
            if a + b > room:
                high -= 1
                continue
            if best is None or a + b > sum(best):
                best = (b, a)
            if a + b == room:
                break
            low += 1
        return best


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


def padded_length(features: list[dict], multiple: int | None) -> int:
    """The batch's longest row, rounded up to `multiple` (--pad_to_multiple_of) when given."""
    longest = max(len(f["input_ids"]) for f in features)
    return -(-longest // multiple) * multiple if multiple else longest


class PackedCollator:
    """Stacks packed rows. Rows shorter than the longest are filled with a padding pseudo-sample (positions from 0,
    labels masked), which only attends to itself. No attention_mask: position_ids carry the sample boundaries."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = padded_length(features, self.pad_to_multiple_of)
        batch = {name: [] for name in ("input_ids", "labels", "position_ids")}
        for feature in features:
            pad = longest - len(feature["input_ids"])
            batch["input_ids"].append(list(feature["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(feature["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(list(feature["position_ids"]) + list(range(pad)))
        return {name: torch.tensor(values, dtype=torch.long) for name, values in batch.items()}
