#!/usr/bin/env bash
# CLIP, CLIP 🚀 and Fini et al.'s non-contrastive variants on the emoji set, whose captions are unique
# (docs/methods/noncontrastive-lip.md, "Unique captions"). The CIFAR experiment's captions are class names
# (~19 distinct texts a batch); this asks whether BarLIP's failure there is the data's.
#
#   PY=/path/to/python bash bench/noncontrastive_emoji_experiment.sh RUNS_DIR "0 1 2"
#   ARMS="barlip rocket" ...   only the arms named (clip rocket barlip swalip siamlip byolip; barlip-d64: an
#                              analysis arm, BarLIP with 64-wide heads, as wide as the batch)
#   then: python bench/noncontrastive_emoji_table.py RUNS_DIR
#
# Data and protocol are the LiT experiment's (docs/methods/lit-flame.md): split seed 0 of
# examples/lit_holdout_split.py (26 emoji subcategories held out, 1,198 training images), text->image
# retrieval on the 302 held-out pairs and on 302 training pairs. Every arm trains clip-emoji's model, batch
# and schedule (ViT 4 x 192 at 32 px, text tower 2 x 128 with a BPE of 1,024 trained on the captions,
# embed 128, batch 64, 300 steps, AdamW lr 1e-3 wd 0.1, cosine with 30 warm-up steps); the CLIP 🚀 arms add
# their recipes' views, projectors and augmentations unchanged (<name>-cifar recipes, EMOJI overrides below).
# Each run and evaluation holds /tmp/cpu.lock (one CPU-heavy job at a time); a run whose two evaluations
# exist is kept.
set -euo pipefail
RUNS=${1:?usage: bench/noncontrastive_emoji_experiment.sh RUNS_DIR "SEEDS"}
SEEDS=${2:-"0"}
PY=${PY:-python}
source "$(dirname "$0")/emoji_split.sh"  # SPLIT, emoji_run

# clip-emoji's model, tokenizer, batch and schedule on top of a CIFAR recipe of CLIP 🚀's family
EMOJI_SETUP=(--set model.vision_layers=4 --set model.vocab_size=1024 --set model.context_length=32
             --set data.tokenizer.vocab_size=1024 --set data.tokenizer.corpus_size=1000
             --set data.batch_size=64 --set optim.lr=1e-3 --set schedule.warmup_steps=30
             --set train.steps=300 --set train.checkpoint_every_steps=300 --set eval.at_end=false
             --set method.view_batchnorm=joint)  # as the CIFAR figures (the default until 2026-11-27)

for seed in $SEEDS; do
  for arm in clip rocket barlip swalip siamlip byolip barlip-d64; do
    [ -z "${ARMS:-}" ] || [[ " $ARMS " == *" $arm "* ]] || continue
    case $arm in
      clip) recipe=(clip-emoji --set eval.at_end=false) ;;
      rocket) recipe=(clip-rocket-cifar "${EMOJI_SETUP[@]}") ;;
      barlip) recipe=(barlip-cifar "${EMOJI_SETUP[@]}" --set method.head_out=2048) ;;  # the recipe's heads until 2026-11-27
      barlip-d64) recipe=(barlip-cifar "${EMOJI_SETUP[@]}" --set method.head_out=64) ;;  # analysis: heads as wide as the batch
      *) recipe=("$arm-cifar" "${EMOJI_SETUP[@]}") ;;
    esac
    emoji_run "$RUNS/$arm-s$seed" "$seed" "${recipe[@]}"
  done
done
