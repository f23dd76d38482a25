#!/usr/bin/env bash
# LexLIP phase 1 with and without its lexicon bottleneck (docs/methods/lexlip.md, "Phase 1: the lexicon
# bottleneck"): for each seed S (train.seed = data.seed = S), batch 128 on shapes, three arms (ARMS=... for some)
#   lexlip       lexlip-shapes, 400 steps: dense CLIP + in-batch lexical contrastive + FLOPs
#   bottleneck   lexlip-bottleneck-shapes, 400 steps: the same + LexMLM (weak decoder from each tower's
#                bottleneck, the text tower's own MLM): equal steps
#   lexlip640    lexlip-shapes for 640 steps: the bottleneck arm's wall time (its steps take ~1.6x as long on
#                2 CPU cores: the masked text pass and two decoder passes), i.e. equal compute
#   moco-b       phase 2 after phase 1 (the paper's order): lexlip-moco-shapes for 200 steps from bottleneck-sS
#   moco-l       the same from lexlip640-sS (equal compute before phase 2, without the bottleneck)
#   moco-b-ft, moco-l-ft   the same two at a continuation's learning rate (optim.lr = 2e-4, a tenth of the
#                recipe's from-scratch 2e-3)
# then bench/lexical.py on each (text -> image over the shapes eval images: lexical precision@10, non-zeros,
# index size; its dense row is the same model's dense head).
#
#   PY=/path/to/python bash bench/lexlip_experiment.sh RUNS_DIR "0 1 2"     then: python bench/lexlip_table.py RUNS_DIR
#
# Each run holds /tmp/cpu.lock (one CPU-heavy job at a time); a finished run (a checkpoint at its last step) is kept.
set -euo pipefail
RUNS=${1:?usage: bench/lexlip_experiment.sh RUNS_DIR "SEEDS"}
SEEDS=${2:-"0 1 2"}
PY=${PY:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$RUNS"
for seed in $SEEDS; do
  for arm in ${ARMS:-lexlip bottleneck lexlip640 moco-b moco-l}; do
    recipe=lexlip-shapes; [ "$arm" = bottleneck ] && recipe=lexlip-bottleneck-shapes
    steps=400; [ "$arm" = lexlip640 ] && steps=640
    init=()
    case $arm in
      moco-b) recipe=lexlip-moco-shapes; steps=200; init=(--set model.init_from="$RUNS/bottleneck-s$seed") ;;
      moco-l) recipe=lexlip-moco-shapes; steps=200; init=(--set model.init_from="$RUNS/lexlip640-s$seed") ;;
      moco-b-ft) recipe=lexlip-moco-shapes; steps=200
                 init=(--set model.init_from="$RUNS/bottleneck-s$seed" --set optim.lr=2e-4) ;;
      moco-l-ft) recipe=lexlip-moco-shapes; steps=200
                 init=(--set model.init_from="$RUNS/lexlip640-s$seed" --set optim.lr=2e-4) ;;
    esac
    dir="$RUNS/$arm-s$seed"
    if [ ! -d "$dir/checkpoints/$(printf 'step_%07d' "$steps")" ]; then
      rm -rf "$dir"
      echo "$(date +%T) train $dir"
      flock /tmp/cpu.lock "$PY" -m clipforge train "$recipe" --run-dir "$dir" "${init[@]}" --set train.steps="$steps" \
        --set eval.every_steps="$steps" --set train.checkpoint_every_steps="$steps" \
        --set train.seed="$seed" --set data.seed="$seed" > "$dir.log" 2>&1
    fi
    if [ ! -s "$dir/lexical.json" ]; then
      echo "$(date +%T) bench $dir"
      flock /tmp/cpu.lock "$PY" "$HERE/lexical.py" --clip "$dir/checkpoints/latest" --lexlip "$dir/checkpoints/latest" \
        --scale '' --no-seismic --emoji /nonexistent > "$dir/lexical.json.tmp" 2> "$dir/lexical.log"
      mv "$dir/lexical.json.tmp" "$dir/lexical.json"
    fi
  done
done
echo "$(date +%T) done"
