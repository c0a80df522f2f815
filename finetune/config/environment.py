"""What a run takes from its environment, and what it puts there: RunPod worker job files, `.env` files, credentials.

A RunPod fine-tuning worker job is `{"input": {"user_id", "model_id", "run_id", "credentials": {"wandb_api_key",
"hf_token"}, "args": {...}}}`; its `args` are an axolotl config (or our flag names) and are read like a recipe file.
Credentials only ever go into the process environment (WANDB_API_KEY, HF_TOKEN), never into the arguments, so they
never reach the logs, training_args.bin, a model card or wandb's config. A job's credentials win over the
environment (as RunPod's own worker does; empty ones count as absent); a `.env` file's lines only fill names the
environment does not have yet.
"""

from __future__ import annotations

import logging
import os
import re

from finetune.errors import UsageError

logger = logging.getLogger(__name__)

CREDENTIALS = {"wandb_api_key": "WANDB_API_KEY", "hf_token": "HF_TOKEN"}
JOB_KEYS = {"user_id", "model_id", "run_id", "credentials", "args"}
DEFAULT_ENV_FILE = ".env"


def is_runpod_job(mapping: dict) -> bool:
    return set(mapping) == {"input"} and isinstance(mapping["input"], dict) and "args" in mapping["input"]


def runpod_job_args(path: str, job: dict) -> dict:
    """The job's args as recipe keys; its credentials into the environment; run_id names the run (and, when the
    args give no output_dir, its directory: outputs/<run_id>)."""
    spec = job["input"]
    unknown = sorted(set(spec) - JOB_KEYS)
    if unknown:
        raise UsageError(f"RunPod job file {path}: unknown key input.{unknown[0]} (a job has input.{', input.'.join(sorted(JOB_KEYS))})")
    args = spec["args"]
    if not isinstance(args, dict):
        raise UsageError(f"RunPod job file {path}: input.args must be a mapping of config keys to values")
    credentials = spec.get("credentials") or {}
    if not isinstance(credentials, dict):
        raise UsageError(f"RunPod job file {path}: input.credentials must be a mapping (wandb_api_key, hf_token)")
    other = sorted(set(credentials) - set(CREDENTIALS))
    if other:
        raise UsageError(f"RunPod job file {path}: input.credentials.{other[0]} is not one this trainer uses "
                         f"(known: {', '.join(CREDENTIALS)})")
    placed = [CREDENTIALS[key] for key, value in credentials.items() if value]
    for key, value in credentials.items():
        if value:
            os.environ[CREDENTIALS[key]] = str(value)
    args = dict(args)
    run_id = spec.get("run_id")
    if run_id:
        if not any(args.get(key) for key in ("wandb_name", "run_name")):
            args["run_name"] = str(run_id)
        if not args.get("output_dir"):
            args["output_dir"] = os.path.join("outputs", str(run_id))
    logger.info("RunPod job %s (run_id %s, model_id %s): its args read as a config; credentials set in the "
                "environment: %s", path, run_id, spec.get("model_id"), ", ".join(placed) or "none")
    return args


def load_env_file(path: str | None) -> None:
    """KEY=VALUE lines (`export`, quotes and # comments allowed) into the environment, names already set kept.
    path None: ./.env when present."""
    explicit = path is not None
    path = path or DEFAULT_ENV_FILE
    if not os.path.isfile(path):
        if explicit:
            raise UsageError(f"--env_file {path}: file not found")
        return
    filled = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = re.fullmatch(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)", line)
            if not match:
                raise UsageError(f"--env_file {path}:{number}: expected KEY=VALUE")
            name, value = match.group(1), match.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            elif " #" in value:
                value = value.split(" #", 1)[0].rstrip()
            if name not in os.environ:
                os.environ[name] = value
                filled.append(name)
    logger.info("environment file %s: set %s (names already in the environment kept)", path, ", ".join(filled) or "nothing")


def place_wandb_files(report_to, working_dir: str) -> None:
    """wandb writes ./wandb wherever the run was started; put it under the run's working dir unless WANDB_DIR says."""
    if "wandb" in (report_to or []) and not os.environ.get("WANDB_DIR"):
        os.makedirs(working_dir, exist_ok=True)
        os.environ["WANDB_DIR"] = os.path.abspath(working_dir)
