"""GPTQ export (issue 13, finetune/outputs/gptq_export.py): a LoRA run merged and GPTQ-quantized with GPTQModel on
CPU, calibrated on its own training samples, saved in the GPTQ format, loaded back through transformers and compared
with the merged model; bad settings refused before anything loads."""

from __future__ import annotations

import json
import os

import pytest
from conftest import instructions, write_jsonl
from safetensors import safe_open

import train
from finetune.errors import UsageError


def test_a_merged_run_is_gptq_quantized_on_its_training_samples_and_loads_back(tmp_path, tiny_model, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    data = write_jsonl(tmp_path / "d.jsonl", instructions(24))
    merged = tmp_path / "merged"
    code = train.main(["--model_name_or_path", tiny_model, "--dataset", data, "--output_dir", str(tmp_path / "adapter"),
                       "--merged_output_dir", str(merged), "--bits", "32", "--lora_r", "4", "--max_steps", "2",
                       "--save_strategy", "no", "--report_to", "none", "--merge_verify_samples", "1",
                       "--export_gptq", "4", "--gptq_group_size", "32", "--quantization_max_samples", "8",
                       "--disable_tqdm", "true"])
    assert code == 0
    quantized = merged / "gptq-4bit"
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"]) == ("gptq", 4, 32)
    with safe_open(str(next(quantized.glob("*.safetensors"))), "pt") as handle:
        names = list(handle.keys())
    assert any(name.endswith("q_proj.qweight") for name in names) and not any(n.endswith("q_proj.weight") for n in names)
    report = json.loads((quantized / "gptq_verification.json").read_text())
    assert report["calibration_samples"] == 8 and report["samples_checked"] == 4
    assert report["argmax_agreement"] >= 0.9 and report["max_abs_logit_diff"] < 0.5  # measured 0.984, 0.057
    assert (tmp_path / "adapter" / "completed").exists()
    assert '"process": "gptq"' in (quantized / "gptq_quantization.log").read_text()  # GPTQModel's per-layer log
    assert not os.listdir(cwd)  # and nothing written into the directory the user ran from


def test_gptq_settings_are_checked_before_anything_loads(tmp_path, tiny_model):
    from finetune.checks.model_config import check_model_before_writing

    data = write_jsonl(tmp_path / "d.jsonl", instructions(4))
    base = ["--model_name_or_path", tiny_model, "--dataset", data, "--output_dir", str(tmp_path / "o")]
    with pytest.raises(UsageError, match="an adapter run needs --merged_output_dir"):
        train.parse_arguments([*base, "--export_gptq", "4"])
    with pytest.raises(UsageError, match="--gptq_group_size 64 only apply to --export_gptq"):
        train.parse_arguments([*base, "--gptq_group_size", "64"])
    with pytest.raises(SystemExit):
        train.parse_arguments([*base, "--export_gptq", "5"])
    model_args, _, args, _ = train.parse_arguments([*base, "--export_gptq", "4", "--gptq_group_size", "48",
                                                    "--merged_output_dir", str(tmp_path / "m")])
    with pytest.raises(UsageError, match=r"--gptq_group_size 48 does not divide the layers' input sizes \[64, 128\]"):
        check_model_before_writing(model_args, args, 64)
