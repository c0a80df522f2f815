"""From a dataset file to tokenized samples: read (one record at a time), split, render, tokenize once, filter,
count, collate. preparation.py runs these steps over whole datasets in bounded memory and caches the result.

A self-contained pipeline with its own errors (file:line, field, format); tests exercise it without loading a model. It reads the
DataArguments of train.py (the type is imported for annotations only: train.py imports this module). Formats live in dataset_formats.py; the one tokenization step is dataset_formats.encode_segments.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from dataset_formats import (
    FORMAT_INFO,
    IGNORE_INDEX,
    LAYOUT_SEGMENTS,
    RecordError,
    Samples,
    chat_template,
    encode_segments,
    end_token_id,
    get_format,
    pretokenized_sample,
    response,
    special_ids,
)
from finetune.data import pairs
from finetune.data.conversations import CONVERSATION_FIELDS, reasoning_count, tool_counts
from finetune.data.packing import PackedCollator, padded_length
from finetune.data.sources import DataError, Record, read_records  # noqa: F401 (read_records: the tests' entry point)

if TYPE_CHECKING:
    from train import DataArguments

logger = logging.getLogger(__name__)

PREPARED_VERSION = 3  # bump when the tokenization or the prepared layout changes, so old caches are not reused


# --- splitting -----------------------------------------------------------------------------------------------------------


def eval_count(total: int, eval_size: float) -> int:
    """--eval_dataset_size: a fraction < 1 of the records, or a count >= 1; at least one record for any fraction > 0."""
    if eval_size <= 0:
        return 0
    count = max(1, round(total * eval_size)) if eval_size < 1 else int(eval_size)
    if count >= total:
        raise DataError(
            f"--eval_dataset_size {eval_size} leaves no training records ({total} records in all); lower it"
        )
    return count


def split_records(records: list[Record], eval_size: float, seed: int, stratify_field: str = "category"):
    """Seeded train/eval split; when records carry `category`, each category gives its share to eval."""
    chosen = eval_positions([str(record.data.get(stratify_field, "")) for record in records], eval_size, seed)
    train = [r for i, r in enumerate(records) if i not in chosen]
    evaluation = [r for i, r in enumerate(records) if i in chosen]
    return train, evaluation


def eval_positions(categories: list[str], eval_size: float, seed: int) -> set[int]:
    """The positions split_records sends to eval, from the records' categories alone (a list of strings, not the
    records: preparation.py calls it on millions of records without holding them)."""
    count = eval_count(len(categories), eval_size)
    if count == 0:
        return set()
    rng = random.Random(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, category in enumerate(categories):
        groups[category].append(index)
    for members in groups.values():
        rng.shuffle(members)
    # largest-remainder apportionment: every category gets round(share), the total is exactly `count`
    quotas = {key: count * len(members) / len(categories) for key, members in groups.items()}
    taken = {key: int(quota) for key, quota in quotas.items()}
    for key in sorted(quotas, key=lambda k: (taken[k] - quotas[k], k))[: count - sum(taken.values())]:
        taken[key] += 1
    return {i for key, members in groups.items() for i in members[: taken[key]]}


# --- tokenizing ----------------------------------------------------------------------------------------------------------


@dataclass
class TokenizeStats:
    samples_read: int = 0
    samples_kept: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    bad_records: int = 0  # skipped with --skip_bad_records
    bad_record_examples: list[str] = field(default_factory=list)
    no_trained_tokens: int = 0  # e.g. truncated down to the prompt: nothing to learn, skipped
    tokens: int = 0
    trained_tokens: int = 0
    ending_with_trained_end_token: int = 0  # EOS, or the format's end-of-turn token (chatml: <|im_end|>)
    boundary_merges: int = 0
    records_with_tools: int = 0  # kept samples whose record has tool schemas, tool calls or tool results
    tool_calls: int = 0
    tool_results: int = 0
    records_with_reasoning: int = 0  # records with at least one non-empty reasoning trace
    reasoning_traces: int = 0
    records_kept: int = 0  # records that gave at least one sample (samples_kept counts samples)
    split_records: int = 0  # records rendered as several samples (chat templates that render past turns differently)
    template_strategies: dict = field(default_factory=dict)  # chat_template: records per strategy (template_masks.py)
    identical_pairs: int = 0  # --rl: pairs whose chosen and rejected are the same ids (dropped)
    desirable: int = 0  # --rl kto: kept samples labelled desirable (the rest are undesirable)
    prompt_too_long: int = 0  # --rl: pairs whose shared prompt alone fills --model_max_len (dropped)
    lengths: list[int] = field(default_factory=list)

    def merge(self, other: TokenizeStats) -> None:
        for name, value in vars(other).items():
            if name == "bad_record_examples":
                self.bad_record_examples = (self.bad_record_examples + value)[:5]
            elif name == "template_strategies":
                for key, count in value.items():
                    self.template_strategies[key] = self.template_strategies.get(key, 0) + count
            else:
                setattr(self, name, getattr(self, name) + value)

    def summary(self) -> dict:
        lengths = sorted(self.lengths)

        def percentile(p: float) -> int:
            return lengths[min(len(lengths) - 1, int(p * len(lengths)))] if lengths else 0

        out = {k: v for k, v in self.__dict__.items() if k != "lengths"}
        out["trained_token_fraction"] = round(self.trained_tokens / self.tokens, 4) if self.tokens else 0.0
        out["samples_per_record"] = round(self.samples_kept / self.records_kept, 3) if self.records_kept else 0.0
        out["length_percentiles"] = {f"p{int(p * 100)}": percentile(p) for p in (0.5, 0.9, 0.99)} | {
            "max": lengths[-1] if lengths else 0
        }
        return out


def tokenize_in_processes(records: list[Record], tokenizer, data_args: DataArguments, processes: int) -> tuple[list[dict], TokenizeStats]:
    """tokenize_records over contiguous chunks in `processes` worker processes (fork: the tokenizer is inherited,
    not pickled); samples come back in record order, so the result equals the single-process one."""
    if processes <= 1 or len(records) < 2000:
        return tokenize_records(records, tokenizer, data_args)
    import concurrent.futures
    import multiprocessing

    size = -(-len(records) // (processes * 4))
    chunks = [records[i : i + size] for i in range(0, len(records), size)]
    _WORKER_STATE.update(tokenizer=tokenizer, data_args=data_args)
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        parts = list(pool.map(_tokenize_chunk, chunks))
    samples, stats = [], TokenizeStats()
    for part_samples, part_stats in parts:
        samples += part_samples
        stats.merge(part_stats)
    return samples, stats


_WORKER_STATE: dict = {}


def _tokenize_chunk(chunk: list[Record]):
    try:
        return tokenize_records(chunk, _WORKER_STATE["tokenizer"], _WORKER_STATE["data_args"])
    except DataError as error:  # keep the message; the exception type survives pickling as DataError
        raise DataError(str(error)) from None


def tokenize_records(records: list[Record], tokenizer, data_args: DataArguments) -> tuple[list[dict], TokenizeStats]:
    """Render every record with its dataset's format and tokenize it once; drop, truncate or refuse those longer
    than --model_max_len (counted)."""
    stats = TokenizeStats(samples_read=sum(record.repeat for record in records))
    options = format_options(data_args, tokenizer)
    end_tokens = {name: end_token_id(name, tokenizer) for name in {record.format for record in records}}
    samples = []
    for record in records:
        format_name = record.format
        if data_args.rl:
            keep = keep_unpaired if data_args.rl == "kto" else keep_pair
            kept = keep(record, tokenizer, data_args, options, stats, end_tokens[format_name])
            samples += kept
            stats.records_kept += len(kept)
            continue
        try:
            encoded, strategy = encode_record(record.data, format_name, tokenizer, data_args, options)
        except RecordError as error:
            message = f"{record.where}: {error} (--dataset_format {format_name})"
            if not data_args.skip_bad_records:
                raise DataError(message + "; fix the record or pass --skip_bad_records") from error
            stats.bad_records += 1
            if len(stats.bad_record_examples) < 5:
                stats.bad_record_examples.append(message)
            continue
        copies = record.repeat  # a weighted record: tokenized once, its samples kept (and counted) `copies` times
        kept = [sample for _ in range(copies) for ids, labels, merges in encoded
                if (sample := keep_sample(ids, labels, merges, record, data_args, stats, end_tokens[format_name]))]
        if not kept:
            continue
        samples += kept
        stats.records_kept += copies
        stats.split_records += copies * (len(encoded) > 1)
        if strategy:
            stats.template_strategies[strategy] = stats.template_strategies.get(strategy, 0) + copies
        calls, results = tool_counts(record.data)
        stats.records_with_tools += copies * bool(calls or results or record.data.get("tools"))
        stats.tool_calls += copies * calls
        stats.tool_results += copies * results
        traces = reasoning_count(record.data)
        stats.records_with_reasoning += copies * bool(traces)
        stats.reasoning_traces += copies * traces
    return samples, stats


def keep_sample(ids, labels, merges, record: Record, data_args: DataArguments, stats: TokenizeStats, end_token: int):
    """A sample as kept for training (length rule of --excess_length applied, counted), or None when dropped."""
    if len(ids) > data_args.model_max_len:
        if data_args.excess_length == "raise":
            raise DataError(
                f"{record.where}: {len(ids)} tokens, more than --model_max_len {data_args.model_max_len}; "
                "raise --model_max_len, or pass --excess_length drop (or truncate)"
            )
        if data_args.excess_length == "drop":
            stats.dropped_too_long += 1
            return None
        ids, labels = truncate_keeping_cue(ids, labels, data_args.model_max_len)
        stats.truncated += 1
    if all(label == IGNORE_INDEX for label in labels):
        stats.no_trained_tokens += 1
        return None
    stats.samples_kept += 1
    stats.tokens += len(ids)
    stats.trained_tokens += sum(label != IGNORE_INDEX for label in labels)
    stats.ending_with_trained_end_token += labels[-1] == end_token
    stats.boundary_merges += merges
    stats.lengths.append(len(ids))
    return {"input_ids": ids, "labels": labels}


def encode_preference(encode, record: Record, tokenizer, data_args: DataArguments, options, stats: TokenizeStats):
    """pairs.encode_pair / encode_unpaired on a record, rendered by its dataset's format; None (counted) for a
    bad record with --skip_bad_records."""
    try:
        return encode(record.data, FORMAT_INFO[record.format].pairs, lambda side: render_samples(
            side, record.format, data_args, options)[0], tokenizer)
    except RecordError as error:
        message = f"{record.where}: {error} (--dataset_format {record.format}, --rl {data_args.rl})"
        if not data_args.skip_bad_records:
            raise DataError(message + "; fix the record or pass --skip_bad_records") from error
        stats.bad_records += 1
        if len(stats.bad_record_examples) < 5:
            stats.bad_record_examples.append(message)
        return None


def keep_unpaired(record: Record, tokenizer, data_args: DataArguments, options, stats: TokenizeStats,
                  end_token: int) -> list[dict]:
    """--rl kto: a record -> its row (input_ids, labels, kto_label), `repeat` times; its prompt filling
    --model_max_len drops it (counted); a longer answer follows --excess_length."""
    sample = encode_preference(pairs.encode_unpaired, record, tokenizer, data_args, options, stats)
    if sample is None:
        return []
    copies, limit = record.repeat, data_args.model_max_len
    if sample.prompt_length >= limit:
        stats.prompt_too_long += copies
        return []
    kept = [row | {"kto_label": sample.desirable} for _ in range(copies) if (row := keep_sample(
        sample.input_ids, sample.labels, sample.boundary_merges, record, data_args, stats, end_token))]
    stats.desirable += len(kept) * sample.desirable
    return kept


def keep_pair(record: Record, tokenizer, data_args: DataArguments, options, stats: TokenizeStats,
              end_token: int) -> list[dict]:
    """--rl: a preference record -> its pair row (chosen as input_ids/labels, rejected as rejected_*), `repeat`
    times; none (counted) when both sides are the same ids or the prompt alone fills --model_max_len."""
    pair = encode_preference(pairs.encode_pair, record, tokenizer, data_args, options, stats)
    if pair is None:
        return []
    copies, limit = record.repeat, data_args.model_max_len
    if pair.identical:
        stats.identical_pairs += copies
        return []
    if pair.prompt_length >= limit:
        stats.prompt_too_long += copies
        return []
    sides = [(pair.chosen_ids, pair.chosen_labels), (pair.rejected_ids, pair.rejected_labels)]
    if max(len(ids) for ids, _ in sides) > limit:
        if data_args.excess_length == "raise":
            raise DataError(f"{record.where}: {max(len(ids) for ids, _ in sides)} tokens in a side of this pair, more "
                            f"than --model_max_len {limit}; raise --model_max_len, or pass --excess_length drop "
                            "(or truncate: the answers' tails are cut)")
        if data_args.excess_length == "drop":
            stats.dropped_too_long += copies
            return []
        sides = [(ids[:limit], labels[:limit]) for ids, labels in sides]  # the prompt fits: only answers are cut
        stats.truncated += copies
    (chosen, chosen_labels), (rejected, rejected_labels) = sides
    row = {"input_ids": chosen, "labels": chosen_labels, "rejected_input_ids": rejected,
           "rejected_labels": rejected_labels}
    stats.samples_kept += copies
    stats.tokens += copies * (len(chosen) + len(rejected))
    stats.trained_tokens += copies * sum(label != IGNORE_INDEX for _, labels in sides for label in labels)
    stats.ending_with_trained_end_token += copies * (chosen_labels[-1] == end_token == rejected_labels[-1])
    stats.boundary_merges += copies * pair.boundary_merges
    stats.lengths += [max(len(chosen), len(rejected))] * copies
    return [row] * copies


def truncate_keeping_cue(ids: list[int], labels: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut the answer's tail; if the prompt alone does not fit, cut the prompt's beginning (after its first token,
    usually BOS) instead, so the assistant cue right before the answer always survives."""
    first_trained = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    if first_trained < max_len:
        return ids[:max_len], labels[:max_len]
    answer = min(len(ids) - first_trained, max_len // 2)
    prompt_room = max_len - answer - 1
    keep = [0] + list(range(first_trained - prompt_room, first_trained + answer))
    return [ids[i] for i in keep], [labels[i] for i in keep]


CUSTOM_FIELDS = ("format", "no_input_format", "system_format", "system_prompt", "field_instruction", "field_input",
                 "field_output", "field_system")


def format_options(data_args: DataArguments, tokenizer) -> SimpleNamespace:
    """What configurable formats may read: completion's text field, the custom format's templates, the tokenizer
    (chat_template renders with it), the roles trained and whether reasoning is (chatml, chat_template)."""
    return SimpleNamespace(dataset_text_field=data_args.dataset_text_field, tokenizer=tokenizer,
                           roles_to_train=tuple(data_args.roles_to_train), train_on_reasoning=data_args.train_on_reasoning,
                           **custom_settings(data_args))


def custom_settings(data_args: DataArguments) -> dict:
    """The --custom_* flags, by their flag names."""
    return {f"custom_{name}": getattr(data_args, f"custom_{name}") for name in CUSTOM_FIELDS}


def encode_record(record: dict, format_name: str, tokenizer, data_args: DataArguments, options):
    """One record -> ([(input_ids, labels, boundary merges), ...], strategy): the format's segments through the one
    encoder; one sample per record except where a format returns several (Samples, with how it split them)."""
    if format_name == "pretokenized":
        ids, labels = pretokenized_sample(record, len(tokenizer))
        return [(ids, list(ids) if data_args.train_on_source else labels, 0)], ""
    samples, strategy = render_samples(record, format_name, data_args, options)
    encoded = [encode_segments(segments, tokenizer, train_on_source=data_args.train_on_source) for segments in samples]
    return [(e.input_ids, e.labels, e.boundary_merges) for e in encoded], strategy


def render_samples(record: dict, format_name: str, data_args: DataArguments, options):
    """One record -> (its samples' segments, the chat-template strategy or ""), with the run's default system prompt
    and sources applied."""
    if data_args.default_system_prompt and (FORMAT_INFO[format_name].chat_layout or format_name == "chat_template"):
        record = with_default_system(record, data_args.default_system_prompt)
    rendered = get_format(format_name, options)(record)
    if data_args.include_sources and format_name == "airoboros" and record.get("source"):
        rendered = with_source(rendered, str(record["source"]))
    return (rendered if isinstance(rendered, Samples) else [rendered]), getattr(rendered, "strategy", "")


def with_default_system(record: dict, prompt: str) -> dict:
    """The record with a system turn first (in its own message style: role/content or from/value) if it has none."""
    for name in CONVERSATION_FIELDS:
        turns = record.get(name)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            first = turns[0]
            if "from" in first and "role" not in first:
                if first["from"] == "system":
                    return record
                return {**record, name: [{"from": "system", "value": prompt}, *turns]}
            if first.get("role") == "system":
                return record
            return {**record, name: [{"role": "system", "content": prompt}, *turns]}
    return record


def with_source(segments, source: str):
    """--include_sources: the record's `source` is appended to the (trained) answer, before EOS."""
    return segments[:-1] + [response(f"\n\nSource: {source.strip()}")] + segments[-1:]


# --- chat template: inference renders exactly what training saw -------------------------------------------------------

TEMPLATE_PROBES = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?\nThink."},
        {"role": "assistant", "content": "6, since 3 + 3 = 6."},
    ],
    [  # a reasoning trace (only chatml renders it; the other layouts see it inline in the content of their data)
        {"role": "user", "content": "Is 7 prime?"},
        {"role": "assistant", "content": "Yes.", "reasoning_content": "7 has no divisor but 1 and 7."},
    ],
]


def answer_starts(labels: list[int]) -> list[int]:
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]


def template_matches_training(tokenizer, layout: str, template: str, conversations=TEMPLATE_PROBES) -> bool:
    """The template gives the training ids for whole conversations, and for every prefix that ends where an answer
    starts (add_generation_prompt=True) exactly the ids the answer follows in training."""
    for messages in conversations:
        encoded = encode_segments(LAYOUT_SEGMENTS[layout](messages), tokenizer)
        render = lambda msgs, gen: tokenizer.apply_chat_template(  # noqa: E731
            msgs, chat_template=template, add_generation_prompt=gen, tokenize=True)["input_ids"]
        if render(messages, False) != encoded.input_ids:
            return False
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for index, start in zip(answers, answer_starts(encoded.labels)):
            if render(messages[:index], True) != encoded.input_ids[:start]:
                return False
    return True


def attach_chat_template(tokenizer, formats: list[str] | str) -> str | None:
    """Give the tokenizer (and so every saved checkpoint, adapter, model and merged model) a chat template that
    renders the training format; returns the layout, or None when no format is a chat layout. With several
    formats, the first chat layout wins (a model trained on two layouts answers in either)."""
    layouts = [FORMAT_INFO[name].chat_layout for name in ([formats] if isinstance(formats, str) else formats)]
    layouts = [layout for layout in layouts if layout]
    if not layouts:
        return None
    layout = layouts[0]
    if len(set(layouts)) > 1:
        logger.warning("datasets use several chat layouts %s; the saved chat template renders %s", sorted(set(layouts)), layout)
    with_bos = special_ids(tokenizer)["bos"] is not None
    for space in (False, True):
        template = chat_template(layout, space, with_bos)
        if template_matches_training(tokenizer, layout, template):
            tokenizer.chat_template = template
            logger.info("chat template for the %s layout attached (verified against the training ids)", layout)
            return layout
    logger.warning(
        "no chat template reproduces the %s training ids with this tokenizer; the saved tokenizer keeps its own "
        "template, so render inference prompts with dataset_formats.%s_segments instead", layout, layout,
    )
    return None


PREVIEW_SPANS = (("<think>", "</think>", "{{", "}}"), ("<tool_call>", "</tool_call>", "<<", ">>"))


def preview(sample: dict, tokenizer) -> str:
    """One tokenized sample as the model is taught it: trained tokens in [[...]], trained reasoning (<think>...
    </think>, also when the prompt opened it) in {{...}}, trained tool calls (<tool_call>...</tool_call>) in
    <<...>>; masked text as it is. A preference pair (--rl) shows both sides."""
    if "rejected_input_ids" in sample:
        rejected = {"input_ids": sample["rejected_input_ids"], "labels": sample["rejected_labels"]}
        return (f"chosen:\n{preview({'input_ids': sample['input_ids'], 'labels': sample['labels']}, tokenizer)}\n"
                f"rejected:\n{preview(rejected, tokenizer)}")
    pieces = [tokenizer.decode([token]) for token in sample["input_ids"]]
    text = "".join(pieces)
    trained = [label != IGNORE_INDEX for piece, label in zip(pieces, sample["labels"]) for _ in piece]
    kind = [("[[", "]]")] * len(text)
    for opening, closing, left, right in PREVIEW_SPANS:
        start = text.find(opening)
        while start >= 0:
            end = text.find(closing, start)
            end = len(text) if end < 0 else end + len(closing)
            kind[start:end] = [(left, right)] * (end - start)
            start = text.find(opening, end)
    out, mode = [], None
    for char, is_trained, marks in zip(text, trained, kind):
        now = marks if is_trained else None
        if now != mode:
            out.append((mode[1] if mode else "") + (now[0] if now else ""))
            mode = now
        out.append(char)
    return "".join(out) + (mode[1] if mode else "")


# --- batching ------------------------------------------------------------------------------------------------------------


class Collator:
    """Packed rows (with position_ids) go to the PackedCollator, plain samples to the PaddingCollator."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.packed = PackedCollator(pad_token_id, pad_to_multiple_of)
        self.padded = PaddingCollator(pad_token_id, pad_to_multiple_of)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return (self.packed if "position_ids" in features[0] else self.padded)(features)


class PaddingCollator:
    """Pads to the longest sample of the batch. Attention mask and labels come from lengths, never from pad ids,
    so padding with EOS (or any id) can never hide a trained EOS."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = padded_length(features, self.pad_to_multiple_of)
        batch = {
            "input_ids": torch.full((len(features), longest), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(features), longest), dtype=torch.long),
            "labels": torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long),
        }
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            batch["input_ids"][row, :n] = torch.as_tensor(feature["input_ids"])
            batch["attention_mask"][row, :n] = 1
            batch["labels"][row, :n] = torch.as_tensor(feature["labels"])
        return batch
