"""``clipforge demo``: train tiny-shapes on the CPU under a wall-clock budget, evaluate, report.

The number of steps is calibrated to the budget before training (a few timed steps on this
machine), so the cosine schedule ends when the budget does and the run stays step-based, hence
exactly resumable. ``train.max_minutes`` stays on as a safety net.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from clipforge.config import Recipe, RecipeError, load_recipe


class StepTimer:
    """Times the trainer's own optimiser step (``clipforge.train.trainer.StepRunner``: the recipe's
    step module, its loss, clipping, the optimiser and the after-step hook) on one fixed batch of
    the recipe's data, built once."""

    def __init__(self, recipe: Recipe):
        from clipforge.bench import clipforge_side

        self.recipe = recipe
        self.side, self.batch = clipforge_side(recipe, torch.device("cpu"), count=False)

    def seconds(self, steps: int) -> list[float]:
        """Wall-clock seconds of each of ``steps`` optimiser steps."""
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.side.step()
            times.append(time.perf_counter() - start)
        return times


def time_one_step(recipe: Recipe, warmup: int = 2, timed: int = 4) -> float:
    """Median seconds per optimiser step of this recipe on this machine (synthetic batches)."""
    timer = StepTimer(recipe)
    timer.seconds(warmup)
    times = timer.seconds(timed)
    return sorted(times)[len(times) // 2]


DEMO_MARK = ".clipforge-demo"


def is_demo_run(run_dir: Path) -> bool:
    """A folder the demo wrote: its mark, or (older demos) an eval.json with the demo's summary."""
    if (run_dir / DEMO_MARK).is_file():
        return True
    try:
        return "train_and_eval_seconds" in json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def clear_demo_dir(run_dir: Path) -> None:
    """The demo always starts fresh, but replaces only a folder an earlier demo wrote."""
    if not run_dir.exists():
        return
    if not is_demo_run(run_dir):
        what = "a training run" if (run_dir / "recipe.toml").is_file() else "not a demo run"
        raise FileExistsError(f"{run_dir} exists and is {what}; the demo replaces only its own folders. "
                              "Choose another --run-dir (or remove that folder yourself)")
    shutil.rmtree(run_dir)


def run_demo(run_dir: str | Path = "runs/demo", minutes: float = 5.0, overrides: list[str] | None = None,
             recipe_name: str = "tiny-shapes", evals_during_training: int = 5) -> dict:
    from clipforge.eval.hooks import default_eval_hooks
    from clipforge.eval.report import write_report
    from clipforge.train.trainer import Trainer

    run_dir = Path(run_dir)
    if not minutes > 0:
        raise RecipeError(f"--minutes is the training budget in minutes and must be positive; got {minutes:g}")
    recipe = load_recipe(recipe_name, overrides)  # a bad --set is refused before anything is removed
    clear_demo_dir(run_dir)
    (run_dir / DEMO_MARK).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / DEMO_MARK).write_text("written by `clipforge demo`: the next demo may replace this folder\n")
    seconds_per_step = time_one_step(recipe)
    # leave ~15% of the budget for data start-up, periodic evaluation, checkpoints and load noise
    steps = max(20, int(0.85 * 60 * minutes / seconds_per_step))
    every = max(1, steps // evals_during_training)
    recipe = load_recipe(recipe_name, [
        *(overrides or []),
        f"train.steps={steps}",
        f"train.max_minutes={minutes}",
        f"eval.every_steps={every}",
        f"train.checkpoint_every_steps={every}",
        f"schedule.warmup_steps={min(recipe.schedule.warmup_steps, steps // 10)}",
    ])
    print(f"demo: {seconds_per_step:.2f} s/step measured -> {steps} steps of {recipe.data.batch_size} "
          f"images to fit {minutes:g} minutes")
    started = time.monotonic()
    result = Trainer(recipe, run_dir, eval_hooks=default_eval_hooks(recipe)).fit()
    train_seconds = time.monotonic() - started
    summary = {
        "recipe": recipe.name,
        "steps": result.step,
        "stopped_by": result.stopped_by,
        "train_and_eval_seconds": round(train_seconds, 1),
        "checkpoint": str(result.last_checkpoint),
        **{k: v for k, v in result.metrics.items() if k.startswith(("zeroshot/", "retrieval/"))},
    }
    (run_dir / "eval.json").write_text(json.dumps(summary, indent=2))
    summary["report"] = str(write_report(run_dir))
    return summary
