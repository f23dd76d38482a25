#!/usr/bin/env bash
# ALIP vs CLIP at raw-caption noise 0 / 0.3 / 0.6 (docs/methods/alip.md), equal steps and batch.
#   bash bench/alip_experiment.sh RUNS_DIR "SEEDS"      then: python bench/alip_table.py RUNS_DIR
# Arms: CLIP on the raw captions only (the paper's baseline); ALIP (raw + synthetic, gates);
# ALIP with gates off (raw + synthetic, unweighted: separates the extra caption from the gating).
# Each run holds /tmp/cpu.lock (one CPU-heavy job at a time on a shared 2-core machine); finished runs are kept.
set -euo pipefail
RUNS=${1:?runs dir}; SEEDS=${2:-"0 1"}; STEPS=${STEPS:-300}
CF="python -m clipforge"
mkdir -p "$RUNS"
run() {  # name seed noise overrides...
  local name=$1 seed=$2 p=$3; shift 3
  local dir="$RUNS/$name-p$p-s$seed"
  [ -f "$dir/checkpoints/latest/model.safetensors" ] && return 0
  rm -rf "$dir"
  local start=$(date +%s)
  flock /tmp/cpu.lock $CF train alip-shapes --run-dir "$dir" --set train.steps=$STEPS --set data.batch_size=64 \
    --set data.seed=$seed --set train.seed=$seed --set eval.every_steps=none --set train.checkpoint_every_steps=$STEPS \
    --set data.shapes.raw_caption_noise=$p "$@" > "$dir.log" 2>&1
  echo $(( $(date +%s) - start )) > "$dir.seconds"
}
for s in $SEEDS; do
  for p in 0 0.3 0.6; do
    run clip $s $p --set data.shapes.captions=raw --set 'objective.terms=[{name="clip"}]'
    run alip $s $p
    run alip-nogates $s $p --set 'objective.terms=[{name="alip",gates=false}]'
  done
done
