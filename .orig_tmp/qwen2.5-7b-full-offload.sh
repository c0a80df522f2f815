#!/usr/bin/env bash
# Qwen2.5-7B full fine-tune on 4 x 48 GB GPUs (A6000/L40S): DeepSpeed ZeRO-3 with the optimizer states and weights
# offloaded to CPU memory (configs/deepspeed-zero3-offload.json; needs ~130 GB of host RAM for the fp32 master
# weights and Adam states, and compiles DeepSpeed's cpu_adam op on first use).
#
# Prerequisites: `make install` plus `pip install -r requirements-gpu.txt --no-build-isolation` (flash-attn) and a
#   CUDA toolkit for the cpu_adam build; MODEL = hub id or local dir; DATA = your training file (chatml by default);
#   WANDB_API_KEY for wandb (or REPORT_TO=none).
# Memory: ~13.8 GiB per GPU estimated by the dry run at 2 x 4096 tokens with checkpointing (the 152k vocabulary
#   makes the logits a large share).
# Batch arithmetic: 2 per GPU x 8 accumulation x 4 GPUs = global batch: 64 samples per optimizer step,
#   at most 64 x 4096 = 262,144 tokens per step; steps per epoch = ceil(ceil(N / 2 / 4) / 8) for N samples
#   (10,000 samples: 157 per epoch, 471 for 3 epochs).
# Usage:   DATA=conversations.json scripts/qwen2.5-7b-full-offload.sh
#          DRY_RUN=1 DATA=conversations.json scripts/qwen2.5-7b-full-offload.sh   # validate, print the plan
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-Qwen/Qwen2.5-7B}
DATA=${DATA:?set DATA to your training file, e.g. DATA=conversations.json}
FORMAT=${FORMAT:-chatml}
OUT=${OUT:-runs/qwen2.5-7b-full}
NGPUS=${NGPUS:-4}
PYTHON=${PYTHON:-python}

ARGS=(
  --model_name_or_path "$MODEL" --dataset "$DATA" --dataset_format "$FORMAT"
  --output_dir "$OUT" --working_dir "$OUT/work"
  --full_finetune --bits 16 --bf16 --deepspeed configs/deepspeed-zero3-offload.json --gradient_checkpointing
  --attn_implementation flash_attention_2
  --model_max_len 4096 --per_device_train_batch_size 2 --gradient_accumulation_steps 8
  --num_train_epochs 3 --learning_rate 1e-5 --lr_scheduler_type cosine --warmup_ratio 0.03 --weight_decay 0.0
  --eval_dataset_size 0.02 --eval_strategy steps --eval_steps 50
  --save_strategy steps --save_steps 50 --save_total_limit 1 --logging_steps 1 --seed 11422
  --report_to "${REPORT_TO:-wandb}"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exec "$PYTHON" train.py "${ARGS[@]}" --dry_run --dry_run_world_size "$NGPUS"
fi
exec "$PYTHON" -m torch.distributed.run --nnodes=1 --nproc_per_node="$NGPUS" train.py "${ARGS[@]}"
