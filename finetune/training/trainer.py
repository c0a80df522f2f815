"""The Trainer of a run: transformers' Trainer with tokens/s and MFU in every log line, given its own copy of the
arguments (checkpoints go to the working directory, pushing is ours), and the callbacks every run carries."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Optional

import transformers

from finetune.data.pipeline import Collator
from finetune.outputs import inference
from finetune.training import throughput
from finetune.training.callbacks import (
    EarlyStopping,
    EvalGenerationCallback,
    FlopCounterCallback,
    LossWatchdog,
    PreemptionCallback,
    ProfilerCallback,
)
from finetune.training.loss import LogitsMismatch, TrainedTokenLoss

if TYPE_CHECKING:
    from finetune.run_paths import RunPaths
    from train import DataArguments, TrainingArguments

logger = logging.getLogger(__name__)


class FinetuneTrainer(transformers.Trainer):
    """The Trainer, plus real (non-padding) tokens per second in every log line, and MFU next to it when the
    device's peak is known (the `throughput` meter)."""

    def __init__(self, *args, throughput: Optional[throughput.Throughput] = None,
                 trained_token_loss: Optional[TrainedTokenLoss] = None, **kwargs):
        super().__init__(*args, compute_loss_func=trained_token_loss, **kwargs)
        self.throughput = throughput
        self.trained_token_loss = trained_token_loss
        self.tokens_clock: Optional[tuple[float, int]] = None  # (time, tokens seen) at the last loss log

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        now, seen = time.time(), self.state.num_input_tokens_seen
        last = self.tokens_clock
        if "loss" in logs and last and now > last[0] and seen:
            logs["tokens_per_second"] = round((seen - last[1]) / (now - last[0]), 1)
            if self.throughput is not None:
                logs.update(self.throughput.utilization(logs["tokens_per_second"]))
        if "loss" in logs or last is None:
            self.tokens_clock = (now, seen)
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """With the trained-token loss (loss.py): the model's forward computes one position's logits, the loss
        takes the decoder's output and applies the head where labels are trained. Everything around it (label
        counting, gradient-accumulation and rank scaling) is the Trainer's own."""
        loss = self.trained_token_loss
        if loss is None or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        try:
            with loss.capturing():
                return super().compute_loss(model, {**inputs, "logits_to_keep": 1}, return_outputs,
                                            num_items_in_batch)
        except LogitsMismatch as mismatch:
            logger.warning("Loss: plain transformers path from now on: %s, so the trained-token loss would not "
                           "be this model's loss", mismatch)
            self.trained_token_loss = self.compute_loss_func = None
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; with --loraplus_lr_ratio the LoRA B matrices move to groups of their own at that
        multiple of each group's learning rate (the scheduler then scales every group alike)."""
        optimizer = super().create_optimizer(model)
        ratio = self.args.loraplus_lr_ratio
        if ratio and not any(group.get("loraplus") for group in optimizer.param_groups):
            faster = {id(p) for name, p in (model or self.model).named_parameters() if "lora_B" in name}
            for group in list(optimizer.param_groups):
                moved = [p for p in group["params"] if id(p) in faster]
                if moved:
                    group["params"] = [p for p in group["params"] if id(p) not in faster]
                    optimizer.add_param_group({**group, "params": moved, "lr": group["lr"] * ratio, "loraplus": True})
            optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        return optimizer

    def callback(self, kind: type):
        return next((c for c in self.callback_handler.callbacks if isinstance(c, kind)), None)

    def stopped_by_signal(self) -> Optional[int]:
        return self.callback(PreemptionCallback).signal_received

    def watchdog_tripped(self) -> Optional[str]:
        return self.callback(LossWatchdog).tripped


def trainer_arguments(args: TrainingArguments, paths: RunPaths) -> TrainingArguments:
    """The Trainer's own copy of the run's arguments: it writes checkpoints to the working directory, never
    pushes (outputs/hub.py pushes the finished outputs once), keeps every dataset column (packed rows carry
    position_ids), and pickles no hub token into training_args.bin. The user's arguments stay as parsed."""
    return dataclasses.replace(args, output_dir=paths.working, push_to_hub=False, hub_token=None,
                               remove_unused_columns=False)


def loss_for(model, args: TrainingArguments) -> Optional[TrainedTokenLoss]:
    """The trained-token loss (--chunked_cross_entropy), or None and one log line saying why not."""
    if not args.chunked_cross_entropy:
        logger.info("Loss: transformers' plain causal-LM loss (--chunked_cross_entropy False)")
        return None
    loss, why_not = TrainedTokenLoss.for_model(model, args.cross_entropy_chunk_size, args.label_smoothing_factor)
    if loss is None:
        logger.info("Loss: transformers' plain causal-LM loss: %s", why_not)
    else:
        logger.info("Loss: logits only at trained positions, %d per chunk", args.cross_entropy_chunk_size)
    return loss


def build_trainer(model, args: TrainingArguments, paths: RunPaths, data_args: DataArguments, tokenizer, train,
                  evaluation, gen_config=None) -> FinetuneTrainer:
    """Packed rows carry position_ids and no attention mask; one collator handles both row kinds."""
    return FinetuneTrainer(
        trained_token_loss=loss_for(model, args),
        data_collator=Collator(tokenizer.pad_token_id, data_args.pad_to_multiple_of),
        **trainer_parts(model, args, paths, tokenizer, train, evaluation, gen_config),
    )


def trainer_parts(model, args: TrainingArguments, paths: RunPaths, tokenizer, train, evaluation, gen_config) -> dict:
    """What every Trainer of a run gets (SFT and preference): its arguments, data, callbacks, throughput meter."""
    if args.eval_strategy == "no":
        evaluation = None
    model.config.use_cache = False  # with a cache, transformers would not look for packed sequences
    meter = throughput.measure(model, args, train)
    callbacks = [PreemptionCallback(), LossWatchdog(args.loss_watchdog_threshold, args.loss_watchdog_patience)]
    if args.early_stopping_patience:
        callbacks.append(EarlyStopping(args.early_stopping_patience))
    if args.flop_counter:
        callbacks.append(FlopCounterCallback(meter))
    if args.profiler_dir:
        callbacks.append(ProfilerCallback(args.profiler_dir, args.process_index))
    if args.eval_generation_samples and evaluation is not None and gen_config is not None:
        # the first N eval samples' trained prompts, answered at every evaluation
        pairs = inference.sample_prompts(evaluation, args.eval_generation_samples)
        callbacks.append(EvalGenerationCallback(tokenizer, pairs, gen_config, args.per_device_eval_batch_size))
    return {"model": model, "args": trainer_arguments(args, paths), "train_dataset": train,
            "eval_dataset": evaluation, "processing_class": tokenizer, "callbacks": callbacks, "throughput": meter}
