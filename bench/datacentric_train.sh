#!/usr/bin/env bash
# One training run of the docs/data-centric.md experiments (tiny ViT, 32 px, patch 8, CPU):
#   bench/datacentric_train.sh RUN_DIR TRAIN_SPEC STEPS [extra --set overrides...]
# Every run uses data.seed=0, train.seed=0, batch 128, lr 2e-3 cosine, no eval during training.
set -euo pipefail
run=$1; train=$2; steps=$3; shift 3
sets=()
for s in "$@"; do sets+=(--set "$s"); done
exec python -m clipforge train tiny-shapes --run-dir "$run" \
  --set model.vision_width=128 --set model.vision_heads=4 --set model.vision_layers=4 --set model.text_width=128 \
  --set data.train="$train" --set data.batch_size=128 --set data.num_workers=1 --set data.seed=0 \
  --set train.seed=0 --set train.steps="$steps" --set train.checkpoint_every_steps="$steps" \
  --set schedule.warmup_steps=30 --set eval.at_end=false --set train.threads=2 "${sets[@]}"
