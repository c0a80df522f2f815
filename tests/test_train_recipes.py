"""End to end: the two seed recipes with their flags verbatim (only model, data, paths, sizes and steps shrunk),
a LoRA merge checked against base+adapter, resume after a kill, and a finished run that is not trained again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, child_env, conversations, instructions, run, train_py, write_jsonl

pytestmark = pytest.mark.slow


def logits(model_dir_or_model, input_ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = model_dir_or_model
    if isinstance(model, str):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits.float()


def base_plus_adapter(base_dir: str, adapter_dir: str):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter_dir)


def probe_ids(tokenizer_dir: str):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "<s>[INST] Tell me about the sea. [/INST] Here is a fact about the sea"
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_full_finetune_recipe_torchrun_2_procs_deepspeed_zero2(tmp_path, tiny_model, conversations_file):
    shutil.copy(conversations_file, tmp_path / "conversations.json")
    shutil.copy(os.path.join(ROOT, "deepspeed-7b.json"), tmp_path / "deepspeed-7b.json")
    out, work = tmp_path / "O", tmp_path / "W"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", os.path.join(ROOT, "train.py"),
        "--model_name_or_path", tiny_model, "--working_dir", str(work), "--output_dir", str(out),
        "--num_train_epochs", "5", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "5",
        "--save_total_limit", "1", "--data_seed", "11422", "--evaluation_strategy", "steps",
        "--eval_dataset_size", "0.02", "--eval_steps", "5", "--max_new_tokens", "4096",
        "--dataloader_num_workers", "3", "--logging_strategy", "steps", "--optim", "adamw_torch", "--do_train",
        "--full_finetune", "--bits", "16", "--bf16", "--dataset", "conversations.json",
        "--dataset_format", "airoboros_chat", "--model_max_len", "4096", "--per_device_train_batch_size", "12",
        "--learning_rate", "2e-5", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.005",
        "--weight_decay", "0.0", "--seed", "11422", "--report_to", "wandb", "--deepspeed", "deepspeed-7b.json",
        "--gradient_checkpointing", "--use_flash_attention_2",
    ]
    result = run(command, cwd=str(tmp_path))
    assert result.returncode == 0, result.output[-6000:]
    # 47 training conversations, 12 per device x 2 ranks -> 2 steps per epoch, 5 epochs
    assert (out / "completed").exists() and json.loads((out / "completed").read_text())["global_step"] == 10
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-10"]  # save_total_limit 1
    state = json.loads((work / "checkpoint-10" / "trainer_state.json").read_text())
    assert any("eval_loss" in entry for entry in state["log_history"])  # --evaluation_strategy steps took effect
    assert sum("loss" in entry for entry in state["log_history"]) == 10  # --logging_steps 1
    assert (work / "wandb").is_dir() and not (tmp_path / "wandb").exists()  # --report_to wandb: under the working dir
    assert "using sdpa attention instead" in result.output  # --use_flash_attention_2 on a machine with no CUDA
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 4096
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tuned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # --bits 16 --bf16
    changed = [n for (n, a), (_, b) in zip(tuned.named_parameters(), base.named_parameters()) if not torch.equal(a, b)]
    assert len(changed) > 10  # every layer moved, not only an adapter
    assert AutoTokenizer.from_pretrained(out).eos_token == "</s>"


def test_qlora_recipe_accelerate_2_procs_with_merge(tmp_path, tiny_model):
    write_jsonl(tmp_path / "conversations.jsonl", conversations(18))
    os.rename(tmp_path / "conversations.jsonl", tmp_path / "conversations.json")  # JSON Lines named .json is read too
    out, peft_out, work = tmp_path / "O", tmp_path / "O-peft", tmp_path / "W"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        os.path.join(ROOT, "train.py"),
        "--model_name_or_path", tiny_model, "--working_dir", str(work), "--output_dir", str(peft_out),
        "--merged_output_dir", str(out),
        "--num_train_epochs", "2", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "4",
        "--save_total_limit", "3", "--data_seed", "11422", "--evaluation_strategy", "steps",
        "--per_device_eval_batch_size", "2", "--eval_dataset_size", "0.01", "--eval_steps", "4",
        "--max_new_tokens", "4096", "--dataloader_num_workers", "3", "--logging_strategy", "steps", "--do_train",
        "--lora_r", "64", "--lora_alpha", "16", "--lora_modules", "all", "--bf16", "--bits", "4", "--double_quant",
        "--quant_type", "nf4", "--lr_scheduler_type", "constant", "--dataset", "conversations.json",
        "--dataset_format", "airoboros_chat", "--model_max_len", "4096", "--per_device_train_batch_size", "2",
        "--learning_rate", "0.00008", "--adam_beta2", "0.999", "--max_grad_norm", "0.3", "--lora_dropout", "0.0",
        "--weight_decay", "0.0", "--seed", "11422", "--report_to", "wandb", "--gradient_checkpointing",
        "--use_flash_attention_2", "--ddp_find_unused_parameters", "False",
    ]
    result = run(command, cwd=str(tmp_path))
    assert result.returncode == 0, result.output[-6000:]
    assert "world size 2" in result.output  # two real ranks, not the --cpu single-process trap
    # 17 training conversations, 2 per device x 2 ranks -> 5 steps per epoch (last batch partial), 2 epochs
    assert json.loads((peft_out / "completed").read_text())["global_step"] == 10
    adapter_config = json.loads((peft_out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 64 and adapter_config["lora_alpha"] == 16
    targets = {name.rsplit(".", 1)[-1] for name in adapter_config["target_modules"]}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # all but lm_head
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-4", "checkpoint-8"]
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 4096
    merged_config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in merged_config and merged_config["dtype"] == "bfloat16"
    recorded = json.loads((peft_out / "base_quantization.json").read_text())  # what a later nf4_roundtrip rebuilds
    assert (recorded["bits"], recorded["quant_type"], recorded["double_quant"], recorded["dtype"]) == (4, "nf4", True, "bfloat16")
    check = json.loads((out / "merge_verification.json").read_text())
    assert check["sample_source"] == "training samples" and "4-bit nf4" in check["reference"]
    assert check["merge_base"] == "original" and check["argmax_agreement"] > 0.5
    from transformers import AutoTokenizer

    from finetune.data import pipeline as data

    for directory in (peft_out, out, work / "checkpoint-10"):  # every saved tokenizer renders the training layout
        saved = AutoTokenizer.from_pretrained(directory)
        assert saved.chat_template and data.template_matches_training(saved, "llama2", saved.chat_template)
    ids = probe_ids(str(out))
    merged, reference = logits(str(out), ids), logits(base_plus_adapter(tiny_model, str(peft_out)), ids)
    difference = (merged - reference).abs().max().item()
    print(f"QLoRA merged (bf16) vs fp32 base + adapter: max logit difference {difference:.4f}")
    assert difference < 0.05  # bf16 rounding of a 16-bit merge; the LoRA fp32 test below holds 1e-4


def lora_command(model: str, data_file: str, out: str, *extra: str) -> list[str]:
    return train_py(
        "--model_name_or_path", model, "--dataset", data_file, "--dataset_format", "airoboros",
        "--output_dir", out, "--bits", "32", "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none", "--seed", "1",
        "--disable_tqdm", "true", *extra,
    )


def test_lora_fp32_merge_matches_base_plus_adapter(tmp_path, tiny_model):
    data_file = write_jsonl(tmp_path / "data.jsonl", instructions(24))
    out, merged = tmp_path / "adapter", tmp_path / "merged"
    result = run(lora_command(tiny_model, data_file, str(out), "--max_steps", "6", "--merged_output_dir", str(merged)), cwd=str(tmp_path))
    assert result.returncode == 0, result.output[-4000:]
    ids = probe_ids(str(merged))
    merged_logits = logits(str(merged), ids)
    reference = logits(base_plus_adapter(tiny_model, str(out)), ids)
    base_logits = logits(tiny_model, ids)
    assert (merged_logits - reference).abs().max().item() <= 1e-4
    assert (merged_logits - base_logits).abs().max().item() > 1e-3  # the adapter really changed the model
    check = json.loads((merged / "merge_verification.json").read_text())
    assert check["samples"] == 4 and check["sample_source"] == "training samples" and check["max_abs_logit_diff"] <= 1e-4

    # a finished run whose merge is missing: re-running only merges, it does not train again
    shutil.rmtree(merged)
    again = run(lora_command(tiny_model, data_file, str(out), "--max_steps", "6", "--merged_output_dir", str(merged)), cwd=str(tmp_path))
    assert again.returncode == 0, again.output[-3000:]
    assert "already completed" in again.output and "'loss'" not in again.output
    assert (logits(str(merged), ids) - merged_logits).abs().max().item() == 0.0


@pytest.mark.parametrize(("sig", "rl"), [(signal.SIGTERM, None), (signal.SIGINT, "dpo")], ids=["SIGTERM", "SIGINT-dpo"])
def test_preemption_signal_saves_a_checkpoint_at_a_step_boundary_and_the_run_resumes(tmp_path, tiny_model, sig, rl):
    records = instructions(40)
    if rl:  # preference training stops the same way
        records = [{"instruction": r["instruction"], "chosen": r["response"], "rejected": "No."} for r in records]
    data_file = write_jsonl(tmp_path / "data.jsonl", records)
    out = tmp_path / "adapter"
    command = lora_command(tiny_model, data_file, str(out), "--max_steps", "300", "--save_steps", "1000",
                           *(["--rl", rl] if rl else []))
    log = open(tmp_path / "log.txt", "w")
    process = subprocess.Popen(command, cwd=str(tmp_path), env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while "'loss'" not in (tmp_path / "log.txt").read_text() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(sig)
    code = process.wait(timeout=120)
    output = (tmp_path / "log.txt").read_text()
    assert code == 128 + sig, output[-3000:]
    assert "Traceback" not in output and "run the same command again to resume" in output
    assert not (out / "completed").exists() and not (out / "adapter_model.safetensors").exists()
    saved = [int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/trainer_state.json")]
    assert len(saved) == 1 and 0 < saved[0] < 300  # one checkpoint, where the signal arrived (save_steps is 1000)
    if sig == signal.SIGINT:
        return  # the same checkpoint as SIGTERM's; resuming from it is checked once, below
    resumed = run(command, cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resuming from {out}/checkpoint-{saved[0]}" in resumed.output
    assert resumed.output.count("'loss'") == 300 - saved[0]
    assert (out / "completed").exists()
