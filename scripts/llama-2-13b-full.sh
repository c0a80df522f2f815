#!/usr/bin/env bash
# Llama-2-13B full fine-tune: one node, 8 x 80 GB GPUs, torchrun + DeepSpeed ZeRO-3 (configs/deepspeed-zero3.json).
# Recipe: configs/recipes/llama-2-13b-full.yaml (settings, memory and batch arithmetic are in its header)
# Env: MODEL (hub id or local dir), DATA (training file, required), FORMAT, OUT, NGPUS, REPORT_TO, PYTHON, DRY_RUN.
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

FLAGS=(
  --model_name_or_path "$MODEL" --dataset "$DATA" --dataset_format "$FORMAT"
  --output_dir "$OUT" --working_dir "$OUT/work"
  --report_to "${REPORT_TO:-wandb}"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exec "$PYTHON" train.py configs/recipes/llama-2-13b-full.yaml "${FLAGS[@]}" --dry_run --dry_run_world_size "$NGPUS"
fi
exec "$PYTHON" -m torch.distributed.run --nnodes=1 --nproc_per_node="$NGPUS" \
  train.py configs/recipes/llama-2-13b-full.yaml "${FLAGS[@]}"
