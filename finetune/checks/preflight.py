"""Checks of the machine and the environment, before anything loads or is written: writable directories, disk
space for checkpoints, wandb credentials, the hub (outputs/hub.py probes it), sharding combinations, the attention
kernel, and secrets kept out of what gets saved."""

from __future__ import annotations

import difflib
import logging
import os
import sys
import tempfile
from typing import Optional

from finetune.errors import UsageError
from finetune.fileio import free_bytes, nearest_existing_dir
from finetune.outputs.hub import hub_push_problem  # noqa: F401 - one of the preflight checks, kept with the hub code
from finetune.runtime import has_accelerator

logger = logging.getLogger(__name__)

FLASH_ATTN_HINT = "pip install -r requirements-gpu.txt  (flash-attn; needs CUDA and nvcc)"


def check_writable_directory(flag: str, path: Optional[str]) -> None:
    """The directory (or the nearest existing parent it would be created in) must be a writable directory."""
    if not path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file, not a directory; pick another path")
    existing = nearest_existing_dir(path)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot write in {existing} ({error.strerror}); pick a writable path") from error


def honour_ddp_timeout_on_cpu(seconds: int) -> None:
    """transformers 5.23 passes --ddp_timeout to the process group only on accelerators; on CPU (gloo) it silently
    keeps torch's 30 minutes. Under a launcher, start the gloo group here with the asked timeout (accelerate then
    uses the group as it finds it)."""
    import datetime

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=seconds))


def check_reporting(report_to) -> None:
    """Every --report_to value names an integration that is installed (transformers would fail mid-setup)."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    wanted = [name for name in report_to or [] if name != "none"]
    if not wanted:
        return  # probing every integration imports wandb and others (seconds): only done when one is asked for
    available = get_available_reporting_integrations()
    for name in wanted:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            close = difflib.get_close_matches(name, list(INTEGRATION_TO_CALLBACK), n=1)
            raise UsageError(f"--report_to {name}: not a logger transformers knows"
                             f"{f' (did you mean {close[0]}?)' if close else ''}; known: "
                             f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}, or none")
        if name not in available:
            package = {"tensorboard": "tensorboard", "comet_ml": "comet_ml", "azure_ml": "azureml-core"}.get(name, name)
            raise UsageError(f"--report_to {name}: its package is not installed here; pip install {package}, or "
                             "drop it from --report_to")
    if "wandb" in (report_to or []) and not wandb_is_configured():
        raise UsageError(
            "--report_to wandb: no WANDB_API_KEY and no `wandb login`; set WANDB_API_KEY (or put it in .env), or "
            "WANDB_MODE=offline to log locally, or drop --report_to wandb"
        )


def wandb_is_configured() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    if not os.path.isfile(netrc):
        return False
    with open(netrc) as handle:
        return "api.wandb.ai" in handle.read()


def fsdp_requested(args) -> bool:
    """--fsdp, or `accelerate launch` with an FSDP config (which reaches the Trainer through the environment)."""
    return bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def deepspeed_settings(args) -> dict:
    """ZeRO stage and offloads of --deepspeed ({} without it), from the config the TrainingArguments already read."""
    if not args.deepspeed:
        return {}
    zero = args.hf_deepspeed_config.config.get("zero_optimization", {})
    offload = lambda key: (zero.get(key) or {}).get("device", "none") not in ("none", None)  # noqa: E731
    return {"stage": int(zero.get("stage", 0)), "offload_optimizer": offload("offload_optimizer"),
            "offload_param": offload("offload_param")}


def check_sharding(args) -> None:
    """Combinations of DeepSpeed / FSDP with quantization that would crash late or silently do something else."""
    from finetune.config.precision import Precision

    fsdp = fsdp_requested(args)
    if fsdp and not has_accelerator() and not args.dry_run:  # a dry run plans for the GPU machine
        raise UsageError(
            "FSDP needs GPUs: without CUDA, transformers and accelerate silently fall back to plain DDP (every rank "
            "holds the whole model). Shard on CPU with --deepspeed configs/deepspeed-zero3.json instead, or run on GPUs"
        )
    if fsdp and args.deepspeed:
        raise UsageError("FSDP and --deepspeed both requested; pick one (drop --fsdp / the accelerate FSDP config, or --deepspeed)")
    sharded = "FSDP" if fsdp else f"--deepspeed {args.deepspeed} (ZeRO-3)" if deepspeed_settings(args).get("stage", 0) == 3 else None
    if sharded is None:
        return
    if args.bits == 8:
        raise UsageError(f"{sharded} cannot shard bitsandbytes 8-bit weights; use --bits 4 (with --quant_storage) or --bits 16")
    needed = Precision.from_args(args).compute
    if args.bits == 4 and args.quant_storage != needed:
        raise UsageError(
            f"{sharded} shards parameters by dtype and --bits 4 stores weights as {args.quant_storage}; they must be "
            f"stored like the rest of the model: pass --quant_storage {needed}"
        )


def resolve_attention(requested: str, warn: bool = True) -> str:
    """The attention kernel this machine runs for --attn_implementation: flash_attention_2 when flash-attn imports;
    with no CUDA at all, sdpa (and a warning); else an install hint."""
    if requested != "flash_attention_2":
        return requested
    import importlib.util

    import torch

    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        return requested
    if not torch.cuda.is_available():
        if warn:
            logger.warning("flash_attention_2 needs CUDA and this machine has none: using sdpa attention instead")
        return "sdpa"
    raise UsageError(f"flash_attention_2 was requested but the flash-attn package is not installed: {FLASH_ATTN_HINT}")


def check_disk_space(model, args, working_dir: str) -> None:
    """A checkpoint holds the trainable weights plus two fp32 Adam moments for each, and (full fine-tune) the whole
    model; --save_total_limit of them at once, plus the final output. Stop before training if they cannot fit."""
    saved_weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    checkpoint = saved_weights + sum(8 * p.numel() for p in model.parameters() if p.requires_grad)
    kept = (args.save_total_limit or 1) if args.save_strategy != "no" else 0
    needed = int(1.1 * (checkpoint * (kept + 1) + saved_weights))
    free = free_bytes(working_dir)
    if free < needed:
        raise UsageError(
            f"--working_dir {working_dir} has {free / 2**30:.2f} GiB free, but {kept} checkpoint(s) of about "
            f"{checkpoint / 2**30:.2f} GiB and the final output need about {needed / 2**30:.2f} GiB; free space, "
            "lower --save_total_limit or point --working_dir at a larger disk"
        )


def protect_secrets(args) -> None:
    """--hub_token moves to HF_TOKEN (where huggingface_hub reads it) and out of the arguments that get pickled
    into training_args.bin, and out of sys.argv, which wandb copies into its run metadata."""
    if args.hub_token:
        os.environ.setdefault("HF_TOKEN", args.hub_token)
        args.hub_token = None
    for index, token in enumerate(sys.argv):
        if token == "--hub_token" and index + 1 < len(sys.argv):
            sys.argv[index + 1] = "<redacted>"
        elif token.startswith("--hub_token="):
            sys.argv[index] = "--hub_token=<redacted>"
