#!/usr/bin/env bash
# Llama-2-70B QLoRA: one node, 8 x 80 GB GPUs, accelerate (data parallel), merged into a bf16 model at the end.
# Recipe: configs/recipes/llama-2-70b-qlora.yaml (settings, memory and batch arithmetic are in its header)
# Env: MODEL (hub id or local dir), DATA (training file, required), FORMAT, OUT, MERGED (merged model, default
#   $OUT-merged), NGPUS, REPORT_TO, PYTHON, DRY_RUN.
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

FLAGS=(
  --model_name_or_path "$MODEL" --dataset "$DATA" --dataset_format "$FORMAT"
  --output_dir "$OUT" --working_dir "$OUT/work" --merged_output_dir "$MERGED"
  --report_to "${REPORT_TO:-wandb}"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exec "$PYTHON" train.py configs/recipes/llama-2-70b-qlora.yaml "${FLAGS[@]}" --dry_run --dry_run_world_size "$NGPUS"
fi
exec "$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$NGPUS" \
  train.py configs/recipes/llama-2-70b-qlora.yaml "${FLAGS[@]}"
