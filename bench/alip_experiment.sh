#!/usr/bin/env bash
# ALIP vs CLIP at raw-caption noise p = 0 / 0.3 / 0.6, seeds 0 and 1 (issue 11; docs/methods/alip.md,
# "Controlled experiment"). Equal compute: the same recipe (alip-shapes: tiny-shapes' model, lr,
# schedule), STEPS steps at batch 64, the same end-of-run evaluation, for every arm:
#   clip          CLIP on the raw captions only (the paper's baseline): captions = "raw", objective.terms = [clip]
#   alip          ALIP: raw + synthetic caption, the gates on
#   alip-nogates  ALIP with gates = false: raw + synthetic caption, every weight 1 (the extra caption without the gating)
#
#   PY=/path/to/python bash bench/alip_experiment.sh RUNS_DIR            then: python bench/alip_table.py RUNS_DIR
#   SEEDS="2" bash bench/alip_experiment.sh RUNS_DIR                      only these seeds, every arm
#
# Each run holds /tmp/cpu.lock while it trains (one CPU-heavy job at a time on a shared machine); its wall
# time, measured inside the lock (so without the wait for it), goes to RUNS_DIR/<run>.seconds. A run whose
# metrics.jsonl holds its end-of-run evaluation is kept, so the script can be rerun after an interruption.
# Seed 1 of the gates-off arm runs last (the first to drop when time is short).
set -euo pipefail
RUNS=${1:?usage: bench/alip_experiment.sh RUNS_DIR}
STEPS=${STEPS:-500}
BATCH=${BATCH:-64}
PY=${PY:-python}
mkdir -p "$RUNS"

run() {  # arm seed noise [--set ...]
  local arm=$1 seed=$2 p=$3; shift 3
  local dir="$RUNS/$arm-p$p-s$seed"
  if grep -qs "zeroshot/unseen/acc1" "$dir/metrics.jsonl"; then echo "kept $dir"; return 0; fi
  rm -rf "$dir"
  echo "$(date +%T) start $dir"
  flock /tmp/cpu.lock "$BASH" -c '
    t0=$(date +%s.%N)
    "$0" -m clipforge train alip-shapes --run-dir "$1" "${@:2}"; rc=$?
    awk -v a="$t0" -v b="$(date +%s.%N)" "BEGIN { printf \"%.1f\n\", b - a }" > "$1.seconds"
    exit $rc' "$PY" "$dir" \
    --set train.steps="$STEPS" --set data.batch_size="$BATCH" \
    --set data.seed="$seed" --set train.seed="$seed" \
    --set eval.every_steps=none --set eval.at_end=true --set train.checkpoint_every_steps="$STEPS" \
    --set data.shapes.raw_caption_noise="$p" "$@" > "$dir.log" 2>&1 \
    || { echo "$(date +%T) FAILED $dir (see $dir.log)"; return 0; }
  echo "$(date +%T) done  $dir ($(cat "$dir.seconds") s)"
}

arms() {  # seed [arm ...]
  local seed=$1; shift
  for p in 0 0.3 0.6; do
    for arm in "$@"; do
      case $arm in
        clip) run clip "$seed" "$p" --set data.shapes.captions=raw --set 'objective.terms=[{name="clip"}]' ;;
        alip) run alip "$seed" "$p" ;;
        alip-nogates) run alip-nogates "$seed" "$p" --set 'objective.terms=[{name="alip",gates=false}]' ;;
      esac
    done
  done
}

if [ -n "${SEEDS:-}" ]; then
  for s in $SEEDS; do arms "$s" clip alip alip-nogates; done
  exit 0
fi
arms 0 clip alip alip-nogates
arms 1 clip alip
arms 1 alip-nogates
