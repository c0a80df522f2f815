"""axolotl configs run as they are: `python train.py my-axolotl.yml [--flag overrides]`.

A recipe file with axolotl's keys (base_model, micro_batch_size, sequence_len, adapter, ...) is translated here,
once, into this trainer's flag names; recipes.py then checks those like any recipe's keys, and flags on the command
line still win. Keys with a null or empty value mean "default", as in axolotl. A key axolotl has and this trainer
does not implement stops the run up front (exit 2) naming every such key; an unknown key names the closest one.
Each translation that is not a plain rename is logged once.
"""

from __future__ import annotations

import difflib
import logging
import os

from finetune.errors import UsageError

logger = logging.getLogger(__name__)

# axolotl key -> our flag, value unchanged (legacy names such as gradient_checkpointing are mapped by recipes.py)
RENAMED = {
    "base_model": "model_name_or_path", "tokenizer_config": "tokenizer_name_or_path", "sequence_len": "model_max_len",
    "micro_batch_size": "per_device_train_batch_size", "eval_batch_size": "per_device_eval_batch_size",
    "num_epochs": "num_train_epochs", "optimizer": "optim", "lr_scheduler": "lr_scheduler_type",
    "val_set_size": "eval_dataset_size", "train_on_inputs": "train_on_source", "lora_target_modules": "lora_modules",
    "wandb_name": "run_name", "gradient_checkpointing": "activation_checkpointing",
    "lora_modules_to_save": "lora_modules_to_save", "default_system_message": "default_system_prompt",
    "tokens": "add_tokens", "peft_use_dora": "use_dora", "peft_use_rslora": "use_rslora", "dpo_label_smoothing": "label_smoothing",
    "orpo_alpha": "rl_beta", "kto_desirable_weight": "desirable_weight", "kto_undesirable_weight": "undesirable_weight",
}
SAME = {
    "lora_r", "lora_alpha", "lora_dropout", "sample_packing", "eval_sample_packing", "gradient_accumulation_steps",
    "max_steps", "learning_rate", "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "adam_beta1",
    "adam_beta2", "adam_epsilon", "fp16", "tf32", "logging_steps", "eval_steps",
    "save_steps", "save_total_limit", "output_dir", "dataset_prepared_path", "dataset_processes", "group_by_length",
    "resume_from_checkpoint", "loss_watchdog_threshold", "loss_watchdog_patience", "neftune_noise_alpha", "deepspeed",
    "fsdp", "fsdp_config", "seed", "hub_model_id", "torch_compile", "dataset_exact_deduplication",
    "chat_template_jinja", "lora_model_dir", "loraplus_lr_ratio", "rl", "rl_beta", "simpo_gamma",
    "early_stopping_patience",
}
# read by the translation of other keys (the README's table says what each becomes)
CONSUMED = {
    "adapter": "lora: LoRA at --bits 16 (8 / 4 with load_in_8bit / load_in_4bit); qlora: --bits 4 --quant_type nf4 "
               "--double_quant; none: --full_finetune --bits 16 with bf16, else --bits 32",
    "load_in_4bit": "--bits 4 (with adapter)", "load_in_8bit": "--bits 8 (with adapter)",
    "lora_target_linear": "--lora_modules all", "bf16": "--bf16 (auto: true on a bf16 GPU, else false)",
    "flash_attention": "--attn_implementation flash_attention_2 (sdpa without CUDA)",
    "sdp_attention": "--attn_implementation sdpa",
    "pad_to_sequence_len": "--pad_to_multiple_of <sequence_len>",
    "cosine_min_lr_ratio": "--lr_scheduler_type cosine_with_min_lr --lr_scheduler_kwargs {min_lr_rate: r}",
    "evals_per_epoch": "--eval_steps 1/(N x num_epochs) --eval_strategy steps",
    "saves_per_epoch": "--save_steps 1/(N x num_epochs) --save_strategy steps",
    "special_tokens": "--pad_token / --bos_token / --eos_token / --unk_token",
    "chat_template": "tokenizer_default: --dataset_format chat_template; jinja: the same with chat_template_jinja; "
                     "chatml: chatml; llama2: llama2_chat (other named templates refused)",
    "datasets": "--dataset / --dataset_format (type), --custom_* (a user-defined type), --roles_to_train",
    "test_datasets": "--eval_dataset / --eval_dataset_format (entries as in datasets; default split: test)",
    "shuffle_merged_datasets": "true: always so here (several datasets are trained shuffled together); false is refused",
    "overrides_of_model_config": "rope_scaling -> --rope_scaling_type / --rope_scaling_factor",
}
NO_OP = {
    "model_type": "models load with AutoModelForCausalLM", "tokenizer_type": "tokenizers load with AutoTokenizer",
    "base_model_config": "the model's config is read from base_model", "strict": "every key is checked anyway",
}
WANDB_ENV = {"wandb_project": "WANDB_PROJECT", "wandb_entity": "WANDB_ENTITY", "wandb_run_id": "WANDB_RUN_ID",
             "wandb_watch": "WANDB_WATCH", "wandb_log_model": "WANDB_LOG_MODEL"}
NOT_IMPLEMENTED: dict[str, str] = {}
# keys of one `datasets:` entry and what becomes of each
DATASET_KEYS = {
    "path": "--dataset (a local file or a hub name)",
    "type": "--dataset_format: a format name (alpaca, completion, input_output, sharegpt, context_qa.load_v2, ...), "
            "chat_template, or a mapping {field_instruction, field_input, field_output, format, no_input_format, "
            "system_format, system_prompt} -> the --custom_* flags",
    "ds_type": "nothing to do: the file's suffix says how to read it",
    "field_messages": "must be one of the conversation fields read (messages, conversations, ...)",
    "message_property_mappings": "role/content or from/value only",
    "roles": "only names the built-in role aliases already map",
    "roles_to_train": "--roles_to_train",
    "train_on_eos": "turn or all: every trained turn's end token is trained",
    "split": "`?split=` on the --dataset source (a local file has one: train)",
    "train_on_split": "the same as split (both given must agree)",
    "data_files": "`?data_files=a,b` on the --dataset source: files inside the folder or hub dataset `path`",
    "name": "`?name=` on the --dataset source: the hub dataset's configuration (a list: one source each)",
    "weight": "--dataset_weights (this trainer's key: < 1 samples, > 1 repeats; datasets only)",
}
# axolotl dataset types -> our format names (registered names such as context_qa.load_v2 are taken as they are)
DATASET_TYPES = {"input_output": "input-output", "alpaca_chat.load_qa": "alpaca_chat.load_qa"}
CHAT_TEMPLATES = {"tokenizer_default": "chat_template", "jinja": "chat_template", "chatml": "chatml",
                  "llama2": "llama2_chat"}
MARKERS = {"base_model", "micro_batch_size", "sequence_len", "num_epochs", "adapter", "lora_target_linear",
           "load_in_4bit", "load_in_8bit", "val_set_size", "lr_scheduler", "optimizer", "special_tokens"}


def is_axolotl(config: dict) -> bool:
    return any(key in config for key in MARKERS)


def empty(value) -> bool:
    return value is None or value == "" or value == [] or value == {}


def translate(path: str, config: dict, known_flags: set[str]) -> dict:
    """axolotl keys -> {our flag: value}; refuses unimplemented and unknown keys, all of them at once."""
    given = {key: value for key, value in config.items() if not empty(value)}
    refused = [f"{key} ({NOT_IMPLEMENTED[key]})" for key in given if key in NOT_IMPLEMENTED]
    if config.get("shuffle_merged_datasets") is False:
        refused.append("shuffle_merged_datasets: false (several datasets are always trained shuffled together here)")
    known = set(RENAMED) | SAME | set(CONSUMED) | set(NO_OP) | set(WANDB_ENV) | set(NOT_IMPLEMENTED)
    unknown = [key for key in config if key not in known and key not in known_flags]
    if unknown:
        hints = [f"{key}{closest(key, sorted(known | known_flags))}" for key in unknown]
        raise UsageError(f"axolotl config {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}")
    out: dict = {key: value for key, value in given.items() if key in known_flags and key not in known}
    for key, value in given.items():
        if key in ("lora_target_modules", "lora_modules_to_save"):
            out[RENAMED.get(key, key)] = ",".join(value) if isinstance(value, list) else str(value)
        elif key in RENAMED:
            out[RENAMED[key]] = value
        elif key in SAME:
            out[key] = value
        elif key in NO_OP:
            logger.info("axolotl key %s: nothing to do (%s)", key, NO_OP[key])
    precision = precision_flags(given)
    out.update(adapter_flags(given, half=bool(precision.get("bf16"))))
    out.update(precision)
    out.update(schedule_flags(given))
    out.update(token_flags(path, given))
    datasets, dataset_refusals = dataset_flags(path, given)
    refused += dataset_refusals
    if refused:
        raise UsageError(f"axolotl config {path}: these keys are not implemented here, so the run would not do what "
                         f"they ask: {'; '.join(refused)}. Remove them (or set them to null) to run without them")
    out.update(datasets)
    wandb = {WANDB_ENV[key]: str(value) for key, value in given.items() if key in WANDB_ENV}
    if wandb:
        for name, value in wandb.items():
            os.environ.setdefault(name, value)
        out.setdefault("report_to", "wandb")
        logger.info("axolotl wandb_* keys -> environment %s and --report_to wandb", ", ".join(sorted(wandb)))
    return out


def mapping_table() -> str:
    """The README's "Coming from axolotl" table, from the tables above (tests/test_axolotl.py keeps them equal)."""
    rows = [(key, f"`--{flag}`") for key, flag in RENAMED.items()]
    rows += [(key, f"`--{key}`") for key in SAME]
    rows += list(CONSUMED.items())
    rows += [(key, f"environment `{name}` (and `--report_to wandb`)") for key, name in WANDB_ENV.items()]
    rows += [(key, f"nothing to do: {why}") for key, why in NO_OP.items()]
    rows += [(key, f"**refused** (not implemented: {why})") for key, why in NOT_IMPLEMENTED.items()]
    lines = ["| axolotl key | here |", "|---|---|"]
    lines += [f"| `{key}` | {what.replace('|', '/')} |" for key, what in sorted(rows)]
    lines += ["", "| `datasets:` entry key | here |", "|---|---|"]
    lines += [f"| `{key}` | {what} |" for key, what in DATASET_KEYS.items()]
    return "\n".join(lines)


def closest(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def adapter_flags(config: dict, half: bool) -> dict:
    """adapter / load_in_* -> --bits and the LoRA settings; a full fine-tune keeps 32-bit weights unless it trains
    in bf16 (fp16 mixed precision needs fp32 master weights; pure fp16 weights under AdamW overflow)."""
    adapter = config.get("adapter")
    bits = 4 if config.get("load_in_4bit") else 8 if config.get("load_in_8bit") else 16
    if adapter is None:
        if bits != 16:
            raise UsageError(f"axolotl load_in_{bits}bit without an adapter: a full fine-tune needs 16 or 32 bits; "
                             "add adapter: lora or qlora, or drop load_in_*")
        logger.info("axolotl: no adapter -> --full_finetune --bits %d", 16 if half else 32)
        return {"full_finetune": True, "bits": 16 if half else 32}
    if adapter not in ("lora", "qlora"):
        raise UsageError(f"axolotl adapter: {adapter}: only lora and qlora are implemented")
    out: dict = {"bits": 4 if adapter == "qlora" else bits}
    if adapter == "qlora":
        out.update(quant_type="nf4", double_quant=True)
    if config.get("lora_target_linear"):
        out["lora_modules"] = "all"
    logger.info("axolotl adapter: %s -> --bits %d%s", adapter, out["bits"],
                " --lora_modules all" if "lora_modules" in out else "")
    return out


def precision_flags(config: dict) -> dict:
    out: dict = {}
    bf16 = config.get("bf16")
    if bf16 == "auto":
        import torch

        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        logger.info("axolotl bf16: auto -> --bf16 %s (%s)", bf16, "supported here" if bf16 else "no bf16 GPU here")
    if bf16 is not None:
        out["bf16"] = bool(bf16)
    if config.get("flash_attention"):
        out["attn_implementation"] = "flash_attention_2"
    elif config.get("sdp_attention"):
        out["attn_implementation"] = "sdpa"
    rope = (config.get("overrides_of_model_config") or {}).get("rope_scaling")
    if rope:
        out.update(rope_scaling_type=rope.get("rope_type", rope.get("type")), rope_scaling_factor=rope.get("factor"))
    return out


def schedule_flags(config: dict) -> dict:
    """Per-epoch counts become fractions of the run (transformers takes eval/save steps < 1 as a ratio)."""
    out: dict = {}
    epochs = float(config.get("num_epochs") or 1)
    for key, flag, strategy in (("evals_per_epoch", "eval_steps", "eval_strategy"),
                                ("saves_per_epoch", "save_steps", "save_strategy")):
        if config.get(key) and not config.get(flag) and not config.get("max_steps"):
            out[flag] = 1.0 / (float(config[key]) * epochs)
            out[strategy] = "steps"
            if key == "evals_per_epoch" and not (config.get("val_set_size") or config.get("test_datasets")):
                del out[flag], out[strategy]  # no eval split: nothing to evaluate
    if config.get("eval_steps") and (config.get("val_set_size") or config.get("test_datasets")):
        out["eval_strategy"] = "steps"
    ratio = config.get("cosine_min_lr_ratio")
    if ratio is not None:
        out.update(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": float(ratio)})
    if config.get("pad_to_sequence_len") and config.get("sequence_len"):
        out["pad_to_multiple_of"] = int(config["sequence_len"])  # batches are never longer: padded to exactly it
    return out


def token_flags(path: str, config: dict) -> dict:
    tokens = config.get("special_tokens") or {}
    if not isinstance(tokens, dict):
        raise UsageError(f"axolotl config {path}: special_tokens must be a mapping (pad_token: ..., eos_token: ...)")
    allowed = ("pad_token", "bos_token", "eos_token", "unk_token")
    other = [key for key in tokens if key not in allowed]
    if other:
        raise UsageError(f"axolotl config {path}: special_tokens {', '.join(other)}: only {', '.join(allowed)} are implemented")
    return {key: str(value) for key, value in tokens.items() if not empty(value)}


def dataset_flags(path: str, config: dict) -> tuple[dict, list[str]]:
    """`datasets:` -> --dataset / --dataset_format (+ --custom_* for a user-defined type, --roles_to_train);
    `test_datasets:` the same into --eval_dataset / --eval_dataset_format."""
    out, refused = {}, []
    for key, flag in (("datasets", "dataset"), ("test_datasets", "eval_dataset")):
        entries = config.get(key) or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("path") for e in entries):
            raise UsageError(f"axolotl config {path}: {key} must be a list of mappings with a path")
        sources, formats, weights = [], [], []
        for number, entry in enumerate(entries):
            kind, flags, entry_refused = dataset_entry(path, config, f"{key}[{number}]", entry)
            refused += entry_refused
            if key == "test_datasets" and "weight" in entry:
                refused.append(f"{key}[{number}].weight (eval sets are not weighted)")
            clashes = [flag for flag, value in flags.items() if flag in out and out[flag] != value]
            if clashes:  # one value per flag for all datasets (roles_to_train, a user-defined type's fields)
                refused.append(f"{key}[{number}] sets {', '.join(clashes)} differently from an earlier entry (one "
                               "setting serves every dataset)")
            out.update(flags)
            for source in dataset_sources(f"{key}[{number}]", entry, refused):
                sources.append(source)
                formats.append(kind)
                weights.append(float(entry.get("weight", 1.0)))
        if sources:
            out.update({flag: sources, f"{flag}_format": formats})
        if key == "datasets" and any("weight" in entry for entry in entries):
            out["dataset_weights"] = weights
    return out, refused


def dataset_sources(spot: str, entry: dict, refused: list[str]) -> list[str]:
    """One entry's `path` with its split / name / data_files as --dataset sources (`PATH?split=..&name=..`); a list
    of names gives one source each, as axolotl loads each configuration on its own."""
    split, train_on = entry.get("split"), entry.get("train_on_split")
    if split and train_on and split != train_on:
        refused.append(f"{spot}.split {split} and train_on_split {train_on} disagree (give one)")
    split = split or train_on
    files = entry.get("data_files")
    files = [files] if isinstance(files, str) else list(files or [])
    if files and os.path.isfile(str(entry["path"])):  # axolotl reads a file path as it is and ignores data_files
        logger.info("%s: path %s is a file; data_files %s ignored, as axolotl does", spot, entry["path"], files)
        files = []
    names = entry.get("name")
    sources = []
    for name in names if isinstance(names, list) else [names]:
        options = [f"{key}={value}" for key, value in (("split", split), ("name", name)) if not empty(value)]
        if files:
            options.append("data_files=" + ",".join(map(str, files)))
        sources.append(str(entry["path"]) + ("?" + "&".join(options) if options else ""))
    return sources


def dataset_entry(path: str, config: dict, spot: str, entry: dict) -> tuple[str, dict, list[str]]:
    """One `datasets:` entry's format name, the flags its type sets, and what of it is refused."""
    from dataset_formats import FORMATS

    unknown = [key for key in entry if key not in DATASET_KEYS]
    if unknown:
        raise UsageError(f"axolotl config {path}: unknown key {spot}.{unknown[0]}"
                         f"{closest(unknown[0], sorted(DATASET_KEYS))}; a dataset takes {', '.join(DATASET_KEYS)}")
    template = config.get("chat_template") or "tokenizer_default"
    kind, out, refused = entry.get("type", "alpaca"), {}, []
    if isinstance(kind, dict):  # a user-defined instruction format
        custom = {f"custom_{key}": value for key, value in kind.items() if not empty(value)}
        unknown = [key for key in custom if key.removeprefix("custom_") not in (
            "field_instruction", "field_input", "field_output", "field_system", "format", "no_input_format",
            "system_format", "system_prompt")]
        if unknown:
            refused.append(f"{spot}.type.{unknown[0].removeprefix('custom_')} (user-defined type key)")
        out.update(custom)
        kind = "custom"
    elif kind == "chat_template":
        if template not in CHAT_TEMPLATES:
            refused.append(f"chat_template: {template} (a named template; use tokenizer_default for the model's "
                           "own, jinja with chat_template_jinja, or chatml)")
        if template == "jinja" and not config.get("chat_template_jinja"):
            refused.append("chat_template: jinja without chat_template_jinja (give the template's text)")
        kind = CHAT_TEMPLATES.get(template, "chat_template")
        refused += chat_dataset_refusals(spot, entry)
        if entry.get("roles_to_train"):
            out["roles_to_train"] = list(entry["roles_to_train"])
    else:
        kind = DATASET_TYPES.get(kind, kind)
        if kind not in FORMATS:
            refused.append(f"{spot}.type: {entry.get('type')} (no such format here; known: see --help)")
    return kind, out, refused


def chat_dataset_refusals(spot: str, entry: dict) -> list[str]:
    from finetune.data.conversations import CONVERSATION_FIELDS, ROLE_ALIASES

    refused = []
    field = entry.get("field_messages")
    if field and field not in CONVERSATION_FIELDS:
        refused.append(f"{spot}.field_messages: {field} (read from {', '.join(CONVERSATION_FIELDS)})")
    mappings = entry.get("message_property_mappings") or {}
    if any(key != value and not (key == "role" and value == "from") and not (key == "content" and value == "value")
           for key, value in mappings.items()):
        refused.append(f"{spot}.message_property_mappings (other field names than role/content or from/value)")
    for role, names in (entry.get("roles") or {}).items():
        if any(ROLE_ALIASES.get(name) != ROLE_ALIASES.get(role, role) for name in names or []):
            refused.append(f"{spot}.roles.{role} (role names beyond the built-in aliases)")
    if entry.get("train_on_eos") not in (None, "turn", "all"):
        refused.append(f"{spot}.train_on_eos: {entry['train_on_eos']} (every trained turn's end token is trained)")
    return refused


if __name__ == "__main__":  # python -m finetune.config.axolotl: the README table
    print(mapping_table())
