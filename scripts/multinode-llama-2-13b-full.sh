#!/usr/bin/env bash
# Llama-2-13B full fine-tune across NNODES nodes x 8 GPUs (default 2 x 8 = 16), torchrun c10d + DeepSpeed ZeRO-3.
# Recipe: configs/recipes/multinode-llama-2-13b-full.yaml (settings, memory and batch arithmetic are in its header)
# Run this same script on EVERY node; OUT must be on storage all nodes share, DATA readable on every node.
# Env: MODEL (hub id or local dir), DATA (training file, required), FORMAT, OUT, NNODES, NGPUS (per node),
#   MASTER_ADDR and RUN_ID (required to launch), MASTER_PORT (default 29500), REPORT_TO, PYTHON, DRY_RUN.
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

FLAGS=(
  --model_name_or_path "$MODEL" --dataset "$DATA" --dataset_format "$FORMAT"
  --output_dir "$OUT" --working_dir "$OUT/work"
  --report_to "${REPORT_TO:-wandb}"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exec "$PYTHON" train.py configs/recipes/multinode-llama-2-13b-full.yaml "${FLAGS[@]}" \
    --dry_run --dry_run_world_size "$((NNODES * NGPUS))"
fi
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0 (the same on every node)}"
: "${RUN_ID:?set RUN_ID to one job id shared by every node}"
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NGPUS" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="$RUN_ID" \
  train.py configs/recipes/multinode-llama-2-13b-full.yaml "${FLAGS[@]}"
