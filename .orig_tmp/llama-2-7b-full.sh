#!/usr/bin/env bash
# Llama-2-7B full fine-tune: one node, 8 x 80 GB GPUs (A100/H100), torchrun + DeepSpeed ZeRO-2 (deepspeed-7b.json).
#
# Prerequisites: `make install` plus `pip install -r requirements-gpu.txt --no-build-isolation` (flash-attn);
#   MODEL = hub id or local dir (gated on the hub: export HF_TOKEN); DATA = your training file; WANDB_API_KEY for
#   wandb (or REPORT_TO=none).
# Memory: ~53.6 GiB per GPU estimated by the dry run (weights 12.6 + grads 1.6 + optimizer 9.4 + activations 30.1 at
#   12 x 4096 tokens with checkpointing); lower MICRO_BATCH for 40 GB cards.
# Batch arithmetic: 12 per GPU x 1 accumulation x 8 GPUs = global batch: 96 samples per optimizer step,
#   at most 96 x 4096 = 393,216 tokens per step; steps per epoch = ceil(N / 96) for N samples
#   (10,000 samples: 105 per epoch, 525 for the 5 epochs).
# Usage:   DATA=conversations.json scripts/llama-2-7b-full.sh
#          DRY_RUN=1 DATA=conversations.json scripts/llama-2-7b-full.sh   # validate, print the plan, train nothing
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
DATA=${DATA:?set DATA to your training file, e.g. DATA=conversations.json}
FORMAT=${FORMAT:-airoboros_chat}
OUT=${OUT:-runs/llama-2-7b-full}
NGPUS=${NGPUS:-8}
MICRO_BATCH=${MICRO_BATCH:-12}
PYTHON=${PYTHON:-python}

ARGS=(
  --model_name_or_path "$MODEL" --dataset "$DATA" --dataset_format "$FORMAT"
  --output_dir "$OUT" --working_dir "$OUT/work"
  --full_finetune --bits 16 --bf16 --deepspeed deepspeed-7b.json --gradient_checkpointing
  --attn_implementation flash_attention_2
  --model_max_len 4096 --per_device_train_batch_size "$MICRO_BATCH" --gradient_accumulation_steps 1
  --num_train_epochs 5 --learning_rate 2e-5 --lr_scheduler_type cosine --warmup_ratio 0.005 --weight_decay 0.0
  --optim adamw_torch --eval_dataset_size 0.02 --eval_strategy steps --eval_steps 5
  --save_strategy steps --save_steps 15 --save_total_limit 1 --logging_steps 1
  --data_seed 11422 --seed 11422 --dataloader_num_workers 3 --max_new_tokens 4096
  --report_to "${REPORT_TO:-wandb}"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exec "$PYTHON" train.py "${ARGS[@]}" --dry_run --dry_run_world_size "$NGPUS"
fi
exec "$PYTHON" -m torch.distributed.run --nnodes=1 --nproc_per_node="$NGPUS" train.py "${ARGS[@]}"
