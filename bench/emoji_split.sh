# Sourced by the emoji-split experiments (bench/lit_experiment.sh, bench/noncontrastive_emoji_experiment.sh):
# the concept split of examples/lit_holdout_split.py (seed 0) and one run on it. Needs RUNS and PY set.
EMOJI=${EMOJI:-$(dirname "${BASH_SOURCE[0]}")/../../shared/data/emoji-noto-dev/captions.jsonl}
[ -f "$EMOJI" ] || { echo "no emoji captions at $EMOJI: set EMOJI=path/to/captions.jsonl" >&2; exit 2; }
mkdir -p "$RUNS"
SPLIT="$RUNS/split"
[ -f "$SPLIT/split.json" ] || "$PY" "$(dirname "${BASH_SOURCE[0]}")/../examples/lit_holdout_split.py" "$EMOJI" "$SPLIT" --seed 0

# emoji_run RUN_DIR SEED RECIPE [--set ...]: train on the split's training rows (data order seed 0, train.seed
# SEED), then text->image retrieval on the held-out and the seen pairs; kept when both evaluations exist.
# Each run and evaluation holds /tmp/cpu.lock (one CPU-heavy job at a time).
emoji_run() {
  local dir=$1 seed=$2 split
  shift 2
  [ -f "${dir}_heldout.json" ] && [ -f "${dir}_seen.json" ] && return 0
  rm -rf "$dir"
  echo "$(date +%T) train $dir"
  flock /tmp/cpu.lock "$PY" -m clipforge train "$@" --run-dir "$dir" \
    --set "data.train=jsonl:$SPLIT/train.jsonl" --set data.seed=0 --set train.seed="$seed" > "$dir.log" 2>&1
  for split in heldout seen; do
    flock /tmp/cpu.lock "$PY" -m clipforge eval "$dir" --task retrieval --data "jsonl:$SPLIT/$split.jsonl" \
      --workers 0 --device cpu --out "${dir}_$split.json" >> "$dir.log" 2>&1
  done
  echo "$(date +%T) done  $dir"
}
