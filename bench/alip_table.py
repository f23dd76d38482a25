"""The ALIP experiment's table from its run dirs (bench/alip_experiment.sh): zero-shot seen / unseen per
arm, noise and seed, and the mean gate weights by noise kind over the last third of the steps.

    python bench/alip_table.py RUNS_DIR
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def last_third_weights(run: Path) -> dict[str, float]:
    rows = metric_rows(run)
    rows = [r for r in rows if any(k.startswith("alip/raw_weight/") for k in r)]
    tail = rows[len(rows) * 2 // 3:]
    keys = sorted({k for r in tail for k in r if "_weight/" in k})
    return {k.removeprefix("alip/"): round(statistics.mean(r[k] for r in tail if k in r), 3) for k in keys}


def main() -> None:
    runs = Path(sys.argv[1])
    table: dict = {}
    for run in sorted(p for p in runs.iterdir() if (p / "checkpoints" / "latest").exists()):
        arm, noise, seed = re.fullmatch(r"(.+)-p([0-9.]+)-s(\d+)", run.name).groups()
        ev = [r for r in metric_rows(run) if "zeroshot/seen/acc1" in r][-1]  # the trainer's end-of-run eval
        seconds = run.with_suffix(".seconds")
        table.setdefault(arm, {}).setdefault(noise, {})[seed] = {
            "seen": round(100 * ev["zeroshot/seen/acc1"], 1), "unseen": round(100 * ev["zeroshot/unseen/acc1"], 1),
            "seconds": int(seconds.read_text()) if seconds.is_file() else None,
            **({"weights": last_third_weights(run)} if arm.startswith("alip") else {})}
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
