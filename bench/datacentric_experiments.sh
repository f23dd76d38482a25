#!/usr/bin/env bash
# The controlled experiments of docs/data-centric.md, end to end (CPU; each step a few minutes).
#   bench/datacentric_experiments.sh WORK_DIR        (needs ../shared/data/cifar10-train.tar.gz)
# Run from the repository root with clipforge importable. On a shared machine wrap each step in
# `flock /tmp/cpu.lock ...` as the steps below are sized to (each under ~8 minutes on 2 cores).
set -euxo pipefail
W=${1:?work dir}; mkdir -p "$W/runs" "$W/res"
T=bench/datacentric_train.sh

# data: CIFAR-10, 300 images per class + augmented copies of about half of them; shapes pairs at caption noise 0 / 0.3
mkdir -p "$W/cifar" && tar xzf ../shared/data/cifar10-train.tar.gz -C "$W/cifar"
python bench/datacentric_data.py cifar-dups "$W/cifar/cifar10/train" "$W/cdup" --per-class 300 --dup-fraction 0.5 --seed 0
for n in 0 0.3; do python bench/datacentric_data.py shapes-pairs "$W/shapes-n$n" --samples 6000 --noise $n --seed 0; done

# step 1: the two shapes backbones (noise 0 / 0.3), a teacher cache of the CIFAR set with the clean one, the eps sweep, CIFAR on all data
for n in 0 0.3; do $T "$W/runs/sh$n" "jsonl:$W/shapes-n$n/train.jsonl" 150; done
python -m clipforge embed "$W/runs/sh0" --data "jsonl:$W/cdup/train.jsonl" --out "$W/cache-sh0" --teacher-cache
python bench/dedup_sweep.py "$W/cache-sh0" "$W/cdup/dups.json" --eps 0.0005 0.001 0.002 0.005 0.01 0.02 0.05 > "$W/sweep.json"
$T "$W/runs/c-all" "jsonl:$W/cdup/train.jsonl" 150

# step 2: dedup (eps keeping about 55%) and reduce (keep 0.5); train at equal steps and at equal epochs; zero-shot; NMTune probes
EPS=$(python -c "import json,sys; s=json.load(open(sys.argv[1])); print(min(s, key=lambda r: abs(r['kept_fraction']-0.55))['eps'])" "$W/sweep.json")
python -m clipforge data dedup "jsonl:$W/cdup/train.jsonl" --model "$W/cache-sh0" --eps "$EPS" --out "$W/keep-dedup.parquet"
python -m clipforge data reduce "jsonl:$W/cdup/train.jsonl" --model "$W/cache-sh0" --keep 0.5 --out "$W/keep-reduce.parquet"
N=$(wc -l < "$W/cdup/train.jsonl")
for k in dedup reduce; do
  kept=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['kept'])" "$W/keep-$k.report.json")
  $T "$W/runs/c-$k" "jsonl:$W/cdup/train.jsonl" 150 "data.keep=$W/keep-$k.parquet"
  $T "$W/runs/c-$k-ep" "jsonl:$W/cdup/train.jsonl" $(( (150 * kept + N / 2) / N )) "data.keep=$W/keep-$k.parquet"
done
echo 'a photo of a {}.' > "$W/templates.txt"
for r in c-all c-dedup c-dedup-ep c-reduce c-reduce-ep; do
  python -m clipforge eval "$W/runs/$r" --task zeroshot --data "imagefolder:$W/cdup/test" --templates "$W/templates.txt" --out "$W/res/$r-zs.json" --no-plots
done
P=$W/shapes-n0/probe
for n in 0 0.3; do
  python -m clipforge eval "$W/runs/sh$n" --task linear-probe --train-data "imagefolder:$P/train" --data "imagefolder:$P/test" --out "$W/res/sh$n-probe.json" --no-plots
  python -m clipforge eval "$W/runs/sh$n" --task linear-probe --train-data "imagefolder:$P/train" --data "imagefolder:$P/test" --nmtune --out "$W/res/sh$n-nmtune.json" --no-plots
done

# step 3: Zipf shapes (exponent 1.5, 300 steps x 128 = 38,400 samples) and the concept-frequency analysis
$T "$W/runs/zipf" shapes 300 data.shapes.pair_zipf_exponent=1.5
python -m clipforge data concepts shapes --concepts "$P/test" --model "$W/runs/zipf" --eval-data "imagefolder:$P/test" --max-samples 38400 --out "$W/concepts-zipf"

# step 4: the dedup bench
python bench/dedup.py --sizes 10000 100000 1000000 --timeout 200 > "$W/bench_dedup.json"
