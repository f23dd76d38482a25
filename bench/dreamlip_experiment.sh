#!/usr/bin/env bash
# DreamLIP vs CLIP on the same long captions, seeds and ablations (docs/methods/dreamlip.md).
#   bash bench/dreamlip_experiment.sh RUNS_DIR "SEEDS"     e.g. bash bench/dreamlip_experiment.sh runs/dl "0 1"
# Each run holds /tmp/cpu.lock (one CPU-heavy job at a time on a shared 2-core machine); finished runs are kept.
set -euo pipefail
RUNS=${1:?runs dir}; SEEDS=${2:-"0 1"}
CF="python -m clipforge"
mkdir -p "$RUNS"
run() {  # name seed recipe overrides...
  local name=$1 seed=$2 recipe=$3; shift 3
  local dir="$RUNS/$name-s$seed"
  [ -f "$dir/checkpoints/latest/model.safetensors" ] && return 0
  rm -rf "$dir"
  flock /tmp/cpu.lock $CF train "$recipe" --run-dir "$dir" --set train.steps=150 --set data.batch_size=64 \
    --set data.seed=$seed --set train.seed=$seed --set eval.every_steps=150 --set train.checkpoint_every_steps=150 \
    --set model.context_length=32 --set data.shapes.two_objects_prob=0.3 --set data.shapes.textured_background_prob=0.5 \
    "$@" > "$dir.log" 2>&1
}
for s in $SEEDS; do
  run dreamlip $s dreamlip-shapes
  run cliplong $s tiny-shapes --set data.shapes.captions=long
  run clipsent $s tiny-shapes --set data.shapes.captions=long --set data.sub_captions=1 --set data.sub_caption_raw=false
  # ablations: DreamLIP without the raw caption among its texts; DreamLIP without the grouping term
  run dreamlip-noraw $s dreamlip-shapes --set data.sub_caption_raw=false
  run dreamlip-nogroup $s dreamlip-shapes --set 'objective.terms=[{name="clip"}]'
done
flock /tmp/cpu.lock python bench/caption_retrieval.py "$RUNS"/*-s[0-9] > "$RUNS/retrieval.json"
