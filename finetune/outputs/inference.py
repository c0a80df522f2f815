"""Inference prompts and generation, shared by --do_predict, the model card and scripts/chat.py.

One module because three places build inference prompts and none may grow its own renderer: a
prompt is either the saved tokenizer's chat template (attached and verified against the training ids by
finetune.data.pipeline.attach_chat_template) or the training format's own segments cut before the answer
(dataset_formats.prompt_segments) encoded by the one encoder, dataset_formats.encode_segments. Predictions made
during training go further: they feed the tokenized sample's own prompt ids, exactly as trained.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from dataset_formats import (
    FORMAT_INFO,
    IGNORE_INDEX,
    LAYOUT_SEGMENTS,
    RecordError,
    encode_segments,
    get_format,
    prompt_segments,
    render_segments,
)
from finetune.fileio import write_atomically

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
# Formats without a chat layout are single-turn: the user's text goes into the first of these fields the format
# accepts, and the answer fields get a placeholder that prompt_segments cuts off again.
PROMPT_FIELDS = ("instruction", "question", "prompt", "input")
ANSWER_FIELDS = ("output", "response", "completion", "answer", "generation", "revision", "summary")
PLACEHOLDER = "x"


class PromptError(ValueError):
    """A conversation that the chosen format cannot render as a prompt."""


def format_prompt_segments(dataset_format: str, messages: list[dict]):
    """The training format's segments for `messages`, up to where the next answer starts."""
    layout = FORMAT_INFO[dataset_format].chat_layout
    if layout:
        return prompt_segments(LAYOUT_SEGMENTS[layout](messages + [{"role": "assistant", "content": PLACEHOLDER}]))
    users = [m["content"] for m in messages if m["role"] == "user"]
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    render = get_format(dataset_format)
    for field in PROMPT_FIELDS:
        record = {field: users[-1], **{name: PLACEHOLDER for name in ANSWER_FIELDS if name != field}}
        if system:
            record.update(system=system, system_prompt=system)
        try:
            return prompt_segments(render(record))
        except (RecordError, ValueError):
            continue
    raise PromptError(
        f"--dataset_format {dataset_format} cannot render a prompt from one user message (its records need more "
        f"than one of the fields {', '.join(PROMPT_FIELDS)}); use the model's chat template or --raw"
    )


def prompt_ids(tokenizer, messages: list[dict], dataset_format: Optional[str] = None) -> list[int]:
    """The ids a trained model expects before its answer to the last user message: the tokenizer's chat template
    (add_generation_prompt=True), or, with `dataset_format`, that format's prompt segments (formats without a chat
    layout see only the last user message and the system prompt)."""
    if dataset_format is None:
        if not tokenizer.chat_template:
            raise PromptError("this tokenizer has no chat template; pass --dataset_format (the format the model was "
                              "trained with, see its README.md) or --raw")
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    return encode_segments(format_prompt_segments(dataset_format, messages), tokenizer).input_ids


def prompt_text(tokenizer, messages: list[dict], dataset_format: Optional[str] = None) -> str:
    """The same prompt as readable text (special tokens written out), for the model card."""
    if dataset_format is None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return render_segments(format_prompt_segments(dataset_format, messages), bos=tokenizer.bos_token or "",
                           eos=tokenizer.eos_token or "", mark=False)


def stop_ids(gen_config, tokenizer) -> set[int]:
    eos = gen_config.eos_token_id if gen_config.eos_token_id is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def generate(model, tokenizer, prompts: list[list[int]], gen_config, batch_size: int = 8, streamer=None) -> list[list[int]]:
    """New ids for each prompt (left-padded batches), each cut after its first stop id. Every rank must call this
    under DeepSpeed ZeRO-3 (generation gathers the sharded weights)."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_ids(gen_config, tokenizer)
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), max(1, batch_size)):
                batch = prompts[start : start + max(1, batch_size)]
                width = max(map(len, batch))
                input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch], device=device)
                attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
                generated = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_config,
                                           pad_token_id=pad, use_cache=True, streamer=streamer)
                for row in generated[:, width:].tolist():
                    end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
                    outputs.append(row[:end])
    finally:
        if was_training:
            model.train()
    return outputs


def answer_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def sample_prompts(dataset, count: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference answer ids) of the first `count` samples: the ids before the first trained token,
    as trained, and the first trained span. Packed rows are split back into their samples."""
    pairs: list[tuple[list[int], list[int]]] = []
    for row in dataset:
        positions = row.get("position_ids")
        starts = [i for i, p in enumerate(positions) if p == 0] if positions is not None else [0]
        for begin, end in zip(starts, starts[1:] + [len(row["input_ids"])]):
            ids, labels = row["input_ids"][begin:end], row["labels"][begin:end]
            first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
            if not first:  # nothing trained, or no prompt at all (completion format)
                continue
            last = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
            pairs.append((ids[:first], ids[first:last]))
            if len(pairs) >= count:
                return pairs
    return pairs


def write_predictions(trainer, tokenizer, dataset, gen_config, count: int, directory: str) -> list[dict]:
    """--do_predict: answers to `count` held-out prompts, written as predictions.jsonl (rank 0), two logged."""
    pairs = sample_prompts(dataset, count)
    generated = generate(trainer.model, tokenizer, [p for p, _ in pairs], gen_config, trainer.args.per_device_eval_batch_size)
    stops = stop_ids(gen_config, tokenizer)
    rows = [
        {
            "prompt": tokenizer.decode(prompt),
            "reference": answer_text(tokenizer, reference),
            "prediction": answer_text(tokenizer, output),
            "prompt_tokens": len(prompt),
            "new_tokens": len(output),
            "stopped": bool(output) and output[-1] in stops,
        }
        for (prompt, reference), output in zip(pairs, generated)
    ]
    if trainer.is_world_process_zero():
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, PREDICTIONS_FILE)
        write_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        log_samples("prediction", rows[:2])
        logger.info("%d predictions (max_new_tokens %s) written to %s", len(rows), gen_config.max_new_tokens, path)
    return rows


def log_samples(what: str, rows: list[dict]) -> None:
    for row in rows:
        logger.info("%s sample:\n  prompt: ...%s\n  reference: %s\n  prediction: %s", what, row["prompt"][-200:],
                    row["reference"][:200], row["prediction"][:200])
