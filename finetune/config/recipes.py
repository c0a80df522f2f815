"""Recipe files (`python train.py recipe.yaml [flags]`): a YAML or JSON mapping of flag names to values, loaded
as the parser's defaults, so flags given after the file win (as TRL's scripts do with their configs).

Keys are flag names without `--`. Also accepted: `datasets: [{path, format | type, weight, split, name, data_files},
...]` (several datasets with their formats; split / name / data_files become the source's `?split=..` options),
`custom_format: {format, no_input_format, field_instruction, ...}` (the --custom_* flags) and the legacy flag names, mapped like on the command line. An unknown key is an error naming the closest flag. An axolotl
config (its keys: base_model, micro_batch_size, ...) is translated first (finetune/config/axolotl.py), and a RunPod
worker job file is read as its args (finetune/config/environment.py)."""

from __future__ import annotations

import json
import os

from finetune.config import axolotl, environment
from finetune.config.flags import LEGACY_FLAGS, closest_flag_hint, legacy_value
from finetune.errors import UsageError

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


def read_mapping(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"recipe file {path} not found")
    with open(path, encoding="utf-8") as handle:
        try:
            if path.endswith(".json"):
                recipe = json.load(handle)
            else:
                import yaml

                recipe = yaml.safe_load(handle)
        except Exception as error:  # yaml.YAMLError or json.JSONDecodeError
            raise UsageError(f"recipe file {path}: cannot be parsed ({error})") from error
    if not isinstance(recipe, dict):
        raise UsageError(f"recipe file {path}: must be a mapping of flag names to values")
    return recipe


def load_recipe(path: str, parser) -> dict:
    """The recipe's keys as parser defaults: {dest: value}, list flags as lists, legacy names mapped."""
    actions = {action.dest: action for action in parser._actions}
    defaults: dict = {}
    recipe = read_mapping(path)
    if environment.is_runpod_job(recipe):
        recipe = environment.runpod_job_args(path, recipe)
    if axolotl.is_axolotl(recipe):
        recipe = axolotl.translate(path, recipe, {dest for dest, action in actions.items() if action.option_strings})
    for key, value in recipe.items():
        name = str(key).lstrip("-")
        if value is None:
            continue
        if name == "datasets":  # axolotl style: [{path, format | type}, ...]
            defaults.update(recipe_datasets(path, value))
            continue
        if name == "custom_format" and isinstance(value, dict):  # {format, no_input_format, field_instruction, ...}
            for item, setting in value.items():
                defaults.update(checked(path, f"custom_{item}", setting, actions))
            continue
        if f"--{name}" in LEGACY_FLAGS:
            mapped = legacy_value(f"--{name}", value)
            if mapped:
                defaults.update(checked(path, mapped[0].lstrip("-"), mapped[1], actions))
            continue
        defaults.update(checked(path, name, value, actions))
    return defaults


# TrainingArguments fields typed `str` on the command line that take a list from a file (documented `str` or `list[str]`)
TRAINER_LIST_VALUES = {"report_to", "fsdp"}


def checked(path: str, name: str, value, actions: dict) -> dict:
    """{name: value} for a known flag (a scalar becomes a one-item list for list flags); else the closest match."""
    action = actions.get(name)
    if action is None or not action.option_strings:
        known = sorted({s for a in actions.values() for s in a.option_strings if s.startswith("--")})
        raise UsageError(f"recipe file {path}: unknown key '{name}' (unknown flag --{name}"
                         f"{closest_flag_hint('--' + name, known)})")
    if isinstance(value, list) and action.nargs not in ("+", "*") and name not in TRAINER_LIST_VALUES:
        raise UsageError(f"recipe file {path}: key '{name}' takes one value, got a list ({(action.help or '').split('.')[0]})")
    if action.nargs in ("+", "*") and not isinstance(value, list):
        value = [value]
    if action.nargs in ("+", "*"):
        value = [str(v) if action.type in (str, None) else v for v in value]
    return {name: value}


DATASET_ENTRY_KEYS = ("path", "format", "type", "weight", "split", "name", "data_files")


def recipe_datasets(path: str, entries) -> dict:
    """`datasets: [{path, format | type, weight}, ...]` -> --dataset, --dataset_format (and --dataset_weights)."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "path" in e for e in entries):
        raise UsageError(f"recipe file {path}: 'datasets' must be a list of mappings with 'path' (and 'format')")
    for number, entry in enumerate(entries):
        for key in entry:
            if key not in DATASET_ENTRY_KEYS:
                raise UsageError(f"recipe file {path}: datasets[{number}].{key} is not a dataset key"
                                 f"{axolotl.closest(str(key), list(DATASET_ENTRY_KEYS))}; known: {', '.join(DATASET_ENTRY_KEYS)}")
    out: dict = {"dataset": [], "dataset_format": [], "dataset_weights": []}
    refused: list[str] = []
    for number, entry in enumerate(entries):
        for source in axolotl.dataset_sources(f"datasets[{number}]", entry, refused):  # path?split=..&name=..
            out["dataset"].append(source)
            out["dataset_format"].append(str(entry.get("format", entry.get("type", "airoboros"))))
            out["dataset_weights"].append(float(entry.get("weight", 1.0)))
    if refused:
        raise UsageError(f"recipe file {path}: {'; '.join(refused)}")
    if not any("weight" in entry for entry in entries):
        del out["dataset_weights"]
    return out
