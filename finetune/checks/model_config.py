"""What needs the model's structure, checked on its config and one empty (meta-device) model before any write:
the model exists, LoRA target names, layers to freeze, RoPE parameters."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

import transformers

from finetune.checks.export_request import check_export_request, check_gptq_request
from finetune.errors import UsageError
from finetune.modeling import knobs
from finetune.modeling.adapters import lora_target_list
from finetune.runtime import without_zero3_init

if TYPE_CHECKING:
    from train import ModelArguments, TrainingArguments

logger = logging.getLogger(__name__)


def check_model_before_writing(model_args: ModelArguments, args: TrainingArguments, model_max_len: int):
    """The model exists, and what needs its structure (LoRA target names, layers to freeze, RoPE parameters) is
    checked on its config and one empty (meta) model, before any write. Returns the config."""
    try:
        config = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: cannot load a model config "
                         f"({str(error).splitlines()[0]}); pass a local model directory or a reachable hub id") from error
    named_targets = not args.full_finetune and args.lora_modules.strip() != "all"
    freezing = args.layers_to_freeze is not None or args.layer_freeze_ratio is not None
    skeleton = empty_model(config, model_args) if named_targets or freezing else None
    check_knobs_against_model(config, skeleton, model_args, args, model_max_len)
    if named_targets:
        lora_target_list(skeleton, args.lora_modules)
    if args.export_gptq:
        check_gptq_request(args.export_gptq, args.gptq_group_size, config)
    if args.export_gguf:
        check_export_request(args.export_gguf, knobs.rope_scaled_config(model_args) or config)
    return config


def empty_model(config, model_args: ModelArguments):
    """The model's modules with no memory behind them (meta device), never through ZeRO-3's collective init."""
    import torch

    with torch.device("meta"), without_zero3_init():
        return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)


def check_knobs_against_model(config, skeleton, model_args: ModelArguments, args: TrainingArguments,
                              model_max_len: int) -> None:
    """Layer freezing needs the layer count and the decoder layer list; RoPE scaling needs rope_parameters."""
    layers = config.num_hidden_layers
    frozen = knobs.frozen_layer_count(args.layers_to_freeze, args.layer_freeze_ratio, layers)
    if frozen:
        flag, value = (("--layers_to_freeze", args.layers_to_freeze) if args.layers_to_freeze is not None
                       else ("--layer_freeze_ratio", args.layer_freeze_ratio))
        if frozen >= layers:
            raise UsageError(f"{flag} {value} freezes {frozen} layers but the model has {layers} decoder layers; "
                             f"freeze at most {layers - 1} so that some layer trains")
        if knobs.decoder_layers(skeleton) is None:
            raise UsageError(f"{flag}: no list of {layers} decoder layers found in {type(skeleton).__name__}; "
                             f"drop {flag}")
        logger.info("%s %s: the first %d of %d decoder layers are frozen", flag, value, frozen, layers)
    if model_args.rope_scaling_type:
        rope = getattr(config, "rope_parameters", None)
        if not isinstance(rope, dict) or "rope_theta" not in rope:
            raise UsageError(f"--rope_scaling_type: this model ({config.model_type}) has no single set of RoPE "
                             "parameters to scale (no RoPE, or one per layer type); drop the --rope_scaling flags")
        original = knobs.pretrained_context(config)
        scaled = knobs.apply_rope_scaling(copy.deepcopy(config), model_args.rope_scaling_type,
                                                   model_args.rope_scaling_factor)
        logger.info("RoPE %s x%g: context %d -> %d positions (--model_max_len %s)", model_args.rope_scaling_type,
                    model_args.rope_scaling_factor, original, scaled, model_max_len)
        if model_max_len and model_max_len > scaled:
            logger.warning("--model_max_len %d is beyond the scaled context of %d positions", model_max_len, scaled)
        if model_args.rope_scaling_type == "dynamic" and model_max_len and model_max_len <= original:
            logger.warning("--rope_scaling_type dynamic changes nothing up to %d positions, so training on at most "
                           "--model_max_len %d sees plain RoPE; only longer inputs at inference are rescaled",
                           original, model_max_len)
        if not args.full_finetune and not args.merged_output_dir:
            logger.warning("--rope_scaling_type with an adapter and no --merged_output_dir: the adapter does not carry "
                           "the scaling; load its base with the same rope_parameters, or pass --merged_output_dir")

