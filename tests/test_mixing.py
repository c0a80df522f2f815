"""Several datasets mixed in chosen proportions (--dataset_weights), exact deduplication across them
(--dataset_exact_deduplication), and their per-dataset counts (issue 11, part 3)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from conftest import write_jsonl

import train
from finetune.data import mixing, preparation
from finetune.data import pipeline as data


def rows(tag: str, n: int) -> list[dict]:
    return [{"instruction": f"{tag} {i}", "input": "", "output": f"ok {i}"} for i in range(n)]


def prepare(tmp_path, tokenizer, datasets: list[list[dict]], seed: int = 7, **settings):
    paths = [write_jsonl(tmp_path / f"d{number}.jsonl", members) for number, members in enumerate(datasets)]
    args = train.DataArguments(dataset=paths, dataset_format=["alpaca"], **settings)
    prepared, evaluation, stats = preparation.prepare_datasets(args, tokenizer, seed=seed, cache=None, write=False)
    return prepared, evaluation, stats


def sources(prepared, tokenizer) -> Counter:
    """Which dataset (tag A or B) and which record each trained sample came from."""
    counts: Counter = Counter()
    for ids in prepared["input_ids"]:
        text = tokenizer.decode(ids)
        tag = "A" if "A " in text else "B"
        number = text.split(f"{tag} ", 1)[1].split()[0].rstrip(".")
        counts[(tag, number)] += 1
    return counts


def test_weights_give_the_asked_proportions_of_10k_records_and_the_same_seed_the_same_draw(tmp_path, tiny_tokenizer):
    prepared, _, stats = prepare(tmp_path, tiny_tokenizer, [rows("A", 5000), rows("B", 5000)], dataset_weights=[0.3, 2.5])
    counts = sources(prepared, tiny_tokenizer)
    trained = Counter()
    for (tag, _), times in counts.items():
        trained[tag] += times
    assert abs(trained["A"] - 0.3 * 5000) <= 0.01 * 0.3 * 5000 and abs(trained["B"] - 2.5 * 5000) <= 0.01 * 2.5 * 5000
    assert trained == {"A": 1500, "B": 12500}  # exactly round(w * n)
    assert {times for (tag, _), times in counts.items() if tag == "A"} == {1}  # a fraction: each record at most once
    b_times = Counter(times for (tag, _), times in counts.items() if tag == "B")
    assert b_times == {2: 2500, 3: 2500}  # 2.5: every record twice, plus a fresh half of them once more
    a, b = stats["datasets"]
    assert (a["records_read"], a["train_records"], a["weight"]) == (5000, 1500, 0.3)
    assert (b["records_read"], b["train_records"], b["train_samples"]) == (5000, 12500, 12500)
    assert a["trained_tokens"] + b["trained_tokens"] == stats["train"]["trained_tokens"]
    assert stats["train"]["samples_kept"] == 14000 == len(prepared)
    again, _, _ = prepare(tmp_path, tiny_tokenizer, [rows("A", 5000), rows("B", 5000)], dataset_weights=[0.3, 2.5])
    assert again["input_ids"] == prepared["input_ids"]  # same --data_seed, same sample and order
    other, _, _ = prepare(tmp_path, tiny_tokenizer, [rows("A", 5000), rows("B", 5000)], seed=8, dataset_weights=[0.3, 2.5])
    assert sources(other, tiny_tokenizer) != counts


def test_the_eval_split_is_taken_before_weighting_and_never_weighted(tmp_path, tiny_tokenizer):
    prepared, evaluation, stats = prepare(tmp_path, tiny_tokenizer, [rows("A", 200), rows("B", 200)],
                                          dataset_weights=[0.5, 3], eval_dataset_size=0.1)
    assert len(evaluation) == 40 and sum(entry["eval_records"] for entry in stats["datasets"]) == 40
    eval_keys = set(sources(evaluation, tiny_tokenizer))
    assert not eval_keys & set(sources(prepared, tiny_tokenizer))  # no eval record is trained, however weighted
    a, b = stats["datasets"]
    assert a["train_records"] == round(0.5 * (200 - a["eval_records"]))
    assert b["train_records"] == 3 * (200 - b["eval_records"])


def test_exact_duplicates_are_removed_across_datasets_and_counted(tmp_path, tiny_tokenizer):
    first = rows("A", 30) + rows("A", 5)  # 5 repeats inside the first dataset
    second = [dict(reversed(list(row.items()))) for row in rows("A", 10)] + rows("B", 20)  # 10 repeats, keys reordered
    prepared, _, stats = prepare(tmp_path, tiny_tokenizer, [first, second], dataset_exact_deduplication=True)
    assert [entry["duplicates_removed"] for entry in stats["datasets"]] == [5, 10]
    assert len(prepared) == 50 and max(sources(prepared, tiny_tokenizer).values()) == 1
    kept, _, stats = prepare(tmp_path, tiny_tokenizer, [first, second])
    assert len(kept) == 65 and "duplicates_removed" not in stats["datasets"][0]  # off by default
    check = mixing.Deduplicator()
    same_data = data.Record({"text": "x"}, "a:1", "completion"), data.Record({"text": "x"}, "b:1", "alpaca", 1)
    assert [check.seen(record) for record in same_data] == [False, False]  # another format, another sample


def test_repeat_counts_are_exact_for_any_weight():
    rng = random.Random(0)
    for n, weight in ((1, 0.5), (7, 1.0), (10, 0.05), (3, 3.0), (9, 1.34)):
        counts = mixing.repeat_counts(n, weight, rng)
        assert sum(counts) == round(weight * n) and len(counts) == n
        assert max(counts) - min(counts) <= 1


def test_weights_are_checked_and_recipes_give_them_per_dataset(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", rows("A", 3))
    b = write_jsonl(tmp_path / "b.jsonl", rows("B", 3))
    base = ["--model_name_or_path", "m", "--dataset", a, b, "--dataset_format", "alpaca", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(train.UsageError, match=r"2 datasets but 1 --dataset_weights; give one weight per --dataset"):
        train.parse_arguments(base + ["--dataset_weights", "0.5"])
    with pytest.raises(train.UsageError, match=r"every weight must be > 0"):
        train.parse_arguments(base + ["--dataset_weights", "0.5", "0"])
    assert train.parse_arguments(base + ["--dataset_weights", "0.5", "2"])[1].dataset_weights == [0.5, 2.0]
    recipe = tmp_path / "mix.json"
    recipe.write_text(json.dumps({"model_name_or_path": "m", "output_dir": str(tmp_path / "o"),
                                  "datasets": [{"path": a, "format": "alpaca", "weight": 0.25}, {"path": b, "format": "alpaca"}]}))
    assert train.parse_arguments([str(recipe)])[1].dataset_weights == [0.25, 1.0]
    recipe.write_text(json.dumps({"model_name_or_path": "m", "datasets": [{"path": a, "wieght": 2}]}))
    with pytest.raises(train.UsageError, match=r"datasets\[0\].wieght is not a dataset key \(did you mean weight\?\)"):
        train.parse_arguments([str(recipe)])
