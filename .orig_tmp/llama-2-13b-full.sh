#!/usr/bin/env bash
# Llama-2-13B full fine-tune: one node, 8 x 80 GB GPUs, torchrun + DeepSpeed ZeRO-3 (configs/deepspeed-zero3.json:
# weights, gradients and optimizer states sharded over the 8 GPUs).
#
# Prerequisites: `make install` plus `pip install -r requirements-gpu.txt --no-build-isolation` (flash-attn);
#   MODEL = hub id or local dir (gated on the hub: export HF_TOKEN); DATA = your training file; WANDB_API_KEY for
#   wandb (or REPORT_TO=none).
# Memory: ~37.3 GiB per GPU estimated by the dry run at 4 x 4096 tokens with checkpointing.
# Batch arithmetic: 4 per GPU x 3 accumulation x 8 GPUs = global batch: 96 samples per optimizer step,
#   at most 96 x 4096 = 393,216 tokens per step; steps per epoch = ceil(ceil(N / 4 / 8) / 3) for N samples
#   (10,000 samples: 105 per epoch, 315 for 3 epochs).
# Usage:   DATA=conversations.json scripts/llama-2-13b-full.sh
#          DRY_RUN=1 DATA=conversations.json scripts/llama-2-13b-full.sh   # validate, print the plan, train nothing
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-meta-llama/Llama-2-13b-hf}
DATA=${DATA:?set DATA to your training file, e.g. DATA=conversations.json}
FORMAT=${FORMAT:-airoboros_chat}
OUT=${OUT:-runs/llama-2-13b-full}
NGPUS=${NGPUS:-8}
PYTHON=${PYTHON:-python}

ARGS=(
  --model_name_or_path "$MODEL" --dataset "$DATA" --dataset_format "$FORMAT"
  --output_dir "$OUT" --working_dir "$OUT/work"
  --full_finetune --bits 16 --bf16 --deepspeed configs/deepspeed-zero3.json --gradient_checkpointing
  --attn_implementation flash_attention_2
  --model_max_len 4096 --per_device_train_batch_size 4 --gradient_accumulation_steps 3
  --num_train_epochs 3 --learning_rate 1e-5 --lr_scheduler_type cosine --warmup_ratio 0.01 --weight_decay 0.0
  --optim adamw_torch --eval_dataset_size 0.02 --eval_strategy steps --eval_steps 25
  --save_strategy steps --save_steps 25 --save_total_limit 1 --logging_steps 1
  --data_seed 11422 --seed 11422 --dataloader_num_workers 3
  --report_to "${REPORT_TO:-wandb}"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exec "$PYTHON" train.py "${ARGS[@]}" --dry_run --dry_run_world_size "$NGPUS"
fi
exec "$PYTHON" -m torch.distributed.run --nnodes=1 --nproc_per_node="$NGPUS" train.py "${ARGS[@]}"
