#!/usr/bin/env bash
# Llama-3-8B QLoRA sharded with FSDP over 2 x 24 GB GPUs (accelerate + configs/accelerate-fsdp.yaml); GPU only.
# Recipe: configs/recipes/llama-3-8b-qlora-fsdp.yaml (settings, memory and batch arithmetic are in its header)
# Env: MODEL (hub id or local dir), DATA (training file, required), FORMAT (default chatml), OUT, MERGED (merged
#   model, default $OUT-merged), NGPUS, REPORT_TO, PYTHON, DRY_RUN.
# Usage:   DATA=conversations.json scripts/llama-3-8b-qlora-fsdp.sh
#          DRY_RUN=1 DATA=conversations.json scripts/llama-3-8b-qlora-fsdp.sh   # validate, print the plan
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B}
DATA=${DATA:?set DATA to your training file, e.g. DATA=conversations.json}
FORMAT=${FORMAT:-chatml}
OUT=${OUT:-runs/llama-3-8b-qlora}
MERGED=${MERGED:-$OUT-merged}
NGPUS=${NGPUS:-2}
PYTHON=${PYTHON:-python}

FLAGS=(
  --model_name_or_path "$MODEL" --dataset "$DATA" --dataset_format "$FORMAT"
  --output_dir "$OUT" --working_dir "$OUT/work" --merged_output_dir "$MERGED"
  --report_to "${REPORT_TO:-wandb}"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  ACCELERATE_USE_FSDP=true exec "$PYTHON" train.py configs/recipes/llama-3-8b-qlora-fsdp.yaml "${FLAGS[@]}" \
    --dry_run --dry_run_world_size "$NGPUS"
fi
exec "$PYTHON" -m accelerate.commands.launch --config_file configs/accelerate-fsdp.yaml --num_processes "$NGPUS" \
  train.py configs/recipes/llama-3-8b-qlora-fsdp.yaml "${FLAGS[@]}"
