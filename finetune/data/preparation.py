"""The whole preparation of the training data, in bounded memory, cached under --dataset_prepared_path.

Two passes over the datasets, each reading one record at a time (pipeline.iter_records):
  1. a scan keeps, per record, only its dataset index and its `category` (and a 16-byte key with
     --dataset_exact_deduplication): enough to count, drop duplicates, draw the eval split and the weights;
  2. the records are read again and tokenized in chunks (in --dataset_processes worker processes, a few chunks in
     flight), each chunk's samples appended to an Arrow file as soon as it is done.
Packing then works from the samples' lengths (read from the Arrow column, not from id lists) and writes its rows to
another Arrow file, a chunk of rows at a time. The datasets the Trainer gets are those files, memory-mapped: neither
the records nor the token ids are ever all in memory. The progress of pass 2 is logged with records/s and an ETA.

Cache layout (`<dataset_prepared_path>/`): train.arrow, eval.arrow (when there is an eval split), stats.json (with
the fingerprint of the data and every setting that changes the result). Written to a temporary directory and
renamed, so a crash never leaves a half-written cache. Without a cache (--dry_run) the files go to a temporary
directory removed at exit.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from dataset_formats import IGNORE_INDEX
from finetune.data import mixing
from finetune.data.packing import pack_indices
from finetune.data.pipeline import (
    PREPARED_VERSION,
    DataError,
    Record,
    TokenizeStats,
    custom_settings,
    eval_positions,
    tokenize_records,
)
from finetune.data.sources import iter_records, source_digest
from finetune.data.template_masks import template_traits

if TYPE_CHECKING:
    from train import DataArguments

logger = logging.getLogger(__name__)

CHUNK_RECORDS = 4000  # records per tokenization task: small enough to bound memory, large enough to amortize
SAMPLES = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
PAIRS = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),  # --rl: chosen, then
                   ("rejected_input_ids", pa.list_(pa.int32())), ("rejected_labels", pa.list_(pa.int32()))])
UNPAIRED = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),  # --rl kto
                      ("kto_label", pa.bool_())])
PACKED = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                    ("position_ids", pa.list_(pa.int32()))])


def fingerprint(data_args: DataArguments, tokenizer, seed: int) -> str:
    digest = hashlib.sha256()
    for spec, format_name, is_eval in source_table(data_args):
        digest.update(source_digest(spec) + f"\0{format_name}\0{is_eval}".encode())
    settings = {
        "version": PREPARED_VERSION,
        "format": data_args.dataset_format,
        "model_max_len": data_args.model_max_len,
        "excess_length": data_args.excess_length,
        "skip_bad_records": data_args.skip_bad_records,
        "train_on_source": data_args.train_on_source,
        "roles_to_train": list(data_args.roles_to_train),
        "train_on_reasoning": data_args.train_on_reasoning,
        "default_system_prompt": data_args.default_system_prompt,
        "include_sources": data_args.include_sources,
        "dataset_text_field": data_args.dataset_text_field,
        "sample_packing": [data_args.sample_packing, data_args.eval_sample_packing],
        "preference": "unpaired" if data_args.rl == "kto" else "pairs" if data_args.rl else None,
        "custom": {name.removeprefix("custom_"): value for name, value in custom_settings(data_args).items()},
        "chat_template": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:12],
        "eval_dataset_size": data_args.eval_dataset_size,
        "max_train_samples": data_args.max_train_samples,
        "max_eval_samples": data_args.max_eval_samples,
        "dataset_weights": data_args.dataset_weights,
        "dataset_exact_deduplication": data_args.dataset_exact_deduplication,
        "data_seed": seed,
        "tokenizer": [tokenizer.__class__.__name__, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id],
        "tokenizer_probe": tokenizer("Hello world!\n[INST] 12 ümlaut", add_special_tokens=False)["input_ids"],
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def source_table(data_args: DataArguments) -> list[tuple[str, str, bool]]:
    """(source, format, eval only) of every dataset read: each --dataset in order, then each --eval_dataset."""
    def spread(formats: list[str], count: int) -> list[str]:
        return formats * count if len(formats) == 1 else formats

    train, evals = data_args.dataset, data_args.eval_dataset or []
    return ([(spec, fmt, False) for spec, fmt in zip(train, spread(data_args.dataset_format, len(train)))]
            + [(spec, fmt, True) for spec, fmt in
               zip(evals, spread(data_args.eval_dataset_format or data_args.dataset_format, len(evals)))])


def dataset_formats(data_args: DataArguments) -> list[str]:
    return [format_name for _, format_name, _ in source_table(data_args)]


def all_records(data_args: DataArguments) -> Iterator[Record]:
    for source, (spec, format_name, is_eval) in enumerate(source_table(data_args)):
        for record in iter_records(spec, "--eval_dataset" if is_eval else "--dataset"):
            record.format, record.source = format_name, source
            yield record


def load_cached(cache: str | None, key: str):
    """(train, eval, stats) from a cache made with the same fingerprint, else None."""
    if not cache or not os.path.isfile(os.path.join(cache, "stats.json")):
        return None
    with open(os.path.join(cache, "stats.json")) as handle:
        stats = json.load(handle)
    if stats.get("fingerprint") != key or not os.path.isfile(os.path.join(cache, "train.arrow")):
        logger.info("prepared data in %s was made with other data or settings; preparing again", cache)
        return None
    logger.info("reusing prepared data in %s (fingerprint %s)", cache, key)
    return load_split(cache, "train"), load_split(cache, "eval"), stats


def load_split(directory: str, split: str):
    """One prepared split ("train" or "eval") as a memory-mapped datasets.Dataset; None when it was not written."""
    import datasets

    path = os.path.join(directory, f"{split}.arrow")
    return datasets.Dataset.from_file(path) if os.path.isfile(path) else None


# --- pass 1: what each record is for -------------------------------------------------------------------------------------


class Plan:
    """Per record of the datasets, in reading order: dropped as a duplicate, eval, or trained `repeat` times."""

    def __init__(self, data_args: DataArguments, seed: int):
        table = source_table(data_args)
        self.per_dataset = [{"dataset": spec, "records_read": 0} | ({"eval_only": True} if is_eval else {})
                            for spec, _, is_eval in table]
        sources, categories, duplicate, removed = [], [], [], [0] * len(table)
        deduplicator = mixing.Deduplicator() if data_args.dataset_exact_deduplication else None
        names: dict[str, str] = {}
        for record in all_records(data_args):
            self.per_dataset[record.source]["records_read"] += 1
            if deduplicator is not None and deduplicator.seen(record):
                duplicate.append(True)
                removed[record.source] += 1
                continue
            duplicate.append(False)
            sources.append(record.source)
            category = str(record.data.get("category", ""))
            categories.append(names.setdefault(category, category))  # one string object per distinct category
        for entry in self.per_dataset:
            if not entry["records_read"]:
                flag = "--eval_dataset" if entry.get("eval_only") else "--dataset"
                raise DataError(f"{entry['dataset']}: the file holds no records; add some or point {flag} at another file")
        if deduplicator is not None:
            for entry, count in zip(self.per_dataset, removed):
                entry["duplicates_removed"] = count
        self.duplicate = duplicate if deduplicator is not None else None
        trained = sum(1 for source in sources if source < len(data_args.dataset))  # eval-only datasets come last
        self.eval = eval_positions(categories[:trained], data_args.eval_dataset_size, seed) | set(
            range(trained, len(sources)))
        train_sources = [source for position, source in enumerate(sources) if position not in self.eval]
        repeats = mixing.weighted_repeats(train_sources, data_args.dataset_weights, seed)
        self.repeat = [0] * len(sources)
        train_position = 0
        for position in range(len(sources)):
            if position not in self.eval:
                self.repeat[position] = repeats[train_position]
                train_position += 1
        self.records = len(sources)
        for source, entry in enumerate(self.per_dataset):
            entry["eval_records"] = sum(1 for p in self.eval if sources[p] == source)

    def routed(self, data_args: DataArguments) -> Iterator[tuple[str, Record]]:
        """Pass 2: ("train" | "eval", record) in reading order; duplicates and records weighted to 0 left out."""
        position = 0
        for index, record in enumerate(all_records(data_args)):
            if self.duplicate is not None and self.duplicate[index]:
                continue
            if position in self.eval:
                yield "eval", record
            elif self.repeat[position]:
                record.repeat = self.repeat[position]
                yield "train", record
            position += 1


# --- pass 2: tokenized in chunks, straight to Arrow ----------------------------------------------------------------------


_WORKER_STATE: dict = {}


def tokenize_chunk(chunk: list[Record]) -> tuple[pa.RecordBatch, TokenizeStats]:
    """A chunk's samples as one Arrow batch (compact to send back from a worker process) and its counts."""
    try:
        samples, stats = tokenize_records(chunk, _WORKER_STATE["tokenizer"], _WORKER_STATE["data_args"])
    except DataError as error:  # keep the message; the exception type survives pickling as DataError
        raise DataError(str(error)) from None
    return pa.RecordBatch.from_pylist(samples, schema=row_schema(_WORKER_STATE["data_args"])), stats


def row_schema(data_args: DataArguments) -> pa.Schema:
    """The tokenized rows' columns: SFT samples, or preference pairs (--rl)."""
    return UNPAIRED if data_args.rl == "kto" else PAIRS if data_args.rl else SAMPLES


def chunks(routed: Iterator[tuple[str, Record]]) -> Iterator[tuple[str, int, list[Record]]]:
    """(split, dataset index, records): one split and one dataset per chunk, so counts stay per dataset."""
    current: dict[tuple[str, int], list[Record]] = {}
    for split, record in routed:
        members = current.setdefault((split, record.source), [])
        members.append(record)
        if len(members) >= CHUNK_RECORDS:
            yield split, record.source, current.pop((split, record.source))
    for (split, source), members in current.items():
        yield split, source, members


def tokenized_chunks(work: Iterator[tuple[str, int, list[Record]]], tokenizer, data_args: DataArguments, total: int):
    """Yields (split, source, batch, stats) in order, from worker processes with at most 2 chunks each in flight."""
    _WORKER_STATE.update(tokenizer=tokenizer, data_args=data_args)
    processes = data_args.dataset_processes if total >= 2 * CHUNK_RECORDS else 1
    progress = Progress(total)
    if processes <= 1:
        for split, source, members in work:
            batch, stats = tokenize_chunk(members)
            progress.advance(len(members))
            yield split, source, batch, stats
        return
    context = multiprocessing.get_context("fork")  # the tokenizer is inherited, not pickled
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        pending: collections.deque = collections.deque()
        for split, source, members in work:
            pending.append((split, source, len(members), pool.submit(tokenize_chunk, members)))
            if len(pending) >= 2 * processes:
                split_, source_, size, future = pending.popleft()
                progress.advance(size)
                yield split_, source_, *future.result()
        while pending:
            split_, source_, size, future = pending.popleft()
            progress.advance(size)
            yield split_, source_, *future.result()


class Progress:
    """Logs records done, records/s and the ETA about every 10 s (rank 0 prepares; other ranks wait)."""

    def __init__(self, total: int, every: float = 10.0):
        self.total, self.done, self.every = total, 0, every
        self.start = self.last = time.monotonic()

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= self.every or (self.done >= self.total and now - self.start >= self.every):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            logger.info("tokenized %d / %d records (%.0f%%), %.0f records/s, ETA %.0f s", self.done, self.total,
                        100 * self.done / max(self.total, 1), rate, (self.total - self.done) / max(rate, 1e-9))


# --- packing and ordering, from the lengths ------------------------------------------------------------------------------


def lengths_of(table: pa.Table) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)


def gather(column: pa.ChunkedArray, indices: np.ndarray) -> pa.Array:
    """column[indices] taken chunk by chunk (ChunkedArray.take concatenates every chunk first: the whole
    memory-mapped column in memory, for each block of rows)."""
    bounds = np.cumsum([0] + [len(chunk) for chunk in column.chunks])
    which = np.searchsorted(bounds, indices, side="right") - 1
    order = np.argsort(which, kind="stable")
    chunk_ids, starts = np.unique(which[order], return_index=True)
    local = indices[order] - bounds[which[order]]
    pieces = [column.chunks[chunk].take(pa.array(part))
              for chunk, part in zip(chunk_ids, np.split(local, starts[1:]))]
    grouped = pa.concat_arrays(pieces) if pieces else pa.array([], type=column.type)
    return grouped.take(pa.array(np.argsort(order, kind="stable")))


def write_rows(table: pa.Table, rows: list[list[int]], path: str, packed: bool, block: int = 5000) -> int:
    """Rows of sample indices -> an Arrow file: each row one sample (packed=False) or its samples end to end with
    position_ids restarting at 0 and each sample's first label masked (packed=True). A block of rows at a time."""
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, PACKED if packed else table.schema) as writer:
        for start in range(0, len(rows), block):
            part = rows[start : start + block]
            flat = np.fromiter((index for row in part for index in row), dtype=np.int64)
            if not packed:
                writer.write_batch(pa.RecordBatch.from_arrays([gather(table.column(name), flat) for name in
                                                               table.schema.names], schema=table.schema))
                continue
            ids, labels = gather(table.column("input_ids"), flat), gather(table.column("labels"), flat)
            lengths = ids.value_lengths().to_numpy()
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            values = ids.flatten().to_numpy()
            label_values = np.array(labels.flatten().to_numpy(), dtype=np.int32)
            label_values[starts[lengths > 0]] = IGNORE_INDEX  # predicted from the previous sample's last token
            positions = (np.arange(len(values)) - np.repeat(starts, lengths)).astype(np.int32)
            first_members = np.cumsum([0] + [len(row) for row in part[:-1]])
            row_lengths = np.add.reduceat(lengths.astype(np.int64), first_members)
            offsets = pa.array(np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int32))
            columns = [pa.ListArray.from_arrays(offsets, pa.array(column, type=pa.int32()))
                       for column in (values, label_values, positions)]
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=PACKED))
    return len(rows)


def finish_split(raw: str, final: str, packed: bool, max_len: int, seed: int, shuffle: bool, limit: int | None) -> dict:
    """The tokenized samples in `raw` -> `final`: cut to `limit` samples, shuffled (several datasets or weights), or
    packed from their lengths. Returns the rows summary for stats.json."""
    with pa.memory_map(raw) as source:
        table = pa.ipc.open_stream(source).read_all()
        order = list(range(table.num_rows))
        if shuffle:
            random.Random(seed).shuffle(order)
        order = order[:limit] if limit is not None else order
        if packed:
            lengths = lengths_of(table)
            rows = [[order[i] for i in row] for row in pack_indices([int(lengths[i]) for i in order], max_len, seed)]
            count = write_rows(table, rows, final, packed=True)
            used = int(sum(int(lengths[i]) for i in order))
            return {"samples_used": len(order), "packed": True, "rows": count,
                    "packing_efficiency": round(used / (count * max_len), 5) if count else 0.0}
        write_rows(table, [[i] for i in order], final, packed=False)
        return {"samples_used": len(order), "packed": False}


# --- the whole preparation -----------------------------------------------------------------------------------------------


def prepare_datasets(data_args: DataArguments, tokenizer, seed: int, cache: str | None, write: bool):
    """Returns (train, eval or None, stats dict): memory-mapped datasets. Reuses the prepared data in `cache` (the
    run's --dataset_prepared_path) when its fingerprint matches; writes it there when `write`."""
    key = fingerprint(data_args, tokenizer, seed)
    cached = load_cached(cache, key)
    if cached:
        return cached
    started = time.monotonic()
    plan = Plan(data_args, seed)
    formats = dataset_formats(data_args)
    if "chat_template" in formats and getattr(tokenizer, "chat_template", None):
        logger.info("the tokenizer's chat template: %s", template_traits(tokenizer).describe())
    work, created = staging_dir(cache if write else None)
    try:
        summary = prepare_into(work, plan, data_args, tokenizer, seed, key)
    except BaseException:  # bad data found halfway: leave nothing behind, not even the parents made for the cache
        for path in [work, *created]:
            shutil.rmtree(path, ignore_errors=True)
        raise
    summary["preparation_seconds"] = round(time.monotonic() - started, 1)
    log_stats(summary)
    with open(os.path.join(work, "stats.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    if cache and write:
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(work, cache)
        logger.info("prepared data written to %s", cache)
        work = cache
    return load_split(work, "train"), load_split(work, "eval"), summary


def prepare_into(work: str, plan: Plan, data_args: DataArguments, tokenizer, seed: int, key: str) -> dict:
    """Pass 2 and the finishing of both splits into `work`; returns the stats."""
    stats = {"train": TokenizeStats(), "eval": TokenizeStats()}
    per_source = [TokenizeStats() for _ in plan.per_dataset]
    total = plan.records - (sum(1 for r in plan.repeat if not r) - len(plan.eval))
    raw = {split: os.path.join(work, f"{split}.tokenized.arrow") for split in stats}
    with pa.OSFile(raw["train"], "wb") as train_sink, pa.OSFile(raw["eval"], "wb") as eval_sink, \
            pa.ipc.new_stream(train_sink, row_schema(data_args)) as train_writer, \
            pa.ipc.new_stream(eval_sink, row_schema(data_args)) as eval_writer:
        writers = {"train": train_writer, "eval": eval_writer}
        for split, source, batch, part in tokenized_chunks(chunks(plan.routed(data_args)), tokenizer, data_args, total):
            writers[split].write_batch(batch)
            stats[split].merge(part)
            if split == "train":
                per_source[source].merge(part)
    weights = data_args.dataset_weights or [1.0] * len(data_args.dataset)
    for entry, part, weight in zip(plan.per_dataset, per_source, weights):  # the training datasets
        entry.update(weight=weight, train_records=part.samples_read, train_samples=part.samples_kept,
                     trained_tokens=part.trained_tokens)
    train_stats, eval_stats = stats["train"], stats["eval"]
    if not train_stats.samples_kept:
        raise DataError(
            f"{' '.join(data_args.dataset)}: no training sample is left after tokenization "
            f"({train_stats.dropped_too_long} of {train_stats.samples_read} exceed --model_max_len "
            f"{data_args.model_max_len}); raise --model_max_len or pass --excess_length truncate"
        )
    packing = {"train": data_args.sample_packing}
    packing["eval"] = packing["train"] if data_args.eval_sample_packing is None else data_args.eval_sample_packing
    shuffle = len(data_args.dataset) > 1 or bool(data_args.dataset_weights)  # datasets and repeats mixed
    train_rows = finish_split(raw["train"], os.path.join(work, "train.arrow"), packing["train"], data_args.model_max_len,
                              seed, shuffle, data_args.max_train_samples)
    eval_rows = None
    if plan.eval and eval_stats.samples_kept:
        eval_rows = finish_split(raw["eval"], os.path.join(work, "eval.arrow"), packing["eval"],
                                 data_args.model_max_len, seed, False, data_args.max_eval_samples)
    for path in raw.values():
        os.remove(path)
    summary = {
        "fingerprint": key,
        "dataset": data_args.dataset,
        "dataset_format": data_args.dataset_format,
        "model_max_len": data_args.model_max_len,
        "datasets": plan.per_dataset,
        "train": train_stats.summary() | train_rows,
        "eval": eval_stats.summary() | eval_rows if plan.eval else None,
    }
    return summary


def wait_for_cache(cache: str, key: str, poll: float = 1.0, log_every: float = 60.0):
    """Another rank on this machine prepares the data: wait for its cache by polling the file system, not in a
    collective, so however long the preparation takes no process-group timeout (--ddp_timeout) is hit. The launcher
    (torchrun) ends this process if the preparing rank fails."""
    start = last = time.monotonic()
    while True:
        if os.path.isfile(os.path.join(cache, "stats.json")):
            with open(os.path.join(cache, "stats.json")) as handle:
                try:
                    ready = json.load(handle).get("fingerprint") == key
                except json.JSONDecodeError:
                    ready = False
            if ready:
                return load_cached(cache, key)
        if time.monotonic() - last >= log_every:
            last = time.monotonic()
            logger.debug("waiting %.0f s for the prepared data in %s", last - start, cache)
        time.sleep(poll)


def staging_dir(cache: str | None) -> tuple[str, list[str]]:
    """Next to the cache when it will be written (renamed into place at the end), else a temporary directory; and
    the parent directories made for it (removed again if the preparation fails)."""
    if not cache:
        path = tempfile.mkdtemp(prefix="prepared-")
        atexit.register(shutil.rmtree, path, True)
        return path, []
    path = f"{cache.rstrip(os.sep)}.tmp-{os.getpid()}"
    created, parent = [], os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path, created


def log_stats(stats: dict) -> None:
    for entry in stats["datasets"] if len(stats["datasets"]) > 1 or "duplicates_removed" in stats["datasets"][0] else []:
        if entry.get("eval_only"):
            logger.info("eval dataset %s: %d records read, %s duplicates (of earlier records) removed, %d to eval",
                        entry["dataset"], entry["records_read"], entry.get("duplicates_removed", "no check for"),
                        entry["eval_records"])
            continue
        logger.info("dataset %s: %d records read, %s duplicates removed, %d to eval, %d train records after weight "
                    "%g, %d samples kept, %d trained tokens", entry["dataset"], entry["records_read"],
                    entry.get("duplicates_removed", "no check for"), entry["eval_records"], entry["train_records"],
                    entry["weight"], entry["train_samples"], entry["trained_tokens"])
    for split in ("train", "eval"):
        s = stats[split]
        if not s:
            continue
        logger.info(
            "%s data: %d records read, %d kept, %d dropped as longer than --model_max_len %d, %d truncated, "
            "%d bad records skipped, %d tokens (%.1f%% trained), %d/%d end with a trained end token, lengths %s",
            split, s["samples_read"], s["samples_kept"], s["dropped_too_long"], stats["model_max_len"],
            s["truncated"], s["bad_records"], s["tokens"], 100 * s["trained_token_fraction"],
            s["ending_with_trained_end_token"], s["samples_kept"], s["length_percentiles"],
        )
        if s["identical_pairs"] or s["prompt_too_long"]:
            logger.info("%s data: preference pairs dropped: %d with identical sides, %d whose prompt alone fills "
                        "--model_max_len", split, s["identical_pairs"], s["prompt_too_long"])
        if s.get("packed"):
            logger.info("%s data packed into %d rows of %d tokens: packing efficiency %.2f%% (real tokens / slots)",
                        split, s["rows"], stats["model_max_len"], 100 * s["packing_efficiency"])
        if s["records_with_tools"] or s["records_with_reasoning"] or s["split_records"]:
            logger.info(
                "%s data: %d records with tools (%d calls, %d results), %d with reasoning (%d traces); %d records "
                "rendered as several samples (%.2f samples per record); chat template strategies %s", split,
                s["records_with_tools"], s["tool_calls"], s["tool_results"], s["records_with_reasoning"],
                s["reasoning_traces"], s["split_records"], s["samples_per_record"], s["template_strategies"] or "-",
            )
        for example in s["bad_record_examples"]:
            logger.warning("skipped bad record: %s", example)
        if s["boundary_merges"]:
            logger.warning(
                "%s data: %d prompt/response boundaries fell inside a token; those tokens are trained as response",
                split, s["boundary_merges"],
            )
