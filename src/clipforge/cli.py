"""The ``clipforge`` command line: thin verbs that parse arguments and call the library."""

from __future__ import annotations

import json
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
    from clipforge.bench import BenchError
    from clipforge.config import RecipeError
    from clipforge.data.sources import DataError
    from clipforge.eval.evaluate import EvalError
    from clipforge.eval.linear_probe import MissingDependencyError
    from clipforge.index.dense import SearchIndexError
    from clipforge.index.embed import EmbedError
    from clipforge.index.server import ServerError
    from clipforge.models.convert import ConversionError  # also ExportError
    from clipforge.train.checkpoint import CheckpointError
    from clipforge.train.trainer import TrainingError

    return (RecipeError, CheckpointError, TrainingError, FileNotFoundError, ConversionError, FileExistsError,
            EmbedError, SearchIndexError, ServerError, DataError, EvalError,
            MissingDependencyError, BenchError)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True, highlight=False)


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
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Run N processes on this machine (launches torchrun; gloo on CPU, nccl on GPUs)."),
) -> None:
    """Train a model from a recipe; Ctrl-C / SIGTERM saves a checkpoint and exits cleanly.

    Multi-process: `torchrun --nproc_per_node N -m clipforge train ...`, srun (SLURM), or --nproc N.
    data.batch_size is per process.
    """
    from clipforge.config import load_recipe
    from clipforge.train import distributed as D
    from clipforge.train.trainer import Trainer

    r = load_recipe(recipe, set_)  # validate before launching anything
    if nproc is not None and nproc > 1:
        if D.read_launch_env()[2] > 1:
            raise typer.BadParameter("--nproc inside an already distributed launch (torchrun/srun); drop --nproc")
        args = ["train", recipe, *(["--run-dir", str(run_dir)] if run_dir else []),
                *[a for s in set_ for a in ("--set", s)], *(["--resume", resume] if resume else [])]
        D.relaunch_with_torchrun(nproc, args)
    run_dir = run_dir or Path("runs") / r.name
    rank, _, world, _ = D.read_launch_env()
    hooks = [D.sharded_shapes_eval(r)] if world > 1 and r.data.train == "shapes" else _default_eval_hooks(r)
    result = Trainer(r, run_dir, resume=resume, eval_hooks=hooks).fit()
    if rank != 0:
        return  # rank 0 reports for the group
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
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON here."),
) -> None:
    """Time the trainer's own step for a recipe: img/s, FLOPs, MFU, peak memory, loader img/s (JSON)."""
    from clipforge.bench import format_table, run_bench

    result = run_bench(recipe, set_, device=device, precision=precision, compile=compile_, batch=batch,
                       steps=steps, rounds=rounds, warmup=warmup, against=against, loader_batches=loader_batches)
    text = json.dumps(result, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    console.print(format_table(result), highlight=False)
    typer.echo(text)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory written by `clipforge train`.")) -> None:
    """(Re)build the self-contained HTML report of a run."""
    from clipforge.eval.report import write_report

    typer.echo(str(write_report(run_dir)))


@app.command("eval")
def eval_(
    ckpt: str = typer.Argument(..., help="A checkpoint directory (or a run directory: its checkpoints/latest)."),
    task: str = typer.Option(..., "--task", help="zeroshot | retrieval | linear-probe"),
    data: str = typer.Option(..., "--data", help="Evaluation data: imagefolder:DIR, jsonl:FILE, csv:FILE, or shapes:binding (built in, retrieval)."),
    train_data: Optional[str] = typer.Option(None, "--train-data", help="Training data for --task linear-probe."),
    classnames: Optional[Path] = typer.Option(None, "--classnames", help="Class names, one per line, in sorted class order."),
    templates: str = typer.Option("photo", "--templates", help="Zero-shot prompts: a shipped set (photo, name, shapes) or a file."),
    fewshot_k: Optional[int] = typer.Option(None, "--fewshot-k", help="Linear probe: k training images per class."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result JSON here (and plots next to it)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Do not write the confusion-matrix PNG."),
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes decoding images."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... [default: cuda if available]"),
    seed: int = typer.Option(0, "--seed", help="Seeds the linear probe's few-shot draw and validation split."),
    max_bad_fraction: float = typer.Option(0.05, "--max-bad-fraction", help="Stop when more images than this are unreadable."),
    similarity: str = typer.Option("pooled", "--similarity", help="Retrieval scores: pooled (one embedding each) or late-interaction (FILIP, token-wise)."),
) -> None:
    """Evaluate a checkpoint on your data: zero-shot classification, retrieval or a linear probe."""
    from clipforge.eval.evaluate import evaluate, result_table

    result = evaluate(
        ckpt, task, data, train_data=train_data, classnames=classnames, templates=templates,
        fewshot_k=fewshot_k, out=out, plots=not no_plots, batch_size=batch_size, workers=workers,
        device=device, seed=seed, max_bad_fraction=max_bad_fraction, similarity=similarity, progress=True,
    )
    Console().print(result_table(result))
    if out is not None:
        plots = ", ".join(result.get("plots", {}).values())
        console.print(f"result: {out}" + (f"   plot: {plots}" if plots else ""))


@app.command()
def embed(
    ckpt: str = typer.Argument(..., help="A checkpoint directory."),
    data: str = typer.Option(..., "--data", help="Images and captions: jsonl:FILE, csv:FILE or imagefolder:DIR."),
    out: Path = typer.Option(..., "--out", help="Embedding directory (resumes if it holds an unfinished run)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    shard_size: int = typer.Option(8192, "--shard-size", min=1, help="Rows per .npy shard (the unit of resume)."),
    dtype: str = typer.Option("float16", "--dtype", help="float16 or float32 shards."),
    workers: int = typer.Option(2, "--workers", min=0, help="DataLoader worker processes decoding images."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, ... [default: cuda if available]"),
    max_bad_fraction: float = typer.Option(0.05, "--max-bad-fraction", help="Stop when more images than this are unreadable."),
    teacher_cache: bool = typer.Option(False, "--teacher-cache", help="Write a teacher cache for training instead: "
                                       "one embedding per sample of a training source (wds:/jsonl:/csv:/imagefolder:), "
                                       "keyed by the loader's sample keys ([[teachers]] kind = \"cache\")."),
) -> None:
    """Embed images and captions into .npy shards plus a Parquet metadata table (resumable)."""
    if teacher_cache:
        from clipforge.train.teacher_cache import write_teacher_cache

        manifest = write_teacher_cache(ckpt, data, out, batch_size=batch_size, device=device)
        console.print(f"teacher cache: {manifest['samples']} samples ({manifest['skipped']} unreadable skipped) -> {out}")
        return
    from clipforge.index.embed import embed_dataset

    summary = embed_dataset(ckpt, data, out, batch_size=batch_size, shard_size=shard_size, dtype=dtype,
                            workers=workers, device=device, max_bad_fraction=max_bad_fraction, progress=True)
    console.print(f"embedded {summary['images']} images and {summary['texts']} captions "
                  f"({summary['skipped_images']} unreadable images skipped) -> {out}")


@app.command("index")
def index_(
    emb: Path = typer.Argument(..., help="An embedding directory written by `clipforge embed`."),
    kind: str = typer.Option("flat", "--kind", help="flat (exact), ivf or hnsw (approximate)."),
    out: Path = typer.Option(..., "--out", help="Index directory to write."),
    what: str = typer.Option("images", "--what", help="Index the image or the text embeddings."),
    nlist: Optional[int] = typer.Option(None, "--nlist", min=1, help="IVF: clusters [default: ~4 sqrt(N)]."),
    nprobe: int = typer.Option(16, "--nprobe", min=1, help="IVF: clusters searched per query."),
    hnsw_m: int = typer.Option(32, "--hnsw-m", min=4, help="HNSW: links per node."),
    ef_search: int = typer.Option(64, "--ef-search", min=1, help="HNSW: search breadth."),
    queries: int = typer.Option(1000, "--queries", min=1, help="Held-out queries for measuring recall@10."),
) -> None:
    """Build a FAISS index; for approximate kinds, measure recall@10 against exact search."""
    import json as _json

    from clipforge.index.dense import build_index_dir

    info = build_index_dir(emb, out, kind=kind, what=what, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m,
                           ef_search=ef_search, num_queries=queries)
    typer.echo(_json.dumps({k: info[k] for k in ("kind", "count", "dim", "recall@10", "queries", "build_seconds")}))


@app.command()
def serve(
    index: Path = typer.Argument(..., help="An index directory written by `clipforge index`."),
    port: int = typer.Option(8000, "--port"),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 exposes it to the network."),
    ckpt: Optional[str] = typer.Option(None, "--ckpt", help="Checkpoint for text/image queries [default: the one embedded with]."),
) -> None:
    """Serve the search API and page at http://HOST:PORT/ (OpenAPI schema at /docs)."""
    from clipforge.index.server import run_server

    run_server(index, host=host, port=port, checkpoint=ckpt)


@app.command()
def export(
    ckpt: str = typer.Argument(..., help="A checkpoint directory."),
    out: Path = typer.Argument(..., help="Output directory (new or empty)."),
    to: str = typer.Option(..., "--to", help="hf (transformers CLIPModel) or onnx (two encoders)."),
) -> None:
    """Export a checkpoint to a Hugging Face CLIPModel directory or to ONNX."""
    from clipforge.export import EXPORT_KINDS, export as export_checkpoint

    if to not in EXPORT_KINDS:
        raise typer.BadParameter(f"unknown target {to!r}; choose one of {', '.join(EXPORT_KINDS)}", param_hint="--to")
    console.print(f"exported to {export_checkpoint(ckpt, to, out)}")


@app.command("import")
def import_(
    source: str = typer.Argument(..., help="Where the weights come from: openclip."),
    weights: Path = typer.Argument(..., help="OpenCLIP weights: .safetensors or a torch state dict / checkpoint."),
    config: Path = typer.Option(..., "--config", help="The model's OpenCLIP JSON config (or Hub open_clip_config.json)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write (new or empty)."),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="CLIP BPE merges file [default: from installed open_clip_torch]."),
) -> None:
    """Convert OpenCLIP ViT weights into a clipforge checkpoint (with CLIP's BPE tokenizer)."""
    from clipforge.models.convert import import_openclip

    if source != "openclip":
        raise typer.BadParameter(f"unknown source {source!r}; supported: openclip", param_hint="SOURCE")
    console.print(f"imported to {import_openclip(weights, config, out, vocab_file=vocab)}")


data_app = typer.Typer(no_args_is_help=True, help="Prepare and check training data: WebDataset shards.")
app.add_typer(data_app, name="data")


@data_app.command("shard")
def data_shard(
    source: str = typer.Argument(..., help="jsonl:FILE, csv:FILE (image + text/caption columns) or imagefolder:DIR."),
    out: Path = typer.Option(..., "--out", help="Directory for the shards (must hold no .tar yet)."),
    samples_per_shard: int = typer.Option(10000, "--samples-per-shard", help="Samples per tar shard."),
    caption_template: str = typer.Option("a photo of a {}.", "--caption-template",
                                         help="imagefolder: caption made from the class name."),
    shuffle: bool = typer.Option(True, "--shuffle/--no-shuffle", help="Shuffle samples across shards (seeded)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write WebDataset tar shards (img2dataset layout) plus sizes.json and stats.json."""
    from clipforge.data.shards import write_shards

    with _done_of_total_bar("shard") as progress:
        stats = write_shards(source, out, samples_per_shard, caption_template=caption_template, shuffle=shuffle,
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
        rank = _launch_rank()
        if rank == 0 or not getattr(e, "every_rank", False):  # shared errors: rank 0 prints them once
            from rich.markup import escape  # messages may quote brackets (paths, C++ locations)

            console.print(f"[red]error:[/red] {'' if rank == 0 else f'(rank {rank}) '}{escape(str(e))}", soft_wrap=True, highlight=False)
        sys.exit(2)


def _launch_rank() -> int:
    from clipforge.train.distributed import read_launch_env

    return read_launch_env()[0]


if __name__ == "__main__":
    main()
