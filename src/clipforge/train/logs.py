"""What a training run tells its user: metrics.jsonl and TensorBoard, the progress bar or plain
progress lines (logs that are not a terminal: SLURM, nohup, CI), the start-up banner, the
evaluation results, run_info.json and the optional trackers (wandb, trackio, mlflow)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from clipforge.config import Recipe, recipe_to_toml
from clipforge.train import distributed as D


def _shared_error():
    from clipforge.train.trainer import _shared_error as make  # the trainer's error type (imports this module)

    return make


def _resolve_precision(recipe, device):
    from clipforge.train.trainer import resolve_precision

    return resolve_precision(recipe, device)


class NoLog:
    """What ranks other than 0 log: nothing."""

    def write(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def write_eval(self, step: int, results: dict[str, float], final: bool = False) -> None:
        pass

    def close(self, step: int | None = None, outcome: str | None = None) -> None:
        pass


def read_metric_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A line that is not a whole record (a crash or a full disk in the
    middle of a write) is skipped with a warning instead of making the run unreadable and unresumable."""
    records, damaged = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            damaged += 1
    if damaged:
        warnings.warn(f"{path}: skipped {damaged} damaged line(s) (not a whole JSON record with a step; a write "
                      "cut short by a crash or a full disk)")
    return records


class MetricsLog:
    """metrics.jsonl (+ TensorBoard, + the trackers in ``logging.report_to``), run_info.json, and the
    evaluation results printed to stdout. On resume, records past the resumed step are dropped."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool, recipe: Recipe | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.info_path = run_dir / "run_info.json"
        self._resumed = resume_step is not None
        self._session: dict[str, Any] | None = None
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metric_records(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None:
            self.path.write_text("")
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
            if recipe is not None:  # the hyper-parameters next to the curves (TEXT tab)
                self._tb.add_text("recipe", _indent_markdown(recipe_to_toml(recipe)), resume_step or 0)
        self._trackers = [_Tracker(name, run_dir, recipe) for name in recipe.logging.report_to] if recipe else []

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        for tracker in self._trackers:
            tracker.log(step, metrics)

    def write_eval(self, step: int, results: dict[str, float], final: bool = False) -> None:
        """Log an evaluation and print it: in a SLURM/CI log it is the only place the numbers show."""
        self.write(step, results)
        print(_eval_text(step, results, final), flush=True)

    def start_session(self, facts: dict[str, Any]) -> None:
        """Record this process's start (hardware, parameters, batch, data) for the report and TensorBoard."""
        sessions = []
        if self._resumed and self.info_path.is_file():
            try:
                sessions = json.loads(self.info_path.read_text()).get("sessions", [])
            except (json.JSONDecodeError, AttributeError):
                sessions = []  # a damaged file only loses the history of earlier sessions
        self._session = {**facts, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "_t0": time.monotonic()}
        self._sessions = sessions
        self._write_info()
        if self._tb is not None:
            self._tb.add_text("run", _indent_markdown(banner(facts)), facts.get("start_step", 0))

    def _write_info(self) -> None:
        current = {k: v for k, v in self._session.items() if not k.startswith("_")}
        self.info_path.write_text(json.dumps({"sessions": self._sessions + [current]}, indent=1) + "\n")

    def close(self, step: int | None = None, outcome: str | None = None) -> None:
        """``outcome``: how the run ended ("done", "signal", "time-budget", or "error")."""
        if self._session is not None:
            self._session.update(ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"), end_step=step, stopped_by=outcome,
                                 wall_s=round(time.monotonic() - self._session["_t0"], 3))
            self._write_info()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        for tracker in self._trackers:
            tracker.close()


# ---------------------------------------------------------------- what rank 0 prints (banner, progress lines)
def _live_display() -> bool:
    """Whether rich draws a live bar here: a terminal or a notebook. Under SLURM, nohup or CI, stdout is a
    file or a pipe and rich prints nothing until the bar stops, so plain lines are printed instead."""
    from rich import get_console

    console = get_console()
    return console.is_jupyter or (console.is_terminal and not console.is_dumb_terminal)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainProgress:
    """Progress while the loop runs: rich's live bar on a terminal, plain lines in logs.

    A plain line (step/total, loss, lr, img/s, elapsed, ETA) comes after the first step of this
    process (the run is going), then every ``logging.print_every_seconds`` and at least every
    ``logging.print_every_steps`` steps (default: every 10% of the run), and after the last step.
    """

    def __init__(self, cfg, total: int, start: int, enabled: bool, live: bool | None = None) -> None:
        self.total, self.start = total, start
        live = _live_display() if live is None else live
        self.mode = "off" if not enabled else ("bar" if live else "lines")
        self.every_s = cfg.print_every_seconds
        self.every_steps = cfg.print_every_steps or max(1, round(total / 10))
        self._bar = None
        self._latest: tuple[int, Any, float] | None = None  # (step, loss, lr) of the newest step
        self._printed = start
        self._samples, self._busy_s = 0, 0.0  # since the last line: img/s over step time only

    def __enter__(self) -> "TrainProgress":
        self._t0 = self._last_print = time.monotonic()
        if self.mode == "bar":
            self._bar = rich_progress_bar(True, self.total, self.start)
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def update(self, done: int, loss, lr: float, samples: int, seconds: float) -> None:
        """``loss``: a float or a 0-d tensor, read on the host only when shown (a read waits for the GPU)."""
        if self.mode == "bar":
            self._samples += samples
            self._busy_s += seconds
            now = time.monotonic()
            info = None
            if now - self._last_print >= 0.5 or done == self.total:  # a few host reads a second at most
                info = f"loss {float(loss):.4f}  lr {lr:.2e}  {self._samples / self._busy_s:,.0f} img/s"
                self._last_print, self._samples, self._busy_s = now, 0, 0.0
            self._bar.update(self._task, completed=done, **({"info": info} if info else {}))
        elif self.mode == "lines":
            self._latest = (done, loss, lr)
            self._samples += samples
            self._busy_s += seconds
            now = time.monotonic()
            # steps: on multiples of every_steps (10%, 20%, ...), whatever the time rule printed in between
            next_milestone = done // self.every_steps > self._printed // self.every_steps
            if (done == self.total or done == self.start + 1 or next_milestone
                    or now - self._last_print >= self.every_s):
                self._print_line(now)

    def _print_line(self, now: float) -> None:
        done, loss, lr = self._latest
        loss = float(loss)
        elapsed = now - self._t0
        # the ETA uses wall time per step in this process, evaluations and checkpoints included
        eta = (self.total - done) * elapsed / (done - self.start) if done > self.start else float("nan")
        img_s = self._samples / self._busy_s if self._busy_s > 0 else 0.0
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  step {done}/{self.total} ({100 * done / self.total:.0f}%)  "
              f"loss {loss:.4f}  lr {lr:.2e}  {img_s:,.0f} img/s  elapsed {_hms(elapsed)}  ETA {_hms(eta)}",
              flush=True)
        self._printed, self._last_print, self._samples, self._busy_s = done, now, 0, 0.0

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self._latest is not None and self._latest[0] > self._printed:
            self._print_line(time.monotonic())  # stopped between lines (signal, time budget, error): say where


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"{_cpu_name()} ({os.cpu_count()} cores, {threads} torch thread{'s' * (threads != 1)})"
    return device.type


def _count_params(step_module: torch.nn.Module) -> tuple[int, int, int]:
    """(trainable, total, in the CLIP model); teachers and heads count in the total.
    Under FSDP a parameter is a DTensor whose numel() is the full size."""
    seen, trainable, total = set(), 0, 0
    for p in step_module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    model = sum(p.numel() for p in step_module.model.parameters())
    return trainable, total, model


def run_facts(recipe: Recipe, run_dir: Path, device: torch.device, ctx: D.DistContext, step_module, loader,
               start_step: int, resume_from: Path | None) -> dict[str, Any]:
    """What the banner prints and run_info.json keeps (the report's "Run" table)."""
    r = recipe
    trainable, total, in_model = _count_params(step_module)
    data_size = getattr(loader, "fingerprint", {}).get("samples_per_epoch")  # sources on disk know theirs
    return {
        "recipe": r.name, "run_dir": str(run_dir), "device": str(device), "hardware": _hardware(device),
        "precision": "bf16" if _resolve_precision(r, device) == torch.bfloat16 else "fp32",
        "world_size": ctx.world_size, "torch": torch.__version__, "python": platform.python_version(),
        "params_trainable": trainable, "params_total": total, "params_model": in_model,
        "global_batch": r.data.batch_size * ctx.world_size * r.train.accum_steps,
        "batch_per_process": r.data.batch_size, "accum_steps": r.train.accum_steps,
        "data": r.data.train, "data_size": data_size, "steps": r.train.steps, "start_step": start_step,
        "resumed_from": str(resume_from) if resume_from else None,
    }


def banner(facts: dict[str, Any]) -> str:
    f = facts
    procs = f"{f['world_size']} process{'es' * (f['world_size'] != 1)}"
    if f["data"] == "shapes":
        size = "synthetic, generated on the fly"
    else:
        size = f"{f['data_size']:,} samples per epoch" if f.get("data_size") else "size unknown"
    start = f"from {f['resumed_from']} at step {f['start_step']}" if f.get("resumed_from") else "from scratch"
    return "\n".join([
        f"clipforge train: recipe {f['recipe']} -> {f['run_dir']}",
        f"  device      {f['device']}: {f['hardware']} · {procs} · precision {f['precision']}",
        f"  parameters  {f['params_trainable']:,} trainable / {f['params_total']:,} total "
        f"({f['params_model']:,} in the CLIP model)",
        f"  batch       {f['global_batch']:,} global = {f['batch_per_process']:,} per process × {procs} × "
        f"{f['accum_steps']} accumulation step{'s' * (f['accum_steps'] != 1)}",
        f"  data        {f['data']} ({size})",
        f"  steps       {f['steps']:,}, {start}",
    ])


def _eval_text(step: int, results: dict[str, float], final: bool) -> str:
    width = max(len(k) for k in results)
    lines = [f"{'final evaluation' if final else 'evaluation'} at step {step}:"]
    lines += [f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
              for k, v in sorted(results.items())]
    return "\n".join(lines)


def _indent_markdown(text: str) -> str:
    """TensorBoard's text tab reads markdown: an indented block keeps the lines as they are."""
    return "\n".join("    " + line for line in text.splitlines())


# ---------------------------------------------------------------- optional experiment trackers
TRACKERS = ("wandb", "trackio", "mlflow")  # logging.report_to; each is a pip extra of the same name


def check_trackers(names: list[str]) -> None:
    """Every rank checks before anything starts: a missing package is a clear error, not a crash later."""
    for name in names:
        try:
            missing = importlib.util.find_spec(name) is None
        except ValueError:  # in sys.modules without a spec: present
            missing = False
        if missing:
            raise _shared_error()(
                f"logging.report_to includes '{name}' but the {name} package is not installed; install it with "
                f"`pip install 'clipforge[{name}]'` or remove '{name}' from logging.report_to")


class _Tracker:
    """One experiment tracker (W&B, trackio or MLflow): the recipe as its config, the logged metrics
    at their steps. The package is imported only here, when the recipe asks for it."""

    def __init__(self, name: str, run_dir: Path, recipe: Recipe) -> None:
        self.name = name
        project, run_name = recipe.logging.project, run_dir.name
        config = recipe.model_dump(mode="json")
        if name == "wandb":
            import wandb

            self._run = wandb.init(project=project, name=run_name, dir=str(run_dir), config=config)
        elif name == "trackio":
            import trackio

            self._mod = trackio
            trackio.init(project=project, name=run_name, config=config)
        else:
            import mlflow

            self._mod = mlflow
            mlflow.set_experiment(project)
            mlflow.start_run(run_name=run_name)
            params = {_mlflow_key(k): str(v)[:250] for k, v in _flatten(config).items()}
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params(dict(items[i:i + 100]))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.name == "wandb":
            self._run.log(values, step=step)
        elif self.name == "trackio":
            self._mod.log(values, step=step)
        else:
            self._mod.log_metrics({_mlflow_key(k): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.name == "wandb":
            self._run.finish()
        elif self.name == "trackio":
            self._mod.finish()
        else:
            self._mod.end_run()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _mlflow_key(key: str) -> str:
    """MLflow names take letters, digits and _ - . / space only (recall@1 -> recall_at_1)."""
    import re

    return re.sub(r"[^\w\-./ ]", "_", key.replace("@", "_at_"))



def rich_progress_bar(enabled: bool, total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
