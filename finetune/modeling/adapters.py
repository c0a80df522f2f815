"""LoRA adapters (or, for a full fine-tune, the frozen bottom layers): which linear layers get them, k-bit
preparation, activation checkpointing with adapters, and embeddings trained in full when tokens were added."""

from __future__ import annotations

import difflib
import logging
import os
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
    if args.peft_method == "llama_adapter":
        return add_llama_adapter(model, args)
    if args.lora_model_dir:
        return continue_adapter(model, args.lora_model_dir, new_tokens)
    targets = "all-linear" if args.lora_modules.strip() == "all" else lora_target_list(model, args.lora_modules)
    targets, layer_limits = knobs.lora_layer_limits(model, targets, frozen)
    config = peft.LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save(model, args.lora_modules_to_save, new_tokens),
        task_type="CAUSAL_LM",
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
        # loftq on a 4-bit model: peft's replace_lora_weights_loftq below, from ordinary initial adapters
        init_lora_weights={"default": True, "loftq": True}.get(args.init_lora_weights, args.init_lora_weights),
        **layer_limits,
    )
    model = peft.get_peft_model(model, config)
    if args.init_lora_weights == "loftq":
        loftq_initialize(model)
    trainable, total = model.get_nb_trainable_parameters()
    variant = "".join(f", {name}" for name, on in (("DoRA", args.use_dora), ("rsLoRA", args.use_rslora),
                                                   (f"init {args.init_lora_weights}", args.init_lora_weights != "default"),
                                                   (f"LoRA+ ratio {args.loraplus_lr_ratio}", args.loraplus_lr_ratio)) if on)
    logger.info("LoRA on %s%s: %d trainable of %d parameters (%.2f%%)", targets, variant, trainable, total,
                100 * trainable / total)
    return model


MUTATED_INITS = ("pissa", "olora")  # these move part of each base weight into the adapter


def save_initial_adapter(model, directory: str) -> None:
    """pissa / olora: the adapter as initialised, from which the saved adapter is later converted into a plain LoRA on
    the original base (peft's path_initial_model_for_weight_conversion)."""
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # peft's documented way to save it
    try:
        model.save_pretrained(directory)
    finally:
        config.init_lora_weights = init


def convert_mutated_adapter(adapter_dir: str, initial_dir: str) -> None:
    """pissa / olora -> a plain LoRA on the original base, in place: the base kept W - s*B0@A0 and training learnt
    B@A, so the update is s*(B@A - B0@A0) = s*[B | -B0] @ [A ; A0], a LoRA of rank 2r with the same scale (peft's
    subtract_mutated_init, done on the saved files so it also works after a ZeRO-3 gather). A DoRA magnitude vector
    was fitted to W itself and stays as it is."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    trained, initial = load_file(weights), load_file(os.path.join(initial_dir, "adapter_model.safetensors"))
    for name, value in trained.items():
        if ".lora_A." in name:
            trained[name] = torch.cat([value, initial[name].to(value.dtype)], dim=0).contiguous()
        elif ".lora_B." in name:
            trained[name] = torch.cat([value, -initial[name].to(value.dtype)], dim=1).contiguous()
    save_file(trained, weights, metadata={"format": "pt"})
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    alpha_factor = 2 ** 0.5 if config.get("use_rslora") else 2  # alpha/sqrt(r) or alpha/r unchanged at rank 2r
    config["r"] *= 2
    config["lora_alpha"] *= alpha_factor
    config["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: alpha_factor * v for k, v in (config.get("alpha_pattern") or {}).items()}
    config["init_lora_weights"] = True
    with open(config_path, "w") as handle:
        json.dump(config, handle, indent=2)
    logger.info("the pissa/olora adapter is saved as a plain LoRA of rank %d on the original base", config["r"])


def loftq_initialize(model) -> None:
    """LoftQ (one iteration, as peft's replace_lora_weights_loftq, which runs on CUDA only): for every 4-bit weight Q
    of the 16-bit W, the adapter is set to the best rank-r approximation of W - dequant(Q), so base + adapter starts
    closer to the 16-bit model than the 4-bit base alone. s*B@A = U_r S_r V_r^T, split as B = U_r sqrt(S_r/s),
    A = sqrt(S_r/s) V_r^T. The 16-bit weights are read tensor by tensor from the base's checkpoint files."""
    import bitsandbytes.functional as bnb_functional
    import torch

    from finetune.modeling.checkpoint_files import MergeError, TensorFile, base_checkpoint_files

    path = model.get_base_model().config._name_or_path
    try:
        readers = [TensorFile(source) for source, _ in base_checkpoint_files(path)]
    except MergeError as error:
        raise UsageError(f"--init_lora_weights loftq reads the 16-bit weights of the base: {error}") from error
    location = {name: reader for reader in readers for name in reader.names}
    fitted = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not (hasattr(module, "lora_A") and "default" in module.lora_A):
                continue
            weight = module.get_base_layer().weight
            if not hasattr(weight, "quant_state"):
                continue  # a layer kept in 16 bits has no quantization error to fit
            key = name.removeprefix("base_model.model.") + ".weight"
            if key not in location:
                raise UsageError(f"--init_lora_weights loftq: {key} is not in the checkpoint files of {path}")
            residual = location[key].read(key).float() - bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
            rank, scale = module.r["default"], module.scaling["default"]
            u, singular, vh = torch.linalg.svd(residual, full_matrices=False)
            root = (singular[:rank] / scale).sqrt()
            lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
            lora_a.copy_((root[:, None] * vh[:rank]).to(lora_a.dtype))
            lora_b.copy_((u[:, :rank] * root).to(lora_b.dtype))
            fitted += 1
    if not fitted:
        raise UsageError("--init_lora_weights loftq found no 4-bit layer with an adapter; check --lora_modules")
    logger.info("LoftQ: %d adapters fitted to the 4-bit quantization error of their weights", fitted)


def continue_adapter(model, adapter_dir: str, new_tokens: bool):
    """--lora_model_dir: the saved adapter, trainable, with its own settings."""
    import peft

    config = peft.PeftConfig.from_pretrained(adapter_dir)
    if config.peft_type != peft.PeftType.LORA:
        raise UsageError(f"--lora_model_dir {adapter_dir} holds a {config.peft_type} adapter; only LoRA adapters can "
                         "be continued")
    if new_tokens and not config.modules_to_save:
        raise UsageError(f"--lora_model_dir {adapter_dir}: this run adds tokens to the vocabulary, and the adapter "
                         "does not train the embeddings; continue it with the tokenizer it was trained with")
    model = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("continuing the LoRA adapter in %s (r=%d, alpha=%s%s%s): %d trainable of %d parameters", adapter_dir,
                config.r, config.lora_alpha, ", DoRA" if config.use_dora else "", ", rsLoRA" if config.use_rslora else "",
                trainable, total)
    return model


def add_llama_adapter(model, args: TrainingArguments):
    """--peft_method llama_adapter: peft's adaption prompts (LLaMA-Adapter) in the top layers."""
    import peft

    kind = model.config.model_type
    supported = sorted(peft.tuners.adaption_prompt.config.TRANSFORMERS_MODEL_CONFIG)
    if kind not in supported:
        raise UsageError(f"--peft_method llama_adapter: peft supports {', '.join(supported)} models, not {kind}; "
                         "use --peft_method lora")
    layers = model.config.num_hidden_layers
    if args.llama_adapter_layers > layers:
        logger.info("llama_adapter: --llama_adapter_layers %d > the model's %d layers; adapting all %d",
                    args.llama_adapter_layers, layers, layers)
    config = peft.AdaptionPromptConfig(adapter_len=args.llama_adapter_len,
                                       adapter_layers=min(args.llama_adapter_layers, layers), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("llama_adapter: %d prompt vectors in the top %d layers: %d trainable of %d parameters",
                args.llama_adapter_len, config.adapter_layers, trainable, total)
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

