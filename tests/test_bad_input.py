"""The bad-input catalogue: every case ends in one clear message naming the file:line, field or flag and the fix,
exit code 2, no traceback (unless --debug), and not a byte created or changed anywhere under the run's dirs."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest
from conftest import ROOT, instructions, run, write_jsonl

import train


def tree_digest(root) -> dict[str, str]:
    digest = {}
    for folder, _, files in os.walk(root):
        digest[folder] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                digest[path] = hashlib.sha256(handle.read()).hexdigest()
    return digest


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


# each case: (id, function(tmp_path, tiny_model) -> extra argv replacing/adding to the base, expected message)
CASES = [
    ("malformed-jsonl-line", lambda d, m: ["--dataset", write(d / "in/x.jsonl", '{"instruction": "a", "response": "b"}\n{oops\n')],
     "x.jsonl:2: not valid JSON"),
    ("malformed-json", lambda d, m: ["--dataset", write(d / "in/x.json", '[{"instruction": "a",}]')], "x.json:1: not valid JSON"),
    ("wrong-top-level-type", lambda d, m: ["--dataset", write(d / "in/x.json", '{"instruction": "a"}')],
     "the top level must be a list of records"),
    ("jsonl-line-not-object", lambda d, m: ["--dataset", write(d / "in/x.jsonl", '["a"]\n')], "x.jsonl:1: each line must be a JSON object"),
    ("missing-field", lambda d, m: ["--dataset", write(d / "in/x.jsonl", '{"instruction": "a"}\n')],
     "x.jsonl:1: missing field 'response'"),
    ("wrong-field-type", lambda d, m: ["--dataset", write(d / "in/x.jsonl", '{"instruction": 5, "response": "b"}\n')],
     "x.jsonl:1: field 'instruction' must be a string"),
    ("empty-response", lambda d, m: ["--dataset", write(d / "in/x.jsonl", '{"instruction": "a", "response": " "}\n')],
     "x.jsonl:1: field 'response' is empty"),
    ("wrong-role-order", lambda d, m: ["--dataset_format", "airoboros_chat", "--dataset", write(d / "in/x.jsonl", json.dumps(
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}) + "\n")],
     "x.jsonl:1: conversations[0] is an assistant turn where a user turn must be"),
    ("chat-ends-with-user", lambda d, m: ["--dataset_format", "airoboros_chat", "--dataset", write(d / "in/x.jsonl", json.dumps(
        {"conversations": [{"from": "human", "value": "a"}]}) + "\n")], "must end with an assistant turn"),
    ("empty-file", lambda d, m: ["--dataset", write(d / "in/x.jsonl", "")], "x.jsonl: the file holds no records"),
    ("missing-file", lambda d, m: ["--dataset", str(d / "in/nope.jsonl")], "nope.jsonl: file not found"),
    ("unknown-format", lambda d, m: ["--dataset_format", "alpacca"], "invalid choice: 'alpacca'"),
    ("unknown-flag", lambda d, m: ["--lora_modulez", "all"], "unknown flag --lora_modulez; did you mean --lora_modules?"),
    ("full-finetune-4-bit", lambda d, m: ["--full_finetune", "--bits", "4"], "--full_finetune needs --bits 16 or 32 (got 4)"),
    ("bits-3", lambda d, m: ["--bits", "3"], "invalid choice: 3"),
    ("quant-type-nf5", lambda d, m: ["--quant_type", "nf5"], "invalid choice: 'nf5'"),
    ("lora-r-0", lambda d, m: ["--lora_r", "0"], "--lora_r must be > 0"),
    ("zero3-4bit-no-quant-storage", lambda d, m: ["--bits", "4", "--bf16", "--deepspeed", write(d / "in/z3.json", json.dumps(
        {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}))], "pass --quant_storage bfloat16"),
    ("zero3-8bit", lambda d, m: ["--bits", "8", "--deepspeed", os.path.join(ROOT, "configs/deepspeed-zero3.json")],
     "cannot shard bitsandbytes 8-bit weights"),
    ("fsdp-without-gpu", lambda d, m: ["--fsdp", "full_shard auto_wrap", "--bits", "16"], "FSDP needs GPUs"),
    ("dry-run-world-size-alone", lambda d, m: ["--dry_run_world_size", "8"], "--dry_run_world_size 8: needs --dry_run"),
    ("hub-strategy-ignored", lambda d, m: ["--hub_strategy", "checkpoint"], "--hub_strategy checkpoint would be ignored"),
    ("hub-model-id-without-push", lambda d, m: ["--hub_model_id", "me/x"], "without --push_to_hub uploads nothing"),
    ("do-eval-without-split", lambda d, m: ["--do_eval"], "--do_eval needs an eval split"),
    ("resume-from-missing-checkpoint", lambda d, m: ["--resume_from_checkpoint", str(d / "in/checkpoint-9")],
     "not a complete checkpoint directory"),
    ("lora-flags-with-full-finetune", lambda d, m: ["--full_finetune", "--bits", "32", "--lora_r", "8"],
     "--lora_r 8: adapter settings, but --full_finetune trains no adapter"),
    ("quant-flags-with-16-bit", lambda d, m: ["--bits", "16", "--quant_type", "fp4"], "--quant_type fp4 only apply to --bits 4"),
    ("packing-with-group-by-length", lambda d, m: ["--sample_packing", "--group_by_length"], "drop --group_by_length"),
    ("model-path-missing", lambda d, m: ["--model_name_or_path", str(d / "in/no-model")], "cannot load a model config"),
    ("unknown-lora-module", lambda d, m: ["--lora_modules", "query,v_proj"], "no linear layer named query"),
    ("every-sample-too-long", lambda d, m: ["--model_max_len", "4"], "no training sample is left after tokenization"),
    ("sample-too-long-raise", lambda d, m: ["--model_max_len", "12", "--excess_length", "raise"], "more than --model_max_len 12"),
    ("output-dir-is-a-file", lambda d, m: ["--output_dir", write(d / "in/file.txt", "x")], "is a file, not a directory"),
    ("unwritable-dir", lambda d, m: ["--merged_output_dir", "/proc/self/merged-here"], "cannot write in /proc/self"),
    ("eval-strategy-without-split", lambda d, m: ["--eval_strategy", "steps"], "needs an eval split"),
    ("wandb-without-key", lambda d, m: ["--report_to", "wandb"], "WANDB_MODE=offline"),
    ("bf16-and-fp16", lambda d, m: ["--bf16", "--fp16"], "At most one of fp16 and bf16"),
    ("merge-with-full-finetune", lambda d, m: ["--full_finetune", "--lora_r", "64"], "--merged_output_dir merges an adapter"),
    ("formats-vs-datasets", lambda d, m: ["--dataset_format", "alpaca", "airoboros", "alpaca"], "1 datasets but 3 formats"),
    ("warmup-ratio-out-of-range", lambda d, m: ["--warmup_ratio", "2"], "--warmup_ratio 2: must be in [0, 1)"),
    ("eval-size-leaves-nothing", lambda d, m: ["--eval_dataset_size", "8"], "leaves no training records"),
    ("deepspeed-config-missing", lambda d, m: ["--deepspeed", "nope.json"], "--deepspeed nope.json: config file not found"),
    ("recipe-not-a-mapping", lambda d, m: [write(d / "in/r.yaml", "- a\n- b\n")], "must be a mapping of flag names"),
    ("chat-template-format-without-template", lambda d, m: ["--dataset_format", "chat_template"], "this tokenizer has none"),
    ("bad-pretokenized-ids", lambda d, m: ["--dataset_format", "pretokenized", "--dataset", write(d / "in/p.jsonl", '{"input_ids": [1, -5]}\n')],
     "p.jsonl:1: field 'input_ids' must be a non-empty list of token ids"),
]


def base_argv(tmp_path, tiny_model, good_file) -> list[str]:
    return ["--model_name_or_path", tiny_model, "--dataset", good_file, "--output_dir", str(tmp_path / "run/out"),
            "--working_dir", str(tmp_path / "run/work"), "--merged_output_dir", str(tmp_path / "run/merged"),
            "--bits", "32", "--lora_r", "4", "--max_steps", "1", "--report_to", "none"]


def merge_flags(base: list[str], extra: list[str]) -> list[str]:
    """Extra flags replace the base's values for the same flag; a recipe file goes first."""
    if extra and not extra[0].startswith("--"):
        return extra[:1] + base + extra[1:]
    out, i = [], 0
    replaced = {f for f in extra if f.startswith("--")}
    while i < len(base):
        if base[i] in replaced:
            i += 2
            continue
        out.append(base[i])
        i += 1
    return out + extra


@pytest.mark.parametrize(("case", "extra", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_message_exit_2_and_touches_nothing(tmp_path, tiny_model, caplog, capsys, monkeypatch, case, extra, message):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    good = write_jsonl(tmp_path / "in/good.jsonl", instructions(8))
    argv = merge_flags(base_argv(tmp_path, tiny_model, good), extra(tmp_path, tiny_model))
    before = tree_digest(tmp_path)
    with caplog.at_level(logging.INFO):
        try:
            code = train.main(argv)
        except SystemExit as exit_:  # argparse's own usage errors
            code = exit_.code
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    text = " ".join(r.getMessage() for r in errors) + capsys.readouterr().err
    assert code == 2, text
    assert message in text
    assert all(r.exc_info is None for r in errors)  # no traceback without --debug
    after = tree_digest(tmp_path)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    assert len(CASES) >= 25


def test_debug_shows_the_traceback_and_a_plain_run_does_not(tmp_path, tiny_model, caplog, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a"}])
    flags = ["--model_name_or_path", tiny_model, "--dataset", bad, "--output_dir", str(tmp_path / "o"), "--report_to", "none"]
    with caplog.at_level(logging.ERROR):
        assert train.main(flags) == 2
    plain = caplog.text + capsys.readouterr().err
    assert "bad.jsonl:1: missing field 'response'" in plain and "Traceback" not in plain
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert train.main([*flags, "--debug"]) == 2
    debug = caplog.text + capsys.readouterr().err
    assert "bad.jsonl:1: missing field 'response'" in debug and "Traceback" in debug


def test_a_tokenizer_without_eos_is_refused(tmp_path, tiny_model):
    import shutil

    model = tmp_path / "no-eos"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    good = write_jsonl(tmp_path / "good.jsonl", instructions(4))
    code = train.main(["--model_name_or_path", str(model), "--dataset", good, "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    assert code == 2 and not (tmp_path / "o").exists()


def test_torchrun_with_bad_data_fails_fast_on_every_rank_and_says_it_once(tmp_path, tiny_model):
    import sys
    import time

    from conftest import ROOT

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "response": "b"}, {"instruction": "x"}])
    started = time.time()
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", os.path.join(ROOT, "train.py"),
                  "--model_name_or_path", tiny_model, "--dataset", bad, "--output_dir", str(tmp_path / "o"), "--bits", "32"],
                 cwd=str(tmp_path), timeout=300)
    assert result.returncode != 0
    assert time.time() - started < 120  # no rank waits for the DDP timeout
    assert result.output.count("bad.jsonl:2: missing field 'response'") == 1


FAULT = '''
import os
if os.environ.get("RANK") == "1":  # make rank 1 alone raise at step 2, as an OOM or a bad node would
    import builtins
    _import = builtins.__import__
    def _patched(name, *args, **kwargs):
        module = _import(name, *args, **kwargs)
        if name == "transformers" and not getattr(builtins, "_fault_installed", False):
            builtins._fault_installed = True
            import transformers
            original = transformers.Trainer.training_step
            def training_step(self, *a, **k):
                if self.state.global_step >= 2:
                    raise RuntimeError("injected failure on rank 1 at step 2")
                return original(self, *a, **k)
            transformers.Trainer.training_step = training_step
        return module
    builtins.__import__ = _patched
'''


def test_when_one_rank_raises_every_rank_exits_fast_with_the_error_shown_once(tmp_path, tiny_model):
    """The fault is injected from outside (a sitecustomize on PYTHONPATH), so train.py carries no test hooks."""
    import sys
    import time

    from conftest import ROOT

    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(FAULT)
    data_file = write_jsonl(tmp_path / "d.jsonl", instructions(40))
    started = time.time()
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", os.path.join(ROOT, "train.py"),
                  "--model_name_or_path", tiny_model, "--dataset", data_file, "--output_dir", str(tmp_path / "o"),
                  "--bits", "32", "--lora_r", "4", "--max_steps", "50", "--report_to", "none"],
                 cwd=str(tmp_path), timeout=600, PYTHONPATH=f"{tmp_path / 'fault'}:{ROOT}")
    assert result.returncode != 0
    assert time.time() - started < 120, "a rank waited for the DDP timeout"
    assert result.output.count("RuntimeError: injected failure on rank 1 at step 2") == 1
    assert not (tmp_path / "o" / "completed").exists()
