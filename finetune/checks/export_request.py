"""What --export_gguf and --export_gptq can export, checked on the model's config before anything trains: the architectures and
types finetune/outputs/gguf_export.py writes, and the llama.cpp tool K-quants need."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

from finetune.errors import UsageError

BASIC_TYPES = ("f16", "bf16", "q8_0", "q4_0")
K_QUANTS = ("q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
TYPES = BASIC_TYPES + K_QUANTS
ARCHITECTURES = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
                 "Qwen2ForCausalLM": ("qwen2", False)}  # HF class -> (llama.cpp arch, q/k rows permuted)


def check_export_request(types: list[str], config) -> None:
    """Up front (before training): the architecture can be exported and K-quants have their tool."""
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    if architecture not in ARCHITECTURES:
        raise UsageError(f"--export_gguf: {architecture} cannot be exported here; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}. Drop --export_gguf (the merged model is a plain "
                         "transformers model: llama.cpp's convert_hf_to_gguf.py may know it)")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    kinds = ("default", "linear", "yarn") + (("llama3",) if ARCHITECTURES[architecture][0] == "llama" else ())
    if rope.get("rope_type", "default") not in kinds:
        raise UsageError(f"--export_gguf: RoPE type {rope['rope_type']!r} of {architecture} has no GGUF equivalent "
                         f"written here ({', '.join(kinds)} are); drop --export_gguf or the --rope_scaling flags")
    kquants = [t for t in types if t in K_QUANTS]
    if kquants and not k_quant_tool():
        raise UsageError(f"--export_gguf {' '.join(kquants)}: K-quants are made by llama.cpp's quantizer: neither "
                         "llama-cpp-python (pip install -r requirements-llamacpp.txt, or `make llamacpp`) nor "
                         "llama-quantize on PATH was found; install one, or use " + ", ".join(BASIC_TYPES))


def k_quant_tool() -> str | None:
    """llama.cpp's quantizer: its llama-quantize tool on PATH, else the same function through llama-cpp-python."""
    if shutil.which("llama-quantize"):
        return "llama-quantize"
    return "llama-cpp-python" if importlib.util.find_spec("llama_cpp") is not None else None


def check_gptq_request(bits: int, group_size: int, config) -> None:
    """Up front: the library imports, and the group size divides every linear layer's input."""
    if not os.path.isdir(os.path.join(gptq_path(), "gptqmodel")):
        raise UsageError(f"--export_gptq needs GPTQModel in {gptq_path()}: pip install --no-deps --target "
                         f"{gptq_path()} -r requirements-gptq.txt (the Makefile does it)")
    inputs = {config.hidden_size, config.intermediate_size}
    if group_size != -1 and any(size % group_size for size in inputs):
        raise UsageError(f"--gptq_group_size {group_size} does not divide the layers' input sizes {sorted(inputs)}; "
                         "pick a divisor (e.g. 32, 64, 128) or -1 (one group per column)")


def gptq_path() -> str:
    """Where GPTQModel is installed, apart from site-packages (outputs/gptq_export.py says why)."""
    return os.environ.get("FINETUNE_GPTQ_PATH") or os.path.join(sys.prefix, "gptq")
