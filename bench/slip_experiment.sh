#!/usr/bin/env bash
# SLIP, CLIP 🚀 and the improved-baseline knobs vs CLIP on CIFAR-10 (docs/methods/slip.md), equal steps.
#   bash bench/slip_experiment.sh SPLIT_DIR RUNS_DIR
# SPLIT_DIR from: python examples/cifar_holdout_split.py CIFAR/train SPLIT_DIR --holdout 500
# Every run: recipe slip-cifar (tiny ViT 6 x 192 at 32 px, CLIP crop 0.5-1), 400 steps, batch 128, fp32.
#   SEEDS="2" bash bench/slip_experiment.sh SPLIT_DIR RUNS_DIR   only these seeds: CLIP and SLIP, then CLIP at SLIP's
#                                                               FLOPs (clip-3x), then the improved baseline
#   SEEDS="0 1" ARMS="clip-3x" bash bench/slip_experiment.sh ...  only the arms named
#   SEEDS="0 1 2" ARMS="rocket" ...   CLIP 🚀 (recipe clip-rocket-cifar); "rocket-shared": its views through
#                                     the model's own projections (the paper's separate_proj = False);
#                                     "rocket-nols": without the views' label smoothing; "rocket-pv": BatchNorm
#                                     per view in the views' projectors (the default now; the others: joint);
#                                     "slip-pv": SLIP with its head's BatchNorm per view (the default since
#                                     2026-11-28; "slip": joint)
#   SEEDS="0" ARMS="barlip siamlip byolip swalip" ...   the non-contrastive variants (recipes <name>-cifar);
#                                     "barlip-w005": BarLIP with method.weight=0.05, "barlip-d256": with 256-wide
#                                     heads (analysis arms)
# Each run and eval holds /tmp/cpu.lock (one CPU-heavy job at a time on a shared 2-core machine).
set -euo pipefail
SPLIT=${1:?split dir}; RUNS=${2:?runs dir}; STEPS=${STEPS:-400}
CF="python -m clipforge"
mkdir -p "$RUNS"
common=(--set "data.train=imagefolder:$SPLIT/train" --set "train.steps=$STEPS" --set eval.at_end=false
        --set train.checkpoint_every_steps=$STEPS)
arm() {  # name seed overrides...
  local name=$1 seed=$2 recipe=${RECIPE:-slip-cifar}; shift 2
  [ -z "${ARMS:-}" ] || [[ " $ARMS " == *" $name "* ]] || return 0   # ARMS="clip-3x ...": only these
  local dir="$RUNS/$name-s$seed"
  if [ ! -f "$dir/zeroshot.json" ]; then
    rm -rf "$dir"
    local start=$(date +%s)
    flock /tmp/cpu.lock $CF train "$recipe" --run-dir "$dir" "${common[@]}" --set data.seed=$seed --set train.seed=$seed "$@" > "$dir.log" 2>&1
    echo $(( $(date +%s) - start )) > "$dir.seconds"
    flock /tmp/cpu.lock $CF eval "$dir" --task zeroshot --data "imagefolder:$SPLIT/val" --out "$dir/zeroshot.json.tmp" >> "$dir.log" 2>&1
    flock /tmp/cpu.lock $CF eval "$dir" --task linear-probe --train-data "imagefolder:$SPLIT/train" \
        --data "imagefolder:$SPLIT/val" --out "$dir/probe.json" >> "$dir.log" 2>&1
    mv "$dir/zeroshot.json.tmp" "$dir/zeroshot.json"
  fi
}
CLIP=(--set method.ssl_scale=0)                       # the same step without the SimCLR branch = CLIP
STRONG=(--set data.augment.policy=strong)
EDA=(--set data.text_augment=eda)
LS=(--set 'objective.terms=[{name="clip",label_smoothing=0.1}]')
# Equal compute: SLIP's step costs 0.754 GFLOPs per sample, CLIP's 0.254 (2.97x; counted by
#   clipforge bench slip-cifar --set data.train=imagefolder:SPLIT/train [--set method.ssl_scale=0 --set data.ssl_views=0]
# ), so CLIP at 3x the steps (its own warm-up + cosine over them) matches SLIP's FLOPs.
EQ_STEPS=$(( 3 * STEPS ))
EQ=(--set method.ssl_scale=0 --set data.ssl_views=0 --set train.steps=$EQ_STEPS --set train.checkpoint_every_steps=$EQ_STEPS)
# The SLIP and CLIP 🚀 family's figures in the docs were measured with the views' projectors normalising all views in
# one BatchNorm call, the default until 2026-11-27 (method.view_batchnorm = "joint"); "rocket-pv" is the default now.
JOINT_BN=(--set method.view_batchnorm=joint)
BARLIP_2048=(--set method.head_out=2048)  # BarLIP's recipe heads until 2026-11-27 (now 256)
if [ -n "${SEEDS:-}" ]; then
  for s in $SEEDS; do
    arm clip $s "${CLIP[@]}"
    arm slip $s "${JOINT_BN[@]}"
  done
  for s in $SEEDS; do arm clip-3x $s "${EQ[@]}"; done
  for s in $SEEDS; do arm improved $s "${CLIP[@]}" "${STRONG[@]}" "${EDA[@]}" "${LS[@]}"; done
  for s in $SEEDS; do RECIPE=clip-rocket-cifar arm rocket $s "${JOINT_BN[@]}"; done
  for s in $SEEDS; do RECIPE=clip-rocket-cifar arm rocket-shared $s --set method.projector=shared; done
  for s in $SEEDS; do RECIPE=clip-rocket-cifar arm rocket-nols $s --set method.label_smoothing=0 "${JOINT_BN[@]}"; done
  for s in $SEEDS; do  # Fini et al.'s non-contrastive variants: CLIP 🚀 + one more loss (recipes <name>-cifar)
    for nc in siamlip byolip swalip; do RECIPE=$nc-cifar arm $nc $s "${JOINT_BN[@]}"; done
    RECIPE=barlip-cifar arm barlip $s "${BARLIP_2048[@]}" "${JOINT_BN[@]}"
  done
  # analysis: BarLIP with its term at a tenth of the paper's weight (docs/methods/noncontrastive-lip.md)
  for s in $SEEDS; do RECIPE=barlip-cifar arm barlip-w005 $s --set method.weight=0.05 "${BARLIP_2048[@]}" "${JOINT_BN[@]}"; done
  # BarLIP with 256-wide heads, twice the batch as the paper's 8,192 for 4,096 (the recipe's since 2026-11-27)
  for s in $SEEDS; do RECIPE=barlip-cifar arm barlip-d256 $s --set method.head_out=256 "${JOINT_BN[@]}"; done
  # CLIP 🚀 as shipped now: the views' projectors normalise each view on its own (the released code)
  for s in $SEEDS; do RECIPE=clip-rocket-cifar arm rocket-pv $s; done
  # SLIP as shipped now: its head normalises each view on its own (the released code; "slip" above: joint)
  for s in $SEEDS; do arm slip-pv $s; done
  exit 0
fi
for s in 0; do
  arm clip $s "${CLIP[@]}"
  arm slip $s "${JOINT_BN[@]}"
  arm improved $s "${CLIP[@]}" "${STRONG[@]}" "${EDA[@]}" "${LS[@]}"
done
arm clip 1 "${CLIP[@]}"
arm slip 1 "${JOINT_BN[@]}"
arm strong 0 "${CLIP[@]}" "${STRONG[@]}"
arm eda 0 "${CLIP[@]}" "${EDA[@]}"
arm improved 1 "${CLIP[@]}" "${STRONG[@]}" "${EDA[@]}" "${LS[@]}"
