#!/usr/bin/env bash
# Mistral-7B QLoRA on ONE 24 GB GPU (RTX 3090/4090, A10G, L4): 4-bit nf4, LoRA r 64 on every linear layer, rows
# packed to 4096 tokens (no padding), merged into a bf16 model at the end.
#
# Prerequisites: `make install` plus `pip install -r requirements-gpu.txt --no-build-isolation` (flash-attn: packed
#   rows then use its variable-length kernel); MODEL = hub id or local dir; DATA = your training file; WANDB_API_KEY
#   for wandb (or REPORT_TO=none).
# Memory: ~16.4 GiB estimated by the dry run at 4 rows x 4096 tokens with checkpointing.
# Batch arithmetic: 4 packed rows x 4 accumulation x 1 GPU = global batch: 16 rows per optimizer step,
#   16 x 4096 = 65,536 token slots per step (~99 % filled by packing); steps per epoch = ceil(ceil(R / 4) / 4) for R
#   packed rows (the dry run prints R; 10,000 samples of ~500 tokens pack into ~1,230 rows: 77 steps per epoch).
# Usage:   DATA=conversations.json scripts/mistral-7b-qlora.sh
#          DRY_RUN=1 DATA=conversations.json scripts/mistral-7b-qlora.sh   # validate, print the plan, train nothing
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-mistralai/Mistral-7B-v0.1}
DATA=${DATA:?set DATA to your training file, e.g. DATA=conversations.json}
FORMAT=${FORMAT:-airoboros_chat}
OUT=${OUT:-runs/mistral-7b-qlora}
MERGED=${MERGED:-$OUT-merged}
NGPUS=1
PYTHON=${PYTHON:-python}

ARGS=(
  --model_name_or_path "$MODEL" --dataset "$DATA" --dataset_format "$FORMAT"
  --output_dir "$OUT" --working_dir "$OUT/work" --merged_output_dir "$MERGED"
  --bits 4 --double_quant --quant_type nf4 --bf16 --lora_r 64 --lora_alpha 16 --lora_modules all
  --gradient_checkpointing --attn_implementation flash_attention_2 --sample_packing
  --model_max_len 4096 --per_device_train_batch_size 4 --gradient_accumulation_steps 4
  --num_train_epochs 3 --learning_rate 0.0002 --lr_scheduler_type cosine --warmup_ratio 0.03 --max_grad_norm 0.3
  --optim paged_adamw_32bit --eval_dataset_size 0.02 --eval_strategy steps --eval_steps 50
  --save_strategy steps --save_steps 50 --save_total_limit 2 --logging_steps 1 --seed 11422
  --report_to "${REPORT_TO:-wandb}"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exec "$PYTHON" train.py "${ARGS[@]}" --dry_run --dry_run_world_size "$NGPUS"
fi
exec "$PYTHON" train.py "${ARGS[@]}"
