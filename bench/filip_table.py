"""Markdown tables of bench/filip_experiment.sh's evaluations (docs/methods/filip.md).

    python bench/filip_table.py RUNS_DIR

Reads RUNS_DIR/<arm>-s<seed>_zs_<split>_<similarity>.json and ..._binding_<similarity>.json (clipforge
eval results) and prints zero-shot top-1 and the binding split's metrics per arm, seed and similarity,
with the mean over the seeds found.
"""

from __future__ import annotations

import sys
from pathlib import Path
from statistics import mean

from eval_results import read_eval_results  # bench/, beside this script

ARMS = ("clip", "filip", "filip-2r", "filip-keep25")
SIMILARITIES = ("pooled", "late-interaction")
BINDING = ("binding_acc", "binding_acc_attribute_swap", "binding_acc_shape_swap", "binding_acc_relation_flip",
           "binding_acc_order_swap", "image_retrieval_recall@1", "text_retrieval_recall@1")


def read(runs: Path) -> dict[tuple[str, int, str], dict]:
    """{(arm, seed, what): metrics} with what = "zs_<split>_<similarity>" or "binding_<similarity>"."""
    return read_eval_results(runs, ARMS)


def present(found: dict) -> list[str]:
    """The arms with at least one result (a missing seed of such an arm is shown as '-')."""
    return [arm for arm in ARMS if any(key[0] == arm for key in found)]


def row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def zeroshot_table(found: dict, seeds: list[int]) -> list[str]:
    whats = [f"zs_{split}_{sim}" for sim in SIMILARITIES for split in ("seen", "unseen")]
    lines = [row(["arm", "seed", "pooled: seen", "pooled: unseen", "late interaction: seen", "late interaction: unseen"]),
             row(["---"] * 6)]
    for arm in present(found):
        values = {w: [found[(arm, s, w)]["acc1"] for s in seeds if (arm, s, w) in found] for w in whats}
        for s in seeds:
            lines.append(row([arm, str(s)] + [f"{100 * found[(arm, s, w)]['acc1']:.1f}" if (arm, s, w) in found
                                               else "-" for w in whats]))
        lines.append(row([f"**{arm}**", "mean"] + [f"**{100 * mean(v):.1f}**" if v else "-" for v in values.values()]))
    return lines


def binding_table(found: dict, seeds: list[int]) -> list[str]:
    lines = [row(["arm", "similarity", "seed", *BINDING]), row(["---"] * (3 + len(BINDING)))]
    for arm in present(found):
        for sim in SIMILARITIES:
            got = [(s, found[(arm, s, f"binding_{sim}")]) for s in seeds if (arm, s, f"binding_{sim}") in found]
            for s, m in got:
                lines.append(row([arm, sim, str(s)] + [f"{m[k]:.3f}" for k in BINDING]))
            if got:
                lines.append(row([f"**{arm}**", sim, "mean"] + [f"**{mean(m[k] for _, m in got):.3f}**" for k in BINDING]))
    return lines


def main() -> None:
    runs = Path(sys.argv[1])
    found = read(runs)
    if not found:
        sys.exit(f"no <arm>-s<seed>_*.json evaluation results in {runs}; run bench/filip_experiment.sh first")
    seeds = sorted({s for _, s, _ in found})
    print("\n".join(zeroshot_table(found, seeds) + [""] + binding_table(found, seeds)))


if __name__ == "__main__":
    main()
