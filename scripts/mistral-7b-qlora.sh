#!/usr/bin/env bash
# Mistral-7B QLoRA on ONE 24 GB GPU (RTX 3090/4090, A10G, L4), packed rows, merged into a bf16 model at the end.
# Recipe: configs/recipes/mistral-7b-qlora.yaml (settings, memory and batch arithmetic are in its header)
# Env: MODEL (hub id or local dir), DATA (training file, required), FORMAT, OUT, MERGED (merged model, default
#   $OUT-merged), REPORT_TO, PYTHON, DRY_RUN.
# Usage:   DATA=conversations.json scripts/mistral-7b-qlora.sh
#          DRY_RUN=1 DATA=conversations.json scripts/mistral-7b-qlora.sh   # validate, print the plan, train nothing
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-mistralai/Mistral-7B-v0.1}
DATA=${DATA:?set DATA to your training file, e.g. DATA=conversations.json}
FORMAT=${FORMAT:-airoboros_chat}
OUT=${OUT:-runs/mistral-7b-qlora}
MERGED=${MERGED:-$OUT-merged}
NGPUS=1
PYTHON=${PYTHON:-python}

FLAGS=(
  --model_name_or_path "$MODEL" --dataset "$DATA" --dataset_format "$FORMAT"
  --output_dir "$OUT" --working_dir "$OUT/work" --merged_output_dir "$MERGED"
  --report_to "${REPORT_TO:-wandb}"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exec "$PYTHON" train.py configs/recipes/mistral-7b-qlora.yaml "${FLAGS[@]}" --dry_run --dry_run_world_size "$NGPUS"
fi
exec "$PYTHON" train.py configs/recipes/mistral-7b-qlora.yaml "${FLAGS[@]}"
