"""Fine-tune an open causal LM on instruction/chat data: QLoRA, LoRA or full fine-tune, optional merge.

    # QLoRA on one GPU, merged into a 16-bit model at the end
    python train.py --model_name_or_path M --dataset conversations.json --dataset_format airoboros_chat \\
        --bits 4 --double_quant --quant_type nf4 --lora_modules all --output_dir out-peft --merged_output_dir out

    # full fine-tune on 8 GPUs with DeepSpeed ZeRO-2
    torchrun --nproc_per_node=8 train.py --full_finetune --bits 16 --bf16 --deepspeed deepspeed-7b.json ...

    # a recipe file stands in for the flags; flags given after it win
    python train.py configs/recipes/mistral-7b-qlora.yaml --dataset conversations.json

Every flag is documented in `python train.py --help`. Re-running the same command resumes from the newest complete
checkpoint in --working_dir; re-running a finished run only completes what is missing (e.g. the merge).

This file is the schema (the four argument dataclasses) and the order of the stages (`run`); everything else lives
in the `finetune` package (see ARCHITECTURE.md).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional, Union

import transformers

from dataset_formats import FORMATS
from finetune.checks import preflight
from finetune.checks.export_request import TYPES as GGUF_TYPES
from finetune.checks.model_config import check_model_before_writing
from finetune.config import cli, environment
from finetune.config.schema import check_choices
from finetune.config.validate import validate
from finetune.data.pipeline import DataError
from finetune.errors import UsageError
from finetune.modeling.knobs import ROPE_SCALING_TYPES
from finetune.outputs import finishing
from finetune.outputs.merging import MERGE_BASES, MergeError
from finetune.run_paths import RunPaths
from finetune.runtime import close_process_group, has_accelerator, process_rank, setup_logging
from finetune.training import stages

logger = logging.getLogger("train")


def require(condition: bool, message: str) -> None:
    """A field's own rule, checked in its dataclass's __post_init__ (exit code 2 with the message)."""
    if not condition:
        raise UsageError(message)


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
    chat_template_jinja: Optional[str] = field(
        default=None,
        metadata={"help": "A Jinja chat template (a .jinja file's path, or the template text itself) used instead of "
                  "the tokenizer's own by --dataset_format chat_template, and saved with the tokenizer."},
    )
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
        metadata={"help": "For llama-1 checkpoints converted with empty special tokens: apply llama-1-patch/ (bos "
                  "<s>, eos </s>, unk <unk>, pad <unk>, BOS added, EOS not), so training and the saved "
                  "tokenizer get them right."},
    )
    add_tokens: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Tokens added to the vocabulary as whole, ordinary (trainable, not special) tokens, e.g. "
                  "--add_tokens '<tool>' '</tool>' (axolotl's tokens); the embeddings grow, the new rows train."},
    )
    pad_token: Optional[str] = field(
        default=None,
        metadata={"help": "Pad token. None: keep the tokenizer's, else its unk token, else EOS (safe: masks and "
                  "labels come from lengths, not pad ids). A token new to the vocabulary resizes the "
                  "embeddings."},
    )
    bos_token: Optional[str] = field(default=None, metadata={"help": "Override the BOS token (None: keep)."})
    eos_token: Optional[str] = field(default=None, metadata={"help": "Override the EOS token (None: keep)."})
    unk_token: Optional[str] = field(default=None, metadata={"help": "Override the unk token (None: keep)."})
    rope_scaling_type: Optional[str] = field(
        default=None,
        metadata={"help": "Replace the model's RoPE scaling to stretch its context (needs --rope_scaling_factor; None: "
                  "keep the config's). linear: positions / factor; dynamic: NTK-aware, plain RoPE up to "
                  "max_position_embeddings, rescaled beyond; yarn: low frequencies interpolated, attention scaled by "
                  "0.1*ln(factor)+1 (linear, yarn: max_position_embeddings x factor). Set before loading, so the full "
                  "and merged models carry it (an adapter alone does not). llama3/longrope: edit config.json.",
                  "choices": list(ROPE_SCALING_TYPES)},
    )
    rope_scaling_factor: Optional[float] = field(
        default=None,
        metadata={"help": "RoPE scaling factor, > 1: the usable context becomes about factor x the pretrained "
                  "length. Needs --rope_scaling_type (None: no override)."},
    )

    def __post_init__(self):
        check_choices(self)
        if (self.rope_scaling_type is None) != (self.rope_scaling_factor is None):
            given, missing = (("--rope_scaling_type", "--rope_scaling_factor F (> 1)") if self.rope_scaling_type
                              else ("--rope_scaling_factor", f"--rope_scaling_type ({'|'.join(ROPE_SCALING_TYPES)})"))
            raise UsageError(f"{given} needs {missing}; give both or neither")
        require(self.rope_scaling_factor is None or self.rope_scaling_factor > 1,
                f"--rope_scaling_factor must be > 1 (got {self.rope_scaling_factor}); 1 means no scaling: drop "
                "--rope_scaling_type and --rope_scaling_factor")
        # flash_attention_2 without CUDA falls back to sdpa when loading (warned here, the flag kept as given so a
        # printed config keeps it); with CUDA but no flash-attn: the install hint
        preflight.resolve_attention(self.attn_implementation)


@dataclass
class DataArguments:
    dataset: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Training data: local .json/.jsonl/.parquet/.csv/.tsv files, local folders or hub dataset names. "
                  "Several may be given (--dataset a.json b.json, or the flag repeated); their records are split and "
                  "shuffled together. A source may end in ?split=S&name=N&data_files=a.jsonl,b.jsonl: the split "
                  "(default train), a hub dataset's configuration, files inside the folder or hub dataset."},
    )
    dataset_format: list[str] = field(
        default_factory=lambda: ["airoboros"],
        metadata={
            "help": "How records are rendered and masked (see dataset_formats.py): one format for all datasets, or "
            "one per --dataset, in the same order.",
            "choices": sorted(FORMATS),
        },
    )
    dataset_weights: Optional[list[float]] = field(
        default=None,
        metadata={"help": "One weight per --dataset, in the same order (a recipe's `datasets:` entries may carry "
                  "`weight:`): < 1 trains that fraction of the dataset's training records, > 1 repeats them "
                  "(2.5: every record twice plus a fresh half). Drawn by --data_seed; the eval split is "
                  "taken before weighting. None: all 1."},
    )
    dataset_exact_deduplication: bool = field(
        default=False,
        metadata={"help": "Drop records identical (same fields and values, same format) to an earlier one, within "
                  "and across datasets, before the eval split; counted per dataset in stats.json."},
    )
    eval_dataset_size: float = field(
        default=0.0,
        metadata={"help": "Held-out eval split: a fraction < 1 of the records, or a count >= 1; 0 means no eval "
                  "split. Stratified by the records' `category` when present, seeded by --data_seed (else "
                  "--seed)."},
    )
    eval_dataset: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Separate eval data (axolotl's test_datasets), written like --dataset (default split: test for "
                  "folders and hub datasets; a file is read whole); instead of --eval_dataset_size."},
    )
    eval_dataset_format: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Formats of --eval_dataset: one for all or one each (None: the --dataset_format when it is one).",
                  "choices": sorted(FORMATS)},
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
        metadata={"help": "Skip records a format cannot render (missing field, bad role order, empty answer...) "
                  "instead of stopping; they are counted in stats.json and the first few are listed in the "
                  "log."},
    )
    train_on_source: bool = field(
        default=False, metadata={"help": "Train on prompt tokens too (default: only responses and their EOS)."}
    )
    roles_to_train: list[str] = field(
        default_factory=lambda: ["assistant"],
        metadata={
            "help": "chatml and chat_template formats: the roles whose turns are trained (content and end-of-turn "
            "token), e.g. --roles_to_train assistant tool to train on tool results too. A turn's own `train` / "
            "`training` / `weight` field (true/false or 0/1) overrides its role's default.",
            "choices": ["system", "user", "assistant", "tool"],
        },
    )
    default_system_prompt: Optional[str] = field(
        default=None,
        metadata={"help": "Conversation formats: a system turn with this text is put first in every conversation that "
                  "has none (axolotl's default_system_message); it replaces a format's own default (airoboros, "
                  "vicuna). Masked like any system turn."},
    )
    train_on_reasoning: bool = field(
        default=True,
        metadata={"help": "Train assistant turns' reasoning traces (`reasoning_content`, or <think>...</think> in "
                  "the content). False masks each trace with its closing tag, training only the answer after "
                  "it (chatml and chat_template; other conversation layouts write the reasoning inline into "
                  "the answer)."},
    )
    include_sources: bool = field(
        default=False,
        metadata={"help": "airoboros format: append a record's `source` field to its trained response as "
                  "'\\n\\nSource: ...'. Without it the field is ignored."},
    )
    expand_conversations: bool = field(
        default=False,
        metadata={"help": "Kept for the airoboros scripts; changes nothing: every assistant turn is always trained (one "
                  "sample per conversation, or per turn where the chat template renders past turns differently)."},
    )
    dataset_prepared_path: Optional[str] = field(
        default=None,
        metadata={"help": "Directory for the tokenized (and packed) train/eval sets and stats.json (None: "
                  "<working_dir>/prepared_data). Reused by later runs and by the other ranks when the data "
                  "bytes, formats, tokenizer, length and packing settings are unchanged (a fingerprint of "
                  "them is checked)."},
    )
    dataset_processes: int = field(
        default=1,
        metadata={"help": "Worker processes for tokenization (results are identical to 1; used from 2,000 records)."},
    )
    sample_packing: bool = field(
        default=False,
        metadata={"help": "Pack tokenized samples into rows of --model_max_len (best-fit decreasing, seeded): no "
                  "padding, positions restart per sample and attention stays within each sample "
                  "(flash-attention varlen on GPU, a block-diagonal mask with sdpa/eager). "
                  "--per_device_train_batch_size then counts rows."},
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
    rl: Optional[str] = field(
        default=None,
        metadata={"help": "Preference optimization instead of SFT (axolotl's rl): dpo, ipo, orpo or simpo on pair records "
                  "{prompt | messages | conversations, chosen, rejected} (hh-rlhf: two whole transcripts), kto on "
                  "unpaired ones {prompt | messages | conversations, completion, label: true|false}, rendered by "
                  "--dataset_format: both sides share the prompt ids SFT would train on, and only each final answer "
                  "(with its end token) is compared; identical pairs and prompts that fill --model_max_len are dropped "
                  "and counted. dpo/ipo/kto compare with a reference: the base with the adapters off (LoRA/QLoRA: no "
                  "second copy) or a frozen copy (full fine-tune). Knobs: --rl_beta, --simpo_gamma, "
                  "--label_smoothing, --desirable_weight, --undesirable_weight. None: SFT.",
                  "choices": ["dpo", "ipo", "orpo", "simpo", "kto"]},
    )

    @property
    def has_eval_set(self) -> bool:
        return bool(self.eval_dataset_size or self.eval_dataset)

    def __post_init__(self):
        check_choices(self)
        require(self.model_max_len > 0, f"--model_max_len must be > 0 (got {self.model_max_len})")
        require(self.eval_dataset_size >= 0, f"--eval_dataset_size must be >= 0 (got {self.eval_dataset_size})")
        require(not (self.eval_dataset and self.eval_dataset_size), f"--eval_dataset and --eval_dataset_size "
                f"{self.eval_dataset_size} both give an eval set; keep one (axolotl: val_set_size 0 with test_datasets)")
        require(self.dataset_processes >= 1, f"--dataset_processes must be >= 1 (got {self.dataset_processes})")
        require(bool(self.roles_to_train), "--roles_to_train needs at least one role (e.g. assistant)")
        require(all(weight > 0 for weight in self.dataset_weights or []),
                f"--dataset_weights {self.dataset_weights}: every weight must be > 0 (leave a dataset out instead of 0)")


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    working_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where checkpoints go (None: --output_dir). The final model/adapter goes to --output_dir."},
    )
    merged_output_dir: Optional[str] = field(
        default=None,
        metadata={"help": "After an adapter run (or with --merge_only), merge the adapter into the base model and "
                  "save a plain model here in bf16 with --bf16, fp16 with --fp16, else fp32, with tokenizer, "
                  "chat template and generation config. The merge streams one tensor at a time (memory: a "
                  "few copies of the largest tensor, not the model), keeps the base's shard layout, and "
                  "appears only when complete."},
    )
    merge_only: bool = field(
        default=False,
        metadata={"help": "Do not train: merge the adapter in --output_dir (a finished run's or a checkpoint-N) into "
                  "--model_name_or_path, write --merged_output_dir (needed); --dataset only gives the "
                  "--merge_verify_samples samples. Tokenizer and generation config come from --output_dir."},
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
            "choices": list(MERGE_BASES),
        },
    )
    merge_verify_samples: int = field(
        default=4,
        metadata={"help": "After merging, compare merged vs base+adapter (loaded as trained) on this many samples (the "
                  "first training samples, else a built-in text), each cut to 512 tokens: |logit difference|, "
                  "argmax agreement, perplexities -> <merged_output_dir>/merge_verification.json. 0 skips it."},
    )
    export_gguf: Optional[list[str]] = field(
        default=None,
        metadata={"help": "After the merge (or --merge_only; a full fine-tune: its --output_dir model), write "
                  "<model>/gguf/<name>-<TYPE>.gguf for llama.cpp / Ollama: f16, bf16, q8_0, q4_0 (the gguf package), "
                  "K-quants q2_k ... q6_k by llama.cpp's quantizer (llama-cpp-python, or llama-quantize on PATH). llama, "
                  "mistral, qwen2 models. "
                  "Tokenizer, end-of-turn token, chat template, RoPE carried; each file read back and checked "
                  "(export_verification.json), an Ollama Modelfile beside it (ollama create NAME -f Modelfile).",
                  "choices": list(GGUF_TYPES)},
    )
    export_gptq: Optional[int] = field(
        default=None,
        metadata={"help": "After the merge (or --merge_only; a full fine-tune: its --output_dir model), GPTQ-quantize the "
                  "model to this many bits with GPTQModel (CPU or GPU), calibrated on the first "
                  "--quantization_max_samples training samples, into <model>/gptq-<BITS>bit (loads with transformers "
                  "+ GPTQConfig); then compared with the merged model on 4 of them (gptq_verification.json).",
                  "choices": [2, 3, 4, 8]},
    )
    gptq_group_size: int = field(
        default=128, metadata={"help": "--export_gptq: weights per quantization group (a divisor of the layers' input "
                               "sizes, or -1: one group per column)."})
    quantization_max_samples: int = field(
        default=128, metadata={"help": "--export_gptq: calibration samples from the training data (> 0; seed 002's name)."})
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
        metadata={"help": "Validate every flag and file, read the model's config (not its weights), tokenize the "
                  "data (nothing is written), log the plan — world size, batch arithmetic, steps, trainable "
                  "parameters and estimated memory per device for weights / gradients / optimizer / "
                  "activations (derivation in finetune/training/planning.py) — and a `plan-json:` line, then "
                  "exit 0."},
    )
    print_config: bool = field(
        default=False,
        metadata={"help": "Print the settings this command resolves to — the recipe's or axolotl config's keys "
                  "translated to our flag names, then the flags given — as a recipe file (YAML) that runs the same, "
                  "and exit 0. Values differing from the defaults only; credentials never printed."},
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
        metadata={"help": "Modules that get LoRA adapters: 'all' = every linear layer except the output head, or a "
                  "comma list of module names (e.g. q_proj,v_proj)."},
    )
    lora_modules_to_save: Optional[str] = field(
        default=None,
        metadata={"help": "Comma list of modules trained in full beside LoRA and saved with the adapter (e.g. "
                  "embed_tokens,lm_head; axolotl's lora_modules_to_save). New tokens add the embeddings by themselves."},
    )
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA: each adapted weight is trained as a magnitude vector (one per output row) times a "
                  "direction that LoRA updates (peft's use_dora; slower steps). Merged exactly."},
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "rsLoRA: updates scaled by alpha/sqrt(r) instead of alpha/r, so high ranks "
                                 "still learn (peft's use_rslora)."},
    )
    init_lora_weights: str = field(
        default="default",
        metadata={
            "help": "How the adapters start. default: A random (Kaiming), B zero, so training starts at the base "
            "model; gaussian: A ~ N(0, 1/r). pissa / olora: A and B from each weight's top singular vectors (SVD) / "
            "its QR decomposition and the base keeps the residual, so training starts at the base model too; --bits "
            "16 or 32 only. The saved adapter is converted to a plain LoRA (rank 2r) on the original base, so it "
            "merges and loads like any other. loftq: --bits 4 only: A and B make the 4-bit base + adapter "
            "approximate the 16-bit base; merged into the 4-bit weights (needs --merge_base nf4_roundtrip).",
            "choices": ["default", "gaussian", "pissa", "olora", "loftq"],
        },
    )
    loraplus_lr_ratio: Optional[float] = field(
        default=None,
        metadata={"help": "LoRA+: the B matrices learn at this multiple of --learning_rate (the paper uses 16; > 1); "
                  "everything else at --learning_rate, with the same schedule. None: off."},
    )
    lora_model_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Continue training a saved LoRA adapter (a run's --output_dir or a checkpoint-N in it; "
                  "llama-recipes' from_peft_checkpoint, axolotl's lora_model_dir) instead of new ones: its rank, "
                  "alpha, targets and variant are used (LoRA flags left at their defaults). Optimizer and step "
                  "count start fresh; to resume an interrupted run, re-run its command instead."},
    )
    peft_method: str = field(
        default="lora",
        metadata={"help": "Adapter kind: lora (LoRA / QLoRA with the options above) or llama_adapter (LLaMA-Adapter: "
                  "--llama_adapter_len learned prompt vectors, zero-gated, in the top --llama_adapter_layers attention "
                  "layers; llama and mistral models; cannot be merged). llama-recipes' --peft_method.",
                  "choices": ["lora", "llama_adapter"]},
    )
    llama_adapter_len: int = field(default=10, metadata={"help": "llama_adapter: prompt vectors per layer (> 0)."})
    llama_adapter_layers: int = field(
        default=30, metadata={"help": "llama_adapter: adapted layers, from the top (> 0; at most the model's layers)."}
    )
    rl_beta: float = field(
        default=0.1,
        metadata={"help": "--rl: beta (> 0): dpo/simpo: the reward scale; ipo: the target margin is 1/(2 beta); orpo: "
                  "the weight of the odds-ratio term (TRL's beta, axolotl's rl_beta)."},
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "--rl simpo: the target reward margin (>= 0)."})
    desirable_weight: float = field(default=1.0, metadata={"help": "--rl kto: loss weight of desirable answers (> 0)."})
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "--rl kto: loss weight of undesirable answers (> 0; balance a skewed label mix)."})
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "--rl dpo/simpo: the probability that a pair's preference is flipped, in [0, 0.5) "
                  "(conservative DPO; axolotl's dpo_label_smoothing). 0: plain DPO."},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "--rl dpo/ipo: compute the reference's log-probs of every pair once, before training (stored "
                  "next to the prepared data, keyed by it and the base model, and reused on resume), instead of a "
                  "reference forward per step; a full fine-tune then holds no frozen copy. Not with ZeRO-3 / FSDP."},
    )
    layers_to_freeze: Optional[int] = field(
        default=None,
        metadata={"help": "Freeze the first N decoder layers, 0 <= N < layer count (None or 0: none). Full fine-tune: "
                  "they and the input embeddings (unless tokens were added; a tied head with them) leave the "
                  "optimizer. LoRA: adapters only above N. Excludes --layer_freeze_ratio."},
    )
    layer_freeze_ratio: Optional[float] = field(
        default=None,
        metadata={"help": "Freeze floor(ratio x layers) decoder layers from the bottom, ratio in [0, 1) (0.3 of 10 -> "
                  "3; None: none); otherwise as --layers_to_freeze, which it excludes."},
    )
    neftune_noise_alpha: Optional[float] = field(
        default=None,
        metadata={"help": "NEFTune: in training only, uniform noise in +-alpha/sqrt(L*d) on the input embeddings, d = "
                  "hidden size, L = the batch's padded length (as the reference code; --sample_packing: the packed "
                  "row, so each sample gets less noise than unpacked). > 0; typical 5 to 15 (None: off)."},
    )
    early_stopping_patience: Optional[int] = field(
        default=None,
        metadata={"help": "Stop when the eval loss has not improved for this many evaluations in a row (> 0; needs an "
                  "eval split and --eval_strategy; axolotl's early_stopping_patience). The final model is the one at "
                  "the stop; the count restarts when a run resumes. None: off."},
    )
    loss_watchdog_threshold: Optional[float] = field(
        default=None,
        metadata={"help": "Stop when the loss stays above this for --loss_watchdog_patience logs (None: NaN/inf only)."},
    )
    loss_watchdog_patience: int = field(
        default=3, metadata={"help": "Consecutive bad logs (NaN/inf, or above the threshold) that stop the run."}
    )
    report_to: Union[None, str, list[str]] = field(
        default="none",
        metadata={"help": "Loggers: none, wandb, tensorboard, ... (checked up front: installed, and wandb needs "
                  "WANDB_API_KEY or WANDB_MODE=offline). wandb's files go under --working_dir unless WANDB_DIR is set; "
                  "tensorboard's under <working_dir>/runs."},
    )
    env_file: Optional[str] = field(
        default=None,
        metadata={"help": "KEY=VALUE lines (WANDB_API_KEY, HF_TOKEN, WANDB_PROJECT, ...) put into the environment "
                  "before anything runs; names already set in the environment win. None: ./.env when present."},
    )
    do_train: bool = field(default=True, metadata={"help": "Train (default). --do_train False with --do_eval only evaluates."})
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "Token counting used for the tokens/s log: all, non_padding or no."}
    )
    do_predict: bool = field(
        default=False,
        metadata={"help": "After training and the final evaluation, answer --generation_samples eval prompts (train "
                  "prompts without an eval split; each the sample's prompt ids as trained) with the generation flags "
                  "-> predictions.jsonl (prompt, reference, prediction, token counts) in --output_dir; two logged."},
    )
    generation_samples: int = field(default=8, metadata={"help": "--do_predict: how many prompts get answers (> 0)."})
    eval_generation_samples: int = field(
        default=0,
        metadata={"help": "At every evaluation during training, generate answers to this many eval prompts and log "
                  "them (0: none; needs --eval_strategy steps or epoch)."},
    )
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "When the run is complete, upload --output_dir to the hub repo --hub_model_id and "
                  "--merged_output_dir to <hub_model_id>-merged (the completed marker stays local; "
                  "checkpoints are never pushed, so --hub_strategy does not apply). Checked before anything "
                  "loads: HF_HUB_OFFLINE, no token (HF_TOKEN, --hub_token or `hf auth login`), an "
                  "unreachable hub or a rejected token stop the run (exit 2). A failed upload exits 4 with "
                  "the outputs complete locally; re-running the command retries only the push."},
    )
    hub_model_id: Optional[str] = field(
        default=None,
        metadata={"help": "--push_to_hub: the repo, 'user/name' or 'org/name' (None: the --output_dir folder name in "
                  "the token's namespace); the merged model goes to '<hub_model_id>-merged'. New repos are public "
                  "unless --hub_private_repo."},
    )
    peak_tflops: Optional[float] = field(
        default=None,
        metadata={"help": "Peak dense TFLOP/s of ONE device in the training dtype (e.g. 989 for an H100 SXM in bf16), "
                  "for the mfu logged next to tokens_per_second: tokens/s x model FLOPs per token / (processes x peak); "
                  "model FLOPs per token ~ 6N + 12LHT for a full fine-tune, ~4N + 12LHT for LoRA (derivation in "
                  "finetune/training/throughput.py). None: looked up for known GPUs (H100, H200, A100, A10G, L40S, L4, "
                  "RTX 4090, V100, T4; in bf16/fp16/fp32/tf32 as trained); unknown devices log no mfu."},
    )
    chunked_cross_entropy: bool = field(
        default=True,
        metadata={"help": "Compute the loss only where it is trained: the output head is applied to the positions "
                  "whose label is trained, --cross_entropy_chunk_size of them at a time and recomputed in the "
                  "backward, instead of full-vocabulary fp32 logits for every position. Same loss and gradients. "
                  "False: transformers' plain loss (models whose forward takes no logits_to_keep, or changes the "
                  "logits after the head, fall back to it by themselves, with a log line)."},
    )
    cross_entropy_chunk_size: int = field(
        default=1024,
        metadata={"help": "--chunked_cross_entropy: trained positions per chunk (> 0); peak loss memory is about "
                  "chunk x vocabulary x 8 bytes (fp32 logits and their gradient)."},
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
        check_choices(self)
        require(bool(self.lora_modules.strip()), "--lora_modules is empty; use 'all' or a comma list such as q_proj,v_proj")
        require(self.layers_to_freeze is None or self.layers_to_freeze >= 0,
                f"--layers_to_freeze must be >= 0 (got {self.layers_to_freeze})")
        require(self.layer_freeze_ratio is None or 0 <= self.layer_freeze_ratio < 1,
                f"--layer_freeze_ratio must be in [0, 1) (got {self.layer_freeze_ratio}); for a layer count use "
                "--layers_to_freeze N")
        require(self.neftune_noise_alpha is None or self.neftune_noise_alpha > 0,
                f"--neftune_noise_alpha must be > 0 (got {self.neftune_noise_alpha}); drop it to train without noise")
        require(self.early_stopping_patience is None or self.early_stopping_patience > 0,
                f"--early_stopping_patience must be > 0 (got {self.early_stopping_patience}); drop it to never stop early")
        require(self.quantization_max_samples > 0 and (self.gptq_group_size == -1 or self.gptq_group_size > 0),
                "--quantization_max_samples must be > 0 and --gptq_group_size > 0 or -1")
        require(self.merge_verify_samples >= 0,
                f"--merge_verify_samples must be >= 0 (got {self.merge_verify_samples}); 0 skips the check")
        require(self.loraplus_lr_ratio is None or self.loraplus_lr_ratio > 1,
                f"--loraplus_lr_ratio must be > 1 (got {self.loraplus_lr_ratio}); drop it to train A and B alike")
        require(self.llama_adapter_len > 0 and self.llama_adapter_layers > 0,
                "--llama_adapter_len and --llama_adapter_layers must be > 0")
        require(self.lora_model_dir is None or os.path.isfile(os.path.join(self.lora_model_dir, "adapter_config.json")),
                f"--lora_model_dir {self.lora_model_dir}: no adapter_config.json there; pass the directory a LoRA run "
                "saved its adapter to (its --output_dir) or one of its checkpoint-N directories")
        require(self.desirable_weight > 0 and self.undesirable_weight > 0,
                "--desirable_weight and --undesirable_weight must be > 0")
        require(self.rl_beta > 0 and self.simpo_gamma >= 0 and 0 <= self.label_smoothing < 0.5,
                f"--rl_beta must be > 0 (got {self.rl_beta}), --simpo_gamma >= 0 (got {self.simpo_gamma}), "
                f"--label_smoothing in [0, 0.5) (got {self.label_smoothing})")
        require(self.cross_entropy_chunk_size > 0,
                f"--cross_entropy_chunk_size must be > 0 (got {self.cross_entropy_chunk_size})")
        require(self.eval_generation_samples >= 0,
                f"--eval_generation_samples must be >= 0 (got {self.eval_generation_samples})")
        require(self.peak_tflops is None or self.peak_tflops > 0,
                f"--peak_tflops must be > 0 TFLOP/s per device (got {self.peak_tflops})")
        require(self.dry_run_world_size is None or self.dry_run_world_size >= 1,
                f"--dry_run_world_size {self.dry_run_world_size}: needs --dry_run and a count >= 1")
        # With no GPU, use_cpu is what makes the Trainer see torchrun's ranks (gloo DDP) and accept bf16 (CPU
        # autocast). Without it, each torchrun rank silently trains alone as "rank 0 of 1" and all write the outputs.
        if not self.use_cpu and not has_accelerator():
            self.use_cpu = True
        if self.use_cpu:
            preflight.honour_ddp_timeout_on_cpu(self.ddp_timeout)
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


def build_parser():
    """The parser of every flag (`python train.py --help`)."""
    return cli.build_parser(ARGUMENT_CLASSES, __doc__.split("\n")[0])


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments, GenerationArguments]:
    """argv (a recipe file may come first) -> the four argument objects, every field and cross-field rule checked
    before anything loads (UsageError: exit code 2, nothing written)."""
    model_args, data_args, args, gen_args = cli.parse_arguments(argv, ARGUMENT_CLASSES, __doc__.split("\n")[0])
    validate(model_args, data_args, args)
    return model_args, data_args, args, gen_args


# --- the stages, in the order they run ------------------------------------------------------------------------------


def run(argv: list[str]) -> int:
    model_args, data_args, args, gen_args = parse_arguments(argv)
    preflight.protect_secrets(args)
    if args.print_config:
        print(cli.settings_text((model_args, data_args, args, gen_args), ARGUMENT_CLASSES), end="")
        return 0
    config = check_model_before_writing(model_args, args, data_args.model_max_len)  # on a meta model, before writes
    paths = RunPaths.from_args(args, data_args)
    if args.dry_run:
        return stages.dry_run(config, model_args, data_args, args, paths)
    environment.place_wandb_files(args.report_to, paths.working)
    stages.prepare_directories(args, paths)
    transformers.set_seed(args.seed)
    if args.merge_only:
        return finishing.merge_only(model_args, data_args, args, gen_args, paths)
    if paths.is_completed() and not data_args.prepare_only:
        return finishing.finish_completed_run(model_args, data_args, args, gen_args, paths)
    built = stages.build_stages(model_args, data_args, args, gen_args, paths, with_model=not data_args.prepare_only)
    if data_args.prepare_only:
        logger.info("--prepare_only: data prepared in %s; not training", paths.prepared)
        return 0
    if args.do_train:
        stopped = stages.train(built.trainer, args, paths)
        if stopped:
            return stopped
        finishing.save_final(built.trainer, args, paths, built.tokenizer, built.gen_config)
    return finishing.finish_training(built, model_args, data_args, args, paths)


def main(argv: Optional[list[str]] = None) -> int:
    """Bad input ends in one line naming the flag/file and the fix, exit code 2; `--debug` adds the traceback."""
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv and (argv.index("--debug") + 1 == len(argv) or argv[argv.index("--debug") + 1].startswith("--"))
    if debug:
        argv.remove("--debug")
    try:
        return run(argv)
    except (UsageError, DataError, MergeError) as error:
        if process_rank() == 0 or debug:  # every rank sees the same bad input: say it once
            logger.error("%s", error, exc_info=debug)
        return 2
    finally:
        close_process_group()


if __name__ == "__main__":
    sys.exit(main())
