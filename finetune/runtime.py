"""Facts about the process this run is in: its rank, whether an accelerator is present, and logging set up once."""

from __future__ import annotations

import contextlib
import logging
import os


def process_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def close_process_group() -> None:
    """Destroy the process group (torchrun / accelerate runs) before the interpreter exits: a rank that finishes
    while rank 0 still merges otherwise tears down live gloo threads at exit ("terminate called without an active
    exception", exit -6), and the launcher then kills rank 0 mid-merge."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def setup_logging() -> None:
    """Rank 0 logs at INFO; the other ranks only warn, so every line appears once."""
    import transformers

    rank = process_rank()
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    transformers.utils.logging.set_verbosity(logging.WARNING if rank == 0 else logging.ERROR)
    for noisy in ("bitsandbytes", "torch.distributed", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@contextlib.contextmanager
def without_zero3_init():
    """Models built (or loaded) inside: plain modules. Under a ZeRO-3 config transformers builds every model through
    deepspeed.zero.Init, a collective that needs all ranks — wrong for an empty planning model or a rank-0 merge."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def build_deepspeed_cpu_ops() -> None:
    """On a machine without CUDA, DeepSpeed JIT-compiles its CPU ops (shared-memory allreduce, CPU Adam) on first
    use, a few minutes; `make install` builds them once into $TORCH_EXTENSIONS_DIR so no run waits for them."""
    import torch

    if torch.cuda.is_available():  # CUDA ops are built on demand against the installed toolkit
        return
    from deepspeed.accelerator import get_accelerator

    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        get_accelerator().create_op_builder(name).load()
