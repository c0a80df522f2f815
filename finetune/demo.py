"""The built-in default: build a tiny model offline, LoRA-train it on a bundled task, merge, and check generations.

    python scripts/demo.py [--work_dir runs/demo] [--max_steps N]

Task (demo/reverse_train.jsonl, airoboros format): "Reverse the letters: abcde" -> "edcba" (distinct letters). The run goes through
the real command line (`python train.py ...`), then the merged model answers the held-out prompts of
demo/reverse_heldout.jsonl, rendered by the same format code used in training. It prints the exact-match accuracy
and how often generation stopped at EOS, and exits non-zero below the bar (90 % exact, 95 % EOS).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_FILE = os.path.join(ROOT, "demo", "reverse_train.jsonl")
HELDOUT_FILE = os.path.join(ROOT, "demo", "reverse_heldout.jsonl")
ALPHABET = "abcdefghijklmnop"
EXACT_MATCH_BAR, EOS_BAR = 0.90, 0.95


def make_task_data(seed: int = 1234, train_size: int = 4000, heldout_size: int = 200) -> None:
    """How the bundled files were made (kept so they can be regenerated); held-out strings never occur in training."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < train_size + heldout_size:
        # distinct letters: each answer letter is "the one before the letter just written", a circuit (reverse
        # induction) that a 2-layer model can learn in a few hundred steps; repeated letters would make it ambiguous
        word = "".join(rng.sample(ALPHABET, rng.randint(3, 7)))
        if word in seen:
            continue
        seen.add(word)
        rows.append({"instruction": f"Reverse the letters: {word}", "response": word[::-1], "category": f"len{len(word)}"})
    for path, part in ((TRAIN_FILE, rows[:train_size]), (HELDOUT_FILE, rows[train_size:])):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in part)


def train_command(base: str, work_dir: str, max_steps: int) -> list[str]:
    return [
        sys.executable, os.path.join(ROOT, "train.py"),
        "--model_name_or_path", base,
        "--dataset", TRAIN_FILE, "--dataset_format", "airoboros",
        "--output_dir", os.path.join(work_dir, "adapter"),
        "--merged_output_dir", os.path.join(work_dir, "merged"),
        "--bits", "32", "--lora_r", "64", "--lora_alpha", "128", "--lora_modules", "all",
        "--learning_rate", "1e-3", "--lr_scheduler_type", "cosine", "--warmup_steps", "30", "--weight_decay", "0.0",
        "--max_steps", str(max_steps), "--per_device_train_batch_size", "32",
        "--eval_dataset_size", "64", "--eval_strategy", "steps", "--eval_steps", str(max_steps // 2),
        "--logging_steps", "50", "--save_strategy", "steps", "--save_steps", str(max_steps // 2),
        "--save_total_limit", "1", "--model_max_len", "64", "--max_new_tokens", "16",
        "--seed", "42", "--data_seed", "42", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
    ]


def evaluate(model_dir: str, heldout_file: str, limit: int | None = None) -> dict:
    """Greedy generation on held-out prompts: exact-match accuracy and the fraction that stopped at EOS.

    Prompts come from the merged model's own chat template (attached at training time and verified against the
    training ids), the way any user of the saved model would build them.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with open(heldout_file) as handle:
        records = [json.loads(line) for line in handle][:limit]
    exact = stopped = 0
    examples = []
    for start in range(0, len(records), 50):
        batch = records[start : start + 50]
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"]}], add_generation_prompt=True)["input_ids"]
            for r in batch
        ]
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding for generation
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False, pad_token_id=pad)
        for record, row in zip(batch, output[:, width:].tolist()):
            ended = tokenizer.eos_token_id in row
            answer = tokenizer.decode(row[: row.index(tokenizer.eos_token_id)] if ended else row).strip()
            exact += answer == record["response"].strip()
            stopped += ended
            if len(examples) < 3:
                examples.append((record["instruction"], answer))
    return {"exact_match": exact / len(records), "stopped_at_eos": stopped / len(records), "n": len(records), "examples": examples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "demo"), help="where everything is written")
    parser.add_argument("--max_steps", type=int, default=1400, help="training steps (batch 32)")
    parser.add_argument("--hidden", type=int, default=128, help="tiny model hidden size")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    started = time.time()
    shutil.rmtree(args.work_dir, ignore_errors=True)  # the demo always starts from scratch

    from finetune.tiny_model import make_tiny_model

    base = make_tiny_model(os.path.join(args.work_dir, "base"), tokenizer_kind="char", hidden=args.hidden, layers=2, init_std=0.1)
    command = train_command(base, args.work_dir, args.max_steps)
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
    result = evaluate(os.path.join(args.work_dir, "merged"), HELDOUT_FILE)
    for prompt_text, answer in result["examples"]:
        print(f"USER: {prompt_text}\nASSISTANT (merged model): {answer}")
    print(
        f"held-out exact match {result['exact_match']:.1%} (bar {EXACT_MATCH_BAR:.0%}), "
        f"stopped at EOS {result['stopped_at_eos']:.1%} (bar {EOS_BAR:.0%}), n={result['n']}, "
        f"total time {time.time() - started:.0f} s"
    )
    with open(os.path.join(args.work_dir, "demo_result.json"), "w") as handle:
        json.dump(result | {"seconds": round(time.time() - started, 1)}, handle, indent=2)
    return 0 if result["exact_match"] >= EXACT_MATCH_BAR and result["stopped_at_eos"] >= EOS_BAR else 1


if __name__ == "__main__":
    sys.exit(main())
