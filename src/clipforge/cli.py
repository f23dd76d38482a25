"""The ``clipforge`` command line: thin verbs that parse arguments and call the library."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Pre-train, evaluate and serve CLIP-family language-image models.",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    from clipforge.config import RecipeError
    from clipforge.train.checkpoint import CheckpointError
    from clipforge.train.trainer import TrainingError

    return (RecipeError, CheckpointError, TrainingError, FileNotFoundError)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


@app.command()
def recipes(
    show: Optional[str] = typer.Option(None, "--show", help="Print one recipe fully resolved (TOML)."),
) -> None:
    """List the shipped recipes, one line each (or show one resolved)."""
    from clipforge.config import available_recipes, load_recipe, recipe_to_toml

    if show:
        typer.echo(recipe_to_toml(load_recipe(show)))
        return
    found = available_recipes()
    width = max(len(n) for n in found)
    for name, description in found.items():
        typer.echo(f"{name:<{width}}  {description}")


@app.command()
def train(
    recipe: str = typer.Argument(..., help="A shipped recipe name (see `clipforge recipes`) or a path to a .toml file."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where checkpoints and logs go [default: runs/<recipe>]."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: --set optim.lr=3e-4 (repeatable)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' or a checkpoint directory to continue from."),
) -> None:
    """Train a model from a recipe; Ctrl-C / SIGTERM saves a checkpoint and exits cleanly."""
    from clipforge.config import load_recipe
    from clipforge.train.trainer import Trainer

    r = load_recipe(recipe, set_)
    run_dir = run_dir or Path("runs") / r.name
    hooks = _default_eval_hooks(r)
    result = Trainer(r, run_dir, resume=resume, eval_hooks=hooks).fit()
    where = result.last_checkpoint
    if result.stopped_by == "signal":
        console.print(f"stopped by signal at step {result.step}; checkpoint saved to {where}. "
                      f"Continue with: clipforge train {recipe} --run-dir {run_dir} --resume latest")
    elif result.stopped_by == "time-budget":
        console.print(f"time budget reached at step {result.step}; checkpoint saved to {where}")
    else:
        console.print(f"done: {result.step} steps; checkpoint {where}")


@app.command()
def demo(
    run_dir: Path = typer.Option(Path("runs/demo"), "--run-dir", help="Where the demo run goes (replaced if it exists)."),
    minutes: float = typer.Option(5.0, "--minutes", help="Wall-clock budget for training."),
    set_: list[str] = typer.Option([], "--set", help="Override a tiny-shapes recipe value (repeatable)."),
) -> None:
    """Train tiny-shapes on the CPU within a time budget, evaluate, and write report.html."""
    from clipforge.demo import run_demo

    summary = run_demo(run_dir, minutes, set_)
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"clipforge demo: {summary['steps']} steps in {summary['train_and_eval_seconds']:.0f} s")
    table.add_column("compositions")
    for col in ("zero-shot top-1", "top-5", "text->image R@1", "image->text R@1"):
        table.add_column(col, justify="right")
    for split in ("seen", "unseen"):
        keys = (f"zeroshot/{split}/acc1", f"zeroshot/{split}/acc5",
                f"retrieval/{split}/image_retrieval_recall@1", f"retrieval/{split}/text_retrieval_recall@1")
        table.add_row(split, *(f"{100 * summary[k]:.1f}%" if k in summary else "-" for k in keys))
    Console().print(table)
    console.print(f"report: {summary['report']}   metrics: {Path(summary['report']).parent / 'eval.json'}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory written by `clipforge train`.")) -> None:
    """(Re)build the self-contained HTML report of a run."""
    from clipforge.eval.report import write_report

    typer.echo(str(write_report(run_dir)))


def _default_eval_hooks(recipe) -> list:
    """The built-in evaluation for the training data (if the evaluation module provides one)."""
    try:
        from clipforge.eval.hooks import default_eval_hooks
    except ImportError:
        return []
    return default_eval_hooks(recipe)


def main() -> None:
    warnings.showwarning = _show_warning
    try:
        app()
    except _user_errors() as e:
        console.print(f"[red]error:[/red] {e}")
        sys.exit(2)


if __name__ == "__main__":
    main()
