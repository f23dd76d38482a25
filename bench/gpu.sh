#!/usr/bin/env bash
# GPU throughput and MFU of the trainer's step vs OpenCLIP (see bench/gpu.py); under 8 minutes on one H100.
#   bash bench/gpu.sh                        # JSON into $OUT (device tool) or bench-out/
#   bash bench/gpu.sh --device cpu --tiny    # smoke test on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
"$PY" -c "import clipforge, open_clip" 2>/dev/null || "$PY" -m pip install -q -e '.[bench]'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" bench/gpu.py "$@"
