#!/usr/bin/env bash
# Llama-2-13B full fine-tune across NNODES nodes x 8 GPUs (default 2 x 8 = 16), torchrun with c10d rendezvous +
# DeepSpeed ZeRO-3. Run this same script on EVERY node; OUT must be on storage all nodes share (checkpoints are
# written by every rank, the final model by rank 0), DATA readable on every node.
#
# Prerequisites: as scripts/llama-2-13b-full.sh, on every node, plus: MASTER_ADDR = a hostname/IP of node 0 that
#   all nodes reach; MASTER_PORT open between nodes (default 29500); RUN_ID the same on every node (a job id);
#   NCCL over the cluster network (set NCCL_SOCKET_IFNAME if the default interface is wrong).
# Memory: ~25.2 GiB per GPU estimated by the dry run at 4 x 4096 tokens with checkpointing.
# Batch arithmetic: 4 per GPU x 2 accumulation x 8 GPUs x 2 nodes = global batch: 128 samples per optimizer step,
#   at most 128 x 4096 = 524,288 tokens per step; steps per epoch = ceil(ceil(N / 4 / 16) / 2) for N samples
#   (10,000 samples: 79 per epoch, 237 for 3 epochs).
# Usage (each node):  MASTER_ADDR=node0 RUN_ID=job42 DATA=/shared/conversations.json OUT=/shared/runs/13b \
#                       scripts/multinode-llama-2-13b-full.sh
#          DRY_RUN=1 DATA=conversations.json scripts/multinode-llama-2-13b-full.sh   # plan, no launch
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-meta-llama/Llama-2-13b-hf}
DATA=${DATA:?set DATA to your training file, e.g. DATA=/shared/conversations.json}
FORMAT=${FORMAT:-airoboros_chat}
OUT=${OUT:-runs/llama-2-13b-multinode}
NNODES=${NNODES:-2}
NGPUS=${NGPUS:-8}
PYTHON=${PYTHON:-python}

ARGS=(
  --model_name_or_path "$MODEL" --dataset "$DATA" --dataset_format "$FORMAT"
  --output_dir "$OUT" --working_dir "$OUT/work"
  --full_finetune --bits 16 --bf16 --deepspeed configs/deepspeed-zero3.json --gradient_checkpointing
  --attn_implementation flash_attention_2
  --model_max_len 4096 --per_device_train_batch_size 4 --gradient_accumulation_steps 2
  --num_train_epochs 3 --learning_rate 1e-5 --lr_scheduler_type cosine --warmup_ratio 0.01 --weight_decay 0.0
  --eval_dataset_size 0.02 --eval_strategy steps --eval_steps 25
  --save_strategy steps --save_steps 25 --save_total_limit 1 --logging_steps 1 --seed 11422
  --report_to "${REPORT_TO:-wandb}"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exec "$PYTHON" train.py "${ARGS[@]}" --dry_run --dry_run_world_size "$((NNODES * NGPUS))"
fi
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address (the same on every node)}"
: "${RUN_ID:?set RUN_ID to one job id shared by every node}"
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NGPUS" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="$RUN_ID" \
  train.py "${ARGS[@]}"
