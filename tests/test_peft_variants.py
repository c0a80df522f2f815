"""The LoRA variants (--use_dora, --use_rslora, --init_lora_weights, --loraplus_lr_ratio), continuing an adapter
(--lora_model_dir) and --peft_method llama_adapter: each takes effect as documented, trains, resumes exactly, and
the streamed merge equals peft's own merge of the trained model (1e-5, fp32), or the run refuses up front."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import build_stages, instructions, run, train_py, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from finetune.outputs import finishing, reporting

FLAGS = ("--bits", "32", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "4", "--per_device_train_batch_size",
         "2", "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true",
         "--merge_verify_samples", "0", "--seed", "3")


@pytest.fixture
def data_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "data.jsonl", instructions(24))


def without(flags: tuple[str, ...], *names: str) -> list[str]:
    """flags less these flags and their values."""
    kept = list(flags)
    for name in names:
        at = kept.index(name)
        del kept[at:at + 2]
    return kept


def lora_modules(model):
    return [module for name, module in model.named_modules() if hasattr(module, "lora_A") and "default" in module.lora_A]


def base_logits(model_dir: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(input_ids=ids).logits


def train_save_merge(built) -> tuple[dict, dict]:
    """Train, then (as run() does) save the adapter and stream the merge -> (merged weights, peft's merge of the
    trained model)."""
    built.trainer.train()
    reference = copy.deepcopy(built.model).merge_and_unload().state_dict()
    finishing.save_final(built.trainer, built.args, built.paths, built.tokenizer, built.gen_config)
    finishing.merge_adapter(built.model_args, built.args, built.paths, built.tokenizer, built.gen_config)
    merged = AutoModelForCausalLM.from_pretrained(built.paths.merged, dtype=torch.float32).state_dict()
    return merged, reference


def worst_difference(merged: dict, reference: dict) -> float:
    assert merged.keys() == reference.keys()
    return max((merged[k] - reference[k]).abs().max().item() for k in merged)


@pytest.mark.parametrize("variant", [
    ("--use_dora",), ("--use_rslora",), ("--init_lora_weights", "gaussian"), ("--init_lora_weights", "pissa"),
    ("--init_lora_weights", "olora"), ("--use_dora", "--init_lora_weights", "pissa"),
], ids=["dora", "rslora", "gaussian", "pissa", "olora", "dora-pissa"])
def test_each_variant_takes_effect_trains_and_merges_exactly(tiny_model, data_file, tmp_path, variant):
    built = build_stages(tiny_model, data_file, tmp_path / "adapter", *FLAGS, *variant,
                         "--merged_output_dir", str(tmp_path / "merged"))
    modules = lora_modules(built.model)
    assert modules
    ids = torch.tensor([built.train_set[0]["input_ids"]])
    if "--use_dora" in variant:  # a trained magnitude per output row, equal to the base weight's row norms at start
        for module in modules:
            magnitude = module.lora_magnitude_vector["default"].weight
            assert magnitude.requires_grad and magnitude.shape == (module.base_layer.weight.shape[0],)
    if "--use_rslora" in variant:
        assert {module.scaling["default"] for module in modules} == {8 / math.sqrt(4)}
    else:
        assert {module.scaling["default"] for module in modules} == {8 / 4}
    if "gaussian" in variant:  # A ~ N(0, 1/r): std 0.25 (the default Kaiming-uniform A has std ~ 1/sqrt(3 * in))
        a = torch.cat([module.lora_A["default"].weight.flatten() for module in modules])
        assert abs(a.std().item() - 1 / 4) < 0.03
    if "pissa" in variant or "olora" in variant:
        # the base kept the residual, the adapter holds the rest: B is not zero, yet the model starts at the base
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
        module = modules[0]
        assert module.lora_B["default"].weight.abs().max() > 1e-3
        assert any((module.base_layer.weight - base[k]).abs().max() > 1e-3 for k in base
                   if base[k].shape == module.base_layer.weight.shape)
        with torch.no_grad():
            start = built.model(input_ids=ids).logits
        assert (start - base_logits(tiny_model, ids)).abs().max() < 1e-4
        assert (tmp_path / "adapter" / "initial_adapter" / "adapter_model.safetensors").exists()

    merged, reference = train_save_merge(built)
    assert worst_difference(merged, reference) <= 1e-5
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    assert worst_difference(merged, base) > 1e-3  # it trained, and the update landed
    card_method = reporting.method(reporting.build_report(built.trainer, built.model_args, built.data_args, built.args,
                                                          built.paths, built.tokenizer, built.gen_config, {})["settings"])
    assert ("DoRA" in card_method) == ("--use_dora" in variant) and ("rsLoRA" in card_method) == ("--use_rslora" in variant)
    assert all(f"{name} init" in card_method for name in ("gaussian", "pissa", "olora") if name in variant)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] == ("--use_dora" in variant) and config["use_rslora"] == ("--use_rslora" in variant)
    if "pissa" in variant or "olora" in variant:  # saved as a plain LoRA of rank 2r with the same scale
        assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
        saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        assert {tuple(v.shape) for k, v in saved.items() if "lora_A" in k and "q_proj" in k} == {(8, 64)}


def test_loraplus_trains_b_at_the_ratio_and_resumes_exactly(tiny_model, data_file, tmp_path):
    flags = (*FLAGS, "--loraplus_lr_ratio", "16", "--lr_scheduler_type", "cosine", "--warmup_steps", "1")
    built = build_stages(tiny_model, data_file, tmp_path / "straight", *flags)
    built.trainer.train()
    groups = built.trainer.optimizer.param_groups
    b_ids = {id(p) for n, p in built.model.named_parameters() if "lora_B" in n}
    faster = [g for g in groups if g.get("loraplus")]
    assert faster and all(id(p) in b_ids for g in faster for p in g["params"])
    assert all(id(p) not in b_ids for g in groups if not g.get("loraplus") for p in g["params"])
    assert {g["initial_lr"] for g in faster} == {16e-2} and {g["initial_lr"] for g in groups if g not in faster} == {1e-2}
    assert all(math.isclose(g["lr"], 16 * groups[0]["lr"]) for g in faster)  # the schedule keeps the ratio

    resumed = resume_at_step_2(tiny_model, data_file, tmp_path / "crashed", flags)
    assert worst_state_difference(resumed, built.model) <= 1e-6


def resume_at_step_2(tiny_model, data_file, out, flags) -> torch.nn.Module:
    """A run stopped after its step-2 checkpoint, then the same flags again resuming from it."""
    first = build_stages(tiny_model, data_file, out, *flags, "--save_strategy", "steps", "--save_steps", "2")
    first.trainer.add_callback(StopAt(2))  # stops after the first checkpoint, as a killed run would have
    first.trainer.train()
    again = build_stages(tiny_model, data_file, out, *flags, "--save_strategy", "steps", "--save_steps", "2")
    again.trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    return again.model


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def worst_state_difference(a, b) -> float:
    first, second = a.state_dict(), b.state_dict()
    return max((first[k] - second[k]).abs().max().item() for k in first)


@pytest.mark.parametrize("variant", [("--use_dora",), ("--init_lora_weights", "pissa")], ids=["dora", "pissa"])
def test_a_variant_resumes_to_the_uninterrupted_weights(tiny_model, data_file, tmp_path, variant):
    straight = build_stages(tiny_model, data_file, tmp_path / "straight", *FLAGS, *variant)
    straight.trainer.train()
    resumed = resume_at_step_2(tiny_model, data_file, tmp_path / "crashed", (*FLAGS, *variant))
    assert worst_state_difference(resumed, straight.model) <= 1e-6


def test_loftq_fits_the_4_bit_error_and_merges_into_the_4_bit_weights(tiny_model, data_file, tmp_path):
    import bitsandbytes.functional as bnb_functional

    built = build_stages(tiny_model, data_file, tmp_path / "adapter", *FLAGS, "--bits", "4",
                         "--init_lora_weights", "loftq", "--merged_output_dir", str(tmp_path / "merged"),
                         "--merge_base", "nf4_roundtrip")
    # the 4-bit weights training sees, dequantized before the first forward (bitsandbytes may repack them for the
    # CPU kernels there, after which .data no longer has the layout dequantize_4bit reads); they stay frozen
    lora_layers = {name.removeprefix("base_model.model.") + ".weight": module
                   for name, module in built.model.named_modules() if hasattr(module, "lora_A") and "default" in module.lora_A}
    dequantized = {key: bnb_functional.dequantize_4bit(module.base_layer.weight.data,
                                                        module.base_layer.weight.quant_state).float()
                   for key, module in lora_layers.items()}
    plain = build_stages(tiny_model, data_file, tmp_path / "plain", *FLAGS, "--bits", "4")
    ids = torch.tensor([built.train_set[0]["input_ids"]])
    full = base_logits(tiny_model, ids)
    with torch.no_grad():
        loftq_error = (built.model(input_ids=ids).logits - full).abs().mean()
        plain_error = (plain.model(input_ids=ids).logits - full).abs().mean()
    assert loftq_error < plain_error  # base + LoftQ adapter is closer to the 16-bit model than the 4-bit base alone

    built.trainer.train()
    expected = {}  # the 4-bit weight training saw, plus s*B@A
    for key, module in lora_layers.items():
        delta = module.lora_B["default"].weight.float() @ module.lora_A["default"].weight.float()
        expected[key] = dequantized[key] + delta * module.scaling["default"]
    finishing.save_final(built.trainer, built.args, built.paths, built.tokenizer, built.gen_config)
    finishing.merge_adapter(built.model_args, built.args, built.paths, built.tokenizer, built.gen_config)
    merged = AutoModelForCausalLM.from_pretrained(built.paths.merged, dtype=torch.float32).state_dict()
    assert expected and max((merged[k] - v).abs().max().item() for k, v in expected.items()) <= 1e-5


def test_lora_model_dir_continues_the_saved_adapter(tiny_model, data_file, tmp_path):
    first = build_stages(tiny_model, data_file, tmp_path / "first", *FLAGS, "--use_dora")
    first.trainer.train()
    finishing.save_final(first.trainer, first.args, first.paths, first.tokenizer, first.gen_config)
    saved = load_file(str(tmp_path / "first" / "adapter_model.safetensors"))

    flags = without(FLAGS, "--lora_r", "--lora_alpha")  # the adapter's own settings are used
    second = build_stages(tiny_model, data_file, tmp_path / "second", *flags, "--lora_model_dir", str(tmp_path / "first"),
                          "--merged_output_dir", str(tmp_path / "merged"))
    state = {k: v.clone() for k, v in second.model.state_dict().items()}
    for key, value in saved.items():  # starts from the saved weights, all of them trainable
        own = key.replace(".weight", ".default.weight") if key.endswith("lora_A.weight") or key.endswith("lora_B.weight") else key
        own = own.replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")
        assert torch.equal(state[own], value), key
    assert {n for n, p in second.model.named_parameters() if p.requires_grad} >= {
        n for n in dict(second.model.named_parameters()) if "lora_" in n}
    merged, reference = train_save_merge(second)
    assert worst_difference(merged, reference) <= 1e-5
    assert max((second.model.state_dict()[k] - state[k]).abs().max().item() for k in state if "lora_B" in k) > 0


def test_llama_adapter_trains_gated_prompts_and_refuses_a_merge(tiny_model, data_file, tmp_path):
    built = build_stages(tiny_model, data_file, tmp_path / "adapter", *without(FLAGS, "--lora_r", "--lora_alpha"),
                         "--peft_method", "llama_adapter",
                         "--llama_adapter_len", "4", "--llama_adapter_layers", "1")
    trainable = {n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable and all("adaption" in n for n in trainable)
    assert sum("layers.1." in n for n in trainable) and not sum("layers.0." in n for n in trainable)  # the top layer
    built.trainer.train()
    after = dict(built.model.named_parameters())
    assert any((after[n] - before).abs().max() > 0 for n, before in trainable.items())
    finishing.save_final(built.trainer, built.args, built.paths, built.tokenizer, built.gen_config)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "ADAPTION_PROMPT"
    settings = reporting.build_report(built.trainer, built.model_args, built.data_args, built.args, built.paths,
                                      built.tokenizer, built.gen_config, {})["settings"]
    assert reporting.method(settings) == "LLaMA-Adapter (adaption prompts) on a 32-bit base"

    refused = run(train_py("--model_name_or_path", tiny_model, "--dataset", data_file, "--output_dir",
                           str(tmp_path / "x"), "--peft_method", "llama_adapter", "--merged_output_dir",
                           str(tmp_path / "m")), cwd=str(tmp_path))
    assert refused.returncode == 2 and "cannot be merged" in refused.output
