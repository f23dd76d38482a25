"""The table of bench/lit_experiment.sh (docs/methods/lit-flame.md): text->image recall per arm and seed.

    python bench/lit_table.py RUNS_DIR [--arms a,b,...]

--arms names the arms (default: the LiT experiment's four; bench/noncontrastive_emoji_experiment.sh's
table is `--arms clip,rocket,barlip,swalip,siamlip,byolip`). Reads RUNS_DIR/<arm>-s<seed>_heldout.json and ..._seen.json (clipforge eval --task retrieval results) and
prints R@1 / R@5 / R@10 (%) on the held-out and the training concepts, with the mean over the seeds found.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean

from eval_results import read_eval_results  # bench/, beside this script

ARMS = ("lit", "scratch", "flame", "lit-sigmoid")
SPLITS = ("heldout", "seen")
KS = (1, 5, 10)


def read(runs: Path, arms: tuple[str, ...]) -> dict[tuple[str, int, str], dict]:
    """{(arm, seed, split): metrics}."""
    return read_eval_results(runs, arms, "heldout|seen")


def recalls(metrics: dict) -> list[float]:
    return [100 * metrics[f"image_retrieval_recall@{k}"] for k in KS]


def cell(values: list[float], bold: bool = False) -> str:
    text = " / ".join(f"{v:.1f}" for v in values)
    return f"**{text}**" if bold else text


def table(found: dict, arms: tuple[str, ...]) -> list[str]:
    seeds = sorted({s for _, s, _ in found})
    lines = ["| arm | seed | held-out concepts R@1 / R@5 / R@10 | training concepts R@1 / R@5 / R@10 |",
             "| --- | --- | --- | --- |"]
    for arm in arms:
        for s in seeds:
            lines.append(f"| {arm} | {s} | " + " | ".join(cell(recalls(found[(arm, s, split)])) if (arm, s, split) in found
                                                      else "-" for split in SPLITS) + " |")
        means = []
        for split in SPLITS:
            runs = [recalls(found[(arm, s, split)]) for s in seeds if (arm, s, split) in found]
            means.append(cell([mean(col) for col in zip(*runs)], bold=True) if runs else "-")
        lines.append(f"| **{arm}** | mean | " + " | ".join(means) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names, in table order")
    args = parser.parse_args()
    arms = tuple(a for a in args.arms.split(",") if a)
    found = read(args.runs, arms)
    if not found:
        raise SystemExit(f"no <arm>-s<seed>_heldout.json for arms {', '.join(arms)} in {args.runs}: "
                         f"run bench/lit_experiment.sh (or the experiment that names these arms) first")
    print("Text->image recall (%); each caption retrieves its image among the split's images\n")
    print("\n".join(table(found, arms)))


if __name__ == "__main__":
    main()
