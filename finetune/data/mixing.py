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


def deduplicate(records: list, datasets: int) -> tuple[list, list[int]]:
    """Records without exact repeats of an earlier one (first kept), and the count removed per dataset."""
    seen: set[bytes] = set()
    removed = [0] * datasets
    kept = []
    for record in records:
        key = record_key(record.data, record.format)
        if key in seen:
            removed[record.source] += 1
            continue
        seen.add(key)
        kept.append(record)
    return kept, removed


def repeat_counts(n: int, weight: float, rng: random.Random) -> list[int]:
    """How many times each of n records is trained under `weight`: exactly round(weight * n) in all."""
    whole = math.floor(weight)
    extra = round(weight * n) - whole * n
    counts = [whole] * n
    for index in rng.sample(range(n), extra):
        counts[index] += 1
    return counts


def apply_weights(records: list, weights: list[float] | None, seed: int) -> list:
    """The training records with Record.repeat set from their dataset's weight; records drawn 0 times are left out.
    Each dataset draws from its own seeded generator, so adding a dataset does not change another's draw."""
    if not weights or all(weight == 1 for weight in weights):
        return records
    by_source: dict[int, list] = {}
    for record in records:
        by_source.setdefault(record.source, []).append(record)
    out = []
    for source, members in sorted(by_source.items()):
        rng = random.Random(f"{seed}:{source}")
        for record, count in zip(members, repeat_counts(len(members), weights[source], rng)):
            if count:
                record.repeat = count
                out.append(record)
    return out
