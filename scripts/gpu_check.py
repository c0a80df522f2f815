"""The GPU check's measurements (run through scripts/gpu_check.sh, which installs what they need first).

    python scripts/gpu_check.py [--steps 12] [--out gpu_check_out]

A random Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, vocab 128,256: 1.24 B
parameters) and long-tail instruction data generated here (prompt and answer lengths log-normal, p50 ~130 and p99
~1,650 tokens together, like self-instruct data), trained in this process through the same stages train.py builds,
one configuration after another:
  packed        full fine-tune bf16, flash_attention_2, --sample_packing (varlen rows of 4,096)
  grouped       full fine-tune bf16, flash_attention_2, length-grouped batches of 8, padded
  qlora         --bits 4 nf4 + double quant, LoRA all linear layers, bf16, flash_attention_2, packed
  qlora_plain   the same with --chunked_cross_entropy False (transformers' full-logits loss)
Per configuration: real tokens/s and MFU (the trainer's own log, mean after two warm-up steps), peak
torch.cuda.max_memory_allocated, and the --dry_run plan's estimate for the same run. Fails (exit 1) rather than
skip when anything is missing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import time

WORDS = ("the of and to in is that for it as with was on be by this are from at an which not or have but one all "
         "were can their there been if more when will would who so no model data train answer question explain "
         "because therefore first second result value number function return list string error token").split()
MAX_LEN = 4096
WORD_TOKENS = 2.9  # tokens per word of WORDS with finetune.tiny_model's BPE tokenizer (measured)


def fail(message: str) -> None:
    print(f"gpu_check: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def long_tail_records(n: int, seed: int = 0) -> list[dict]:
    """Instruction/response pairs whose token lengths follow a log-normal: total p50 ~130, p99 ~1,650."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        total = min(int(math.exp(rng.gauss(math.log(130), 1.09))), 3500)  # tokens; sigma: ln(1650/130) / 2.326
        words = max(8, round(total / WORD_TOKENS))
        prompt = max(3, int(words * rng.uniform(0.2, 0.6)))
        answer = max(3, words - prompt)
        records.append({"instruction": " ".join(rng.choice(WORDS) for _ in range(prompt)),
                        "response": " ".join(rng.choice(WORDS) for _ in range(answer))})
    return records


def make_model(folder: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.tiny_model import build_tokenizer

    tokenizer = build_tokenizer("bpe")  # small vocabulary, but the model's head is the full 128,256 wide
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=MAX_LEN,
                         rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


CONFIGS = {
    "packed": ["--full_finetune", "--bits", "16", "--sample_packing", "--per_device_train_batch_size", "1"],
    "grouped": ["--full_finetune", "--bits", "16", "--train_sampling_strategy", "group_by_length",
                "--per_device_train_batch_size", "8"],
    "qlora": ["--bits", "4", "--quant_type", "nf4", "--double_quant", "--lora_modules", "all", "--lora_r", "16",
              "--sample_packing", "--per_device_train_batch_size", "1"],
    "qlora_plain": ["--bits", "4", "--quant_type", "nf4", "--double_quant", "--lora_modules", "all", "--lora_r", "16",
                    "--sample_packing", "--per_device_train_batch_size", "1", "--chunked_cross_entropy", "False"],
}


def run_one(name: str, model_dir: str, data: str, out: str, steps: int) -> dict:
    import torch

    import train
    from finetune.checks.model_config import check_model_before_writing
    from finetune.run_paths import RunPaths
    from finetune.training import planning, stages

    model_args, data_args, args, gen_args = train.parse_arguments(
        ["--model_name_or_path", model_dir, "--dataset", data, "--dataset_format", "airoboros",
         "--output_dir", os.path.join(out, name), "--model_max_len", str(MAX_LEN), "--bf16",
         "--attn_implementation", "flash_attention_2", "--max_steps", str(steps), "--logging_steps", "1",
         "--save_strategy", "no", "--eval_dataset_size", "0", "--learning_rate", "1e-5", "--report_to", "none",
         "--dataset_prepared_path", os.path.join(out, f"prepared-{name}"), "--overwrite_output_dir",
         *CONFIGS[name]])
    check_model_before_writing(model_args, args, data_args.model_max_len)
    paths = RunPaths.from_args(args, data_args)
    torch.cuda.reset_peak_memory_stats()
    built = stages.build_stages(model_args, data_args, args, gen_args, paths)
    plan = planning.make_plan(built.trainer.model.config, built.tokenizer, built.train_set, args,
                              data_args.model_max_len, 1, model_args.attn_implementation)
    started = time.perf_counter()
    built.trainer.train()
    seconds = time.perf_counter() - started
    logs = [entry for entry in built.trainer.state.log_history if "tokens_per_second" in entry][2:]
    if not logs:
        fail(f"{name}: no tokens_per_second in the trainer's log ({built.trainer.state.log_history[-3:]})")
    result = {
        "config": name,
        "tokens_per_second": round(sum(e["tokens_per_second"] for e in logs) / len(logs)),
        "mfu": round(sum(e.get("mfu", 0.0) for e in logs) / len(logs), 4) if "mfu" in logs[0] else None,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "estimate_gib": round(plan.memory_gib["total"], 2),
        "trained_token_loss": built.trainer.trained_token_loss is not None,
        "train_seconds": round(seconds, 1),
    }
    del built
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per configuration (first 2 not averaged)")
    parser.add_argument("--out", default="gpu_check_out", help="work folder; gpu_check.json is written here")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    options = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        fail("torch sees no CUDA device")
    os.makedirs(options.out, exist_ok=True)
    data = os.path.join(options.out, "long_tail.jsonl")
    with open(data, "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in long_tail_records(3000))
    model_dir = make_model(os.path.join(options.out, "model"))
    device = torch.cuda.get_device_name()
    results = []
    for name in options.configs:
        results.append(run_one(name, model_dir, data, options.out, options.steps))
        print("gpu-check-json:", json.dumps(results[-1]), flush=True)
    print(f"\n{device}, torch {torch.__version__}, CUDA {torch.version.cuda}, {options.steps} steps per configuration")
    print("| config | real tokens/s | MFU | peak allocated GiB | --dry_run estimate GiB | trained-token loss |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['tokens_per_second']} | {r['mfu']} | {r['peak_allocated_gib']} | "
              f"{r['estimate_gib']} | {r['trained_token_loss']} |")
    by = {r["config"]: r for r in results}
    if "packed" in by and "grouped" in by:
        print(f"packed / grouped real tokens/s: {by['packed']['tokens_per_second'] / by['grouped']['tokens_per_second']:.2f}x")
    if "qlora" in by and "qlora_plain" in by:
        print(f"chunked / plain loss peak memory (QLoRA): "
              f"{by['qlora']['peak_allocated_gib'] / by['qlora_plain']['peak_allocated_gib']:.2f}x")
    with open(os.path.join(options.out, "gpu_check.json"), "w") as handle:
        json.dump({"device": device, "torch": torch.__version__, "results": results}, handle, indent=1)
    for r in results:
        if r["config"] != "qlora_plain" and not r["trained_token_loss"]:
            fail(f"{r['config']}: the trained-token loss fell back to the plain path (see the log)")


if __name__ == "__main__":
    main()
