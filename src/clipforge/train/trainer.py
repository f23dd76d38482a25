"""The training loop: one recipe in, a run directory out.

    run_dir/
      recipe.toml          the resolved recipe
      metrics.jsonl        one JSON line per logged step (and per evaluation)
      tb/                  TensorBoard events
      checkpoints/step_*/  see clipforge.train.checkpoint; ``latest`` -> newest

Resume is exact: the schedule is a pure function of the step, the data stream a pure function of
the number of samples consumed, and the RNG states travel in the checkpoint, so every step's loss
after ``--resume latest`` equals the uninterrupted run's (bitwise on CPU fp32, same thread count).
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from clipforge.config import Recipe, recipe_to_toml
from clipforge.train import checkpoint as ckpt
from clipforge.train.schedule import lr_at

# An eval hook gets (model, tokenizer, step) and returns flat metrics to log, e.g. {"zeroshot/unseen_acc1": 0.7}.
EvalHook = Callable[[torch.nn.Module, Any, int], dict[str, float]]


# model keys that may change on resume: they do not change the parameters
RESUMABLE_MODEL_KEYS = {"patch_dropout"}


class TrainingError(RuntimeError):
    """The run cannot continue; the message says why and what to do."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped_by: str  # "done" | "signal" | "time-budget"
    last_checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


def resolve_device(recipe: Recipe) -> torch.device:
    want = recipe.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device = 'cuda' but no CUDA device is visible; use train.device=cpu")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def resolve_precision(recipe: Recipe, device: torch.device) -> torch.dtype:
    """fp32 unless bf16 is asked for or the device runs it fast (CUDA with bf16 support).

    CPUs without AMX run bf16 matmuls slower than fp32, so ``auto`` stays fp32 on CPU.
    """
    p = recipe.train.precision
    if p == "auto":
        fast_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if fast_bf16 else torch.float32
    return torch.bfloat16 if p == "bf16" else torch.float32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norm gains, class/position vectors of rank < 2 and the logit scale/bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    o = recipe.optim
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps, fused=True
    )


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsLog:
    """metrics.jsonl (+ TensorBoard). On resume, records past the resumed step are dropped."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        elif resume_step is None:
            self.path.write_text("")
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path,
        resume: str | None = None,
        eval_hooks: list[EvalHook] | None = None,
    ) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.eval_hooks = list(eval_hooks or [])

    # ------------------------------------------------------------------ set-up
    def _check_run_dir(self) -> Path | None:
        ckpt_dir = self.run_dir / "checkpoints"
        if self.resume is None:
            if ckpt.complete_checkpoints(ckpt_dir):
                raise TrainingError(
                    f"{self.run_dir} already holds checkpoints. Continue it with --resume latest, "
                    "or choose a new --run-dir."
                )
            return None
        return ckpt.find_resume_checkpoint(self.run_dir, self.resume)

    def _build(self, resume_from: Path | None):
        from clipforge.data.loader import build_train_loader
        from clipforge.models.clip import CLIP
        from clipforge.models.tokenizer import load_tokenizer, train_tokenizer_for
        from clipforge.objectives import build_objective

        r = self.recipe
        if r.train.threads:
            torch.set_num_threads(r.train.threads)
        seed_everything(r.train.seed)
        device = resolve_device(r)
        if resume_from is not None:
            saved = ckpt.read_config(resume_from)
            # patch dropout is a training-time knob (FLIP's unmasked tuning resumes with r = 0)
            now = r.model.model_dump(mode="json")
            diff = [k for k, v in now.items() if saved["model"].get(k) != v and k not in RESUMABLE_MODEL_KEYS]
            if diff:
                raise TrainingError(
                    f"the recipe's model section differs from the checkpoint's ({', '.join(diff)}); "
                    "a resumed run must keep the architecture"
                )
            self._warn_recipe_changes(saved["recipe"])
            tokenizer = load_tokenizer(saved["tokenizer"], resume_from)
        else:
            tokenizer = train_tokenizer_for(r.data, r.model.context_length)
        if tokenizer.vocab_size > r.model.vocab_size:
            raise TrainingError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {r.model.vocab_size}; "
                "raise model.vocab_size"
            )
        model = CLIP(r.model).to(device)
        objective = build_objective(r.objective).to(device)
        optimizer = build_optimizer(model, r)
        state: dict[str, Any] = {"step": 0, "samples_seen": 0, "bad_steps": 0, "elapsed_s": 0.0}
        if resume_from is not None:
            ckpt.load_model_weights(model, resume_from)
            saved_state = ckpt.load_train_state(resume_from)
            optimizer.load_state_dict(saved_state["optimizer"])
            ckpt.restore_rng_state(saved_state["rng"])
            state = {k: saved_state[k] for k in state}
        loader = build_train_loader(r.data, r.model.image_size, tokenizer, start_sample=state["samples_seen"])
        return device, tokenizer, model, objective, optimizer, loader, state

    def _warn_recipe_changes(self, saved: dict[str, Any]) -> None:
        now = self.recipe.model_dump(mode="json")
        changed = [
            f"{section}.{k}"
            for section, values in now.items()
            if isinstance(values, dict)
            for k, v in values.items()
            if saved.get(section, {}).get(k) != v
        ]
        if changed:
            warnings.warn(f"resuming with recipe changes: {', '.join(changed)}")

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        r = self.recipe
        resume_from = self._check_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.toml").write_text(recipe_to_toml(r))
        device, tokenizer, model, objective, optimizer, loader, state = self._build(resume_from)
        dtype = resolve_precision(r, device)
        need = frozenset(getattr(objective, "needs", ()))
        log = MetricsLog(self.run_dir, state["step"] if resume_from else None, r.logging.tensorboard)
        micro_batch = r.data.batch_size
        samples_per_step = micro_batch * r.train.accum_steps
        total = r.train.steps
        last_ckpt: Path | None = resume_from
        last_save_time = time.monotonic()
        start_time = time.monotonic() - state["elapsed_s"]
        stopped_by = "done"
        last_metrics: dict[str, float] = {}

        def save() -> Path:
            state["elapsed_s"] = time.monotonic() - start_time
            train_state = {**state, "optimizer": optimizer.state_dict(), "rng": ckpt.capture_rng_state()}
            return ckpt.save_checkpoint(
                self.run_dir / "checkpoints", state["step"], model, r, tokenizer, train_state, r.train.keep_last
            )

        progress = _progress_bar(r.logging.progress, total, state["step"])
        model.train()
        try:
            with _StopFlag() as stop, progress:
                task = progress.add_task("train", total=total, completed=state["step"], info="")
                while state["step"] < total:
                    step = state["step"]
                    lr = lr_at(step, total, r.optim.lr, r.schedule)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    t0 = time.perf_counter()
                    loss_sum, metrics = 0.0, {}
                    for _ in range(r.train.accum_steps):
                        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                                 for k, v in next(loader).items()}
                        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                            outputs = model(batch["images"], batch["input_ids"], batch["attention_mask"], need=need)
                            loss, metrics = objective(outputs, batch)
                        (loss / r.train.accum_steps).backward()
                        loss_sum += loss.item() / r.train.accum_steps
                    grad_norm = _clip_and_measure(model, r.optim.grad_clip)
                    state["samples_seen"] += samples_per_step
                    state["step"] += 1
                    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                        optimizer.zero_grad(set_to_none=True)
                        state["bad_steps"] += 1
                        warnings.warn(f"step {step}: non-finite loss or gradient ({loss_sum}); step skipped")
                        if state["bad_steps"] > r.train.max_bad_steps:
                            raise TrainingError(
                                f"{state['bad_steps']} steps had a NaN/inf loss or gradient "
                                f"(limit train.max_bad_steps={r.train.max_bad_steps}). Lower optim.lr, "
                                "check the data, or use train.precision=fp32."
                            )
                    else:
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        model.clamp_logit_scale_()
                    dt = time.perf_counter() - t0
                    done = state["step"]
                    last_metrics = {
                        **{k: float(v) for k, v in metrics.items()},
                        "loss": loss_sum,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "logit_scale": float(model.logit_scale.exp().item()),
                        "img_per_s": samples_per_step / dt,
                        "samples_seen": state["samples_seen"],
                        "bad_steps": state["bad_steps"],
                    }
                    if done % r.logging.every_steps == 0 or done == total:
                        log.write(done, last_metrics)
                    progress.update(task, completed=done,
                                    info=f"loss {loss_sum:.4f}  lr {lr:.2e}  {samples_per_step / dt:,.0f} img/s")
                    if r.eval.every_steps and done % r.eval.every_steps == 0 and done < total:
                        self._run_eval(model, tokenizer, done, log)
                    if stop.signal_name:
                        stopped_by = "signal"
                        break
                    if r.train.max_minutes and time.monotonic() - start_time > 60 * r.train.max_minutes:
                        stopped_by = "time-budget"
                        break
                    if self._checkpoint_due(done, last_save_time) and done < total:
                        last_ckpt, last_save_time = save(), time.monotonic()
            last_ckpt = save()
            if stopped_by != "signal" and r.eval.at_end:
                last_metrics.update(self._run_eval(model, tokenizer, state["step"], log))
        finally:
            log.close()
        return TrainResult(self.run_dir, state["step"], stopped_by, last_ckpt, last_metrics)

    def _checkpoint_due(self, step: int, last_save_time: float) -> bool:
        t = self.recipe.train
        by_steps = t.checkpoint_every_steps is not None and step % t.checkpoint_every_steps == 0
        by_time = t.checkpoint_every_minutes is not None and (
            time.monotonic() - last_save_time > 60 * t.checkpoint_every_minutes
        )
        return by_steps or by_time

    def _run_eval(self, model, tokenizer, step: int, log: MetricsLog) -> dict[str, float]:
        if not self.eval_hooks:
            return {}
        was_training = model.training
        model.eval()
        results: dict[str, float] = {}
        with torch.no_grad():
            for hook in self.eval_hooks:
                results.update(hook(model, tokenizer, step))
        model.train(was_training)
        if results:
            log.write(step, results)
        return results


def _clip_and_measure(model: torch.nn.Module, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"), foreach=True)
    return float(norm)


def _progress_bar(enabled: bool, total: int, start: int):
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
