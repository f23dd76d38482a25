#!/usr/bin/env bash
# TinyCLIP on shapes at equal student steps (docs/methods/tinyclip.md, experiments 1 and 2). One teacher
# (tiny-shapes, 400 steps, seed 0) is trained once; then for each seed S (train.seed = data.seed = S) the
# student (tinyclip-shapes: ViT 96x3, text 64x2) trains 400 steps at batch 128 in five arms:
#   scratch       random init, CLIP loss, no teacher
#   distill       random init, affinity distillation from the teacher only
#   inherit       weights inherited from the teacher (manual), affinity distillation
#   inherit-clip  inherited, CLIP loss only (no teacher in training)
#   multi         clipforge distill: 2 stages x 200 steps, each inherited from the one before, distilled
#   auto          clipforge distill --student sparsity=0.86 --prune-steps 600 --granularity groups: L0 gates learnt on the teacher's
#                 shape for 600 steps (distilling), pruned towards the manual student's block weights
#                 (14 %), then 400 steps distilled: the same student steps, 600 more teacher-sized ones
#                 (with 300 the gates had only reached an expected sparsity of 0.54: docs/methods/tinyclip.md)
#   auto-cofi     the same with --granularity cofi: TinyCLIP/CoFi gates (hidden dims, heads and MLP units per
#                 layer, attention and MLP sublayers apart) instead of whole head groups and blocks
#   auto-cofi-target  auto-cofi with --prune-size target: after CoFi's test-time gates, the least likely open
#                 gates are closed until the student's block-weight sparsity reaches 0.86 (equal sizes)
#   auto-cofi-expected  the paired control of auto-cofi-target: its learnt gates (the masks phase, copied), pruned
#                 by CoFi's rule (--prune-size expected), then the same 400 distilled steps (run after it)
# The built-in shapes evaluation runs every 100 steps (zero-shot on seen and unseen compositions).
#
#   PY=/path/to/python bash bench/tinyclip_experiment.sh RUNS_DIR "0 1 2"      then: python bench/tinyclip_table.py RUNS_DIR
#   ARMS="auto" PY=... bash bench/tinyclip_experiment.sh RUNS_DIR "0 1 2"       only the arms named (the teacher always)
#
# Each run holds /tmp/cpu.lock (one CPU-heavy job at a time); a finished run (a checkpoint at its last step) is kept.
set -euo pipefail
RUNS=${1:?usage: bench/tinyclip_experiment.sh RUNS_DIR "SEEDS"}
SEEDS=${2:-"0 1"}
PY=${PY:-python}
COMMON=(--set train.steps=400 --set eval.every_steps=100 --set train.checkpoint_every_steps=400)
mkdir -p "$RUNS"

ARMS=${ARMS:-"scratch distill inherit inherit-clip multi"}
wanted() { [[ " $ARMS " == *" $1 "* ]]; }

finished() { [ -d "$1/checkpoints/$(printf 'step_%07d' "$2")" ]; }

train() {  # dir args...
  local dir=$1; shift
  if [ "$dir" != "$TEACHER" ] && ! wanted "$(basename "${dir%-s*}")"; then return 0; fi
  if finished "$dir" 400; then return 0; fi
  rm -rf "$dir"
  echo "$(date +%T) train $dir"
  flock /tmp/cpu.lock "$PY" -m clipforge train "$@" --run-dir "$dir" > "$dir.log" 2>&1
}

TEACHER="$RUNS/teacher"
train "$TEACHER" tiny-shapes "${COMMON[@]}"
for seed in $SEEDS; do
  S=(--set train.seed="$seed" --set data.seed="$seed")
  INHERIT=(--set model.init_from.path="$TEACHER" --set model.init_from.inherit=manual)
  train "$RUNS/scratch-s$seed" tinyclip-shapes --set 'teachers=[]' --set 'objective.terms=[{name="clip"}]' "${COMMON[@]}" "${S[@]}"
  train "$RUNS/distill-s$seed" tinyclip-shapes --set teachers.0.path="$TEACHER" "${COMMON[@]}" "${S[@]}"
  train "$RUNS/inherit-s$seed" tinyclip-shapes --set teachers.0.path="$TEACHER" "${INHERIT[@]}" "${COMMON[@]}" "${S[@]}"
  train "$RUNS/inherit-clip-s$seed" tinyclip-shapes --set 'teachers=[]' --set 'objective.terms=[{name="clip"}]' \
    "${INHERIT[@]}" "${COMMON[@]}" "${S[@]}"
  dir="$RUNS/multi-s$seed"
  if wanted multi && ! finished "$dir/stage_2" 200; then
    echo "$(date +%T) distill $dir"
    flock /tmp/cpu.lock "$PY" -m clipforge distill "$TEACHER" --student vision_width=96,vision_layers=3,text_width=64,text_heads=2 \
      --stages 2 --run-dir "$dir" --recipe tinyclip-shapes --set train.steps=200 --set eval.every_steps=100 \
      --set train.checkpoint_every_steps=200 "${S[@]}" > "$dir.log" 2>&1
  fi
  dir="$RUNS/auto-s$seed"
  if wanted auto && ! finished "$dir/stage_1" 400; then
    echo "$(date +%T) distill (automatic inheritance) $dir"
    flock /tmp/cpu.lock "$PY" -m clipforge distill "$TEACHER" --student sparsity=0.86 --prune-steps 600 \
      --granularity groups --run-dir "$dir" --recipe tinyclip-shapes "${COMMON[@]}" "${S[@]}" > "$dir.log" 2>&1
  fi
  dir="$RUNS/auto-cofi-s$seed"
  if wanted auto-cofi && ! finished "$dir/stage_1" 400; then
    echo "$(date +%T) distill (automatic inheritance, cofi) $dir"
    flock /tmp/cpu.lock "$PY" -m clipforge distill "$TEACHER" --student sparsity=0.86 --prune-steps 600 \
      --granularity cofi --run-dir "$dir" --recipe tinyclip-shapes "${COMMON[@]}" "${S[@]}" > "$dir.log" 2>&1
  fi
  dir="$RUNS/auto-cofi-target-s$seed"
  if wanted auto-cofi-target && ! finished "$dir/stage_1" 400; then
    echo "$(date +%T) distill (automatic inheritance, cofi, pruned to the target size) $dir"
    flock /tmp/cpu.lock "$PY" -m clipforge distill "$TEACHER" --student sparsity=0.86 --prune-steps 600 \
      --granularity cofi --prune-size target --run-dir "$dir" --recipe tinyclip-shapes "${COMMON[@]}" "${S[@]}" \
      > "$dir.log" 2>&1
  fi
  dir="$RUNS/auto-cofi-expected-s$seed"
  if wanted auto-cofi-expected && ! finished "$dir/stage_1" 400; then
    masks="$RUNS/auto-cofi-target-s$seed/stage_1/masks"
    [ -d "$masks/checkpoints/step_0000600" ] || { echo "auto-cofi-expected needs auto-cofi-target's gates: $masks"; exit 1; }
    rm -rf "$dir" && mkdir -p "$dir/stage_1" && cp -r "$masks" "$dir/stage_1/masks"  # distill skips a finished phase
    echo "$(date +%T) distill (the same gates, CoFi's size) $dir"
    flock /tmp/cpu.lock "$PY" -m clipforge distill "$TEACHER" --student sparsity=0.86 --prune-steps 600 \
      --granularity cofi --prune-size expected --run-dir "$dir" --recipe tinyclip-shapes "${COMMON[@]}" "${S[@]}" \
      > "$dir.log" 2>&1
  fi
done
echo "$(date +%T) done"
