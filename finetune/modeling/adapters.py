"""LoRA adapters (or, for a full fine-tune, the frozen bottom layers): which linear layers get them, k-bit
preparation, activation checkpointing with adapters, and embeddings trained in full when tokens were added."""

from __future__ import annotations

import difflib
import logging
from typing import TYPE_CHECKING

from finetune.errors import UsageError
from finetune.modeling import knobs

if TYPE_CHECKING:
    from train import TrainingArguments

logger = logging.getLogger(__name__)


def add_adapters(model, args: TrainingArguments, new_tokens: bool):
    """LoRA on the chosen linear layers; k-bit models are prepared first (fp32 norms, input grads).
    With new tokens, the embedding and output layers are trained in full and saved with the adapter."""
    import peft

    frozen = knobs.frozen_layer_count(args.layers_to_freeze, args.layer_freeze_ratio,
                                               model.config.num_hidden_layers)
    if args.full_finetune:
        if frozen:
            names = knobs.freeze_bottom_layers(model, frozen, new_tokens)
            logger.info("frozen (requires_grad=False, not in the optimizer): %s", ", ".join(names))
        return model
    checkpointing = bool(args.activation_checkpointing)
    gc_kwargs = args.activation_checkpointing_kwargs or {"use_reentrant": False}
    if args.bits in (4, 8):
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif checkpointing:
        model.enable_input_require_grads()
    targets = "all-linear" if args.lora_modules.strip() == "all" else lora_target_list(model, args.lora_modules)
    targets, layer_limits = knobs.lora_layer_limits(model, targets, frozen)
    config = peft.LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save(model, args.lora_modules_to_save, new_tokens),
        task_type="CAUSAL_LM",
        **layer_limits,
    )
    model = peft.get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA on %s: %d trainable of %d parameters (%.2f%%)", targets, trainable, total, 100 * trainable / total)
    return model


def modules_to_save(model, spec: str | None, new_tokens: bool) -> list[str] | None:
    """Modules trained in full beside LoRA: --lora_modules_to_save, plus the embeddings when tokens were added."""
    names = list(embedding_modules(model)) if new_tokens else []
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for name in (part.strip() for part in (spec or "").split(",")):
        if not name:
            continue
        if name not in leaf_names:
            close = difflib.get_close_matches(name, sorted(leaf_names), n=1)
            raise UsageError(f"--lora_modules_to_save {name}: the model has no module of that name"
                             f"{f' (did you mean {close[0]}?)' if close else ''}")
        if name not in names:
            names.append(name)
    return names or None


def lora_target_list(model, spec: str) -> list[str]:
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    linear_names = knobs.linear_names(model)
    missing = [name for name in wanted if name not in linear_names]
    if missing:
        raise UsageError(
            f"--lora_modules {spec}: no linear layer named {', '.join(missing)} in this model; "
            f"its linear layers are: {', '.join(sorted(linear_names))} (or use 'all')"
        )
    return wanted


def embedding_modules(model) -> list[str]:
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is inputs or module is outputs]

