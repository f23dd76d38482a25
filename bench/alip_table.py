"""The tables of the ALIP experiment (bench/alip_experiment.sh) from its run dirs, as Markdown:

1. zero-shot top-1 (%) on the seen and unseen splits, per arm, noise and seed, and the mean over seeds
   (the trainer's end-of-run evaluation: the last metrics.jsonl row with ``zeroshot/seen/acc1``);
2. for the gated arm(s), the mean raw-pair and synthetic-pair weight per noise kind of the raw caption
   (``alip/raw_weight/<kind>``, ``alip/synthetic_weight/<kind>``) over the last third of the steps;
3. each run's wall time (``<run>.seconds``, measured inside the CPU lock) and its active objective terms,
   read back from the run's saved recipe.toml (so the CLIP arm is seen to train the clip term only).

    python bench/alip_table.py RUNS_DIR
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import tomllib
from pathlib import Path

ARMS = ("clip", "alip-nogates", "alip")
NOISE_KINDS = ("clean", "other_image", "dropped", "altered")
RUN_NAME = re.compile(r"(?P<arm>.+)-p(?P<noise>[0-9.]+)-s(?P<seed>\d+)")


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def final_eval(rows: list[dict]) -> dict | None:
    evals = [r for r in rows if "zeroshot/seen/acc1" in r]
    return evals[-1] if evals else None


def last_third_weights(rows: list[dict], total_steps: int) -> dict[str, float]:
    """Mean of each alip/*_weight/<kind> over the training rows of steps > 2/3 of the run."""
    tail = [r for r in rows if r["step"] > 2 * total_steps / 3 and any(k.startswith("alip/raw_weight/") for k in r)]
    keys = sorted({k for r in tail for k in r if k.startswith("alip/") and "_weight/" in k})
    return {k.removeprefix("alip/"): statistics.mean(r[k] for r in tail if k in r) for k in keys}


def load(runs: Path) -> dict[tuple[str, str, int], dict]:
    out = {}
    for run in sorted(p for p in runs.iterdir() if p.is_dir() and RUN_NAME.fullmatch(p.name)):
        m = RUN_NAME.fullmatch(run.name)
        rows = metric_rows(run) if (run / "metrics.jsonl").is_file() else []
        ev = final_eval(rows)
        if ev is None:
            print(f"<!-- {run.name}: no end-of-run evaluation (unfinished?) -- left out -->")
            continue
        recipe = tomllib.loads((run / "recipe.toml").read_text())
        steps = recipe["train"]["steps"]
        seconds = run.parent / f"{run.name}.seconds"
        out[(m["arm"], m["noise"], int(m["seed"]))] = {
            "seen": 100 * ev["zeroshot/seen/acc1"], "unseen": 100 * ev["zeroshot/unseen/acc1"],
            "eval_step": ev["step"], "steps": steps, "batch": recipe["data"]["batch_size"],
            "captions": recipe["data"]["shapes"]["captions"], "noise_cfg": recipe["data"]["shapes"]["raw_caption_noise"],
            "terms": [{k: v for k, v in t.items() if k in ("name", "gates")} for t in recipe["objective"]["terms"]],
            "seconds": float(seconds.read_text()) if seconds.is_file() else None,
            "weights": last_third_weights(rows, steps),
        }
    return out


def fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def main() -> None:
    runs = Path(sys.argv[1])
    res = load(runs)
    arms = [a for a in ARMS if any(k[0] == a for k in res)] + sorted({k[0] for k in res} - set(ARMS))
    noises = sorted({k[1] for k in res}, key=float)
    seeds = sorted({k[2] for k in res})

    print("Zero-shot top-1 (%), seen / unseen, end of run\n")
    head = " | ".join(f"s{s} seen / unseen" for s in seeds)
    print(f"| arm | p | {head} | mean seen | mean unseen |")
    print("| --- | --- |" + " --- |" * (len(seeds) + 2))
    for arm in arms:
        for p in noises:
            cells = [res.get((arm, p, s)) for s in seeds]
            if not any(cells):
                continue
            per_seed = " | ".join(f"{c['seen']:.1f} / {c['unseen']:.1f}" if c else "–" for c in cells)
            have = [c for c in cells if c]
            mean_seen = statistics.mean(c["seen"] for c in have)
            mean_unseen = statistics.mean(c["unseen"] for c in have)
            note = "" if len(have) == len(seeds) else f" (n={len(have)})"
            print(f"| {arm} | {p} | {per_seed} | {mean_seen:.1f}{note} | {mean_unseen:.1f}{note} |")

    gated = [a for a in arms if a == "alip"]
    for arm in gated:
        print(f"\nGate weights of `{arm}` by the raw caption's noise kind, mean over the last third of the steps "
              "(raw pair w^s·w^T / synthetic pair w^s·w^C; per seed)\n")
        print("| p | raw caption | " + " | ".join(f"s{s} raw / syn" for s in seeds) + " | mean raw | mean syn |")
        print("| --- | --- |" + " --- |" * (len(seeds) + 2))
        for p in noises:
            for kind in NOISE_KINDS:
                cells = [res.get((arm, p, s), {}).get("weights", {}) for s in seeds]
                pairs = [(c.get(f"raw_weight/{kind}"), c.get(f"synthetic_weight/{kind}")) for c in cells]
                if not any(r is not None for r, _ in pairs):
                    continue
                raws = [r for r, _ in pairs if r is not None]
                syns = [y for _, y in pairs if y is not None]
                cols = " | ".join(f"{fmt(r, 2)} / {fmt(y, 2)}" for r, y in pairs)
                print(f"| {p} | {kind} | {cols} | {statistics.mean(raws):.2f} | {statistics.mean(syns):.2f} |")

    print("\nRuns: steps, batch, captions, objective terms (from each run's recipe.toml), wall time inside the lock\n")
    print("| run | steps | batch | captions | raw noise | terms | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (arm, p, s), c in sorted(res.items(), key=lambda kv: (ARMS.index(kv[0][0]) if kv[0][0] in ARMS else 9,
                                                               float(kv[0][1]), kv[0][2])):
        terms = ", ".join(json.dumps(t, separators=(",", ":")) for t in c["terms"])
        print(f"| {arm}-p{p}-s{s} | {c['eval_step']}/{c['steps']} | {c['batch']} | {c['captions']} | {c['noise_cfg']} "
              f"| `{terms}` | {fmt(c['seconds'], 0)} |")


if __name__ == "__main__":
    main()
