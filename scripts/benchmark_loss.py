"""Peak memory and step time of the loss, side by side: transformers' plain loss vs the trained-token loss.

    python scripts/benchmark_loss.py [--steps 3] [--shapes 128256x4096 32000x2048] [--configs plain chunked ...]

A random Llama (hidden 256, 2 layers, 4 heads) with the shape's vocabulary, one row of the shape's length, the
first half of it masked as prompt (instruction data is 40-60 % prompt), full fine-tune in fp32 with AdamW, no
dataset and no Trainer: each step is forward, loss, backward and optimizer step through the same code the Trainer
runs (`model(..., labels=...)` for plain, `TrainedTokenLoss` around `model(..., logits_to_keep=1)` for chunked).
Every configuration runs in its own process, so each peak RSS is its own; the first step is warm-up, the others
are timed. Configurations:
  plain           transformers' loss: full-vocabulary logits for every position, upcast to fp32
  chunked         logits only at trained positions, --chunk rows at a time, recomputed in the backward
  plain_compile   plain under torch.compile (inductor; needs a C++ compiler on CPU)
  chunked_compile chunked under torch.compile
Nothing here is a unit test; the tests check that the two losses and their gradients are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

CONFIGS = ["plain", "chunked", "plain_compile", "chunked_compile"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(config: str, vocab: int, length: int, steps: int, chunk: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.training.loss import TrainedTokenLoss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=length,
                                         tie_word_embeddings=False))
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, vocab, (1, length))
    labels = ids.clone()
    labels[:, : length // 2] = -100
    loss_head = TrainedTokenLoss.for_model(model, chunk)[0] if config.startswith("chunked") else None
    forward = torch.compile(model) if config.endswith("_compile") else model

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        if loss_head is None:
            loss = forward(input_ids=ids, labels=labels).loss
        else:
            with loss_head.capturing():
                outputs = forward(input_ids=ids, logits_to_keep=1)
                loss = loss_head(outputs, labels)
        loss.backward()
        optimizer.step()
        return float(loss)

    baseline = peak_rss_mb()  # model, optimizer and inputs built, no step yet
    started = time.perf_counter()
    first_loss = step()
    warmup = time.perf_counter() - started
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return {"config": config, "vocab": vocab, "tokens": length, "first_loss": round(first_loss, 6),
            "step_s": round(sorted(times)[len(times) // 2], 3), "warmup_s": round(warmup, 2),
            "peak_rss_mb": round(peak_rss_mb()), "peak_over_baseline_mb": round(peak_rss_mb() - baseline)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    parser.add_argument("--shapes", nargs="+", default=["128256x4096", "32000x2048"], help="VOCABxTOKENS")
    parser.add_argument("--configs", nargs="+", default=["plain", "chunked"], choices=CONFIGS)
    parser.add_argument("--chunk", type=int, default=1024, help="trained positions per chunk (--cross_entropy_chunk_size)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per configuration")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print its JSON
    args = parser.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        config, vocab, length = args.one.split(":")
        print("result-json:", json.dumps(one(config, int(vocab), int(length), args.steps, args.chunk)), flush=True)
        return
    print(f"{cpu_name()}, {args.threads} threads, chunk {args.chunk}, {args.steps} timed steps after one warm-up")
    results = []
    for shape in args.shapes:
        vocab, length = (int(x) for x in shape.split("x"))
        for config in args.configs:
            command = [sys.executable, os.path.abspath(__file__), "--one", f"{config}:{vocab}:{length}",
                       "--steps", str(args.steps), "--chunk", str(args.chunk), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS":
                                                                                   str(args.threads)})
            line = next((x for x in done.stdout.splitlines() if x.startswith("result-json:")), None)
            if done.returncode or line is None:
                print(f"{config} {shape}: failed (exit {done.returncode})\n{done.stderr[-3000:]}")
                continue
            results.append(json.loads(line.split(":", 1)[1]))
            print(json.dumps(results[-1]), flush=True)
    print("\n| vocab | tokens | config | step s | peak RSS MB | peak - baseline MB | first loss |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['vocab']} | {r['tokens']} | {r['config']} | {r['step_s']} | {r['peak_rss_mb']} | "
              f"{r['peak_over_baseline_mb']} | {r['first_loss']} |")
    print("\n| vocab | tokens | config / plain | step time | peak RSS | peak - baseline |")
    print("|---|---|---|---|---|---|")
    for r in results:
        plain = next((p for p in results if p["config"] == "plain" and p["vocab"] == r["vocab"]
                      and p["tokens"] == r["tokens"]), None)
        if plain is None or r is plain:
            continue
        print(f"| {r['vocab']} | {r['tokens']} | {r['config']} | {r['step_s'] / plain['step_s']:.2f}x | "
              f"{r['peak_rss_mb'] / plain['peak_rss_mb']:.2f}x | "
              f"{r['peak_over_baseline_mb'] / max(1, plain['peak_over_baseline_mb']):.2f}x |")


if __name__ == "__main__":
    main()
