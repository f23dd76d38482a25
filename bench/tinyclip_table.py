"""The table of bench/tinyclip_experiment.sh (docs/methods/tinyclip.md): zero-shot top-1 (%) on seen and
unseen compositions at student steps 100 / 200 / 300 / 400, per arm and seed, and the mean over seeds.

    python bench/tinyclip_table.py RUNS_DIR

Reads each run's metrics.jsonl (the trainer's built-in evaluation rows). The multi-stage arm's student
steps are stage 1's steps followed by stage 2's (stage_1/, stage_2/ of its run dir); the automatic arm's
are its stage_1/ (the pruned student; its gate-learning run, stage_1/masks/, is not a student step).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from statistics import mean

ARMS = ("scratch", "distill", "inherit", "inherit-clip", "multi", "auto", "auto-cofi", "auto-cofi-target", "auto-cofi-expected")
STEPS = (100, 200, 300, 400)
SPLITS = ("seen", "unseen")


def evaluations(metrics: Path, offset: int = 0) -> dict[int, dict]:
    """{student step: evaluation row} of one run's metrics.jsonl (``offset`` added to its steps)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {r["step"] + offset: r for r in rows if "zeroshot/seen/acc1" in r}


def run_evaluations(run: Path) -> dict[int, dict]:
    if (run / "metrics.jsonl").exists():
        return evaluations(run / "metrics.jsonl")
    found: dict[int, dict] = {}
    offset = 0
    for stage in sorted(run.glob("stage_*/metrics.jsonl"), key=lambda p: int(p.parent.name.removeprefix("stage_"))):
        stage_evals = evaluations(stage, offset)
        found.update(stage_evals)
        offset = max(stage_evals, default=offset)
    return found


def read(runs: Path) -> dict[tuple[str, int], dict[int, dict]]:
    found = {}
    for run in runs.iterdir():
        m = re.fullmatch(r"(.+)-s(\d+)", run.name)
        if m and m[1] in ARMS and run.is_dir():
            found[(m[1], int(m[2]))] = run_evaluations(run)
    return found


def curve(evals: dict[int, dict], split: str) -> list[float | None]:
    return [100 * evals[s][f"zeroshot/{split}/acc1"] if s in evals else None for s in STEPS]


def cells(values: list[float | None], bold_last: bool = True) -> str:
    text = [f"{v:.1f}" if v is not None else "-" for v in values]
    if bold_last:
        text[-1] = f"**{text[-1]}**"
    return " / ".join(text)


def table(found: dict) -> list[str]:
    seeds = sorted({s for _, s in found})
    lines = ["| arm | seed | seen, steps 100 / 200 / 300 / 400 | unseen, steps 100 / 200 / 300 / 400 |",
             "| --- | --- | --- | --- |"]
    for arm in ARMS:
        runs = [found[(arm, s)] for s in seeds if (arm, s) in found]
        for s in seeds:
            evals = found.get((arm, s), {})
            lines.append(f"| {arm} | {s} | " + " | ".join(cells(curve(evals, split)) for split in SPLITS) + " |")
        means = []
        for split in SPLITS:
            columns = zip(*(curve(e, split) for e in runs))
            means.append(cells([mean(c) if c and None not in c else None for c in columns]) if runs else "-")
        lines.append(f"| **{arm}** | mean | " + " | ".join(means) + " |")
    return lines


def block_weights(model: dict, prefix: str) -> int:
    """Weights of a tower's blocks from its config: 4 x head_dim x W per head, 2 x W per MLP unit."""
    width, layers, heads = (model[f"{prefix}_{k}"] for k in ("width", "layers", "heads"))
    head_dim = model.get(f"{prefix}_head_dim") or width // heads
    layer_heads = model.get(f"{prefix}_layer_heads") or [heads] * layers
    layer_mlp = model.get(f"{prefix}_layer_mlp") or [int(width * model["mlp_ratio"])] * layers
    return sum(4 * head_dim * width * h + 2 * width * u for h, u in zip(layer_heads, layer_mlp))


def pruned_shapes(found: dict, runs: Path) -> list[str]:
    """The automatic arms' pruned students: shape per tower, block weights, the gates' last expected sparsity."""
    lines = ["| arm | seed | vision: width, heads per layer, MLP units per layer | text: the same | block weights | "
             "expected sparsity at the last gate step |", "| --- | --- | --- | --- | --- | --- |"]
    for arm, seed in sorted(k for k in found if k[0].startswith("auto")):
        stage = runs / f"{arm}-s{seed}" / "stage_1"
        config = stage / "pruned" / "config.json"
        if not config.is_file():
            continue
        model = json.loads(config.read_text())["model"]
        towers = []
        for prefix in ("vision", "text"):
            layers = model[f"{prefix}_layers"]
            heads = model.get(f"{prefix}_layer_heads") or [model[f"{prefix}_heads"]] * layers
            units = model.get(f"{prefix}_layer_mlp") or [int(model[f"{prefix}_width"] * model["mlp_ratio"])] * layers
            towers.append(f"{model[prefix + '_width']}, {heads}, {units}")
        rows = [json.loads(line) for line in (stage / "masks" / "metrics.jsonl").read_text().splitlines() if line.strip()]
        sparsity = [r["prune/expected_sparsity"] for r in rows if "prune/expected_sparsity" in r]
        weights = block_weights(model, "vision") + block_weights(model, "text")
        lines.append(f"| {arm} | {seed} | {towers[0]} | {towers[1]} | {weights / 1e6:.3f} M | {sparsity[-1]:.3f} |")
    return lines


def main() -> None:
    runs = Path(sys.argv[1])
    found = read(runs) if runs.is_dir() else {}
    if not found:
        sys.exit(f"no <arm>-s<seed> runs in {runs}: run bench/tinyclip_experiment.sh first")
    teacher = runs / "teacher" / "metrics.jsonl"
    if teacher.exists():
        evals = evaluations(teacher)
        print("Teacher (tiny-shapes, seed 0): seen " + cells(curve(evals, "seen")) + "; unseen " + cells(curve(evals, "unseen")) + "\n")
    print("Zero-shot top-1 (%) at student steps 100 / 200 / 300 / 400\n")
    print("\n".join(table(found)))
    shapes = pruned_shapes(found, runs)
    if len(shapes) > 2:
        print("\nPruned students (automatic arms)\n")
        print("\n".join(shapes))


if __name__ == "__main__":
    main()
