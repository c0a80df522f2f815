"""The command line, read the way users type it: a recipe file first (its keys become parser defaults, so flags
win), legacy flag names mapped with one log line each, repeated list flags joined, unknown flags refused with the
closest match. The schema itself is the argument dataclasses of train.py; cross-field rules are config/validate.py."""

from __future__ import annotations

import logging
import os
from typing import Optional

from transformers import HfArgumentParser

from finetune.config import environment, recipes
from finetune.config.flags import LEGACY_FLAGS, closest_flag_hint, known_flags, legacy_value
from finetune.errors import UsageError

logger = logging.getLogger(__name__)

LIST_FLAGS = ("--dataset", "--dataset_format", "--dataset_weights")


def build_parser(classes: tuple, description: str) -> HfArgumentParser:
    return HfArgumentParser(classes, allow_abbrev=False, description=description)


def parse_arguments(argv: list[str], classes: tuple, description: str = "") -> tuple:
    """argv -> one instance of each argument dataclass, validated field by field (their __post_init__)."""
    parser = build_parser(classes, description)
    recipe_defaults: dict = {}
    if argv and not argv[0].startswith("-") and argv[0].endswith(recipes.RECIPE_SUFFIXES):
        recipe_defaults = recipes.load_recipe(argv[0], parser)
        parser.set_defaults(**recipe_defaults)
        argv = argv[1:]
    argv = merge_repeated_list_flags(map_legacy_flags(argv))
    deepspeed = argv[argv.index("--deepspeed") + 1] if "--deepspeed" in argv[:-1] else recipe_defaults.get("deepspeed")
    if isinstance(deepspeed, str) and deepspeed.endswith(".json") and not os.path.isfile(deepspeed):
        # TrainingArguments would reject it with a message that names no flag
        raise UsageError(f"--deepspeed {deepspeed}: config file not found (cwd: {os.getcwd()})")
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:  # TrainingArguments.__post_init__ checks
        raise UsageError(str(error).strip().splitlines()[0]) from error
    if remaining:
        reject_unknown(parser, remaining)
    environment.load_env_file(next(o.env_file for o in parsed if hasattr(o, "env_file")))
    return tuple(parsed)


def map_legacy_flags(argv: list[str]) -> list[str]:
    """Old names users still type are mapped to today's, one log line each; never silently dropped."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, eq, inline = token.partition("=")
        if name not in LEGACY_FLAGS:
            out.append(token)
            i += 1
            continue
        value: Optional[str] = inline if eq else None
        if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        i += 1
        mapped = legacy_value(name, value)
        if mapped:
            out += [mapped[0], str(mapped[1])]
    return out


def merge_repeated_list_flags(argv: list[str]) -> list[str]:
    """`--dataset a.json --dataset b.json` means both (argparse would keep only the last)."""
    merged: dict[str, list[str]] = {}
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in LIST_FLAGS:
            flag, values = argv[i], []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            if flag not in merged:
                merged[flag] = []
                out.append(flag)  # placeholder, filled below
            merged[flag] += values
            continue
        out.append(argv[i])
        i += 1
    result: list[str] = []
    for token in out:
        result += [token] + merged[token] if token in merged else [token]
    return result


def reject_unknown(parser: HfArgumentParser, remaining: list[str]) -> None:
    known = known_flags(parser)
    for token in remaining:
        if token.startswith("-"):
            flag = token.split("=")[0]
            raise UsageError(f"unknown flag {flag}{closest_flag_hint(flag, known)}")
    raise UsageError(f"unexpected argument {remaining[0]!r} (a value without a flag?)")


SECRET_FIELDS = ("hub_token",)


def settings_text(objects: tuple, classes: tuple) -> str:
    """--print_config: the values that differ from what the same machine resolves with no recipe and no flags, one
    `flag: value` line each (YAML: a recipe file this trainer reads), by argument class. Derived values a machine
    resolves by itself (use_cpu, ...) are equal on both sides, so they stay out and the file runs the same elsewhere."""
    import dataclasses
    import enum

    import yaml

    def plain(value):
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if dataclasses.is_dataclass(value):
            return plain(dataclasses.asdict(value))
        return value

    baseline = parse_arguments([], classes)
    legacy = {flag.lstrip("-") for flag in LEGACY_FLAGS}
    lines = []
    for obj, plain_obj in zip(objects, baseline):
        settings = {}
        for item in dataclasses.fields(obj):
            if not item.init or item.name in SECRET_FIELDS or item.name in legacy or item.name == "print_config":
                continue
            value = plain(getattr(obj, item.name))
            if value != plain(getattr(plain_obj, item.name)):
                settings[item.name] = value
        if settings:
            lines.append(f"# {type(obj).__name__}\n" + yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))
    return "\n".join(lines)
