"""Cross-field rules, checked once after parsing and before anything loads or is written: combinations of flags
that would crash late, be silently ignored, or do something other than asked. Each message names the flags and the
fix (UsageError: exit code 2). Rules about one field alone live with the field, in train.py's __post_init__."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from finetune.checks import preflight
from finetune.config.schema import enum_value, non_default
from finetune.data.sources import check_source
from finetune.errors import UsageError
from finetune.run_paths import RESUME_LATEST, checkpoint_is_complete
from finetune.runtime import has_accelerator, process_rank

if TYPE_CHECKING:
    from train import DataArguments, ModelArguments, TrainingArguments

logger = logging.getLogger(__name__)


def validate(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments) -> None:
    """Every cross-field rule; each message says how to fix it."""
    if not model_args.model_name_or_path:
        raise UsageError("--model_name_or_path is required (a local model directory or a hub id)")
    if not data_args.dataset and not args.merge_only:
        raise UsageError("--dataset is required (a .json/.jsonl/.parquet/.csv/.tsv file or a hub dataset name)")
    check_merge_arguments(model_args, args)
    for flag, sources in (("--dataset", data_args.dataset), ("--eval_dataset", data_args.eval_dataset)):
        for source in sources or []:
            check_source(source, flag)
    if data_args.eval_dataset and not data_args.eval_dataset_format and len(data_args.dataset_format) > 1:
        raise UsageError("--eval_dataset with several --dataset_format values: give --eval_dataset_format (one for "
                         "all eval datasets, or one each)")
    if data_args.eval_dataset and len(data_args.eval_dataset_format or [0]) not in (1, len(data_args.eval_dataset)):
        raise UsageError(f"{len(data_args.eval_dataset)} eval datasets but {len(data_args.eval_dataset_format)} "
                         "formats; give one --eval_dataset_format for all, or one per --eval_dataset in the same order")
    if len(data_args.dataset_format) not in (1, len(data_args.dataset or [])):
        raise UsageError(
            f"{len(data_args.dataset)} datasets but {len(data_args.dataset_format)} formats; give one --dataset_format "
            "for all, or one per --dataset in the same order"
        )
    if data_args.dataset_weights is not None and len(data_args.dataset_weights) != len(data_args.dataset or []):
        raise UsageError(f"{len(data_args.dataset or [])} datasets but {len(data_args.dataset_weights)} "
                         "--dataset_weights; give one weight per --dataset, in the same order")
    if args.full_finetune and args.bits == 16 and args.fp16:
        raise UsageError("--full_finetune --bits 16 --fp16 would train float16 weights under fp16 mixed precision, "
                         "which the gradient scaler refuses (it unscales fp32 master weights only); use --bits 32 "
                         "--fp16, or --bits 16 --bf16")
    if args.full_finetune and args.bits not in (16, 32):
        raise UsageError(
            f"--full_finetune needs --bits 16 or 32 (got {args.bits}); drop --bits or drop --full_finetune"
        )
    check_mode_flags(args)
    if args.full_finetune and args.merged_output_dir:
        raise UsageError("--merged_output_dir merges an adapter; a --full_finetune run has none. Drop one of them")
    if args.bf16 and args.fp16:
        raise UsageError("--bf16 and --fp16 both given; pick one")
    if args.fp16 and not has_accelerator() and process_rank() == 0:
        logger.warning("--fp16 changes nothing without a GPU: the Trainer computes in fp32 on CPU (CPU autocast is "
                       "bf16 only); use --bf16 to run mixed precision here")
    if not args.full_finetune:
        if args.lora_r <= 0:
            raise UsageError(f"--lora_r must be > 0 (got {args.lora_r})")
        if not 0 <= args.lora_dropout < 1:
            raise UsageError(f"--lora_dropout must be in [0, 1) (got {args.lora_dropout})")
    check_training_knobs(data_args, args)
    check_preference_flags(data_args, args)
    if data_args.sample_packing and args.train_sampling_strategy == "group_by_length":
        raise UsageError("--sample_packing already fills rows to --model_max_len; drop --group_by_length")
    if args.do_eval and not data_args.has_eval_set and not args.merge_only:
        raise UsageError("--do_eval needs an eval split; pass --eval_dataset_size (e.g. 0.02) or drop --do_eval")
    if args.early_stopping_patience and args.eval_strategy == "no":
        raise UsageError(f"--early_stopping_patience {args.early_stopping_patience} watches the eval loss, and "
                         "--eval_strategy is no; pass --eval_strategy steps --eval_steps N with --eval_dataset_size")
    if args.eval_strategy != "no" and not data_args.has_eval_set:
        raise UsageError(
            f"--eval_strategy {enum_value(args.eval_strategy)} needs an eval split; pass --eval_dataset_size "
            "(e.g. 0.02) or --eval_strategy no"
        )
    if args.deepspeed and isinstance(args.deepspeed, str) and not os.path.isfile(args.deepspeed):
        raise UsageError(f"--deepspeed {args.deepspeed}: config file not found")
    for flag, path in (("--output_dir", args.output_dir), ("--working_dir", args.working_dir),
                       ("--merged_output_dir", args.merged_output_dir),
                       ("--dataset_prepared_path", data_args.dataset_prepared_path),
                       ("--profiler_dir", args.profiler_dir)):
        preflight.check_writable_directory(flag, path)
    preflight.check_sharding(args)
    resume = args.resume_from_checkpoint
    if resume and str(resume).lower() not in RESUME_LATEST and not checkpoint_is_complete(resume):
        raise UsageError(f"--resume_from_checkpoint {resume}: not a complete checkpoint directory (no readable "
                         "trainer_state.json); pass a checkpoint-N directory, or drop the flag: a re-run resumes from "
                         "the newest complete checkpoint in --working_dir by itself")
    if args.dry_run_world_size is not None and not args.dry_run:
        raise UsageError(f"--dry_run_world_size {args.dry_run_world_size}: needs --dry_run and a count >= 1")
    check_output_arguments(data_args, args)
    preflight.check_reporting(args.report_to)
    check_turn_options(data_args)
    if data_args.expand_conversations:
        logger.info("--expand_conversations: every assistant turn is trained already; nothing to expand")


def check_turn_options(data_args) -> None:
    """--roles_to_train and --train_on_reasoning false act on turns; only chatml and chat_template render turns
    on their own (the other conversation layouts train every assistant turn, reasoning inline)."""
    from dataset_formats import FORMAT_INFO

    turn_formats = ("chatml", "chat_template")
    others = [name for name in data_args.dataset_format
              if FORMAT_INFO[name].chat_layout and name not in turn_formats]
    conversations = [name for name in data_args.dataset_format if FORMAT_INFO[name].chat_layout or name == "chat_template"]
    if data_args.default_system_prompt and not conversations:
        raise UsageError(f"--default_system_prompt applies to conversation formats (chatml, chat_template, sharegpt, "
                         f"...), not to {', '.join(sorted(set(data_args.dataset_format)))}; drop it, or use "
                         "--custom_system_prompt with --dataset_format custom")
    for flag, changed in (("--roles_to_train", list(data_args.roles_to_train) != ["assistant"]),
                          ("--train_on_reasoning false", not data_args.train_on_reasoning)):
        if changed and others:
            raise UsageError(f"{flag} applies to --dataset_format chatml and chat_template, not to "
                             f"{', '.join(sorted(set(others)))}; switch those datasets to one of them or drop the flag")


def check_merge_arguments(model_args: ModelArguments, args: TrainingArguments) -> None:
    if args.merge_only and not args.merged_output_dir:
        raise UsageError("--merge_only writes the merged model to --merged_output_dir; pass it")
    if args.merge_only and not os.path.isfile(os.path.join(args.output_dir, "adapter_config.json")):
        raise UsageError(f"--merge_only merges the adapter in --output_dir, and {args.output_dir} has no "
                         "adapter_config.json; pass the directory a LoRA run saved to (or a checkpoint-N in it)")
    if args.merge_only and args.overwrite_output_dir:
        raise UsageError("--overwrite_output_dir deletes checkpoints and --merge_only never changes --output_dir; drop it")
    if args.merge_base == "nf4_roundtrip" and not args.merge_only and args.bits != 4:
        raise UsageError(f"--merge_base nf4_roundtrip re-creates the 4-bit weights of a --bits 4 run (got --bits "
                         f"{args.bits}); drop --merge_base or use --merge_base original")
    if args.merged_output_dir:  # the merge replaces that directory whole: it must not hold what it reads
        merged = os.path.realpath(args.merged_output_dir)
        local_model = model_args.model_name_or_path if os.path.isdir(model_args.model_name_or_path) else None
        for flag, path in (("--output_dir", args.output_dir), ("--model_name_or_path", local_model)):
            if path and os.path.commonpath([merged, os.path.realpath(path)]) == merged:
                raise UsageError(f"--merged_output_dir {args.merged_output_dir} would replace {flag} {path}; pick "
                                 "another directory")


def check_mode_flags(args: TrainingArguments) -> None:
    """Flags of a mode the run is not in would be silently ignored: set away from their defaults, they are refused."""
    lora = non_default(args, ADAPTER_FLAGS + LORA_SHAPE_FLAGS) if args.full_finetune else []
    if lora:
        raise UsageError(f"{', '.join(lora)}: adapter settings, but --full_finetune trains no adapter; drop them or "
                         "drop --full_finetune")
    if not args.full_finetune:
        check_adapter_flags(args)
    quantization = non_default(args, ("quant_type", "quant_storage")) if args.bits != 4 else []
    if quantization:
        raise UsageError(f"{', '.join(quantization)} only apply to --bits 4 (got --bits {args.bits}); drop them or "
                         "pass --bits 4")


ADAPTER_FLAGS = ("use_dora", "use_rslora", "init_lora_weights", "loraplus_lr_ratio", "lora_model_dir", "peft_method",
                 "lora_modules_to_save")
LORA_SHAPE_FLAGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_modules")


def check_adapter_flags(args: TrainingArguments) -> None:
    """The LoRA variants against each other, the precision and the merge."""
    if args.peft_method == "llama_adapter":
        lora = non_default(args, tuple(f for f in ADAPTER_FLAGS if f != "peft_method") + LORA_SHAPE_FLAGS)
        if lora:
            raise UsageError(f"{', '.join(lora)}: LoRA settings, but --peft_method llama_adapter trains no LoRA; drop "
                             "them or use --peft_method lora")
        if args.merged_output_dir:
            raise UsageError("--merged_output_dir: a llama_adapter (adaption prompts with gates) cannot be merged into "
                             "the base weights; drop --merged_output_dir (load the adapter with peft on its base)")
    else:
        non_lora = non_default(args, ("llama_adapter_len", "llama_adapter_layers"))
        if non_lora:
            raise UsageError(f"{', '.join(non_lora)} only apply to --peft_method llama_adapter; drop them or add it")
    init = args.init_lora_weights
    if init in ("pissa", "olora") and args.bits in (4, 8):
        raise UsageError(f"--init_lora_weights {init} moves part of each weight into the adapter; with --bits "
                         f"{args.bits} the rest would be quantized, so no merge could reproduce what was trained. "
                         "Use --bits 16 or 32, or --init_lora_weights loftq for a 4-bit base")
    if init == "loftq" and args.bits != 4:
        raise UsageError(f"--init_lora_weights loftq fits the adapter to a 4-bit base's quantization error; it needs "
                         f"--bits 4 (got {args.bits})")
    if init == "loftq" and args.merged_output_dir and args.merge_base != "nf4_roundtrip":
        raise UsageError("--init_lora_weights loftq: the adapter corrects the 4-bit weights, so merged into the 16-bit "
                         "ones it would add the quantization error back; pass --merge_base nf4_roundtrip")
    if args.lora_model_dir:
        own = non_default(args, ("use_dora", "use_rslora", "init_lora_weights") + LORA_SHAPE_FLAGS)
        if own:
            raise UsageError(f"{', '.join(own)}: --lora_model_dir {args.lora_model_dir} continues that adapter with "
                             "its own settings; drop these flags (or drop --lora_model_dir to start new adapters)")
        if os.path.realpath(args.lora_model_dir) == os.path.realpath(args.output_dir):
            raise UsageError(f"--lora_model_dir {args.lora_model_dir} is --output_dir: the run would overwrite the "
                             "adapter it starts from; pick another --output_dir (or re-run that run's command to "
                             "resume it)")


PREFERENCE_FLAGS = {"rl_beta": ("dpo", "ipo", "orpo", "simpo", "kto"), "simpo_gamma": ("simpo",),
                    "label_smoothing": ("dpo", "simpo"), "precompute_ref_log_probs": ("dpo", "ipo"),
                    "desirable_weight": ("kto",), "undesirable_weight": ("kto",)}  # flag -> the --rl methods reading it


def check_preference_flags(data_args: DataArguments, args: TrainingArguments) -> None:
    """--rl against the data formats, packing and sharding; its knobs only with a method that reads them."""
    from dataset_formats import FORMAT_INFO

    method = data_args.rl
    unread = [flag for flag in non_default(args, tuple(PREFERENCE_FLAGS))
              if method not in PREFERENCE_FLAGS[flag.split()[0].removeprefix("--")]]
    if unread:
        raise UsageError(f"{', '.join(unread)}: " + (f"not read by --rl {method}" if method else "preference settings, "
                         "but no --rl") + "; drop them or pick a method that uses them "
                         "(" + "; ".join(f"--{k}: {', '.join(v)}" for k, v in PREFERENCE_FLAGS.items()) + ")")
    if not method:
        return
    no_pairs = sorted({name for name in data_args.dataset_format if FORMAT_INFO[name].pairs is None})
    if no_pairs:
        usable = sorted(name for name, info in FORMAT_INFO.items() if info.pairs is not None)
        raise UsageError(f"--rl {method}: --dataset_format {', '.join(no_pairs)} has no preference-pair layout; use "
                         f"one of {', '.join(usable)} (see finetune/data/pairs.py for the record layouts)")
    packing = [flag for flag, on in (("--sample_packing", data_args.sample_packing),
                                      ("--eval_sample_packing", data_args.eval_sample_packing)) if on]
    if packing or data_args.train_on_source:
        raise UsageError(f"--rl {method} compares each pair's two answers after their shared prompt, so "
                         f"{', '.join(packing + ['--train_on_source'] * data_args.train_on_source)} cannot apply; "
                         "drop it")
    sharded = preflight.fsdp_requested(args) or preflight.deepspeed_settings(args).get("stage") == 3
    if method == "kto" and args.per_device_train_batch_size < 2:
        raise UsageError("--rl kto compares each answer with the batch's mismatched prompt/answer pairs (its KL "
                         "reference point); pass --per_device_train_batch_size 2 or more")
    if method in ("dpo", "ipo", "kto") and args.full_finetune and sharded and not args.precompute_ref_log_probs:
        raise UsageError(f"--rl {method} --full_finetune keeps a frozen reference copy of the model, which is not "
                         "built for ZeRO-3 / FSDP sharding yet; use ZeRO-2, LoRA (the reference is the base with the "
                         "adapters off), or --rl orpo / simpo (no reference)")
    if args.precompute_ref_log_probs and sharded:
        raise UsageError("--precompute_ref_log_probs runs the reference before the sharded model exists; under "
                         "ZeRO-3 / FSDP drop it (LoRA's reference costs no memory) or use ZeRO-2")


def check_training_knobs(data_args: DataArguments, args: TrainingArguments) -> None:
    """Freezing, NEFTune and optimizer flags, as far as they can be judged without the model."""
    if args.layers_to_freeze is not None and args.layer_freeze_ratio is not None:
        raise UsageError("--layers_to_freeze and --layer_freeze_ratio both given; pick one")
    if args.neftune_noise_alpha is not None and data_args.sample_packing:
        logger.info("--neftune_noise_alpha with --sample_packing: the noise scale alpha/sqrt(L*d) uses the packed row "
                    "length L, so each sample gets less noise than it would unpacked")
    check_deepspeed_overrides(args)


def check_deepspeed_overrides(args: TrainingArguments) -> None:
    """A DeepSpeed config with its own "optimizer" or "scheduler" section wins: the Trainer then ignores --optim or
    --lr_scheduler_type without a word. A flag set away from its default is an error; otherwise say which is used."""
    if not args.deepspeed:
        return
    config = args.hf_deepspeed_config.config  # the JSON as TrainingArguments read it
    for section, flag, name in (("optimizer", "--optim", "optim"),
                                ("scheduler", "--lr_scheduler_type", "lr_scheduler_type")):
        if section not in config:
            continue
        kind = config[section].get("type", "?") if isinstance(config[section], dict) else "?"
        if non_default(args, (name,)):
            raise UsageError(f"{non_default(args, (name,))[0]} would be ignored: --deepspeed {args.deepspeed} has its "
                             f"own \"{section}\" ({kind}); drop {flag}, or delete that section to use {flag}")
        if process_rank() == 0:  # a fact about the config, not about a rank: say it once
            logger.warning("--deepspeed %s has its own \"%s\" (%s): it is used instead of %s %s",
                           args.deepspeed, section, kind, flag, enum_value(getattr(args, name)))


def check_output_arguments(data_args: DataArguments, args: TrainingArguments) -> None:
    """Predictions, throughput and hub flags; the hub itself is probed here, before anything loads."""
    if args.do_predict and args.generation_samples <= 0:
        raise UsageError(f"--generation_samples must be > 0 with --do_predict (got {args.generation_samples})")
    if args.eval_generation_samples and args.eval_strategy == "no":
        raise UsageError("--eval_generation_samples generates at each evaluation, and --eval_strategy is no; pass "
                         "--eval_strategy steps (with --eval_dataset_size), or use --do_predict after training")
    if args.export_gguf and not (args.full_finetune or args.merged_output_dir):
        raise UsageError(f"--export_gguf {' '.join(args.export_gguf)} exports a whole model: an adapter run needs "
                         "--merged_output_dir (the GGUF files go to <merged_output_dir>/gguf), or use --full_finetune")
    if args.export_gptq and not (args.full_finetune or args.merged_output_dir):
        raise UsageError(f"--export_gptq {args.export_gptq} quantizes a whole model: an adapter run needs "
                         "--merged_output_dir (the model goes to <merged_output_dir>/gptq-BITSbit), or use --full_finetune")
    if args.export_gptq and args.merge_only and not data_args.dataset:
        raise UsageError(f"--export_gptq {args.export_gptq} --merge_only calibrates on training samples; pass the "
                         "run's --dataset (and its --dataset_format)")
    gptq_knobs = non_default(args, ("gptq_group_size", "quantization_max_samples")) if not args.export_gptq else []
    if gptq_knobs:
        raise UsageError(f"{', '.join(gptq_knobs)} only apply to --export_gptq; add it or drop them")
    strategy = enum_value(args.hub_strategy)
    if strategy != "every_save":
        raise UsageError(f"--hub_strategy {strategy} would be ignored: checkpoints are never pushed, only the finished "
                         "output directories (see --push_to_hub); drop --hub_strategy")
    if args.hub_model_id and not args.push_to_hub:
        raise UsageError(f"--hub_model_id {args.hub_model_id} without --push_to_hub uploads nothing; add --push_to_hub "
                         "or drop --hub_model_id")
    problem = preflight.hub_push_problem(args) if args.push_to_hub else None
    if problem:
        raise UsageError(problem)
