#!/usr/bin/env bash
# Model soups with `clipforge merge` (docs/methods/model-soups.md): models fine-tuned from one zero-shot
# checkpoint with different learning rates and data orders, their uniform soup and their greedy soup,
# each evaluated on held-out CIFAR-10 and on what the zero-shot model was trained for.
#   bash bench/soup_experiment.sh SPLIT_DIR ZS_CHECKPOINT RUNS_DIR      then: python bench/soup_table.py RUNS_DIR
# SPLIT_DIR from: python examples/cifar_holdout_split.py CIFAR/train SPLIT_DIR --holdout 500
# ZS_CHECKPOINT: the demo recipe's model (bench/wiseft_experiment.sh's zs-s0, seed 0)
#   ft-lrL-sS   fine-tuned from ZS on SPLIT/train (captions "a photo of a {class}."), the CLIP loss, FT_STEPS (600)
#               steps, lr L cosine, 20 warm-up steps, batch 128, train.seed = data.seed = S; L in FT_LRS, S in SEEDS
#   uniform     clipforge merge of every ft-* (the mean)
#   greedy      clipforge merge --greedy, scored on RUNS/heldout/select (the first 250 per class of SPLIT/val)
#   learned     clipforge merge --learned, mixing weights fitted on RUNS/heldout/select (100 Adam steps, lr 0.05,
#               256 images a step); learned-by-layer: --by-layer (one weight per model for every block and other
#               module); learned-by-tensor: --by-tensor (one weight per model for every tensor); each also
#               -fixedT: --fixed-temperature (no temperature fitted beside the weights)
# evaluated zero-shot on RUNS/heldout/test (the other 250 per class: no model or choice saw them) and on
# shapes:seen / shapes:unseen. Each run and evaluation holds /tmp/cpu.lock (one CPU-heavy job at a time).
set -euo pipefail
SPLIT=${1:?split dir}; ZS=${2:?zero-shot checkpoint}; RUNS=${3:?runs dir}
FT_LRS=${FT_LRS:-"2e-4 5e-4 1e-3"}; SEEDS=${SEEDS:-"0 1"}; FT_STEPS=${FT_STEPS:-600}
PY=${PY:-python}; CF="$PY -m clipforge"
mkdir -p "$RUNS"
# the held-out half for choosing (greedy) and the half for reporting, per class, by sorted file name
if [ ! -d "$RUNS/heldout/test" ]; then
  $PY "$(dirname "$0")/../examples/cifar_holdout_split.py" "$SPLIT/val" "$RUNS/heldout.tmp" --holdout 250 > /dev/null
  mkdir -p "$RUNS/heldout" && mv "$RUNS/heldout.tmp/train" "$RUNS/heldout/select" && mv "$RUNS/heldout.tmp/val" "$RUNS/heldout/test"
  rmdir "$RUNS/heldout.tmp"
fi
ingredients=()
for lr in $FT_LRS; do
  for seed in $SEEDS; do
    ft="$RUNS/ft-lr$lr-s$seed"; ingredients+=("$ft")
    [ -f "$ft/checkpoints/latest/model.safetensors" ] && continue
    rm -rf "$ft"
    flock /tmp/cpu.lock $CF train tiny-shapes --set "model.init_from=$ZS" --set "data.train=imagefolder:$SPLIT/train" \
      --set train.steps=$FT_STEPS --set optim.lr=$lr --set schedule.warmup_steps=20 --set eval.at_end=false \
      --set eval.every_steps=none --set train.checkpoint_every_steps=$FT_STEPS --set train.seed=$seed \
      --set data.seed=$seed --run-dir "$ft" > "$ft.log" 2>&1
  done
done
[ -f "$RUNS/uniform/config.json" ] || $CF merge "${ingredients[@]}" --out "$RUNS/uniform" > /dev/null
[ -f "$RUNS/greedy/config.json" ] || flock /tmp/cpu.lock $CF merge "${ingredients[@]}" --greedy \
  --data "imagefolder:$RUNS/heldout/select" --out "$RUNS/greedy" 2> "$RUNS/greedy.log"
LEARNED=(learned learned-by-layer learned-by-tensor learned-fixedT learned-by-layer-fixedT learned-by-tensor-fixedT)
for kind in "${LEARNED[@]}"; do
  [ -f "$RUNS/$kind/config.json" ] && continue
  case $kind in learned-by-layer*) per=(--by-layer) ;; learned-by-tensor*) per=(--by-tensor) ;; *) per=() ;; esac
  [[ $kind == *-fixedT ]] && per+=(--fixed-temperature)
  flock /tmp/cpu.lock $CF merge "${ingredients[@]}" --learned "${per[@]}" \
    --data "imagefolder:$RUNS/heldout/select" --out "$RUNS/$kind" 2> "$RUNS/$kind.log"
done
mkdir -p "$RUNS/zs" && ln -sfn "$(cd "$ZS" && pwd)" "$RUNS/zs/model"
for m in "${ingredients[@]}" "$RUNS/uniform" "$RUNS/greedy" "${LEARNED[@]/#/$RUNS/}" "$RUNS/zs/model"; do
  dir=$m; [ "$m" = "$RUNS/zs/model" ] && dir="$RUNS/zs"
  [ -f "$dir/eval-unseen.json" ] && continue
  flock /tmp/cpu.lock $CF eval "$m" --task zeroshot --data "imagefolder:$RUNS/heldout/test" --out "$dir/eval-test.json" > /dev/null
  flock /tmp/cpu.lock $CF eval "$m" --task zeroshot --data shapes:seen --out "$dir/eval-seen.json" > /dev/null
  flock /tmp/cpu.lock $CF eval "$m" --task zeroshot --data shapes:unseen --out "$dir/eval-unseen.json" > /dev/null
done
echo "done: python bench/soup_table.py $RUNS"
