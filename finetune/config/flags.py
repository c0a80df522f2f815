"""Flag names: the legacy names users still type and how they map to today's, and the closest-match hint for an
unknown flag. Shared by the command line (cli.py) and recipe files (recipes.py)."""

from __future__ import annotations

import difflib
import logging
from typing import Optional

from finetune.errors import UsageError

logger = logging.getLogger(__name__)

# legacy flag -> (today's flag, how a value maps, log line); value None means "the value carries over"
LEGACY_FLAGS = {
    "--evaluation_strategy": ("--eval_strategy", None, "transformers 5 renamed it"),
    "--warmup_ratio": ("--warmup_steps", None, "transformers 5 takes a ratio < 1 in --warmup_steps"),
    "--use_flash_attention_2": ("--attn_implementation", "flash_attention_2", "one switch for all kernels"),
    "--group_by_length": ("--train_sampling_strategy", "group_by_length", "transformers 5 renamed it"),
    "--gradient_checkpointing": ("--activation_checkpointing", True, "transformers 5 renamed it"),
    "--no_cuda": ("--use_cpu", True, "transformers 5 renamed it"),
    "--skip_excess_length": ("--excess_length", {True: "drop", False: "truncate"}, "one flag for drop/truncate/raise"),
}
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def known_flags(parser) -> list[str]:
    return sorted({s for action in parser._actions for s in action.option_strings if s.startswith("--")})


def closest_flag_hint(flag: str, known: list[str]) -> str:
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else "; see python train.py --help"


def legacy_value(name: str, value: Optional[str | bool]) -> Optional[tuple[str, object]]:
    """A legacy flag and its value (None for a bare flag) -> (today's flag, value), or None when it enables
    nothing (`--gradient_checkpointing false`). Logs the mapping once."""
    new, fixed, why = LEGACY_FLAGS[name]
    if fixed is None:  # the value carries over
        if value is None:
            raise UsageError(f"{name} needs a value")
        if name == "--warmup_ratio" and not 0 <= float(value) < 1:
            raise UsageError(f"--warmup_ratio {value}: must be in [0, 1); or give --warmup_steps N")
        logger.info("legacy flag %s %s -> %s %s (%s)", name, value, new, value, why)
        return new, value
    enabled = value if isinstance(value, bool) else True if value is None else BOOLEAN_WORDS.get(str(value).lower())
    if enabled is None:
        raise UsageError(f"{name} takes true or false, got {value!r}")
    if isinstance(fixed, dict):
        logger.info("legacy flag %s %s -> %s %s (%s)", name, enabled, new, fixed[enabled], why)
        return new, fixed[enabled]
    if enabled:
        logger.info("legacy flag %s -> %s %s (%s)", name, new, fixed, why)
        return new, fixed
    logger.info("legacy flag %s false: nothing to enable (%s is the current name)", name, new)
    return None
