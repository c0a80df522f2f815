"""Where records come from: one dataset source (a local file, a local folder, a subset of files, a hub dataset with
its configuration and split) read one record at a time, each record with its place for error messages.

A source is written as `PATH` or `PATH?key=value&key=value` with the keys
  split       the split to read (a folder's or hub dataset's; a file has one: train). Default: train for --dataset,
              test for --eval_dataset (a file is read whole either way)
  name        the configuration of a hub dataset (axolotl's `name`)
  data_files  comma-separated files (or globs) inside the folder PATH, or in the hub dataset PATH
Local files (.json/.jsonl/.parquet/.csv/.tsv, alone or chosen by data_files) are read here, in pieces, keeping
file:line for every record; folders and hub datasets go through `datasets.load_dataset` (`load_from_disk` for a
folder saved by `save_to_disk`), which keeps its arrow files on disk and yields rows as they are needed.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from finetune.errors import UsageError

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv")
OPTIONS = ("split", "name", "data_files")


class DataError(ValueError):
    """Bad input data; the message names the file, the line or record, the field and the fix."""


@dataclass
class Record:
    data: dict
    where: str  # "file.jsonl:17" or "file.json[16]": used in every error about this record
    format: str = ""  # the --dataset_format of the dataset it came from
    source: int = 0  # the index of its --dataset
    repeat: int = 1  # times its samples are trained (--dataset_weights; finetune/data/mixing.py)



@dataclass(frozen=True)
class DatasetSource:
    spec: str  # as the user wrote it: names the dataset in messages and stats
    path: str
    split: str | None = None
    name: str | None = None
    data_files: tuple[str, ...] = ()
    flag: str = "--dataset"  # the flag that named it, for messages (--dataset or --eval_dataset)

    @property
    def kind(self) -> str:
        """file (one local file), files (data_files in a local folder), folder (a local folder) or hub."""
        if self.data_files and os.path.isdir(self.path):
            return "files"
        if os.path.isdir(self.path):
            return "folder"
        if os.path.isfile(self.path) or self.path.endswith(LOCAL_SUFFIXES):
            return "file"
        return "hub"

    def files(self) -> list[str]:
        """The local files read, in order (kind file or files)."""
        if self.kind == "file":
            return [self.path]
        found: list[str] = []
        for item in self.data_files:
            inside = os.path.join(self.path, item)
            matches = sorted(glob.glob(inside)) or sorted(glob.glob(item))  # inside the folder first, as given next
            if not matches:
                raise UsageError(f"{self.flag} {self.spec}: data_files {item} matches no file in {self.path} "
                                 f"(nor from cwd {os.getcwd()})")
            unreadable = [match for match in matches if not match.endswith(LOCAL_SUFFIXES)]
            if unreadable:
                raise UsageError(f"{self.flag} {self.spec}: data_files {item} gives {unreadable[0]}, which is not a "
                                 f"{'/'.join(LOCAL_SUFFIXES)} file (point data_files at data files)")
            found += [match for match in matches if match not in found]
        return found


def parse_source(spec: str, flag: str = "--dataset") -> DatasetSource:
    """`PATH[?split=..&name=..&data_files=a,b]` -> DatasetSource; unknown keys name the closest."""
    if os.path.exists(spec) or "?" not in spec:
        return DatasetSource(spec, spec, flag=flag)
    path, _, query = spec.rpartition("?")  # the options come after the last ?
    options: dict = {}
    for part in filter(None, query.split("&")):
        key, equals, value = part.partition("=")
        if key not in OPTIONS or not equals or not value:
            match = difflib.get_close_matches(key, OPTIONS, n=1)
            hint = f" (did you mean {match[0]}?)" if match and key not in OPTIONS else ""
            raise UsageError(f"{flag} {spec}: '{part}' is not key=value with a key of {', '.join(OPTIONS)}{hint}")
        options[key] = value
    data_files = tuple(item for item in options.pop("data_files", "").split(",") if item)
    source = DatasetSource(spec, path, data_files=data_files, flag=flag, **options)
    if source.kind in ("file", "files"):
        if source.name:
            raise UsageError(f"{flag} {spec}: name={source.name} chooses a configuration of a hub dataset; local "
                             "files have none: drop it")
        if source.split not in (None, "train"):
            raise UsageError(f"{flag} {spec}: split={source.split}, but a local file holds one split (train); "
                             "point at the file that holds the split you want")
    if source.kind == "file" and data_files:
        raise UsageError(f"{flag} {spec}: data_files chooses files inside a folder or hub dataset, but {path} "
                         "is a file")
    return source


def check_source(spec: str, flag: str = "--dataset") -> DatasetSource:
    """Up-front checks (validate.py): the syntax, and that local files are there."""
    source = parse_source(spec, flag)
    if source.kind == "file" and not os.path.isfile(source.path):
        raise UsageError(f"{flag} {source.path}: file not found (cwd: {os.getcwd()})")
    if source.kind == "files":
        source.files()
    return source


def source_digest(spec: str) -> bytes:
    """What the prepared-data fingerprint hashes for a source: local files' bytes, else the spec itself."""
    source = parse_source(spec)
    digest = hashlib.sha256(spec.encode())
    paths = source.files() if source.kind in ("file", "files") else []
    if source.kind == "hub":  # `json?data_files=local.jsonl` (axolotl's path: json): the local files it names
        paths = sorted(match for item in source.data_files for match in glob.glob(item))
    if source.kind == "folder":
        paths = sorted(os.path.join(root, name) for root, _, names in os.walk(source.path) for name in names)
    for path in paths:
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, source.path if source.kind == "folder" else ".").encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.digest()


def read_records(dataset: str, flag: str = "--dataset") -> list[Record]:
    """Every record of a source (tests and small tools; the pipeline streams with iter_records)."""
    records = list(iter_records(dataset, flag))
    if not records:
        raise DataError(f"{dataset}: the file holds no records; add some or point {flag} at another file")
    return records


def iter_records(dataset: str, flag: str = "--dataset") -> Iterator[Record]:
    """The records of one source, one at a time: JSON Lines, JSON arrays, parquet and CSV/TSV are read in pieces,
    so memory does not grow with the file (a JSON file whose top level is an object is read whole). A folder's or
    hub dataset's split defaults to train for --dataset, test for --eval_dataset."""
    source = parse_source(dataset, flag)
    if source.kind in ("folder", "hub"):
        yield from read_loaded(source, source.split or ("test" if flag == "--eval_dataset" else "train"))
        return
    for path in source.files():
        if not os.path.isfile(path):
            raise DataError(f"{flag} {path}: file not found (cwd: {os.getcwd()})")
        name = os.path.basename(path)
        if path.endswith(".jsonl"):
            yield from read_jsonl(path, name)
        elif path.endswith(".json"):
            yield from read_json(path, name)
        else:
            yield from read_table(path, name)


def read_jsonl(path: str, name: str) -> Iterator[Record]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{name}:{number}: not valid JSON ({error.msg} at column {error.colno})") from error
            if not isinstance(value, dict):
                raise DataError(f"{name}:{number}: each line must be a JSON object, got {type(value).__name__}")
            yield Record(value, f"{name}:{number}")


def read_json(path: str, name: str) -> Iterator[Record]:
    with open(path, encoding="utf-8") as handle:
        start = handle.read(4096).lstrip()
    if start.startswith("["):
        yield from read_json_array(path, name)
        return
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # JSON Lines saved as .json
            try:
                yield from list(read_jsonl(path, name))
                return
            except DataError:
                pass
        raise DataError(f"{name}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})") from error
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(f"{name}: the top level must be a list of records (or JSON Lines), got {type(value).__name__}")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{name}[{index}]: each record must be a JSON object, got {type(item).__name__}")
        yield Record(item, f"{name}[{index}]")


def read_json_array(path: str, name: str, block: int = 1 << 20) -> Iterator[Record]:
    """A top-level JSON array decoded one element at a time from a sliding buffer (errors keep the file's line)."""
    decoder = json.JSONDecoder()
    buffer, offset, line, index, done = "", 0, 1, 0, False
    with open(path, encoding="utf-8") as handle:
        buffer = handle.read(block)
        offset = buffer.index("[") + 1
        while True:
            while True:  # skip whitespace and the comma before the next element, reading on as needed
                while offset < len(buffer) and buffer[offset] in " \t\r\n,":
                    line += buffer[offset] == "\n"
                    offset += 1
                if offset < len(buffer) or done:
                    break
                more = handle.read(block)
                done = not more
                buffer, offset = buffer[offset:] + more, 0
            if offset >= len(buffer):
                raise DataError(f"{name}:{line}: not valid JSON (the array is not closed with ])")
            if buffer[offset] == "]":
                return
            try:
                item, end = decoder.raw_decode(buffer, offset)
            except json.JSONDecodeError as error:
                more = "" if done else handle.read(block)
                if more:  # the element runs past the buffer: read on and decode it again
                    buffer, offset, done = buffer[offset:] + more, 0, False
                    continue
                where = line + buffer.count("\n", offset, error.pos)
                raise DataError(f"{name}:{where}: not valid JSON ({error.msg})") from error
            if not isinstance(item, dict):
                raise DataError(f"{name}[{index}]: each record must be a JSON object, got {type(item).__name__}")
            yield Record(item, f"{name}[{index}]")
            line += buffer.count("\n", offset, end)
            index += 1
            offset = end
            if offset > block:
                buffer, offset = buffer[offset:], 0


def read_table(path: str, name: str, block: int = 10_000) -> Iterator[Record]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=block):
            for row in batch.to_pylist():
                yield Record(row, f"{name}[row {index}]")
                index += 1
        return
    import pandas as pd

    line = 2  # line 1 is the header
    for frame in pd.read_csv(path, sep="\t" if path.endswith(".tsv") else ",", keep_default_na=False, chunksize=block):
        for row in frame.to_dict(orient="records"):
            yield Record(row, f"{name}:{line}")
            line += 1


def read_loaded(source: DatasetSource, split: str) -> Iterator[Record]:
    """A local folder or a hub dataset through `datasets` (rows read from its arrow files as they are needed)."""
    import datasets

    saved = source.kind == "folder" and any(
        os.path.isfile(os.path.join(source.path, name)) for name in ("state.json", "dataset_dict.json"))
    try:
        if saved:
            loaded = datasets.load_from_disk(source.path)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{source.flag} {source.spec}: no split '{split}' in this saved dataset (it has "
                                    f"{', '.join(loaded)}); add ?split=NAME")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(source.path, name=source.name, split=split,
                                           data_files=list(source.data_files) or None)
    except DataError:
        raise
    except Exception as error:  # datasets raises many types (ConnectionError, FileNotFoundError, DatasetNotFound...)
        message = str(error).splitlines()[0] if str(error) else ""
        what = "reading the folder" if source.kind == "folder" else "not a local file, and loading it from the Hugging Face hub"
        raise DataError(
            f"{source.flag} {source.spec}: {what} failed ({type(error).__name__}: {message}). A split must exist "
            "(?split=NAME), a configuration is chosen with ?name=NAME; local data can be a .json/.jsonl/.parquet/"
            ".csv/.tsv file. For the hub check the name and your network (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE must "
            "be unset to download)."
        ) from error
    for index, row in enumerate(loaded):
        yield Record(row, f"{source.spec}[{index}]")
