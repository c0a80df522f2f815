"""Throughput, side by side in one process tree: the original qlora approach vs ours (grouped, packed) vs TRL.

    make bench        # = pip install -r requirements-bench.txt; python scripts/benchmark_throughput.py
    python scripts/benchmark_throughput.py [--steps 8] [--lengths 2048 4096] [--configs original ours_grouped ...]
    python scripts/benchmark_throughput.py --data longtail --lengths 2048 --batch_sizes 2 12   # the seed recipes'

Same machine, model and data for every configuration: a random Llama (hidden 256, 4 layers) with the real Llama-2
tokenizer from ../shared/data/tokenizers, full fine-tune in fp32, on the alpaca files in ../shared/data/alpaca.
Each configuration trains --steps optimizer steps in its own subprocess; the first step is warm-up and not timed.
  original      qlora's collator: tokenizes prompt and answer in every batch, pads to the batch's longest, random order
  ours_grouped  tokenized once (cached), length-grouped batches padded to the batch's longest
  ours_packed   tokenized once (cached), --sample_packing: one row of --model_max_len per step, no padding
  trl           TRL's SFTTrainer, packing="bfd" with padding-free rows (its best setting here)
Padded configurations use max_len // 256 samples per step so that every step holds about the same real tokens,
or each of --batch_sizes in turn (packed configurations take one row of max_len per step either way).
--data longtail replaces alpaca with held-out-like long-tail data: prompt and answer spans cut from the alpaca
files' own token stream (real text, real tokenizer), total lengths log-normal with p50 ~130 and p99 ~1,650 tokens
(self-instruct-like), so that random batches of 12 pad to their longest. Ours runs the FinetuneTrainer with the
trained-token loss, as train.py does.
Reported per configuration: real (non-pad) tokens/s, real tokens per computed slot, peak RSS, and for ours the
preprocessing time cold and cached; then the ratios ours/original and ours/TRL. Nothing here is a unit test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
ALPACA_FILES = ["gsm_8k_train.json", "gpteacher_toolformer-dedupe-only-dataset.json",
                "gpteacher_roleplay-simple-deduped-roleplay-dataset.json"]
CONFIGS = ["original", "ours_grouped", "ours_packed", "trl"]
PACKED = ("ours_packed", "trl")  # one row of max_len per step, whatever --batch_sizes says
QLORA_ALPACA_PROMPT = {  # qlora.py's ALPACA_PROMPT_DICT, verbatim layout
    "input": ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n"
              "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "),
    "no_input": ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}\n\n### Response: "),
}


def make_model(work: str) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = os.path.join(work, "model")
    os.makedirs(model_dir, exist_ok=True)
    shutil.copy(os.path.join(SHARED, "tokenizers", "llama2", "tokenizer.model"), os.path.join(model_dir, "tokenizer.model"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as handle:
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
                   "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, handle)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir


def make_data(work: str) -> str:
    rows = []
    for name in ALPACA_FILES:
        with open(os.path.join(SHARED, "alpaca", name)) as handle:
            rows += json.load(handle)
    path = os.path.join(work, "alpaca_all.jsonl")
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def make_long_tail_data(work: str, model_dir: str, records: int = 4000) -> str:
    """Alpaca-format records whose instruction and output are spans of real alpaca text; total token lengths
    log-normal (p50 ~130, p99 ~1,650), the prompt 20-60 % of each."""
    import math

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stream: list[int] = []
    for name in ALPACA_FILES:
        with open(os.path.join(SHARED, "alpaca", name)) as handle:
            for row in json.load(handle):
                stream += tokenizer(row["instruction"] + " " + row["output"], add_special_tokens=False)["input_ids"]
    rng = random.Random(1)
    rows = []
    while len(rows) < records:
        total = min(int(math.exp(rng.gauss(math.log(130), math.log(1650 / 130) / 2.326))), 3000)
        prompt = max(4, int(total * rng.uniform(0.2, 0.6)))
        start = rng.randrange(0, len(stream) - total - 1)
        row = {"instruction": tokenizer.decode(stream[start:start + prompt]).strip(), "input": "",
               "output": tokenizer.decode(stream[start + prompt:start + total]).strip()}
        if row["instruction"] and row["output"]:  # a span of only whitespace tokens decodes to nothing
            rows.append(row)
    path = os.path.join(work, "long_tail.jsonl")
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def data_arguments(data_file: str, max_len: int, packing: bool, cache: str):
    from train import DataArguments

    return DataArguments(dataset=[data_file], dataset_format=["alpaca"], model_max_len=max_len, sample_packing=packing,
                         dataset_prepared_path=cache, dataset_processes=2)


def time_preprocessing(model_dir: str, data_file: str, max_len: int, work: str) -> dict:
    """Cold (tokenize + pack + write the cache) and cached (fingerprint + load) preparation, ours, packed."""
    from transformers import AutoTokenizer

    from finetune.data import preparation

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cache = os.path.join(work, f"prepared_{max_len}")
    shutil.rmtree(cache, ignore_errors=True)
    args = data_arguments(data_file, max_len, True, cache)
    started = time.perf_counter()
    _, _, stats = preparation.prepare_datasets(args, tokenizer, seed=0, cache=cache, write=True)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    preparation.prepare_datasets(args, tokenizer, seed=0, cache=cache, write=True)
    cached = time.perf_counter() - started
    return {"cold_s": round(cold, 2), "cached_s": round(cached, 3), "cached_over_cold": round(cached / cold, 4),
            "packing_efficiency": stats["train"]["packing_efficiency"], "samples": stats["train"]["samples_used"]}


# --- one configuration, in its own process ----------------------------------------------------------------------------


class CountingCollator:
    """Wraps a collator: counts real tokens (attention mask, or the unpadded lengths of packed rows) and slots."""

    def __init__(self, inner, pad_id: int):
        self.inner, self.pad_id = inner, pad_id
        self.real = self.slots = 0

    def __call__(self, features):
        batch = self.inner(features)
        ids = batch["input_ids"]
        self.slots += ids.numel()
        if "attention_mask" in batch:
            self.real += int(batch["attention_mask"].sum())
        elif "input_ids" in features[0]:
            self.real += sum(len(f["input_ids"]) for f in features)
        else:
            self.real += ids.numel()
        return batch


class QloraCollator:
    """qlora.py's DataCollatorForCausalLM: tokenizes source and target of every batch, pads to the batch's longest."""

    def __init__(self, tokenizer, source_max_len: int, target_max_len: int):
        self.tokenizer, self.source_max_len, self.target_max_len = tokenizer, source_max_len, target_max_len

    def __call__(self, instances):
        import torch

        sources = [f"{self.tokenizer.bos_token}{x['input']}" for x in instances]
        targets = [f"{x['output']}{self.tokenizer.eos_token}" for x in instances]
        source_ids = self.tokenizer(sources, max_length=self.source_max_len, truncation=True, add_special_tokens=False)["input_ids"]
        target_ids = self.tokenizer(targets, max_length=self.target_max_len, truncation=True, add_special_tokens=False)["input_ids"]
        rows = [(s + t, [-100] * len(s) + t) for s, t in zip(source_ids, target_ids)]
        longest = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([ids + [pad] * (longest - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([labels + [-100] * (longest - len(labels)) for _, labels in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids, _ in rows]),
        }


def step_timer():
    """A callback that times every optimizer step (the first is warm-up and left out of the rate)."""
    from transformers import TrainerCallback  # imported here so that --help answers without loading transformers

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)

    return StepTimer()


def training_arguments(work: str, steps: int, batch: int, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=os.path.join(work, "out"), max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True, remove_unused_columns=False, seed=0,
                             dataloader_num_workers=0, **extra)


def run_config(config: str, model_dir: str, data_file: str, max_len: int, steps: int, work: str,
               batch: int | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

    from finetune.data import pipeline as data
    from finetune.data import preparation
    from finetune.training.loss import TrainedTokenLoss
    from finetune.training.trainer import FinetuneTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.unk_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    padded_batch = batch or max(1, max_len // 256)
    timer = step_timer()
    if config == "trl":
        trainer, counter = trl_trainer(model, tokenizer, data_file, max_len, steps, work)
    else:
        if config == "original":
            import datasets

            rows = [json.loads(line) for line in open(data_file)]
            random.Random(0).shuffle(rows)
            train_set = datasets.Dataset.from_list([
                {"input": QLORA_ALPACA_PROMPT["input" if r.get("input") else "no_input"].format(**r), "output": r["output"]}
                for r in rows])
            collator = QloraCollator(tokenizer, source_max_len=max_len // 2, target_max_len=max_len // 2)
            args = training_arguments(work, steps, padded_batch)
        else:
            packing = config == "ours_packed"
            args_data = data_arguments(data_file, max_len, packing, os.path.join(work, f"prepared_{config}_{max_len}"))
            train_set, _, _ = preparation.prepare_datasets(args_data, tokenizer, seed=0, cache=args_data.dataset_prepared_path,
                                                    write=True)
            collator = data.Collator(tokenizer.pad_token_id)
            args = training_arguments(work, steps, 1 if packing else padded_batch,
                                      train_sampling_strategy="random" if packing else "group_by_length")
        counter = CountingCollator(collator, tokenizer.pad_token_id)
        if config == "original":
            trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=counter)
        else:  # ours: the run's Trainer and loss (logits only at trained positions)
            trainer = FinetuneTrainer(model=model, args=args, train_dataset=train_set, data_collator=counter,
                                      trained_token_loss=TrainedTokenLoss.for_model(model, 1024)[0])
    trainer.add_callback(timer)
    trainer.train()
    timed = sum(timer.times[1:])
    real_per_step = counter.real / max(1, len(timer.times))
    return {
        "config": config, "max_len": max_len, "batch": 1 if config in PACKED else padded_batch,
        "steps": len(timer.times),
        "real_tokens_per_s": round(real_per_step * (len(timer.times) - 1) / timed, 1) if timed else 0.0,
        "real_per_slot": round(counter.real / counter.slots, 4) if counter.slots else 0.0,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def trl_trainer(model, tokenizer, data_file: str, max_len: int, steps: int, work: str):
    import datasets
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in open(data_file)]
    prompts = [QLORA_ALPACA_PROMPT["input" if r.get("input") else "no_input"].format(**r) for r in rows]
    dataset = datasets.Dataset.from_list([{"prompt": p, "completion": r["output"]} for p, r in zip(prompts, rows)])
    config = SFTConfig(output_dir=os.path.join(work, "trl"), max_length=max_len, packing=True, packing_strategy="bfd",
                       padding_free=True, completion_only_loss=True, per_device_train_batch_size=1, max_steps=steps,
                       learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to="none", use_cpu=True,
                       disable_tqdm=True, seed=0, dataset_num_proc=2)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    counter = CountingCollator(trainer.data_collator, tokenizer.pad_token_id)
    trainer.data_collator = counter
    return trainer, counter


# --- the side-by-side run ----------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per configuration (first is warm-up)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096], help="--model_max_len values")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS, help="which configurations")
    parser.add_argument("--work_dir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--data", choices=["alpaca", "longtail"], default="alpaca", help="see above")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=None,
                        help="samples per step of the padded configurations (default: max_len // 256)")
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)  # internal: one configuration
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one configuration
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data_file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.run:
        print("RESULT " + json.dumps(run_config(args.run, args.model, args.data_file, args.lengths[0], args.steps,
                                                args.work_dir, args.batch)))
        return 0
    if not os.path.isdir(SHARED):
        print(f"benchmark needs the real tokenizer and data in {SHARED}; it is absent here")
        return 2
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-")
    model_dir = make_model(work)
    data_file = make_long_tail_data(work, model_dir) if args.data == "longtail" else make_data(work)
    results, preprocessing = [], {}
    runs = [(config, batch) for batch in (args.batch_sizes or [None]) for config in args.configs]
    runs = [(c, b) for i, (c, b) in enumerate(runs) if c not in PACKED or c not in [x for x, _ in runs[:i]]]
    for max_len in args.lengths:
        preprocessing[max_len] = time_preprocessing(model_dir, data_file, max_len, work)
        for config, batch in runs:
            command = [sys.executable, os.path.abspath(__file__), "--run", config, "--model", model_dir, "--data_file",
                       data_file, "--lengths", str(max_len), "--steps", str(args.steps), "--work_dir", work]
            command += ["--batch", str(batch)] if batch else []
            output = subprocess.run(command, capture_output=True, text=True)
            line = next((out for out in output.stdout.splitlines() if out.startswith("RESULT ")), None)
            if line is None:
                print(f"{config} @ {max_len} failed:\n{output.stderr[-3000:]}")
                results.append({"config": config, "max_len": max_len, "error": output.stderr.strip().splitlines()[-1:]})
                continue
            results.append(json.loads(line[len("RESULT "):]))
            print(json.dumps(results[-1]), flush=True)
    report(results, preprocessing, args)
    with open(os.path.join(work, "benchmark.json"), "w") as handle:
        json.dump({"results": results, "preprocessing": preprocessing}, handle, indent=2)
    return 0


def report(results: list[dict], preprocessing: dict, args) -> None:
    batches = f" --batch_sizes {' '.join(map(str, args.batch_sizes))}" if args.batch_sizes else ""
    print(f"\n$ python scripts/benchmark_throughput.py --data {args.data} --steps {args.steps} --lengths "
          f"{' '.join(map(str, args.lengths))}{batches}")
    print("| max_len | config | samples per step | real tokens/s | real tokens / computed slot | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" not in r:
            print(f"| {r['max_len']} | {r['config']} | {r['batch']} | {r['real_tokens_per_s']:.0f} | "
                  f"{r['real_per_slot']:.3f} | {r['peak_rss_mb']:.0f} |")
    for max_len, p in preprocessing.items():
        done = [r for r in results if r["max_len"] == max_len and "error" not in r]
        print(f"\nmax_len {max_len}: packing efficiency {100 * p['packing_efficiency']:.2f}% ({p['samples']} samples); "
              f"preprocessing cold {p['cold_s']} s, cached {p['cached_s']} s ({100 * p['cached_over_cold']:.1f}% of cold)")
        trl = next((r for r in done if r["config"] == "trl"), None)
        for batch in sorted({r["batch"] for r in done if r["config"] == "original"}):
            original = next(r for r in done if r["config"] == "original" and r["batch"] == batch)
            ours = [r for r in done if r["config"] == "ours_packed" or (r["config"] == "ours_grouped" and r["batch"] == batch)]
            best = max(ours, key=lambda r: r["real_tokens_per_s"], default=None)
            for name, other in (("original", original), ("trl", trl)):
                if best and other and other["real_tokens_per_s"]:
                    print(f"  batch {batch}: ours best ({best['config']}) / {name}: "
                          f"{best['real_tokens_per_s'] / other['real_tokens_per_s']:.2f}x real tokens/s")


if __name__ == "__main__":
    sys.exit(main())
