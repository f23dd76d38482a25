"""The ``clipforge`` command line: thin verbs that parse arguments and call the library."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup


class _PlainHelp:
    """Help shown as written. typer renders help text as rich markup, which drops "[default: x]" or
    "[[teachers]]" as if they were style tags (we use no markup in help), and it prints a <bool> type
    after on/off flags (--help, --no-plots), which reads as if the flag took a value."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.help:
            self.help = escape(self.help)
        for param in self.params:
            _plain_param(param)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            _plain_param(option)
        return option


def _plain_param(param) -> None:
    if getattr(param, "_plain_help", False):
        return  # escaped already (the help option is cached and asked for again)
    param._plain_help = True
    if getattr(param, "help", None):
        param.help = escape(param.help)
    if getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""  # no type column for a flag


class _Command(_PlainHelp, TyperCommand):
    pass


class _Group(_PlainHelp, TyperGroup):
    pass


class _App(typer.Typer):
    """A Typer whose commands use _Command (plain help text, no <bool> on flags)."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _App(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="Pre-train, evaluate and serve CLIP-family language-image models.",
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",  # the escaping in _PlainHelp assumes it
)
console = Console(stderr=True)

# Choices of options whose values the library checks itself (with messages that name the choices);
# shown in --help in place of the type (typer's own choice types would replace those messages with
# its generic one). Literals, so that --help imports nothing heavy; tests/test_user_paths.py checks
# that they match the library's lists.
TASK_CHOICES = ("zeroshot", "retrieval", "linear-probe")  # clipforge.eval.evaluate.TASKS
SIMILARITY_CHOICES = ("pooled", "late-interaction")
INDEX_KIND_CHOICES = ("flat", "ivf", "hnsw", "lexical")  # clipforge.index.dense.INDEX_KINDS + lexical
EXPORT_CHOICES = ("hf", "onnx", "openclip")  # clipforge.export.EXPORT_KINDS
EMBEDDING_CHOICES = ("images", "texts")  # clipforge.index.embed.KINDS
DTYPE_CHOICES = ("float16", "float32")  # clipforge.index.embed.DTYPES


def _choices(values: tuple[str, ...]) -> str:
    return "[" + "|".join(values) + "]"


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        typer.echo(f"clipforge {version('clipforge')}")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from clipforge import __version__

        typer.echo(f"clipforge {__version__}")
    raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the clipforge version and exit."),
) -> None:
    """Pre-train, evaluate and serve CLIP-family language-image models."""


def _train_recipe(recipe: str | None, run_dir: Path | None, overrides: list[str], resume: str | None):
    """(recipe to run, run dir, resume notes) for `clipforge train`; the notes are None unless the run
    resumes under its own recipe, else (changes as `key: old -> new`, keys of RECIPE the run does not take).

    With --resume and a RUN_DIR/recipe.toml (the trainer writes it at every start), the run continues
    under that recipe plus this command's overrides: a run started with --set keeps those values, and
    an edited or different recipe file cannot silently change it. Without one, RECIPE is used as before.
    """
    from clipforge.config import RecipeError, load_recipe
    from clipforge.train.params import ResumeError, check_resume_compatible

    if recipe is None and (resume is None or run_dir is None):
        raise typer.BadParameter("required, except with --resume and --run-dir (the run's own recipe.toml "
                                 "is used then)", param_hint="RECIPE")
    given = load_recipe(recipe, overrides) if recipe is not None else None
    run_dir = run_dir or Path("runs") / given.name
    saved = run_dir / "recipe.toml"
    if resume is None or not saved.is_file():
        if given is None:
            raise RecipeError(f"{run_dir} has no recipe.toml to resume with; name the recipe: "
                              f"clipforge train RECIPE --run-dir {run_dir} --resume {resume}")
        return given, run_dir, None
    own = load_recipe(str(saved))
    if given is not None and given.name != own.name:
        raise RecipeError(
            f"{run_dir} is a run of recipe '{own.name}' ({saved}), not '{given.name}': --resume continues a run "
            f"under its own recipe. Leave RECIPE out (or pass {own.name}) and change values with --set, or start "
            f"a new --run-dir that warm-starts from it with --set model.init_from={run_dir}")
    r = load_recipe(str(saved), overrides)
    try:
        changes = check_resume_compatible(own.model_dump(mode="json"), r)
    except ResumeError as e:
        # refused here, before the trainer rewrites recipe.toml with a recipe the run cannot take
        err = RecipeError(f"cannot resume {run_dir}: {e}")
        err.every_rank = True  # under torchrun every rank gets here: rank 0 prints it
        raise err from None
    ignored = []
    if given is not None:
        now = _flat(r.model_dump(mode="json"))
        ignored = [k for k, v in _flat(given.model_dump(mode="json")).items()
                   if k not in ("name", "description") and now.get(k) != v]
    return r, run_dir, (changes, ignored)


def _report_resume(recipe_arg: str | None, run_dir: Path, changes: list[str], ignored: list[str]) -> None:
    """Say that a resume runs the run's own recipe, list what --set changes in it (`key: old -> new`, the
    trainer's own list) and warn about values of a RECIPE file that the run does not take."""
    console.print(f"resuming {run_dir} with its recipe.toml" + (", changed by --set:" if changes else ""),
                  highlight=False, markup=False)
    for line in changes:
        console.print(f"  {line}", highlight=False, markup=False)
    if ignored:
        warnings.warn(f"{recipe_arg} differs from {run_dir / 'recipe.toml'} at {', '.join(ignored[:8])}"
                      f"{', ...' if len(ignored) > 8 else ''}; the run keeps its own values (change them with --set)")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_train_paths(r) -> None:
    """A data.train file or folder that is not there stops `train` before anything starts, with the
    recipe's own note on where its data comes from (shipped recipes name relative paths)."""
    from clipforge.config import RecipeError
    from clipforge.data.mixture import parse_train_spec
    from clipforge.data.sources import relative_note

    for spec in parse_train_spec(r.data.train):
        path = Path(spec.target).expanduser()
        if spec.kind in ("imagefolder", "jsonl", "csv") and not path.exists():
            what = "image folder" if spec.kind == "imagefolder" else f"{spec.kind} file"
            raise RecipeError(f"data.train: {what} not found: {path}{relative_note(path)}. "
                              f"Pass it with --set data.train={spec.kind}:PATH"
                              + (f". Recipe '{r.name}': {r.description}" if r.description else ""))


def _user_errors() -> tuple[type[BaseException], ...]:
    from clipforge.bench import BenchError
    from clipforge.config import RecipeError
    from clipforge.data.sources import DataError
    from clipforge.eval.evaluate import EvalError
    from clipforge.eval.linear_probe import MissingDependencyError
    from clipforge.index.dense import SearchIndexError
    from clipforge.index.embed import EmbedError
    from clipforge.index.server import ServerError
    from clipforge.models.convert import ConversionError  # also ExportError
    from clipforge.merge import MergeError
    from clipforge.models.fused_mlp import FusedMLPUnavailable
    from clipforge.models.hf_text import TextTowerError
    from clipforge.train.checkpoint import CheckpointError
    from clipforge.train.teachers import TeacherError
    from clipforge.train.trainer import TrainingError

    return (RecipeError, CheckpointError, TrainingError, FileNotFoundError, ConversionError, FileExistsError,
            EmbedError, SearchIndexError, ServerError, DataError, EvalError,
            MissingDependencyError, BenchError, FusedMLPUnavailable, MergeError, TeacherError, TextTowerError)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # escaped: messages quote lists and paths ("optim.betas: [0.9, 0.98] -> ..."), which markup would eat
    console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", soft_wrap=True, highlight=False)


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
    recipe: Optional[str] = typer.Argument(
        None, show_default=False,
        help="A shipped recipe name (see `clipforge recipes`) or a path to a .toml file. With --resume it may be "
             "left out: the run's own recipe.toml is used."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where checkpoints and logs go [default: runs/<recipe>]."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: --set optim.lr=3e-4 (repeatable)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' or a checkpoint directory to continue from."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Run N processes on this machine (launches torchrun; gloo on CPU, nccl on GPUs)."),
) -> None:
    """Train a model from a recipe; Ctrl-C / SIGTERM saves a checkpoint and exits cleanly.

    --resume continues a run under its own recipe (RUN_DIR/recipe.toml) with this command's --set
    values on top, and lists them as `key: old -> new`. RECIPE may then be left out; a RECIPE with
    another name than the run's is refused.

    Multi-process: `torchrun --nproc_per_node N -m clipforge train ...`, srun (SLURM), or --nproc N.
    data.batch_size is per process.
    """
    from clipforge.train import distributed as D
    from clipforge.train.trainer import Trainer

    r, run_dir, resume_notes = _train_recipe(recipe, run_dir, set_, resume)  # validate before launching anything
    _check_train_paths(r)
    rank, _, world, _ = D.read_launch_env()
    # built before any launch too: the hooks read the [[eval.tasks]] data, so a wrong path stops here
    hooks = _default_eval_hooks(r, world)
    if nproc is not None and nproc > 1:
        if world > 1:
            raise typer.BadParameter("--nproc inside an already distributed launch (torchrun/srun); drop --nproc")
        args = ["train", *([recipe] if recipe else []), "--run-dir", str(run_dir),
                *[a for s in set_ for a in ("--set", s)], *(["--resume", resume] if resume else [])]
        D.relaunch_with_torchrun(nproc, args)
    with warnings.catch_warnings():
        if resume_notes is not None and rank == 0:
            changes, ignored = resume_notes
            _report_resume(recipe, run_dir, changes, ignored)
            if changes:  # the trainer warns the same list on one line when the checkpoint agrees: once is enough
                warnings.filterwarnings("ignore", message=re.escape("resuming with recipe changes: "
                                                                    + "; ".join(changes)) + r"\Z")
        result = Trainer(r, run_dir, resume=resume, eval_hooks=hooks).fit()
    if rank != 0:
        return  # rank 0 reports for the group
    where = result.last_checkpoint
    if result.stopped_by == "signal":
        # soft_wrap: the command stays on one line, ready to copy
        console.print(f"stopped by signal at step {result.step}; checkpoint saved to {where}. "
                      f"Continue with: clipforge train --run-dir {run_dir} --resume latest",
                      soft_wrap=True, markup=False)
    elif result.stopped_by == "time-budget":
        console.print(f"time budget reached at step {result.step}; checkpoint saved to {where}")
    else:
        console.print(f"done: {result.step} steps; checkpoint {where}")


@app.command()
def distill(
    teacher: Path = typer.Argument(..., help="The teacher: a checkpoint or run directory (its latest checkpoint)."),
    student: str = typer.Option(..., "--student", help="The final student: fractions of the teacher "
                                "(width=0.5,layers=0.5) and/or sizes (vision_layers=3,text_width=64)."),
    stages: int = typer.Option(1, "--stages", min=1, help="Compress in this many stages, each inheriting from the last."),
    run_dir: Path = typer.Option(..., "--run-dir", help="Holds distill.json and one run directory per stage."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Data/optimiser/schedule recipe [default: the teacher's own]."),
    clip_weight: float = typer.Option(0.0, "--clip-weight", help="Share of the hard CLIP loss (TinyCLIP's 1 - alpha)."),
    prune_steps: Optional[int] = typer.Option(None, "--prune-steps", min=1, help="Automatic inheritance (--student "
                                              "sparsity=S): steps per stage that learn the L0 gates before pruning."),
    granularity: Optional[str] = typer.Option(None, "--granularity", help="Automatic inheritance: 'cofi' (default; TinyCLIP's: "
                                    "heads, MLP units and hidden dims per layer, attention and MLP apart; the student "
                                    "has per-layer shapes) or 'groups' (whole heads across layers and whole blocks; "
                                    "the student keeps one shape per tower and exports to OpenCLIP/HF)."),
    prune_size: Optional[str] = typer.Option(None, "--prune-size", help="Automatic inheritance: 'expected' (default; "
                                             "CoFi's test-time gates, which can keep more than the target) or "
                                             "'target' (then close the least likely open gates until the "
                                             "student's sparsity reaches the target)."),
    set_: list[str] = typer.Option([], "--set", help="Override a value of every stage's recipe (repeatable)."),
) -> None:
    """TinyCLIP multi-stage distillation: each stage's student inherits the previous stage's weights
    (manual: layers at a stride, leading heads/width; automatic with --student sparsity=S and
    --prune-steps: learnt L0 gates, then pruning) and mimics the original teacher's affinities.
    Rerunning the same command resumes: finished stages are skipped."""
    from clipforge.distill import run

    dirs = run(teacher, student, stages, run_dir, recipe, clip_weight, set_, eval_hooks=_default_eval_hooks,
               log=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True),
               prune_steps=prune_steps, granularity=granularity, prune_size=prune_size)
    if len(dirs) == stages:
        console.print(f"done: the student is {dirs[-1] / 'checkpoints' / 'latest'}", soft_wrap=True, markup=False)


@app.command()
def demo(
    run_dir: Path = typer.Option(Path("runs/demo"), "--run-dir", help="Where the demo run goes (an earlier demo there is replaced; any other folder is refused)."),
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
def bench(
    recipe: str = typer.Argument(..., help="A shipped recipe name or a path to a .toml file."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value (repeatable)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda [default: the recipe's train.device]."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 or bf16 [default: the recipe's]."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model [default: the recipe's train.compile]."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Per-step batch (data.batch_size)."),
    steps: int = typer.Option(5, "--steps", min=1, help="Optimiser steps per timed round."),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Timed rounds (per side, interleaved with --against)."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed steps per side first (compilation happens here)."),
    against: Optional[str] = typer.Option(None, "--against", help="Also time the same model in: openclip."),
    loader_batches: int = typer.Option(10, "--loader-batches", min=0, help="Batches to time the data loader alone (0: skip)."),
    profile: bool = typer.Option(False, "--profile", help="Add a torch.profiler breakdown (ms per op category) per side."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON here."),
) -> None:
    """Time the trainer's own step for a recipe: img/s, FLOPs, MFU, peak memory, loader img/s (JSON)."""
    from clipforge.bench import format_table, run_bench
    from clipforge.outputs import output_file

    if out is not None:
        output_file(out)  # a directory here is refused now, not after the timing
    result = run_bench(recipe, set_, device=device, precision=precision, compile=compile_, batch=batch,
                       steps=steps, rounds=rounds, warmup=warmup, against=against, loader_batches=loader_batches,
                       profile=profile)
    text = json.dumps(result, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    console.print(format_table(result), highlight=False, soft_wrap=True)
    typer.echo(text)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory written by `clipforge train`.")) -> None:
    """(Re)build the self-contained HTML report of a run."""
    from clipforge.eval.report import write_report

    typer.echo(str(write_report(run_dir)))


@app.command("eval")
def eval_(
    ckpts: list[str] = typer.Argument(
        ..., metavar="CKPT", show_default=False,
        help="Checkpoint directories (or run directories: their checkpoints/latest); several models give one result "
             "each. `clipforge eval merge RESULT.json... [--out table.csv]` merges result files (clipforge's or "
             "CLIP_benchmark's) into one table instead (a checkpoint directory named merge: write ./merge)."),
    task: Optional[str] = typer.Option(None, "--task", metavar=_choices(TASK_CHOICES),
                                       help="What to measure (required, except for merge)."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluation data: imagefolder:DIR, jsonl:FILE, csv:FILE, shapes:binding (built in, --task retrieval) or shapes:seen / shapes:unseen (built in, --task zeroshot: the trainer's own splits)."),
    train_data: Optional[str] = typer.Option(None, "--train-data", help="Training data for --task linear-probe."),
    classnames: Optional[Path] = typer.Option(None, "--classnames", help="Class names, one per line, in sorted class "
                                              "order [default: classnames.txt in the dataset folder, else the folder "
                                              "names]."),
    templates: Optional[str] = typer.Option(None, "--templates", help="Zero-shot prompts: a shipped set (photo, name, "
                                            "shapes) or a file, one per line with {} or {c} for the class [default: "
                                            "the dataset folder's zeroshot_classification_templates.txt or "
                                            "templates.txt, else photo]."),
    fewshot_k: Optional[int] = typer.Option(None, "--fewshot-k", help="Linear probe: k training images per class."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result JSON here (and plots next to it); with "
                                       "several models a directory or a pattern with {model}. For merge: the CSV "
                                       "table."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Do not write the confusion-matrix PNG."),
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes decoding images."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... [default: cuda if available]"),
    seed: int = typer.Option(0, "--seed", help="Seeds the linear probe's few-shot draw and validation split, and the "
                                               "--max-samples subset."),
    max_bad_fraction: float = typer.Option(0.05, "--max-bad-fraction", help="Stop when more images than this are unreadable."),
    similarity: str = typer.Option("pooled", "--similarity", metavar=_choices(SIMILARITY_CHOICES),
                                   help="Zero-shot and retrieval scores: pooled (one embedding each) or "
                                        "late-interaction (FILIP, token-wise)."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Evaluate a random subset of at most N "
                                              "images (zeroshot, retrieval), drawn with --seed."),
    per_class: bool = typer.Option(False, "--per-class", help="Add each class's top-1 accuracy and image count "
                                   "(zeroshot, linear-probe) to the result."),
    nmtune: bool = typer.Option(False, "--nmtune", help="Linear probe: NMTune feature-space tuning (residual MLP + "
                                "MSE/covariance/spectrum regularisers) on the frozen features."),
) -> None:
    """Evaluate checkpoints on your data: zero-shot classification, retrieval or a linear probe."""
    from clipforge.eval.evaluate import checkpoint_dir, evaluate, result_paths, result_table

    if ckpts[0] == "merge":
        if task is not None or data is not None:
            raise typer.BadParameter("merge takes result files and --out only", param_hint="--task/--data")
        _eval_merge(ckpts[1:], out)
        return
    for value, hint in ((task, "--task"), (data, "--data")):
        if value is None:  # optional in the signature only because merge takes neither
            raise typer.BadParameter("missing; it is required to evaluate a checkpoint", param_hint=hint)
    # all the file names and models first: a bad --out or a missing model stops before any work
    paths = result_paths(out, ckpts, task, data)
    for ckpt in ckpts:  # each resolves (or is refused) as evaluate will resolve it
        checkpoint_dir(ckpt)
    for ckpt, path in zip(ckpts, paths):
        result = evaluate(
            ckpt, task, data, train_data=train_data, classnames=classnames, templates=templates,
            fewshot_k=fewshot_k, out=path, plots=not no_plots, batch_size=batch_size, workers=workers,
            device=device, seed=seed, max_bad_fraction=max_bad_fraction, similarity=similarity, progress=True,
            max_samples=max_samples, per_class=per_class, nmtune=nmtune,
        )
        Console().print(result_table(result))
        if path is not None:
            plots = ", ".join(result.get("plots", {}).values())
            console.print(f"result: {path}" + (f"   plot: {plots}" if plots else ""), soft_wrap=True, markup=False)


def _eval_merge(files: list[str], out: Optional[Path]) -> None:
    """`clipforge eval merge`: result JSONs -> one CSV row each (to --out, else stdout), as CLIP_benchmark's build."""
    from clipforge.eval.evaluate import EvalError, merge_results, merged_table, write_merged_csv

    if not files:
        raise EvalError("merge needs result files: clipforge eval merge results/*.json --out table.csv")
    if out is not None:  # checked before reading: --out must not be one of the result files
        from clipforge.outputs import output_file

        try:
            output_file(out, files)
        except FileExistsError as e:
            raise EvalError(str(e)) from None
    rows = merge_results(files)
    if out is None:
        write_merged_csv(rows, sys.stdout)
        return
    write_merged_csv(rows, out)
    console.print(merged_table(rows))
    console.print(f"table: {out} ({len(rows)} results)")


@app.command()
def embed(
    ckpt: str = typer.Argument(..., help="A checkpoint directory (or a run directory: its checkpoints/latest)."),
    data: str = typer.Option(..., "--data", help="Images and captions: jsonl:FILE, csv:FILE or imagefolder:DIR."),
    out: Path = typer.Option(..., "--out", help="Embedding directory (resumes if it holds an unfinished run)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    shard_size: int = typer.Option(8192, "--shard-size", min=1, help="Rows per .npy shard (the unit of resume)."),
    dtype: str = typer.Option("float16", "--dtype", metavar=_choices(DTYPE_CHOICES), help="Shard dtype."),
    workers: int = typer.Option(2, "--workers", min=0, help="DataLoader worker processes decoding images."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, ... [default: cuda if available]"),
    max_bad_fraction: float = typer.Option(0.05, "--max-bad-fraction", help="Stop when more images than this are unreadable."),
    teacher_cache: bool = typer.Option(False, "--teacher-cache", help="Write a teacher cache for training instead: "
                                       "one embedding per sample of a training source (wds:/jsonl:/csv:/imagefolder:), "
                                       "keyed by the loader's sample keys ([[teachers]] kind = \"cache\")."),
    sparse: bool = typer.Option(False, "--sparse", help="Store the top-k vocabulary weights of a LexLIP model "
                                "(model.lexical_head) for `clipforge index --kind lexical`."),
) -> None:
    """Embed images and captions into .npy shards plus a Parquet metadata table (resumable)."""
    from clipforge.eval.evaluate import checkpoint_dir

    ckpt = str(checkpoint_dir(ckpt))  # the model `clipforge eval` would use for the same argument
    if teacher_cache:
        from clipforge.train.teacher_cache import write_teacher_cache

        manifest = write_teacher_cache(ckpt, data, out, batch_size=batch_size, device=device)
        console.print(f"teacher cache: {manifest['samples']} samples ({manifest['skipped']} unreadable skipped) -> {out}")
        return
    from clipforge.index.embed import embed_dataset

    summary = embed_dataset(ckpt, data, out, batch_size=batch_size, shard_size=shard_size, dtype=dtype,
                            workers=workers, device=device, max_bad_fraction=max_bad_fraction, progress=True,
                            sparse=sparse)
    console.print(f"embedded {summary['images']} images and {summary['texts']} captions "
                  f"({summary['skipped_images']} unreadable images skipped) -> {out}")


@app.command("index")
def index_(
    emb: Path = typer.Argument(..., help="An embedding directory written by `clipforge embed`."),
    kind: str = typer.Option("flat", "--kind", metavar=_choices(INDEX_KIND_CHOICES),
                             help="flat (exact), ivf or hnsw (approximate); lexical: an inverted index over "
                                  "sparse vocabulary weights (embed --sparse)."),
    out: Path = typer.Option(..., "--out", help="Index directory to write."),
    what: str = typer.Option("images", "--what", metavar=_choices(EMBEDDING_CHOICES),
                             help="Index the image or the text embeddings."),
    nlist: Optional[int] = typer.Option(None, "--nlist", min=1, help="IVF: clusters [default: ~4 sqrt(N)]."),
    nprobe: int = typer.Option(16, "--nprobe", min=1, help="IVF: clusters searched per query."),
    hnsw_m: int = typer.Option(32, "--hnsw-m", min=4, help="HNSW: links per node."),
    ef_search: int = typer.Option(64, "--ef-search", min=1, help="HNSW: search breadth."),
    queries: int = typer.Option(1000, "--queries", min=1, help="Held-out queries for measuring recall@10."),
    backend: str = typer.Option("scipy", "--backend", help="lexical: scipy (exact posting lists) or seismic "
                                "(approximate, pyseismic-lsr)."),
    quantize: Optional[float] = typer.Option(None, "--quantize", help="lexical: store integer impacts round(w x Q) "
                                             "(LexLIP / Anserini: 100) instead of float32 weights; recall against "
                                             "float32 is measured."),
) -> None:
    """Build a FAISS index; for approximate kinds, measure recall@10 against exact search."""
    import json as _json

    if what not in EMBEDDING_CHOICES:
        raise typer.BadParameter(f"{what!r}: index the image or the caption embeddings, one of "
                                 f"{', '.join(EMBEDDING_CHOICES)}", param_hint="--what")
    if kind != "lexical" and backend != "scipy":
        raise typer.BadParameter("--backend chooses how a lexical index searches: use it with --kind lexical",
                                 param_hint="--backend")
    if kind == "lexical":
        from clipforge.index.lexical import build_lexical_index_dir

        info = build_lexical_index_dir(emb, out, what=what, backend=backend, num_queries=queries, quantize=quantize)
        shown = ("kind", "backend", "count", "dim", "avg_nonzeros", "recall@10", "build_seconds", "index_bytes",
                 "quantize", "impact_dtype", "recall@10_vs_float32")
        typer.echo(_json.dumps({k: info[k] for k in shown if k in info}))
        return
    if quantize is not None:
        raise typer.BadParameter("--quantize stores a lexical index's weights as integers: use it with --kind lexical",
                                 param_hint="--quantize")
    from clipforge.index.dense import build_index_dir

    info = build_index_dir(emb, out, kind=kind, what=what, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m,
                           ef_search=ef_search, num_queries=queries)
    typer.echo(_json.dumps({k: info[k] for k in ("kind", "count", "dim", "recall@10", "queries", "build_seconds")}))


@app.command()
def serve(
    index: Path = typer.Argument(..., help="An index directory written by `clipforge index`."),
    port: int = typer.Option(8000, "--port"),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 exposes it to the network."),
    ckpt: Optional[str] = typer.Option(None, "--ckpt", help="Checkpoint (or run directory) for text/image queries "
                                                          "[default: the one embedded with]."),
) -> None:
    """Serve the search API and page at http://HOST:PORT/ (OpenAPI schema at /docs)."""
    from clipforge.eval.evaluate import checkpoint_dir
    from clipforge.index.server import run_server

    if ckpt is not None and Path(ckpt).exists():  # a missing one is explained with the index's own model
        ckpt = str(checkpoint_dir(ckpt))  # a run directory means its latest checkpoint, as for eval

    run_server(index, host=host, port=port, checkpoint=ckpt)


@app.command()
def export(
    ckpt: str = typer.Argument(..., help="A checkpoint directory (or a run directory: its checkpoints/latest)."),
    out: Path = typer.Argument(..., help="Output directory (new or empty; written only when the export succeeds)."),
    to: str = typer.Option(..., "--to", metavar=_choices(EXPORT_CHOICES),
                           help="hf (transformers CLIPModel), openclip (open_clip 'local-dir:') or onnx (two encoders)."),
) -> None:
    """Export a checkpoint to a Hugging Face CLIPModel directory, an OpenCLIP model directory or ONNX."""
    from clipforge.export import EXPORT_KINDS, export as export_checkpoint

    if to not in EXPORT_KINDS:
        raise typer.BadParameter(f"unknown target {to!r}; choose one of {', '.join(EXPORT_KINDS)}", param_hint="--to")
    console.print(f"exported to {export_checkpoint(ckpt, to, out)}")


@app.command()
def prune(
    ckpt: str = typer.Argument(..., help="A checkpoint of a method.name = 'tinyclip_prune' run (or its run directory: "
                               "its checkpoints/latest)."),
    out: Path = typer.Argument(..., help="Output directory (new or empty; written only when pruning succeeds)."),
    size: Optional[str] = typer.Option(None, "--size", metavar="expected|target",
                                       help="'expected': CoFi's test-time gates; 'target': then close the least likely "
                                       "open gates until the run's target_sparsity is reached [default: the run's "
                                       "method.prune_size]."),
) -> None:
    """TinyCLIP automatic inheritance: cut what a tinyclip_prune run's gates closed (hidden dims, heads, MLP
    units, sublayers, layers) out of its model, giving a smaller ordinary checkpoint that computes what the
    gated model computes (clipforge distill --student sparsity=S does this for you)."""
    from clipforge.distill import model_shape
    from clipforge.eval.evaluate import checkpoint_dir
    from clipforge.methods.tinyclip_prune import prune_checkpoint
    from clipforge.train import checkpoint as ckpt_io

    if size not in (None, "expected", "target"):
        raise typer.BadParameter(f"{size!r}: use expected or target", param_hint="--size")
    written = prune_checkpoint(checkpoint_dir(ckpt), out, size=size)
    config = ckpt_io.read_config(written)
    source = config.get("source") or {}
    console.print(f"pruned ({source.get('prune_size')}): block-weight sparsity {source.get('realised_sparsity')}; "
                  f"{model_shape(config['model'])}", soft_wrap=True, markup=False)
    console.print(f"written to {written}", soft_wrap=True, markup=False)


@app.command()
def merge(
    ckpts: list[str] = typer.Argument(..., help="Two or more checkpoints of one network (or run directories: their latest)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write (new or empty)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", min=0.0, max=1.0,
                                          help="Two checkpoints: (1 - alpha) * first + alpha * second (WiSE-FT: zero-shot, then fine-tuned)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="One weight per checkpoint, comma-separated, summing to 1 [default: uniform, a soup]."),
    greedy: bool = typer.Option(False, "--greedy", help="A greedy soup: models in order of held-out --metric on --data, each kept only if the soup's does not drop."),
    learned: bool = typer.Option(False, "--learned", help="A learned soup: mixing weights (softmax, one per model) fitted by gradient descent on held-out zero-shot cross-entropy on --data."),
    steps: int = typer.Option(100, "--steps", min=0, help="--learned: Adam steps on the mixing weights."),
    lr: float = typer.Option(0.05, "--lr", min=0.0, help="--learned: Adam's learning rate for the mixing weights."),
    by_layer: bool = typer.Option(False, "--by-layer", help="--learned: one mixing weight per model for every transformer block and other module (the paper's 'by layer')."),
    by_tensor: bool = typer.Option(False, "--by-tensor", help="--learned: one mixing weight per model for every tensor."),
    fixed_temperature: bool = typer.Option(False, "--fixed-temperature", help="--learned: do not fit a temperature beside the weights (the soup's logit scale alone)."),
    data: Optional[str] = typer.Option(None, "--data", help="--greedy / --learned: the held-out data, as clipforge eval takes it (not your test set)."),
    task: str = typer.Option("zeroshot", "--task", help="--greedy: zeroshot | retrieval | linear-probe (with --train-data)."),
    metric: Optional[str] = typer.Option(None, "--metric", help="--greedy: the metric to maximise [default: acc1; retrieval: image_retrieval_recall@1]."),
    train_data: Optional[str] = typer.Option(None, "--train-data", help="--greedy --task linear-probe: the probe's training data."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="--greedy / --learned: a fixed random subset of this many held-out images (zeroshot, retrieval)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="--greedy: evaluation batch size [64]; --learned: held-out images per step [256]."),
    device: Optional[str] = typer.Option(None, "--device", help="--greedy: where to evaluate [default: cuda if available]."),
) -> None:
    """Average checkpoints in weight space: WiSE-FT's interpolation, or a (greedy) model soup."""
    from clipforge.merge import merge as merge_checkpoints

    if learned:
        if greedy or alpha is not None or weights is not None:
            raise typer.BadParameter("--learned fits the weights itself: leave out --greedy, --alpha and --weights",
                                     param_hint="--learned")
        if data is None:
            raise typer.BadParameter("--learned fits the soup on held-out data: give --data (e.g. imagefolder:heldout/, "
                                     "labelled images none of the models trained on and not your test set)",
                                     param_hint="--data")
        if task != "zeroshot" or metric is not None or train_data is not None:
            raise typer.BadParameter("--learned fits zero-shot cross-entropy: leave out --task, --metric and --train-data",
                                     param_hint="--learned")
        if by_layer and by_tensor:
            raise typer.BadParameter("--by-layer or --by-tensor, not both", param_hint="--by-tensor")
        per = "layer" if by_layer else "tensor" if by_tensor else "model"
        _merge_learned(ckpts, out, data, max_samples=max_samples, steps=steps, lr=lr, per=per,
                       fit_temperature=not fixed_temperature,
                       batch_size=batch_size or 256, device=device)
        return
    if steps != 100 or lr != 0.05 or by_layer or by_tensor or fixed_temperature:
        raise typer.BadParameter("--steps, --lr, --by-layer, --by-tensor and --fixed-temperature fit a learned soup: "
                                 "add --learned",
                                 param_hint="--learned")
    batch_size = batch_size or 64
    if greedy:
        if alpha is not None or weights is not None:
            raise typer.BadParameter("--greedy chooses the models itself (each weighs the same): leave out "
                                     "--alpha and --weights", param_hint="--greedy")
        if data is None:
            raise typer.BadParameter("--greedy scores the soups on held-out data: give --data (e.g. "
                                     "imagefolder:heldout/, data none of the models trained on and not your test set)",
                                     param_hint="--data")
        _merge_greedy(ckpts, out, task, data, metric, device, train_data=train_data, batch_size=batch_size,
                      max_samples=max_samples)
        return
    if data is not None or metric is not None or train_data is not None or max_samples is not None:
        raise typer.BadParameter("--data, --metric, --train-data and --max-samples choose a greedy soup: add --greedy",
                                 param_hint="--greedy")
    if alpha is not None and weights is not None:
        raise typer.BadParameter("give --alpha (two checkpoints) or --weights, not both", param_hint="--alpha")
    if alpha is not None and len(ckpts) != 2:
        raise typer.BadParameter(f"--alpha interpolates two checkpoints, got {len(ckpts)}; use --weights",
                                 param_hint="--alpha")
    parsed = [1.0 - alpha, alpha] if alpha is not None else None
    if weights is not None:
        try:
            parsed = [float(w) for w in weights.split(",")]
        except ValueError:
            raise typer.BadParameter(f"{weights!r}: comma-separated numbers, e.g. 0.7,0.3", param_hint="--weights") from None
    console.print(f"merged into {merge_checkpoints(ckpts, out, parsed)}")


def _merge_greedy(ckpts: list[str], out: Path, task: str, data: str, metric: Optional[str], device: Optional[str],
                  **eval_options) -> None:
    from clipforge.merge import held_out_scorer, merge_greedy

    score, metric = held_out_scorer(ckpts[0], task, data, metric, device=device, **eval_options)
    plain = dict(highlight=False, markup=False, soft_wrap=True)  # paths, unwrapped
    written, record = merge_greedy(ckpts, out, score, log=lambda line: console.print(line, **plain))
    kept = [r for r in record if r["kept"]]
    console.print(f"greedy soup of {len(kept)} of {len(record)} models ({metric} {kept[-1]['soup']:.4f} on {data}) "
                  f"written to {written}", **plain)


def _merge_learned(ckpts: list[str], out: Path, data: str, *, device: Optional[str], **options) -> None:
    from clipforge.devices import pick_device
    from clipforge.merge import merge_learned

    plain = dict(highlight=False, markup=False, soft_wrap=True)  # paths, unwrapped
    device = pick_device(device)  # None: cuda if there is one
    written, record = merge_learned(ckpts, out, data, device=device, log=lambda line: console.print(line, **plain),
                                    **options)
    best = max(m["acc1_alone"] for m in record["models"])
    console.print(f"learned soup of {len(record['models'])} models (held-out acc1 {record['learned']['acc1']:.4f}; "
                  f"uniform {record['uniform']['acc1']:.4f}, best alone {best:.4f}) written to {written}", **plain)


@app.command("import")
def import_(
    source: str = typer.Argument(..., help="Where the weights come from: openclip | hf."),
    weights: Path = typer.Argument(..., help="openclip: .safetensors or a torch state dict / checkpoint, or a model directory (open_clip_config.json + weights); hf: a transformers CLIPModel directory."),
    config: Optional[Path] = typer.Option(None, "--config", help="openclip: the model's OpenCLIP JSON config (or Hub open_clip_config.json); not needed for a model directory."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write (new or empty)."),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="CLIP BPE merges file [default: from installed open_clip_torch]."),
) -> None:
    """Convert OpenCLIP or Hugging Face CLIP weights into a clipforge checkpoint (with CLIP's BPE tokenizer)."""
    from clipforge.models.convert import import_hf, import_openclip

    if source == "hf":
        console.print(f"imported to {import_hf(weights, out, vocab_file=vocab)}")
    elif source == "openclip":
        if config is None and not weights.is_dir():
            raise typer.BadParameter("openclip weights need their JSON config: --config open_clip_config.json "
                                     "(or give the model directory that holds both)", param_hint="--config")
        console.print(f"imported to {import_openclip(weights, config, out, vocab_file=vocab)}")
    else:
        raise typer.BadParameter(f"unknown source {source!r}; supported: openclip, hf", param_hint="SOURCE")


data_app = _App(cls=_Group, no_args_is_help=True, rich_markup_mode="rich",
               help="Prepare and check training data: WebDataset shards, dedup, reduce, concept counts.")
app.add_typer(data_app, name="data")


@data_app.command("shard")
def data_shard(
    source: str = typer.Argument(..., help="jsonl:FILE, csv:FILE (image + text/caption columns) or imagefolder:DIR."),
    out: Path = typer.Option(..., "--out", help="Directory for the shards (must hold no .tar yet)."),
    samples_per_shard: int = typer.Option(10000, "--samples-per-shard", help="Samples per tar shard."),
    caption_template: str = typer.Option("a photo of a {}.", "--caption-template",
                                         help="imagefolder: caption made from the class name."),
    caption_key: Optional[str] = typer.Option(None, "--caption-key", help="jsonl/csv: the caption column "
                                              "[default: text, caption, captions or title]."),
    shuffle: bool = typer.Option(True, "--shuffle/--no-shuffle", help="Shuffle samples across shards (seeded)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write WebDataset tar shards (img2dataset layout) plus sizes.json and stats.json."""
    from clipforge.data.shards import write_shards

    with _done_of_total_bar("shard") as progress:
        stats = write_shards(source, out, samples_per_shard, caption_template=caption_template,
                             caption_key=caption_key, shuffle=shuffle,
                             seed=seed, progress=progress)
    skipped = ", ".join(f"{k}: {v}" for k, v in stats["skipped"].items()) or "none"
    console.print(f"wrote {stats['samples']} samples in {stats['shards']} shards to {out} "
                  f"(skipped inputs: {skipped}); train with --set data.train='wds:{out}/"
                  f"{{00000..{stats['shards'] - 1:05d}}}.tar'", soft_wrap=True)


@data_app.command("inspect")
def data_inspect(
    shards: str = typer.Argument(..., help="A directory of .tar shards, or a pattern: 'wds:/data/{00000..00099}.tar'."),
    out: Path = typer.Option(Path("inspect"), "--out", help="Where inspect.json and samples.png go."),
    grid: int = typer.Option(16, "--grid", help="Samples shown in samples.png."),
    write_sizes: bool = typer.Option(False, "--write-sizes", help="Write sizes.json next to the shards."),
) -> None:
    """Read every sample: counts, unreadable samples per reason, caption lengths, a grid of samples."""
    from clipforge.data.shards import inspect_shards

    with _done_of_total_bar("inspect shards") as progress:
        report = inspect_shards(shards, out, grid=grid, write_sizes=write_sizes, progress=progress)
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "per_shard"}, indent=1))
    if report["bad_shards"]:
        console.print(f"[yellow]{len(report['bad_shards'])} shard(s) with unreadable samples[/yellow]; "
                      f"details per shard in {report.get('report')}")


@data_app.command("dedup")
def data_dedup(
    source: str = typer.Argument(..., help="A training source: wds:SHARDS, jsonl:FILE, csv:FILE or imagefolder:DIR."),
    model: Path = typer.Option(..., "--model", help="Checkpoint (or run) directory to embed with, or a teacher cache "
                                                    "directory (`clipforge embed --teacher-cache`) of this source."),
    out: Path = typer.Option(..., "--out", help="The keep-list to write (.parquet); the report goes next to it."),
    eps: float = typer.Option(0.05, "--eps", help="Remove an item whose cosine to an earlier one is above 1 - eps."),
    clusters: Optional[int] = typer.Option(None, "--clusters", help="K-means clusters [default: about sqrt(N)]."),
    order: str = typer.Option("hard", "--order", help="Who is kept in a group: hard (farthest from the centroid, "
                                                       "the paper's default), easy or random."),
    seed: int = typer.Option(0, "--seed", help="K-means seed."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """SemDeDup: drop semantic near-duplicates; write a keep-list for data.keep, a report and example pairs."""
    from clipforge.data.dedup import dedup_source

    report = dedup_source(source, model, out, eps=eps, clusters=clusters, seed=seed, order=order,
                          batch_size=batch_size, device=device)
    console.print(f"kept {report['kept']} of {report['samples']} samples ({report['kept_fraction']:.1%}) in "
                  f"{report['clusters']} clusters -> {out}; train with --set data.keep={out}", soft_wrap=True)


@data_app.command("reduce")
def data_reduce(
    source: str = typer.Argument(..., help="A training source: wds:SHARDS, jsonl:FILE, csv:FILE or imagefolder:DIR."),
    model: Path = typer.Option(..., "--model", help="Checkpoint (or run) directory, or a teacher cache of this source."),
    out: Path = typer.Option(..., "--out", help="The keep-list to write (.parquet); the report goes next to it."),
    keep: float = typer.Option(0.5, "--keep", help="Fraction of every cluster to keep."),
    clusters: Optional[int] = typer.Option(None, "--clusters", help="K-means clusters [default: about sqrt(N)]."),
    min_match_quantile: float = typer.Option(0.0, "--min-match-quantile", help="First drop the samples whose "
                                             "image-caption cosine is in this lowest quantile (TL;DR: 0.5)."),
    seed: int = typer.Option(0, "--seed", help="K-means seed."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """TL;DR-style reduction: keep a representative fraction of every embedding cluster (a keep-list)."""
    from clipforge.data.reduce import reduce_source

    report = reduce_source(source, model, out, keep=keep, clusters=clusters, seed=seed,
                           min_match_quantile=min_match_quantile, batch_size=batch_size, device=device)
    console.print(f"kept {report['kept']} of {report['samples']} samples ({report['kept_fraction']:.1%}) from "
                  f"{report['clusters']} clusters -> {out}; train with --set data.keep={out}", soft_wrap=True)


@data_app.command("concepts")
def data_concepts(
    source: str = typer.Argument(..., help="The pre-training source: wds:, jsonl:, csv:, imagefolder:, or shapes "
                                           "(with --max-samples)."),
    concepts: str = typer.Option(..., "--concepts", help="cifar10, shapes, an image folder (its class names) or a "
                                                         "file with one concept per line."),
    out: Path = typer.Option(..., "--out", help="Output directory: concepts.json, the plot, longtail.*"),
    model: Optional[Path] = typer.Option(None, "--model", help="Checkpoint (or run) directory: image-concept "
                                         "matches and zero-shot accuracy [default: caption counts only]."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Labelled eval data for per-concept zero-shot "
                                            "accuracy (imagefolder:DIR, jsonl:, csv:)."),
    accuracy: Optional[Path] = typer.Option(None, "--accuracy", help="Or a result of `clipforge eval --per-class`."),
    image_threshold: Optional[float] = typer.Option(None, "--image-threshold", help="Cosine for an image-concept "
                                                    "match [default: calibrated against the caption hits]."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Count the first N samples (required "
                                              "for shapes)."),
    tail: float = typer.Option(0.2, "--tail", help="Fraction of rarest concepts in the long-tail subset."),
    measure: Optional[str] = typer.Option(None, "--measure", help="text_frequency, image_frequency or "
                                          "matched_frequency [default: matched with --model, else text]."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    device: Optional[str] = typer.Option(None, "--device"),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
) -> None:
    """Concept frequency in captions and images vs per-concept zero-shot accuracy: log-linear fit, plot, long tail."""
    from clipforge.data.concepts import concept_frequencies

    result = concept_frequencies(source, concepts, out, model=model, eval_data=eval_data, accuracy=accuracy,
                                 image_threshold=image_threshold, max_samples=max_samples, tail=tail,
                                 measure=measure, batch_size=batch_size, device=device, seed=seed)
    fit = result.get("fit")
    if fit:
        console.print(f"accuracy = {fit['intercept']:.3f} + {fit['slope']:.3f} x log10({fit['measure']}) "
                      f"(r2 {fit['r2']:.2f}, slope 95% CI [{fit['slope_ci95'][0]:.3f}, {fit['slope_ci95'][1]:.3f}], "
                      f"{fit['points']} concepts)", soft_wrap=True)
    console.print(f"{result['concepts']} concepts over {result['captions']} captions -> {out}/concepts.json")


class _done_of_total_bar:
    """A transient rich bar driven by progress(done, total) callbacks."""

    def __init__(self, description: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                             console=console, transient=True)
        self._task = None

    def __enter__(self):
        self._bar.__enter__()
        self._task = self._bar.add_task("", total=None)
        return lambda done, total: self._bar.update(self._task, completed=done, total=total)

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)


def _default_eval_hooks(recipe, world_size: int = 1) -> list:
    """The built-in evaluation for the training data (if the evaluation module provides one) and the
    recipe's [[eval.tasks]]."""
    try:
        from clipforge.eval.hooks import default_eval_hooks
    except ImportError:
        return []
    return default_eval_hooks(recipe, world_size)


def main() -> None:
    warnings.showwarning = _show_warning
    try:
        app()
    except _user_errors() as e:
        rank = _launch_rank()
        if rank == 0 or not getattr(e, "every_rank", False):  # shared errors: rank 0 prints them once
            # escaped: messages may quote brackets (paths, C++ locations)
            console.print(f"[red]error:[/red] {'' if rank == 0 else f'(rank {rank}) '}{escape(str(e))}", soft_wrap=True, highlight=False)
        sys.exit(2)


def _launch_rank() -> int:
    from clipforge.train.distributed import read_launch_env

    return read_launch_env()[0]


if __name__ == "__main__":
    main()
