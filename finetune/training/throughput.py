"""How fast a run uses its hardware: model FLOPs per token, MFU next to tokens/s, a FLOP counter and a profiler.

Measurement, not training: it only reads the model and the data; FinetuneTrainer.log extends its log lines with it
(tokens_per_second -> mfu), and the FLOP counter and profiler callbacks live in training/callbacks.py.

The FLOPs are *model* FLOPs (what the architecture needs per trained token), not hardware FLOPs: padding,
activation-checkpointing recompute and 4-bit dequantization are not counted, as in the PaLM paper's MFU.
Model FLOPs per trained token = 2N (forward) + 2N (backward to the activations) + 2N_trained (backward to the
trained weights) + 12*L*H*T (attention, PaLM appendix B): N = the weights of all linear layers (output head
included, embedding lookup not, 4-bit layers at full size), L layers, H = heads x head dim, T = the mean attention
context per token. That is 6N + 12LHT for a full fine-tune and ~4N + 12LHT for LoRA on a frozen base.
mfu = tokens/s x model FLOPs per token / (processes x --peak_tflops).
"""

from __future__ import annotations

import logging
from typing import Optional

from finetune.config.precision import matmul_dtype

logger = logging.getLogger(__name__)

# Dense (no 2:4 sparsity) peak TFLOP/s per device from the vendors' datasheets, by training dtype.
# "float32" is plain FP32 (PyTorch does not use TF32 for matmuls unless --tf32 is given).
PEAK_TFLOPS = {
    "h100 sxm": {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9},
    "h100 pcie": {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float32": 51.2},
    "h200": {"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7, "float32": 66.9},
    "a100": {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5},
    "a10g": {"bfloat16": 125.0, "float16": 125.0, "tf32": 62.5, "float32": 31.2},  # A10 datasheet figures
    "l40s": {"bfloat16": 362.1, "float16": 362.1, "tf32": 183.0, "float32": 91.6},
    "l4": {"bfloat16": 121.0, "float16": 121.0, "tf32": 60.0, "float32": 30.3},
    "rtx 4090": {"bfloat16": 165.2, "float16": 165.2, "tf32": 82.6, "float32": 82.6},  # FP32 accumulate
    "v100 sxm": {"float16": 125.0, "float32": 15.7},
    "v100 pcie": {"float16": 112.0, "float32": 14.0},
    "t4": {"float16": 65.0, "float32": 8.1},
}
LENGTH_SAMPLE_ROWS = 1000  # rows read to estimate the attention context length


def chip_name(device_name: str) -> Optional[str]:
    """torch.cuda.get_device_name() -> a PEAK_TFLOPS key ("NVIDIA H100 80GB HBM3" -> "h100 sxm")."""
    name = device_name.lower()
    if "h100" in name:
        return "h100 pcie" if "pcie" in name else "h100 sxm" if ("hbm3" in name or "sxm" in name) else None
    for chip in ("h200", "a100", "a10g", "l40s", "rtx 4090", "t4"):
        if chip in name:
            return chip
    if "l4" in name and "l40" not in name:
        return "l4"
    if "v100" in name:
        return "v100 pcie" if "pcie" in name else "v100 sxm"
    return None


def training_dtype(args) -> str:
    return matmul_dtype(args.bf16, args.fp16, bool(args.tf32))


def peak_flops(args) -> tuple[Optional[float], str]:
    """Peak FLOP/s of one device: --peak_tflops, else the table for the local GPU; (None, why) when unknown."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, f"--peak_tflops {args.peak_tflops}"
    import torch

    if not torch.cuda.is_available():
        return None, "no GPU: pass --peak_tflops to log MFU"
    device = torch.cuda.get_device_name(args.local_process_index if args.local_process_index >= 0 else 0)
    chip, dtype = chip_name(device), training_dtype(args)
    if chip is None or dtype not in PEAK_TFLOPS[chip]:
        return None, f"no known {dtype} peak for {device!r}: pass --peak_tflops to log MFU"
    return PEAK_TFLOPS[chip][dtype] * 1e12, f"{device} ({chip}, {dtype} dense {PEAK_TFLOPS[chip][dtype]} TFLOP/s)"


def matmul_weights(model) -> tuple[int, int]:
    """(all, trainable) weights that multiply activations: every linear layer at its logical shape (a 4-bit layer
    stores half the elements), LoRA A/B included, the output head included, the embedding lookup not."""
    total = trainable = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or next(module.children(), None) is not None:
            continue
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            count = module.in_features * module.out_features
            total += count
            trainable += count if weight.requires_grad else 0
    return total, trainable


def attention_context(dataset) -> float:
    """sum(s^2) / sum(s) over the samples of the first rows: each token attends over its own sample's length
    (packed rows restart positions per sample and attention stays within it)."""
    rows = dataset.select(range(min(LENGTH_SAMPLE_ROWS, len(dataset))))
    lengths: list[int] = []
    for row in rows:
        positions = row.get("position_ids")
        if positions is None:
            lengths.append(len(row["input_ids"]))
            continue
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        lengths += [b - a for a, b in zip(starts, starts[1:]) if b > a]
    return sum(s * s for s in lengths) / max(1, sum(lengths))


def model_flops_per_token(model, context: float) -> float:
    """2N forward + 2N backward to the activations + 2N_trained backward to the trained weights (6N in a full
    fine-tune; LoRA skips the frozen weights' gradients: 4N + 6N_lora), plus attention 12·L·(heads·head_dim)·T.

    With a frozen embedding (LoRA) the first layer's q/k/v input gradients are not needed either; they stay counted
    (1/L of the attention inputs: ~0.4 % of a 7B model's 4N, 3 % of the 2-layer test model). FlopCounterMode also
    counts attention's backward as 2.5x its forward where PaLM counts 2x (tests/test_outputs.py checks both)."""
    total, trainable = matmul_weights(model)
    config = model.config
    heads = getattr(config, "num_attention_heads", 0) or 0
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    return 4 * total + 2 * trainable + 12 * layers * heads * head_dim * context


class Throughput:
    """Turns the tokens/s of a log line into MFU: tokens/s x FLOPs per token / (devices x peak FLOP/s)."""

    def __init__(self, flops_per_token: float, peak: Optional[float], world_size: int):
        self.flops_per_token = flops_per_token
        self.counted_flops_per_token: Optional[float] = None  # set by FlopCounterCallback
        self.counted_flops_per_step: Optional[float] = None
        self.peak = peak
        self.world_size = world_size

    def utilization(self, tokens_per_second: float) -> dict:
        if not self.peak:
            return {}
        per_token = self.counted_flops_per_token or self.flops_per_token
        return {"mfu": round(tokens_per_second * per_token / (self.world_size * self.peak), 5)}


def cpu_attention_formulas() -> dict:
    """FlopCounterMode knows the CUDA attention kernels but not sdpa's CPU kernel, which would count as 0."""
    import torch
    from torch.utils import flop_counter

    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    kernel_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    helpers = hasattr(flop_counter, "sdpa_flop_count") and hasattr(flop_counter, "sdpa_backward_flop_count")
    if not (kernel and kernel_backward and helpers):
        return {}
    return {kernel: count_cpu_attention, kernel_backward: count_cpu_attention_backward}


def count_cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def count_cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def measure(model, args, train_set) -> Throughput:
    """Model FLOPs per token and the peak of this device: the meter FinetuneTrainer.log turns tokens/s into MFU
    with (training/trainer.py adds the --flop_counter and --profiler_dir callbacks)."""
    peak, source = peak_flops(args)
    per_token = model_flops_per_token(model, attention_context(train_set))
    logger.info("model FLOPs per trained token: %.4g GFLOPs; MFU %s", per_token / 1e9,
                f"against {source}" if peak else f"not logged ({source})")
    return Throughput(per_token, peak, args.world_size)
