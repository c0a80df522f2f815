"""finetune/outputs/merging.py: the streamed merge equals peft's merge_and_unload, handles resized and tied embeddings, rebuilds the
4-bit weights for --merge_base nf4_roundtrip, verifies itself, and never leaves a partial directory behind."""

from __future__ import annotations

import glob
import json
import os

import peft
import pytest
import torch
from conftest import run, train_py
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from finetune.outputs import merging

PROBE = "Tell me about the sea. Here is a fact about the sea."


@pytest.fixture(scope="module")
def sharded_base(tiny_model, tmp_path_factory) -> str:
    """The tiny model saved in several shards, as large checkpoints are."""
    out = str(tmp_path_factory.mktemp("sharded") / "base")
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).save_pretrained(out, max_shard_size="150KB")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def random_adapter(base_dir: str, out: str, new_tokens: tuple[str, ...] = (), modules_to_save=None, seed: int = 0):
    """LoRA r=4 on every linear layer with random lora_B (so the update is not zero), saved like a training run."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if new_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(new_tokens)})
        model.resize_token_embeddings(len(tokenizer))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=modules_to_save,
                             task_type="CAUSAL_LM")
    adapted = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    adapted.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return adapted.eval(), tokenizer


def logits(model, tokenizer, text: str = PROBE) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_streamed_merge_equals_peft_merge_and_unload_and_keeps_the_shards(sharded_base, tmp_path):
    adapted, _ = random_adapter(sharded_base, str(tmp_path / "adapter"))
    out = tmp_path / "merged"
    report = merging.merge_adapter(sharded_base, str(tmp_path / "adapter"), str(out), torch.float32)
    assert report == {}  # no verification asked

    base_shards = sorted(os.path.basename(p) for p in glob.glob(f"{sharded_base}/*.safetensors"))
    assert len(base_shards) >= 2 and sorted(p.name for p in out.glob("*.safetensors")) == base_shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = {name: shard for shard in base_shards for name in load_file(str(out / shard))}
    assert index["weight_map"] == stored

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    reference = adapted.merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    assert max((merged[k] - reference[k]).abs().max().item() for k in merged) <= 1e-5
    base = AutoModelForCausalLM.from_pretrained(sharded_base, dtype=torch.float32).state_dict()
    assert max((merged[k] - base[k]).abs().max().item() for k in merged) > 1e-3  # the update really landed
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert (out / "tokenizer_config.json").exists() and (out / "generation_config.json").exists()


def test_resized_vocabulary_keeps_the_trained_embedding_rows(sharded_base, tmp_path):
    adapted, tokenizer = random_adapter(sharded_base, str(tmp_path / "adapter"), new_tokens=("<|a|>", "<|b|>"),
                                        modules_to_save=["embed_tokens", "lm_head"])
    out = tmp_path / "merged"
    merging.merge_adapter(sharded_base, str(tmp_path / "adapter"), str(out), torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(tokenizer)
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer)
    trained = adapted.base_model.model.model.embed_tokens.modules_to_save["default"].weight
    assert torch.equal(merged.get_input_embeddings().weight, trained)
    text = PROBE + " <|a|> <|b|>"
    assert (logits(merged, tokenizer, text) - logits(adapted, tokenizer, text)).abs().max().item() <= 1e-4
    assert len(AutoTokenizer.from_pretrained(out)) == len(tokenizer)  # the adapter's tokenizer went along


def test_tied_embeddings_stay_tied_unless_the_adapter_changes_one_side(tiny_model, tmp_path):
    config = LlamaConfig.from_pretrained(tiny_model, tie_word_embeddings=True)
    torch.manual_seed(1)
    tied_base = str(tmp_path / "tied")
    LlamaForCausalLM(config).save_pretrained(tied_base)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tied_base)

    plain, tokenizer = random_adapter(tied_base, str(tmp_path / "plain"))
    merging.merge_adapter(tied_base, str(tmp_path / "plain"), str(tmp_path / "m1"), torch.float32)
    assert json.loads((tmp_path / "m1" / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(str(tmp_path / "m1" / "model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m1", dtype=torch.float32)
    assert (logits(merged, tokenizer) - logits(plain, tokenizer)).abs().max().item() <= 1e-4

    # separately trained copies of the embedding and the head (peft's modules_to_save): the merge must untie them
    split, tokenizer = random_adapter(tied_base, str(tmp_path / "split"), modules_to_save=["embed_tokens", "lm_head"])
    merging.merge_adapter(tied_base, str(tmp_path / "split"), str(tmp_path / "m2"), torch.float32)
    assert json.loads((tmp_path / "m2" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m2", dtype=torch.float32)
    assert (logits(merged, tokenizer) - logits(split, tokenizer)).abs().max().item() <= 1e-4


def test_nf4_roundtrip_merges_into_the_weights_training_saw_and_the_verification_shows_it(sharded_base, tmp_path):
    import bitsandbytes.functional as bnb_functional

    adapter = tmp_path / "adapter"
    adapted, _ = random_adapter(sharded_base, str(adapter))
    merging.BaseLoading(bits=4, dtype="float32", quant_type="nf4", double_quant=True).save(str(adapter))
    reports = {}
    for merge_base in ("original", "nf4_roundtrip"):
        reports[merge_base] = merging.merge_adapter(sharded_base, str(adapter), str(tmp_path / merge_base), torch.float32,
                                                    merge_base=merge_base, verify_samples=2)
        written = json.loads((tmp_path / merge_base / "merge_verification.json").read_text())
        assert written == reports[merge_base] and written["samples"] == 2 and written["merge_base"] == merge_base
        assert "4-bit nf4" in written["reference"] and written["perplexity_merged"] > 1

    weights = {name: load_file(path) for name in ("original", "nf4_roundtrip") for path in glob.glob(f"{tmp_path / name}/*.safetensors")
               if "model.layers.0.self_attn.q_proj.weight" in load_file(path)}
    name = "model.layers.0.self_attn.q_proj.weight"
    base = AutoModelForCausalLM.from_pretrained(sharded_base, dtype=torch.float32).state_dict()
    delta = adapted.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default")
    packed, state = bnb_functional.quantize_4bit(base[name], blocksize=64, compress_statistics=True, quant_type="nf4")
    assert (weights["nf4_roundtrip"][name] - (bnb_functional.dequantize_4bit(packed, state) + delta)).abs().max() <= 1e-6
    assert (weights["original"][name] - (base[name] + delta)).abs().max() <= 1e-6
    assert (weights["nf4_roundtrip"][name] - weights["original"][name]).abs().max() > 1e-3
    roundtrip_head = load_file(glob.glob(f"{tmp_path / 'nf4_roundtrip'}/*.safetensors")[0])  # any shard
    for key, value in roundtrip_head.items():
        if "embed" in key or "head" in key or "norm" in key:  # never quantized in training: untouched
            assert torch.equal(value, base[key])

    # the 4-bit base + adapter (what was trained) is what nf4_roundtrip reproduces; original is measurably off
    assert reports["nf4_roundtrip"]["max_abs_logit_diff"] <= 1e-3
    assert reports["original"]["max_abs_logit_diff"] > 10 * reports["nf4_roundtrip"]["max_abs_logit_diff"]


def test_nf4_roundtrip_refuses_an_adapter_trained_on_a_16_bit_base(sharded_base, tmp_path):
    adapter = tmp_path / "adapter"
    random_adapter(sharded_base, str(adapter))
    merging.BaseLoading(bits=16, dtype="bfloat16").save(str(adapter))
    with pytest.raises(merging.MergeError, match="use --merge_base original"):
        merging.merge_adapter(sharded_base, str(adapter), str(tmp_path / "m"), torch.float32, merge_base="nf4_roundtrip")
    assert not (tmp_path / "m").exists()


def test_a_failure_midway_leaves_no_partial_merge_and_keeps_the_old_one(sharded_base, tmp_path, monkeypatch):
    random_adapter(sharded_base, str(tmp_path / "adapter"))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier merge
    real, calls = merging.materialize, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 12:  # a few shards in
            raise OSError("disk unplugged")
        return real(*args)

    monkeypatch.setattr(merging, "materialize", failing)
    with pytest.raises(OSError, match="disk unplugged"):
        merging.merge_adapter(sharded_base, str(tmp_path / "adapter"), str(out), torch.float32)
    assert len(calls) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]  # no .tmp-/.old- directory left
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"


def test_merge_only_command_merges_without_a_dataset(sharded_base, tmp_path):
    adapted, tokenizer = random_adapter(sharded_base, str(tmp_path / "adapter"), new_tokens=("<|a|>",),
                                        modules_to_save=["embed_tokens", "lm_head"])
    out = tmp_path / "merged"
    result = run(train_py("--merge_only", "--model_name_or_path", sharded_base, "--output_dir", str(tmp_path / "adapter"),
                          "--merged_output_dir", str(out), "--bf16", "--bits", "16", "--merge_verify_samples", "1"),
                 cwd=str(tmp_path))
    assert result.returncode == 0, result.output[-3000:]
    assert "merge check on 1 samples (built-in text)" in result.output and "Traceback" not in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["vocab_size"] == len(tokenizer)
    report = json.loads((out / "merge_verification.json").read_text())
    assert report["reference"] == "base loaded as float32 + adapter" and report["argmax_agreement"] >= 0.9
    assert report["max_abs_logit_diff"] < 0.5  # bf16 rounding of the merged weights only
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (logits(merged, tokenizer) - logits(adapted, tokenizer)).abs().max().item() < 0.5
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(  # the adapter dir is only read
        ["adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json"])


def test_a_pytorch_bin_base_is_streamed_into_safetensors(sharded_base, tmp_path):
    """Old checkpoints ship only pytorch_model.bin (transformers 5 no longer writes it: torch.save stands in)."""
    bin_base = tmp_path / "bin_base"
    model = AutoModelForCausalLM.from_pretrained(sharded_base, dtype=torch.float32)
    model.config.save_pretrained(bin_base)
    torch.save(model.state_dict(), bin_base / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(sharded_base).save_pretrained(bin_base)
    random_adapter(sharded_base, str(tmp_path / "adapter"))
    for base, out in ((str(bin_base), "from_bin"), (sharded_base, "from_safetensors")):
        merging.merge_adapter(base, str(tmp_path / "adapter"), str(tmp_path / out), torch.float32)
    assert [p.name for p in (tmp_path / "from_bin").glob("*.safetensors")] == ["model.safetensors"]
    from_bin = load_file(str(tmp_path / "from_bin" / "model.safetensors"))
    from_safetensors = AutoModelForCausalLM.from_pretrained(tmp_path / "from_safetensors", dtype=torch.float32).state_dict()
    assert from_bin.keys() == from_safetensors.keys()
    assert all(torch.equal(from_bin[k], from_safetensors[k]) for k in from_bin)


def test_rank_0_merges_alone_under_a_zero3_config_with_the_runs_rope_scaling(sharded_base, tmp_path):
    """Under ZeRO-3 transformers builds every model through deepspeed.zero.Init, a collective: rank 0 merging (and
    verifying) alone after training must not. The run's RoPE override goes into the merged config."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    import train
    from finetune.outputs.finishing import merge_adapter
    from finetune.run_paths import RunPaths

    random_adapter(sharded_base, str(tmp_path / "adapter"))
    model_args, data_args, args, _ = train.parse_arguments(
        ["--merge_only", "--model_name_or_path", sharded_base, "--output_dir", str(tmp_path / "adapter"),
         "--merged_output_dir", str(tmp_path / "merged"), "--bits", "32", "--merge_verify_samples", "1",
         "--rope_scaling_type", "linear", "--rope_scaling_factor", "2", "--report_to", "none"])
    paths = RunPaths.from_args(args, data_args)
    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter")
        report = merge_adapter(model_args, args, paths, tokenizer, None)
        assert is_deepspeed_zero3_enabled()  # restored for the rest of the run
    finally:
        unset_hf_deepspeed_config()
        del zero3
    assert report["max_abs_logit_diff"] < 1e-4, report  # the reference was loaded with the same RoPE scaling
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2
