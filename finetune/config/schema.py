"""Reading the argument dataclasses of train.py: a flag's value as the user typed it, and which flags were set."""

from __future__ import annotations

import dataclasses


def enum_value(value):
    """TrainingArguments turns some choices into enums (optim, lr_scheduler_type, eval_strategy...); this is the
    word the user typed."""
    return getattr(value, "value", value)


def non_default(args, names: tuple[str, ...]) -> list[str]:
    """'--name value' for each of these flags set away from its default (what a user explicitly asked for)."""
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    values = {name: enum_value(getattr(args, name)) for name in names}
    return [f"--{name} {value}" for name, value in values.items() if value != defaults[name]]


def check_choices(instance) -> None:
    """Fields declared with metadata choices hold one of them. argparse checks typed flags, but not values that
    come from a recipe file (parser defaults) or from code."""
    from finetune.errors import UsageError

    for item in dataclasses.fields(instance):
        choices = item.metadata.get("choices")
        value = getattr(instance, item.name)
        values = value if isinstance(value, list) else [value]
        if choices and value is not None and any(v not in choices for v in values):
            bad = next(v for v in values if v not in choices)
            raise UsageError(f"--{item.name} {bad}: not one of {', '.join(map(str, choices))}")
