"""The table of bench/bf16_residual_experiment.sh, as Markdown: per arm and seed, the mean training loss
over the last 100 steps, the end-of-run zero-shot top-1 (%) on the seen and unseen splits and image->text
retrieval R@1 on seen, then the mean over seeds.

    python bench/bf16_residual_table.py RUNS_DIR
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ARMS = ("fp32", "amp", "bf16res")
COLUMNS = ("loss_last100", "zs_seen", "zs_unseen", "ret_seen")


def summarise(run: Path) -> dict | None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "zeroshot/seen/acc1" in r]
    train = [r for r in rows if "loss" in r]
    if not evals or not train:
        return None
    last = train[-1]["step"]
    ev = evals[-1]
    return {"loss_last100": statistics.mean(r["loss"] for r in train if r["step"] > last - 100),
            "zs_seen": 100 * ev["zeroshot/seen/acc1"], "zs_unseen": 100 * ev["zeroshot/unseen/acc1"],
            "ret_seen": 100 * ev["retrieval/seen/text_retrieval_recall@1"], "steps": last}


def main(runs: Path) -> None:
    print("| arm | seed | steps | train loss (last 100 steps) | zero-shot seen | zero-shot unseen | image→text R@1 seen |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    means = {}
    for arm in ARMS:
        results = []
        for run in sorted(runs.glob(f"{arm}-s*")):
            if not run.is_dir():
                continue
            s = summarise(run)
            if s is None:
                print(f"<!-- {run.name}: no end-of-run evaluation -- left out -->")
                continue
            results.append(s)
            seed = run.name.rsplit("-s", 1)[1]
            print(f"| {arm} | {seed} | {s['steps']} | {s['loss_last100']:.3f} | {s['zs_seen']:.1f} | {s['zs_unseen']:.1f} | {s['ret_seen']:.1f} |")
        if results:
            means[arm] = {c: statistics.mean(r[c] for r in results) for c in COLUMNS} | {"n": len(results)}
    print()
    print("| arm | seeds | train loss | zero-shot seen | zero-shot unseen | image→text R@1 seen |")
    print("| --- | --- | --- | --- | --- | --- |")
    for arm, m in means.items():
        print(f"| {arm} | {m['n']} | {m['loss_last100']:.3f} | {m['zs_seen']:.1f} | {m['zs_unseen']:.1f} | {m['ret_seen']:.1f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
