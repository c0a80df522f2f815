"""The stages of train.py in-process: each model/tokenizer flag takes effect on the objects it should change."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_stages, instructions, run, train_py, write_jsonl

import train
from finetune.training.callbacks import LossWatchdog


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", instructions(8))


def stages(tiny_model, data_file, tmp_path, *flags):
    built = build_stages(tiny_model, data_file, tmp_path / "o", *flags)
    return built.trainer, built.tokenizer


def test_qlora_flags_build_a_4bit_model_with_adapters_and_checkpointing(tiny_model, data_file, tmp_path):
    import bitsandbytes as bnb

    trainer, _ = stages(tiny_model, data_file, tmp_path, "--bits", "4", "--double_quant", "--quant_type", "fp4",
                        "--lora_r", "4", "--lora_alpha", "8", "--lora_modules", "q_proj,v_proj", "--gradient_checkpointing")
    model = trainer.model
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.quant_type == "fp4" for m in quantized)
    assert all(m.weight.quant_state.nested for m in quantized)  # --double_quant
    lora_layers = {name.split(".")[-4] for name, _ in model.named_parameters() if "lora_A" in name}
    assert lora_layers == {"q_proj", "v_proj"}
    assert model.base_model.model.model.is_gradient_checkpointing
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 8


def test_full_finetune_16_bit_bf16_trains_every_weight_in_bf16(tiny_model, data_file, tmp_path):
    trainer, _ = stages(tiny_model, data_file, tmp_path, "--full_finetune", "--bits", "16", "--bf16")
    params = list(trainer.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params) and all(p.requires_grad for p in params)


def test_lora_all_targets_every_linear_but_the_head(tiny_model, data_file, tmp_path):
    trainer, _ = stages(tiny_model, data_file, tmp_path, "--bits", "32", "--lora_modules", "all", "--lora_r", "2")
    targets = {name.split(".")[-4] for name, _ in trainer.model.named_parameters() if "lora_A" in name}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_unknown_lora_module_lists_the_real_ones(tiny_model, data_file, tmp_path):
    with pytest.raises(train.UsageError, match="no linear layer named query.*q_proj"):
        stages(tiny_model, data_file, tmp_path, "--bits", "32", "--lora_modules", "query,v_proj")


def test_new_pad_token_resizes_trains_and_saves_embeddings(tiny_model, data_file, tmp_path):
    out = tmp_path / "adapter"
    result = run(train_py("--model_name_or_path", tiny_model, "--dataset", data_file, "--output_dir", str(out),
                          "--bits", "32", "--lora_r", "2", "--max_steps", "2", "--pad_token", "<pad>",
                          "--report_to", "none"), cwd=str(tmp_path))
    assert result.returncode == 0, result.output[-3000:]
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out)
    base = AutoTokenizer.from_pretrained(tiny_model)
    assert saved.pad_token == "<pad>" and len(saved) == len(base) + 1
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) == {"embed_tokens", "lm_head"}
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as handle:
        embed = [k for k in handle.keys() if "embed_tokens" in k]
        assert embed and handle.get_tensor(embed[0]).shape[0] == len(base) + 1


def one_sgd_step(tiny_model, data_file, tmp_path, batch: int, accumulation: int):
    trainer, _ = stages(tiny_model, data_file, tmp_path / f"b{batch}", "--full_finetune", "--bits", "32",
                        "--optim", "sgd", "--learning_rate", "1.0", "--max_grad_norm", "0", "--max_steps", "1",
                        "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation),
                        "--train_sampling_strategy", "sequential", "--logging_steps", "1", "--use_cpu",
                        "--save_strategy", "no", "--lr_scheduler_type", "constant")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    gradients = {n: before[n] - p.detach() for n, p in trainer.model.named_parameters()}  # SGD, lr 1: the gradient
    return loss, gradients


def test_loss_is_averaged_over_trained_tokens_across_micro_batches(tiny_model, tmp_path):
    """Batch 8 x accumulation 1 and batch 1 x accumulation 8 on samples of very different lengths give the same
    loss and gradients: every trained token weighs the same, however the step is split."""
    rows = [{"instruction": "word " * (1 + 7 * i), "response": "answer " * (1 + 5 * (7 - i))} for i in range(8)]
    data_file = write_jsonl(tmp_path / "varied.jsonl", rows)
    loss_a, grads_a = one_sgd_step(tiny_model, data_file, tmp_path, 8, 1)
    loss_b, grads_b = one_sgd_step(tiny_model, data_file, tmp_path, 1, 8)
    assert abs(loss_a - loss_b) < 1e-5, (loss_a, loss_b)
    worst = max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)
    assert worst < 1e-5, worst
    assert max(g.abs().max().item() for g in grads_a.values()) > 1e-3  # the step really moved the weights


def test_loss_watchdog_trips_on_nan_inf_and_on_a_threshold():
    dog = LossWatchdog(threshold=None, patience=2)
    control = type("Control", (), {"should_training_stop": False, "should_save": True})()
    state = type("State", (), {"global_step": 5})()
    dog.on_log(None, state, control, logs={"loss": float("nan")})
    assert not control.should_training_stop  # one bad log is within patience
    dog.on_log(None, state, control, logs={"loss": float("inf")})
    assert control.should_training_stop and not control.should_save and "step 5" in dog.tripped
    dog = LossWatchdog(threshold=2.0, patience=2)
    control.should_training_stop = False
    for loss in (3.0, 1.0, 3.0):  # a good log in between resets the count
        dog.on_log(None, state, control, logs={"loss": loss})
    assert not control.should_training_stop and dog.tripped is None


def test_a_tripped_watchdog_stops_before_saving_and_names_the_last_good_checkpoint(tmp_path, tiny_model, data_file):
    out = tmp_path / "o"
    result = run(train_py("--model_name_or_path", tiny_model, "--dataset", data_file, "--output_dir", str(out),
                          "--bits", "32", "--lora_r", "2", "--max_steps", "20", "--save_steps", "1", "--logging_steps", "1",
                          "--loss_watchdog_threshold", "0.0001", "--loss_watchdog_patience", "2", "--report_to", "none"),
                 cwd=str(tmp_path))
    assert result.returncode == 3, result.output[-3000:]
    assert f"Last good state: {out}/checkpoint-1" in result.output
    assert not (out / "checkpoint-2").exists() and not (out / "completed").exists()


def test_too_little_disk_stops_before_training(tmp_path, tiny_model, data_file, monkeypatch, caplog, capsys):
    import logging

    from finetune.checks import preflight

    monkeypatch.setattr(preflight, "free_bytes", lambda path: 1000)
    with caplog.at_level(logging.ERROR):
        code = train.main(["--model_name_or_path", tiny_model, "--dataset", data_file, "--output_dir", str(tmp_path / "o"),
                           "--bits", "32", "--lora_r", "2", "--max_steps", "2", "--report_to", "none"])
    text = caplog.text + capsys.readouterr().err
    assert code == 2 and "GiB free" in text and "--working_dir" in text
    assert not list((tmp_path / "o").glob("checkpoint-*"))


def test_llama1_patch_gives_a_llama1_style_tokenizer_the_intended_special_tokens(tmp_path, tiny_model, data_file):
    import shutil

    from transformers import AutoTokenizer

    broken = tmp_path / "llama1"  # converted llama-1 checkpoints shipped empty special tokens
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config.update(bos_token="", eos_token="", unk_token="")
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = run(train_py("--model_name_or_path", str(broken), "--dataset", data_file, "--output_dir", str(out),
                          "--bits", "32", "--lora_r", "2", "--max_steps", "1", "--llama1_patch", "--report_to", "none"),
                 cwd=str(tmp_path))
    assert result.returncode == 0, result.output[-3000:]
    saved = AutoTokenizer.from_pretrained(out)
    assert (saved.bos_token, saved.eos_token, saved.unk_token, saved.pad_token) == ("<s>", "</s>", "<unk>", "<unk>")
    assert (saved.bos_token_id, saved.eos_token_id, saved.unk_token_id) == (1, 2, 0)  # existing ids: nothing resized
