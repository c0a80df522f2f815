"""Where a run reads and writes, decided once from the flags: the final outputs (--output_dir), checkpoints
(--working_dir), the prepared data, the merged model, the `completed` marker and the checkpoint to resume from.

Built once by RunPaths.from_args and passed on; the argument objects are never rewritten to carry these."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger(__name__)

COMPLETED_MARKER = "completed"
RESUME_LATEST = ("true", "latest", "1")  # --resume_from_checkpoint values that mean "the newest complete checkpoint"


@dataclass(frozen=True)
class RunPaths:
    final: str  # --output_dir: the final model or adapter, tokenizer, generation config, reports
    working: str  # --working_dir (default --output_dir): checkpoints, train/eval metrics of the Trainer
    prepared: str  # --dataset_prepared_path (default <working>/prepared_data)
    merged: Optional[str]  # --merged_output_dir
    resume_from: Optional[str] = None  # an explicit --resume_from_checkpoint DIR (None: the newest complete one)

    @classmethod
    def from_args(cls, args, data_args) -> RunPaths:
        working = args.working_dir or args.output_dir
        resume = args.resume_from_checkpoint
        explicit = resume if resume and str(resume).lower() not in RESUME_LATEST else None
        return cls(final=args.output_dir, working=working,
                   prepared=data_args.dataset_prepared_path or os.path.join(working, "prepared_data"),
                   merged=args.merged_output_dir, resume_from=explicit)

    @property
    def marker(self) -> str:
        return os.path.join(self.final, COMPLETED_MARKER)

    def is_completed(self) -> bool:
        return os.path.isfile(self.marker)

    def mark_completed(self, global_step: int) -> None:
        with open(self.marker, "w") as handle:
            json.dump({"global_step": global_step, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, handle)

    def merge_is_missing(self) -> bool:
        return bool(self.merged) and not os.path.isfile(os.path.join(self.merged, "config.json"))

    @property
    def initial_adapter(self) -> str:
        """--init_lora_weights pissa/olora: the adapter as initialised (the saved adapter is converted against it)."""
        return os.path.join(self.working, "initial_adapter")

    def staging(self) -> str:
        """Where the final save is written before its files are renamed into --output_dir (one per launch)."""
        return os.path.join(self.final, f".final-tmp-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}")

    def start_fresh(self) -> None:
        """--overwrite_output_dir: old checkpoints and the completed marker go (rank 0 only)."""
        for name in os.listdir(self.working) if os.path.isdir(self.working) else []:
            if name.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(self.working, name))
        if os.path.exists(self.marker):
            os.remove(self.marker)
        logger.info("--overwrite_output_dir: old checkpoints and the completed marker removed; starting fresh")

    def newest_checkpoint(self) -> Optional[str]:
        """The newest checkpoint-N in the working dir that was completely written (its trainer_state.json exists)."""
        if not os.path.isdir(self.working):
            return None
        steps = sorted(
            (int(name.split("-")[1]), name)
            for name in os.listdir(self.working)
            if name.startswith("checkpoint-") and name.split("-")[1].isdigit()
        )
        for _, name in reversed(steps):
            path = os.path.join(self.working, name)
            if checkpoint_is_complete(path):
                return path
            logger.warning("ignoring incomplete checkpoint %s (interrupted while it was written)", path)
        return None

    def resume_checkpoint(self) -> Optional[str]:
        """--resume_from_checkpoint DIR when given (checked before anything loads), else the newest complete one."""
        return self.resume_from or self.newest_checkpoint()


def checkpoint_is_complete(path: str) -> bool:
    """The Trainer writes trainer_state.json last, after weights, optimizer, scheduler and RNG states; a checkpoint
    whose state file is missing or unreadable (or that carries transformers' JIT-checkpoint sentinel) is torn."""
    if os.path.exists(os.path.join(path, "checkpoint-is-incomplete.txt")):
        return False
    try:
        with open(os.path.join(path, "trainer_state.json")) as handle:
            return "global_step" in json.load(handle)
    except (OSError, ValueError):
        return False
