"""GPTQ export (--export_gptq BITS, seed 002's quantization step): the merged model (or a full fine-tune's)
quantized with GPTQModel on calibration samples taken from the training data (--quantization_max_samples), saved
in the GPTQ format transformers loads (<model dir>/gptq-<BITS>bit), then loaded back through transformers and
compared with the model it came from on those samples (gptq_verification.json). Staged and renamed into place.

GPTQModel is installed without its dependencies into <venv>/gptq (requirements-gptq.txt, the Makefile), outside
the environment's site-packages: where importable, peft and transformers import it on their own (every LoRA run
would then print its banner and get its environment settings). So the quantization and the check run in a child
process that alone has it on its path. It runs on CPU too, with its pure-torch packing and kernels there (no C++
compiled at run time); on a GPU it uses its own default kernels.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import torch

from finetune.checks.export_request import gptq_path
from finetune.errors import UsageError
from finetune.modeling.checkpoint_files import MergeError

logger = logging.getLogger(__name__)

MIN_SAMPLE_TOKENS = 10  # GPTQModel drops shorter calibration samples


def calibration_samples(train_set, count: int, max_len: int) -> list[dict]:
    """The first `count` training samples of at least MIN_SAMPLE_TOKENS tokens (prompt and answer ids as trained)."""
    samples = []
    for index in range(len(train_set)):
        ids = list(train_set[index]["input_ids"])[:max_len]
        if len(ids) >= MIN_SAMPLE_TOKENS:
            samples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        if len(samples) == count:
            break
    if not samples:
        raise UsageError(f"--export_gptq: no training sample has {MIN_SAMPLE_TOKENS} tokens or more to calibrate with")
    return samples


def export_gptq(model_dir: str, bits: int, group_size: int, tokenizer, samples: list[dict]) -> str:
    """Quantize in a child process (see the module doc); its report is logged and kept in gptq_verification.json."""
    final = os.path.join(model_dir, f"gptq-{bits}bit")
    staging = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        with open(os.path.join(staging, "calibration.json"), "w") as handle:
            json.dump(samples, handle)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [gptq_path(), os.environ.get("PYTHONPATH")])))
        if (os.cpu_count() or 1) <= 2:  # its CPU thread pool needs 2 workers, which it does not give itself on 2 cores
            env.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        with tempfile.TemporaryDirectory() as scratch:  # GPTQModel writes logs/ into its working directory
            done = subprocess.run([sys.executable, "-m", "finetune.outputs.gptq_export", os.path.abspath(model_dir),
                                   os.path.abspath(staging), str(bits), str(group_size)], env=env, cwd=scratch,
                                   capture_output=True, text=True)
            logs = sorted(glob.glob(os.path.join(scratch, "logs", "*.log")))
            if logs:  # its per-layer quantization log (losses, damping) kept beside the model, not in the user's cwd
                shutil.move(logs[-1], os.path.join(staging, "gptq_quantization.log"))
        if done.returncode:
            raise MergeError(f"--export_gptq {bits}: GPTQModel failed (exit {done.returncode}): "
                             f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no message'}")
        os.remove(os.path.join(staging, "calibration.json"))
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, "gptq_verification.json")) as handle:
            report = json.load(handle)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    logger.info("GPTQ %d-bit model in %s (%d calibration samples): next-token argmax agrees with the merged model "
                "on %.1f%% of positions, max |logit diff| %.3g (gptq_verification.json)", bits, final, len(samples),
                100 * report["argmax_agreement"], report["max_abs_logit_diff"])
    return final


def quantize(model_dir: str, out: str, bits: int, group_size: int) -> None:
    """In the child process: GPTQModel on the calibration samples, saved to `out`, then checked."""
    from gptqmodel import GPTQConfig, GPTQModel

    with open(os.path.join(out, "calibration.json")) as handle:
        samples = json.load(handle)
    cpu = not torch.cuda.is_available()
    config = GPTQConfig(bits=bits, group_size=group_size, **({"pack_impl": "original"} if cpu else {}))
    model = GPTQModel.load(model_dir, config)
    model.quantize(samples, batch_size=1)
    model.save(out)
    del model
    report = verify(model_dir, out, bits, samples[:4])
    report.update(bits=bits, group_size=group_size, calibration_samples=len(samples),
                  calibration_tokens=sum(len(s["input_ids"]) for s in samples))
    with open(os.path.join(out, "gptq_verification.json"), "w") as handle:
        json.dump(report, handle, indent=2)


def verify(model_dir: str, quantized_dir: str, bits: int, samples: list[dict]) -> dict:
    """The saved GPTQ model, loaded as a user would (transformers + GPTQConfig), against the merged model."""
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = {} if device == "cuda" else {"backend": "gptq_torch"}
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        quantized_dir, device_map=device, quantization_config=transformers.GPTQConfig(bits=bits, **backend)).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    agree = total = 0
    worst = 0.0
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample["input_ids"]], device=device)
            want, got = reference(input_ids=ids).logits.float(), quantized(input_ids=ids).logits.float()
            agree += int((want.argmax(-1) == got.argmax(-1)).sum())
            total += ids.shape[1]
            worst = max(worst, float((want - got).abs().max()))
    return {"samples_checked": len(samples), "positions": total, "argmax_agreement": round(agree / total, 4),
            "max_abs_logit_diff": round(worst, 6), "loaded_with": f"transformers GPTQConfig on {device}"}


if __name__ == "__main__":  # the child process of export_gptq
    quantize(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
