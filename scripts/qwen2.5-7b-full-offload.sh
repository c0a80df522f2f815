#!/usr/bin/env bash
# Qwen2.5-7B full fine-tune on 4 x 48 GB GPUs (A6000/L40S), DeepSpeed ZeRO-3 with CPU offload (~130 GB host RAM).
# Recipe: configs/recipes/qwen2.5-7b-full-offload.yaml (settings, memory and batch arithmetic are in its header)
# Env: MODEL (hub id or local dir), DATA (training file, required), FORMAT (default chatml), OUT, NGPUS, REPORT_TO,
#   PYTHON, DRY_RUN.
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

FLAGS=(
  --model_name_or_path "$MODEL" --dataset "$DATA" --dataset_format "$FORMAT"
  --output_dir "$OUT" --working_dir "$OUT/work"
  --report_to "${REPORT_TO:-wandb}"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exec "$PYTHON" train.py configs/recipes/qwen2.5-7b-full-offload.yaml "${FLAGS[@]}" \
    --dry_run --dry_run_world_size "$NGPUS"
fi
exec "$PYTHON" -m torch.distributed.run --nnodes=1 --nproc_per_node="$NGPUS" \
  train.py configs/recipes/qwen2.5-7b-full-offload.yaml "${FLAGS[@]}"
