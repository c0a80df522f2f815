"""Packing: rows are filled tightly and deterministically, and a packed batch computes exactly what the samples
would compute alone (no sample attends to another)."""

from __future__ import annotations

import random

import pytest
import torch

from dataset_formats import IGNORE_INDEX
from finetune.data.packing import PackedCollator, pack_sequences, packing_efficiency


def random_samples(count: int, seed: int = 0, low: int = 3, high: int = 60, vocab: int = 500) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        n = rng.randint(low, high)
        ids = [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]
        cut = rng.randint(1, n - 1)
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return samples


def test_every_sample_lands_in_exactly_one_row_within_the_limit():
    samples = random_samples(300)
    rows = pack_sequences(samples, 128, seed=3)
    assert all(len(r["input_ids"]) <= 128 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(s["input_ids"]) for s in samples)
    assert sum(r["position_ids"].count(0) for r in rows) == 300
    assert packing_efficiency(rows, 128) > 0.97
    assert rows == pack_sequences(samples, 128, seed=3)  # deterministic under the seed
    assert rows != pack_sequences(samples, 128, seed=4)


def test_first_token_of_each_sample_is_never_a_target():
    rows = pack_sequences(random_samples(50, seed=1), 100, seed=0)
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][i] == IGNORE_INDEX for i in starts)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked_per_sample(tiny_model, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attention).eval()
    samples = random_samples(12, seed=5, high=40, vocab=400)
    rows = pack_sequences(samples, 96, seed=0)
    batch = PackedCollator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch
    with torch.no_grad():
        # use_cache=False as in training: with a cache, transformers does not look for packed sequences at all
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits

    def token_losses(logits, labels):
        return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="none")

    checked = 0
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for start, end in zip(starts, starts[1:]):
            ids = torch.tensor([row["input_ids"][start:end]])
            labels = torch.tensor(row["labels"][start:end])
            with torch.no_grad():
                alone = model(input_ids=ids).logits[0]
            packed = token_losses(packed_logits[r, start:end], labels)
            single = token_losses(alone, labels)
            mask = labels[1:] != IGNORE_INDEX
            assert torch.allclose(packed[mask], single[mask], atol=1e-5), (packed[mask] - single[mask]).abs().max()
            checked += 1
    assert checked == 12


def test_a_packed_run_trains_and_reports_its_efficiency(tmp_path, tiny_model):
    import json

    from conftest import conversations, run, train_py, write_jsonl

    path = write_jsonl(tmp_path / "c.jsonl", conversations(40))
    prepared = tmp_path / "prepared"
    result = run(train_py("--model_name_or_path", tiny_model, "--dataset", path, "--dataset_format", "airoboros_chat",
                          "--output_dir", str(tmp_path / "out"), "--bits", "32", "--lora_r", "4", "--max_steps", "3",
                          "--model_max_len", "512", "--sample_packing", "--eval_dataset_size", "4",
                          "--eval_strategy", "steps", "--eval_steps", "3", "--per_device_train_batch_size", "2",
                          "--dataset_prepared_path", str(prepared), "--report_to", "none"), cwd=str(tmp_path))
    assert result.returncode == 0, result.output[-3000:]
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["train"]["packed"] and stats["train"]["samples_used"] == 36
    assert stats["train"]["rows"] < 36 / 3 and stats["train"]["packing_efficiency"] > 0.8
    assert stats["eval"]["packed"]
    assert "packing efficiency" in result.output and "'eval_loss'" in result.output
