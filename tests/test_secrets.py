"""Secrets never land in logs, stats.json, saved training arguments, checkpoints, wandb files or model outputs."""

from __future__ import annotations

import os

import pytest
from conftest import instructions, run, train_py, write_jsonl

pytestmark = pytest.mark.slow
PLANTED = {"flag": "hf_PLANTEDFLAGTOKEN0123", "hf": "hf_PLANTEDENVTOKEN4567", "wandb": "PLANTEDWANDBKEY" + "0" * 25}


def test_planted_tokens_appear_in_no_output_file_and_no_log(tmp_path, tiny_model):
    data_file = write_jsonl(tmp_path / "data.jsonl", instructions(16))
    result = run(train_py("--model_name_or_path", tiny_model, "--dataset", data_file, "--output_dir", str(tmp_path / "out"),
                          "--merged_output_dir", str(tmp_path / "merged"), "--bits", "32", "--lora_r", "4",
                          "--max_steps", "3", "--save_steps", "2", "--report_to", "wandb", "--eval_dataset_size", "4",
                          "--eval_strategy", "steps", "--eval_steps", "2", "--hub_token", PLANTED["flag"]),
                 cwd=str(tmp_path), HF_TOKEN=PLANTED["hf"], WANDB_API_KEY=PLANTED["wandb"], WANDB_MODE="offline")
    assert result.returncode == 0, result.output[-3000:]
    assert (tmp_path / "out" / "wandb").is_dir() and not (tmp_path / "wandb").exists() and (tmp_path / "out" / "prepared_data" / "stats.json").exists()
    leaks = []
    for folder, _, files in os.walk(tmp_path):
        for name in files:
            content = open(os.path.join(folder, name), "rb").read()
            leaks += [(os.path.join(folder, name), kind) for kind, token in PLANTED.items() if token.encode() in content]
    leaks += [("stdout/stderr", kind) for kind, token in PLANTED.items() if token in result.output]
    assert not leaks, leaks
