"""Several datasets into one training mix: exact deduplication across them, then per-dataset weights.

Order in the pipeline: read every dataset -> drop exact duplicates (--dataset_exact_deduplication) -> the seeded
train/eval split -> weight each dataset's training records (--dataset_weights) -> tokenize each record once. A weight
w gives every record floor(w) copies plus a seeded draw, without replacement, of round((w - floor(w)) * n) more, so a
dataset of n records contributes exactly round(w * n) records and the same --data_seed gives the same draw. A repeated
record is tokenized once; its samples are repeated (Record.repeat).
"""

from __future__ import annotations

import hashlib
import json
import math
import random


def record_key(data: dict, format_name: str) -> bytes:
    """Identity of a record for exact deduplication: its fields and values (key order ignored) and its format."""
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(f"{format_name}\0{canonical}".encode(), digest_size=16).digest()


class Deduplicator:
    """Remembers the key of every record seen (16 bytes each); seen() says whether an equal one came earlier."""

    def __init__(self):
        self.keys: set[bytes] = set()

    def seen(self, record) -> bool:
        key = record_key(record.data, record.format)
        if key in self.keys:
            return True
        self.keys.add(key)
        return False


def repeat_counts(n: int, weight: float, rng: random.Random) -> list[int]:
    """How many times each of n records is trained under `weight`: exactly round(weight * n) in all."""
    whole = math.floor(weight)
    extra = round(weight * n) - whole * n
    counts = [whole] * n
    for index in rng.sample(range(n), extra):
        counts[index] += 1
    return counts


def weighted_repeats(sources: list[int], weights: list[float] | None, seed: int) -> list[int]:
    """Times each training record (given by its dataset index, in order) is trained. Each dataset draws from its own
    seeded generator, so adding a dataset does not change another's draw."""
    if not weights or all(weight == 1 for weight in weights):
        return [1] * len(sources)
    positions: dict[int, list[int]] = {}
    for position, source in enumerate(sources):
        positions.setdefault(source, []).append(position)
    repeats = [0] * len(sources)
    for source, members in positions.items():
        counts = repeat_counts(len(members), weights[source], random.Random(f"{seed}:{source}"))
        for position, count in zip(members, counts):
            repeats[position] = count
    return repeats
