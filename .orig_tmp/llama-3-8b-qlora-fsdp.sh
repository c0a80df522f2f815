#!/usr/bin/env bash
# Llama-3-8B QLoRA sharded with FSDP over 2 x 24 GB GPUs (accelerate + configs/accelerate-fsdp.yaml): the 4-bit
# weights are stored in bf16 (--quant_storage bfloat16) so FSDP can shard them with the rest of the model.
# GPU only: FSDP needs CUDA (on CPU train.py refuses instead of silently running DDP).
#
# Prerequisites: `make install` plus `pip install -r requirements-gpu.txt --no-build-isolation` (flash-attn);
#   MODEL = hub id or local dir (gated on the hub: export HF_TOKEN); DATA = your training file (chatml turns by
#   default: FORMAT=chatml); WANDB_API_KEY for wandb (or REPORT_TO=none).
# Memory: ~14.1 GiB per GPU estimated by the dry run at 2 x 4096 tokens with checkpointing (the 128k vocabulary
#   makes the logits a large share).
# Batch arithmetic: 2 per GPU x 8 accumulation x 2 GPUs = global batch: 32 samples per optimizer step,
#   at most 32 x 4096 = 131,072 tokens per step; steps per epoch = ceil(ceil(N / 2 / 2) / 8) for N samples
#   (10,000 samples: 313 per epoch, 939 for 3 epochs).
# Usage:   DATA=conversations.json scripts/llama-3-8b-qlora-fsdp.sh
#          DRY_RUN=1 DATA=conversations.json scripts/llama-3-8b-qlora-fsdp.sh   # validate, print the plan
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B}
DATA=${DATA:?set DATA to your training file, e.g. DATA=conversations.json}
FORMAT=${FORMAT:-chatml}
OUT=${OUT:-runs/llama-3-8b-qlora}
MERGED=${MERGED:-$OUT-merged}
NGPUS=${NGPUS:-2}
PYTHON=${PYTHON:-python}

ARGS=(
  --model_name_or_path "$MODEL" --dataset "$DATA" --dataset_format "$FORMAT"
  --output_dir "$OUT" --working_dir "$OUT/work" --merged_output_dir "$MERGED"
  --bits 4 --double_quant --quant_type nf4 --quant_storage bfloat16 --bf16
  --lora_r 64 --lora_alpha 16 --lora_modules all --gradient_checkpointing --attn_implementation flash_attention_2
  --model_max_len 4096 --per_device_train_batch_size 2 --gradient_accumulation_steps 8
  --num_train_epochs 3 --learning_rate 0.0001 --lr_scheduler_type cosine --warmup_ratio 0.03 --max_grad_norm 0.3
  --eval_dataset_size 0.02 --eval_strategy steps --eval_steps 50
  --save_strategy steps --save_steps 50 --save_total_limit 2 --logging_steps 1 --seed 11422
  --report_to "${REPORT_TO:-wandb}"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  ACCELERATE_USE_FSDP=true exec "$PYTHON" train.py "${ARGS[@]}" --dry_run --dry_run_world_size "$NGPUS"
fi
exec "$PYTHON" -m accelerate.commands.launch --config_file configs/accelerate-fsdp.yaml --num_processes "$NGPUS" \
  train.py "${ARGS[@]}"
