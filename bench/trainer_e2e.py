"""The whole trainer against OpenCLIP's trainer on the same real data, model, batch and workers.

Data: the shared CIFAR-10 training set (``../shared/data/cifar10-train.tar.gz``), unpacked once
into ``bench/out/cifar10`` with a caption per image ("a photo of a <class>."), written as the
JSONL clipforge reads and as the tab-separated CSV OpenCLIP's ``open_clip_train.main`` reads
(``--csv-img-key filepath --csv-caption-key title``). Images are 32 px JPEGs; both trainers
decode and resize them to 64 px in their loaders.

Model: the tiny ViT of ``bench/train_step.py`` (64 px, patch 8, width 192, 6 layers; text
width 128, 4 layers, context 32, vocabulary 49,408), fp32, batch 128, AdamW, gradient clipping
at 1.0, one loader worker, no evaluation, logging every step.

Each side runs ``--steps`` optimiser steps as a separate process (``clipforge train`` and
``python -m open_clip_train.main``); the sides alternate A B, B A, ... for ``--rounds`` rounds.
The figure per run is the median of the per-step img/s each trainer reports (loader wait
included on both sides, their own logging excluded on both), over the steps after
``--skip`` warm-up steps; the process wall time is reported too. Prints one JSON object.

    .venv/bin/python bench/trainer_e2e.py                     # 4 rounds of 40 steps per side
    .venv/bin/python bench/trainer_e2e.py --rounds 2 --steps 20 --set train.compile=true
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_TAR = ROOT.parent / "shared" / "data" / "cifar10-train.tar.gz"
SHAPES = dict(image_size=64, patch_size=8, vision_width=192, vision_layers=6, vision_heads=3, mlp_ratio=4.0,
              context_length=32, text_width=128, text_layers=4, text_heads=2, vocab_size=49408, embed_dim=128)
OPENCLIP_MODEL = "clipforge-bench-tiny"


def prepare_data(out: Path, samples: int) -> tuple[Path, Path]:
    """(JSONL for clipforge, CSV for OpenCLIP) over the first ``samples`` images in a fixed order."""
    root = out / "cifar10"
    if not (root / "train").is_dir():
        if not DATA_TAR.is_file():
            sys.exit(f"{DATA_TAR} not found: this benchmark needs the shared CIFAR-10 archive")
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(DATA_TAR) as tar:
            tar.extractall(out, filter="data")
    files = sorted((root / "train").resolve().glob("*/*.jpg"))  # absolute: the tables live elsewhere
    # interleave the classes so that every batch mixes them, deterministically
    by_class: dict[str, list[Path]] = {}
    for f in files:
        by_class.setdefault(f.parent.name, []).append(f)
    order = [f for group in zip(*by_class.values()) for f in group][:samples]
    jsonl, csv = out / f"cifar-{samples}.jsonl", out / f"cifar-{samples}.csv"
    with open(jsonl, "w") as j, open(csv, "w") as c:
        c.write("filepath\ttitle\n")
        for f in order:
            caption = f"a photo of a {f.parent.name}."
            j.write(json.dumps({"image": str(f), "text": caption}) + "\n")
            c.write(f"{f}\t{caption}\n")
    return jsonl, csv


def clipforge_cmd(jsonl: Path, steps: int, run_dir: Path, extra: list[str]) -> list[str]:
    sets = [f"model.{k}={v}" for k, v in SHAPES.items()] + [
        f"data.train=jsonl:{jsonl}", "data.batch_size=128", "data.num_workers=1", "data.tokenizer.vocab_size=49408",
        f"train.steps={steps}", "train.precision=fp32", "train.checkpoint_every_steps=100000",
        "optim.lr=1e-3", "optim.weight_decay=0.1", "optim.grad_clip=1.0", "schedule.warmup_steps=10",
        "eval.at_end=false", "logging.every_steps=1", "logging.tensorboard=false", "logging.progress=false", *extra,
    ]
    return [sys.executable, "-m", "clipforge", "train", "tiny-shapes", "--run-dir", str(run_dir),
            *[a for s in sets for a in ("--set", s)]]


def openclip_cmd(csv: Path, config_dir: Path, logs: Path) -> list[str]:
    # a tiny launcher: register the model config, then OpenCLIP's own training entry point
    launcher = (f"import sys, open_clip; open_clip.add_model_config({str(config_dir)!r}); "
                "from open_clip_train.main import main; main(sys.argv[1:])")
    return [sys.executable, "-c", launcher,
            "--train-data", str(csv), "--dataset-type", "csv", "--csv-separator", "\t",
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--model", OPENCLIP_MODEL,
            "--batch-size", "128", "--workers", "1", "--epochs", "1", "--precision", "fp32", "--device", "cpu",
            "--lr", "1e-3", "--wd", "0.1", "--warmup", "10", "--grad-clip-norm", "1.0", "--seed", "0",
            "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0",
            "--log-every-n-steps", "1", "--logs", str(logs), "--name", "run"]


def write_openclip_config(where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    s = SHAPES
    config = {"embed_dim": s["embed_dim"],
              "vision_cfg": {"image_size": s["image_size"], "layers": s["vision_layers"], "width": s["vision_width"],
                             "patch_size": s["patch_size"], "head_width": s["vision_width"] // s["vision_heads"],
                             "mlp_ratio": s["mlp_ratio"]},
              "text_cfg": {"context_length": s["context_length"], "vocab_size": s["vocab_size"],
                           "width": s["text_width"], "heads": s["text_heads"], "layers": s["text_layers"]}}
    (where / f"{OPENCLIP_MODEL}.json").write_text(json.dumps(config))
    return where


def run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd[:6])} ...\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def clipforge_rates(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(l)["img_per_s"] for l in lines if "img_per_s" in json.loads(l)]


def openclip_rates(output: str) -> list[float]:
    return [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s,", output)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of each run's median")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra clipforge --set")
    parser.add_argument("--data-dir", default=str(ROOT / "bench" / "out"))
    args = parser.parse_args()

    jsonl, csv = prepare_data(Path(args.data_dir), 128 * args.steps)
    work = Path(tempfile.mkdtemp(prefix="trainer-e2e-"))
    config_dir = write_openclip_config(work / "openclip-configs")
    per_run: dict[str, list[float]] = {"clipforge": [], "openclip": []}
    wall: dict[str, list[float]] = {"clipforge": [], "openclip": []}
    for r in range(args.rounds):
        order = ["clipforge", "openclip"] if r % 2 == 0 else ["openclip", "clipforge"]
        for side in order:
            if side == "clipforge":
                run_dir = work / f"cf-{r}"
                seconds, _ = run(clipforge_cmd(jsonl, args.steps, run_dir, args.sets), ROOT)
                rates = clipforge_rates(run_dir)
            else:
                seconds, output = run(openclip_cmd(csv, config_dir, work / f"oc-{r}"), work)
                rates = openclip_rates(output)
            if len(rates) <= args.skip:
                sys.exit(f"{side}: only {len(rates)} step rates found")
            per_run[side].append(statistics.median(rates[args.skip:]))
            wall[side].append(seconds)
            print(json.dumps({"round": r, "side": side, "median_img_per_s": round(per_run[side][-1], 1),
                              "wall_s": round(seconds, 1), "steps_timed": len(rates) - args.skip}), file=sys.stderr)
    import open_clip
    import torch

    ratios = [a / b for a, b in zip(per_run["clipforge"], per_run["openclip"])]
    result = {
        "bench": "trainer_e2e", "data": f"CIFAR-10 train, first {128 * args.steps} images (32 px JPEG -> 64 px)",
        "shapes": SHAPES, "batch": 128, "workers": 1, "precision": "fp32", "steps_per_run": args.steps,
        "skip": args.skip, "clipforge_sets": args.sets, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "openclip": open_clip.__version__,
        "img_per_s": {side: {"median": round(statistics.median(v), 1), "runs": [round(x, 1) for x in v]}
                      for side, v in per_run.items()},
        "wall_s": {side: [round(x, 1) for x in v] for side, v in wall.items()},
        "ratio_clipforge_over_openclip": round(statistics.median(ratios), 3),
        "ratio_per_round": [round(x, 3) for x in ratios],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
