"""Shared fixtures: a tiny Llama built offline, small data files, and a helper that runs train.py like a user does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
LLAMA2_TOKENIZER = os.path.join(SHARED, "tokenizers", "llama2", "tokenizer.model")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each test worker (pytest-xdist) gets its own rendezvous port, so a DeepSpeed init in one worker's process never
# collides with a torchrun in the other's (both default to 29500).
# With several workers every process gets one thread: two OpenMP teams spinning on two cores slow each other
# down many times over (the demo took 3x longer), one thread each keeps both cores busy without that.
IN_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if IN_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
WORKER_PORT = str(29510 + 10 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0))
os.environ.setdefault("MASTER_PORT", WORKER_PORT)
# DeepSpeed's compiled ops live with the venv (`make install` builds them), for in-process tests and children alike
TORCH_EXTENSIONS_DIR = os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".venv", "torch_extensions"))


# Test modules whose tests must run on one test worker, so that their module fixture is built once (the demo joins
# the format tests, the largest group, so that it is scheduled first). pytest-xdist's own xdist_group mark works by
# rewriting node ids, which pytest 9.2 no longer honours (pytest-xdist#1386): the groups were silently split and
# test_scale_out's five training runs were built on both workers. This scheduler groups by module path instead.
WORKER_GROUPS = {
    "tests/test_demo.py": "demo_and_formats",
    "tests/test_dataset_formats.py": "demo_and_formats",
    "tests/test_merge.py": "merge",
    "tests/test_outputs.py": "outputs",
    "tests/test_planning.py": "planning",
    "tests/test_scale_out.py": "scale_out",
}


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ModuleGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return WORKER_GROUPS.get(nodeid.split("::", 1)[0]) or super()._split_scope(nodeid)

    return ModuleGroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The longest test (the demo) goes first, so that with several workers the others run beside it."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        MASTER_PORT=WORKER_PORT,  # single-process DeepSpeed init
        PET_MASTER_PORT=WORKER_PORT,  # torchrun's --master_port (accelerate launch goes through torchrun's parser)
        TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS_DIR,
    )
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return env


def run(command: list[str], cwd: str, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    """Run a command as a user would (a fresh process, offline); the output is kept for assertions and failures."""
    result = subprocess.run(command, cwd=cwd, env=child_env(**env), capture_output=True, text=True, timeout=timeout)
    result.output = result.stdout + result.stderr
    return result


def build_stages(model: str, data_file: str, out_dir, *flags: str) -> SimpleNamespace:
    """run()'s stages up to the trainer, in-process, built by the same function run() uses: the fastest way to
    check that a flag takes effect."""
    import train
    from finetune.checks.model_config import check_model_before_writing
    from finetune.run_paths import RunPaths
    from finetune.training import stages

    model_args, data_args, args, gen_args = train.parse_arguments(
        ["--model_name_or_path", model, "--dataset", data_file, "--output_dir", str(out_dir), "--report_to", "none",
         *flags]
    )
    check_model_before_writing(model_args, args, data_args.model_max_len)
    paths = RunPaths.from_args(args, data_args)
    built = stages.build_stages(model_args, data_args, args, gen_args, paths)
    return SimpleNamespace(trainer=built.trainer, model=built.trainer.model, tokenizer=built.tokenizer,
                           model_args=model_args, data_args=data_args, args=args, gen_args=gen_args, paths=paths, stats=built.stats,
                           train_set=built.train_set, eval_set=built.eval_set, gen_config=built.gen_config)


def train_py(*flags: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), *flags]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """hidden 64, 2 layers, byte-level BPE with merges (vocab ~760), Llama special tokens, no pad token."""
    from finetune.tiny_model import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"), tokenizer_kind="bpe", hidden=64, layers=2)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


CONVERSATION_TOPICS = ["the sea", "mountains", "bread", "rain", "music", "trains", "cats", "numbers"]


def conversations(n: int) -> list[dict]:
    """airoboros_chat records: a system turn on some, two user/assistant exchanges, a category for stratifying."""
    rows = []
    for i in range(n):
        topic = CONVERSATION_TOPICS[i % len(CONVERSATION_TOPICS)]
        turns = [{"from": "system", "value": "You are a helpful assistant."}] if i % 2 == 0 else []
        turns += [
            {"from": "human", "value": f"Tell me about {topic}, item {i}."},
            {"from": "gpt", "value": f"Here is a fact about {topic}: number {i}."},
            {"from": "human", "value": "And one more?"},
            {"from": "gpt", "value": f"Another fact about {topic}."},
        ]
        rows.append({"id": str(i), "category": ["general", "trivia"][i % 2], "conversations": turns})
    return rows


@pytest.fixture(scope="session")
def conversations_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "conversations.json"
    path.write_text(json.dumps(conversations(48)))
    return str(path)


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def instructions(n: int) -> list[dict]:
    return [{"instruction": f"Say the number {i}.", "response": f"The number is {i}."} for i in range(n)]


def sentencepiece_tokenizer_dir(model_file: str, folder) -> str:
    """A transformers tokenizer folder for a Llama/Mistral sentencepiece model (../shared/README.md recipe)."""
    import shutil

    shutil.copy(model_file, os.path.join(folder, "tokenizer.model"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as handle:
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
                   "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, handle)
    return str(folder)


REAL_TOKENIZERS = {
    "llama2": os.path.join(SHARED, "tokenizers", "llama2", "tokenizer.model"),
    "mistral": os.path.join(SHARED, "tokenizers", "mistral_v1", "tokenizer.model.v1"),
    "gpt2": os.path.join(SHARED, "tokenizers", "gpt2", "tokenizer.json"),
}


@pytest.fixture(scope="session", params=["tiny", "llama2", "mistral", "gpt2"])
def any_tokenizer(request, tiny_model, tmp_path_factory):
    """The tiny BPE tokenizer and, when ../shared is present, the real Llama-2, Mistral and GPT-2 tokenizers."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if request.param == "tiny":
        return AutoTokenizer.from_pretrained(tiny_model)
    path = REAL_TOKENIZERS[request.param]
    if not os.path.isfile(path):
        pytest.skip(f"{path} is absent (../shared/data)")
    if request.param == "gpt2":
        return PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>")
    return AutoTokenizer.from_pretrained(sentencepiece_tokenizer_dir(path, tmp_path_factory.mktemp(request.param)))
