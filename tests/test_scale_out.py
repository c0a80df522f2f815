"""Scaling out changes nothing but speed: 1 process x batch 4, torchrun 2 x 2 (DDP, launched from an axolotl
config) and torchrun 2 x 2 under DeepSpeed ZeRO-3 train the same losses, and --dry_run predicts the steps they take. They all use the trained-token
loss (the default); one more single-process run on transformers' plain loss is the reference they must match."""

from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import ROOT, conversations, run, train_py, write_jsonl

pytestmark = pytest.mark.slow  # one test worker runs the module (conftest.WORKER_GROUPS)

STEPS = 4


def flags(data: str, out: str, micro_batch: int) -> list[str]:
    return ["--model_name_or_path", "{model}", "--dataset", data, "--dataset_format", "airoboros_chat",
            "--output_dir", out, "--full_finetune", "--bits", "32", "--learning_rate", "1e-3",
            "--per_device_train_batch_size", str(micro_batch), "--num_train_epochs", "1", "--max_steps", str(STEPS),
            "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", str(STEPS), "--seed", "7",
            "--lr_scheduler_type", "constant", "--report_to", "none"]


def axolotl_config(root, data: str, model: str, micro_batch: int) -> str:
    """flags() as an axolotl config: the 2 x 2 DDP run is launched from it, so torchrun + an axolotl YAML must train
    what the flags train in one process."""
    import yaml

    path = root / "axolotl.yml"
    path.write_text(yaml.safe_dump({
        "base_model": model, "datasets": [{"path": data, "type": "airoboros_chat"}], "output_dir": str(root / "2x2"),
        "adapter": None, "bf16": False, "learning_rate": 1e-3, "micro_batch_size": micro_batch, "num_epochs": 1,
        "max_steps": STEPS, "logging_steps": 1, "save_steps": STEPS, "seed": 7, "lr_scheduler": "constant",
    }))
    return str(path)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", os.path.join(ROOT, "train.py"), *args]


def losses(out) -> list[float]:
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("scale")
    data = write_jsonl(root / "d.jsonl", conversations(40))
    fill = lambda fs: [tiny_model if f == "{model}" else f for f in fs]  # noqa: E731
    results = {}
    for name, command in {
        "1x4": train_py(*fill(flags(data, str(root / "1x4"), 4))),
        "1x4-plain": train_py(*fill(flags(data, str(root / "1x4-plain"), 4)), "--chunked_cross_entropy", "False"),
        "2x2": torchrun(axolotl_config(root, data, tiny_model, 2), "--report_to", "none"),
        "2x2-zero3": torchrun(*fill(flags(data, str(root / "2x2-zero3"), 2)),
                              "--deepspeed", os.path.join(ROOT, "configs", "deepspeed-zero3.json")),
    }.items():
        result = run(command, cwd=str(root))
        assert result.returncode == 0, f"{name}\n{result.output[-5000:]}"
        results[name] = (root / name, result.output)
    plan = run(train_py(*fill(flags(data, str(root / "plan"), 2)), "--dry_run", "--dry_run_world_size", "2"), cwd=str(root))
    assert plan.returncode == 0, plan.output[-3000:]
    return results, plan.output


def test_trained_token_loss_trains_the_losses_and_weights_of_the_plain_loss(runs):
    import torch
    from safetensors.torch import load_file

    results, _ = runs
    assert "Loss: logits only at trained positions" in results["1x4"][1]
    assert "Loss: transformers' plain causal-LM loss (--chunked_cross_entropy False)" in results["1x4-plain"][1]
    ours, plain = losses(results["1x4"][0]), losses(results["1x4-plain"][0])
    assert len(ours) == STEPS and max(abs(a - b) for a, b in zip(ours, plain)) < 1e-5, (ours, plain)
    chunked = load_file(str(results["1x4"][0] / "model.safetensors"))
    reference = load_file(str(results["1x4-plain"][0] / "model.safetensors"))
    assert all(torch.allclose(chunked[k], reference[k], atol=1e-5) for k in reference)


def test_two_processes_train_the_same_losses_as_one_with_the_same_global_batch(runs):
    results, _ = runs
    one, two = losses(results["1x4"][0]), losses(results["2x2"][0])
    assert "world size 2" in results["2x2"][1]
    assert len(one) == len(two) == STEPS
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    assert one[-1] < one[0] - 0.05  # the weights did move (lr 1e-3): equal losses are not equal no-ops


def test_deepspeed_zero3_trains_the_same_losses_and_saves_a_whole_model(runs):
    import torch
    from safetensors.torch import load_file

    results, _ = runs
    one, zero3 = losses(results["1x4-plain"][0]), losses(results["2x2-zero3"][0])  # against the plain loss
    assert "world size 2" in results["2x2-zero3"][1] and "Loss: logits only at trained" in results["2x2-zero3"][1]
    assert max(abs(a - b) for a, b in zip(one, zero3)) < 1e-5, (one, zero3)
    single = load_file(str(results["1x4-plain"][0] / "model.safetensors"))
    sharded = load_file(str(results["2x2-zero3"][0] / "model.safetensors"))  # gathered from both ranks' shards
    assert single.keys() == sharded.keys()
    assert all(sharded[k].shape == single[k].shape and torch.allclose(sharded[k], single[k], atol=1e-4) for k in single)


def test_dry_run_plans_the_steps_and_world_size_the_runs_took(runs):
    results, plan_output = runs
    plan = json.loads(next(line for line in plan_output.splitlines() if "plan-json: " in line).split("plan-json: ")[1])
    assert plan["world_size"] == 2 and plan["samples_per_step"] == 4 and plan["total_steps"] == STEPS
    for out, _ in results.values():
        assert json.loads((out / "completed").read_text())["global_step"] == plan["total_steps"]


def test_accelerate_fsdp_config_is_valid_and_refused_on_a_machine_without_gpus(tmp_path, tiny_model):
    """FSDP is GPU-only: without CUDA, transformers/accelerate would silently run plain DDP. The shipped config must
    parse as an accelerate FSDP config, and launching it here must stop with the reason before anything is written."""
    from accelerate.commands.config.config_args import load_config_from_file

    config_file = os.path.join(ROOT, "configs", "accelerate-fsdp.yaml")
    config = load_config_from_file(config_file)
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] and not config.fsdp_config["fsdp_use_orig_params"]
    data = write_jsonl(tmp_path / "d.jsonl", conversations(8))
    result = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, "--num_processes",
                  "2", os.path.join(ROOT, "train.py"), "--model_name_or_path", tiny_model, "--dataset", data,
                  "--dataset_format", "airoboros_chat", "--output_dir", str(tmp_path / "out"), "--bits", "4",
                  "--quant_storage", "bfloat16", "--bf16", "--max_steps", "1", "--report_to", "none"], cwd=str(tmp_path))
    assert result.returncode != 0
    assert "FSDP needs GPUs" in result.output and "--deepspeed configs/deepspeed-zero3.json" in result.output
    assert not (tmp_path / "out").exists()


def test_qlora_under_zero3_with_cpu_offload_trains_and_rank_0_merges(tmp_path, tiny_model):
    """4-bit weights stored like the rest of the model (--quant_storage) shard under ZeRO-3, with weights and
    optimizer states offloaded (DeepSpeed's cpu_adam, compiled once into the venv); the merge after it runs on
    rank 0 alone (it used to build its model through ZeRO-3's collective init and crash)."""
    data = write_jsonl(tmp_path / "d.jsonl", conversations(16))
    result = run(torchrun("--model_name_or_path", tiny_model, "--dataset", data, "--dataset_format", "airoboros_chat",
                          "--output_dir", str(tmp_path / "adapter"), "--merged_output_dir", str(tmp_path / "merged"),
                          "--bits", "4", "--quant_storage", "float32", "--lora_r", "4", "--max_steps", "2",
                          "--per_device_train_batch_size", "2", "--merge_verify_samples", "1", "--report_to", "none",
                          "--deepspeed", os.path.join(ROOT, "configs", "deepspeed-zero3-offload.json")), cwd=str(tmp_path))
    assert result.returncode == 0, result.output[-5000:]
    assert "world size 2" in result.output and 'has its own "optimizer" (AdamW)' in result.output
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists() and (tmp_path / "adapter" / "completed").exists()
    report = json.loads((tmp_path / "merged" / "merge_verification.json").read_text())
    assert report["samples"] == 1 and report["max_abs_logit_diff"] < 1.0
