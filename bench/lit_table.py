"""The table of bench/lit_experiment.sh (docs/methods/lit-flame.md): text->image recall per arm and seed.

    python bench/lit_table.py RUNS_DIR

Reads RUNS_DIR/<arm>-s<seed>_heldout.json and ..._seen.json (clipforge eval --task retrieval results) and
prints R@1 / R@5 / R@10 (%) on the held-out and the training concepts, with the mean over the seeds found.
"""

from __future__ import annotations

import sys
from pathlib import Path
from statistics import mean

from eval_results import read_eval_results  # bench/, beside this script

ARMS = ("lit", "scratch", "flame", "lit-sigmoid")
SPLITS = ("heldout", "seen")
KS = (1, 5, 10)


def read(runs: Path) -> dict[tuple[str, int, str], dict]:
    """{(arm, seed, split): metrics}."""
    return read_eval_results(runs, ARMS, "heldout|seen")


def recalls(metrics: dict) -> list[float]:
    return [100 * metrics[f"image_retrieval_recall@{k}"] for k in KS]


def cell(values: list[float], bold: bool = False) -> str:
    text = " / ".join(f"{v:.1f}" for v in values)
    return f"**{text}**" if bold else text


def table(found: dict) -> list[str]:
    seeds = sorted({s for _, s, _ in found})
    lines = ["| arm | seed | held-out concepts R@1 / R@5 / R@10 | training concepts R@1 / R@5 / R@10 |",
             "| --- | --- | --- | --- |"]
    for arm in ARMS:
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
    runs = Path(sys.argv[1])
    found = read(runs)
    if not found:
        sys.exit(f"no <arm>-s<seed>_heldout.json in {runs}: run bench/lit_experiment.sh first")
    print("Text->image recall (%); each caption retrieves its image among the split's images\n")
    print("\n".join(table(found)))


if __name__ == "__main__":
    main()
