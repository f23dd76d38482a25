"""The model-soup table from bench/soup_experiment.sh's runs: zero-shot top-1 of every fine-tuned
model, the best of them by held-out accuracy, the uniform soup, the greedy soup and (when made) the learned
soups.

    python bench/soup_table.py RUNS_DIR [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPLITS = ("test", "seen", "unseen")


def top1(path: Path) -> float | None:
    if not path.is_file():
        return None
    return round(100 * json.loads(path.read_text())["metrics"]["acc1"], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    record = args.runs / "greedy" / "config.json"
    if not record.is_file():
        raise SystemExit(f"no greedy soup in {args.runs} ({record} is missing): run bench/soup_experiment.sh first")
    greedy = json.loads(record.read_text())["source"]["greedy_soup"]
    # the held-out ("select") accuracy of each model alone, from the greedy soup's own record
    select = {Path(r["checkpoint"]).parents[1].name: round(100 * r["alone"], 1) for r in greedy}
    rows = []
    for d in sorted(args.runs.glob("ft-*")):
        if d.is_dir():
            rows.append({"model": d.name, "select": select.get(d.name), **{s: top1(d / f"eval-{s}.json") for s in SPLITS}})
    best = max(rows, key=lambda r: r["select"] if r["select"] is not None else -1)
    kept = [Path(r["checkpoint"]).parents[1].name for r in greedy if r["kept"]]
    rows += [
        {"model": f"best single by held-out ({best['model']})", "select": best["select"],
         **{s: best[s] for s in SPLITS}},
        {"model": f"uniform soup ({len(select)} models)", "select": None,
         **{s: top1(args.runs / "uniform" / f"eval-{s}.json") for s in SPLITS}},
        {"model": f"greedy soup ({', '.join(kept)})", "select": round(100 * max(r["soup"] for r in greedy if r["kept"]), 1),
         **{s: top1(args.runs / "greedy" / f"eval-{s}.json") for s in SPLITS}},
    ]
    learned_records = {}
    for kind in ("learned", "learned-by-layer", "learned-by-tensor", "learned-fixedT", "learned-by-layer-fixedT",
                 "learned-by-tensor-fixedT"):
        config = args.runs / kind / "config.json"
        if config.is_file():
            learned = json.loads(config.read_text())["source"]["learned_soup"]
            learned_records[kind] = learned
            alphas = ", ".join(f"{Path(m['checkpoint']).parents[1].name} {m['alpha']:.2f}" for m in learned["models"]
                               if m["alpha"] >= 0.05)
            per = learned.get("per", "tensor" if learned.get("by_tensor") else "model")
            rows.append({"model": f"{kind} soup ({alphas}{f'; mean over {per}s' if per != 'model' else ''})",
                         "select": round(100 * learned["learned"]["acc1"], 1),
                         **{s: top1(args.runs / kind / f"eval-{s}.json") for s in SPLITS}})
    rows.append({"model": "zero-shot start", "select": None, **{s: top1(args.runs / "zs" / f"eval-{s}.json") for s in SPLITS}})
    print("| model | CIFAR-10 held-out select (choosing) | CIFAR-10 held-out test | shapes seen | shapes unseen |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['select'] if r['select'] is not None else '—'} | {r['test']} | {r['seen']} | {r['unseen']} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "greedy_record": greedy, "learned_records": learned_records},
                                        indent=1))


if __name__ == "__main__":
    main()
