"""GGUF export (issue 13, finetune/outputs/gguf_export.py): tiny llama / mistral-like (GQA) / qwen2-like (biases,
tied embeddings) models, byte-level BPE and sentencepiece vocabularies, every basic type, read back with gguf's
reader and checked here independently of the exporter's own verification; RoPE scaling and added tokens carried;
bad requests refused before any work with nothing half-written; and the whole path through train.py."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch
from conftest import LLAMA2_TOKENIZER, instructions, sentencepiece_tokenizer_dir, write_jsonl
from transformers import AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

import train
from finetune.errors import UsageError
from finetune.outputs import gguf_export

TYPES = ["f16", "bf16", "q8_0", "q4_0"]


def field(reader, key):
    found = reader.get_field(key)
    return None if found is None else found.contents()


def save_model(folder, config, tokenizer) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def config_for(kind: str, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    if kind == "mistral":
        return MistralConfig(**common, num_key_value_heads=2, sliding_window=None, architectures=["MistralForCausalLM"])
    if kind == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
    return LlamaConfig(**common, num_key_value_heads=4, architectures=["LlamaForCausalLM"],
                       rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_every_type_reads_back_as_the_model_with_its_tokenizer_and_metadata(tmp_path, tiny_tokenizer, kind):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
                                 replace_extra_special_tokens=False)  # added tokens, as chatml adds them
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model_dir = save_model(tmp_path / kind, config_for(kind, len(tokenizer)), tokenizer)
    out = gguf_export.export_gguf(model_dir, TYPES, tokenizer, end_of_turn=end, system_prompt="Be brief.",
                                  sample_texts=["Say the number 7.", "<|im_start|>user\nhi<|im_end|>"])
    assert sorted(os.listdir(out)) == sorted([f"{kind}-{t.upper()}.gguf" for t in TYPES] +
                                             ["Modelfile", "export_verification.json"])
    assert not any(name.startswith("gguf.tmp") for name in os.listdir(model_dir))
    from safetensors.torch import load_file

    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    for wanted in TYPES:
        reader = gguf.GGUFReader(os.path.join(out, f"{kind}-{wanted.upper()}.gguf"))
        arch = "qwen2" if kind == "qwen2" else "llama"
        assert field(reader, "general.architecture") == arch
        assert field(reader, f"{arch}.context_length") == 256 and field(reader, f"{arch}.block_count") == 2
        assert field(reader, f"{arch}.attention.head_count_kv") == (4 if kind == "llama" else 2)
        if kind == "llama":  # RoPE scaling carried
            assert field(reader, "llama.rope.scaling.type") == "linear" and field(reader, "llama.rope.scaling.factor") == 2.0
        tokens = field(reader, "tokenizer.ggml.tokens")
        types = field(reader, "tokenizer.ggml.token_type")
        assert len(tokens) == len(tokenizer) and tokens[end] == "<|im_end|>" and types[end] == gguf.TokenType.CONTROL
        assert field(reader, "tokenizer.ggml.eot_token_id") == end
        assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
        assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
        assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template
        assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.merges")
        stored = {t.name: t for t in reader.tensors}
        assert ("output.weight" in stored) == (kind != "qwen2")  # tied: llama.cpp reuses token_embd
        if kind == "qwen2":
            assert "blk.0.attn_q.bias" in stored and stored["blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
        # an independent read of one weight: v_proj is not permuted, so it equals the checkpoint's
        v = stored["blk.1.attn_v.weight"]
        decoded = gguf.quants.dequantize(v.data, v.tensor_type).reshape(list(reversed(v.shape)))
        original = weights["model.layers.1.self_attn.v_proj.weight"].float().numpy()
        tolerance = {"f16": 1e-3, "bf16": 8e-3, "q8_0": 5e-3, "q4_0": 0.13}[wanted]
        assert np.abs(decoded - original).max() <= tolerance * np.abs(original).max()
    report = json.load(open(os.path.join(out, "export_verification.json")))["verification"]
    for wanted in TYPES:
        entry = report[f"{kind}-{wanted.upper()}.gguf"]
        assert entry["tokenizer"]["equal"] == entry["tokenizer"]["texts"] > 4
        if wanted in ("f16", "bf16", "q8_0"):
            assert entry["logits"]["top1_agree"] == 4
        native = entry["llama_cpp"]  # llama.cpp itself (make test installs llama-cpp-python)
        assert native["tokenizer_equal"] == 4 and native["end_of_generation"] == {
            str(tokenizer.eos_token_id): True, str(end): True}
        if wanted in ("f16", "bf16", "q8_0"):
            assert native["top1_agree"] == 4 and native["max_abs_diff"] < {"f16": 1e-3, "bf16": 1e-2, "q8_0": 5e-2}[wanted]
    assert report[f"{kind}-F16.gguf"]["tensors"]["worst"]["F16"] == 0.0  # exactly the cast
    assert 0 < report[f"{kind}-Q4_0.gguf"]["tensors"]["worst"]["Q4_0"] <= gguf_export.gguf_verify.BLOCK_BOUNDS["q4_0"]
    modelfile = open(os.path.join(out, "Modelfile")).read()
    assert modelfile.startswith(f"FROM ./{kind}-F16.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """Be brief."""' in modelfile


@pytest.mark.skipif(not os.path.isfile(LLAMA2_TOKENIZER), reason="needs ../shared/data/tokenizers/llama2")
def test_a_sentencepiece_vocabulary_is_written_as_llamas_with_scores_and_byte_tokens(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(sentencepiece_tokenizer_dir(LLAMA2_TOKENIZER, tmp_path))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, architectures=["LlamaForCausalLM"])
    model_dir = save_model(tmp_path / "spm", config, tokenizer)
    out = gguf_export.export_gguf(model_dir, ["q8_0"], tokenizer, sample_texts=["Hello world.", " two  spaces", "ümlaut 42"])
    reader = gguf.GGUFReader(os.path.join(out, "spm-Q8_0.gguf"))
    assert field(reader, "tokenizer.ggml.model") == "llama"
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    assert types[tokenizer.unk_token_id] == gguf.TokenType.UNKNOWN
    report = json.load(open(os.path.join(out, "export_verification.json")))["verification"]["spm-Q8_0.gguf"]
    assert report["tokenizer"]["equal"] == report["tokenizer"]["texts"]


def test_bad_requests_stop_before_any_work_and_leave_nothing(tmp_path, tiny_model, tiny_tokenizer, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", instructions(4))
    base = ["--model_name_or_path", tiny_model, "--dataset", data, "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit):  # argparse: not a type
        train.parse_arguments([*base, "--export_gguf", "q3"])
    with pytest.raises(UsageError, match="an adapter run needs --merged_output_dir"):
        train.parse_arguments([*base, "--export_gguf", "f16"])
    from finetune.checks.model_config import check_model_before_writing

    model_args, _, args, _ = train.parse_arguments([*base, "--export_gguf", "q4_k_m", "--merged_output_dir",
                                                    str(tmp_path / "m")])
    from finetune.checks import export_request

    monkeypatch.setattr(export_request, "k_quant_tool", lambda: None)  # neither llama-cpp-python nor llama-quantize
    with pytest.raises(UsageError, match="K-quants are made by llama.cpp's quantizer: neither llama-cpp-python"):
        check_model_before_writing(model_args, args, 64)
    from transformers import GPT2Config

    gpt2 = save_model(tmp_path / "gpt2", GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=1, n_head=2),
                      tiny_tokenizer)
    model_args.model_name_or_path, args.export_gguf = gpt2, ["f16"]
    with pytest.raises(UsageError, match="GPT2LMHeadModel cannot be exported here; supported: LlamaForCausalLM"):
        check_model_before_writing(model_args, args, 64)
    monkeypatch.setattr(gguf_export, "free_bytes", lambda path: 1000)
    with pytest.raises(UsageError, match=r"GiB needed next to .*, 0.00 GiB free"):
        gguf_export.export_gguf(tiny_model, ["f16", "q8_0"], tiny_tokenizer)
    assert not [name for name in os.listdir(tiny_model) if name.startswith("gguf")]


def test_train_merge_export_through_train_py(tmp_path, tiny_model):
    """A model trained until it answers and ends its turn: llama.cpp, running the exported files from the training
    prompt, generates the model's own greedy answer and stops at <|im_end|> (f16, q8_0 and a K-quant made by
    llama.cpp's quantizer through llama-cpp-python)."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": "human", "value": f"Say {i}."},
                                                                 {"from": "gpt", "value": "It is done."}]}
                                              for i in range(8)])
    merged = tmp_path / "merged"
    code = train.main(["--model_name_or_path", tiny_model, "--dataset", data, "--dataset_format", "chatml",
                       "--output_dir", str(tmp_path / "adapter"), "--merged_output_dir", str(merged), "--bits", "32",
                       "--lora_r", "16", "--lora_alpha", "32", "--learning_rate", "3e-3", "--max_steps", "40",
                       "--per_device_train_batch_size", "8", "--save_strategy", "no", "--report_to", "none",
                       "--merge_verify_samples", "1", "--export_gguf", "f16", "q8_0", "q6_k", "--disable_tqdm", "true"])
    assert code == 0
    report = json.load(open(merged / "gguf" / "export_verification.json"))
    assert report["files"]["merged-Q6_K.gguf"]["made_by"] in ("llama-cpp-python", "llama-quantize")
    for name in ("merged-F16.gguf", "merged-Q8_0.gguf", "merged-Q6_K.gguf"):
        entry = report["verification"][name]
        assert entry["tokenizer"]["texts"] >= 12 and entry["tokenizer"]["equal"] == entry["tokenizer"]["texts"]
        assert entry["metadata"]["chat_template"] is True  # the verified chatml template travels in the file
        native = entry["llama_cpp"]
        assert native["greedy_prompt"] == "training sample" and native["greedy_stopped_at_end_token"], (name, native)
        assert native["greedy_equals_model"] and native["greedy_text"].strip() == "It is done.<|im_end|>", native
    assert set(report["verification"]["merged-Q6_K.gguf"]["tensors"]["worst"]) - {"F32"}  # quantized tensors
    assert 'PARAMETER stop "<|im_end|>"' in (merged / "gguf" / "Modelfile").read_text()
    assert (tmp_path / "adapter" / "completed").exists()


def test_k_quants_are_made_by_llama_cpps_quantizer_and_read_back_close_to_the_model(tmp_path, tiny_tokenizer):
    """Rows of 256 (a K-quant super-block), so q4_k_m / q6_k really use K-quant blocks rather than the fallbacks."""
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256, architectures=["LlamaForCausalLM"])
    model_dir = save_model(tmp_path / "k", config, tiny_tokenizer)
    out = gguf_export.export_gguf(model_dir, ["q4_k_m", "q6_k"], tiny_tokenizer, sample_texts=["Hello world."])
    report = json.load(open(os.path.join(out, "export_verification.json")))
    assert sorted(report["files"]) == ["k-Q4_K_M.gguf", "k-Q6_K.gguf"]  # the f16 step file is not kept
    q6, q4 = report["verification"]["k-Q6_K.gguf"], report["verification"]["k-Q4_K_M.gguf"]
    assert "Q6_K" in q6["tensors"]["worst"] and "Q4_K" in q4["tensors"]["worst"]  # K-quant blocks, read back
    assert q6["tensors"]["worst"]["Q6_K"] < 0.03 and q4["tensors"]["worst"]["Q4_K"] < 0.12  # relative RMS error
    for entry in (q6, q4):
        assert entry["tokenizer"]["equal"] == entry["tokenizer"]["texts"]
        assert entry["llama_cpp"]["tokenizer_equal"] == 4
    assert q6["llama_cpp"]["top1_agree"] >= 3 and q6["logits"]["top1_agree"] >= 3
    reader = gguf.GGUFReader(os.path.join(out, "k-Q6_K.gguf"))
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q6_K)


def test_llama3_rope_scaling_travels_as_llamacpps_rope_freqs(tmp_path, tiny_tokenizer):
    """Llama 3.1's RoPE: the per-frequency divisors in rope_freqs equal transformers' own llama3 frequencies, and
    llama.cpp running the file reproduces the model's logits (an original context of 16 makes the scaling act on
    most frequencies of these short prompts, so a missing or wrong factor would show)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 10000.0}
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=256, architectures=["LlamaForCausalLM"],
                         rope_parameters=rope)
    model_dir = save_model(tmp_path / "l3", config, tiny_tokenizer)
    out = gguf_export.export_gguf(model_dir, ["f16"], tiny_tokenizer, sample_texts=["Hello world."])
    reader = gguf.GGUFReader(os.path.join(out, "l3-F16.gguf"))
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    plain = 1.0 / (10000.0 ** (np.arange(0, 32, 2) / 32))
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoModelForCausalLM.from_pretrained(model_dir).config, "cpu")
    assert np.allclose(plain / factors, inv_freq.numpy(), rtol=1e-5) and 1 <= factors.min() < factors.max() == 8.0
    native = json.load(open(os.path.join(out, "export_verification.json")))["verification"]["l3-F16.gguf"]["llama_cpp"]
    assert native["top1_agree"] == 4 and native["max_abs_diff"] < 1e-3, native
    default = AutoModelForCausalLM.from_pretrained(model_dir, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 10000.0})
    scaled = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # on the prompts llama.cpp was checked on, the scaling moves logits far more than f16 does
        moved = max(float((default(input_ids=ids).logits[0, -1] - scaled(input_ids=ids).logits[0, -1]).abs().max())
                    for ids in (torch.tensor([tiny_tokenizer(p)["input_ids"]]) for p in gguf_export.gguf_verify.VERIFY_PROMPTS))
    print(f"llama3 RoPE: llama.cpp max |diff| {native['max_abs_diff']:.2e}, default RoPE moves logits {moved:.2e}")
    long_prompt = tiny_tokenizer("a b c d " * 80)["input_ids"]  # > 256 tokens: llama.cpp's context grows to fit
    assert len(long_prompt) > 256
    greedy = gguf_export.gguf_verify.check_llama_cpp(os.path.join(out, "l3-F16.gguf"), scaled, tiny_tokenizer,
                                                     ["Hello"], prompt_ids=long_prompt)
    assert greedy["greedy_prompt"] == "training sample" and greedy["greedy_tokens"] > 0
    assert moved > 5 * native["max_abs_diff"], (moved, native["max_abs_diff"])
