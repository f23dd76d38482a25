#!/usr/bin/env bash
# FILIP vs CLIP at equal steps, seeds given (docs/methods/filip.md, "Controlled experiment"). Both arms
# train filip-shapes (tiny-shapes' model at 64 px, half the scenes with two objects), STEPS steps at batch
# 64, lr 2e-3 cosine with 40 warm-up steps; the only difference is the loss term:
#   filip   objective.terms = [filip]     (token-wise late interaction)
#   clip    objective.terms = [clip]
# then each checkpoint is evaluated the same way: zero-shot on shapes:seen / shapes:unseen and the
# binding split, each with pooled and with late-interaction scores (clipforge eval --similarity).
#
#   PY=/path/to/python bash bench/filip_experiment.sh RUNS_DIR "0 1 2"      then: python bench/filip_table.py RUNS_DIR
#
# Each run and evaluation holds /tmp/cpu.lock (one CPU-heavy job at a time on a shared machine). A run
# whose metrics.jsonl holds its end-of-run evaluation is kept, so the script can be rerun after an interruption.
set -euo pipefail
RUNS=${1:?usage: bench/filip_experiment.sh RUNS_DIR "SEEDS"}
SEEDS=${2:-"0 1"}
STEPS=${STEPS:-1000}
PY=${PY:-python}
mkdir -p "$RUNS"

for seed in $SEEDS; do
  for arm in filip clip; do
    dir="$RUNS/$arm-s$seed"
    if ! grep -qs "zeroshot/unseen/acc1" "$dir/metrics.jsonl"; then
      rm -rf "$dir"
      echo "$(date +%T) train $dir"
      flock /tmp/cpu.lock "$PY" -m clipforge train filip-shapes --run-dir "$dir" \
        --set train.steps="$STEPS" --set data.batch_size=64 --set schedule.warmup_steps=40 \
        --set eval.every_steps=500 --set train.seed="$seed" --set data.seed="$seed" \
        --set "objective.terms=[{name=\"$arm\"}]" > "$dir.log" 2>&1
    fi
    for sim in pooled late-interaction; do
      for split in seen unseen; do
        flock /tmp/cpu.lock "$PY" -m clipforge eval "$dir" --task zeroshot --data "shapes:$split" \
          --similarity "$sim" --batch-size 256 --no-plots --out "${dir}_zs_${split}_${sim}.json" > /dev/null
      done
      flock /tmp/cpu.lock "$PY" -m clipforge eval "$dir" --task retrieval --data shapes:binding \
        --similarity "$sim" --out "${dir}_binding_${sim}.json" > /dev/null
    done
    echo "$(date +%T) done  $dir"
  done
done
