"""Mechanics of two training knobs that reach into the model's structure: layer freezing and RoPE scaling overrides.

Each needs architecture details (which ModuleList holds the decoder layers, how transformers 5 stores
`rope_parameters`, which layers peft may target) that would crowd the stage functions. train.py owns the flags,
finetune/checks/model_config.py checks them against the model (UsageError), and loading and adapters call these;
nothing here reads the command line.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

logger = logging.getLogger(__name__)

# Scaling types that one factor fully defines (transformers' ROPE_INIT_FUNCTIONS); llama3 and longrope need more.
ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn")


# --- layer freezing --------------------------------------------------------------------------------------------------


def frozen_layer_count(layers_to_freeze: Optional[int], ratio: Optional[float], num_layers: int) -> int:
    """--layers_to_freeze N, or floor(ratio x layers). Rounded to 6 places first, so float noise cannot take a
    layer away (int(0.29 * 100) is 28, not 29)."""
    if layers_to_freeze is not None:
        return layers_to_freeze
    if ratio is None:
        return 0
    return math.floor(round(ratio * num_layers, 6))


def decoder_layers(model):
    """(attribute name, ModuleList) of the repeated decoder blocks: the shallowest ModuleList with one entry per
    config.num_hidden_layers (model.layers in Llama/Mistral/Qwen, transformer.h in GPT-2). None if there is none."""
    import torch

    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name.rsplit(".", 1)[-1], module
    return None


def freeze_bottom_layers(model, count: int, new_tokens: bool) -> list[str]:
    """Full fine-tune: requires_grad=False on the first `count` decoder layers and on the input embeddings below
    them (unless tokens were added: their new rows must learn). The Trainer leaves frozen weights out of the
    optimizer. Returns the names of the frozen modules, for the log."""
    layer_attr, layers = decoder_layers(model)
    frozen = {f"{layer_attr}.{index}": layers[index] for index in range(count)}
    embeddings = model.get_input_embeddings()
    if not new_tokens:
        frozen["input embeddings"] = embeddings
        output = model.get_output_embeddings()
        if output is not None and output.weight is embeddings.weight:
            frozen["output head (tied to the input embeddings)"] = output
    for module in frozen.values():
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    return list(frozen)


def linear_names(module) -> set[str]:
    """Last name component of every linear layer (plain, or a bitsandbytes/peft Linear variant) inside `module`."""
    import torch

    return {name.rsplit(".", 1)[-1] for name, sub in module.named_modules()
            if isinstance(sub, torch.nn.Linear) or "Linear" in type(sub).__name__}


def lora_layer_limits(model, targets, count: int):
    """LoRA with frozen layers: adapters only on decoder layers count..L-1 (peft's layers_to_transform). peft
    refuses that with the string 'all-linear', so 'all' becomes the linear layer names found inside the decoder
    layers (the output head is outside them, as with 'all-linear'). Returns (targets, extra LoraConfig kwargs)."""
    if not count:
        return targets, {}
    layer_attr, layers = decoder_layers(model)
    if targets == "all-linear":
        targets = sorted(linear_names(layers))
    return targets, {"layers_to_transform": list(range(count, len(layers))), "layers_pattern": layer_attr}


# --- RoPE scaling ------------------------------------------------------------------------------------------------------


def pretrained_context(config) -> int:
    """The context the model was pretrained with, even when its config already carries a scaling."""
    current = config.rope_parameters or {}
    if current.get("original_max_position_embeddings"):
        return int(current["original_max_position_embeddings"])
    if current.get("rope_type") == "linear" and current.get("factor"):
        return int(config.max_position_embeddings / current["factor"])
    return int(config.max_position_embeddings)


def apply_rope_scaling(config, rope_type: str, factor: float) -> int:
    """Replace the config's RoPE scaling in place; returns the scaled context length. linear and yarn also raise
    max_position_embeddings to pretrained x factor (what such checkpoints ship with). dynamic must keep it: it is
    the length above which dynamic NTK starts rescaling."""
    original = pretrained_context(config)
    previous = dict(config.rope_parameters)
    parameters = {"rope_type": rope_type, "factor": float(factor), "rope_theta": previous["rope_theta"]}
    if "partial_rotary_factor" in previous:
        parameters["partial_rotary_factor"] = previous["partial_rotary_factor"]
    if rope_type == "yarn":
        parameters["original_max_position_embeddings"] = original
    scaled = int(original * factor)
    if rope_type != "dynamic":
        config.max_position_embeddings = scaled
    if previous.get("rope_type", "default") != "default":
        logger.warning("the model's own RoPE scaling %s is replaced by --rope_scaling_type %s", previous, rope_type)
    config.rope_parameters = parameters
    config.validate_rope()
    return scaled


def rope_scaled_config(model_args):
    """The model's config with --rope_scaling_type/--rope_scaling_factor applied, for from_pretrained(config=...);
    None when there is no override (from_pretrained then reads the config itself)."""
    if model_args.rope_scaling_type is None:
        return None
    import transformers

    config = transformers.AutoConfig.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
    )
    apply_rope_scaling(config, model_args.rope_scaling_type, model_args.rope_scaling_factor)
    return config
