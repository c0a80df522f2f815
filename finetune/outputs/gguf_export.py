"""GGUF export (--export_gguf): the merged model (or a full fine-tune's) -> <model dir>/gguf/<name>-<TYPE>.gguf for
llama.cpp, Ollama and LM Studio, through the `gguf` package (its writer, tensor-name map, token types, SpecialVocab
and quantizers), then read back and checked against the model it came from (export_verification.json), with an
Ollama Modelfile beside it.

- Streamed like the merge: every tensor's info is declared first, then each tensor is read from the checkpoint,
  converted and written before the next is read, so memory holds about one tensor, not the model.
- Architectures: llama and mistral (llama.cpp's "llama": q/k rows permuted as its converter does) and qwen2 (no
  permute, q/k/v biases kept); anything else is refused before any work.
- Types: f16, bf16, q8_0, q4_0 (the gguf package's quantizers); 1-D tensors, norms and biases stay f32, as
  llama.cpp's converter keeps them; a matrix whose rows are not a multiple of 32 falls back to f16 for q8_0/q4_0.
  K-quants (q4_k_m, ...) come from llama.cpp's own quantizer, run on the f16 file: llama-cpp-python's binding
  of it (requirements-llamacpp.txt), or its `llama-quantize` tool when that is on PATH.
- Tokenizer: byte-level BPE ("gpt2": tokens, types, merges, a pre-tokenizer name) or sentencepiece ("llama":
  pieces, scores, types), BOS/EOS/pad/unk and the format's end-of-turn token, add_bos, the chat template; RoPE
  (base, linear/yarn scaling, llama3's per-frequency factors as the rope_freqs tensor) and the context length.
- Verification: every tensor read back with gguf's reader and compared with the model's (f16/bf16: equal to the
  cast; q8_0/q4_0: within the type's bound per 32-value block); the tokenizer rebuilt from the file by
  transformers' own GGUF reader must give the HF tokenizer's ids on the samples' text; the file loaded by
  transformers' GGUF loader (its own dequantization and un-permute) must give the merged model's next-token
  argmax on 4 prompts (max |logit difference| reported).
Written into <model dir>/gguf.tmp-<pid> and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import torch

from finetune.checks.export_request import ARCHITECTURES, BASIC_TYPES, K_QUANTS, check_export_request, k_quant_tool
from finetune.errors import UsageError
from finetune.fileio import free_bytes
from finetune.modeling.checkpoint_files import TensorFile, base_checkpoint_files
from finetune.outputs import gguf_verify

logger = logging.getLogger(__name__)

# llama.cpp identifies a BPE pre-tokenizer by the ids its check text gets (convert_hf_to_gguf.py); a few known ones
PRE_TOKENIZER_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
              "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
              "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
              "I'll make it, 'D you like some tea? We'Ve a'lL")


def gguf_module():
    try:
        import gguf
    except ImportError as error:
        raise UsageError("--export_gguf needs the gguf package: pip install -r requirements.txt") from error
    return gguf


@dataclass
class Layout:
    arch: str
    permute: bool
    config: object
    names: list[tuple[str, str, TensorFile]]  # (HF name, GGUF name, file holding it), in writing order

    def tensor(self, name: str, tensors: TensorFile) -> np.ndarray:
        """The tensor as llama.cpp wants it: fp32 numpy, q/k rows permuted for llama's rotary layout (the
        permute of llama.cpp's convert_hf_to_gguf.py)."""
        value = tensors.read(name).to(torch.float32).numpy()
        config = self.config
        if self.permute and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_attention_heads
            if ".k_proj." in name:
                heads = getattr(config, "num_key_value_heads", None) or heads
            value = (value.reshape(heads, 2, value.shape[0] // heads // 2, *value.shape[1:]).swapaxes(1, 2)
                     .reshape(value.shape))
        return value


class ComputedTensors:
    """Tensors the GGUF file needs that no checkpoint holds (llama3 RoPE's rope_freqs), read like a TensorFile."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.names = list(tensors)

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)


def llama3_rope_factors(config) -> torch.Tensor:
    """Llama 3.1's RoPE scaling as llama.cpp takes it: a divisor per rotary frequency in the rope_freqs tensor (1
    for high frequencies, `factor` for low ones, smoothed between; transformers' llama3 rule)."""
    rope = dict(config.rope_parameters)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (float(rope.get("rope_theta", 10000.0)) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    factor, low, high = float(rope["factor"]), float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    context = float(rope.get("original_max_position_embeddings") or 8192)
    wavelength = 2 * math.pi / freqs
    smooth = ((context / wavelength - low) / (high - low)).clamp(0, 1)
    divisor = 1 / ((1 - smooth) / factor + smooth)
    divisor = torch.where(wavelength < context / high, torch.ones_like(divisor), divisor)
    return torch.where(wavelength > context / low, torch.full_like(divisor, factor), divisor).to(torch.float32)


def model_layout(model_dir: str):
    import transformers

    gguf = gguf_module()
    config = transformers.AutoConfig.from_pretrained(model_dir)
    check_export_request([], config)
    arch, permute = ARCHITECTURES[config.architectures[0]]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                        config.num_hidden_layers)
    names = []
    for path, _ in base_checkpoint_files(model_dir):
        tensors = TensorFile(path)
        for name in tensors.names:
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings):
                continue  # recomputed by llama.cpp / the embedding is the output head there
            target = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise UsageError(f"--export_gguf: tensor {name} of {model_dir} has no GGUF name for {arch}")
            names.append((name, target, tensors))
    if dict(getattr(config, "rope_parameters", None) or {}).get("rope_type") == "llama3":
        target = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        names.append(("rope_freqs", target, ComputedTensors({"rope_freqs": llama3_rope_factors(config)})))
    return Layout(arch, permute, config, names)


def tensor_type(gguf, name: str, shape: tuple[int, ...], wanted: str):
    """gguf's type for this tensor: f32 for 1-D tensors, norms and biases; f16 where rows do not fill blocks."""
    qt = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return qt.F32
    chosen = {"f16": qt.F16, "bf16": qt.BF16, "q8_0": qt.Q8_0, "q4_0": qt.Q4_0}[wanted]
    block = gguf.GGML_QUANT_SIZES[chosen][0]
    return chosen if shape[-1] % block == 0 else qt.F16


def encode(gguf, value: np.ndarray, kind) -> np.ndarray:
    qt = gguf.GGMLQuantizationType
    if kind == qt.F32:
        return value.astype(np.float32)
    if kind == qt.F16:
        if np.abs(value).max(initial=0) >= 65504:
            raise UsageError("--export_gguf f16: a weight exceeds float16's range (65504); export bf16 instead")
        return value.astype(np.float16)
    return gguf.quants.quantize(value, kind)


def byte_count(gguf, shape: tuple[int, ...], kind) -> int:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size if shape else size


# --- the tokenizer ---------------------------------------------------------------------------------------------------


def add_tokenizer(gguf, writer, tokenizer, tokenizer_dir: str, vocab_rows: int, end_of_turn: int | None) -> None:
    """Vocabulary (padded to the embedding rows), token types, merges or scores, special ids, chat template.
    Byte-fallback BPE (a sentencepiece vocabulary such as Llama-2's or Mistral's, as transformers saves it) is
    written as llama.cpp's "llama" model with scores from the merge order (id order); byte-level BPE as "gpt2"."""
    if not tokenizer.is_fast:
        raise UsageError("--export_gguf needs a fast tokenizer (tokenizer.json); this one is a slow "
                         f"{type(tokenizer).__name__}")
    token_type = gguf.TokenType
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if backend.get("type") != "BPE":
        raise UsageError(f"--export_gguf: a {backend.get('type')} tokenizer model is not written here (BPE is)")
    spm = bool(backend.get("byte_fallback"))
    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_rows:
        raise UsageError(f"--export_gguf: the tokenizer has {len(by_id)} tokens but the model {vocab_rows} embedding rows")
    tokens, types, scores = [], [], []
    for index in range(vocab_rows):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(token_type.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(token_type.UNKNOWN if token == tokenizer.unk_token else token_type.CONTROL
                         if added[token].special else token_type.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(token_type.BYTE if spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
                         else token_type.NORMAL)
        scores.append(-float(index) if types[-1] in (token_type.NORMAL, token_type.USER_DEFINED) else 0.0)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    writer.add_tokenizer_pre("default" if spm else pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    if spm:
        writer.add_token_scores(scores)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=not spm, n_vocab=len(tokens),
                                special_token_types=("bos", "eos", "unk", "pad"))
    if not spm and not special.merges:
        raise UsageError("--export_gguf: the BPE tokenizer has no merges in tokenizer.json; llama.cpp needs them")
    special.add_to_gguf(writer)
    if end_of_turn is not None:
        writer.add_eot_token_id(int(end_of_turn))


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for how this BPE vocabulary splits text before merging: a known vocabulary by the ids of
    llama.cpp's check text, else GPT-2's byte-level split when that is what the tokenizer does, else 'default'."""
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZER_HASHES:
        return PRE_TOKENIZER_HASHES[digest]
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    logger.warning("--export_gguf: this BPE pre-tokenizer is not one llama.cpp knows by name; written as 'default' "
                   "(llama.cpp may split some text differently from the HF tokenizer)")
    return "default"


# --- writing -----------------------------------------------------------------------------------------------------------


def add_model_keys(gguf, writer, layout: Layout, file_type, name: str) -> None:
    config = layout.config
    rope = dict(getattr(config, "rope_parameters", None) or {})
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_vocab_size(int(config.vocab_size))
    if getattr(config, "head_dim", None):
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    kind = rope.get("rope_type", "default")
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if kind == "yarn":
            writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                                     or config.max_position_embeddings / rope["factor"]))


def write_file(path: str, layout: Layout, wanted: str, tokenizer, tokenizer_dir: str, end_of_turn) -> dict:
    """One GGUF file, streamed; returns the count of tensors per GGUF type."""
    gguf = gguf_module()
    file_types = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
    writer = gguf.GGUFWriter(path=None, arch=layout.arch)
    add_model_keys(gguf, writer, layout, getattr(gguf.LlamaFileType, file_types[wanted]), os.path.basename(path))
    add_tokenizer(gguf, writer, tokenizer, tokenizer_dir, int(layout.config.vocab_size), end_of_turn)
    kinds, counts = [], {}
    for name, target, tensors in layout.names:
        shape = tensors.shape(name)
        kind = tensor_type(gguf, target, shape, wanted)
        kinds.append(kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
        writer.add_tensor_info(target, shape, np.float32, byte_count(gguf, shape, kind), raw_dtype=kind)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (name, _, tensors), kind in zip(layout.names, kinds):
        writer.write_tensor_data(encode(gguf, layout.tensor(name, tensors), kind))
    writer.close()
    return counts


def export_gguf(model_dir: str, types: list[str], tokenizer, end_of_turn: int | None = None,
                system_prompt: str | None = None, sample_texts: list[str] | None = None,
                prompt_ids: list[int] | None = None) -> str:
    """All requested GGUF files of the model in `model_dir` (its tokenizer saved there too), verified, with an
    Ollama Modelfile, in <model_dir>/gguf. Returns that directory."""
    layout = model_layout(model_dir)
    check_export_request(types, layout.config)
    name = os.path.basename(os.path.abspath(model_dir))
    final = os.path.join(model_dir, "gguf")
    staging = f"{final}.tmp-{os.getpid()}"
    weights = sum(int(np.prod(t.shape(n), dtype=np.int64)) for n, _, t in layout.names)
    needed = weights * sum({"bf16": 2, "q8_0": 1.07, "q4_0": 0.57}.get(t, 2) for t in types)
    needed += weights * 2 * any(t in K_QUANTS for t in types) * ("f16" not in types)
    if free_bytes(model_dir) < needed * 1.05:
        raise UsageError(f"--export_gguf {' '.join(types)}: about {needed / 2**30:.2f} GiB needed next to {model_dir}, "
                         f"{free_bytes(model_dir) / 2**30:.2f} GiB free; free some space or export fewer types")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        report = {"model": model_dir, "architecture": layout.arch, "files": {}}
        basic = [t for t in types if t in BASIC_TYPES] + (["f16"] if any(t in K_QUANTS for t in types)
                                                           and "f16" not in types else [])
        for wanted in basic:
            path = os.path.join(staging, f"{name}-{wanted.upper()}.gguf")
            counts = write_file(path, layout, wanted, tokenizer, model_dir, end_of_turn)
            report["files"][os.path.basename(path)] = {"type": wanted, "tensor_types": counts, "bytes": os.path.getsize(path)}
            logger.info("GGUF %s written: %s (%.1f MiB)", wanted, path, os.path.getsize(path) / 2**20)
        for wanted in (t for t in types if t in K_QUANTS):
            path = os.path.join(staging, f"{name}-{wanted.upper()}.gguf")
            tool = k_quantize(os.path.join(staging, f"{name}-F16.gguf"), path, wanted)
            report["files"][os.path.basename(path)] = {"type": wanted, "bytes": os.path.getsize(path), "made_by": tool}
            logger.info("GGUF %s written by %s: %s (%.1f MiB)", wanted, tool, path, os.path.getsize(path) / 2**20)
        if "f16" not in types and any(t in K_QUANTS for t in types):
            os.remove(os.path.join(staging, f"{name}-F16.gguf"))
            report["files"].pop(f"{name}-F16.gguf")
        report["verification"] = gguf_verify.verify_files(staging, layout, tokenizer, model_dir,
                                                          sample_texts or [], [t for t in types if t in BASIC_TYPES],
                                                          prompt_ids)
        first = next(iter(report["files"]))
        write_modelfile(os.path.join(staging, "Modelfile"), first, tokenizer, end_of_turn, system_prompt)
        with open(os.path.join(staging, "export_verification.json"), "w") as handle:
            json.dump(report, handle, indent=2)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    logger.info("GGUF export in %s (export_verification.json; `ollama create %s -f %s/Modelfile`)", final, name, final)
    return final


def k_quantize(source: str, target: str, wanted: str) -> str:
    """A K-quant file from the f16 one by llama.cpp's own quantizer (its mixes: q4_k_m keeps some tensors at q6_k;
    a matrix whose rows are not a multiple of 256 gets llama.cpp's fallback type). Returns the tool used."""
    tool = k_quant_tool()
    if tool == "llama-quantize":
        result = subprocess.run(["llama-quantize", source, target, wanted.upper()], capture_output=True, text=True)
        if result.returncode:
            raise UsageError(f"--export_gguf {wanted}: llama-quantize failed: {result.stderr.strip()[-500:]}")
        return tool
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{wanted.upper()}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params)) != 0:
        raise UsageError(f"--export_gguf {wanted}: llama.cpp's quantizer (llama-cpp-python) failed on {source}")
    return tool or "llama-cpp-python"


def write_modelfile(path: str, gguf_name: str, tokenizer, end_of_turn: int | None, system_prompt: str | None) -> None:
    """Ollama: FROM the first file, stop at the end tokens, the format's default system prompt if it has one."""
    stops = [tokenizer.eos_token] + ([tokenizer.convert_ids_to_tokens(end_of_turn)] if end_of_turn is not None else [])
    lines = [f"FROM ./{gguf_name}"] + [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(stops) if stop]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
