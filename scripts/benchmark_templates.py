"""Tokenization throughput of chat data by the layout format and by models' own chat templates, side by side.

    python scripts/benchmark_templates.py [--records 1000] [--turns 4]

Synthetic conversations (a system prompt, then --turns user/assistant exchanges, each answer with a reasoning
trace) are tokenized by the pipeline's one tokenization step (finetune.data.pipeline.tokenize_records) with the
tiny test tokenizer, in one process, one after the other:
  chatml                 the chatml layout format (no Jinja)
  chat_template qwen2.5  Qwen2.5's template: the prefix strategy, one sample per record, reasoning inline
  chat_template qwen3    Qwen3's template: it drops past reasoning, so the per_turn strategy, one sample per turn
Reported: records/s, time as a ratio of chatml's, samples and tokens made. Nothing here is a unit test.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def conversation(i: int, turns: int) -> dict:
    messages = [{"role": "system", "content": "You are a careful assistant."}]
    for t in range(turns):
        messages += [{"role": "user", "content": f"Question {i}-{t}: what is {i} plus {t}? Explain briefly."},
                     {"role": "assistant", "content": f"The answer is {i + t}.", "reasoning_content": f"We add {i} and {t}. " * 6}]
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=4)
    options = parser.parse_args()
    from benchmark_loss import cpu_name
    from transformers import AutoTokenizer

    from finetune.data import pipeline as data
    from finetune.tiny_model import make_tiny_model
    from train import DataArguments

    model = make_tiny_model(os.path.join(tempfile.mkdtemp(), "tiny"), tokenizer_kind="bpe", hidden=64, layers=2)
    base = AutoTokenizer.from_pretrained(model)

    def tokenizer(template: str | None, added=()):
        out = copy.deepcopy(base)
        out.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, replace_extra_special_tokens=False)
        out.add_tokens(list(added))
        if template:
            with open(os.path.join(ROOT, "tests", "templates", f"{template}.jinja"), encoding="utf-8") as handle:
                out.chat_template = handle.read()
        return out

    args = DataArguments(dataset=["synthetic.jsonl"], model_max_len=1 << 20)
    rows = []
    for label, format_name, tok in [("chatml", "chatml", tokenizer(None)),
                                    ("chat_template qwen2.5", "chat_template", tokenizer("qwen2.5-instruct")),
                                    ("chat_template qwen3", "chat_template", tokenizer("qwen3", ["<think>", "</think>"]))]:
        records = [data.Record(conversation(i, options.turns), f"synthetic.jsonl:{i + 1}", format_name)
                   for i in range(options.records)]
        start = time.perf_counter()
        samples, stats = data.tokenize_records(records, tok, args)
        rows.append((label, time.perf_counter() - start, len(samples), stats.tokens, stats.template_strategies))
    print(f"{options.records} conversations of {options.turns} turns with reasoning, 1 process, {cpu_name()}")
    for label, took, samples, tokens, strategies in rows:
        print(f"{label:22s} {options.records / took:8.1f} records/s  time x{took / rows[0][1]:5.2f}  "
              f"samples {samples}  tokens {tokens}  {strategies or ''}")


if __name__ == "__main__":
    main()
