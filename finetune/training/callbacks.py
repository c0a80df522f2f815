"""The Trainer callbacks: preemption (save at a step boundary, then stop), the loss watchdog, generations at each
evaluation, the FLOP counter and the profiler. Each is added by training/trainer.py or training/throughput.py."""

from __future__ import annotations

import logging
import os
import signal
from typing import Optional

import transformers

from finetune.outputs import inference
from finetune.training import throughput

logger = logging.getLogger(__name__)

PROFILER_SCHEDULE = {"wait": 1, "warmup": 1, "active": 3, "repeat": 1}


class PreemptionCallback(transformers.TrainerCallback):
    """SIGTERM/SIGINT (preemption, Ctrl-C): finish the current optimizer step, save a normal checkpoint at that
    step boundary, stop. All ranks agree on the step (the flag is all-reduced), so the collective save never
    hangs. The run then exits 143/130 without writing final outputs; the same command resumes."""

    def __init__(self):
        self.signal_received: Optional[int] = None
        self.previous: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame) -> None:
        if self.signal_received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal_received = signum
        logger.warning("%s received: saving a checkpoint at the end of this step, then stopping",
                       signal.Signals(signum).name)

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank_flagged(self.signal_received is not None):
            self.signal_received = self.signal_received or signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def any_rank_flagged(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class LossWatchdog(transformers.TrainerCallback):
    """NaN/inf losses, or losses above --loss_watchdog_threshold, for --loss_watchdog_patience logs in a row stop
    the run before the bad weights are saved; the newest checkpoint is the last good state."""

    def __init__(self, threshold: Optional[float], patience: int):
        self.threshold, self.patience = threshold, max(1, patience)
        self.bad = 0
        self.tripped: Optional[str] = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        broken = loss != loss or loss in (float("inf"), float("-inf"))
        self.bad = self.bad + 1 if broken or (self.threshold is not None and loss > self.threshold) else 0
        if self.bad >= self.patience:
            self.tripped = f"loss {loss} at step {state.global_step} ({self.bad} bad logs in a row)"
            control.should_training_stop = True
            control.should_save = False


class EarlyStopping(transformers.TrainerCallback):
    """--early_stopping_patience: stop once the eval loss has not improved for `patience` evaluations in a row."""

    def __init__(self, patience: int):
        self.patience, self.best, self.stale = patience, None, 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if self.best is None or loss < self.best:
            self.best, self.stale = loss, 0
            return
        self.stale += 1
        if self.stale >= self.patience:
            logger.info("early stopping at step %d: eval loss %.4f has not improved on %.4f for %d evaluations",
                        state.global_step, loss, self.best, self.stale)
            control.should_training_stop = True


class EvalGenerationCallback(transformers.TrainerCallback):
    """--eval_generation_samples: at every evaluation, generate answers to the first eval prompts and log them."""

    def __init__(self, tokenizer, pairs, gen_config, batch_size: int):
        self.tokenizer, self.pairs, self.gen_config, self.batch_size = tokenizer, pairs, gen_config, batch_size

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        generated = inference.generate(model, self.tokenizer, [p for p, _ in self.pairs], self.gen_config, self.batch_size)
        if state.is_world_process_zero:
            rows = [{"prompt": self.tokenizer.decode(p), "reference": inference.answer_text(self.tokenizer, r),
                     "prediction": inference.answer_text(self.tokenizer, o)} for (p, r), o in zip(self.pairs, generated)]
            inference.log_samples(f"step {state.global_step} eval generation", rows)



class FlopCounterCallback(transformers.TrainerCallback):
    """--flop_counter: counts the first optimizer step of this session (all its micro-batches, forward and
    backward) with torch.utils.flop_counter.FlopCounterMode, logs TFLOPs/step and uses it for MFU."""

    def __init__(self, meter):  # a throughput.Throughput
        self.meter = meter
        self.mode = None
        self.tokens_before = 0
        self.done = False

    def on_step_begin(self, args, state, control, **kwargs):
        if self.done or self.mode is not None:
            return
        from torch.utils.flop_counter import FlopCounterMode

        self.mode = FlopCounterMode(display=False, custom_mapping=throughput.cpu_attention_formulas())
        self.mode.__enter__()
        self.tokens_before = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.mode is None:
            return
        self.mode.__exit__(None, None, None)
        flops, self.mode, self.done = self.mode.get_total_flops(), None, True
        tokens = state.num_input_tokens_seen - self.tokens_before  # gathered over all ranks
        self.meter.counted_flops_per_step = float(flops)
        if tokens > 0:
            self.meter.counted_flops_per_token = flops * self.meter.world_size / tokens
        logger.info(
            "--flop_counter: step %d took %.6g TFLOPs on this device (%d tokens on all ranks): %.4g GFLOPs per token "
            "counted, %.4g by the model-FLOPs formula", state.global_step, flops / 1e12, tokens,
            (self.meter.counted_flops_per_token or 0) / 1e9, self.meter.flops_per_token / 1e9,
        )


class ProfilerCallback(transformers.TrainerCallback):
    """--profiler_dir: a torch.profiler trace of training steps (wait 1, warmup 1, active 3), as llama-recipes'
    --use_profiler; one trace per rank, readable by TensorBoard, chrome://tracing or ui.perfetto.dev."""

    def __init__(self, directory: str, rank: int):
        self.directory, self.rank = directory, rank
        self.profiler = None

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        os.makedirs(self.directory, exist_ok=True)
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(**PROFILER_SCHEDULE),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(self.directory, worker_name=f"rank{self.rank}"),
            record_shapes=True,
            profile_memory=True,
        )
        self.profiler.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.profiler.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is None:
            return
        self.profiler.stop()  # writes the trace if the active steps began (a run shorter than 3 steps writes none)
        self.profiler = None
        logger.info("--profiler_dir: trace written to %s (TensorBoard, chrome://tracing or ui.perfetto.dev)", self.directory)
