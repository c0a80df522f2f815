"""The command line: --help, unknown and conflicting flags, legacy names, recipe files. Bad input writes nothing."""

from __future__ import annotations

import json
import logging
import os

import pytest
from conftest import instructions, run, train_py, write_jsonl

import train
from finetune.checks import preflight


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", instructions(8))


def parse(*flags: str):
    return train.parse_arguments(list(flags))


def test_help_lists_every_flag_with_meaning_and_default(tmp_path):
    result = run(train_py("--help"), cwd=str(tmp_path))
    assert result.returncode == 0, result.output
    for flag in ("--lora_modules", "--merged_output_dir", "--working_dir", "--attn_implementation", "--bits",
                 "--quant_type", "--max_new_tokens", "--dataset_format", "--eval_dataset_size", "--excess_length",
                 "--prepare_only", "--overwrite_output_dir", "--merge_only", "--merge_verify_samples"):
        assert flag in result.output
    assert "{4,8,16,32}" in result.output and "{nf4,fp4}" in result.output  # choices
    assert "{original,nf4_roundtrip}" in result.output
    assert "airoboros_chat" in result.output  # formats come from the registry
    assert "(default: 64)" in result.output  # lora_r's default is shown


BAD_FLAGS = [
    (["--full_finetune", "--bits", "4"], "--full_finetune needs --bits 16 or 32 (got 4)"),
    (["--dataset_format", "airoborus"], "invalid choice: 'airoborus'"),
    (["--bits", "3"], "invalid choice: 3"),
    (["--roles_to_train", "assistant", "tool", "--dataset_format", "vicuna"],
     "--roles_to_train applies to --dataset_format chatml and chat_template, not to vicuna"),
    (["--train_on_reasoning", "false", "--dataset_format", "llama2_chat"],
     "--train_on_reasoning false applies to --dataset_format chatml and chat_template"),
    (["--roles_to_train", "robot"], "invalid choice: 'robot'"),
    (["--quant_type", "nf5"], "invalid choice: 'nf5'"),
    (["--lora_r", "0"], "--lora_r must be > 0"),
    (["--full_finetune", "--bits", "16", "--use_dora"], "--use_dora True: adapter settings, but --full_finetune"),
    (["--init_lora_weights", "pissa"], "--init_lora_weights pissa moves part of each weight into the adapter; with --bits 4"),
    (["--init_lora_weights", "loftq", "--bits", "16"], "--init_lora_weights loftq fits the adapter to a 4-bit base"),
    (["--init_lora_weights", "loftq"], "pass --merge_base nf4_roundtrip"),
    (["--init_lora_weights", "loftqq"], "invalid choice: 'loftqq'"),
    (["--loraplus_lr_ratio", "0.5"], "--loraplus_lr_ratio must be > 1"),
    (["--lora_model_dir", "nowhere"], "--lora_model_dir nowhere: no adapter_config.json there"),
    (["--peft_method", "llama_adapter"], "a llama_adapter (adaption prompts with gates) cannot be merged"),
    (["--peft_method", "llama_adapter", "--use_rslora"], "--use_rslora True: LoRA settings, but --peft_method llama_adapter"),
    (["--llama_adapter_len", "4"], "--llama_adapter_len 4 only apply to --peft_method llama_adapter"),
    (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
    (["--eval_strategy", "steps"], "needs an eval split"),
    (["--report_to", "wandb"], "WANDB_MODE=offline"),
    (["--report_to", "tensorbord"], "--report_to tensorbord: not a logger transformers knows (did you mean tensorboard?)"),
    (["--report_to", "mlflow"], "--report_to mlflow: its package is not installed here; pip install mlflow"),
    (["--env_file", "missing.env"], "--env_file missing.env: file not found"),
    (["--default_system_prompt", "Be kind.", "--dataset_format", "alpaca"],
     "--default_system_prompt applies to conversation formats (chatml, chat_template, sharegpt, ...), not to alpaca"),
    (["--bf16", "--fp16"], "At most one of fp16 and bf16"),
    (["--full_finetune", "--bits", "16"], "--merged_output_dir merges an adapter"),
    (["--lora_modulez", "all"], "unknown flag --lora_modulez; did you mean --lora_modules?"),
    (["--learning_rat", "1e-4"], "did you mean --learning_rate?"),
    (["--warmup_ratio", "3"], "--warmup_ratio 3: must be in [0, 1)"),
    (["stray_value"], "unexpected argument 'stray_value'"),
    (["--merge_only"], "has no adapter_config.json; pass the directory a LoRA run saved to"),
    (["--merge_base", "nf4_roundtrip", "--bits", "16"], "--merge_base nf4_roundtrip re-creates the 4-bit weights"),
    (["--merge_base", "nf4"], "invalid choice: 'nf4'"),
    (["--merge_verify_samples", "-1"], "--merge_verify_samples must be >= 0"),
    (["--dataset", "nope/conversations.json"], "--dataset nope/conversations.json: file not found"),
    (["--dataset_format", "alpaca", "airoboros"], "1 datasets but 2 formats; give one --dataset_format for all"),
    (["--rl", "dpo", "--dataset_format", "completion"], "--rl dpo: --dataset_format completion has no preference-pair layout"),
    (["--rl", "dpo", "--sample_packing"], "so --sample_packing cannot apply; drop it"),
    (["--rl", "orpo", "--train_on_source"], "so --train_on_source cannot apply"),
    (["--rl_beta", "0.2"], "--rl_beta 0.2: preference settings, but no --rl"),
    (["--rl", "dpo", "--simpo_gamma", "1"], "--simpo_gamma 1.0: not read by --rl dpo"),
    (["--rl", "kto", "--per_device_train_batch_size", "1"], "--rl kto compares each answer with the batch's mismatched"),
    (["--rl", "kto", "--label_smoothing", "0.1"], "--label_smoothing 0.1: not read by --rl kto"),
    (["--rl", "orpo", "--precompute_ref_log_probs"], "--precompute_ref_log_probs True: not read by --rl orpo"),
    (["--rl", "dpo", "--label_smoothing", "0.5"], "--label_smoothing in [0, 0.5) (got 0.5)"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS)
def test_bad_flags_exit_2_with_the_fix_and_write_nothing(tmp_path, data_file, capsys, caplog, monkeypatch, flags, message):
    """In-process for speed; the subprocess test below proves the same path end to end."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a wandb login
    out = tmp_path / "out"
    argv = ["--model_name_or_path", "missing-model", "--dataset", data_file, "--output_dir", str(out),
            "--merged_output_dir", str(tmp_path / "merged"), *flags]
    with caplog.at_level(logging.ERROR):
        try:
            code = train.main(argv)
        except SystemExit as exit_:  # argparse's own errors (bad choices) exit 2 too
            code = exit_.code
    assert code == 2
    assert message in caplog.text + capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "merged").exists()


def test_unknown_flag_stops_a_real_run_before_anything_loads(tmp_path, data_file, tiny_model):
    out = tmp_path / "out"
    result = run(train_py("--model_name_or_path", tiny_model, "--dataset", data_file, "--output_dir", str(out),
                          "--lora_modulez", "all"), cwd=str(tmp_path))
    assert result.returncode == 2, result.output
    assert "unknown flag --lora_modulez; did you mean --lora_modules?" in result.output
    assert "Traceback" not in result.output and "Loading weights" not in result.output
    assert not out.exists()


def test_hub_dataset_offline_fails_with_a_clear_message(tmp_path, tiny_model, caplog, capsys):
    with caplog.at_level(logging.ERROR):
        code = train.main(["--model_name_or_path", tiny_model, "--dataset", "someone/some-dataset",
                           "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    assert code == 2
    assert "--dataset someone/some-dataset: not a local file, and loading it from the Hugging Face hub failed" in caplog.text + capsys.readouterr().err


def test_legacy_flags_are_mapped_with_one_log_line(caplog, data_file):
    with caplog.at_level(logging.INFO, logger="finetune"):
        _, data_args, args, _ = parse("--model_name_or_path", "m", "--dataset", data_file, "--output_dir", "o",
                              "--evaluation_strategy", "steps", "--eval_dataset_size", "0.1", "--warmup_ratio", "0.03",
                              "--use_flash_attention_2", "--gradient_checkpointing", "--group_by_length",
                              "--skip_excess_length", "False")
    assert args.eval_strategy == "steps"
    assert args.warmup_steps == pytest.approx(0.03)
    assert args.activation_checkpointing is True
    assert data_args.excess_length == "truncate"
    assert args.train_sampling_strategy == "group_by_length"
    legacy_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("legacy flag")]
    assert len(legacy_lines) == 6, legacy_lines


def test_flash_attention_falls_back_to_sdpa_without_cuda(caplog, data_file):
    import torch

    from finetune.checks.preflight import resolve_attention

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the fallback is for machines without it")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        model_args, *_ = parse("--model_name_or_path", "m", "--dataset", data_file, "--output_dir", "o",
                               "--use_flash_attention_2")
    assert model_args.attn_implementation == "flash_attention_2"  # kept as asked: a printed config keeps it
    assert resolve_attention(model_args.attn_implementation, warn=False) == "sdpa"  # what this machine loads
    assert any("using sdpa" in r.getMessage() for r in caplog.records)


def test_fp16_on_a_machine_without_gpu_says_it_changes_nothing(caplog, data_file, monkeypatch):
    from finetune.config import validate

    monkeypatch.setattr(validate, "has_accelerator", lambda: False)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        parse("--model_name_or_path", "m", "--dataset", data_file, "--output_dir", "o", "--fp16", "--bits", "32")
    assert any("--fp16 changes nothing without a GPU" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune"):
        parse("--model_name_or_path", "m", "--dataset", data_file, "--output_dir", "o", "--bf16", "--bits", "32")
    assert not any("--fp16" in r.getMessage() for r in caplog.records)


def test_flash_attention_on_cuda_without_flash_attn_gives_install_hint(monkeypatch):
    import importlib.util

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    with pytest.raises(train.UsageError, match="pip install -r requirements-gpu.txt"):
        preflight.resolve_attention("flash_attention_2")


def test_recipe_file_stands_in_for_flags_and_cli_wins(tmp_path, data_file):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: m\ndataset: {data_file}\noutput_dir: o\nlearning_rate: 0.001\nbits: 8\n"
        "lora_modules: q_proj,v_proj\ngradient_checkpointing: true\nreport_to: [none]\n"
    )
    model_args, data_args, args, _ = parse(str(recipe), "--learning_rate", "1e-4")
    assert args.learning_rate == pytest.approx(1e-4)
    assert args.bits == 8 and args.lora_modules == "q_proj,v_proj" and args.activation_checkpointing
    assert data_args.dataset == [data_file] and model_args.model_name_or_path == "m"
    as_json = tmp_path / "recipe.json"
    as_json.write_text(json.dumps({"model_name_or_path": "m", "dataset": data_file, "output_dir": "o", "lora_modulez": "x"}))
    with pytest.raises(train.UsageError, match="did you mean --lora_modules"):
        parse(str(as_json))


def test_eval_dataset_size_fraction_and_count(data_file):
    from finetune.data import pipeline as data_module

    assert data_module.eval_count(1000, 0.02) == 20
    assert data_module.eval_count(1000, 5) == 5
    assert data_module.eval_count(10, 0.001) == 1
    assert data_module.eval_count(10, 0) == 0
    with pytest.raises(data_module.DataError, match="leaves no training records"):
        data_module.eval_count(10, 10)
    assert os.path.isfile(data_file)


def test_recipe_lists_datasets_with_formats_and_a_custom_format(tmp_path, data_file):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: m\noutput_dir: o\ndatasets:\n  - path: {data_file}\n    format: alpaca\n"
        f"  - path: {data_file}\n    type: custom\n"
        "custom_format:\n  format: '<q>{instruction} {input}<a>'\n  field_output: answer\n"
    )
    _, data_args, _, _ = parse(str(recipe))
    assert data_args.dataset == [data_file, data_file] and data_args.dataset_format == ["alpaca", "custom"]
    assert data_args.custom_format == "<q>{instruction} {input}<a>" and data_args.custom_field_output == "answer"


def test_merged_output_dir_may_not_hold_what_the_merge_reads(tmp_path, data_file):
    with pytest.raises(train.UsageError, match="would replace --output_dir"):
        parse("--model_name_or_path", "m", "--dataset", data_file, "--output_dir", str(tmp_path / "run" / "adapter"),
              "--merged_output_dir", str(tmp_path / "run"))
    with pytest.raises(train.UsageError, match="--merge_only writes the merged model to --merged_output_dir"):
        parse("--model_name_or_path", "m", "--output_dir", "o", "--merge_only")
