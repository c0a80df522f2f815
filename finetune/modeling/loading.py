"""Loading the base model for training: dtype and bitsandbytes config from the one precision resolver, RoPE
override, ZeRO-3 sharded loading, embeddings resized for new tokens, special-token ids in the config."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import transformers

from finetune.checks.preflight import resolve_attention
from finetune.config.precision import Precision
from finetune.modeling import knobs

if TYPE_CHECKING:
    from train import ModelArguments, TrainingArguments

logger = logging.getLogger(__name__)


def load_model(model_args: ModelArguments, args: TrainingArguments, tokenizer):
    """(model, whether its embeddings were resized for new tokens)."""
    import torch

    precision = Precision.from_args(args)
    kwargs = {"dtype": precision.torch_dtype(precision.load_dtype),
              "attn_implementation": resolve_attention(model_args.attn_implementation, warn=False)}
    if args.bits in (4, 8):
        kwargs["quantization_config"] = precision.bitsandbytes_config()
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": args.local_process_index}
    if args.deepspeed and transformers.integrations.is_deepspeed_zero3_enabled():
        import deepspeed

        # ZeRO-3 shards the weights while they load (zero.Init), sized by deepspeed.comm's world, which the
        # launcher's process group does not set up by itself: without this every rank would think it is alone.
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    kwargs["config"] = knobs.rope_scaled_config(model_args)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, **kwargs
    )
    resized = len(tokenizer) > model.get_input_embeddings().weight.shape[0]
    if resized:
        logger.info("resizing embeddings %d -> %d for new tokens", model.get_input_embeddings().weight.shape[0], len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    for name, value in (("pad_token_id", tokenizer.pad_token_id), ("eos_token_id", tokenizer.eos_token_id),
                        ("bos_token_id", tokenizer.bos_token_id)):
        setattr(model.config, name, value)
    model.config.use_cache = False
    return model, resized
