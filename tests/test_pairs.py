"""Preference pairs (--rl, finetune/data/pairs.py): every pair layout through every conversation format gives two
sides whose prompt ids are identical and identical to what SFT trains on, with only the final answer and its end
token trained; bad, identical and too-long pairs are refused or dropped and counted; then a DPO run through train.py
raises the held-out margin, and ORPO / SimPO / IPO / full-fine-tune DPO train through the same path."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import ROOT, build_stages, write_jsonl
from test_chat_templates import model_tokenizer

import train
from dataset_formats import FORMAT_INFO, IGNORE_INDEX, end_token_id
from finetune.data import pipeline as data

CONVERSATION_FORMATS = ["airoboros_chat", "llama2_chat", "chatml", "vicuna", "sharegpt", "chat_template:qwen3",
                        "chat_template:llama-3.1-instruct"]
PAIR_LAYOUTS = {
    "strings": {"prompt": "Name a colour.", "chosen": "Blue, like the sky.", "rejected": "Seven."},
    "system-and-strings": {"system": "Be brief.", "prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    "messages-prompt": {"messages": [{"role": "user", "content": "Name a colour."}],
                        "chosen": {"role": "assistant", "content": "Blue."},
                        "rejected": {"role": "assistant", "content": "Seven."}},
    "ultrafeedback": {"prompt": "Name a colour.",
                      "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
                      "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "No."}]},
    "multi-turn": {"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello! Ask away."},
                                     {"from": "human", "value": "Name a colour."}],
                   "chosen": [{"from": "gpt", "value": "Blue."}], "rejected": [{"from": "gpt", "value": "Seven."}]},
}


def tokenizer_for(spec: str, tiny_tokenizer):
    name, _, template = spec.partition(":")
    if not template:
        tokenizer = tiny_tokenizer
        specials = FORMAT_INFO[name].special_tokens
        if specials and any(tokenizer.convert_tokens_to_ids(t) == tokenizer.unk_token_id for t in specials):
            import copy

            tokenizer = copy.deepcopy(tiny_tokenizer)
            tokenizer.add_special_tokens({"additional_special_tokens": list(specials)}, replace_extra_special_tokens=False)
        return name, tokenizer
    return name, model_tokenizer(tiny_tokenizer, template)


def pairs_of(records, format_name, tokenizer, **flags):
    args = train.DataArguments(dataset=["pairs.jsonl"], dataset_format=[format_name], rl="dpo", **flags)
    return data.tokenize_records([data.Record(r, f"pairs.jsonl:{i + 1}", format_name) for i, r in enumerate(records)],
                                 tokenizer, args)


def first_trained(labels) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def sft_prompt_of_last_answer(record: dict, format_name: str, tokenizer) -> list[int]:
    """What SFT would feed before the conversation's final answer: the ids up to the start of its last trained run."""
    args = train.DataArguments(dataset=["x.jsonl"], dataset_format=[format_name])
    (ids, labels, _), *rest = data.encode_record(record, format_name, tokenizer, args,
                                                 data.format_options(args, tokenizer))[0][-1:]
    start = max(i for i in range(len(labels)) if labels[i] != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX))
    return ids[:start]


@pytest.mark.parametrize("layout", list(PAIR_LAYOUTS))
@pytest.mark.parametrize("spec", CONVERSATION_FORMATS)
def test_both_sides_share_the_sft_prompt_ids_and_train_only_the_final_answer(tiny_tokenizer, spec, layout):
    format_name, tokenizer = tokenizer_for(spec, tiny_tokenizer)
    record = PAIR_LAYOUTS[layout]
    (row,), stats = pairs_of([record], format_name, tokenizer)
    chosen, rejected = (row["input_ids"], row["labels"]), (row["rejected_input_ids"], row["rejected_labels"])
    start = first_trained(chosen[1])
    assert start == first_trained(rejected[1])
    assert chosen[0][:start] == rejected[0][:start]  # the shared prompt, id for id
    assert chosen[0][start:] != rejected[0][start:]
    end = end_token_id(format_name, tokenizer)
    for ids, labels in (chosen, rejected):
        assert labels[-1] == ids[-1] == end  # each answer is trained with its end token
        assert all(label == IGNORE_INDEX for label in labels[:start])  # earlier turns are prompt, not trained
        assert labels[start:] == ids[start:]
    # the prompt is what SFT trains the same conversation's final answer after
    sft_record = {"conversations": [{"role": "system", "content": "Be brief."}] * ("system" in record) + (
        record.get("messages") or record.get("conversations") or [{"role": "user", "content": record["prompt"]}]) + (
        [record["chosen"]] if isinstance(record["chosen"], dict) else record["chosen"] if isinstance(record["chosen"], list)
        and record["chosen"][0].get("role", record["chosen"][0].get("from")) in ("assistant", "gpt") else []) + (
        [{"role": "assistant", "content": record["chosen"]}] if isinstance(record["chosen"], str) else [])}
    if layout == "ultrafeedback":
        sft_record = {"conversations": record["chosen"]}
    assert chosen[0][:start] == sft_prompt_of_last_answer(sft_record, format_name, tokenizer)
    assert stats.samples_kept == 1 and stats.ending_with_trained_end_token == 1
    assert stats.trained_tokens == sum(label != IGNORE_INDEX for label in chosen[1] + rejected[1])


def test_hh_rlhf_transcripts_split_at_the_last_assistant_turn(tiny_tokenizer):
    record = {"chosen": "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant: Blue.",
              "rejected": "\n\nHuman: Hi.\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant: I won't."}
    (row,), _ = pairs_of([record], "hh-rlhf", tiny_tokenizer)
    start = first_trained(row["labels"])
    assert row["input_ids"][:start] == row["rejected_input_ids"][:start]
    assert tiny_tokenizer.decode(row["input_ids"][:start]).endswith("Name a colour.\n\nAssistant:")
    assert tiny_tokenizer.decode(row["input_ids"][start:], skip_special_tokens=True).strip() == "Blue."
    assert "Hello." in tiny_tokenizer.decode(row["input_ids"][:start])  # the earlier answer is prompt now
    different = {**record, "rejected": record["rejected"].replace("Hi.", "Hey.")}
    with pytest.raises(data.DataError, match=r"pairs.jsonl:1: chosen and rejected have different prompts"):
        pairs_of([different], "hh-rlhf", tiny_tokenizer)


@pytest.mark.parametrize(("format_name", "record"), [
    ("airoboros", {"instruction": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}),
    ("airoboros", {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}),
    ("alpaca", {"instruction": "Name a colour.", "input": "Pick one.", "chosen": "Blue.", "rejected": "Seven."}),
])
def test_instruction_formats_take_the_sides_as_their_response(tiny_tokenizer, format_name, record):
    (row,), _ = pairs_of([record], format_name, tiny_tokenizer)
    start = first_trained(row["labels"])
    sft = {k: v for k, v in record.items() if k not in ("chosen", "rejected", "prompt")}
    sft.setdefault("instruction", record.get("prompt"))
    sft[FORMAT_INFO[format_name].pairs[1]] = record["chosen"]
    args = train.DataArguments(dataset=["x.jsonl"], dataset_format=[format_name])
    (ids, labels, _), = data.encode_record(sft, format_name, tiny_tokenizer, args, data.format_options(args, tiny_tokenizer))[0]
    assert (row["input_ids"], row["labels"]) == (ids, labels)  # the chosen side is exactly the SFT sample
    assert row["rejected_input_ids"][:start] == ids[:start]


def test_identical_and_too_long_pairs_are_dropped_and_counted_and_bad_ones_named(tiny_tokenizer):
    good = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}
    same = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Blue."}
    long = {"prompt": "word " * 200, "chosen": "Blue.", "rejected": "Seven."}
    rows, stats = pairs_of([good, same, long], "llama2_chat", tiny_tokenizer, model_max_len=64)
    assert len(rows) == 1 and stats.identical_pairs == 1 and stats.prompt_too_long == 1
    cut, stats = pairs_of([{**good, "chosen": "Blue " * 80}], "llama2_chat", tiny_tokenizer, model_max_len=64,
                          excess_length="truncate")
    assert len(cut[0]["input_ids"]) == 64 and stats.truncated == 1
    assert cut[0]["input_ids"][:first_trained(cut[0]["labels"])] == cut[0]["rejected_input_ids"][:first_trained(cut[0]["labels"])]
    for bad, message in (({"prompt": "Q", "chosen": "A"}, "missing field 'rejected'"),
                         ({"chosen": "A", "rejected": "B"}, "missing field 'prompt'"),
                         ({"prompt": "Q", "chosen": [{"role": "user", "content": "Q"}], "rejected": "B"},
                          "field 'chosen' must end with an assistant turn")):
        with pytest.raises(data.DataError, match=f"pairs.jsonl:1: {message}"):
            pairs_of([bad], "llama2_chat", tiny_tokenizer)
    _, skipped = pairs_of([good, {"prompt": "Q", "chosen": "A"}], "llama2_chat", tiny_tokenizer, skip_bad_records=True)
    assert skipped.bad_records == 1 and skipped.samples_kept == 1


# --- training through train.py -------------------------------------------------------------------------------------------

LORA = ("--lora_r", "8", "--lora_alpha", "16")
FLAGS = ("--bits", "32", "--per_device_train_batch_size", "4",
         "--learning_rate", "5e-3", "--logging_steps", "5", "--save_strategy", "no", "--disable_tqdm", "true",
         "--seed", "5", "--lr_scheduler_type", "constant", "--dataset_format", "chatml", "--eval_dataset_size", "16",
         "--eval_strategy", "steps", "--eval_steps", "1000", "--per_device_eval_batch_size", "8")


@pytest.fixture
def reverse_pairs(tmp_path) -> str:
    """The demo's task as pairs: chosen = the reversed letters, rejected = the same shouted (a preference a tiny
    model can learn in a few steps; the held-out pairs are other words)."""
    with open(os.path.join(ROOT, "demo", "reverse_train.jsonl")) as handle:
        rows = [json.loads(line) for line in handle][:96]
    return write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": row["instruction"], "chosen": row["response"], "rejected": row["response"].upper()}
        for row in rows])


def test_dpo_through_train_py_raises_the_held_out_margin(tiny_model, reverse_pairs, tmp_path):
    built = build_stages(tiny_model, reverse_pairs, tmp_path / "out", *FLAGS, *LORA, "--rl", "dpo", "--max_steps", "30")
    assert built.trainer.reference_model is None  # LoRA: the reference is the same weights with adapters off
    assert built.stats["train"]["samples_kept"] == 80 and "rejected_input_ids" in built.train_set.column_names
    before = built.trainer.evaluate()
    built.trainer.train()
    after = built.trainer.evaluate()
    assert abs(before["eval_rewards/margins"]) < 1e-6  # B = 0 at the start: the policy is the reference
    assert after["eval_rewards/margins"] > 0.5 and after["eval_rewards/accuracies"] >= 0.9
    assert after["eval_logps/chosen"] - after["eval_logps/rejected"] > before["eval_logps/chosen"] - before["eval_logps/rejected"] + 5
    logged = [entry for entry in built.trainer.state.log_history if "loss" in entry]
    assert logged and all("rewards/margins" in entry and "rewards/accuracies" in entry for entry in logged)


@pytest.mark.parametrize("method", ["ipo", "orpo", "simpo", "dpo-full"])
def test_every_method_trains_through_train_py(tiny_model, reverse_pairs, tmp_path, method):
    full = method == "dpo-full"
    args = [*FLAGS, *(["--full_finetune"] if full else LORA), "--rl", method.split("-")[0], "--max_steps", "4",
            "--logging_steps", "2"]
    built = build_stages(tiny_model, reverse_pairs, tmp_path / "out", *args)
    start = {name: p.detach().clone() for name, p in built.model.named_parameters() if p.requires_grad}
    built.trainer.train()
    moved = [name for name, p in built.model.named_parameters() if p.requires_grad and not torch.equal(p, start[name])]
    assert moved
    logged = [entry for entry in built.trainer.state.log_history if "loss" in entry]
    assert logged and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logged)
    if full:  # the reference: a frozen copy of the starting weights
        reference = built.trainer.reference_model
        assert reference is not None and not any(p.requires_grad for p in reference.parameters())
        assert all(torch.equal(p, start[name]) for name, p in reference.named_parameters())
    else:
        assert built.trainer.reference_model is None


def test_a_full_fine_tune_with_a_reference_is_refused_under_zero_3(tmp_path, reverse_pairs):
    from finetune.errors import UsageError

    with pytest.raises(UsageError, match="keeps a frozen reference copy of the model"):
        train.parse_arguments(["--model_name_or_path", "m", "--dataset", reverse_pairs, "--output_dir", str(tmp_path / "o"),
                               "--dataset_format", "chatml", "--rl", "dpo", "--full_finetune", "--bits", "16",
                               "--deepspeed", os.path.join(ROOT, "configs", "deepspeed-zero3.json")])


def storage_bytes(*modules) -> int:
    """Bytes of the distinct tensor storages the modules hold (a shared weight counted once)."""
    seen = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def test_lora_dpo_holds_one_copy_of_the_base_and_the_plan_says_what_each_mode_holds(tiny_model, reverse_pairs, tmp_path):
    from transformers import AutoConfig

    from finetune.training import planning

    config = AutoConfig.from_pretrained(tiny_model)
    plans, held = {}, {}
    for mode, flags in (("lora", LORA), ("full", ("--full_finetune",))):
        built = build_stages(tiny_model, reverse_pairs, tmp_path / mode, *FLAGS, *flags, "--rl", "dpo")
        trainer = built.trainer
        held[mode] = (storage_bytes(trainer.model, *[trainer.reference_model] * (trainer.reference_model is not None)),
                      storage_bytes(trainer.model))
        plans[mode] = {rl: planning.make_plan(config, built.tokenizer, built.train_set, built.args, 2048, 1, "sdpa",
                                              preference=rl).memory_gib for rl in (None, "dpo")}
    assert held["lora"][0] == held["lora"][1]  # measured: the reference adds no weights
    assert held["full"][0] == 2 * held["full"][1]  # a full fine-tune's frozen copy doubles them
    assert plans["lora"]["dpo"]["reference"] == 0
    assert plans["full"]["dpo"]["reference"] == plans["full"]["dpo"]["weights"] > 0
    for mode in plans:  # chosen and rejected rows: twice the activations of one side at the same length
        assert plans[mode]["dpo"]["activations"] >= 2 * plans[mode][None]["activations"] > 0


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_an_interrupted_dpo_run_resumes_to_the_uninterrupted_weights(tiny_model, reverse_pairs, tmp_path, mode):
    from test_peft_variants import resume_at_step_2, worst_state_difference

    flags = (*FLAGS, *(LORA if mode == "lora" else ("--full_finetune",)), "--rl", "dpo", "--max_steps", "4",
             "--eval_strategy", "no", "--eval_dataset_size", "0")
    straight = build_stages(tiny_model, reverse_pairs, tmp_path / "straight", *flags)
    straight.trainer.train()
    resumed = resume_at_step_2(tiny_model, reverse_pairs, tmp_path / "crashed", flags)
    assert worst_state_difference(resumed, straight.model) <= 1e-6


@pytest.mark.parametrize("mode", ["full-zero2", "qlora-zero3"])
def test_dpo_under_torchrun_2_procs_and_deepspeed(tiny_model, reverse_pairs, tmp_path, mode):
    """What users launch: 2 ranks, DeepSpeed ZeRO-2 with a full fine-tune (its frozen reference copy on each rank)
    or ZeRO-3 with QLoRA (the reference is the sharded base with the adapters off); rank 0 writes the outputs."""
    import sys

    from conftest import run, train_py

    shape = (["--full_finetune", "--bits", "32", "--deepspeed", os.path.join(ROOT, "deepspeed-7b.json"), "--learning_rate", "1e-3"]
             if mode == "full-zero2" else
             ["--bits", "4", "--quant_storage", "float32", *LORA, "--deepspeed",
              os.path.join(ROOT, "configs", "deepspeed-zero3.json"), "--merged_output_dir", str(tmp_path / "merged"),
              "--merge_verify_samples", "1", "--learning_rate", "5e-3"])
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               *train_py()[1:], "--model_name_or_path", tiny_model, "--dataset", reverse_pairs, "--dataset_format",
               "chatml", "--rl", "dpo", "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--max_steps", "8",
               "--per_device_train_batch_size", "4", "--logging_steps", "4", "--eval_dataset_size", "16",
               "--eval_strategy", "steps", "--eval_steps", "8", "--save_strategy", "no", "--seed", "5",
               "--disable_tqdm", "true", *shape]
    result = run(command, cwd=str(tmp_path))
    assert result.returncode == 0, result.output[-5000:]
    assert "world size 2" in result.output and (tmp_path / "out" / "completed").exists()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    evals = [entry for entry in metrics.get("log_history", []) if "eval_rewards/margins" in entry]
    assert evals and evals[-1]["eval_rewards/margins"] > 0
    if mode == "qlora-zero3":
        assert json.loads((tmp_path / "merged" / "merge_verification.json").read_text())["samples"] == 1


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_precomputed_reference_log_probs_train_as_the_live_reference_and_are_reused(tiny_model, reverse_pairs,
                                                                                    tmp_path, mode, caplog):
    import logging

    flags = (*FLAGS, *(LORA if mode == "lora" else ("--full_finetune",)), "--rl", "dpo", "--max_steps", "4")
    live = build_stages(tiny_model, reverse_pairs, tmp_path / "live", *flags)
    live.trainer.train()
    with caplog.at_level(logging.INFO, logger="finetune"):
        stored = build_stages(tiny_model, reverse_pairs, tmp_path / "stored", *flags, "--precompute_ref_log_probs")
    assert stored.trainer.reference_model is None  # no frozen copy, also for the full fine-tune
    assert "reference log-probs of 80 pairs computed" in caplog.text
    cached = list((tmp_path / "stored" / "prepared_data").glob("reference_logps-*.npz"))
    assert len(cached) == 2  # train and eval
    stored.trainer.train()
    first, second = live.trainer.state.log_history, stored.trainer.state.log_history
    assert [e["loss"] for e in first if "loss" in e] == pytest.approx([e["loss"] for e in second if "loss" in e], abs=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(live.model.state_dict().values(),
                                                          stored.model.state_dict().values())) <= 1e-5
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune"):  # a re-run (a resume) reads them back
        build_stages(tiny_model, reverse_pairs, tmp_path / "stored", *flags, "--precompute_ref_log_probs")
    assert "reference log-probs of 80 pairs read from" in caplog.text and "pairs computed" not in caplog.text


# --- KTO: unpaired answers, desirable or not --------------------------------------------------------------------------


def test_kto_records_render_one_answer_after_the_sft_prompt_with_its_label(tiny_tokenizer):
    args = train.DataArguments(dataset=["kto.jsonl"], dataset_format=["llama2_chat"], rl="kto")
    records = [{"prompt": "Name a colour.", "completion": "Blue.", "label": True},
               {"messages": [{"role": "user", "content": "Name a colour."}], "completion": "Seven.", "label": False}]
    rows, stats = data.tokenize_records([data.Record(r, f"kto.jsonl:{i + 1}", "llama2_chat") for i, r in enumerate(records)],
                                        tiny_tokenizer, args)
    assert [row["kto_label"] for row in rows] == [True, False] and stats.desirable == 1 and stats.samples_kept == 2
    starts = [first_trained(row["labels"]) for row in rows]
    assert rows[0]["input_ids"][:starts[0]] == rows[1]["input_ids"][:starts[1]]
    sft = {"conversations": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}
    assert rows[0]["input_ids"][:starts[0]] == sft_prompt_of_last_answer(sft, "llama2_chat", tiny_tokenizer)
    assert rows[0]["labels"][-1] == tiny_tokenizer.eos_token_id
    with pytest.raises(data.DataError, match="kto.jsonl:1: field 'label' must be true"):
        data.tokenize_records([data.Record({**records[0], "label": "yes"}, "kto.jsonl:1", "llama2_chat")],
                              tiny_tokenizer, args)


def test_the_kto_collator_pairs_each_prompt_with_the_next_answer_for_the_kl_point():
    from finetune.training.preference_trainer import UnpairedCollator

    rows = [{"input_ids": [1, 5, 6, 7, 2], "labels": [-100, -100, 6, 7, 2], "kto_label": True},
            {"input_ids": [1, 8, 9, 2], "labels": [-100, -100, 9, 2], "kto_label": False}]
    batch = UnpairedCollator(0)(rows)
    assert batch["kto_desirable"].tolist() == [True, False]
    assert batch["kl_input_ids"][0, :4].tolist() == [1, 5, 9, 2] and batch["kl_input_ids"][1].tolist() == [1, 8, 6, 7, 2]
    assert batch["kl_preference_labels"][0].tolist() == [-100, -100, 9, 2, -100]
    assert batch["kl_attention_mask"][0].tolist() == [1, 1, 1, 1, 0]


def test_kto_through_train_py_separates_desirable_from_undesirable_on_held_out_prompts(tiny_model, tmp_path):
    with open(os.path.join(ROOT, "demo", "reverse_train.jsonl")) as handle:
        rows = [json.loads(line) for line in handle][:96]
    records = [{"prompt": row["instruction"], "completion": row["response"] if i % 2 else row["response"].upper(),
                "label": bool(i % 2)} for i, row in enumerate(rows)]
    data_file = write_jsonl(tmp_path / "kto.jsonl", records)
    built = build_stages(tiny_model, data_file, tmp_path / "out", *FLAGS, *LORA, "--rl", "kto", "--max_steps", "30")
    assert built.trainer.reference_model is None and built.stats["train"]["desirable"] > 30
    before = built.trainer.evaluate()
    built.trainer.train()
    after = built.trainer.evaluate()
    assert abs(before["eval_rewards/chosen"]) < 1e-6 and abs(before["eval_rewards/rejected"]) < 1e-6
    assert after["eval_rewards/chosen"] - after["eval_rewards/rejected"] > 0.5
    logged = [entry for entry in built.trainer.state.log_history if "loss" in entry]
    assert logged and all("kl" in entry and "rewards/chosen" in entry for entry in logged)


GSM8K = os.path.join(os.path.dirname(ROOT), "shared", "data", "alpaca", "gsm_8k_train.json")


@pytest.mark.skipif(not os.path.isfile(GSM8K), reason="needs ../shared/data/alpaca/gsm_8k_train.json")
def test_dpo_on_pairs_from_real_alpaca_data_raises_the_held_out_margin(tiny_model, tmp_path):
    """Pairs built from a real alpaca file (GSM8K): chosen = the worked answer, rejected = only its first line (an
    unfinished answer); 40 held-out pairs measure the margin before and after (measured: 0 -> 2.48, accuracy 1.0)."""
    with open(GSM8K) as handle:
        rows = [row for row in json.load(handle)[:400] if row["output"].count("\n") >= 2][:120]
    pairs = [{"instruction": row["instruction"], "chosen": row["output"], "rejected": row["output"].split("\n")[0]}
             for row in rows]
    data_file = write_jsonl(tmp_path / "gsm8k_pairs.jsonl", pairs)
    built = build_stages(tiny_model, data_file, tmp_path / "out", "--bits", "32", *LORA, "--dataset_format", "alpaca",
                         "--rl", "dpo", "--per_device_train_batch_size", "4", "--learning_rate", "5e-3",
                         "--lr_scheduler_type", "constant", "--max_steps", "15", "--eval_dataset_size", "40",
                         "--eval_strategy", "steps", "--eval_steps", "1000", "--per_device_eval_batch_size", "8",
                         "--save_strategy", "no", "--model_max_len", "512", "--seed", "3", "--disable_tqdm", "true")
    before = built.trainer.evaluate()
    built.trainer.train()
    after = built.trainer.evaluate()
    assert abs(before["eval_rewards/margins"]) < 1e-6
    assert after["eval_rewards/margins"] > 0.2 and after["eval_rewards/accuracies"] >= 0.75


def test_gradient_accumulation_gives_the_steps_of_the_whole_batch(tiny_model, reverse_pairs, tmp_path):
    """SGD (Adam would hide a loss scaled by the accumulation count): 2 x 2 accumulated = one batch of 4."""
    flags = (*FLAGS, *LORA, "--rl", "dpo", "--max_steps", "3", "--eval_strategy", "no", "--eval_dataset_size", "0",
             "--optim", "sgd", "--learning_rate", "0.5")
    whole = build_stages(tiny_model, reverse_pairs, tmp_path / "whole", *flags)
    whole.trainer.train()
    parts = build_stages(tiny_model, reverse_pairs, tmp_path / "parts", *flags, "--per_device_train_batch_size", "2",
                         "--gradient_accumulation_steps", "2")
    parts.trainer.train()
    assert max((a - b).abs().max().item() for a, b in zip(whole.model.state_dict().values(),
                                                          parts.model.state_dict().values())) <= 1e-6
    start = build_stages(tiny_model, reverse_pairs, tmp_path / "start", *flags).model.state_dict()
    assert max((a - b).abs().max().item() for a, b in zip(start.values(), whole.model.state_dict().values())) > 1e-3
