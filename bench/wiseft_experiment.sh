#!/usr/bin/env bash
# WiSE-FT with `clipforge merge` (docs/evaluation.md, "Weight-space ensembles"): a zero-shot model, its
# fine-tuned version, and their weight-space interpolations, evaluated on the fine-tuning distribution
# and on what the zero-shot model was trained for.
#   bash bench/wiseft_experiment.sh SPLIT_DIR RUNS_DIR "0 1 2"      then: python bench/wiseft_table.py RUNS_DIR
# SPLIT_DIR from: python examples/cifar_holdout_split.py CIFAR/train SPLIT_DIR --holdout 500
# Per seed S (train.seed = data.seed = S):
#   zs-sS   the demo recipe (tiny-shapes: ViT 6 x 192 at 32 px, 1000 steps, lr 2e-3) on the built-in shapes
#   ft-sS   fine-tuned from zs-sS on CIFAR-10 train (captions "a photo of a {class}."), the same CLIP loss
#           (fine-tune like you pretrain), FT_STEPS (300) steps, lr FT_LR (1e-4) cosine, 20 warm-up steps, batch 128
#   wise-sS-A   clipforge merge zs-sS ft-sS --alpha A, for A in ALPHAS (0 = zs, 1 = ft)
# each evaluated zero-shot on CIFAR-10 val (500 per class, never trained on) and on shapes:seen / shapes:unseen.
# ZS_RUNS=DIR takes the zero-shot models from another runs dir (the same recipe: a second fine-tuning setting).
# Each run and evaluation holds /tmp/cpu.lock (one CPU-heavy job at a time on a shared 2-core machine).
set -euo pipefail
SPLIT=${1:?split dir}; RUNS=${2:?runs dir}; SEEDS=${3:-"0 1 2"}
ALPHAS=${ALPHAS:-"0 0.25 0.5 0.75 1"}
FT_LR=${FT_LR:-1e-4}; FT_STEPS=${FT_STEPS:-300}; ZS_RUNS=${ZS_RUNS:-$RUNS}
CF="${PY:-python} -m clipforge"
mkdir -p "$RUNS"
train() {  # dir log args...
  local dir=$1; shift
  [ -f "$dir/checkpoints/latest/model.safetensors" ] && return 0
  rm -rf "$dir"
  flock /tmp/cpu.lock $CF train "$@" --run-dir "$dir" > "$dir.log" 2>&1
}
for seed in $SEEDS; do
  zs="$ZS_RUNS/zs-s$seed"; ft="$RUNS/ft-s$seed"
  train "$zs" tiny-shapes --set train.seed=$seed --set data.seed=$seed --set eval.at_end=false
  train "$ft" tiny-shapes --set "model.init_from=$zs/checkpoints/latest" --set "data.train=imagefolder:$SPLIT/train" \
      --set train.steps=$FT_STEPS --set optim.lr=$FT_LR --set schedule.warmup_steps=20 --set eval.at_end=false \
      --set eval.every_steps=none --set train.checkpoint_every_steps=$FT_STEPS --set train.seed=$seed --set data.seed=$seed
  for a in $ALPHAS; do
    w="$RUNS/wise-s$seed-$a"
    [ -f "$w/eval-unseen.json" ] && continue
    rm -rf "$w"
    $CF merge "$zs" "$ft" --alpha "$a" --out "$w" > /dev/null
    flock /tmp/cpu.lock $CF eval "$w" --task zeroshot --data "imagefolder:$SPLIT/val" --out "$w/eval-cifar.json" > /dev/null
    flock /tmp/cpu.lock $CF eval "$w" --task zeroshot --data shapes:seen --out "$w/eval-seen.json" > /dev/null
    flock /tmp/cpu.lock $CF eval "$w" --task zeroshot --data shapes:unseen --out "$w/eval-unseen.json" > /dev/null
  done
done
