"""The stage stack of a run, built by one function for train.py's run() and for the tests: tokenizer and
generation config, the prepared datasets, the model with its adapters, the Trainer. Also the training stage
itself and the dry run, which goes through the same checks and tokenization and stops before any weights."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import transformers

from dataset_formats import end_token_id
from finetune.checks.preflight import check_disk_space, fsdp_requested, resolve_attention
from finetune.data import pipeline, preparation
from finetune.modeling.adapters import MUTATED_INITS, add_adapters, save_initial_adapter
from finetune.modeling.loading import load_model
from finetune.modeling.tokenizer import load_tokenizer
from finetune.training import planning
from finetune.training.preference_trainer import build_preference_trainer
from finetune.training.trainer import FinetuneTrainer, build_trainer

if TYPE_CHECKING:
    from finetune.run_paths import RunPaths
    from train import DataArguments, GenerationArguments, ModelArguments, TrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class Stages:
    tokenizer: Any
    gen_config: transformers.GenerationConfig
    train_set: Any  # datasets.Dataset of tokenized (or packed) rows
    eval_set: Any  # the eval split, or None
    stats: dict  # what the data preparation counted (stats.json)
    model: Any = None  # the model with its adapters (None when only the data was built)
    trainer: Optional[FinetuneTrainer] = None


def build_stages(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments,
                 gen_args: GenerationArguments, paths: RunPaths, with_model: bool = True) -> Stages:
    """Tokenizer, datasets, then (with_model) model, adapters and Trainer, in the order run() needs them."""
    tokenizer = load_tokenizer(model_args, data_args)
    gen_config = generation_config(gen_args, tokenizer, data_args.dataset_format)
    train_set, eval_set, stats = build_datasets(data_args, args, paths, tokenizer)
    stages = Stages(tokenizer, gen_config, train_set, eval_set, stats)
    if with_model:
        # new token rows and adapter weights are drawn at random: seeded here, they do not depend on what the data
        # stage drew (a cold tokenization and a cached one used to give different adapters from the same --seed)
        transformers.set_seed(args.seed)
        model, new_tokens = load_model(model_args, args, tokenizer)
        stages.model = add_adapters(model, args, new_tokens)
        if args.init_lora_weights in MUTATED_INITS and not args.lora_model_dir and args.process_index == 0:
            save_initial_adapter(stages.model, paths.initial_adapter)  # the same on every (re)start: a seeded init
        build = build_preference_trainer if data_args.rl else build_trainer
        stages.trainer = build(stages.model, args, paths, data_args, tokenizer, train_set, eval_set, gen_config)
    return stages


def build_datasets(data_args: DataArguments, args: TrainingArguments, paths: RunPaths, tokenizer, write: bool = True):
    """Rank 0 prepares (and caches) first; the other ranks then reuse its cache or repeat the same seeded work.
    write=False (--dry_run, --merge_only) reads an existing cache but writes none."""
    seed = args.data_seed if args.data_seed is not None else args.seed
    if write and args.world_size > 1 and one_machine():
        # rank 0 prepares and writes the cache; the others poll for it (no barrier: no --ddp_timeout to hit)
        if args.process_index == 0:
            train, evaluation, stats = preparation.prepare_datasets(data_args, tokenizer, seed, paths.prepared, write=True)
        else:
            key = preparation.fingerprint(data_args, tokenizer, seed)
            train, evaluation, stats = preparation.wait_for_cache(paths.prepared, key)
    else:
        with args.main_process_first(desc="dataset preparation"):
            train, evaluation, stats = preparation.prepare_datasets(data_args, tokenizer, seed, paths.prepared,
                                                                    write=write and args.process_index == 0)
    logger.info("sample 0 as trained ([[...]] = trained tokens):\n%s", pipeline.preview(train[0], tokenizer))
    return train, evaluation, stats


def one_machine() -> bool:
    """All ranks on this machine (torchrun / accelerate set LOCAL_WORLD_SIZE and WORLD_SIZE), so they share its disk."""
    return os.environ.get("LOCAL_WORLD_SIZE", "1") == os.environ.get("WORLD_SIZE", "1")


def generation_config(gen_args: GenerationArguments, tokenizer, formats: list[str]) -> transformers.GenerationConfig:
    """Saved next to the model: generation stops at the formats' end-of-answer tokens as well as at EOS."""
    stop = sorted({tokenizer.eos_token_id} | {end_token_id(name, tokenizer) for name in formats})
    return transformers.GenerationConfig(
        **vars(gen_args),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=tokenizer.pad_token_id,
    )


def prepare_directories(args: TrainingArguments, paths: RunPaths) -> None:
    """--overwrite_output_dir: rank 0 removes old checkpoints and the completed marker before anything starts."""
    if args.overwrite_output_dir and args.process_index == 0:
        paths.start_fresh()


def train(trainer: FinetuneTrainer, args: TrainingArguments, paths: RunPaths) -> int:
    """Train (resuming from the run's checkpoint), then 0; or the exit code of a stop: 128 + signal after a
    preemption (a checkpoint was saved), 3 when the loss watchdog tripped (nothing saved)."""
    check_disk_space(trainer.model, args, paths.working)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    logger.info(
        "world size %d: %d per device x %d accumulation x %d processes = %d samples per optimizer step",
        args.world_size, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size, per_step,
    )
    checkpoint = paths.resume_checkpoint()
    if checkpoint:
        logger.info("resuming from %s (weights, optimizer, scheduler, RNG and data position)", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    if trainer.stopped_by_signal():
        logger.warning("stopped at step %d with a checkpoint in %s; run the same command again to resume",
                       trainer.state.global_step, paths.working)
        return 128 + trainer.stopped_by_signal()
    if trainer.watchdog_tripped():
        logger.error("loss watchdog: %s; stopped without saving these weights. Last good state: %s. Lower "
                     "--learning_rate or check the data, then re-run (it resumes there)",
                     trainer.watchdog_tripped(), paths.newest_checkpoint() or "none (no checkpoint yet)")
        return 3
    return 0


def dry_run(config, model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments,
            paths: RunPaths) -> int:
    """--dry_run: the same checks and tokenization as a real run, nothing loaded but the config, nothing written."""
    import torch

    tokenizer = load_tokenizer(model_args, data_args)
    train_set, _, _ = build_datasets(data_args, args, paths, tokenizer, write=False)
    world_size = args.dry_run_world_size or args.world_size
    plan = planning.make_plan(config, tokenizer, train_set, args, data_args.model_max_len, world_size,
                              resolve_attention(model_args.attn_implementation, warn=False), fsdp=fsdp_requested(args),
                              preference=data_args.rl)
    logger.info("%s", planning.describe(plan, args))
    logger.info("plan-json: %s", plan.as_json())
    if torch.cuda.is_available():
        capacity = torch.cuda.get_device_properties(args.local_process_index).total_memory / planning.GIB
        if plan.memory_gib_at_max_len["total"] > 0.9 * capacity:
            logger.warning("the estimate (%.1f GiB) exceeds 90 %% of this GPU's %.1f GiB: lower "
                           "--per_device_train_batch_size, add --activation_checkpointing, use --bits 4 or ZeRO-3",
                           plan.memory_gib_at_max_len["total"], capacity)
    return 0
