"""Preparation in bounded memory (issue 11, part 4): the streamed, chunked, memory-mapped preparation gives exactly
the samples and packed rows of the in-memory reference (tokenize_records + pack_sequences), in one process or in
several with many chunks; JSON arrays, parquet and CSV are read in pieces with the same records and errors."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import write_jsonl

import train
from finetune.data import packing, preparation, sources
from finetune.data import pipeline as data


def rows(n: int) -> list[dict]:
    return [{"instruction": f"Question {i}: " + "why " * (i % 37), "input": "", "output": "Because. " * (1 + i % 11)}
            for i in range(n)]


def arguments(path: str, **settings) -> train.DataArguments:
    return train.DataArguments(dataset=[path], dataset_format=["alpaca"], model_max_len=256, **settings)


def reference(path: str, tokenizer, args, seed: int):
    """The in-memory pipeline on the same records: every sample, then the packing of them."""
    records = [data.Record(r.data, r.where, "alpaca") for r in data.read_records(path)]
    train_records, eval_records = data.split_records(records, args.eval_dataset_size, seed)
    samples, _ = data.tokenize_records(train_records, tokenizer, args)
    eval_samples, _ = data.tokenize_records(eval_records, tokenizer, args)
    return samples, eval_samples


def as_lists(dataset) -> list[dict]:
    return [{name: list(row[name]) for name in dataset.column_names} for row in dataset]


@pytest.mark.parametrize("processes", [1, 2])
def test_streamed_preparation_equals_the_in_memory_reference(tmp_path, tiny_tokenizer, monkeypatch, processes, caplog):
    monkeypatch.setattr(preparation, "CHUNK_RECORDS", 37)  # many chunks, several in flight, a ragged last one
    path = write_jsonl(tmp_path / "d.jsonl", rows(600))
    args = arguments(path, eval_dataset_size=0.1, dataset_processes=processes)
    with caplog.at_level(logging.INFO, logger="finetune.data.preparation"):
        monkeypatch.setattr(preparation.Progress.__init__, "__defaults__", (0.0,))  # log every chunk
        prepared, evaluation, stats = preparation.prepare_datasets(args, tiny_tokenizer, seed=3, cache=None, write=False)
    samples, eval_samples = reference(path, tiny_tokenizer, args, seed=3)
    assert as_lists(prepared) == samples and as_lists(evaluation) == eval_samples
    assert stats["train"]["samples_kept"] == len(samples) == 540 and stats["eval"]["samples_kept"] == 60
    assert "records/s, ETA" in caplog.text and "tokenized 600 / 600 records" in caplog.text

    packed_args = arguments(path, sample_packing=True, dataset_processes=processes)
    packed, _, stats = preparation.prepare_datasets(packed_args, tiny_tokenizer, seed=3, cache=None, write=False)
    samples, _ = reference(path, tiny_tokenizer, packed_args, seed=3)
    assert as_lists(packed) == packing.pack_sequences(samples, 256, seed=3)
    assert stats["train"]["rows"] == len(packed) and stats["train"]["samples_used"] == 600


def test_a_cache_is_reused_and_its_datasets_are_memory_mapped(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", rows(50))
    args = arguments(path, sample_packing=True)
    cache = str(tmp_path / "prepared")
    first, _, stats = preparation.prepare_datasets(args, tiny_tokenizer, seed=1, cache=cache, write=True)
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["stats.json", "train.arrow"]
    again, _, reused = preparation.prepare_datasets(args, tiny_tokenizer, seed=1, cache=cache, write=True)
    assert reused == json.loads(json.dumps(stats)) and as_lists(again) == as_lists(first)
    assert again.cache_files and again.cache_files[0]["filename"].endswith("train.arrow")  # read from disk


def test_json_arrays_parquet_and_csv_stream_the_same_records(tmp_path):
    import pandas as pd

    records = rows(30)
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2))
    pd.DataFrame(records).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame(records).to_csv(tmp_path / "a.csv", index=False)
    for name in ("a.json", "a.parquet", "a.csv"):
        assert [r.data for r in data.read_records(str(tmp_path / name))] == records, name
    small = list(sources.read_json_array(str(tmp_path / "a.json"), "a.json", block=64))  # elements across blocks
    assert [r.data for r in small] == records and small[29].where == "a.json[29]"
    assert [r.where for r in sources.read_table(str(tmp_path / "a.csv"), "a.csv", block=7)][-1] == "a.csv:31"
    (tmp_path / "bad.json").write_text('[\n{"instruction": "a"},\n{"instruction": "b",}\n]')
    with pytest.raises(data.DataError, match=r"bad.json:3: not valid JSON"):
        list(sources.read_json_array(str(tmp_path / "bad.json"), "bad.json", block=8))


def test_under_torchrun_the_other_rank_waits_for_a_long_preparation_past_a_short_ddp_timeout(tmp_path, tiny_model):
    """Rank 0 prepares 12K records (longer than --ddp_timeout 2 s); rank 1 polls for the cache instead of
    waiting in a barrier, so no collective times out, and both ranks train on the same prepared data."""
    import os
    import sys

    from conftest import ROOT, run

    path = write_jsonl(tmp_path / "big.jsonl", rows(12000))
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", os.path.join(ROOT, "train.py"),
                  "--model_name_or_path", tiny_model, "--dataset", path, "--dataset_format", "alpaca",
                  "--output_dir", str(tmp_path / "o"), "--bits", "32", "--lora_r", "2", "--max_steps", "1",
                  "--model_max_len", "256", "--ddp_timeout", "2", "--report_to", "none", "--save_strategy", "no"],
                 cwd=str(tmp_path), timeout=600)
    assert result.returncode == 0, result.output[-3000:]
    stats = json.loads((tmp_path / "o" / "prepared_data" / "stats.json").read_text())
    assert stats["train"]["samples_kept"] == 12000 and stats["preparation_seconds"] > 2  # outlasted the timeout
    assert (tmp_path / "o" / "completed").exists()
