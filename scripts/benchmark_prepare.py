"""Peak memory and time of the data preparation (train.py --prepare_only) as the dataset grows.

    python scripts/benchmark_prepare.py [--records 50000 200000 500000] [--processes 2] [--code-dir DIR] [--keep]

A tiny random Llama with the real gpt2 tokenizer (../shared/data/tokenizers/gpt2/tokenizer.json; the tiny bpe
test tokenizer of finetune.tiny_model when that file is absent; the header says which), and N seeded
"self-instruct-like long-tail" alpaca records ({"instruction", "input", "output"}, input present in 40 %): a
record's token count is lognormal (sigma --sigma) with a mean of about --mean-tokens as the pipeline renders it
(alpaca prompt, BOS/EOS included), capped below --model-max-len, and its text is random sentences of the alpaca files
in ../shared/data/alpaca (synthetic words when absent). The records of a smaller N are the first N of a larger.
Every N runs in a fresh process:

    python <code-dir>/train.py --model_name_or_path TINY --dataset FILE --dataset_format alpaca --prepare_only
        --dataset_processes P --model_max_len 2048 --sample_packing --report_to none ...

with PYTHONPATH=<code-dir> (so --code-dir measures another checkout, e.g. a `git worktree` of an older commit).
Its process tree (train.py and its forked tokenization workers) is polled from /proc every --poll seconds; reported:
wall seconds (and the tree's CPU seconds), microseconds per record and their ratio to the smallest N's, peak RSS of
the tree (the RSS of all its processes summed: pages a fork shares with its parent count in both, so this
over-counts physical memory while workers live; --pss sums proportional set sizes instead, which do not, at some
polling cost), train.py's own peak (VmHWM), and the three phases told apart by the workers' lifetime: before (start-up, reading, splitting), tokenize
(workers alive) and after (packing, datasets.Dataset.from_list, save_to_disk). A run that passes --max-rss-gb or
--max-minutes, or leaves the machine less than --min-available-gb, is stopped and reported as such. Timings share
the CPUs with whatever else runs. Not a unit test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")  # ../shared/data next to the checkout
GPT2_TOKENIZER = os.path.join(SHARED, "tokenizers", "gpt2", "tokenizer.json")
ALPACA_DIR = os.path.join(SHARED, "alpaca")
PAGE = os.sysconf("SC_PAGE_SIZE")
ALPACA_OVERHEAD_TEXT = (  # what the alpaca format adds around a record's fields (dataset_formats.alpaca_segments)
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n\n\n### Input:\n\n\n### Response:\n"
)
ALPACA_OVERHEAD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n\n\n### Response:\n"
)


# --- the model directory and the data ----------------------------------------------------------------------------------


def make_model(out_dir: str) -> tuple[str, str]:
    """A tiny model directory; returns (path, which tokenizer)."""
    from finetune.tiny_model import build_model, make_tiny_model

    if not os.path.isfile(GPT2_TOKENIZER):
        print(f"{GPT2_TOKENIZER} is absent (no ../shared?): using the tiny bpe test tokenizer instead")
        return make_tiny_model(out_dir, tokenizer_kind="bpe", hidden=64, layers=2), "tiny bpe (finetune.tiny_model)"
    from transformers import PreTrainedTokenizerFast

    end = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=GPT2_TOKENIZER, bos_token=end, eos_token=end, unk_token=end)
    model = build_model(len(tokenizer), hidden=64, layers=2, seed=0)
    for config in (model.config, model.generation_config):
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir, f"gpt2 ({GPT2_TOKENIZER}, {len(tokenizer)} tokens)"


def sentence_pool(tokenizer, rng: random.Random) -> tuple[list[str], list[int], str]:
    """Sentences (each with its leading space) and their token counts; from the alpaca files, else synthetic."""
    texts = []
    if os.path.isdir(ALPACA_DIR):
        for name in sorted(os.listdir(ALPACA_DIR)):
            if name.endswith(".json"):
                with open(os.path.join(ALPACA_DIR, name), encoding="utf-8") as handle:
                    for item in json.load(handle):
                        texts += [str(item.get(key) or "") for key in ("instruction", "input", "output")]
    sentences = sorted({s.strip() for t in texts for s in re.split(r"(?<=[.!?])\s+|\n+", t) if len(s.strip()) > 3})
    source = f"sentences of {ALPACA_DIR}/*.json" if sentences else "synthetic words"
    if not sentences:
        words = ["".join(rng.choice("etaoinshrdlcumwfgypbvk") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 30))).capitalize() + "." for _ in range(50000)]
    sentences = [" " + s for s in sentences]
    counts = [len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]]
    return sentences, counts, source


def fill(target: int, sentences: list[str], counts: list[int], rng: random.Random) -> str:
    """Random sentences up to about `target` tokens; the last one cut by words to land near it."""
    parts, have = [], 0
    while have < target:
        i = rng.randrange(len(sentences))
        words = sentences[i].split(" ")
        if have + counts[i] > target:
            keep = max(1, round(len(words) * (target - have) / counts[i]))
            parts.append(" ".join(words[: keep + 1]))  # words[0] is "" (the leading space)
            break
        parts.append(sentences[i])
        have += counts[i]
    return "".join(parts).strip()


def write_records(paths: dict[int, str], tokenizer, mean_tokens: float, sigma: float, max_len: int, seed: int) -> dict:
    """The first N of one seeded stream into each paths[N]; returns the measured token counts of the largest."""
    rng = random.Random(seed)
    sentences, counts, source = sentence_pool(tokenizer, rng)
    overhead = {True: len(tokenizer(ALPACA_OVERHEAD_TEXT)["input_ids"]) + 2,  # + BOS and EOS
                False: len(tokenizer(ALPACA_OVERHEAD_NO_INPUT)["input_ids"]) + 2}
    mu = math.log(mean_tokens) - sigma * sigma / 2  # lognormal with this mean
    largest = max(paths)
    handles = {n: open(path, "w", encoding="utf-8") for n, path in paths.items()}
    measured, probe = [], []
    try:
        for index in range(largest):
            has_input = rng.random() < 0.4
            total = min(max_len - 100, max(overhead[has_input] + 8, round(rng.lognormvariate(mu, sigma))))
            text = total - overhead[has_input]
            instruction = max(4, round(text * rng.uniform(0.05, 0.25)))
            context = max(4, round((text - instruction) * rng.uniform(0.1, 0.5))) if has_input else 0
            record = {"instruction": fill(instruction, sentences, counts, rng),
                      "input": fill(context, sentences, counts, rng) if has_input else "",
                      "output": fill(max(4, text - instruction - context), sentences, counts, rng)}
            line = json.dumps(record, ensure_ascii=False) + "\n"
            for n, handle in handles.items():
                if index < n:
                    handle.write(line)
            if index % max(1, largest // 4000) == 0:
                probe.append((record, has_input))
    finally:
        for handle in handles.values():
            handle.close()
    encoded = tokenizer([r["instruction"] + r["input"] + r["output"] for r, _ in probe], add_special_tokens=False)
    measured = [len(ids) + overhead[has_input] for ids, (_, has_input) in zip(encoded["input_ids"], probe)]
    measured.sort()
    return {"source": source, "sentences": len(sentences), "probe": len(measured),
            "mean": sum(measured) / len(measured), "p50": measured[len(measured) // 2],
            "p99": measured[int(0.99 * len(measured))], "max": measured[-1]}


# --- one preparation, its process tree polled ---------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def memory_of(pid: int, pss: bool) -> int:
    """Bytes resident (or proportional set size), 0 when the process is gone."""
    try:
        if pss:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("Pss:"))
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * PAGE
    except (OSError, StopIteration, IndexError, ValueError):
        return 0


def high_water_mark(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def available_memory() -> int:
    with open("/proc/meminfo") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))


def run_one(command: list[str], env: dict, log_path: str, options) -> dict:
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    peak = peak_main = hwm = workers_max = 0
    phases = {"before": [None, 0], "tokenize": [None, 0], "after": [None, 0]}  # phase -> [first seen s, peak bytes]
    timeline, stopped, status = [], None, None
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        now = time.perf_counter() - started
        tree = process_tree(process.pid)
        main = memory_of(process.pid, options.pss)
        total = main + sum(memory_of(p, options.pss) for p in tree[1:])
        workers = len(tree) - 1
        hwm = max(hwm, high_water_mark(process.pid))
        phase = "tokenize" if workers else ("after" if phases["tokenize"][0] is not None else "before")
        if phases[phase][0] is None:
            phases[phase][0] = now
        phases[phase][1] = max(phases[phase][1], total)
        peak, peak_main, workers_max = max(peak, total), max(peak_main, main), max(workers_max, workers)
        timeline.append((round(now, 2), total >> 20, main >> 20, workers))
        reason = (f"tree over --max-rss-gb {options.max_rss_gb:g}" if total > options.max_rss_gb * 2**30 else
                  f"over --max-minutes {options.max_minutes:g}" if now > options.max_minutes * 60 else
                  f"MemAvailable under --min-available-gb {options.min_available_gb:g}"
                  if available_memory() < options.min_available_gb * 2**30 else None)
        if stopped is None and reason:
            stopped = f"stopped at {now:.0f} s, {reason}, tree {total / 2**20:.0f} MB, phase {phase}"
            os.killpg(process.pid, signal.SIGKILL)
        time.sleep(options.poll)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    ends = [phases[p][0] for p in ("before", "tokenize", "after")] + [seconds]
    durations, last = {}, 0.0
    for name, begin in zip(("before", "tokenize", "after"), ends[1:]):
        if begin is not None:
            durations[name] = begin - last
            last = begin
    with open(log_path + ".timeline.tsv", "w") as handle:
        handle.write("seconds\ttree_mb\tmain_mb\tworkers\n" + "".join("\t".join(map(str, row)) + "\n" for row in timeline))
    return {"seconds": seconds, "exit": process.returncode, "stopped": stopped, "peak": peak, "peak_main": peak_main,
            "main_hwm": hwm, "children_maxrss": usage.ru_maxrss * 1024,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "workers_max": workers_max, "phase_seconds": durations,
            "phase_peak": {name: value[1] for name, value in phases.items() if value[0] is not None}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, nargs="+", default=[50000, 200000, 500000])
    parser.add_argument("--processes", type=int, default=2, help="--dataset_processes (default 2)")
    parser.add_argument("--code-dir", default=ROOT, help="checkout whose train.py runs, with PYTHONPATH=it (default: this repo)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (data, logs, timelines)")
    parser.add_argument("--mean-tokens", type=float, default=260, help="mean tokens per rendered record (default 260)")
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the record lengths (default 1.0)")
    parser.add_argument("--model-max-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between /proc polls (default 0.1)")
    parser.add_argument("--pss", action="store_true", help="sum proportional set sizes instead of RSS")
    parser.add_argument("--max-rss-gb", type=float, default=20, help="stop a run whose tree passes this (default 20)")
    parser.add_argument("--min-available-gb", type=float, default=1.5,
                        help="stop a run when the machine's MemAvailable falls below this (default 1.5)")
    parser.add_argument("--max-minutes", type=float, default=25, help="stop a run that takes longer (default 25)")
    options = parser.parse_args()
    from benchmark_loss import cpu_name
    from transformers import AutoTokenizer

    code_dir = os.path.abspath(options.code_dir)
    work = tempfile.mkdtemp(prefix="benchmark_prepare-")
    memory = "PSS" if options.pss else "RSS"
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; --dataset_processes {options.processes}")
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    try:
        model, which = make_model(os.path.join(work, "tiny"))
        tokenizer = AutoTokenizer.from_pretrained(model)
        records = sorted(set(options.records))
        files = {n: os.path.join(work, f"records-{n}.jsonl") for n in records}
        started = time.perf_counter()
        data = write_records(files, tokenizer, options.mean_tokens, options.sigma, options.model_max_len, options.seed)
        print(f"tokenizer: {which}; text: {data['source']} ({data['sentences']} sentences); "
              f"{max(records)} records written in {time.perf_counter() - started:.0f} s, "
              f"{os.path.getsize(files[max(records)]) / 2**20:.0f} MB")
        print(f"tokens per rendered record, measured on {data['probe']} records: mean {data['mean']:.1f}, "
              f"p50 {data['p50']}, p99 {data['p99']}, max {data['max']} (lognormal sigma {options.sigma})")
        git = subprocess.run(["git", "-C", code_dir, "log", "-1", "--format=%h %s"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", code_dir, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        print(f"code: {code_dir} at {git.stdout.strip()[:90] or '?'}{' (with uncommitted changes)' if dirty else ''}")
        env = {**os.environ, "PYTHONPATH": code_dir, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        results = []
        for n in records:
            out = os.path.join(work, f"run-{n}")
            command = [sys.executable, os.path.join(code_dir, "train.py"), "--model_name_or_path", model,
                       "--dataset", files[n], "--dataset_format", "alpaca", "--output_dir", out,
                       "--working_dir", out, "--prepare_only", "--dataset_processes", str(options.processes),
                       "--model_max_len", str(options.model_max_len), "--report_to", "none", "--sample_packing"]
            if n == records[0]:
                print("train.py command: " + shlex.join(command).replace(work, "$TMP"))
            result = run_one(command, env, os.path.join(work, f"run-{n}.log"), options)
            stats_path = os.path.join(out, "prepared_data", "stats.json")
            if os.path.isfile(stats_path):
                with open(stats_path) as handle:
                    train = json.load(handle)["train"]
                result["tokens"] = train["tokens"] / max(1, train["samples_kept"])
                result["kept"] = f"{train['samples_kept']} kept, {train['dropped_too_long']} dropped, {train.get('rows')} rows"
            else:  # stopped before stats.json: the pipeline's log line has the token count
                with open(os.path.join(work, f"run-{n}.log")) as handle:
                    found = re.search(r"train data: (\d+) records read, (\d+) kept.*?, (\d+) tokens", handle.read())
                if found:
                    result["tokens"] = int(found.group(3)) / max(1, int(found.group(2)))
            result["n"] = n
            results.append(result)
            if result["exit"] or result["stopped"]:
                with open(os.path.join(work, f"run-{n}.log")) as handle:
                    tail = handle.read()[-3000:]
                print(f"{n} records: {result['stopped'] or 'failed'} (exit {result['exit']}); log tail:\n{tail}")
            phases = ", ".join(f"{name} {result['phase_seconds'][name]:.1f} s / {result['phase_peak'][name] / 2**20:.0f} MB"
                               for name in result["phase_seconds"])
            print(f"{n} records: {result['seconds']:.1f} s ({result['cpu_seconds']:.0f} CPU s), tree peak {result['peak'] / 2**20:.0f} MB, train.py peak "
                  f"{result['main_hwm'] / 2**20:.0f} MB (VmHWM; wait4 ru_maxrss of the tree, the largest single process: "
                  f"{result['children_maxrss'] / 2**20:.0f} MB), up to {result['workers_max']} workers; "
                  f"phases (s / tree peak): {phases}; {result.get('kept', 'no stats.json')}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            if result["stopped"]:
                break
        base = results[0]["seconds"] / results[0]["n"]
        print(f"\n| records | mean tokens/record | seconds | us/record | per-record time vs {results[0]['n']} | "
              f"CPU s | peak tree {memory} MB | train.py peak MB | MB per 1K records |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            per = r["seconds"] / r["n"]
            note = f" ({r['stopped']})" if r["stopped"] else (f" (exit {r['exit']})" if r["exit"] else "")
            print(f"| {r['n']} | {r.get('tokens', float('nan')):.1f} | {r['seconds']:.1f}{note} | {per * 1e6:.0f} | "
                  f"{per / base:.2f}x | {r['cpu_seconds']:.0f} | {r['peak'] / 2**20:.0f} | {r['main_hwm'] / 2**20:.0f} | "
                  f"{r['peak'] / 2**20 / (r['n'] / 1000):.1f} |")
    finally:
        if options.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
