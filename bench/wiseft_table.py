"""The WiSE-FT table from bench/wiseft_experiment.sh's runs: zero-shot top-1 per alpha and seed, and the means.

    python bench/wiseft_table.py RUNS_DIR [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

SPLITS = ("cifar", "seen", "unseen")


def top1(path: Path) -> float | None:
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())["metrics"]
    return round(100 * metrics["acc1"], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = {}
    for d in sorted(args.runs.glob("wise-s*-*")):
        m = re.fullmatch(r"wise-s(\d+)-([0-9.]+)", d.name)
        if m and d.is_dir():
            rows[(float(m.group(2)), int(m.group(1)))] = {s: top1(d / f"eval-{s}.json") for s in SPLITS}
    alphas = sorted({a for a, _ in rows})
    seeds = sorted({s for _, s in rows})
    print("| alpha | " + " | ".join(f"seed {s}: CIFAR / seen / unseen" for s in seeds) + " | CIFAR-10 val mean "
          "| shapes seen mean | shapes unseen mean |")
    print("| --- " * (4 + len(seeds)) + "|")
    table = []
    for a in alphas:
        per_seed = [rows.get((a, s), {}) for s in seeds]
        means = {k: round(statistics.mean(v), 1) if (v := [r[k] for r in per_seed if r.get(k) is not None]) else None
                 for k in SPLITS}
        table.append({"alpha": a, "per_seed": dict(zip(seeds, per_seed)), "mean": means})
        print(f"| {a:g} | " + " | ".join(" / ".join(str(r.get(k)) for k in SPLITS) for r in per_seed)
              + f" | {means['cifar']} | {means['seen']} | {means['unseen']} |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
