"""Dataset sources beyond one local file (issue 11: axolotl's datasets[].data_files / name / split / train_on_split and
test_datasets): a local folder read through `datasets` with its splits, chosen files of a folder, a folder saved by
save_to_disk, separate eval datasets; bad sources stop up front naming the fix."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from conftest import run, train_py, write_jsonl

import train
from finetune.data import preparation
from finetune.data.sources import DataError, iter_records, parse_source


def rows(tag: str, n: int) -> list[dict]:
    return [{"instruction": f"{tag} {i}", "input": "", "output": f"ok {i}"} for i in range(n)]


@pytest.fixture
def folder(tmp_path):
    """A dataset folder as people push them to the hub: one file per split, named by the split."""
    root = tmp_path / "my_dataset"
    root.mkdir()
    write_jsonl(root / "train.jsonl", rows("T", 30))
    write_jsonl(root / "test.jsonl", rows("E", 7))
    write_jsonl(root / "extra.jsonl", rows("X", 11))
    return str(root)


def prepare(tokenizer, **settings):
    args = train.DataArguments(dataset_format=["alpaca"], **settings)
    return preparation.prepare_datasets(args, tokenizer, seed=3, cache=None, write=False)


def tags(prepared, tokenizer) -> set[str]:
    return {tokenizer.decode(ids).split("### Instruction:")[-1].split()[0] for ids in prepared["input_ids"]}


def test_a_folders_splits_chosen_files_and_separate_eval_datasets(tmp_path, folder, tiny_tokenizer):
    # a folder: `datasets` infers the splits from the file names; train by default
    assert [r.data["instruction"] for r in iter_records(folder + "?data_files=train.jsonl")][:2] == ["T 0", "T 1"]
    train_set, eval_set, stats = prepare(tiny_tokenizer, dataset=[f"{folder}?data_files=train.jsonl,extra.jsonl"],
                                         eval_dataset=[f"{folder}?data_files=test.jsonl"])
    assert len(train_set) == 41 and tags(train_set, tiny_tokenizer) == {"T", "X"}
    assert len(eval_set) == 7 and tags(eval_set, tiny_tokenizer) == {"E"}  # every record of an eval dataset
    assert [entry["records_read"] for entry in stats["datasets"]] == [41, 7]
    assert stats["datasets"][1]["eval_only"] and stats["datasets"][1]["eval_records"] == 7
    # data_files keeps each record's file:line for errors
    where = [r.where for r in iter_records(f"{folder}?data_files=extra.jsonl")]
    assert where[0] == "extra.jsonl:1" and len(where) == 11


def test_a_folder_without_data_files_is_read_by_datasets_with_the_split_asked(folder, tiny_tokenizer):
    only_splits = os.path.join(os.path.dirname(folder), "splits")
    os.mkdir(only_splits)
    for name in ("train.jsonl", "test.jsonl"):
        os.link(os.path.join(folder, name), os.path.join(only_splits, name))
    train_set, eval_set, stats = prepare(tiny_tokenizer, dataset=[only_splits], eval_dataset=[only_splits])
    assert tags(train_set, tiny_tokenizer) == {"T"} and tags(eval_set, tiny_tokenizer) == {"E"}  # eval: test split
    assert len(train_set) == 30 and len(eval_set) == 7
    assert len(list(iter_records(only_splits + "?split=test"))) == 7
    with pytest.raises(DataError, match=r"\?split=NAME"):
        list(iter_records(only_splits + "?split=validation"))


def test_a_folder_saved_by_save_to_disk_is_loaded_with_its_split(tmp_path, tiny_tokenizer):
    import datasets

    saved = str(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows("S", 9)),
                          "validation": datasets.Dataset.from_list(rows("V", 4))}).save_to_disk(saved)
    train_set, eval_set, _ = prepare(tiny_tokenizer, dataset=[saved], eval_dataset=[saved + "?split=validation"])
    assert (len(train_set), len(eval_set)) == (9, 4) and tags(eval_set, tiny_tokenizer) == {"V"}
    with pytest.raises(DataError, match=r"no split 'test' in this saved dataset \(it has train, validation\)"):
        list(iter_records(saved, "--eval_dataset"))  # an eval source's default split: test


def test_the_prepared_cache_changes_with_the_files_a_source_reads(folder, tiny_tokenizer):
    args = train.DataArguments(dataset=[f"{folder}?data_files=train.jsonl"], dataset_format=["alpaca"])
    before = preparation.fingerprint(args, tiny_tokenizer, 1)
    write_jsonl(os.path.join(folder, "train.jsonl"), rows("T", 31))
    assert preparation.fingerprint(args, tiny_tokenizer, 1) != before
    other = train.DataArguments(dataset=[f"{folder}?data_files=train.jsonl"], dataset_format=["alpaca"],
                                eval_dataset=[f"{folder}?data_files=test.jsonl"])
    assert preparation.fingerprint(other, tiny_tokenizer, 1) != preparation.fingerprint(args, tiny_tokenizer, 1)


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "{data}?split=test"], "a local file holds one split (train)"),
    (["--dataset", "{data}?splitt=test"], "(did you mean split?)"),
    (["--dataset", "{data}?name=en"], "local files have none"),
    (["--dataset", "{folder}?data_files=nothing*.jsonl"], "data_files nothing*.jsonl matches no file"),
    (["--dataset", "{data}", "--eval_dataset", "{data}?split=test"], "--eval_dataset {data}?split=test: split=test"),
    (["--dataset", "{folder}?data_files=train.jsonl,notes.txt"], "notes.txt, which is not a"),
    (["--dataset", "{data}", "--full_finetune", "--bits", "16", "--fp16"], "use --bits 32 --fp16, or --bits 16 --bf16"),
    (["--dataset", "{data}", "{data}", "--dataset_format", "alpaca", "chatml", "--eval_dataset", "{data}"],
     "give --eval_dataset_format"),
    (["--dataset", "{data}", "--eval_dataset", "{data}", "--eval_dataset_size", "0.1"],
     "--eval_dataset and --eval_dataset_size 0.1 both give an eval set"),
    (["--dataset", "{data}", "--eval_dataset", "{data}", "{data}", "--eval_dataset_format", "alpaca", "alpaca",
      "alpaca"], "2 eval datasets but 3 formats"),
])
def test_bad_sources_stop_before_anything_is_loaded(tmp_path, folder, flags, message):
    data = write_jsonl(tmp_path / "d.jsonl", rows("D", 3))
    (tmp_path / "my_dataset" / "notes.txt").write_text("not data")
    argv = ["--model_name_or_path", "m", "--output_dir", str(tmp_path / "out")]
    argv += [flag.format(data=data, folder=folder) for flag in flags]
    with pytest.raises(train.UsageError) as error:
        train.parse_arguments(argv)
    assert message.format(data=data) in str(error.value)


def test_axolotl_dataset_subsets_and_test_datasets_train_and_evaluate(tmp_path, folder, tiny_model):
    """data_files / split / train_on_split / name / test_datasets / weight of axolotl entries, end to end."""
    config = {
        "base_model": tiny_model, "output_dir": str(tmp_path / "out"), "sequence_len": 128, "micro_batch_size": 2,
        "max_steps": 2, "learning_rate": 1e-3, "optimizer": "adamw_torch", "val_set_size": 0, "eval_steps": 2,
        "datasets": [{"path": folder, "data_files": ["train.jsonl"], "type": "alpaca", "split": "train"},
                     {"path": folder, "data_files": "extra.jsonl", "type": "alpaca", "weight": 2}],
        "test_datasets": [{"path": folder, "data_files": ["test.jsonl"], "type": "alpaca", "split": "train"}],
    }
    path = tmp_path / "axolotl.yml"
    path.write_text(yaml.safe_dump(config))
    _, data_args, args, _ = train.parse_arguments([str(path)])
    assert data_args.dataset == [f"{folder}?split=train&data_files=train.jsonl", f"{folder}?data_files=extra.jsonl"]
    assert data_args.eval_dataset == [f"{folder}?split=train&data_files=test.jsonl"]
    assert data_args.dataset_weights == [1.0, 2.0] and data_args.eval_dataset_format == ["alpaca"]
    assert str(args.eval_strategy.value) == "steps"  # eval_steps with test_datasets evaluates
    assert args.full_finetune and args.bits == 32  # no adapter, no bf16/fp16: fp32 weights, as axolotl loads them
    result = run(train_py(str(path), "--report_to", "none"), cwd=str(tmp_path))
    assert result.returncode == 0, result.output[-3000:]
    stats = json.load(open(tmp_path / "out" / "prepared_data" / "stats.json"))
    assert [entry["records_read"] for entry in stats["datasets"]] == [30, 11, 7]
    assert stats["datasets"][1]["train_records"] == 22 and stats["eval"]["samples_kept"] == 7
    state = json.load(open(tmp_path / "out" / "eval_results.json"))
    assert 0 < state["eval_loss"] < 20  # evaluated on the test dataset (a finite loss)
    hub = dict(config, datasets=[{"path": "org/ds", "name": ["en", "de"], "train_on_split": "validation"}])
    hub.pop("test_datasets")
    path.write_text(yaml.safe_dump(hub))
    assert train.parse_arguments([str(path)])[1].dataset == ["org/ds?split=validation&name=en",
                                                              "org/ds?split=validation&name=de"]
    clash = dict(hub, datasets=[{"path": "org/ds", "split": "train", "train_on_split": "test"}])
    path.write_text(yaml.safe_dump(clash))
    with pytest.raises(train.UsageError, match="split train and train_on_split test disagree"):
        train.parse_arguments([str(path)])


def test_axolotls_path_json_with_local_data_files_reads_them_and_tracks_their_bytes(tmp_path, tiny_tokenizer):
    """axolotl's `path: json` + `data_files: local.jsonl` idiom goes through datasets' json builder; the prepared
    cache must still notice an edit of the local file."""
    data = write_jsonl(tmp_path / "local.jsonl", rows("J", 5))
    spec = f"json?data_files={data}"
    assert parse_source(spec).kind == "hub" and len(list(iter_records(spec))) == 5
    args = train.DataArguments(dataset=[spec], dataset_format=["alpaca"])
    before = preparation.fingerprint(args, tiny_tokenizer, 1)
    write_jsonl(data, rows("J", 6))
    assert preparation.fingerprint(args, tiny_tokenizer, 1) != before


def test_axolotl_entry_details_that_would_be_lost_or_clash(tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", rows("E", 3))
    config = {"base_model": "m", "output_dir": str(tmp_path / "out"), "val_set_size": 0, "fp16": True,
              "datasets": [{"path": data, "type": "alpaca"}],
              # axolotl's documented test_datasets example: a file path and the same file in data_files
              "test_datasets": [{"path": data, "split": "train", "data_files": [data], "type": "alpaca"}]}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    _, data_args, args, _ = train.parse_arguments([str(path)])
    assert data_args.eval_dataset == [f"{data}?split=train"]  # data_files of a file path ignored, as axolotl does
    assert args.full_finetune and args.bits == 32 and args.fp16  # fp16 trains fp32 master weights
    clash = dict(config, datasets=[{"path": data, "type": "chat_template", "roles_to_train": ["assistant"]}],
                 test_datasets=[{"path": data, "type": "chat_template", "roles_to_train": ["assistant", "tool"]}])
    path.write_text(yaml.safe_dump(clash))
    with pytest.raises(train.UsageError, match=r"test_datasets\[0\] sets roles_to_train differently"):
        train.parse_arguments([str(path)])


def test_a_source_spec_is_parsed_once():
    source = parse_source("org/ds?split=validation&name=en&data_files=a.jsonl,b/*.jsonl")
    assert (source.path, source.split, source.name, source.data_files) == (
        "org/ds", "validation", "en", ("a.jsonl", "b/*.jsonl"))
    assert source.kind == "hub" and parse_source("data.jsonl").kind == "file"
