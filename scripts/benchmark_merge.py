"""Peak memory of merging a LoRA adapter: peft's merge_and_unload vs our streamed merge (finetune/outputs/merging.py), side by side.

    python scripts/benchmark_merge.py [--layers 17] [--dtype float16] [--rank 16] [--work_dir DIR] [--keep]

Builds a random Llama in --dtype (hidden 2048, intermediate 5504, vocab 32000, 17 layers = 0.99 B parameters,
1.98 GB in 16 bits) saved in 500 MB shards, and a random LoRA adapter (r 16) on every linear layer. Then each merge
runs once in a fresh child process:
  peft  AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained
        (the way train.py merged before the streamed merge, and the way most scripts do)
  ours  python train.py --merge_only ... --merge_verify_samples 0 (the real command line)
Each child reports its own peak RSS (ru_maxrss: the kernel's high-water mark, file pages mapped by the process
included) and its RSS after imports, plus wall time. The merged weights of the two are compared tensor by tensor.
Needs about 3.5x the model size free on the --work_dir disk; everything it writes is deleted unless --keep.
Nothing here is a unit test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(work: str, layers: int, dtype_name: str, rank: int) -> dict:
    """The random base (500 MB shards) and adapter, written by a child so the measured children start cold."""
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.tiny_model import build_tokenizer

    dtype = getattr(torch, dtype_name)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=dtype)
    base, adapter = os.path.join(work, "base"), os.path.join(work, "adapter")
    model.save_pretrained(base, max_shard_size="500MB")
    tokenizer = build_tokenizer("bpe")
    tokenizer.save_pretrained(base)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                         task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    adapted.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "base_bytes": sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".safetensors")),
            "shards": len([f for f in os.listdir(base) if f.endswith(".safetensors")]),
            "adapter_bytes": os.path.getsize(os.path.join(adapter, "adapter_model.safetensors"))}


def merge_with_peft(base: str, adapter: str, out: str, dtype_name: str) -> float:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imported = current_rss_mb()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype_name))
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
    return imported


def merge_with_ours(base: str, adapter: str, out: str, dtype_name: str) -> float:
    import train

    imported = current_rss_mb()
    flag = {"float16": "--fp16", "bfloat16": "--bf16"}[dtype_name]
    code = train.main(["--merge_only", "--model_name_or_path", base, "--output_dir", adapter, "--merged_output_dir",
                       out, flag, "--merge_verify_samples", "0", "--report_to", "none"])
    if code != 0:
        raise SystemExit(code)
    return imported


def child(kind: str, work: str, dtype_name: str) -> dict:
    start = time.perf_counter()
    merge = {"peft": merge_with_peft, "ours": merge_with_ours}[kind]
    imported = merge(os.path.join(work, "base"), os.path.join(work, "adapter"), os.path.join(work, f"merged-{kind}"),
                     dtype_name)
    return {"kind": kind, "peak_rss_mb": round(peak_rss_mb()), "rss_after_imports_mb": round(imported),
            "wall_s": round(time.perf_counter() - start, 1)}


def compare(work: str) -> float:
    """Largest |difference| between the two merged models, read one tensor at a time."""
    from finetune.outputs import merging

    def tensors(directory):
        files = [os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")]
        return {name: reader for reader in map(merging.TensorFile, files) for name in reader.names}

    ours, theirs = tensors(os.path.join(work, "merged-ours")), tensors(os.path.join(work, "merged-peft"))
    if ours.keys() != theirs.keys():
        raise SystemExit(f"the merged models hold different tensors: {sorted(ours.keys() ^ theirs.keys())[:5]}")
    return max((ours[n].read(n).float() - theirs[n].read(n).float()).abs().max().item() for n in ours)


def in_child(*arguments: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), *arguments]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    line = next((out for out in result.stdout.splitlines() if out.startswith("RESULT ")), None)
    if result.returncode != 0 or line is None:
        raise SystemExit(f"{' '.join(arguments)} failed:\n{result.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=17, help="decoder layers (17: 1.98 GB in 16 bits)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="base and merged dtype")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--work_dir", default=None, help="scratch directory (default: a new one under the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the models instead of deleting them")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: build | peft | ours
    args = parser.parse_args()
    if args.child:
        if args.child == "build":
            result = build(args.work_dir, args.layers, args.dtype, args.rank)
        else:
            result = child(args.child, args.work_dir, args.dtype)
        print("RESULT " + json.dumps(result))
        return 0
    work = args.work_dir or tempfile.mkdtemp(prefix="merge-bench-")
    os.makedirs(work, exist_ok=True)
    needed = 3.5 * args.layers / 17 * 2e9
    free = shutil.disk_usage(work).free
    if free < needed:
        print(f"{work} has {free / 1e9:.1f} GB free; this benchmark needs about {needed / 1e9:.1f} GB (pass --work_dir)")
        return 2
    try:
        common = ["--work_dir", work, "--dtype", args.dtype, "--layers", str(args.layers), "--rank", str(args.rank)]
        model = in_child("--child", "build", *common)
        print(f"model: {model['parameters'] / 1e9:.2f} B parameters, {model['base_bytes'] / 1e9:.2f} GB in "
              f"{model['shards']} shards ({args.dtype}); adapter r {args.rank}: {model['adapter_bytes'] / 1e6:.0f} MB",
              flush=True)
        results = {}
        for kind in ("peft", "ours"):
            results[kind] = in_child("--child", kind, *common)
            print(json.dumps(results[kind]), flush=True)
        difference = compare(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    peft_run, ours = results["peft"], results["ours"]
    print("\n| merge | peak RSS MB | RSS after imports MB | wall s |\n|---|---|---|---|")
    for kind in ("peft", "ours"):
        print(f"| {kind} | {results[kind]['peak_rss_mb']} | {results[kind]['rss_after_imports_mb']} | {results[kind]['wall_s']} |")
    print(f"\npeak RSS ours/peft: {ours['peak_rss_mb'] / peft_run['peak_rss_mb']:.2f} (target <= 0.5); "
          f"above imports: {(ours['peak_rss_mb'] - ours['rss_after_imports_mb']) / (peft_run['peak_rss_mb'] - peft_run['rss_after_imports_mb']):.2f}; "
          f"wall ours/peft: {ours['wall_s'] / peft_run['wall_s']:.2f}; "
          f"max |merged weight difference| ours vs peft: {difference:.3g}")
    print("command: python scripts/benchmark_merge.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
