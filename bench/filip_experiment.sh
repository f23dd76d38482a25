#!/usr/bin/env bash
# FILIP vs CLIP at equal steps, seeds given (docs/methods/filip.md, "Controlled experiment"). Both arms
# train filip-shapes (tiny-shapes' model at 64 px, half the scenes with two objects), STEPS steps at batch
# 64, lr 2e-3 cosine with 40 warm-up steps; the only difference is the loss term:
#   filip   objective.terms = [filip]     (token-wise late interaction)
#   clip    objective.terms = [clip]
# and, for FILIP's token reduction before the all-gather (both on 2 gloo ranks, `--nproc 2`, the same global batch):
#   filip-2r      filip on 2 ranks of 32 (global batch 64), every token gathered (the same loss as one process)
#   filip-keep25  the same, each rank sending each sample's best-matched 25 % of its tokens (token_keep = 0.25)
# then each checkpoint is evaluated the same way: zero-shot on shapes:seen / shapes:unseen and the
# binding split, each with pooled and with late-interaction scores (clipforge eval --similarity).
#
#   PY=/path/to/python bash bench/filip_experiment.sh RUNS_DIR "0 1 2"      then: python bench/filip_table.py RUNS_DIR
#   ARMS="filip-2r filip-keep25" STEPS=400 BINDING=0 PY=... bash bench/filip_experiment.sh RUNS_DIR "0 1 2"
#
# Each run and evaluation holds /tmp/cpu.lock (one CPU-heavy job at a time on a shared machine). A run
# whose metrics.jsonl holds its end-of-run evaluation is kept, so the script can be rerun after an interruption.
set -euo pipefail
RUNS=${1:?usage: bench/filip_experiment.sh RUNS_DIR "SEEDS"}
SEEDS=${2:-"0 1"}
STEPS=${STEPS:-1000}
ARMS=${ARMS:-"filip clip"}
BINDING=${BINDING:-1}
PY=${PY:-python}
mkdir -p "$RUNS"

for seed in $SEEDS; do
  for arm in $ARMS; do
    case $arm in
      filip|clip) extra=(--set data.batch_size=64 --set "objective.terms=[{name=\"$arm\"}]") ;;
      # data.batch_size is per process: 2 x 32 = the same global batch of 64
      filip-2r) extra=(--nproc 2 --set data.batch_size=32 --set 'objective.terms=[{name="filip"}]') ;;
      filip-keep25) extra=(--nproc 2 --set data.batch_size=32 --set 'objective.terms=[{name="filip", token_keep=0.25}]') ;;
      *) echo "unknown arm $arm"; exit 1 ;;
    esac
    dir="$RUNS/$arm-s$seed"
    if ! grep -qs "zeroshot/unseen/acc1" "$dir/metrics.jsonl"; then
      rm -rf "$dir"
      echo "$(date +%T) train $dir"
      flock /tmp/cpu.lock "$PY" -m clipforge train filip-shapes --run-dir "$dir" \
        --set train.steps="$STEPS" --set schedule.warmup_steps=40 \
        --set eval.every_steps=500 --set train.seed="$seed" --set data.seed="$seed" "${extra[@]}" > "$dir.log" 2>&1
    fi
    for sim in pooled late-interaction; do
      for split in seen unseen; do
        flock /tmp/cpu.lock "$PY" -m clipforge eval "$dir" --task zeroshot --data "shapes:$split" \
          --similarity "$sim" --batch-size 256 --no-plots --out "${dir}_zs_${split}_${sim}.json" > /dev/null
      done
      if [ "$BINDING" = 1 ]; then
        flock /tmp/cpu.lock "$PY" -m clipforge eval "$dir" --task retrieval --data shapes:binding \
          --similarity "$sim" --out "${dir}_binding_${sim}.json" > /dev/null
      fi
    done
    echo "$(date +%T) done  $dir"
  done
done
