"""Reading, splitting, tokenizing once, collating, stats.json and the prepared-data cache."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import conversations, instructions, run, train_py, write_jsonl

from dataset_formats import IGNORE_INDEX
from finetune.data import pipeline as data
from finetune.data import preparation


def airoboros_records(path: str) -> list:
    return [data.Record(r.data, r.where, "airoboros") for r in data.read_records(path)]


def data_args(path: str, **overrides):
    """The real DataArguments with their real defaults, so these tests cannot drift from the command line."""
    from train import DataArguments

    return DataArguments(**({"dataset": [path], "model_max_len": 512} | overrides))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"instruction": "a", "response": "b"}\n{"instruction": "a",\n', "bad.jsonl:2: not valid JSON"),
        ("list.jsonl", '{"instruction": "a", "response": "b"}\n[1, 2]\n', "list.jsonl:2: each line must be a JSON object"),
        ("top.json", '{"instruction": "a"}', "top.json: the top level must be a list"),
        ("items.json", '[{"instruction": "a", "response": "b"}, "oops"]', "items.json[1]: each record must be a JSON object"),
        ("empty.jsonl", "", "holds no records"),
        ("empty.json", "[]", "holds no records"),
    ],
)
def test_unreadable_files_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(data.DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        data.read_records(str(path))


def test_bad_record_error_names_line_field_and_format(tmp_path, tiny_tokenizer):
    rows = instructions(3)
    rows[1] = {"instruction": "x"}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(data.DataError, match=r"d.jsonl:2: missing field 'response' .* \(--dataset_format airoboros\)"):
        data.tokenize_records(airoboros_records(path), tiny_tokenizer, data_args(path))


def test_csv_tsv_parquet_read_alike(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(instructions(4))
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.tsv", "d.parquet"):
        records = data.read_records(str(tmp_path / name))
        assert [r.data["response"] for r in records] == [r["response"] for r in instructions(4)]
    assert data.read_records(str(tmp_path / "d.csv"))[0].where == "d.csv:2"


def test_split_is_seeded_and_stratified_by_category(tmp_path):
    rows = [{"instruction": f"q{i}", "response": "a", "category": "rare" if i < 10 else "common"} for i in range(100)]
    records = data.read_records(write_jsonl(tmp_path / "d.jsonl", rows))
    train, evaluation = data.split_records(records, 0.2, seed=7)
    assert len(evaluation) == 20 and len(train) == 80
    assert sum(r.data["category"] == "rare" for r in evaluation) == 2  # 10 % of eval, as in the data
    again = data.split_records(records, 0.2, seed=7)[1]
    other = data.split_records(records, 0.2, seed=8)[1]
    assert [r.where for r in again] == [r.where for r in evaluation]
    assert [r.where for r in other] != [r.where for r in evaluation]


def test_too_long_samples_are_dropped_truncated_or_raised_and_counted(tmp_path, tiny_tokenizer):
    rows = instructions(5) + [{"instruction": "long " * 300, "response": "x"}, {"instruction": "q", "response": "word " * 300}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    records = airoboros_records(path)
    kept, stats = data.tokenize_records(records, tiny_tokenizer, data_args(path, model_max_len=64))
    assert len(kept) == 5 and stats.dropped_too_long == 2 and stats.truncated == 0
    assert stats.ending_with_trained_end_token == 5  # every kept sample ends with its trained EOS
    kept, stats = data.tokenize_records(records, tiny_tokenizer,
                                        data_args(path, model_max_len=64, excess_length="truncate"))
    assert stats.truncated == 2 and len(kept) == 7 and all(len(k["input_ids"]) == 64 for k in kept[5:])
    # the long prompt lost its start and kept its whole answer + EOS; the long answer lost its EOS, and stats say so
    assert stats.ending_with_trained_end_token == 6
    long_prompt = kept[5]
    text = tiny_tokenizer.decode(long_prompt["input_ids"])
    assert text.startswith("<s>") and "\nASSISTANT: x</s>" in text  # the prompt lost its start, never its cue
    with pytest.raises(data.DataError, match=r"d.jsonl:6: \d+ tokens, more than --model_max_len 64"):
        data.tokenize_records(records, tiny_tokenizer, data_args(path, model_max_len=64, excess_length="raise"))


def test_bad_records_stop_the_run_or_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    rows = instructions(4) + [{"instruction": "x"}, {"instruction": "y", "response": ""}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    records = airoboros_records(path)
    with pytest.raises(data.DataError, match="d.jsonl:5: missing field 'response'.*--skip_bad_records"):
        data.tokenize_records(records, tiny_tokenizer, data_args(path))
    kept, stats = data.tokenize_records(records, tiny_tokenizer, data_args(path, skip_bad_records=True))
    assert len(kept) == 4 and stats.bad_records == 2
    assert stats.bad_record_examples[1].startswith("d.jsonl:6: field 'response' is empty")


def test_collator_masks_from_lengths_even_when_pad_is_eos():
    eos = 2
    collate = data.PaddingCollator(pad_token_id=eos)
    batch = collate([{"input_ids": [1, 5, 6, eos], "labels": [IGNORE_INDEX, IGNORE_INDEX, 6, eos]},
                     {"input_ids": [1, 7, eos], "labels": [IGNORE_INDEX, 7, eos]}])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 6, eos], [IGNORE_INDEX, 7, eos, IGNORE_INDEX]]
    assert batch["input_ids"].dtype == torch.long


def test_prepare_only_writes_datasets_and_stats_then_a_run_reuses_them(tmp_path, tiny_model):
    path = write_jsonl(tmp_path / "c.jsonl", conversations(20))
    prepared = tmp_path / "prepared"
    flags = ["--model_name_or_path", tiny_model, "--dataset", path, "--dataset_format", "airoboros_chat",
             "--output_dir", str(tmp_path / "out"), "--dataset_prepared_path", str(prepared),
             "--eval_dataset_size", "4", "--model_max_len", "256"]
    first = run(train_py(*flags, "--prepare_only"), cwd=str(tmp_path))
    assert first.returncode == 0, first.output[-3000:]
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["train"]["samples_read"] == 16 and stats["eval"]["samples_read"] == 4
    assert stats["train"]["ending_with_trained_end_token"] == stats["train"]["samples_kept"] == 16
    assert 0 < stats["train"]["trained_token_fraction"] < 1

    train_set = preparation.load_split(str(prepared), "train")
    assert {"input_ids", "labels"} <= set(train_set.column_names) and len(train_set) == 16
    assert "[[" in first.output  # the preview marks trained spans
    assert not (tmp_path / "out" / "completed").exists()

    second = run(train_py(*flags, "--prepare_only"), cwd=str(tmp_path))
    assert "reusing prepared data" in second.output
    changed = run(train_py(*[f if f != "256" else "128" for f in flags], "--prepare_only"), cwd=str(tmp_path))
    assert "reusing prepared data" not in changed.output and "preparing again" in changed.output


def test_several_datasets_each_with_its_format_are_mixed(tmp_path, tiny_model):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"Add {i}.", "output": f"{i}"} for i in range(10)])
    chats = write_jsonl(tmp_path / "c.jsonl", conversations(10))
    prepared = tmp_path / "prepared"
    result = run(train_py("--model_name_or_path", tiny_model, "--dataset", alpaca, "--dataset_format", "alpaca",
                          "--dataset", chats, "--dataset_format", "chatml", "--output_dir", str(tmp_path / "o"),
                          "--dataset_prepared_path", str(prepared), "--prepare_only"), cwd=str(tmp_path))
    assert result.returncode == 0, result.output[-3000:]
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["train"]["samples_kept"] == 20 and stats["train"]["ending_with_trained_end_token"] == 20
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = preparation.load_split(str(prepared), "train")
    kinds = ["alpaca" if r["input_ids"][0] == tokenizer.bos_token_id else "chatml" for r in rows]  # chatml has no BOS
    assert sorted(kinds) == ["alpaca"] * 10 + ["chatml"] * 10
    assert kinds[:10] != ["alpaca"] * 10 and kinds[:10] != ["chatml"] * 10  # shuffled together, not in blocks


def test_pretokenized_and_completion_records(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"input_ids": [1, 50, 51, 2]}, {"input_ids": [1, 60, 2], "labels": [-100, 60, 2]}])
    records = [data.Record(r.data, r.where, "pretokenized") for r in data.read_records(path)]
    kept, stats = data.tokenize_records(records, tiny_tokenizer, data_args(path, dataset_format=["pretokenized"]))
    assert kept == [{"input_ids": [1, 50, 51, 2], "labels": [1, 50, 51, 2]}, {"input_ids": [1, 60, 2], "labels": [-100, 60, 2]}]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1, 99999]}])
    with pytest.raises(data.DataError, match=r"bad.jsonl:1: field 'input_ids' must be a non-empty list of token ids"):
        data.tokenize_records([data.Record(r.data, r.where, "pretokenized") for r in data.read_records(bad)], tiny_tokenizer,
                              data_args(bad))
    text = write_jsonl(tmp_path / "t.jsonl", [{"body": "Once upon a time."}])
    records = [data.Record(r.data, r.where, "completion") for r in data.read_records(text)]
    kept, _ = data.tokenize_records(records, tiny_tokenizer, data_args(text, dataset_text_field="body"))
    assert tiny_tokenizer.decode(kept[0]["input_ids"]) == "<s>Once upon a time.</s>"
    assert kept[0]["labels"][1:] == kept[0]["input_ids"][1:] and kept[0]["labels"][0] == IGNORE_INDEX


def test_tokenizing_in_processes_gives_the_same_samples_and_stats(tmp_path, tiny_tokenizer):
    rows = instructions(2500) + [{"instruction": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    records = airoboros_records(path)
    args = data_args(path, skip_bad_records=True, model_max_len=20)
    one = data.tokenize_records(records, tiny_tokenizer, args)
    two = data.tokenize_in_processes(records, tiny_tokenizer, args, processes=2)
    assert one[0] == two[0] and one[1].summary() == two[1].summary()
    assert two[1].bad_records == 1 and two[1].dropped_too_long > 0
    with pytest.raises(data.DataError, match="d.jsonl:2501: missing field 'response'"):
        data.tokenize_in_processes(records, tiny_tokenizer, data_args(path), processes=2)


def test_pad_to_multiple_of_rounds_up_both_collators():
    padded = data.PaddingCollator(0, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])
    packed = data.Collator(0, 8)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 2]}])
    assert padded["input_ids"].shape == (1, 8) and padded["attention_mask"].sum() == 3
    assert packed["input_ids"].shape == (1, 8) and packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
