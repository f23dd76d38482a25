#!/usr/bin/env bash
# The device machine's one call (see docs/performance.md): bench/gpu.sh, then the CUDA-only tests.
# Runs from the repository root with the carried wheels in .whl/ (pydantic, open_clip_torch, ftfy, ...).
#   bash bench/gpu_run.sh "<gpu.sh arguments>"
#   BENCH_TIMEOUT=480 TEST_TIMEOUT=120 TESTS="sync_free or compiled" TEST_FILES=tests/test_perf_paths.py \
#     FIRST="" FIRST_TIMEOUT=150 ATTENTION_CASE="" bash bench/gpu_run.sh "..."   # the defaults
set -uo pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT" /tmp/gpuout
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 PYTHON=python3
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
# FIRST: a command run before the benchmark, e.g. FIRST="python3 bench/fused_mlp.py --out \$OUT/fused_mlp.json"
if [ -n "${FIRST:-}" ]; then
  timeout "${FIRST_TIMEOUT:-150}" bash -c "$FIRST" 2>&1 | tee "$OUT/first.txt"
fi
# ATTENTION_CASE: when FIRST wrote $OUT/attention.json (bench/attention_backends.py) and a kernel beat
# PyTorch's choice there, also time ATTENTION_CASE with that kernel (train.attention_backend)
EXTRA=""
if [ -n "${ATTENTION_CASE:-}" ] && [ -f "$OUT/attention.json" ]; then
  EXTRA=$(python3 bench/attention_backends.py --suggest "$OUT/attention.json" --case "$ATTENTION_CASE")
  echo "attention case: ${EXTRA:-none, the default kernel was fastest}" | tee -a "$OUT/first.txt"
fi
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-480}" bash bench/gpu.sh --out /tmp/gpuout $1 ${EXTRA:+--also-cases "$EXTRA"} 2>&1 | tee "$OUT/log.txt"
tar czf "$OUT/gpu.tgz" -C /tmp/gpuout .
timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider ${TEST_FILES:-tests/test_perf_paths.py} -k "${TESTS:-sync_free or compiled}" 2>&1 | tail -5 | tee "$OUT/pytest.txt"
