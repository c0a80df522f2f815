"""Fine-tune an open causal LM on instruction/chat data: QLoRA, LoRA or full fine-tune, optional merge.

    # QLoRA on one GPU, merged into a 16-bit model at the end
    python train.py --model_name_or_path M --dataset conversations.json --dataset_format airoboros_chat \\
        --bits 4 --double_quant --quant_type nf4 --lora_modules all --output_dir out-peft --merged_output_dir out

    # full fine-tune on 8 GPUs with DeepSpeed ZeRO-2
    torchrun --nproc_per_node=8 train.py --full_finetune --bits 16 --bf16 --deepspeed deepspeed-7b.json ...

    # a recipe file stands in for the flags; flags given after it win
    python train.py recipe.yaml --learning_rate 1e-4

Every flag is documented in `python train.py --help`. Re-running the same command resumes from the newest complete
checkpoint in --working_dir; re-running a finished run only completes what is missing (e.g. the merge).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import transformers
from transformers import HfArgumentParser

import data
import inference
import merging
import planning
import reporting
import throughput
import training_knobs
from dataset_formats import FORMAT_INFO, FORMATS, end_token_id
from training_knobs import ROPE_SCALING_TYPES

logger = logging.getLogger("train")

COMPLETED_MARKER = "completed"
RESUME_LATEST = ("true", "latest", "1")  # --resume_from_checkpoint values that mean "the newest complete checkpoint"
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
FLASH_ATTN_HINT = "pip install -r requirements-gpu.txt  (flash-attn; needs CUDA and nvcc)"


class UsageError(Exception):
    """A problem with the command line or its files; reported in one line, exit code 2, nothing written."""


# --- arguments -----------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Base model: a local directory or a hub id (required)."}
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer to use; None means the one in --model_name_or_path."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code shipped with the checkpoint."})
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "Attention kernel. flash_attention_2 needs the flash-attn package and CUDA; on a machine with no "
            "CUDA it falls back to sdpa with a warning. Legacy --use_flash_attention_2 maps here.",
            "choices": ["eager", "sdpa", "flash_attention_2"],
        },
    )
    llama1_patch: bool = field(
        default=False,
        metadata={
            "help": "For llama-1 checkpoints converted with empty special tokens: apply llama-1-patch/ (bos <s>, eos "
            "</s>, unk <unk>, pad <unk>, BOS added, EOS not), so training and the saved tokenizer get them right."
        },
    )
    pad_token: Optional[str] = field(
        default=None,
        metadata={
            "help": "Pad token. None: keep the tokenizer's, else its unk token, else EOS (safe: masks and labels "
            "come from lengths, not pad ids). A token new to the vocabulary resizes the embeddings."
        },
    )
    bos_token: Optional[str] = field(default=None, metadata={"help": "Override the BOS token (None: keep)."})
    eos_token: Optional[str] = field(default=None, metadata={"help": "Override the EOS token (None: keep)."})
    unk_token: Optional[str] = field(default=None, metadata={"help": "Override the unk token (None: keep)."})
    rope_scaling_type: Optional[str] = field(
        default=None,
        metadata={
            "help": "Replace the model's RoPE scaling to stretch its context (needs --rope_scaling_factor; None: keep "
            "the config's). linear: positions divided by the factor; dynamic: NTK-aware, identical to no scaling up "
            "to the model's max_position_embeddings and rescaled on the fly beyond it (so training on shorter "
            "samples sees plain RoPE); yarn: only the low frequencies are interpolated and attention is scaled by "
            "0.1*ln(factor)+1. linear and yarn set max_position_embeddings to the pretrained length x factor. "
            "Applied before the model loads, so the saved full model and the --merged_output_dir model carry it "
            "(an adapter alone does not: load its base with the same rope_parameters). llama3 and longrope need "
            "more parameters than a factor: edit the model's config.json for those.",
            "choices": list(ROPE_SCALING_TYPES),
        },
    )
    rope_scaling_factor: Optional[float] = field(
        default=None,
        metadata={"help": "RoPE scaling factor, > 1: the usable context becomes about factor x the pretrained "
                  "length. Needs --rope_scaling_type (None: no override)."},
    )


@dataclass
class DataArguments:
    dataset: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Training data: local .json/.jsonl/.parquet/.csv/.tsv files or hub dataset names. Several may be "
            "given (--dataset a.json b.json, or the flag repeated); their records are split and shuffled together."
        },
    )
    dataset_format: list[str] = field(
        default_factory=lambda: ["airoboros"],
        metadata={
            "help": "How records are rendered and masked (see dataset_formats.py): one format for all datasets, or "
            "one per --dataset, in the same order.",
            "choices": sorted(FORMATS),
        },
    )
    eval_dataset_size: float = field(
        default=0.0,
        metadata={
            "help": "Held-out eval split: a fraction < 1 of the records, or a count >= 1; 0 means no eval split. "
            "Stratified by the records' `category` when present, seeded by --data_seed (else --seed)."
        },
    )
    dataset_text_field: str = field(
        default="text", metadata={"help": "completion format: the field holding the raw text."}
    )
    custom_format: Optional[str] = field(
        default=None,
        metadata={"help": "custom format: prompt template for records with an input, using {instruction} and {input} "
                  "(None: '{instruction} {input} '). The output field is trained after it, then EOS."},
    )
    custom_no_input_format: Optional[str] = field(
        default=None, metadata={"help": "custom format: prompt template without input (None: '{instruction} ')."}
    )
    custom_system_format: Optional[str] = field(
        default=None, metadata={"help": "custom format: how a system prompt is written before the prompt (None: '{system}')."}
    )
    custom_system_prompt: Optional[str] = field(
        default=None, metadata={"help": "custom format: system prompt for records without a system field (None: none)."}
    )
    custom_field_instruction: Optional[str] = field(default=None, metadata={"help": "custom format: instruction field (None: instruction)."})
    custom_field_input: Optional[str] = field(default=None, metadata={"help": "custom format: input field (None: input)."})
    custom_field_output: Optional[str] = field(default=None, metadata={"help": "custom format: output field (None: output)."})
    custom_field_system: Optional[str] = field(default=None, metadata={"help": "custom format: system field (None: system)."})
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep at most this many training samples (None: all)."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep at most this many eval samples (None: all)."}
    )
    model_max_len: int = field(
        default=2048, metadata={"help": "Maximum sample length in tokens (prompt + response + special tokens)."}
    )
    excess_length: str = field(
        default="drop",
        metadata={
            "help": "Samples longer than --model_max_len: drop them (counted), truncate them (the answer's tail is "
            "cut; a prompt too long on its own loses its beginning, never its assistant cue; a truncated answer "
            "has no EOS), or raise an error naming the record. Legacy --skip_excess_length [true|false] maps to "
            "drop|truncate.",
            "choices": ["drop", "truncate", "raise"],
        },
    )
    skip_bad_records: bool = field(
        default=False,
        metadata={
            "help": "Skip records a format cannot render (missing field, bad role order, empty answer...) instead of "
            "stopping; they are counted in stats.json and the first few are listed in the log."
        },
    )
    train_on_source: bool = field(
        default=False, metadata={"help": "Train on prompt tokens too (default: only responses and their EOS)."}
    )
    include_sources: bool = field(
        default=False,
        metadata={
            "help": "airoboros format: append a record's `source` field to its trained response as "
            "'\\n\\nSource: ...'. Without it the field is ignored."
        },
    )
    expand_conversations: bool = field(
        default=False,
        metadata={
            "help": "Kept for compatibility with the airoboros scripts: every assistant turn of a conversation is "
            "always trained (one sample per conversation), so this changes nothing."
        },
    )
    dataset_prepared_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Directory for the tokenized (and packed) train/eval sets and stats.json (None: "
            "<working_dir>/prepared_data). Reused by later runs and by the other ranks when the data bytes, "
            "formats, tokenizer, length and packing settings are unchanged (a fingerprint of them is checked)."
        },
    )
    dataset_processes: int = field(
        default=1,
        metadata={"help": "Worker processes for tokenization (results are identical to 1; used from 2,000 records)."},
    )
    sample_packing: bool = field(
        default=False,
        metadata={
            "help": "Pack tokenized samples into rows of --model_max_len (best-fit decreasing, seeded): no padding, "
            "positions restart per sample and attention stays within each sample (flash-attention varlen on GPU, "
            "a block-diagonal mask with sdpa/eager). --per_device_train_batch_size then counts rows."
        },
    )
    eval_sample_packing: Optional[bool] = field(
        default=None, metadata={"help": "Pack the eval set too (None: same as --sample_packing)."}
    )
    pad_to_multiple_of: Optional[int] = field(
        default=None, metadata={"help": "Pad each batch's length up to a multiple of this (e.g. 8 or 64 for tensor cores; None: no)."}
    )
    prepare_only: bool = field(
        default=False,
        metadata={"help": "Tokenize, write --dataset_prepared_path and stats.json, then exit without training."},
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    working_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where checkpoints go (None: --output_dir). The final model/adapter goes to --output_dir."},
    )
    merged_output_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "After an adapter run (or with --merge_only), merge the adapter into the base model and save a "
            "plain model here in bf16 with --bf16, fp16 with --fp16, else fp32, with tokenizer, chat template and "
            "generation config. The merge streams one tensor at a time (memory: a few copies of the largest "
            "tensor, not the model), keeps the base's shard layout, and appears only when complete."
        },
    )
    merge_only: bool = field(
        default=False,
        metadata={
            "help": "Do not train: merge the adapter in --output_dir (a finished run's, or a checkpoint-N directory) "
            "into --model_name_or_path and write --merged_output_dir (needed). --dataset is optional: it only "
            "provides the --merge_verify_samples samples. Tokenizer and generation config come from --output_dir."
        },
    )
    merge_base: str = field(
        default="original",
        metadata={
            "help": "What a QLoRA (--bits 4) adapter is merged into: 'original' = the 16-bit base weights (what the "
            "qlora scripts do; the merged model differs slightly from the 4-bit base+adapter that was trained), "
            "'nf4_roundtrip' = those weights quantized and dequantized with the run's --quant_type/--double_quant "
            "(recorded in base_quantization.json next to the adapter; without it these flags are assumed), i.e. exactly "
            "what training computed with. "
            "The verification (--merge_verify_samples) shows which is closer. Only 4-bit runs can use nf4_roundtrip.",
            "choices": list(merging.MERGE_BASES),
        },
    )
    merge_verify_samples: int = field(
        default=4,
        metadata={
            "help": "After merging, compare the merged model with base+adapter (loaded as training loaded it) on this "
            "many samples (the first training samples when --dataset is given and the merge follows training or "
            "--merge_only; else a fixed built-in text), each cut to 512 tokens: max/mean |logit difference|, argmax "
            "agreement and perplexities, logged and written to <merged_output_dir>/merge_verification.json. Loads "
            "both models in full, one after the other; 0 skips it."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start fresh: delete old checkpoints in --working_dir and the completed marker."},
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "A checkpoint-N directory to resume from (weights, optimizer, scheduler, RNG, data position). "
                  "None (or 'latest'/'true'): a re-run resumes from the newest complete checkpoint in --working_dir by "
                  "itself, skipping torn ones."},
    )
    full_finetune: bool = field(
        default=False, metadata={"help": "Train all weights instead of LoRA adapters; needs --bits 16 or 32."}
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Validate every flag and file, read the model's config (not its weights), tokenize the data "
            "(nothing is written), log the plan — world size, batch arithmetic, steps, trainable parameters and "
            "estimated memory per device for weights / gradients / optimizer / activations (derivation in "
            "planning.py) — and a `plan-json:` line, then exit 0."
        },
    )
    dry_run_world_size: Optional[int] = field(
        default=None,
        metadata={"help": "With --dry_run in a single process: plan for this many processes (None: the launcher's "
                  "world size, 1 without one). The scripts/ recipes pass their GPU count x nodes."},
    )
    bits: int = field(
        default=4,
        metadata={
            "help": "Weight precision of the base model: 4 (bitsandbytes, --quant_type), 8 (bitsandbytes int8), "
            "16 (bf16 with --bf16, else fp16) or 32 (fp32).",
            "choices": [4, 8, 16, 32],
        },
    )
    double_quant: bool = field(
        default=True, metadata={"help": "4-bit only: also quantize the quantization constants (saves ~0.4 bit/param)."}
    )
    quant_storage: str = field(
        default="uint8",
        metadata={
            "help": "4-bit only: dtype the packed 4-bit weights are stored in. ZeRO-3 and FSDP need the model's own "
            "dtype (bfloat16 with --bf16).",
            "choices": ["uint8", "bfloat16", "float16", "float32"],
        },
    )
    quant_type: str = field(
        default="nf4", metadata={"help": "4-bit only: data type of the quantized weights.", "choices": ["nf4", "fp4"]}
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (> 0)."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator: updates are scaled by alpha/r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, 0 to < 1."})
    lora_modules: str = field(
        default="all",
        metadata={
            "help": "Modules that get LoRA adapters: 'all' = every linear layer except the output head, or a comma "
            "list of module names (e.g. q_proj,v_proj)."
        },
    )
    layers_to_freeze: Optional[int] = field(
        default=None,
        metadata={
            "help": "Freeze the first N decoder layers, 0 <= N < the model's layer count (None or 0: none). Full "
            "fine-tune: those layers and the input embeddings below them get requires_grad=False and stay out of "
            "the optimizer (the embeddings stay trainable when tokens were added, so the new rows can learn; a "
            "head tied to them freezes with them). LoRA: adapters go only on the layers above N. Excludes "
            "--layer_freeze_ratio."
        },
    )
    layer_freeze_ratio: Optional[float] = field(
        default=None,
        metadata={
            "help": "Freeze this fraction of the decoder layers from the bottom, in [0, 1): floor(ratio x layers), "
            "e.g. 0.5 of 32 -> 16, 0.3 of 10 -> 3, 0.4 of 2 -> 0 (None: none). Otherwise as --layers_to_freeze, "
            "which it excludes."
        },
    )
    neftune_noise_alpha: Optional[float] = field(
        default=None,
        metadata={
            "help": "NEFTune: while training (not in eval or generation), add uniform noise in +-alpha/sqrt(L*d) to "
            "the input embeddings, d = hidden size, L = the batch's padded length (as in the reference code, so a "
            "sample padded to a longer neighbour gets less). With --sample_packing L is the packed row, so each "
            "sample gets about sqrt(samples per row) times less noise than unpacked. > 0; typical 5 to 15 (None: off)."
        },
    )
    loss_watchdog_threshold: Optional[float] = field(
        default=None,
        metadata={"help": "Stop when the logged loss stays above this for --loss_watchdog_patience logs (None: only "
                  "NaN/inf losses stop the run)."},
    )
    loss_watchdog_patience: int = field(
        default=3, metadata={"help": "Consecutive bad logs (NaN/inf, or above the threshold) that stop the run."}
    )
    report_to: Union[None, str, list[str]] = field(
        default="none",
        metadata={"help": "Loggers: none, wandb, tensorboard, ... (wandb needs WANDB_API_KEY or WANDB_MODE=offline)."},
    )
    do_train: bool = field(default=True, metadata={"help": "Train (default). --do_train False with --do_eval only evaluates."})
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "Token counting used for the tokens/s log: all, non_padding or no."}
    )
    do_predict: bool = field(
        default=False,
        metadata={
            "help": "After training and the final evaluation, generate answers to --generation_samples eval prompts "
            "(train prompts when there is no eval split) with the generation flags (--max_new_tokens, --do_sample, "
            "...) and write predictions.jsonl (prompt, reference, prediction, token counts) into --output_dir; two "
            "are logged. Each prompt is the sample's prompt ids exactly as trained, up to its first answer."
        },
    )
    generation_samples: int = field(default=8, metadata={"help": "--do_predict: how many prompts get answers (> 0)."})
    eval_generation_samples: int = field(
        default=0,
        metadata={"help": "At every evaluation during training, generate answers to this many eval prompts and log "
                  "them (0: none; needs --eval_strategy steps or epoch)."},
    )
    push_to_hub: bool = field(
        default=False,
        metadata={
            "help": "When the run is complete, upload --output_dir to the hub repo --hub_model_id and "
            "--merged_output_dir to <hub_model_id>-merged (the completed marker stays local; checkpoints are never "
            "pushed, so --hub_strategy does not apply). Checked before anything loads: HF_HUB_OFFLINE, no token "
            "(HF_TOKEN, --hub_token or `hf auth login`), an unreachable hub or a rejected token stop the run (exit 2). "
            "A failed upload exits 4 with the outputs complete locally; re-running the command retries only the push."
        },
    )
    hub_model_id: Optional[str] = field(
        default=None,
        metadata={"help": "--push_to_hub: the repo, 'user/name' or 'org/name' (None: the --output_dir folder name in "
                  "the token's namespace); the merged model goes to '<hub_model_id>-merged'. New repos are public "
                  "unless --hub_private_repo."},
    )
    peak_tflops: Optional[float] = field(
        default=None,
        metadata={
            "help": "Peak dense TFLOP/s of ONE device in the training dtype (e.g. 989 for an H100 SXM in bf16), for the "
            "mfu field logged next to tokens_per_second: mfu = tokens/s x model FLOPs per token / (processes x peak). "
            "None: looked up for known GPUs (H100, H200, A100, A10G, L40S, L4, RTX 4090, V100, T4; vendors' dense "
            "figures; bf16/fp16 with --bf16/--fp16, else fp32, or tf32 with --tf32); unknown devices log no mfu. "
            "Model FLOPs per trained token = 2N (forward) + 2N (backward to the activations) + 2N_trained (backward "
            "to the trained weights) + 12*L*H*T (attention, PaLM appendix B): N = weights of all linear layers "
            "(output head included, embedding lookup not, 4-bit layers at full size), L layers, H = heads x head "
            "dim, T = mean attention context per token. That is 6N + 12LHT for a full fine-tune and ~4N + 12LHT for "
            "LoRA on a frozen base. Model FLOPs, not hardware FLOPs: padding, activation-checkpointing recompute "
            "and dequantization are not counted."
        },
    )
    flop_counter: bool = field(
        default=False,
        metadata={"help": "Count the FLOPs of the first optimizer step with torch.utils.flop_counter.FlopCounterMode "
                  "(slows that step), log TFLOPs/step and FLOPs per token next to the formula's, and use the counted "
                  "figure for mfu (it includes padding and recompute, so mfu then reads closer to hardware FLOPs "
                  "utilization)."},
    )
    profiler_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Write a torch.profiler trace of training steps (wait 1, warmup 1, record 3; CPU and CUDA "
                  "activity, shapes, memory) here, one *.pt.trace.json per rank for TensorBoard, chrome://tracing or "
                  "ui.perfetto.dev (llama-recipes' --use_profiler --profiler_dir). None: no profiling."},
    )

    def __post_init__(self):
        # With no GPU, use_cpu is what makes the Trainer see torchrun's ranks (gloo DDP) and accept bf16 (CPU
        # autocast). Without it, each torchrun rank silently trains alone as "rank 0 of 1" and all write the outputs.
        if not self.use_cpu and not has_accelerator():
            self.use_cpu = True
        super().__post_init__()


@dataclass
class GenerationArguments:
    max_new_tokens: int = field(
        default=256, metadata={"help": "Generation: most tokens to generate (saved in generation_config.json)."}
    )
    min_new_tokens: Optional[int] = field(default=None, metadata={"help": "Generation: fewest tokens to generate."})
    do_sample: bool = field(default=False, metadata={"help": "Generation: sample instead of greedy decoding."})
    num_beams: int = field(default=1, metadata={"help": "Generation: beam count (1 = no beam search)."})
    temperature: float = field(default=1.0, metadata={"help": "Generation: sampling temperature (with --do_sample)."})
    top_k: int = field(default=50, metadata={"help": "Generation: top-k sampling (with --do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Generation: nucleus sampling mass (with --do_sample)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Generation: repetition penalty (1 = none)."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments, GenerationArguments)

# legacy flag -> (today's flag, how a value maps, log line); value None means "a bare boolean flag"
LEGACY_FLAGS = {
    "--evaluation_strategy": ("--eval_strategy", None, "transformers 5 renamed it"),
    "--warmup_ratio": ("--warmup_steps", None, "transformers 5 takes a ratio < 1 in --warmup_steps"),
    "--use_flash_attention_2": ("--attn_implementation", "flash_attention_2", "one switch for all kernels"),
    "--group_by_length": ("--train_sampling_strategy", "group_by_length", "transformers 5 renamed it"),
    "--gradient_checkpointing": ("--activation_checkpointing", True, "transformers 5 renamed it"),
    "--no_cuda": ("--use_cpu", True, "transformers 5 renamed it"),
    "--skip_excess_length": ("--excess_length", {True: "drop", False: "truncate"}, "one flag for drop/truncate/raise"),
}
LIST_FLAGS = ("--dataset", "--dataset_format")
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def build_parser() -> HfArgumentParser:
    return HfArgumentParser(ARGUMENT_CLASSES, allow_abbrev=False, description=__doc__.split("\n")[0])


def expand_recipe(argv: list[str]) -> list[str]:
    """`train.py recipe.yaml [flags]`: the recipe's keys become flags placed first, so later flags win."""
    if not argv or argv[0].startswith("-") or not argv[0].endswith(RECIPE_SUFFIXES):
        return argv
    path = argv[0]
    if not os.path.isfile(path):
        raise UsageError(f"recipe file {path} not found")
    with open(path, encoding="utf-8") as handle:
        try:
            if path.endswith(".json"):
                recipe = json.load(handle)
            else:
                import yaml

                recipe = yaml.safe_load(handle)
        except Exception as error:  # yaml.YAMLError or json.JSONDecodeError
            raise UsageError(f"recipe file {path}: cannot be parsed ({error})") from error
    if not isinstance(recipe, dict):
        raise UsageError(f"recipe file {path}: must be a mapping of flag names to values")
    flags = []
    for key, value in recipe.items():
        flag = "--" + str(key).lstrip("-")
        if value is None:
            continue
        if key == "datasets":  # axolotl style: [{path, format | type}, ...]
            flags += recipe_datasets(path, value)
            continue
        if key == "custom_format" and isinstance(value, dict):  # {format, no_input_format, field_instruction, ...}
            flags += [arg for name, item in value.items() for arg in (f"--custom_{name}", str(item))]
            continue
        if isinstance(value, bool):
            flags += [flag, str(value)]
        elif isinstance(value, list):
            flags += [flag] + [str(v) for v in value]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags + argv[1:]


def merge_repeated_list_flags(argv: list[str]) -> list[str]:
    """`--dataset a.json --dataset b.json` means both (argparse would keep only the last)."""
    merged: dict[str, list[str]] = {}
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in LIST_FLAGS:
            flag, values = argv[i], []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            if flag not in merged:
                merged[flag] = []
                out.append(flag)  # placeholder, filled below
            merged[flag] += values
            continue
        out.append(argv[i])
        i += 1
    result: list[str] = []
    for token in out:
        result += [token] + merged[token] if token in merged else [token]
    return result


def recipe_datasets(path: str, entries) -> list[str]:
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "path" in e for e in entries):
        raise UsageError(f"recipe file {path}: 'datasets' must be a list of mappings with 'path' (and 'format')")
    flags = []
    for entry in entries:
        flags += ["--dataset", str(entry["path"]), "--dataset_format", str(entry.get("format", entry.get("type", "airoboros")))]
    return flags


def map_legacy_flags(argv: list[str]) -> list[str]:
    """Old names users still type are mapped to today's, one log line each; never silently dropped."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, eq, inline = token.partition("=")
        if name not in LEGACY_FLAGS:
            out.append(token)
            i += 1
            continue
        new, fixed, why = LEGACY_FLAGS[name]
        value: Optional[str] = inline if eq else None
        if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        i += 1
        if fixed is None:  # the value carries over
            if value is None:
                raise UsageError(f"{name} needs a value")
            if name == "--warmup_ratio" and not 0 <= float(value) < 1:
                raise UsageError(f"--warmup_ratio {value}: must be in [0, 1); or give --warmup_steps N")
            out += [new, value]
            logger.info("legacy flag %s %s -> %s %s (%s)", name, value, new, value, why)
            continue
        enabled = True if value is None else BOOLEAN_WORDS.get(value.lower())
        if enabled is None:
            raise UsageError(f"{name} takes true or false, got {value!r}")
        if isinstance(fixed, dict):
            out += [new, fixed[enabled]]
            logger.info("legacy flag %s %s -> %s %s (%s)", name, enabled, new, fixed[enabled], why)
        elif enabled:
            out += [new, str(fixed)]
            logger.info("legacy flag %s -> %s %s (%s)", name, new, fixed, why)
        else:
            logger.info("legacy flag %s false: nothing to enable (%s is the current name)", name, new)
    return out


def reject_unknown(parser: HfArgumentParser, remaining: list[str]) -> None:
    known = sorted({s for action in parser._actions for s in action.option_strings if s.startswith("--")})
    for token in remaining:
        if token.startswith("-"):
            flag = token.split("=")[0]
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else "; see python train.py --help"
            raise UsageError(f"unknown flag {flag}{hint}")
    raise UsageError(f"unexpected argument {remaining[0]!r} (a value without a flag?)")


def parse_arguments(argv: list[str]):
    parser = build_parser()
    argv = merge_repeated_list_flags(map_legacy_flags(expand_recipe(argv)))
    if "--deepspeed" in argv[:-1]:  # TrainingArguments would reject it with a message that names no flag
        config = argv[argv.index("--deepspeed") + 1]
        if config.endswith(".json") and not os.path.isfile(config):
            raise UsageError(f"--deepspeed {config}: config file not found (cwd: {os.getcwd()})")
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:  # TrainingArguments.__post_init__ checks
        raise UsageError(str(error).strip().splitlines()[0]) from error
    if remaining:
        reject_unknown(parser, remaining)
    model_args, data_args, train_args, gen_args = parsed
    validate_arguments(model_args, data_args, train_args)
    return model_args, data_args, train_args, gen_args


def validate_arguments(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments) -> None:
    """Cross-field rules, checked before anything loads; each message says how to fix it."""
    if not model_args.model_name_or_path:
        raise UsageError("--model_name_or_path is required (a local model directory or a hub id)")
    if not data_args.dataset and not args.merge_only:
        raise UsageError("--dataset is required (a .json/.jsonl/.parquet/.csv/.tsv file or a hub dataset name)")
    check_merge_arguments(model_args, args)
    for dataset in data_args.dataset or []:
        if data.looks_local(dataset) and not os.path.isfile(dataset):
            raise UsageError(f"--dataset {dataset}: file not found (cwd: {os.getcwd()})")
    if len(data_args.dataset_format) not in (1, len(data_args.dataset or [])):
        raise UsageError(
            f"{len(data_args.dataset)} datasets but {len(data_args.dataset_format)} formats; give one --dataset_format "
            "for all, or one per --dataset in the same order"
        )
    if args.full_finetune and args.bits not in (16, 32):
        raise UsageError(
            f"--full_finetune needs --bits 16 or 32 (got {args.bits}); drop --bits or drop --full_finetune"
        )
    check_mode_flags(args)
    if args.full_finetune and args.merged_output_dir:
        raise UsageError("--merged_output_dir merges an adapter; a --full_finetune run has none. Drop one of them")
    if args.bf16 and args.fp16:
        raise UsageError("--bf16 and --fp16 both given; pick one")
    if args.fp16 and not has_accelerator() and process_rank() == 0:
        logger.warning("--fp16 changes nothing without a GPU: the Trainer computes in fp32 on CPU (CPU autocast is "
                       "bf16 only); use --bf16 to run mixed precision here")
    if not args.full_finetune:
        if args.lora_r <= 0:
            raise UsageError(f"--lora_r must be > 0 (got {args.lora_r})")
        if not 0 <= args.lora_dropout < 1:
            raise UsageError(f"--lora_dropout must be in [0, 1) (got {args.lora_dropout})")
        if not args.lora_modules.strip():
            raise UsageError("--lora_modules is empty; use 'all' or a comma list such as q_proj,v_proj")
    check_training_knobs(model_args, data_args, args)
    if data_args.sample_packing and args.train_sampling_strategy == "group_by_length":
        raise UsageError("--sample_packing already fills rows to --model_max_len; drop --group_by_length")
    if data_args.model_max_len <= 0:
        raise UsageError(f"--model_max_len must be > 0 (got {data_args.model_max_len})")
    if data_args.eval_dataset_size < 0:
        raise UsageError(f"--eval_dataset_size must be >= 0 (got {data_args.eval_dataset_size})")
    if args.do_eval and data_args.eval_dataset_size == 0 and not args.merge_only:
        raise UsageError("--do_eval needs an eval split; pass --eval_dataset_size (e.g. 0.02) or drop --do_eval")
    if args.eval_strategy != "no" and data_args.eval_dataset_size == 0:
        raise UsageError(
            f"--eval_strategy {args.eval_strategy.value} needs an eval split; pass --eval_dataset_size "
            "(e.g. 0.02) or --eval_strategy no"
        )
    if args.deepspeed and isinstance(args.deepspeed, str) and not os.path.isfile(args.deepspeed):
        raise UsageError(f"--deepspeed {args.deepspeed}: config file not found")
    for flag, path in (("--output_dir", args.output_dir), ("--working_dir", args.working_dir),
                       ("--merged_output_dir", args.merged_output_dir), ("--dataset_prepared_path", data_args.dataset_prepared_path)):
        check_writable_directory(flag, path)
    check_sharding(args)
    resume = args.resume_from_checkpoint
    if resume and str(resume).lower() not in RESUME_LATEST and not checkpoint_is_complete(resume):
        raise UsageError(f"--resume_from_checkpoint {resume}: not a complete checkpoint directory (no readable "
                         "trainer_state.json); pass a checkpoint-N directory, or drop the flag: a re-run resumes from "
                         "the newest complete checkpoint in --working_dir by itself")
    if args.dry_run_world_size is not None and (not args.dry_run or args.dry_run_world_size < 1):
        raise UsageError(f"--dry_run_world_size {args.dry_run_world_size}: needs --dry_run and a count >= 1")
    validate_output_arguments(args)
    if "wandb" in (args.report_to or []) and not wandb_is_configured():
        raise UsageError(
            "--report_to wandb: no WANDB_API_KEY and no `wandb login`; set WANDB_API_KEY, or WANDB_MODE=offline "
            "to log locally, or drop --report_to wandb"
        )
    if data_args.expand_conversations:
        logger.info("--expand_conversations: every assistant turn is trained already, one sample per conversation")
    model_args.attn_implementation = resolve_attention(model_args.attn_implementation)


def check_merge_arguments(model_args: ModelArguments, args: TrainingArguments) -> None:
    if args.merge_only and not args.merged_output_dir:
        raise UsageError("--merge_only writes the merged model to --merged_output_dir; pass it")
    if args.merge_only and not os.path.isfile(os.path.join(args.output_dir, "adapter_config.json")):
        raise UsageError(f"--merge_only merges the adapter in --output_dir, and {args.output_dir} has no "
                         "adapter_config.json; pass the directory a LoRA run saved to (or a checkpoint-N in it)")
    if args.merge_only and args.overwrite_output_dir:
        raise UsageError("--overwrite_output_dir deletes checkpoints and --merge_only never changes --output_dir; drop it")
    if args.merge_base == "nf4_roundtrip" and not args.merge_only and args.bits != 4:
        raise UsageError(f"--merge_base nf4_roundtrip re-creates the 4-bit weights of a --bits 4 run (got --bits "
                         f"{args.bits}); drop --merge_base or use --merge_base original")
    if args.merge_verify_samples < 0:
        raise UsageError(f"--merge_verify_samples must be >= 0 (got {args.merge_verify_samples}); 0 skips the check")
    if args.merged_output_dir:  # the merge replaces that directory whole: it must not hold what it reads
        merged = os.path.realpath(args.merged_output_dir)
        local_model = model_args.model_name_or_path if os.path.isdir(model_args.model_name_or_path) else None
        for flag, path in (("--output_dir", args.output_dir), ("--model_name_or_path", local_model)):
            if path and os.path.commonpath([merged, os.path.realpath(path)]) == merged:
                raise UsageError(f"--merged_output_dir {args.merged_output_dir} would replace {flag} {path}; pick "
                                 "another directory")


def non_default(args: TrainingArguments, names: tuple[str, ...]) -> list[str]:
    """'--name value' for each of these flags set away from its default (what a user explicitly asked for)."""
    fields = TrainingArguments.__dataclass_fields__
    values = {name: getattr(getattr(args, name), "value", getattr(args, name)) for name in names}
    return [f"--{name} {value}" for name, value in values.items() if value != fields[name].default]


def check_mode_flags(args: TrainingArguments) -> None:
    """Flags of a mode the run is not in would be silently ignored: set away from their defaults, they are refused."""
    lora = non_default(args, ("lora_r", "lora_alpha", "lora_dropout", "lora_modules")) if args.full_finetune else []
    if lora:
        raise UsageError(f"{', '.join(lora)}: LoRA settings, but --full_finetune trains no adapter; drop them or drop "
                         "--full_finetune")
    quantization = non_default(args, ("quant_type", "quant_storage")) if args.bits != 4 else []
    if quantization:
        raise UsageError(f"{', '.join(quantization)} only apply to --bits 4 (got --bits {args.bits}); drop them or "
                         "pass --bits 4")


def check_writable_directory(flag: str, path: Optional[str]) -> None:
    """The directory (or the nearest existing parent it would be created in) must be a writable directory."""
    if not path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file, not a directory; pick another path")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot write in {existing} ({error.strerror}); pick a writable path") from error


def wandb_is_configured() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()


def fsdp_requested(args: TrainingArguments) -> bool:
    """--fsdp, or `accelerate launch` with an FSDP config (which reaches the Trainer through the environment)."""
    return bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")


def check_sharding(args: TrainingArguments) -> None:
    """Combinations of DeepSpeed / FSDP with quantization that would crash late or silently do something else."""
    fsdp = fsdp_requested(args)
    ds_stage = planning.deepspeed_settings(args).get("stage", 0)
    if fsdp and not has_accelerator() and not args.dry_run:  # a dry run plans for the GPU machine
        raise UsageError(
            "FSDP needs GPUs: without CUDA, transformers and accelerate silently fall back to plain DDP (every rank "
            "holds the whole model). Shard on CPU with --deepspeed configs/deepspeed-zero3.json instead, or run on GPUs"
        )
    if fsdp and args.deepspeed:
        raise UsageError("FSDP and --deepspeed both requested; pick one (drop --fsdp / the accelerate FSDP config, or --deepspeed)")
    sharded = "FSDP" if fsdp else f"--deepspeed {args.deepspeed} (ZeRO-3)" if ds_stage == 3 else None
    if sharded is None:
        return
    if args.bits == 8:
        raise UsageError(f"{sharded} cannot shard bitsandbytes 8-bit weights; use --bits 4 (with --quant_storage) or --bits 16")
    needed = "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"
    if args.bits == 4 and args.quant_storage != needed:
        raise UsageError(
            f"{sharded} shards parameters by dtype and --bits 4 stores weights as {args.quant_storage}; they must be "
            f"stored like the rest of the model: pass --quant_storage {needed}"
        )


def check_training_knobs(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments) -> None:
    """Freezing, RoPE scaling, NEFTune and optimizer flags, as far as they can be judged without the model."""
    if args.layers_to_freeze is not None and args.layer_freeze_ratio is not None:
        raise UsageError("--layers_to_freeze and --layer_freeze_ratio both given; pick one")
    if args.layers_to_freeze is not None and args.layers_to_freeze < 0:
        raise UsageError(f"--layers_to_freeze must be >= 0 (got {args.layers_to_freeze})")
    if args.layer_freeze_ratio is not None and not 0 <= args.layer_freeze_ratio < 1:
        raise UsageError(f"--layer_freeze_ratio must be in [0, 1) (got {args.layer_freeze_ratio}); "
                         "for a layer count use --layers_to_freeze N")
    if (model_args.rope_scaling_type is None) != (model_args.rope_scaling_factor is None):
        given, missing = (("--rope_scaling_type", "--rope_scaling_factor F (> 1)") if model_args.rope_scaling_type
                          else ("--rope_scaling_factor", f"--rope_scaling_type ({'|'.join(ROPE_SCALING_TYPES)})"))
        raise UsageError(f"{given} needs {missing}; give both or neither")
    if model_args.rope_scaling_factor is not None and not model_args.rope_scaling_factor > 1:
        raise UsageError(f"--rope_scaling_factor must be > 1 (got {model_args.rope_scaling_factor}); 1 means no "
                         "scaling: drop --rope_scaling_type and --rope_scaling_factor")
    if args.neftune_noise_alpha is not None and not args.neftune_noise_alpha > 0:
        raise UsageError(f"--neftune_noise_alpha must be > 0 (got {args.neftune_noise_alpha}); "
                         "drop it to train without noise")
    if args.neftune_noise_alpha is not None and data_args.sample_packing:
        logger.info("--neftune_noise_alpha with --sample_packing: the noise scale alpha/sqrt(L*d) uses the packed row "
                    "length L, so each sample gets less noise than it would unpacked")
    check_deepspeed_overrides(args)


def check_deepspeed_overrides(args: TrainingArguments) -> None:
    """A DeepSpeed config with its own "optimizer" or "scheduler" section wins: the Trainer then ignores --optim or
    --lr_scheduler_type without a word. A flag set away from its default is an error; otherwise say which is used."""
    if not args.deepspeed:
        return
    config = args.hf_deepspeed_config.config  # the JSON as TrainingArguments read it
    for section, flag, name in (("optimizer", "--optim", "optim"),
                                ("scheduler", "--lr_scheduler_type", "lr_scheduler_type")):
        if section not in config:
            continue
        kind = config[section].get("type", "?") if isinstance(config[section], dict) else "?"
        if non_default(args, (name,)):
            raise UsageError(f"{non_default(args, (name,))[0]} would be ignored: --deepspeed {args.deepspeed} has its "
                             f"own \"{section}\" ({kind}); drop {flag}, or delete that section to use {flag}")
        if process_rank() == 0:  # a fact about the config, not about a rank: say it once
            logger.warning("--deepspeed %s has its own \"%s\" (%s): it is used instead of %s %s",
                           args.deepspeed, section, kind, flag, getattr(getattr(args, name), "value", getattr(args, name)))


def validate_output_arguments(args: TrainingArguments) -> None:
    """Predictions, throughput and hub flags; the hub itself is probed here, before anything loads."""
    if args.do_predict and args.generation_samples <= 0:
        raise UsageError(f"--generation_samples must be > 0 with --do_predict (got {args.generation_samples})")
    if args.eval_generation_samples < 0:
        raise UsageError(f"--eval_generation_samples must be >= 0 (got {args.eval_generation_samples})")
    if args.eval_generation_samples and args.eval_strategy == "no":
        raise UsageError("--eval_generation_samples generates at each evaluation, and --eval_strategy is no; pass "
                         "--eval_strategy steps (with --eval_dataset_size), or use --do_predict after training")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UsageError(f"--peak_tflops must be > 0 TFLOP/s per device (got {args.peak_tflops})")
    check_writable_directory("--profiler_dir", args.profiler_dir)
    strategy = getattr(args.hub_strategy, "value", args.hub_strategy)
    if strategy != "every_save":
        raise UsageError(f"--hub_strategy {strategy} would be ignored: checkpoints are never pushed, only the finished "
                         "output directories (see --push_to_hub); drop --hub_strategy")
    if args.hub_model_id and not args.push_to_hub:
        raise UsageError(f"--hub_model_id {args.hub_model_id} without --push_to_hub uploads nothing; add --push_to_hub "
                         "or drop --hub_model_id")
    problem = reporting.hub_push_problem(args) if args.push_to_hub else None
    if problem:
        raise UsageError(problem)


def check_model_before_writing(model_args: ModelArguments, args: TrainingArguments, data_args: DataArguments):
    """The model exists, and what needs its structure (LoRA target names, layers to freeze, RoPE parameters) is
    checked on its config and one empty (meta) model, before any write. Returns the config."""
    try:
        config = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model_name_or_path {model_args.model_name_or_path}: cannot load a model config "
                         f"({str(error).splitlines()[0]}); pass a local model directory or a reachable hub id") from error
    named_targets = not args.full_finetune and args.lora_modules.strip() != "all"
    freezing = args.layers_to_freeze is not None or args.layer_freeze_ratio is not None
    skeleton = empty_model(config, model_args) if named_targets or freezing else None
    check_knobs_against_model(config, skeleton, model_args, args, data_args.model_max_len)
    if named_targets:
        lora_target_list(skeleton, args.lora_modules)
    return config


def empty_model(config, model_args: ModelArguments):
    """The model's modules with no memory behind them (meta device), never through ZeRO-3's collective init."""
    import torch

    with torch.device("meta"), planning.without_zero3_init():
        return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)


def check_knobs_against_model(config, skeleton, model_args: ModelArguments, args: TrainingArguments,
                              model_max_len: int) -> None:
    """Layer freezing needs the layer count and the decoder layer list; RoPE scaling needs rope_parameters."""
    import copy

    layers = config.num_hidden_layers
    frozen = training_knobs.frozen_layer_count(args.layers_to_freeze, args.layer_freeze_ratio, layers)
    if frozen:
        flag, value = (("--layers_to_freeze", args.layers_to_freeze) if args.layers_to_freeze is not None
                       else ("--layer_freeze_ratio", args.layer_freeze_ratio))
        if frozen >= layers:
            raise UsageError(f"{flag} {value} freezes {frozen} layers but the model has {layers} decoder layers; "
                             f"freeze at most {layers - 1} so that some layer trains")
        if training_knobs.decoder_layers(skeleton) is None:
            raise UsageError(f"{flag}: no list of {layers} decoder layers found in {type(skeleton).__name__}; "
                             f"drop {flag}")
        logger.info("%s %s: the first %d of %d decoder layers are frozen", flag, value, frozen, layers)
    if model_args.rope_scaling_type:
        rope = getattr(config, "rope_parameters", None)
        if not isinstance(rope, dict) or "rope_theta" not in rope:
            raise UsageError(f"--rope_scaling_type: this model ({config.model_type}) has no single set of RoPE "
                             "parameters to scale (no RoPE, or one per layer type); drop the --rope_scaling flags")
        original = training_knobs.pretrained_context(config)
        scaled = training_knobs.apply_rope_scaling(copy.deepcopy(config), model_args.rope_scaling_type,
                                                   model_args.rope_scaling_factor)
        logger.info("RoPE %s x%g: context %d -> %d positions (--model_max_len %s)", model_args.rope_scaling_type,
                    model_args.rope_scaling_factor, original, scaled, model_max_len)
        if model_max_len and model_max_len > scaled:
            logger.warning("--model_max_len %d is beyond the scaled context of %d positions", model_max_len, scaled)
        if model_args.rope_scaling_type == "dynamic" and model_max_len and model_max_len <= original:
            logger.warning("--rope_scaling_type dynamic changes nothing up to %d positions, so training on at most "
                           "--model_max_len %d sees plain RoPE; only longer inputs at inference are rescaled",
                           original, model_max_len)
        if not args.full_finetune and not args.merged_output_dir:
            logger.warning("--rope_scaling_type with an adapter and no --merged_output_dir: the adapter does not carry "
                           "the scaling; load its base with the same rope_parameters, or pass --merged_output_dir")


def has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def resolve_attention(requested: str) -> str:
    """flash_attention_2 when flash-attn imports; with no CUDA at all, sdpa and a warning; else an install hint."""
    if requested != "flash_attention_2":
        return requested
    import importlib.util

    import torch

    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        return requested
    if not torch.cuda.is_available():
        logger.warning("flash_attention_2 needs CUDA and this machine has none: using sdpa attention instead")
        return "sdpa"
    raise UsageError(f"flash_attention_2 was requested but the flash-attn package is not installed: {FLASH_ATTN_HINT}")


# --- stages, in the order they run ------------------------------------------------------------------------------------


def process_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def setup_logging() -> None:
    """Rank 0 logs at INFO; the other ranks only warn, so every line appears once."""
    rank = process_rank()
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    transformers.utils.logging.set_verbosity(logging.WARNING if rank == 0 else logging.ERROR)
    for noisy in ("bitsandbytes", "torch.distributed", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def prepare_directories(args: TrainingArguments) -> None:
    """Checkpoints live in --working_dir; the Trainer writes there. The final outputs go to --output_dir."""
    args.final_output_dir = args.output_dir
    args.working_dir = args.working_dir or args.output_dir
    args.output_dir = args.working_dir
    if args.overwrite_output_dir and args.process_index == 0:
        for name in os.listdir(args.working_dir) if os.path.isdir(args.working_dir) else []:
            if name.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(args.working_dir, name))
        marker = os.path.join(args.final_output_dir, COMPLETED_MARKER)
        if os.path.exists(marker):
            os.remove(marker)
        logger.info("--overwrite_output_dir: old checkpoints and the completed marker removed; starting fresh")


def is_completed(args: TrainingArguments) -> bool:
    return os.path.isfile(os.path.join(args.final_output_dir, COMPLETED_MARKER))


def load_tokenizer(model_args: ModelArguments, data_args: DataArguments):
    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load a tokenizer from {source} ({str(error).splitlines()[0]}); "
                         "pass --tokenizer_name_or_path or add the tokenizer files to the model directory") from error
    if model_args.llama1_patch:
        apply_llama1_patch(tokenizer)
    overrides = {
        name: value
        for name, value in (
            ("bos_token", model_args.bos_token),
            ("eos_token", model_args.eos_token),
            ("unk_token", model_args.unk_token),
            ("pad_token", model_args.pad_token),
        )
        if value is not None
    }
    if overrides:
        added = tokenizer.add_special_tokens(overrides)
        logger.info("special tokens set: %s (%d new to the vocabulary)", overrides, added)
    formats = data_args.dataset_format
    needed = {t for name in formats for t in FORMAT_INFO[name].special_tokens}
    layout_tokens = sorted(t for t in needed if t not in tokenizer.get_vocab())
    if layout_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": layout_tokens}, replace_extra_special_tokens=False)
        logger.info("--dataset_format %s needs %s: added to the vocabulary", " ".join(formats), layout_tokens)
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no EOS token, so models could never learn to stop; pass --eos_token")
    if "chat_template" in formats and not tokenizer.chat_template:
        raise UsageError("--dataset_format chat_template renders with the tokenizer's own chat template, and this "
                         "tokenizer has none; pick a layout format (chatml, llama2_chat, vicuna, sharegpt)")
    data.attach_chat_template(tokenizer, formats)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        logger.info("no pad token: padding with %r (masks and labels come from lengths)", tokenizer.pad_token)
    tokenizer.padding_side = "right"
    return tokenizer


LLAMA1_PATCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama-1-patch")


def apply_llama1_patch(tokenizer) -> None:
    """The special tokens and BOS/EOS behaviour of llama-1-patch/ (the files a llama-1 directory should have had)."""
    with open(os.path.join(LLAMA1_PATCH_DIR, "special_tokens_map.json")) as handle:
        special = json.load(handle)
    with open(os.path.join(LLAMA1_PATCH_DIR, "tokenizer_config.json")) as handle:
        config = json.load(handle)
    missing = [token for token in special.values() if token not in tokenizer.get_vocab()]
    if missing:
        raise UsageError(f"--llama1_patch: the tokenizer has no {missing}; it is not a llama-1 tokenizer")
    tokenizer.add_special_tokens(special)
    for name in ("add_bos_token", "add_eos_token"):
        if hasattr(tokenizer, name):
            setattr(tokenizer, name, config[name])
    logger.info("--llama1_patch: special tokens set to %s", special)


def build_datasets(data_args: DataArguments, args: TrainingArguments, tokenizer, write: bool = True):
    """Rank 0 prepares (and caches) first; the other ranks then reuse its cache or repeat the same seeded work.
    write=False (--dry_run) reads an existing cache but writes none."""
    seed = args.data_seed if args.data_seed is not None else args.seed
    if data_args.dataset_prepared_path is None:
        data_args.dataset_prepared_path = os.path.join(args.working_dir or args.output_dir, "prepared_data")
    with args.main_process_first(desc="dataset preparation"):
        train, evaluation, stats = data.prepare_datasets(data_args, tokenizer, seed,
                                                         write=write and args.process_index == 0)
    logger.info("sample 0 as trained ([[...]] = trained tokens):\n%s", data.preview(train[0], tokenizer))
    return train, evaluation, stats


def load_model(model_args: ModelArguments, args: TrainingArguments, tokenizer):
    import torch

    dtype = {4: None, 8: None, 16: torch.bfloat16 if args.bf16 else torch.float16, 32: torch.float32}[args.bits]
    compute_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    kwargs = {"dtype": dtype or compute_dtype, "attn_implementation": model_args.attn_implementation}
    if args.bits in (4, 8):
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=args.bits == 4,
            load_in_8bit=args.bits == 8,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=args.double_quant,
            bnb_4bit_quant_type=args.quant_type,
            bnb_4bit_quant_storage=getattr(torch, args.quant_storage),
        )
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": args.local_process_index}
    if args.deepspeed and transformers.integrations.is_deepspeed_zero3_enabled():
        import deepspeed

        # ZeRO-3 shards the weights while they load (zero.Init), sized by deepspeed.comm's world, which the
        # launcher's process group does not set up by itself: without this every rank would think it is alone.
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    kwargs["config"] = training_knobs.rope_scaled_config(model_args)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, **kwargs
    )
    resized = len(tokenizer) > model.get_input_embeddings().weight.shape[0]
    if resized:
        logger.info("resizing embeddings %d -> %d for new tokens", model.get_input_embeddings().weight.shape[0], len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    for name, value in (("pad_token_id", tokenizer.pad_token_id), ("eos_token_id", tokenizer.eos_token_id), ("bos_token_id", tokenizer.bos_token_id)):
        setattr(model.config, name, value)
    model.config.use_cache = False
    return model, resized


def add_adapters(model, args: TrainingArguments, new_tokens: bool):
    """LoRA on the chosen linear layers; k-bit models are prepared first (fp32 norms, input grads).
    With new tokens, the embedding and output layers are trained in full and saved with the adapter."""
    import peft

    frozen = training_knobs.frozen_layer_count(args.layers_to_freeze, args.layer_freeze_ratio,
                                               model.config.num_hidden_layers)
    if args.full_finetune:
        if frozen:
            names = training_knobs.freeze_bottom_layers(model, frozen, new_tokens)
            logger.info("frozen (requires_grad=False, not in the optimizer): %s", ", ".join(names))
        return model
    checkpointing = bool(args.activation_checkpointing)
    gc_kwargs = args.activation_checkpointing_kwargs or {"use_reentrant": False}
    if args.bits in (4, 8):
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif checkpointing:
        model.enable_input_require_grads()
    targets = "all-linear" if args.lora_modules.strip() == "all" else lora_target_list(model, args.lora_modules)
    targets, layer_limits = training_knobs.lora_layer_limits(model, targets, frozen)
    config = peft.LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=embedding_modules(model) if new_tokens else None,
        task_type="CAUSAL_LM",
        **layer_limits,
    )
    model = peft.get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA on %s: %d trainable of %d parameters (%.2f%%)", targets, trainable, total, 100 * trainable / total)
    return model


def lora_target_list(model, spec: str) -> list[str]:
    wanted = [name.strip() for name in spec.split(",") if name.strip()]
    linear_names = training_knobs.linear_names(model)
    missing = [name for name in wanted if name not in linear_names]
    if missing:
        raise UsageError(
            f"--lora_modules {spec}: no linear layer named {', '.join(missing)} in this model; "
            f"its linear layers are: {', '.join(sorted(linear_names))} (or use 'all')"
        )
    return wanted


def embedding_modules(model) -> list[str]:
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    return [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is inputs or module is outputs]


class PreemptionCallback(transformers.TrainerCallback):
    """SIGTERM/SIGINT (preemption, Ctrl-C): finish the current optimizer step, save a normal checkpoint at that
    step boundary, stop. All ranks agree on the step (the flag is all-reduced), so the collective save never
    hangs. The run then exits 143/130 without writing final outputs; the same command resumes."""

    def __init__(self):
        self.signal_received: Optional[int] = None
        self.previous: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame) -> None:
        if self.signal_received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal_received = signum
        logger.warning("%s received: saving a checkpoint at the end of this step, then stopping",
                       signal.Signals(signum).name)

    def on_step_end(self, args, state, control, **kwargs):
        if any_rank_flagged(self.signal_received is not None):
            self.signal_received = self.signal_received or signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def any_rank_flagged(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class LossWatchdog(transformers.TrainerCallback):
    """NaN/inf losses, or losses above --loss_watchdog_threshold, for --loss_watchdog_patience logs in a row stop
    the run before the bad weights are saved; the newest checkpoint is the last good state."""

    def __init__(self, threshold: Optional[float], patience: int):
        self.threshold, self.patience = threshold, max(1, patience)
        self.bad = 0
        self.tripped: Optional[str] = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        broken = loss != loss or loss in (float("inf"), float("-inf"))
        self.bad = self.bad + 1 if broken or (self.threshold is not None and loss > self.threshold) else 0
        if self.bad >= self.patience:
            self.tripped = f"loss {loss} at step {state.global_step} ({self.bad} bad logs in a row)"
            control.should_training_stop = True
            control.should_save = False


def watchdog_tripped(trainer) -> Optional[str]:
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, LossWatchdog)), None)
    return callback.tripped if callback else None


class SFTTrainer(transformers.Trainer):
    """The Trainer, plus real (non-padding) tokens per second in every log line."""

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        now, seen = time.time(), self.state.num_input_tokens_seen
        last = getattr(self, "_tokens_clock", None)
        if "loss" in logs and last and now > last[0] and seen:
            logs["tokens_per_second"] = round((seen - last[1]) / (now - last[0]), 1)
            if getattr(self, "throughput", None):  # set by throughput.attach: mfu next to tokens/s
                logs.update(self.throughput.utilization(logs["tokens_per_second"]))
        if "loss" in logs or last is None:
            self._tokens_clock = (now, seen)
        super().log(logs, start_time)


def build_trainer(model, args: TrainingArguments, data_args: DataArguments, tokenizer, train, evaluation):
    """Packed rows carry position_ids and no attention mask; one collator handles both row kinds."""
    if args.eval_strategy == "no":
        evaluation = None
    args.remove_unused_columns = False
    model.config.use_cache = False  # with a cache, transformers would not look for packed sequences
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=data.Collator(tokenizer.pad_token_id, data_args.pad_to_multiple_of),
        processing_class=tokenizer,
        callbacks=[PreemptionCallback(), LossWatchdog(args.loss_watchdog_threshold, args.loss_watchdog_patience)],
    )


class EvalGenerationCallback(transformers.TrainerCallback):
    """--eval_generation_samples: at every evaluation, generate answers to the first eval prompts and log them."""

    def __init__(self, tokenizer, pairs, gen_config, batch_size: int):
        self.tokenizer, self.pairs, self.gen_config, self.batch_size = tokenizer, pairs, gen_config, batch_size

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        generated = inference.generate(model, self.tokenizer, [p for p, _ in self.pairs], self.gen_config, self.batch_size)
        if state.is_world_process_zero:
            rows = [{"prompt": self.tokenizer.decode(p), "reference": inference.answer_text(self.tokenizer, r),
                     "prediction": inference.answer_text(self.tokenizer, o)} for (p, r), o in zip(self.pairs, generated)]
            inference.log_samples(f"step {state.global_step} eval generation", rows)


def attach_eval_generations(trainer, tokenizer, eval_set, gen_config, count: int) -> None:
    """--eval_generation_samples N: the first N eval samples' trained prompts, answered at every evaluation."""
    if count and eval_set is not None:
        pairs = inference.sample_prompts(eval_set, count)
        trainer.add_callback(EvalGenerationCallback(tokenizer, pairs, gen_config, trainer.args.per_device_eval_batch_size))


def stopped_by_signal(trainer) -> Optional[int]:
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, PreemptionCallback)), None)
    return callback.signal_received if callback else None


def find_resume_checkpoint(args: TrainingArguments) -> Optional[str]:
    """The newest checkpoint-N in --working_dir that was completely written (its trainer_state.json exists)."""
    if not os.path.isdir(args.working_dir):
        return None
    steps = sorted(
        (int(name.split("-")[1]), name)
        for name in os.listdir(args.working_dir)
        if name.startswith("checkpoint-") and name.split("-")[1].isdigit()
    )
    for _, name in reversed(steps):
        path = os.path.join(args.working_dir, name)
        if checkpoint_is_complete(path):
            return path
        logger.warning("ignoring incomplete checkpoint %s (interrupted while it was written)", path)
    return None


def resume_checkpoint(args: TrainingArguments) -> Optional[str]:
    """--resume_from_checkpoint DIR when given (checked in validate_arguments), else the newest complete one."""
    explicit = args.resume_from_checkpoint
    if explicit and str(explicit).lower() not in RESUME_LATEST:
        return explicit
    return find_resume_checkpoint(args)


def checkpoint_is_complete(path: str) -> bool:
    """The Trainer writes trainer_state.json last, after weights, optimizer, scheduler and RNG states; a checkpoint
    whose state file is missing or unreadable (or that carries transformers' JIT-checkpoint sentinel) is torn."""
    if os.path.exists(os.path.join(path, "checkpoint-is-incomplete.txt")):
        return False
    try:
        with open(os.path.join(path, "trainer_state.json")) as handle:
            return "global_step" in json.load(handle)
    except (OSError, ValueError):
        return False


def free_bytes(path: str) -> int:
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return shutil.disk_usage(existing).free


def check_disk_space(model, args: TrainingArguments) -> None:
    """A checkpoint holds the trainable weights plus two fp32 Adam moments for each, and (full fine-tune) the whole
    model; --save_total_limit of them at once, plus the final output. Stop before training if they cannot fit."""
    saved_weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    checkpoint = saved_weights + sum(8 * p.numel() for p in model.parameters() if p.requires_grad)
    kept = (args.save_total_limit or 1) if args.save_strategy != "no" else 0
    needed = int(1.1 * (checkpoint * (kept + 1) + saved_weights))
    free = free_bytes(args.working_dir)
    if free < needed:
        raise UsageError(
            f"--working_dir {args.working_dir} has {free / 2**30:.2f} GiB free, but {kept} checkpoint(s) of about "
            f"{checkpoint / 2**30:.2f} GiB and the final output need about {needed / 2**30:.2f} GiB; free space, "
            "lower --save_total_limit or point --working_dir at a larger disk"
        )


def train(trainer, args: TrainingArguments) -> None:
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    logger.info(
        "world size %d: %d per device x %d accumulation x %d processes = %d samples per optimizer step",
        args.world_size, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size, per_step,
    )
    checkpoint = resume_checkpoint(args)
    if checkpoint:
        logger.info("resuming from %s (weights, optimizer, scheduler, RNG and data position)", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)


def dry_run(config, model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments) -> int:
    """--dry_run: the same checks and tokenization as a real run, nothing loaded but the config, nothing written."""
    import torch

    tokenizer = load_tokenizer(model_args, data_args)
    train_set, _, _ = build_datasets(data_args, args, tokenizer, write=False)
    world_size = args.dry_run_world_size or args.world_size
    plan = planning.make_plan(config, tokenizer, train_set, args, data_args.model_max_len, world_size, model_args.attn_implementation,
                              fsdp=fsdp_requested(args))
    logger.info("%s", planning.describe(plan, args))
    logger.info("plan-json: %s", plan.as_json())
    if torch.cuda.is_available():
        capacity = torch.cuda.get_device_properties(args.local_process_index).total_memory / planning.GIB
        if plan.memory_gib_at_max_len["total"] > 0.9 * capacity:
            logger.warning("the estimate (%.1f GiB) exceeds 90 %% of this GPU's %.1f GiB: lower "
                           "--per_device_train_batch_size, add --gradient_checkpointing, use --bits 4 or ZeRO-3",
                           plan.memory_gib_at_max_len["total"], capacity)
    return 0


def generation_config(gen_args: GenerationArguments, tokenizer, formats: list[str]) -> transformers.GenerationConfig:
    """Saved next to the model: generation stops at the formats' end-of-answer tokens as well as at EOS."""
    stop = sorted({tokenizer.eos_token_id} | {end_token_id(name, tokenizer) for name in formats})
    return transformers.GenerationConfig(
        **vars(gen_args),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop if len(stop) > 1 else stop[0],
        pad_token_id=tokenizer.pad_token_id,
    )


def save_final(trainer, args: TrainingArguments, tokenizer, gen_config) -> None:
    """The final model (full fine-tune) or adapter, with tokenizer and generation config, in --output_dir.
    Written to a temporary directory first (every rank takes part: DeepSpeed gathers), then each file is renamed
    into place; the `completed` marker, written after everything else, is what makes the outputs count."""
    staging = os.path.join(args.final_output_dir, f".final-tmp-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}")
    trainer.save_model(staging)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(staging)
        gen_config.save_pretrained(staging)
        if not args.full_finetune:
            base_loading(args).save(staging)  # a later merge re-creates the weights the adapter trained against
        for name in os.listdir(staging):
            target = os.path.join(args.final_output_dir, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    logger.info("saved %s to %s", "model" if args.full_finetune else "adapter", args.final_output_dir)


def merge_adapter(model_args: ModelArguments, args: TrainingArguments, tokenizer, gen_config, samples=None) -> dict:
    """The adapter in --output_dir + the base -> a plain model in --merged_output_dir, streamed (see merging.py)."""
    import torch

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    with planning.without_zero3_init():  # rank 0 merges alone: no ZeRO-3 collective construction
        return merging.merge_adapter(
            model_args.model_name_or_path, args.final_output_dir, args.merged_output_dir, dtype,
            merge_base=args.merge_base, trained_against=base_loading(args), tokenizer=tokenizer,
            generation_config=gen_config, verify_samples=args.merge_verify_samples, samples=samples,
            trust_remote_code=model_args.trust_remote_code, base_config=training_knobs.rope_scaled_config(model_args),
        )


def base_loading(args: TrainingArguments) -> merging.BaseLoading:
    """How load_model loads the base for these flags; saved with the adapter, read back by later merges."""
    compute = "bfloat16" if args.bf16 else "float16" if args.fp16 else "float32"
    dtype = {4: compute, 8: compute, 16: "bfloat16" if args.bf16 else "float16", 32: "float32"}[args.bits]
    return merging.BaseLoading(bits=args.bits, dtype=dtype, quant_type=args.quant_type, double_quant=args.double_quant,
                               quant_storage=args.quant_storage)


def merge_only(model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments, gen_args) -> int:
    """--merge_only: the tokenizer and generation config saved with the adapter go with the merged model."""
    if args.process_index != 0:  # launched with several processes: one merge is enough
        return 0
    saved = args.final_output_dir
    has_tokenizer = os.path.isfile(os.path.join(saved, "tokenizer_config.json"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(saved) if has_tokenizer else load_tokenizer(model_args, data_args)
    if os.path.isfile(os.path.join(saved, "generation_config.json")):
        gen_config = transformers.GenerationConfig.from_pretrained(saved)
    else:
        gen_config = generation_config(gen_args, tokenizer, data_args.dataset_format)
    samples = None
    if data_args.dataset and args.merge_verify_samples:
        train_set, _, _ = build_datasets(data_args, args, tokenizer, write=False)  # --output_dir is never changed
        samples = first_samples(train_set, args.merge_verify_samples)
    merge_adapter(model_args, args, tokenizer, gen_config, samples)
    reporting.write_output_extras(args.merged_output_dir, reporting.load_report(saved))
    return 0


def first_samples(train_set, count: int) -> list[dict]:
    return [train_set[i] for i in range(min(count, len(train_set)))]


def merge_is_missing(args: TrainingArguments) -> bool:
    return bool(args.merged_output_dir) and not os.path.isfile(os.path.join(args.merged_output_dir, "config.json"))


def mark_completed(args: TrainingArguments, global_step: int) -> None:
    with open(os.path.join(args.final_output_dir, COMPLETED_MARKER), "w") as handle:
        json.dump({"global_step": global_step, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, handle)


def finish_completed_run(model_args, args, tokenizer, gen_config) -> int:
    logger.info("this run already completed; its outputs are in %s (pass --overwrite_output_dir to train again)", args.final_output_dir)
    if merge_is_missing(args) and args.process_index == 0:
        merge_adapter(model_args, args, tokenizer, gen_config)
        reporting.write_output_extras(args.merged_output_dir, reporting.load_report(args.final_output_dir))
    if args.process_index == 0 and not reporting.push_outputs(args):
        return 4
    return 0


def protect_secrets(args: TrainingArguments) -> None:
    """--hub_token moves to HF_TOKEN (where huggingface_hub reads it) and out of the arguments that get pickled
    into training_args.bin, and out of sys.argv, which wandb copies into its run metadata."""
    if args.hub_token:
        os.environ.setdefault("HF_TOKEN", args.hub_token)
        args.hub_token = None
    for index, token in enumerate(sys.argv):
        if token == "--hub_token" and index + 1 < len(sys.argv):
            sys.argv[index + 1] = "<redacted>"
        elif token.startswith("--hub_token="):
            sys.argv[index] = "--hub_token=<redacted>"


def run(argv: list[str]) -> int:
    model_args, data_args, args, gen_args = parse_arguments(argv)
    protect_secrets(args)
    reporting.take_over_hub_push(args)
    config = check_model_before_writing(model_args, args, data_args)
    if args.dry_run:
        return dry_run(config, model_args, data_args, args)
    prepare_directories(args)
    transformers.set_seed(args.seed)
    if args.merge_only:
        return merge_only(model_args, data_args, args, gen_args)
    tokenizer = load_tokenizer(model_args, data_args)
    gen_config = generation_config(gen_args, tokenizer, data_args.dataset_format)
    if is_completed(args) and not data_args.prepare_only:
        return finish_completed_run(model_args, args, tokenizer, gen_config)
    train_set, eval_set, stats = build_datasets(data_args, args, tokenizer)
    if data_args.prepare_only:
        logger.info("--prepare_only: data prepared in %s; not training", data_args.dataset_prepared_path)
        return 0
    model, new_tokens = load_model(model_args, args, tokenizer)
    model = add_adapters(model, args, new_tokens)
    trainer = build_trainer(model, args, data_args, tokenizer, train_set, eval_set)
    throughput.attach(trainer, args, train_set)
    attach_eval_generations(trainer, tokenizer, eval_set, gen_config, args.eval_generation_samples)
    if args.do_train:
        check_disk_space(model, args)
        train(trainer, args)
        if stopped_by_signal(trainer):
            logger.warning("stopped at step %d with a checkpoint in %s; run the same command again to resume",
                           trainer.state.global_step, args.working_dir)
            return 128 + stopped_by_signal(trainer)
        if watchdog_tripped(trainer):
            last_good = find_resume_checkpoint(args)
            logger.error("loss watchdog: %s; stopped without saving these weights. Last good state: %s. Lower "
                         "--learning_rate or check the data, then re-run (it resumes there)",
                         watchdog_tripped(trainer), last_good or "none (no checkpoint yet)")
            return 3
        save_final(trainer, args, tokenizer, gen_config)
    if args.do_eval and eval_set is not None:
        trainer.save_metrics("eval", trainer.evaluate())
    if args.do_predict:  # every rank generates (ZeRO-3 gathers weights); rank 0 writes
        inference.write_predictions(trainer, tokenizer, eval_set if eval_set is not None else train_set, gen_config,
                                    args.generation_samples, args.final_output_dir)
    trainer.accelerator.wait_for_everyone()
    if args.do_train and trainer.is_world_process_zero():
        global_step = trainer.state.global_step
        report = reporting.build_report(trainer, model_args, data_args, args, tokenizer, gen_config, stats)
        reporting.write_output_extras(args.final_output_dir, report)
        del trainer, model  # free the training copy before the merge loads the base again
        if args.merged_output_dir:
            merge_adapter(model_args, args, tokenizer, gen_config, first_samples(train_set, args.merge_verify_samples))
            reporting.write_output_extras(args.merged_output_dir, report)
        mark_completed(args, global_step)
        if not reporting.push_outputs(args):
            return 4
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Bad input ends in one line naming the flag/file and the fix, exit code 2; `--debug` adds the traceback."""
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv and (argv.index("--debug") + 1 == len(argv) or argv[argv.index("--debug") + 1].startswith("--"))
    if debug:
        argv.remove("--debug")
    try:
        return run(argv)
    except (UsageError, data.DataError, merging.MergeError) as error:
        if process_rank() == 0 or debug:  # every rank sees the same bad input: say it once
            logger.error("%s", error, exc_info=debug)
        return 2


if __name__ == "__main__":
    sys.exit(main())
