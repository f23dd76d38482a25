#!/usr/bin/env bash
# Does train.bf16_residual change what a run learns? tiny-shapes (the demo recipe: 1,000 steps, batch 128),
# seeds 0, 1, 2, three arms at equal compute; only the arithmetic differs:
#   fp32      train.precision = fp32
#   amp       train.precision = bf16 (autocast; the residual stream stays float32: the default)
#   bf16res   train.precision = bf16, train.bf16_residual = true
#
#   PY=/path/to/python bash bench/bf16_residual_experiment.sh RUNS_DIR     then: python bench/bf16_residual_table.py RUNS_DIR
#
# Each run holds /tmp/cpu.lock while it trains; a run whose metrics.jsonl holds its end-of-run evaluation
# is kept, so the script can be rerun after an interruption.
set -euo pipefail
RUNS=${1:?usage: bench/bf16_residual_experiment.sh RUNS_DIR}
PY=${PY:-python}
mkdir -p "$RUNS"

run() {  # arm seed [--set ...]
  local arm=$1 seed=$2; shift 2
  local dir="$RUNS/$arm-s$seed"
  if grep -qs "zeroshot/unseen/acc1" "$dir/metrics.jsonl"; then echo "kept $dir"; return 0; fi
  rm -rf "$dir"
  echo "$(date +%T) start $dir"
  flock /tmp/cpu.lock "$PY" -m clipforge train tiny-shapes --run-dir "$dir" \
    --set data.seed="$seed" --set train.seed="$seed" --set eval.every_steps=none --set eval.at_end=true \
    --set train.checkpoint_every_steps=1000 "$@" > "$dir.log" 2>&1 \
    || { echo "$(date +%T) FAILED $dir (see $dir.log)"; return 0; }
  echo "$(date +%T) done  $dir"
}

for seed in 0 1 2; do
  run fp32 "$seed" --set train.precision=fp32
  run amp "$seed" --set train.precision=bf16
  run bf16res "$seed" --set train.precision=bf16 --set train.bf16_residual=true
done
