"""Using the result: metrics.json, the training-curves PNG and the model card in every output directory,
--do_predict predictions, scripts/chat.py (one-shot, stdin, interactive; training-exact prompt ids), MFU, the FLOP
counter and the profiler, and --push_to_hub (fails fast offline; uploads the final and merged directories).

One short training run (a subprocess, as a user runs it) is shared by most tests; the rest run in-process."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT, build_stages, conversations, instructions, run, train_py, write_jsonl

import train
from finetune.checks import preflight
from finetune.data import pipeline as data
from finetune.data import preparation
from finetune.modeling.tokenizer import load_tokenizer
from finetune.outputs import chat, hub, inference, reporting
from finetune.run_paths import RunPaths
from finetune.training.stages import generation_config

MAX_NEW_TOKENS = 6
PREDICTIONS = 3


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model, conversations_file):
    """airoboros_chat LoRA run: 4 steps, eval split, --do_predict, eval generations, MFU, FLOP counter, profiler."""
    work = tmp_path_factory.mktemp("outputs")
    out, merged, profile = work / "adapter", work / "merged", work / "profile"
    result = run(train_py(
        "--model_name_or_path", tiny_model, "--dataset", conversations_file, "--dataset_format", "airoboros_chat",
        "--output_dir", str(out), "--merged_output_dir", str(merged), "--bits", "32", "--lora_r", "4",
        "--lora_alpha", "8", "--learning_rate", "3e-4", "--lr_scheduler_type", "cosine", "--max_steps", "4",
        "--logging_steps", "1", "--per_device_train_batch_size", "4", "--eval_dataset_size", "8",
        "--eval_strategy", "steps", "--eval_steps", "2", "--do_predict", "--generation_samples", str(PREDICTIONS),
        "--max_new_tokens", str(MAX_NEW_TOKENS), "--eval_generation_samples", "1", "--peak_tflops", "0.5",
        "--flop_counter", "--profiler_dir", str(profile), "--report_to", "none", "--disable_tqdm", "true",
    ), cwd=str(work))
    assert result.returncode == 0, result.output[-4000:]
    return SimpleNamespace(out=out, merged=merged, profile=profile, output=result.output, base=tiny_model)


def read_metrics(directory) -> dict:
    return json.loads((directory / "metrics.json").read_text())


def test_metrics_json_summarizes_the_run_in_both_output_dirs(finished):
    metrics = read_metrics(finished.out)
    history = metrics["log_history"]
    losses = [entry for entry in history if "loss" in entry]
    evals = [entry for entry in history if "eval_loss" in entry]
    assert len(losses) == 4 and metrics["global_step"] == 4  # --logging_steps 1, --max_steps 4
    assert metrics["final_loss"] == losses[-1]["loss"]
    assert metrics["eval_loss"] == evals[-1]["eval_loss"] and len(evals) == 3  # steps 2 and 4, and the final one
    assert metrics["best_eval_loss"] == min(e["eval_loss"] for e in evals)
    assert metrics["train_runtime_s"] > 0 and metrics["tokens_per_second"] > 0 and 0 < metrics["epoch"] < 1
    assert 0 < metrics["mfu"] < 1 and metrics["peak_tflops_per_device"] == 0.5
    assert metrics["settings"]["lora_r"] == 4 and metrics["settings"]["base_model"] == finished.base
    merged = read_metrics(finished.merged)
    assert {k: v for k, v in merged.items() if k != "settings"} == {k: v for k, v in metrics.items() if k != "settings"}


def test_training_curves_png_is_a_readable_plot(finished):
    from matplotlib import image

    for directory in (finished.out, finished.merged):
        path = directory / "training_curves.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 15_000  # axes, two curves and labels, not an empty canvas
        pixels = image.imread(str(path))
        assert pixels.shape[:2] == (600, 800)
        assert len({tuple(p) for p in pixels[::7, ::7].reshape(-1, pixels.shape[-1]).tolist()}) > 20  # colours drawn


def test_model_card_says_what_it_is_and_how_to_load_it(finished):
    card = (finished.out / "README.md").read_text()
    for expected in (f"base_model: {finished.base}", "library_name: peft", "`airoboros_chat`", "| learning rate | 0.0003, cosine",
                     "LoRA r=4, alpha=8", "4 samples per step", "max length | 2048 tokens",
                     "AutoPeftModelForCausalLM.from_pretrained", f"python scripts/chat.py {finished.out}",
                     "training_curves.png", "[/INST] Paris. </s><s>[INST] And of Italy? [/INST]"):
        assert expected in card, expected
    merged_card = (finished.merged / "README.md").read_text()
    assert "library_name: transformers" in merged_card and "merged into its weights" in merged_card
    assert f'AutoModelForCausalLM.from_pretrained("{finished.merged}"' in merged_card


def test_model_card_python_snippet_runs(finished, capsys):
    """The card's own load-and-generate code, executed as written."""
    card = (finished.out / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_predictions_are_the_trained_prompts_answered_within_max_new_tokens(finished):
    from transformers import AutoTokenizer

    rows = [json.loads(line) for line in (finished.out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == PREDICTIONS
    tokenizer = AutoTokenizer.from_pretrained(finished.out)
    eval_set = preparation.load_split(str(finished.out / "prepared_data"), "eval")
    for row, sample in zip(rows, eval_set):
        first_trained = next(i for i, label in enumerate(sample["labels"]) if label != -100)
        assert row["prompt_tokens"] == first_trained  # the prompt is the sample's own ids up to its first answer
        assert row["prompt"] == tokenizer.decode(sample["input_ids"][:first_trained])
        assert row["prompt"].endswith("[/INST]") and row["reference"]
        assert 0 < row["new_tokens"] <= MAX_NEW_TOKENS
    assert finished.output.count("prediction sample:") == 2
    assert "eval generation sample:" in finished.output  # --eval_generation_samples, at each evaluation


def test_mfu_flop_counter_and_profiler(finished):
    losses = [e for e in read_metrics(finished.out)["log_history"] if "tokens_per_second" in e]
    assert losses and all(0 < e["mfu"] < 1 for e in losses)  # logged next to tokens/s with --peak_tflops
    assert "'mfu':" in finished.output
    counted = re.search(r"--flop_counter: step 1 took ([0-9.e+-]+) TFLOPs", finished.output)
    assert counted and float(counted.group(1)) > 0
    traces = list(finished.profile.glob("*.pt.trace.json"))
    assert len(traces) == 1 and "traceEvents" in json.loads(traces[0].read_text())


def test_chat_one_shot_on_the_adapter_dir_prints_only_the_answer(finished):
    result = run([sys.executable, os.path.join(ROOT, "scripts", "chat.py"), str(finished.out),
                  "--prompt", "Tell me about the sea.", "--max_new_tokens", "3"], cwd=str(finished.out.parent))
    assert result.returncode == 0, result.output[-3000:]
    answer = result.stdout.strip()
    assert answer and "\n" not in answer and "Tell me about" not in answer and "[INST]" not in answer


def test_chat_reads_all_of_stdin_as_one_prompt(finished, monkeypatch, capsys):
    piped = io.StringIO("Tell me about the sea.\nAnd about rain.\n")
    piped.isatty = lambda: False
    monkeypatch.setattr(sys, "stdin", piped)
    assert chat.main([str(finished.out), "--max_new_tokens", "4"]) == 0
    printed = capsys.readouterr().out.strip()
    model, tokenizer, gen_config = chat.load(str(finished.out))
    gen_config.max_new_tokens = 4
    expected = chat.Chat(model, tokenizer, gen_config).reply("Tell me about the sea.\nAnd about rain.")
    assert printed == expected


def test_chat_interactive_keeps_the_history_until_reset(finished, monkeypatch):
    model, tokenizer, gen_config = chat.load(str(finished.out))
    gen_config.max_new_tokens = 2
    session = chat.Chat(model, tokenizer, gen_config)
    sent = []
    real_prompt_ids = inference.prompt_ids
    monkeypatch.setattr(inference, "prompt_ids", lambda tok, messages, fmt=None: sent.append(messages) or real_prompt_ids(tok, messages, fmt))
    lines = iter(["hello", "again", "/reset", "fresh", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    chat.interactive(session)
    assert [len(messages) for messages in sent] == [1, 3, 1]
    assert [m["content"] for m in sent[1]][::2] == ["hello", "again"] and sent[2][0]["content"] == "fresh"


@pytest.mark.parametrize("dataset_format", ["airoboros_chat", "chatml", "vicuna", "airoboros", "alpaca"])
def test_chat_prompt_ids_are_the_training_prompt_ids(tiny_model, tmp_path, dataset_format):
    """Chat.prompt_ids (what scripts/chat.py feeds the model) equals the ids each answer followed in training,
    through the saved chat template and through --dataset_format."""
    from dataset_formats import IGNORE_INDEX

    data_args = train.DataArguments(dataset=["x.json"], dataset_format=[dataset_format])
    tokenizer = load_tokenizer(train.ModelArguments(model_name_or_path=tiny_model), data_args)
    if dataset_format == "alpaca":
        record = {"instruction": "Say the number 3.", "output": "The number is 3."}
        turns = [{"role": "user", "content": record["instruction"]}]
    elif dataset_format == "airoboros":
        record = {"instruction": "Tell me about rain.", "response": "It falls.", "system": "Be brief."}
        turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": record["instruction"]}]
    else:
        record = conversations(1)[0]
        turns = [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
                 for t in record["conversations"]]
    samples, _ = data.tokenize_records([data.Record(record, "probe", dataset_format)], tokenizer, data_args)
    ids, labels = samples[0]["input_ids"], samples[0]["labels"]
    answer_starts = data.answer_starts(labels)
    system = turns[0]["content"] if turns[0]["role"] == "system" else None
    dialog = turns[1:] if system else turns
    renderers = ["alpaca"] if dataset_format == "alpaca" else [None, dataset_format]  # None: the chat template
    for renderer in renderers:
        session = chat.Chat(None, tokenizer, None, dataset_format=renderer, system=system)
        for turn, start in zip(range(0, len(dialog), 2), answer_starts):
            session.history = dialog[:turn]
            assert session.prompt_ids(dialog[turn]["content"]) == ids[:start], (renderer, turn)
            assert labels[start - 1] == IGNORE_INDEX and labels[start] != IGNORE_INDEX


def test_help_documents_the_new_flags():
    text = " ".join(train.build_parser().format_help().split())  # argparse wraps lines
    for flag in ("--do_predict", "--generation_samples", "--eval_generation_samples", "--push_to_hub",
                 "--hub_model_id", "--peak_tflops", "--flop_counter", "--profiler_dir"):
        assert flag in text
    assert "6N + 12LHT" in text and "<hub_model_id>-merged" in text and "wait 1, warmup 1, record 3" in text


@pytest.fixture
def small_data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", instructions(8))


@pytest.mark.parametrize(("environment", "message"), [
    ({"HF_HUB_OFFLINE": "1"}, "--push_to_hub: HF_HUB_OFFLINE is set"),
    ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": None}, "--push_to_hub: no Hugging Face token"),
    ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_planted"}, "--push_to_hub: the hub at http://127.0.0.1:9 is unreachable"),
])
def test_push_to_hub_fails_fast_before_anything_loads(tmp_path, tiny_model, small_data, monkeypatch, caplog, capsys,
                                                       environment, message):
    import huggingface_hub

    for name, value in environment.items():
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: os.environ.get("HF_TOKEN"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        code = train.main(["--model_name_or_path", tiny_model, "--dataset", small_data, "--output_dir", str(out),
                           "--push_to_hub", "--hub_model_id", "me/tiny"])
    text = caplog.text + capsys.readouterr().err  # main() reconfigures logging; the line lands on stderr
    assert code == 2 and message in text and "drop --push_to_hub" in text
    assert not out.exists()


class FakeHfApi:
    """Records what would be uploaded; `fail` makes the upload raise like a network error."""

    calls: list = []
    fail = False

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok))
        return SimpleNamespace(repo_id=repo_id, url=f"https://hub.example/{repo_id}")

    def upload_folder(self, **kwargs):
        if FakeHfApi.fail:
            raise OSError("connection reset")
        FakeHfApi.calls.append(("upload_folder", kwargs["repo_id"], kwargs["folder_path"], kwargs["ignore_patterns"]))


def test_push_to_hub_uploads_final_and_merged_dirs_once_and_a_rerun_retries(tmp_path, tiny_model, small_data,
                                                                             monkeypatch, caplog, capsys):
    """In-process run with the hub faked: the Trainer's own pushing stays off (offline, it would fail), the
    finished directories are uploaded at the end, a failed upload exits 4 and the same command retries it; the
    re-run also rebuilds a missing merge with its metrics.json, plot and card."""
    import huggingface_hub

    monkeypatch.setattr(preflight, "hub_push_problem", lambda args: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    out, merged = tmp_path / "out", tmp_path / "merged"
    argv = ["--model_name_or_path", tiny_model, "--dataset", small_data, "--output_dir", str(out),
            "--merged_output_dir", str(merged), "--bits", "32", "--lora_r", "2", "--max_steps", "2",
            "--logging_steps", "1", "--report_to", "none", "--push_to_hub", "--hub_model_id", "me/tiny-chat",
            "--hub_private_repo", "true", "--disable_tqdm", "true"]
    monkeypatch.setattr(FakeHfApi, "fail", True)
    with caplog.at_level(logging.ERROR):
        assert train.main(argv) == 4
    assert "run the same command again to retry the push" in caplog.text + capsys.readouterr().err
    assert (out / "completed").exists()
    assert "me/tiny-chat" in (out / "README.md").read_text()  # the card points at the repo it is pushed to
    monkeypatch.setattr(FakeHfApi, "fail", False)
    import shutil

    shutil.rmtree(merged)
    assert train.main(argv) == 0
    assert FakeHfApi.calls == [
        ("create_repo", "me/tiny-chat", True, True),  # the failed attempt got this far
        ("create_repo", "me/tiny-chat", True, True),
        ("upload_folder", "me/tiny-chat", str(out), hub.NOT_UPLOADED),
        ("create_repo", "me/tiny-chat-merged", True, True),
        ("upload_folder", "me/tiny-chat-merged", str(merged), hub.NOT_UPLOADED),
    ]
    assert "completed" in hub.NOT_UPLOADED
    assert read_metrics(merged)["global_step"] == 2 and (merged / "training_curves.png").exists()
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-chat-merged"' in (merged / "README.md").read_text()


def test_full_finetune_card_for_a_format_without_chat_template_runs_as_written(tmp_path, tiny_model, small_data, capsys):
    """No chat layout (alpaca): the card renders the prompt with the training format, its chat.py command passes
    --dataset_format, and its Python snippet (through inference.prompt_ids) runs; the report round-trips."""
    import shutil

    model_args, data_args, args, gen_args = train.parse_arguments(
        ["--model_name_or_path", tiny_model, "--dataset", small_data, "--dataset_format", "alpaca", "--full_finetune",
         "--bits", "32", "--output_dir", str(tmp_path / "full"), "--max_new_tokens", "3"])
    paths = RunPaths.from_args(args, data_args)
    tokenizer = load_tokenizer(model_args, data_args)
    assert not tokenizer.chat_template
    settings = reporting.run_settings(model_args, data_args, args, paths, tokenizer,
                                      generation_config(gen_args, tokenizer, ["alpaca"]), stats={})
    history = [{"loss": 2.0 - step / 10, "learning_rate": 1e-4, "step": step} for step in range(1, 6)] + [{"eval_loss": 1.9, "step": 5}]
    report = {"metrics": {"global_step": 5, "final_loss": 1.5, "eval_loss": 1.9}, "settings": settings, "log_history": history}
    shutil.copytree(tiny_model, tmp_path / "full")  # stands in for the saved model
    reporting.write_output_extras(str(tmp_path / "full"), report)
    card = (tmp_path / "full" / "README.md").read_text()
    assert "A full fine-tune of" in card and "--dataset_format alpaca" in card and "### Instruction:\nWhat is the capital" in card
    assert reporting.load_report(str(tmp_path / "full")) == json.loads(json.dumps(report))
    exec(compile(re.search(r"```python\n(.*?)```", card, re.S).group(1), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("method", [["--full_finetune"], ["--lora_modules", "all", "--lora_r", "8"]])
def test_model_flops_formula_matches_the_flop_counter(tmp_path, tiny_model, method):
    """The formula behind mfu (6N + 12LHT full, 4N + 6N_lora + 12LHT for LoRA) against what FlopCounterMode counts
    for one training step on unpadded samples, term by term: the two differ only by torch counting attention's
    backward as 2.5x its forward (PaLM: 2x) and, for LoRA, by the first layer's q/k/v input gradients that a frozen
    embedding makes unnecessary (the formula keeps them: 1/L of the attention inputs). On transformers' plain loss:
    the trained-token loss computes the head at fewer positions (and recomputes it), which the model-FLOPs formula
    by convention does not follow."""
    from finetune.training import throughput

    rows = [{"input_ids": [(7 * i + j) % 500 + 3 for j in range(8)]} for i in range(8)]  # 8 samples x 8 tokens
    data_file = write_jsonl(tmp_path / "ids.jsonl", rows)
    built = build_stages(tiny_model, data_file, tmp_path / "o", "--dataset_format", "pretokenized", "--bits", "32",
                         "--max_steps", "1", "--per_device_train_batch_size", "8", "--save_strategy", "no",
                         "--flop_counter", "--chunked_cross_entropy", "False", *method)
    trainer = built.trainer
    meter = trainer.throughput
    trainer.train()
    config = trainer.model.config
    torch_attention_convention = 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * 8
    first_layer_inputs = sum(  # layer 0's q/k/v projections read the embedding: base weights and LoRA A
        module.in_features * module.out_features for name, module in trainer.model.named_modules()
        if re.search(r"\.layers\.0\.self_attn\.[qkv]_proj($|\.base_layer$|\.lora_A\.)", name)
        and next(module.children(), None) is None)
    skipped = 0 if "--full_finetune" in method else 2 * first_layer_inputs
    expected = meter.flops_per_token + torch_attention_convention - skipped
    assert meter.counted_flops_per_token == pytest.approx(expected, rel=1e-9)
    assert abs(meter.counted_flops_per_token / meter.flops_per_token - 1) < 0.04  # the formula's error, 2 layers
    total, trainable = throughput.matmul_weights(trainer.model)
    assert (trainable == total) == ("--full_finetune" in method) and trainable > 0


@pytest.mark.parametrize(("device", "flags", "expected"), [
    ("NVIDIA H100 80GB HBM3", {"bf16": True}, 989.4e12),
    ("NVIDIA H100 PCIe", {"bf16": True}, 756e12),
    ("NVIDIA H200", {"fp16": True}, 989.4e12),
    ("NVIDIA A100-SXM4-80GB", {}, 19.5e12),  # fp32 without --tf32: no tensor cores
    ("NVIDIA A100-SXM4-80GB", {"tf32": True}, 156e12),
    ("NVIDIA A10G", {"bf16": True}, 125e12),
    ("NVIDIA L4", {"bf16": True}, 121e12),
    ("NVIDIA GeForce RTX 4090", {"bf16": True}, 165.2e12),
    ("Tesla V100-SXM2-16GB", {"fp16": True}, 125e12),
    ("Tesla V100-SXM2-16GB", {"bf16": True}, None),  # no bf16 on Volta: no mfu rather than a wrong one
    ("NVIDIA B200", {"bf16": True}, None),  # unknown: --peak_tflops
])
def test_peak_flops_of_known_gpus(monkeypatch, device, flags, expected):
    import torch

    from finetune.training import throughput

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: device)
    args = SimpleNamespace(peak_tflops=None, local_process_index=0, bf16=False, fp16=False, tf32=False)
    vars(args).update(flags)
    peak, why = throughput.peak_flops(args)
    assert peak == expected and (expected or "--peak_tflops" in why)
    args.peak_tflops = 42.0
    assert throughput.peak_flops(args)[0] == 42e12  # the flag wins


@pytest.mark.parametrize(("flags", "message"), [
    (["--do_predict", "--generation_samples", "0"], "--generation_samples must be > 0 with --do_predict"),
    (["--eval_generation_samples", "2"], "--eval_generation_samples generates at each evaluation"),
    (["--peak_tflops", "-1"], "--peak_tflops must be > 0"),
])
def test_output_flags_are_checked_up_front(small_data, tmp_path, flags, message):
    with pytest.raises(train.UsageError, match=re.escape(message)):
        train.parse_arguments(["--model_name_or_path", "m", "--dataset", small_data, "--output_dir", str(tmp_path / "o"), *flags])
