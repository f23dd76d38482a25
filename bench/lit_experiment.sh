#!/usr/bin/env bash
# LiT / FLAME vs a scratch text tower on emoji concepts never trained on (docs/methods/lit-flame.md,
# "Controlled experiment"). Every arm trains the same ViT (4 x 192, 32 px) on the same split (seed 0 of
# examples/lit_holdout_split.py: 26 emoji subcategories held out), 300 steps at batch 64, lr 1e-3 cosine:
#   lit          lit-minilm-emoji: locked all-MiniLM-L6-v2 (features cached), linear projection, CLIP loss
#   scratch      clip-emoji: the same ViT with CLIP's text tower trained from nothing
#   flame        flame-minilm-emoji: 3 facet prompts in one pass, MLP adapter, multi-positive sigmoid
#   lit-sigmoid  flame-minilm-emoji without facets (M = 1: MLP adapter + sigmoid loss)
# then text->image retrieval on the held-out concepts and on as many training pairs.
#
#   PY=/path/to/python bash bench/lit_experiment.sh RUNS_DIR "0 1 2"      then: python bench/lit_table.py RUNS_DIR
#
# Needs ../shared/data/emoji-noto-dev (or EMOJI=path/to/captions.jsonl) and clipforge[text]. Each run and
# evaluation holds /tmp/cpu.lock (one CPU-heavy job at a time); a run whose two evaluations exist is kept.
set -euo pipefail
RUNS=${1:?usage: bench/lit_experiment.sh RUNS_DIR "SEEDS"}
SEEDS=${2:-"0 1"}
PY=${PY:-python}
EMOJI=${EMOJI:-$(dirname "$0")/../../shared/data/emoji-noto-dev/captions.jsonl}
[ -f "$EMOJI" ] || { echo "no emoji captions at $EMOJI: set EMOJI=path/to/captions.jsonl" >&2; exit 2; }
mkdir -p "$RUNS"
SPLIT="$RUNS/split"
[ -f "$SPLIT/split.json" ] || "$PY" "$(dirname "$0")/../examples/lit_holdout_split.py" "$EMOJI" "$SPLIT" --seed 0

for seed in $SEEDS; do
  for arm in lit scratch flame lit-sigmoid; do
    dir="$RUNS/$arm-s$seed"
    [ -f "${dir}_heldout.json" ] && [ -f "${dir}_seen.json" ] && continue
    case $arm in
      lit) recipe=(lit-minilm-emoji) ;;
      scratch) recipe=(clip-emoji) ;;
      flame) recipe=(flame-minilm-emoji) ;;
      lit-sigmoid) recipe=(flame-minilm-emoji --set method.name=lit --set 'method.facets=[]') ;;
    esac
    rm -rf "$dir"
    echo "$(date +%T) train $dir"
    flock /tmp/cpu.lock "$PY" -m clipforge train "${recipe[@]}" --run-dir "$dir" \
      --set "data.train=jsonl:$SPLIT/train.jsonl" --set data.seed=0 --set train.seed="$seed" > "$dir.log" 2>&1
    for split in heldout seen; do
      flock /tmp/cpu.lock "$PY" -m clipforge eval "$dir" --task retrieval --data "jsonl:$SPLIT/$split.jsonl" \
        --workers 0 --device cpu --out "${dir}_$split.json" >> "$dir.log" 2>&1
    done
    echo "$(date +%T) done  $dir"
  done
done
