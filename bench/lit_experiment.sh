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
source "$(dirname "$0")/emoji_split.sh"  # SPLIT, emoji_run

for seed in $SEEDS; do
  for arm in lit scratch flame lit-sigmoid; do
    case $arm in
      lit) recipe=(lit-minilm-emoji) ;;
      scratch) recipe=(clip-emoji) ;;
      flame) recipe=(flame-minilm-emoji) ;;
      lit-sigmoid) recipe=(flame-minilm-emoji --set method.name=lit --set 'method.facets=[]') ;;
    esac
    emoji_run "$RUNS/$arm-s$seed" "$seed" "${recipe[@]}"
  done
done
