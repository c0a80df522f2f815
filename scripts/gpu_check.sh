#!/usr/bin/env bash
# GPU check: one H100/H200, under 8 minutes. Installs what it needs, then runs scripts/gpu_check.py, which prints
# a table (flash-attention packed vs length-grouped real tokens/s and MFU on a ~1.2 B random Llama; QLoRA nf4 +
# double-quant tokens/s and peak CUDA memory vs the --dry_run estimate; chunked vs plain loss memory) and writes
# gpu_check.json. Every part is required: a missing GPU, package or kernel stops it with exit 1, nothing is skipped.
#
#   bash scripts/gpu_check.sh [WHEEL_DIR] [-- gpu_check.py flags, e.g. --steps 20 --out DIR]
#
# WHEEL_DIR: install from these wheels only (pip --no-index --find-links), for machines with no package index.
# It must hold the non-torch pins of requirements.txt, bitsandbytes (its PyPI wheel carries the CUDA kernels) and
# a flash-attn wheel built for this machine's torch, CUDA and Python (flash-attn's GitHub releases, or
# `pip wheel flash-attn --no-build-isolation` on a machine with nvcc, which takes about an hour).
# The machine's own CUDA torch is kept: requirements.txt's torch pin is the CPU/CI one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }

WHEELS=""
if [[ $# -gt 0 && "$1" != "--" ]]; then WHEELS="$1"; shift; fi
[[ "${1:-}" == "--" ]] && shift

command -v nvidia-smi >/dev/null 2>&1 || fail "no nvidia-smi: this check needs an NVIDIA GPU (H100/H200)"
nvidia-smi -L || fail "nvidia-smi found no GPU"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || fail "$PY's torch has no CUDA device (install a CUDA build of torch first)"

PIP=("$PY" -m pip install -q --disable-pip-version-check)
if [[ -n "$WHEELS" ]]; then
  [[ -d "$WHEELS" ]] || fail "wheel folder $WHEELS does not exist"
  PIP+=(--no-index --find-links "$WHEELS")
fi
grep -v '^torch==' requirements.txt | grep -v '^#' > /tmp/gpu_check_requirements.txt
"${PIP[@]}" -r /tmp/gpu_check_requirements.txt || fail "installing requirements.txt (without torch) failed"
"${PIP[@]}" bitsandbytes flash-attn --no-build-isolation || fail "installing bitsandbytes and flash-attn failed"
"${PIP[@]}" --no-deps --no-build-isolation -e . || fail "installing this project failed"
"$PY" - <<'EOF' || fail "a CUDA kernel the check needs does not load (see above)"
import torch, bitsandbytes, flash_attn
from flash_attn import flash_attn_varlen_func  # the kernel packed rows use
x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
bitsandbytes.functional.quantize_4bit(x, quant_type="nf4")  # bitsandbytes' CUDA backend, not its CPU one
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"bitsandbytes {bitsandbytes.__version__}, flash-attn {flash_attn.__version__}")
EOF
exec env HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false "$PY" scripts/gpu_check.py "$@"
