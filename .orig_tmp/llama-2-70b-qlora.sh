#!/usr/bin/env bash
# Llama-2-70B QLoRA: one node, 8 x 80 GB GPUs, accelerate (data parallel; each GPU holds the whole 4-bit model),
# LoRA r 64 on every linear layer, merged into a bf16 model at the end (MERGED, ~138 GB on disk; the merge streams
# shard by shard on rank 0).
#
# Prerequisites: `make install` plus `pip install -r requirements-gpu.txt --no-build-isolation` (flash-attn);
#   MODEL = hub id or local dir (gated on the hub: export HF_TOKEN); DATA = your training file; WANDB_API_KEY for
#   wandb (or REPORT_TO=none). Fewer or smaller GPUs: shard the 4-bit model with
#   --deepspeed configs/deepspeed-zero3.json --quant_storage bfloat16 instead.
# Memory: ~61.2 GiB per GPU estimated by the dry run at 2 x 4096 tokens with checkpointing.
# Batch arithmetic: 2 per GPU x 4 accumulation x 8 GPUs = global batch: 64 samples per optimizer step,
#   at most 64 x 4096 = 262,144 tokens per step; steps per epoch = ceil(ceil(N / 2 / 8) / 4) for N samples
#   (10,000 samples: 157 per epoch, 785 for 5 epochs).
# Usage:   DATA=conversations.json scripts/llama-2-70b-qlora.sh
#          DRY_RUN=1 DATA=conversations.json scripts/llama-2-70b-qlora.sh   # validate, print the plan, train nothing
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-meta-llama/Llama-2-70b-hf}
DATA=${DATA:?set DATA to your training file, e.g. DATA=conversations.json}
FORMAT=${FORMAT:-airoboros_chat}
OUT=${OUT:-runs/llama-2-70b-qlora}
MERGED=${MERGED:-$OUT-merged}
NGPUS=${NGPUS:-8}
PYTHON=${PYTHON:-python}

ARGS=(
  --model_name_or_path "$MODEL" --dataset "$DATA" --dataset_format "$FORMAT"
  --output_dir "$OUT" --working_dir "$OUT/work" --merged_output_dir "$MERGED"
  --bits 4 --double_quant --quant_type nf4 --bf16 --lora_r 64 --lora_alpha 16 --lora_modules all --lora_dropout 0.0
  --gradient_checkpointing --attn_implementation flash_attention_2 --ddp_find_unused_parameters False
  --model_max_len 4096 --per_device_train_batch_size 2 --gradient_accumulation_steps 4
  --num_train_epochs 5 --learning_rate 0.00008 --lr_scheduler_type constant --adam_beta2 0.999 --max_grad_norm 0.3
  --weight_decay 0.0 --eval_dataset_size 0.01 --eval_strategy steps --eval_steps 75 --per_device_eval_batch_size 2
  --save_strategy steps --save_steps 75 --save_total_limit 3 --logging_steps 1
  --data_seed 11422 --seed 11422 --dataloader_num_workers 3 --max_new_tokens 4096
  --report_to "${REPORT_TO:-wandb}"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exec "$PYTHON" train.py "${ARGS[@]}" --dry_run --dry_run_world_size "$NGPUS"
fi
exec "$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$NGPUS" train.py "${ARGS[@]}"
