"""Training knobs, each shown to take effect on the objects it should change: NEFTune noise, layer freezing, RoPE
scaling overrides, the optimizer choice and its DeepSpeed interaction. In-process, on the tiny 2-layer model."""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch
from conftest import ROOT, build_stages, instructions, write_jsonl

import train
from finetune.checks.model_config import check_model_before_writing
from finetune.modeling import knobs as training_knobs
from finetune.modeling.loading import load_model
from finetune.modeling.tokenizer import load_tokenizer
from finetune.outputs.finishing import merge_adapter


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", instructions(8))


def build(tiny_model, data_file, tmp_path, *flags):
    """The stages of run() up to the trainer, with the same checks first."""
    return build_stages(tiny_model, data_file, tmp_path / "o", "--save_strategy", "no", "--max_steps", "2", *flags)


def exit_code_and_log(argv, caplog, capsys):
    with caplog.at_level(logging.INFO):
        try:
            code = train.main(argv)
        except SystemExit as exit_:  # argparse's own errors (bad choices) exit 2 too
            code = exit_.code
    return code, caplog.text + capsys.readouterr().err


def snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def optimizer_params(trainer) -> set[int]:
    return {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}


# --- NEFTune -----------------------------------------------------------------------------------------------------------

NEFTUNE_SETUPS = {
    "full-finetune": ["--full_finetune", "--bits", "32"],
    "lora-new-token": ["--bits", "32", "--lora_r", "2", "--pad_token", "<pad>"],  # embeddings in modules_to_save
    "qlora-packed": ["--bits", "4", "--lora_r", "2", "--sample_packing", "--model_max_len", "64"],
}


@pytest.mark.parametrize("setup", sorted(NEFTUNE_SETUPS))
def test_neftune_noise_has_the_expected_scale_in_training_and_none_in_eval(tiny_model, data_file, tmp_path, setup):
    alpha = 5.0
    built = build(tiny_model, data_file, tmp_path, "--neftune_noise_alpha", str(alpha), "--eval_dataset_size", "2",
                  "--eval_strategy", "steps", "--eval_steps", "1", *NEFTUNE_SETUPS[setup])
    model = built.model
    embeddings = model.get_input_embeddings()
    _, layers = training_knobs.decoder_layers(model)
    forwards = []
    # registered before the Trainer adds its NEFTune hook, so this one sees the clean embeddings
    embeddings.register_forward_hook(lambda m, i, out: forwards.append({"training": m.training, "clean": out.detach().clone()}))

    def first_layer_input(module, args, kwargs):
        forwards[-1]["noisy"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        forwards[-1]["positions"] = kwargs.get("position_ids")

    layers[0].register_forward_pre_hook(first_layer_input, with_kwargs=True)
    built.trainer.train()
    training = [f for f in forwards if f["training"]]
    evaluation = [f for f in forwards if not f["training"]]
    assert len(training) == 2 and len(evaluation) >= 1
    for forward in training:
        noise = forward["noisy"] - forward["clean"]
        length, hidden = noise.shape[1], noise.shape[2]
        bound = alpha / math.sqrt(length * hidden)  # uniform in [-bound, bound]: std bound/sqrt(3)
        assert noise.abs().max().item() <= bound * (1 + 1e-4)
        assert noise.abs().max().item() > 0.95 * bound
        assert abs(noise.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    for forward in evaluation:
        assert torch.equal(forward["noisy"], forward["clean"])
    if setup == "qlora-packed":  # L is the packed row: it holds several samples (positions restart inside it)
        positions = training[0]["positions"][0]
        assert (positions[1:] == 0).any()
    forwards.clear()
    model.train()  # the hook is gone after training: no noise even in train mode (e.g. generating afterwards)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 6, 7]]))
    assert torch.equal(forwards[0]["noisy"], forwards[0]["clean"])


# --- layer freezing ------------------------------------------------------------------------------------------------------


def test_layers_to_freeze_full_finetune_freezes_layer_0_and_the_embeddings_only(tiny_model, data_file, tmp_path):
    """With reentrant checkpointing too: layer 1's input comes from frozen weights, and without input grads a
    reentrant checkpoint would silently leave every unfrozen layer without gradients."""
    built = build(tiny_model, data_file, tmp_path, "--full_finetune", "--bits", "32", "--layers_to_freeze", "1",
                  "--learning_rate", "1e-2", "--gradient_checkpointing", "--activation_checkpointing_kwargs",
                  '{"use_reentrant": true}')
    model, trainer = built.model, built.trainer
    names = {name for name, _ in model.named_parameters()}
    frozen = {n for n in names if n.startswith("model.layers.0.") or n == "model.embed_tokens.weight"}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == names - frozen
    assert len(frozen) == 10 and {"lm_head.weight", "model.norm.weight", "model.layers.1.self_attn.q_proj.weight"} <= trainable
    before = snapshot(model)
    trainer.train()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in frozen)  # bit-identical
    assert all(not torch.equal(before[n], after[n]) for n in trainable)
    assert optimizer_params(trainer) == {id(after[n]) for n in trainable}


LORA_FREEZES = {
    "ratio-all-linear": ["--bits", "32", "--layer_freeze_ratio", "0.5"],
    "count-qlora-q-v": ["--bits", "4", "--layers_to_freeze", "1", "--lora_modules", "q_proj,v_proj"],
}


@pytest.mark.parametrize("setup", sorted(LORA_FREEZES))
def test_lora_with_frozen_layers_puts_adapters_only_above_them(tiny_model, data_file, tmp_path, setup):
    built = build(tiny_model, data_file, tmp_path, "--lora_r", "2", "--learning_rate", "1e-2", *LORA_FREEZES[setup])
    model, trainer = built.model, built.trainer
    modules = {"q_proj", "v_proj"} if "q_proj" in LORA_FREEZES[setup][-1] else {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    expected = {f"base_model.model.model.layers.1.{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}.lora_{ab}.default.weight"
                for m in modules for ab in "AB"}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert not [name for name, _ in model.named_modules() if ".layers.0." in name and "lora" in name]
    assert model.peft_config["default"].layers_to_transform == [1]
    before = snapshot(model)
    trainer.train()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in after if n not in trainable)
    assert all(not torch.equal(before[n], after[n]) for n in trainable if "lora_B" in n)  # B starts at 0
    assert optimizer_params(trainer) == {id(after[n]) for n in trainable}


def test_frozen_embeddings_stay_trainable_when_tokens_were_added(tiny_model, data_file, tmp_path):
    built = build(tiny_model, data_file, tmp_path, "--full_finetune", "--bits", "32", "--layers_to_freeze", "1",
                  "--pad_token", "<pad>")
    trainable = {name for name, p in built.model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" in trainable  # the new <pad> row must learn
    assert not [n for n in trainable if n.startswith("model.layers.0.")]


def test_freezing_counts_and_picks_layers_by_position(tmp_path):
    """floor(ratio x layers) without float loss, and layer 1 frozen does not freeze layers 10 and 11 (a name-prefix
    match would); structure only, so a 12-layer model with hidden 16 is built in memory and never trained."""
    assert training_knobs.frozen_layer_count(None, 0.29, 100) == 29  # int(0.29 * 100) == 28
    assert [training_knobs.frozen_layer_count(None, r, n) for r, n in ((0.5, 2), (0.4, 2), (0.3, 10), (0.999, 12))] == [1, 0, 3, 11]
    assert training_knobs.frozen_layer_count(3, None, 12) == 3 and training_knobs.frozen_layer_count(None, None, 12) == 0
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=12,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    frozen = training_knobs.freeze_bottom_layers(model, 2, new_tokens=False)
    assert frozen == ["layers.0", "layers.1", "input embeddings", "output head (tied to the input embeddings)"]
    trainable_layers = {int(n.split(".")[2]) for n, p in model.named_parameters() if p.requires_grad and ".layers." in n}
    assert trainable_layers == set(range(2, 12))
    targets, limits = training_knobs.lora_layer_limits(model, "all-linear", 2)
    assert limits == {"layers_to_transform": list(range(2, 12)), "layers_pattern": "layers"}
    assert set(targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


BAD_KNOBS = [
    (["--layers_to_freeze", "-1"], "--layers_to_freeze must be >= 0"),
    (["--layers_to_freeze", "2"], "--layers_to_freeze 2 freezes 2 layers but the model has 2 decoder layers"),
    (["--layers_to_freeze", "5", "--full_finetune", "--bits", "32"], "--layers_to_freeze 5 freezes 5 layers"),
    (["--layer_freeze_ratio", "1.0"], "--layer_freeze_ratio must be in [0, 1)"),
    (["--layer_freeze_ratio", "-0.5"], "--layer_freeze_ratio must be in [0, 1)"),
    (["--layers_to_freeze", "1", "--layer_freeze_ratio", "0.5"], "--layers_to_freeze and --layer_freeze_ratio both given"),
    (["--rope_scaling_type", "linear"], "--rope_scaling_type needs --rope_scaling_factor"),
    (["--rope_scaling_factor", "2"], "--rope_scaling_factor needs --rope_scaling_type (linear|dynamic|yarn)"),
    (["--rope_scaling_type", "yarn", "--rope_scaling_factor", "1"], "--rope_scaling_factor must be > 1 (got 1.0)"),
    (["--rope_scaling_type", "linear", "--rope_scaling_factor", "0.5"], "--rope_scaling_factor must be > 1"),
    (["--rope_scaling_type", "llama3", "--rope_scaling_factor", "2"], "invalid choice: 'llama3'"),
    (["--neftune_noise_alpha", "0"], "--neftune_noise_alpha must be > 0"),
    (["--neftune_noise_alpha", "-5"], "--neftune_noise_alpha must be > 0"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_KNOBS)
def test_bad_knob_values_exit_2_naming_the_flag_and_write_nothing(tiny_model, data_file, tmp_path, caplog, capsys, flags, message):
    out = tmp_path / "out"
    code, text = exit_code_and_log(["--model_name_or_path", tiny_model, "--dataset", data_file, "--output_dir", str(out),
                                    "--report_to", "none", *flags], caplog, capsys)
    assert code == 2 and message in text, text[-2000:]
    assert not out.exists()


def test_rope_scaling_on_a_model_without_rope_is_a_usage_error(tmp_path, data_file, caplog, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64).save_pretrained(tmp_path / "gpt2")
    code, text = exit_code_and_log(["--model_name_or_path", str(tmp_path / "gpt2"), "--dataset", data_file,
                                    "--output_dir", str(tmp_path / "out"), "--rope_scaling_type", "linear",
                                    "--rope_scaling_factor", "2"], caplog, capsys)
    assert code == 2 and "--rope_scaling_type: this model (gpt2) has no single set of RoPE parameters" in text


def test_help_documents_the_knobs():
    text = train.build_parser().format_help()
    for flag in ("--layers_to_freeze", "--layer_freeze_ratio", "--rope_scaling_type", "--rope_scaling_factor",
                 "--neftune_noise_alpha"):
        assert flag in text
    assert "{linear,dynamic,yarn}" in text and "packed row" in text


# --- RoPE scaling --------------------------------------------------------------------------------------------------------


def rotary(tiny_model, data_file, tmp_path, *flags):
    model_args, data_args, args, _ = train.parse_arguments(
        ["--model_name_or_path", tiny_model, "--dataset", data_file, "--output_dir", str(tmp_path / "o"), "--bits", "32", *flags])
    check_model_before_writing(model_args, args, data_args.model_max_len)
    model, _ = load_model(model_args, args, load_tokenizer(model_args, data_args))
    return model


def test_rope_scaling_changes_the_rotary_frequencies_as_each_type_defines(tiny_model, data_file, tmp_path):
    plain = rotary(tiny_model, data_file, tmp_path).model.rotary_emb
    factor = 4.0
    linear = rotary(tiny_model, data_file, tmp_path, "--rope_scaling_type", "linear", "--rope_scaling_factor", "4")
    assert torch.allclose(linear.model.rotary_emb.inv_freq, plain.inv_freq / factor, rtol=1e-6, atol=0)
    assert linear.model.rotary_emb.attention_scaling == 1.0 and linear.config.max_position_embeddings == 4 * 4096

    yarn = rotary(tiny_model, data_file, tmp_path, "--rope_scaling_type", "yarn", "--rope_scaling_factor", "4")
    ratio = yarn.model.rotary_emb.inv_freq / plain.inv_freq
    # high frequencies (short wavelengths) extrapolate unchanged, low ones are interpolated by the factor
    assert ratio[0].item() == pytest.approx(1.0, abs=1e-6) and ratio[-1].item() == pytest.approx(1 / factor, rel=1e-6)
    assert ((ratio[1:] <= ratio[:-1] + 1e-7).all() and (ratio >= 1 / factor - 1e-7).all())
    assert yarn.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(factor) + 1.0)
    assert yarn.config.rope_parameters["original_max_position_embeddings"] == 4096

    dynamic = rotary(tiny_model, data_file, tmp_path, "--rope_scaling_type", "dynamic", "--rope_scaling_factor", "4")
    embedding = dynamic.model.rotary_emb
    assert torch.equal(embedding.inv_freq, plain.inv_freq) and dynamic.config.max_position_embeddings == 4096
    length, dim = 8192, dynamic.config.head_dim  # beyond 4096 positions NTK raises the base
    embedding(torch.zeros(1, 1, dim), torch.arange(length)[None])
    base = 10000.0 * (factor * length / 4096 - (factor - 1)) ** (dim / (dim - 2))
    expected = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    assert torch.allclose(embedding.inv_freq, expected, rtol=1e-5, atol=0)


def test_rope_scaling_is_saved_with_the_full_model_and_the_merged_model(tiny_model, data_file, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    flags = ("--rope_scaling_type", "linear", "--rope_scaling_factor", "2")
    full = build(tiny_model, data_file, tmp_path / "full", "--full_finetune", "--bits", "32", *flags)
    full.trainer.save_model(str(tmp_path / "full-model"))
    saved = AutoConfig.from_pretrained(tmp_path / "full-model")
    assert (saved.rope_parameters["rope_type"], saved.rope_parameters["factor"], saved.max_position_embeddings) == ("linear", 2.0, 8192)

    lora = build(tiny_model, data_file, tmp_path / "lora", "--bits", "32", "--lora_r", "2",
                 "--merged_output_dir", str(tmp_path / "merged"), *flags)
    lora.trainer.save_model(lora.paths.final)
    merge_adapter(lora.model_args, lora.args, lora.paths, lora.tokenizer, lora.gen_config)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.rope_parameters["rope_type"] == "linear" and merged.config.rope_parameters["factor"] == 2.0
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert torch.allclose(merged.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq / 2, rtol=1e-6, atol=0)


# --- optimizers ----------------------------------------------------------------------------------------------------------


def optimizer_expectations():
    import bitsandbytes as bnb
    from transformers.optimization import Adafactor

    # optim -> (class the Trainer builds, bits, paged, state key and dtype on an 8192-element linear weight)
    return {
        "adamw_torch": (torch.optim.AdamW, None, None, ("exp_avg", torch.float32)),
        "paged_adamw_32bit": (bnb.optim.AdamW, 32, True, ("state1", torch.float32)),  # paging falls back on CPU
        "adamw_bnb_8bit": (bnb.optim.AdamW, 8, False, ("state1", torch.uint8)),
        "lion_8bit": (bnb.optim.Lion, 8, False, ("state1", torch.uint8)),
        "adafactor": (Adafactor, None, None, ("exp_avg_sq_row", torch.float32)),  # factored second moment
    }


@pytest.mark.parametrize("optim", ["adamw_torch", "paged_adamw_32bit", "adamw_bnb_8bit", "lion_8bit", "adafactor"])
def test_each_optimizer_is_the_one_built_and_moves_the_weights(tiny_model, data_file, tmp_path, optim):
    cls, bits, paged, (state_key, state_dtype) = optimizer_expectations()[optim]
    built = build(tiny_model, data_file, tmp_path, "--full_finetune", "--bits", "32", "--optim", optim,
                  "--learning_rate", "1e-3")
    before = snapshot(built.model)
    built.trainer.train()
    optimizer = built.trainer.optimizer.optimizer  # inside accelerate's wrapper
    assert type(optimizer) is cls
    if bits is not None:
        assert optimizer.args.optim_bits == bits and optimizer.is_paged == paged
    weight = built.model.model.layers[1].mlp.gate_proj.weight
    assert optimizer.state[weight][state_key].dtype == state_dtype
    if bits == 8:  # the Trainer keeps embeddings at 32-bit state for stability
        assert optimizer.state[built.model.get_input_embeddings().weight]["state1"].dtype == torch.float32
    moved = [n for n, p in built.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert sorted(moved) == sorted(before)


def deepspeed_config(tmp_path, **sections) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                                "gradient_accumulation_steps": "auto", **sections}))
    return str(path)


def test_deepspeed_optimizer_section_rejects_an_explicit_optim_and_names_itself_otherwise(tiny_model, data_file, tmp_path, caplog):
    base = ["--model_name_or_path", tiny_model, "--dataset", data_file, "--output_dir", str(tmp_path / "o")]
    own = deepspeed_config(tmp_path, optimizer={"type": "AdamW", "params": {"lr": "auto"}},
                           scheduler={"type": "WarmupLR", "params": {}})
    with pytest.raises(train.UsageError, match='--optim adafactor would be ignored: --deepspeed .* has its own "optimizer" '
                                               r'\(AdamW\); drop --optim'):
        train.parse_arguments(base + ["--deepspeed", own, "--optim", "adafactor"])
    with pytest.raises(train.UsageError, match="--lr_scheduler_type cosine would be ignored"):
        train.parse_arguments(base + ["--deepspeed", own, "--lr_scheduler_type", "cosine"])
    with caplog.at_level(logging.WARNING):
        train.parse_arguments(base + ["--deepspeed", own])
    assert 'has its own "optimizer" (AdamW): it is used instead of --optim' in caplog.text
    _, _, args, _ = train.parse_arguments(base + ["--deepspeed", os.path.join(ROOT, "deepspeed-7b.json"), "--optim", "adafactor"])
    assert args.optim.value == "adafactor"  # the repo's config has no optimizer section: --optim is used


def test_early_stopping_stops_after_patience_evaluations_without_improvement(tiny_model, tmp_path, caplog):
    """learning rate 0: the eval loss never improves after the first evaluation, so patience 2 stops at the third."""
    data = write_jsonl(tmp_path / "d.jsonl", instructions(40))
    flags = ("--bits", "32", "--lora_r", "4", "--max_steps", "20", "--per_device_train_batch_size", "2",
             "--eval_dataset_size", "8", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "no",
             "--learning_rate", "0", "--disable_tqdm", "true")
    built = build_stages(tiny_model, data, tmp_path / "o", *flags, "--early_stopping_patience", "2")
    with caplog.at_level(logging.INFO, logger="finetune"):
        built.trainer.train()
    assert built.trainer.state.global_step == 6  # evaluations at 2 (best), 4, 6 (second without improvement)
    assert "early stopping at step 6" in caplog.text
    with pytest.raises(train.UsageError, match="--early_stopping_patience 2 watches the eval loss"):
        train.parse_arguments(["--model_name_or_path", tiny_model, "--dataset", data, "--output_dir", str(tmp_path / "p"),
                               "--early_stopping_patience", "2"])
    plain = build_stages(tiny_model, data, tmp_path / "q", *flags)
    plain.trainer.train()
    assert plain.trainer.state.global_step == 20
