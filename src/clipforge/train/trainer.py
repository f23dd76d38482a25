"""The training loop: one recipe in, a run directory out.

    run_dir/
      recipe.toml          the resolved recipe
      metrics.jsonl        one JSON line per logged step (and per evaluation)
      run_info.json        per process start: hardware, parameters, batch, data; wall time at the end
      tb/                  TensorBoard events
      checkpoints/step_*/  see clipforge.train.checkpoint; ``latest`` -> newest

Resume is exact: the schedule is a pure function of the step, the data stream a pure function of
the number of samples consumed, and the RNG states travel in the checkpoint, so every step's loss
after ``--resume latest`` equals the uninterrupted run's (bitwise on CPU fp32, same thread count).

Under torchrun or SLURM (see ``clipforge.train.distributed``) the same loop runs on every rank:
the model is wrapped in DDP (or sharded with FSDP2), each rank reads its slice of every global
batch, the losses gather or ring-exchange features across ranks, the ranks agree on stopping
(signal, time budget) every 10 steps and at evaluation / checkpoint steps, rank 0 logs and writes
checkpoints (with every rank's RNG state), and a failed collective (a crashed peer) ends the run
with a clear message instead of a hang.
"""

from __future__ import annotations

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
from clipforge.train import distributed as D
from clipforge.train.gradcache import gradcache_accumulation, plain_accumulation
from clipforge.train.params import (
    ResumeError,
    apply_group_settings,
    build_param_groups,
    check_resume_compatible,
    check_saved_group_layout,
    freeze_parameters,
    set_group_lrs,
)
from clipforge.train.logs import MetricsLog, NoLog, TrainProgress, banner, check_trackers, run_facts
from clipforge.train.schedule import lr_at

# An eval hook gets (model, tokenizer, step) and returns flat metrics to log, e.g. {"zeroshot/unseen_acc1": 0.7}.
EvalHook = Callable[[torch.nn.Module, Any, int], dict[str, float]]



class TrainingError(RuntimeError):
    """The run cannot continue; the message says why and what to do.

    ``every_rank`` marks errors that every rank raises alike (only rank 0 needs to print them).
    """

    every_rank = False


def _shared_error(message: str) -> TrainingError:
    err = TrainingError(message)
    err.every_rank = True
    return err


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stopped_by: str  # "done" | "signal" | "time-budget"
    last_checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


def resolve_device(recipe: Recipe) -> torch.device:
    """``train.device``, checked by the one device check every verb uses."""
    from clipforge.devices import pick_device

    return pick_device(recipe.train.device, option="train.device =")


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
    """[decay, no decay] groups without recipe groups: no weight decay on biases, norm gains, vectors of
    rank < 2, the logit scale/bias and whatever modules list in ``no_weight_decay()``."""
    from clipforge.config import OptimConfig

    return build_param_groups(model, OptimConfig(weight_decay=weight_decay))


def seed_rank(seed: int, ctx: D.DistContext) -> None:
    """Per-rank randomness (patch dropout) after a model init that was the same on every rank."""
    if ctx.enabled:
        seed_everything(seed + ctx.rank)


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """Fused AdamW over the recipe's parameter groups (``optim.groups``: lr scale, weight decay,
    frozen parameters left out), with the no-decay set each module declares."""
    o = recipe.optim
    return torch.optim.AdamW(build_param_groups(model, o), lr=o.lr, betas=o.betas, eps=o.eps, fused=True)


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
        self.dist = D.SINGLE_PROCESS

    # ------------------------------------------------------------------ set-up
    def _check_run_dir(self) -> Path | None:
        ckpt_dir = self.run_dir / "checkpoints"
        if self.resume is None:
            if ckpt.complete_checkpoints(ckpt_dir):
                raise TrainingError(
                    f"{self.run_dir} already holds checkpoints. Continue it with --resume latest, "
                    "or choose a new --run-dir."
                )
            if (self.run_dir / "metrics.jsonl").is_file() and (self.run_dir / "metrics.jsonl").stat().st_size:
                warnings.warn(f"{self.run_dir} holds the logs of a run that saved no checkpoint; this run starts "
                              "over there and replaces its metrics.jsonl and recipe.toml")
            return None
        return ckpt.find_resume_checkpoint(self.run_dir, self.resume)

    def _prepare_run_dir(self) -> Path | None:
        """Rank 0 checks the run dir and picks the checkpoint; every rank gets the same answer or error."""
        from clipforge.train.teachers import pin_checkpoint_teachers

        found, error, teachers = None, None, self.recipe.teachers
        if self.dist.is_main:
            try:
                found = self._check_run_dir()
                saved = (ckpt.read_config(found).get("recipe") or {}).get("teachers") if found else None
                teachers, notes = pin_checkpoint_teachers(self.recipe.teachers, saved)
                for note in notes:
                    warnings.warn(note)
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "recipe.toml").write_text(recipe_to_toml(self.recipe.model_copy(
                    update={"teachers": teachers})))
            except (TrainingError, ckpt.CheckpointError) as e:
                if not self.dist.enabled:
                    raise
                error = (type(e).__name__, str(e))
        found, error, teachers = D.broadcast_from_main((found, error, teachers), self.dist)
        if error is not None:  # the other ranks raise rank 0's error rather than wait for it
            kind, message = error
            err = ckpt.CheckpointError(message) if kind == "CheckpointError" else TrainingError(message)
            err.every_rank = True
            raise err
        # checkpoint teachers as pinned by rank 0: every rank loads the same step directory
        self.recipe = self.recipe.model_copy(update={"teachers": teachers})
        return found

    def _start_logs(self, resume_from: Path | None, step: int, device: torch.device, plain, loader):
        """Rank 0's logs (metrics.jsonl, TensorBoard, the trackers) and banner; NoLog on other ranks.

        Starting them can fail on rank 0 alone (a tracker that cannot log in, a full disk). The ranks
        agree on it before the first training collective, so the others stop at once with a message
        instead of waiting for rank 0 until train.dist_timeout_minutes (srun does not stop them)."""
        r, ctx = self.recipe, self.dist
        log, failure = NoLog(), None
        if ctx.is_main:
            try:
                log = MetricsLog(self.run_dir, step if resume_from else None, r.logging.tensorboard, r)
                facts = run_facts(r, self.run_dir, device, ctx, plain, loader, step, resume_from)
                print(banner(facts), flush=True)  # first thing in a SLURM/CI log: what runs, where, how big
                log.start_session(facts)
            except Exception as e:  # noqa: BLE001 - told to the other ranks, then raised as it is
                failure = e
        if ctx.enabled and D.sum_over_ranks([failure is not None], ctx, device)[0] and failure is None:
            raise TrainingError(f"rank {ctx.rank}: rank 0 could not start its logs (metrics.jsonl, TensorBoard or "
                                f"logging.report_to {list(r.logging.report_to)}); its error says why. Fix it and run "
                                "again (with --resume latest to continue from the last checkpoint).")
        if failure is not None:
            raise failure
        return log

    def _build(self, resume_from: Path | None, device: torch.device):
        from clipforge.data.loader import build_train_loader
        from clipforge.models.tokenizer import load_tokenizer, tokenizer_for_recipe

        r, ctx = self.recipe, self.dist
        if r.train.threads:
            torch.set_num_threads(r.train.threads)
        seed_everything(r.train.seed)  # the same on every rank: identical initial weights
        if resume_from is not None:
            saved = ckpt.read_config(resume_from)
            # safe changes (lr, steps, patch dropout for FLIP's unmasked tuning, ...) are warned about;
            # changes the checkpoint cannot take (architecture, groups, stateful terms) are refused
            try:
                changes = check_resume_compatible(saved.get("recipe"), r)
            except ResumeError as e:
                raise _shared_error(f"cannot resume {resume_from}: {e}") from None
            if ctx.is_main and changes:
                warnings.warn("resuming with recipe changes: " + "; ".join(changes))
            tokenizer = load_tokenizer(saved["tokenizer"], resume_from)
        else:
            tokenizer = tokenizer_for_recipe(r)  # deterministic on every rank
        if tokenizer.vocab_size > r.model.vocab_size and r.model.text_tower == "clip":
            raise _shared_error(
                f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {r.model.vocab_size}; "
                "raise model.vocab_size"
            )
        step_module = build_step(r, device, resume_from, log=ctx.is_main)
        if step_module.init_report is not None:  # a warm start that loaded the token embedding brings its tokenizer
            from clipforge.train.params import init_from_tokenizer

            tokenizer = init_from_tokenizer(step_module.init_report, r.model.context_length) or tokenizer
            if ctx.is_main and "text.token_embed.weight" in step_module.init_report.loaded:
                print(f"tokenizer: {tokenizer.kind} from {step_module.init_report.source} (its token embedding "
                      "was loaded by model.init_from)", flush=True)
        if hasattr(step_module, "attach_run"):  # e.g. LiT's text-feature cache lives in the run dir
            step_module.attach_run(self.run_dir, ctx.rank, tokenizer)
        freeze_parameters(step_module, r.optim.groups)  # before DDP, which registers trainable params only
        model = D.wrap_model(step_module, ctx, device, r.train.fsdp)
        optimizer = build_optimizer(model, r)
        seed_rank(r.train.seed, ctx)
        state: dict[str, Any] = {"step": 0, "samples_seen": 0, "bad_steps": 0, "elapsed_s": 0.0}
        if resume_from is not None:
            saved_state = ckpt.load_train_state(resume_from)
            if bool(saved_state.get("fsdp", False)) != (r.train.fsdp and ctx.enabled):
                raise _shared_error(
                    f"{resume_from} was written with train.fsdp={saved_state.get('fsdp', False)} and "
                    f"{saved_state.get('world_size', 1)} process(es); the optimizer state is laid out differently "
                    "with and without FSDP, so resume with the same train.fsdp setting"
                )
            try:  # a clear refusal where torch's load_state_dict would only say the group counts differ
                check_saved_group_layout(saved_state["optimizer"], optimizer)
            except ResumeError as e:
                raise _shared_error(f"cannot resume {resume_from}: {e}") from None
            D.load_full_optimizer_state(model, optimizer, saved_state["optimizer"], ctx, r.train.fsdp)
            # the saved state carries the old hyper-parameters; the recipe's (possibly changed) ones apply
            apply_group_settings(optimizer, build_param_groups(model, r.optim), r.optim)
            self._restore_rng(saved_state)
            state = {k: saved_state[k] for k in state}
        loader = build_train_loader(r.data, r.model.image_size, tokenizer, start_sample=state["samples_seen"],
                                    pin_memory=device.type == "cuda", rank=ctx.rank, world_size=ctx.world_size,
                                    data_state=_rank_data_state(saved_state if resume_from else {}, ctx))
        return tokenizer, model, optimizer, loader, state

    def _read_ahead(self, loader, tokenizer, samples_seen: int, runner: "StepRunner", n_batches: int):
        """The next ``n_batches`` batches the training loader will serve, from a second loader at its
        position (the stream is a function of the position, so they are the same batches)."""
        from clipforge.data.loader import build_train_loader

        r, ctx = self.recipe, self.dist
        ahead = build_train_loader(r.data, r.model.image_size, tokenizer, start_sample=samples_seen,
                                   rank=ctx.rank, world_size=ctx.world_size,
                                   data_state=loader.state_dict() if hasattr(loader, "state_dict") else None)
        for _ in range(n_batches):
            yield runner.to_device(next(ahead))

    def _restore_rng(self, saved_state: dict[str, Any]) -> None:
        ctx = self.dist
        per_rank = saved_state.get("rng_per_rank")
        if not ctx.enabled:
            ckpt.restore_rng_state(saved_state["rng"])
        elif per_rank is not None and len(per_rank) == ctx.world_size:
            ckpt.restore_rng_state(per_rank[ctx.rank])
        else:
            saved_world = len(per_rank) if per_rank is not None else 1
            if ctx.is_main:
                warnings.warn(
                    f"the checkpoint was written by {saved_world} process(es), this run has {ctx.world_size}: "
                    "weights, optimizer and data position resume exactly, random draws (patch dropout) do not"
                )
            seed_everything(self.recipe.train.seed + ctx.rank + 100_003 * saved_state["step"])

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        r = self.recipe
        device = resolve_device(r)
        self.dist = D.init_distributed(device.type, r.train.dist_backend, r.train.dist_timeout_minutes)
        peer_lost = False
        try:
            return self._fit(D.device_for(self.dist, device))
        except Exception as e:
            if self.dist.enabled and D.peer_failure(e):
                peer_lost = True
                # torchrun's agent sends SIGTERM to the survivors: let this message out first
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                raise TrainingError(
                    f"rank {self.dist.rank}: lost contact with the other ranks ({D.short_reason(e)}). "
                    f"Another rank crashed, was killed, or did not answer within "
                    f"train.dist_timeout_minutes={r.train.dist_timeout_minutes:g}. "
                    f"Continue from the last checkpoint with --resume latest."
                ) from e
            raise
        finally:
            if not peer_lost:  # a broken group cannot be torn down politely; the process exits anyway
                D.shutdown(self.dist)

    def _fit(self, device: torch.device) -> TrainResult:
        r, ctx = self.recipe, self.dist
        check_trackers(r.logging.report_to)
        resume_from = self._prepare_run_dir()
        r = self.recipe  # checkpoint teachers pinned to a step directory
        tokenizer, model, optimizer, loader, state = self._build(resume_from, device)
        plain = D.unwrap(model)  # the training step (model, objective, teachers, heads)
        log = self._start_logs(resume_from, state["step"], device, plain, loader)
        micro_batch = r.data.batch_size
        samples_per_step = micro_batch * ctx.world_size * r.train.accum_steps  # global
        total = r.train.steps
        last_ckpt: Path | None = resume_from
        last_save_time = time.monotonic()
        start_time = time.monotonic() - state["elapsed_s"]
        stopped_by = "done"
        outcome = "error"  # what run_info.json says unless the loop ends normally
        last_metrics: dict[str, float] = {}

        def save() -> Path:
            state["elapsed_s"] = time.monotonic() - start_time
            plain.before_checkpoint()  # on every rank (LiT: each rank's text-cache shards)
            # every rank takes part: FSDP gathers the shards, rank 0 collects every rank's RNG
            weights = D.full_model_state(model, ctx, r.train.fsdp)
            optim_state = D.full_optimizer_state(model, optimizer, ctx, r.train.fsdp)
            rng = ckpt.capture_rng_state()
            every_rng = D.gather_to_main(rng, ctx)
            # sources on disk keep a per-(rank, worker) data cursor next to samples_seen
            data_state = D.gather_to_main(loader.state_dict(), ctx) if hasattr(loader, "state_dict") else None
            where = self.run_dir / "checkpoints" / ckpt.step_dir_name(state["step"])
            if ctx.is_main:
                train_state = {**state, "optimizer": optim_state, "rng": rng, "world_size": ctx.world_size,
                               "fsdp": r.train.fsdp and ctx.enabled}
                if ctx.enabled:
                    train_state["rng_per_rank"] = every_rng
                if data_state is not None:
                    train_state["data_state_per_rank"] = data_state  # one entry per rank
                model_weights = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
                where = ckpt.save_checkpoint(
                    self.run_dir / "checkpoints", state["step"], D.StateDictView(model_weights), r, tokenizer,
                    train_state, r.train.keep_last, method_state=plain.method_state_dict(weights),
                )
            D.barrier(ctx)  # nobody moves on (or exits) before the checkpoint is complete
            return where

        runner = StepRunner(model, optimizer, r, device, ctx)
        # methods that work in episodes (ProtoCLIP) look at the batches they are about to train on
        begin_step = getattr(plain, "begin_step", None)

        def read_ahead(n_batches: int):
            return self._read_ahead(loader, tokenizer, state["samples_seen"], runner, n_batches)

        progress = TrainProgress(r.logging, total, state["step"], enabled=r.logging.progress and ctx.is_main)
        pending = _PendingSteps()  # steps whose numbers are still on the device
        model.train()
        try:
            with _StopFlag() as stop, progress:
                while state["step"] < total:
                    step = state["step"]
                    lr = runner.set_lr(step)
                    if begin_step is not None:
                        begin_step(step, read_ahead)
                    t0 = time.perf_counter()
                    micro_batches = [runner.to_device(next(loader)) for _ in range(r.train.accum_steps)]
                    loss, metrics, grad_norm = runner.forward_backward(micro_batches)
                    time_up = bool(r.train.max_minutes and time.monotonic() - start_time > 60 * r.train.max_minutes)
                    state["samples_seen"] += samples_per_step
                    state["step"] += 1
                    done = state["step"]
                    bad: torch.Tensor | float = 0.0
                    if runner.sync_free:  # skipped or applied on the device; counted when next read
                        step_loss = loss
                        loss, metrics = D.mean_over_ranks_async(loss, metrics, ctx, device)
                        # copied before the update: a metric may be a view of a parameter (the logit bias)
                        loss, metrics = snapshot_metrics(loss, metrics)
                        bad = runner.apply_unless_bad(step_loss, grad_norm, done)
                    if runner.sync_free and not ctx.enabled:
                        stop_now, save_by_time = stop.signal_name is not None, self._checkpoint_due_by_time(last_save_time)
                    elif runner.sync_free and not self._read_due(done):
                        stop_now = time_up = save_by_time = False  # the ranks compare notes at the next read
                    else:
                        # one small all_reduce: whether any rank must stop, and (read every step) the global
                        # loss and metrics; sync-free, those were averaged on the device already
                        names = [] if runner.sync_free else sorted(metrics)
                        totals = D.sum_over_ranks(
                            [float(stop.signal_name is not None), float(time_up),
                             float(self._checkpoint_due_by_time(last_save_time))]
                            + ([] if runner.sync_free else [loss]) + [metrics[k] for k in names],
                            ctx, device,
                        )
                        stop_now, time_up, save_by_time = totals[0] > 0, totals[1] > 0, totals[2] > 0
                        if not runner.sync_free:
                            loss = totals[3] / ctx.world_size
                            metrics = {k: v / ctx.world_size for k, v in zip(names, totals[4:])}
                    if not runner.sync_free:
                        grad_norm = float(grad_norm)
                        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                            runner.skip()
                            warnings.warn(f"step {done}: non-finite loss or gradient ({loss}); step skipped")
                            self._count_bad_steps(state, 1)
                        else:
                            runner.apply(done)
                    dt = time.perf_counter() - t0
                    pending.add(done, {**metrics, "loss": loss, "grad_norm": grad_norm,
                                       "logit_scale": _full(plain.model.logit_scale).detach().exp(), "_bad": bad},
                                {"lr": lr, "samples_seen": state["samples_seen"], "seconds": dt})
                    eval_now = bool(r.eval.every_steps and done % r.eval.every_steps == 0 and done < total)
                    save_now = self._checkpoint_due(done, save_by_time) and done < total
                    if not runner.sync_free or self._read_due(done) or save_now or stop_now or time_up:
                        # the one host read of this stretch of steps (sync-free) or of this step
                        last_metrics = self._read_pending(state, pending, samples_per_step, loader, log)
                    progress.update(done, loss, lr, samples_per_step, dt)
                    if eval_now:
                        self._run_eval(model, tokenizer, done, log)
                    if stop_now:
                        stopped_by = "signal"
                        break
                    if time_up:
                        stopped_by = "time-budget"
                        break
                    if save_now:
                        last_ckpt, last_save_time = save(), time.monotonic()
            last_ckpt = save()
            if stopped_by != "signal" and r.eval.at_end:
                last_metrics.update(self._run_eval(model, tokenizer, state["step"], log, final=True))
            outcome = stopped_by
        finally:
            log.close(state["step"], outcome)
        return TrainResult(self.run_dir, state["step"], stopped_by, last_ckpt, last_metrics)

    def _read_pending(self, state, pending: "_PendingSteps", samples_per_step: int, loader, log) -> dict[str, float]:
        """The pending steps' numbers on the host (one transfer): skipped steps counted, warned about and
        checked against train.max_bad_steps, logging steps written; returns the last step's metrics."""
        r = self.recipe
        steps, img_per_s = pending.read(samples_per_step)
        data = loader.metrics() if hasattr(loader, "metrics") else {}  # data/skipped/<reason>, ...
        last: dict[str, float] = {}
        for done, values, facts in steps:
            if round(values.pop("_bad")):
                warnings.warn(f"step {done}: non-finite loss or gradient ({values['loss']}); step skipped")
                self._count_bad_steps(state, 1)
            last = {**values, "lr": facts["lr"], "img_per_s": img_per_s or samples_per_step / facts["seconds"],
                    "samples_seen": facts["samples_seen"], "bad_steps": state["bad_steps"], **data}
            if done % r.logging.every_steps == 0 or done == r.train.steps:
                log.write(done, last)
        return last

    def _count_bad_steps(self, state, n: int) -> None:
        state["bad_steps"] += n
        limit = self.recipe.train.max_bad_steps
        if state["bad_steps"] > limit:
            raise _shared_error(
                f"{state['bad_steps']} steps had a NaN/inf loss or gradient (limit train.max_bad_steps={limit}). "
                "Lower optim.lr, check the data, or use train.precision=fp32."
            )

    def _checkpoint_due_by_time(self, last_save_time: float) -> bool:
        minutes = self.recipe.train.checkpoint_every_minutes
        return minutes is not None and time.monotonic() - last_save_time > 60 * minutes

    def _read_due(self, done: int) -> bool:
        """Sync-free: the steps where the host reads the pending numbers and, under torchrun, the ranks
        all-reduce their stop flags (signal, time budget, checkpoint by time). A function of the step
        alone, so every rank takes part in the same collectives: evaluation and step-based checkpoint
        steps, the last step, and every ``READ_EVERY_STEPS`` steps (log lines come that late at most,
        and a signal is acted on within that many steps under torchrun)."""
        r = self.recipe
        every = r.train.checkpoint_every_steps
        return (done % READ_EVERY_STEPS == 0 or done == r.train.steps
                or bool(r.eval.every_steps and done % r.eval.every_steps == 0) or bool(every and done % every == 0))

    def _checkpoint_due(self, step: int, by_time: bool) -> bool:
        every = self.recipe.train.checkpoint_every_steps
        return (every is not None and step % every == 0) or by_time

    def _run_eval(self, model, tokenizer, step: int, log, final: bool = False) -> dict[str, float]:
        """Distributed hooks (``hook.distributed = True``) run on every rank; others on rank 0 only."""
        if not self.eval_hooks:
            return {}
        ctx, plain = self.dist, D.unwrap(model).model  # hooks evaluate the CLIP model itself
        was_training = model.training
        model.eval()
        results: dict[str, float] = {}
        with torch.no_grad():
            for hook in self.eval_hooks:
                if getattr(hook, "distributed", False):
                    results.update(hook(plain, tokenizer, step))
                elif self.recipe.train.fsdp and ctx.enabled:
                    if ctx.is_main:
                        warnings.warn(f"eval hook {getattr(hook, '__name__', hook)} cannot run on one rank of "
                                      "a sharded (FSDP) model; skipped")
                elif ctx.is_main:
                    results.update(hook(plain, tokenizer, step))
        D.barrier(ctx)  # the other ranks wait for rank 0's evaluation
        model.train(was_training)
        if results:
            log.write_eval(step, results, final)
        return results



class StepRunner:
    """One optimiser step as ``train`` runs it; ``clipforge bench`` times this same object.

    ``to_device`` trims the text padding and copies a batch to the device; ``forward_backward``
    runs the micro-batches (plain or GradCache accumulation, autocast), averages replicated
    gradients across ranks and clips; ``apply`` steps the optimiser and runs the step module's
    after-step hook (logit-scale clamp, EMA teachers, term state); ``skip`` drops a bad step.

    Nothing here reads a device value on the host: the loss, the metrics and the gradient norm come
    back as 0-d tensors. Where ``sync_free`` holds, ``apply_unless_bad`` also decides on the device
    whether the step is applied, so the GPU never waits for the host between steps.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, recipe: Recipe,
                 device: torch.device, ctx: D.DistContext = D.SINGLE_PROCESS) -> None:
        self.model, self.optimizer, self.recipe, self.device, self.ctx = model, optimizer, recipe, device, ctx
        self.step_module = D.unwrap(model)  # the training step (model, objective, teachers, heads)
        self.dtype = resolve_precision(recipe, device)
        # pooled text features do not depend on padding after the longest caption (causal attention);
        # terms that read per-token text features get the full context (their shapes must match across ranks)
        self.trim_text = not any(k.endswith(("text_tokens", "text_token_embeds")) for k in self.step_module.needs)
        # a fused optimiser (it honours found_inf) and an after-step hook that a suppressed update leaves
        # without effect
        fused = all(group.get("fused") for group in optimizer.param_groups)
        sharded = ctx.enabled and recipe.train.fsdp  # FSDP's DTensor parameters: found_inf not handed to them
        self.sync_free = (not recipe.train.sync_every_step and fused and not sharded
                          and self.step_module.after_step_keeps_no_state())

    def set_lr(self, step: int) -> float:
        r = self.recipe
        lr = lr_at(step, r.train.steps, r.optim.lr, r.schedule)
        set_group_lrs(self.optimizer, lr)
        return lr

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        from clipforge.data.loader import trim_text_padding

        if self.trim_text:
            batch = trim_text_padding(batch)
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _forward(self, batch: dict[str, Any]):
        return self.model(batch)  # the step's passes (through the DDP/FSDP wrapper)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def forward_backward(self, micro_batches: list[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
        """(mean loss, last micro-batch's metrics, gradient norm before clipping), 0-d tensors where the
        step computed them (not read on the host); gradients left in place."""
        r, model = self.recipe, self.model
        if r.train.accum_mode == "gradcache":
            loss_sum, metrics = gradcache_accumulation(model, self.step_module.compute_loss, micro_batches,
                                                       self._forward, self._autocast, self.device)
        else:
            loss_sum, metrics = plain_accumulation(model, self.step_module.compute_loss, micro_batches,
                                                   self._forward, self._autocast)
        D.average_replicated_grads(model, self.ctx, r.train.fsdp)
        return loss_sum, metrics, _clip_and_measure(model, r.optim.grad_clip, self.device)

    def apply(self, done: int) -> None:
        """Step the optimiser; ``done`` = optimiser steps done including this one."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_module.after_optimizer_step(done)  # clamp t, EMA teachers, term state

    def apply_unless_bad(self, loss: torch.Tensor, grad_norm: torch.Tensor, done: int) -> torch.Tensor:
        """``apply``, except where the loss or the gradient norm is NaN/inf, decided on the device: fused
        AdamW leaves weights, moments and its step count unchanged where ``found_inf`` is 1. Returns that
        flag (0-d float tensor). Only where ``sync_free`` holds (the after-step hook must keep no state)."""
        bad = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
        if self.ctx.enabled:  # one rank's bad loss skips the step everywhere (async on NCCL: no host wait)
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.optimizer.found_inf = bad
        try:
            self.apply(done)
        finally:
            self.optimizer.found_inf = None
        return bad

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.step_module.discard_step()  # e.g. LexLIP's queued keys, ALIP's batch means


def build_step(recipe: Recipe, device: torch.device, resume_from: Path | None = None, log: bool = True):
    """The training step module of a recipe: model (+ warm start or resumed weights), objective,
    teachers and the method's heads, on ``device``. Call after seeding (the init is seeded)."""
    from clipforge.methods import method_class
    from clipforge.models.clip import CLIP
    from clipforge.objectives import build_objective
    from clipforge.train.teachers import build_teachers

    model = CLIP(recipe.model)
    report = None
    if resume_from is not None:  # every rank reads the weights (before sharding them under FSDP)
        ckpt.load_model_weights(model, resume_from)
    else:
        if recipe.model.text_tower == "hf":  # the pretrained encoder's weights (a checkpoint brings its own)
            model.text.load_pretrained(recipe.model.text_pretrained)
        report = _warm_start(model, recipe, log)
    model = model.to(device)
    objective = build_objective(recipe.objective).to(device)
    teachers = build_teachers(recipe.teachers, model, device)
    step = method_class(recipe.method.name).from_recipe(recipe, model, objective, teachers).to(device)
    step.init_report = report  # what model.init_from loaded (None without a warm start)
    if resume_from is not None:
        ckpt.load_method_state(step, resume_from)
    # after the teachers were built: they run as the recipe's teacher config says
    step.model.set_low_precision_residual(recipe.train.bf16_residual)
    step.model.set_fused_mlp(recipe.train.fused_mlp)
    step.model.set_grad_checkpointing(recipe.train.grad_checkpointing)
    step.model.set_attention_backend(recipe.train.attention_backend)
    if recipe.train.compile:
        # in place (state-dict keys unchanged), after the teachers copied the eager model
        step.model.compile(mode=recipe.train.compile_mode)
    return step


def _warm_start(model: torch.nn.Module, recipe: Recipe, log: bool):
    """``model.init_from``: partial weights from another checkpoint; returns the report of what was loaded."""
    spec = getattr(recipe.model, "init_from", None)
    if spec is None:
        return None
    from clipforge.train.params import load_init_from

    report = load_init_from(model, spec)
    if log:
        print(report.summary(), flush=True)
    return report


READ_EVERY_STEPS = 10  # sync-free: the host reads the steps' numbers (and ranks agree on stopping) this often


class _PendingSteps:
    """The steps whose numbers (loss, metrics, gradient norm, logit scale, skip flag: 0-d tensors while
    sync-free) the host has not read yet, with each step's host facts (lr, samples seen, seconds)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, Any], dict[str, float]]] = []
        self._t0 = time.perf_counter()

    def add(self, done: int, values: dict[str, Any], facts: dict[str, float]) -> None:
        self.steps.append((done, values, facts))

    def read(self, samples_per_step: int) -> tuple[list[tuple[int, dict[str, float], dict[str, float]]], float | None]:
        """Every pending step's values as floats (one device-to-host transfer for all), and img/s over the
        stretch since the last read (None for a single step: its own time is then exact)."""
        flat = [v for _, values, _ in self.steps for v in values.values()]
        floats = iter(D.sum_over_ranks(flat, D.SINGLE_PROCESS, _device_of(flat)))
        out = [(done, {k: next(floats) for k in values}, facts) for done, values, facts in self.steps]
        now = time.perf_counter()
        rate = len(out) * samples_per_step / (now - self._t0) if len(out) > 1 else None
        self.steps, self._t0 = [], now
        return out, rate


def snapshot_metrics(loss: torch.Tensor, metrics: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Copies of the step's 0-d tensors in one kernel (later in-place updates do not reach them)."""
    keys = [k for k, v in metrics.items() if torch.is_tensor(v)]
    values = [loss] + [metrics[k] for k in keys]
    copied = torch.stack([v.detach().reshape(()).to(loss.device, torch.float64) for v in values])
    return copied[0], {**metrics, **{k: copied[i + 1] for i, k in enumerate(keys)}}


def _device_of(values: list[Any]) -> torch.device:
    return next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _rank_data_state(saved_state: dict[str, Any], ctx) -> dict | None:
    """This rank's saved data cursor (sources on disk), if the checkpoint has one for this world size."""
    per_rank = saved_state.get("data_state_per_rank")
    return per_rank[ctx.rank] if per_rank and len(per_rank) == ctx.world_size else None


def _clip_and_measure(model: torch.nn.Module, max_norm: float | None, device: torch.device) -> torch.Tensor:
    """The gradient norm before clipping (0-d tensor on ``device``); clips in place when ``max_norm`` is set."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"), foreach=True)
    return _full(norm)
