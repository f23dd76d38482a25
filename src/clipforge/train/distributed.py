"""Data-parallel training on PyTorch's own engine: torchrun or SLURM, DDP or FSDP2, NCCL or gloo.

One process per device. The launcher tells each process who it is through environment variables:

- torchrun:  RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
- SLURM srun (one task per device): SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS; the
  rendezvous address comes from MASTER_ADDR/MASTER_PORT (set them in the sbatch script), else
  the first host of SLURM_JOB_NODELIST and port 29500.

Without either (or with a world size of 1) training runs in one process, as before.

Everything rank-specific lives here: the process group (with a timeout, so a crashed peer
fails the run instead of hanging it), wrapping the model (DDP, or ``fully_shard`` per
transformer block), agreeing on stop decisions, RNG states of every rank for checkpoints,
sharded evaluation, and the ``--nproc`` relaunch through torchrun.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist


class PeerLostError(RuntimeError):
    """A collective failed: another rank crashed, was killed, or stopped answering."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    launcher: str = "none"  # "torchrun" | "slurm" | "none" | "existing" (a group someone else opened)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = DistContext()


# ----------------------------------------------------------------------------- launch environment
def read_launch_env(env: dict[str, str] | None = None) -> tuple[int, int, int, str]:
    """(rank, local_rank, world_size, launcher) from torchrun's or SLURM's variables.

    torchrun wins when both are present (torchrun started inside an srun step). SLURM counts only
    inside a job *step* (srun), never in the batch script itself, where SLURM_NTASKS is set too
    but only one process runs.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun"
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_STEP_NUM_TASKS"]), "slurm"
    return 0, 0, 1, "none"


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list ("gpu[003-004,010],cpu1" -> "gpu003")."""
    try:  # scontrol knows every list syntax; fall back to the common forms when it is absent
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = nodelist.split(",")[0]
    if "[" in first:
        prefix, ranges = first.split("[", 1)
        return prefix + ranges.split("-")[0].split(",")[0].rstrip("]")
    return first


def resolve_backend(want: str, device: torch.device) -> str:
    if want != "auto":
        return want
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device_type: str, backend: str = "auto", timeout_minutes: float = 10.0,
                     env: dict[str, str] | None = None) -> DistContext:
    """Join the process group the launcher set up; a no-op (``SINGLE_PROCESS``) for one process.

    ``device_type`` is "cuda" or "cpu"; on CUDA each process takes GPU ``local_rank``.
    """
    if dist.is_available() and dist.is_initialized():  # a test or a notebook set it up: use it, leave it open
        return current_context()
    rank, local_rank, world_size, launcher = read_launch_env(env)
    if world_size <= 1:
        return SINGLE_PROCESS
    if launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        os.environ.setdefault("MASTER_PORT", "29500")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    chosen = resolve_backend(backend, device)
    dist.init_process_group(
        backend=chosen,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        device_id=device if device.type == "cuda" else None,
    )
    return DistContext(rank, local_rank, world_size, chosen, launcher)


def current_context() -> DistContext:
    """The context of the process group already joined (single process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE_PROCESS
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return DistContext(dist.get_rank(), local_rank, dist.get_world_size(), dist.get_backend(), "existing")


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and ctx.launcher in ("torchrun", "slurm") and dist.is_initialized():
        dist.destroy_process_group()


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK on GPUs."""
    if device.type == "cuda" and ctx.enabled:
        return torch.device("cuda", ctx.local_rank)
    return device


# ----------------------------------------------------------------------------- collectives for the loop
def peer_failure(exc: BaseException) -> bool:
    """Whether an exception is a failed collective (a peer died or timed out), not a bug here."""
    if isinstance(exc, PeerLostError):
        return True
    if type(exc).__name__ in ("TrainingError", "CheckpointError"):  # our own messages, already clear
        return False
    backend_error = getattr(dist, "DistBackendError", ())
    if backend_error and isinstance(exc, backend_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("connection closed by peer", "connection reset", "timed out", "timeout",
                            "broken pipe", "gloo", "nccl", "socket")
    )


def short_reason(exc: BaseException) -> str:
    """The first sentence of a backend error, without the C++ source location."""
    import re

    text = re.sub(r"^\s*\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    return (text.split(". ")[0] if text else type(exc).__name__).rstrip(".")


def sum_over_ranks(values: Sequence[float | torch.Tensor], ctx: DistContext, device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a few numbers, floats or 0-d tensors (one small all_reduce, one
    device-to-host transfer; float64 so counts stay exact)."""
    if not ctx.enabled and not any(torch.is_tensor(v) for v in values):
        return [float(v) for v in values]
    t = torch.stack([v.detach().reshape(()).to(device, torch.float64) if torch.is_tensor(v)
                     else torch.tensor(float(v), dtype=torch.float64, device=device) for v in values])
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def mean_over_ranks_async(loss: torch.Tensor, metrics: dict[str, Any], ctx: DistContext,
                          device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) averaged over ranks on the device, in float64 like ``sum_over_ranks`` (so the
    numbers are the same), without the host waiting: on NCCL the all_reduce is queued on the stream.
    Single process: returned unchanged."""
    if not ctx.enabled:
        return loss, metrics
    names = sorted(metrics)
    values = [loss] + [metrics[k] for k in names]
    t = torch.stack([v.detach().reshape(()).to(device, torch.float64) if torch.is_tensor(v)
                     else torch.tensor(float(v), dtype=torch.float64).to(device, non_blocking=True) for v in values])
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t = t / ctx.world_size
    return t[0], {k: t[i + 1] for i, k in enumerate(names)}


def broadcast_from_main(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (small picklable objects: paths, messages)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def same_on_all_ranks(text: str, ctx: DistContext) -> bool:
    """Whether every rank holds the same ``text`` (compared by digest)."""
    if not ctx.enabled:
        return True
    digest = hashlib.sha256(text.encode()).hexdigest()
    every = [None] * ctx.world_size
    dist.all_gather_object(every, digest)
    return len(set(every)) == 1


# ----------------------------------------------------------------------------- model wrapping
def wrap_model(model: torch.nn.Module, ctx: DistContext, device: torch.device, fsdp: bool) -> torch.nn.Module:
    """DDP (replicated weights, averaged gradients) or FSDP2 (sharded weights, grads, optimizer state).

    DDP broadcasts rank 0's weights at construction, so every rank starts equal. FSDP shards the
    weights each rank already holds; the trainer seeds model init identically on every rank.
    """
    if not ctx.enabled:
        return model
    if fsdp:
        return shard_model(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` every transformer block, then the projections and the root.

    Each block is its own unit so only one block's full weights exist at a time. The encoders are
    registered as forward methods, so ``encode_image``/``encode_text`` (evaluation) gather the
    root's weights like ``forward`` does.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    clip = getattr(model, "model", model)  # a training step holds the CLIP model as .model
    for tower in (clip.visual, clip.text):
        for block in getattr(tower, "blocks", []):
            fully_shard(block)
    # FSDP2 cannot shard 0-d parameters; the logit scale and bias stay replicated and
    # ``average_replicated_grads`` averages their gradients after backward, as DDP would
    ignored = set(replicated_params(model))
    if clip is not model:
        fully_shard(clip, ignored_params=ignored)  # its own unit: evaluation calls clip.encode_* directly
    fully_shard(model, ignored_params=ignored)
    for name in ("encode_image", "encode_text"):
        register_fsdp_forward_method(clip, name)
    return model


def replicated_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters FSDP leaves unsharded (0-d scalars such as the logit scale and bias)."""
    return [p for p in model.parameters() if p.ndim == 0]


def average_replicated_grads(model: torch.nn.Module, ctx: DistContext, fsdp: bool) -> None:
    """Mean over ranks of the gradients FSDP does not reduce (DDP reduces everything itself)."""
    if not (fsdp and ctx.enabled):
        return
    for p in replicated_params(model):
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(ctx.world_size)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under a DDP wrapper (FSDP2 keeps the module itself)."""
    return getattr(model, "module", model)


def full_model_state(model: torch.nn.Module, ctx: DistContext, fsdp: bool) -> dict[str, torch.Tensor]:
    """The complete (unsharded) state dict on CPU; with FSDP every rank must call it."""
    if fsdp and ctx.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().to("cpu") for k, v in unwrap(model).state_dict().items()}


def full_optimizer_state(model, optimizer, ctx: DistContext, fsdp: bool) -> dict:
    if fsdp and ctx.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_optimizer_state(model, optimizer, state: dict, ctx: DistContext, fsdp: bool) -> None:
    if fsdp and ctx.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


class StateDictView:
    """Looks like a module to ``checkpoint.save_checkpoint``: only ``state_dict()`` is used."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


# ----------------------------------------------------------------------------- evaluation
def shard_of(n_items: int, batch_size: int, ctx: DistContext) -> tuple[list[range], int]:
    """This rank's eval batches (whole batches, round-robin) and the number every rank must run.

    Whole batches of the single-process order keep each embedding bitwise equal to the
    single-process one (same batch content and shape); every rank runs the same number of
    forward passes (padding with a repeat) because FSDP needs all ranks in every forward.
    """
    from clipforge.eval.embedding import chunk_ranges, num_rounds

    return chunk_ranges(n_items, batch_size, ctx.rank, ctx.world_size), num_rounds(n_items, batch_size, ctx.world_size)


def gather_rows_in_order(local: torch.Tensor, local_index: torch.Tensor, n_items: int, ctx: DistContext) -> torch.Tensor:
    """Rows embedded by all ranks (``local_index`` = their positions) -> one tensor in item order."""
    from clipforge.eval.embedding import put_in_order

    if not ctx.enabled:
        return local
    rows = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(rows) for _ in range(ctx.world_size)]
    dist.all_gather(counts, rows)
    most = int(max(c.item() for c in counts))
    pad = most - local.shape[0]
    padded = torch.cat([local, local.new_zeros(pad, *local.shape[1:])]) if pad else local
    padded_index = torch.cat([local_index, local_index.new_full((pad,), -1)]) if pad else local_index
    every = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    every_index = [torch.empty_like(padded_index) for _ in range(ctx.world_size)]
    dist.all_gather(every, padded.contiguous())
    dist.all_gather(every_index, padded_index.contiguous())
    return put_in_order(every, every_index, n_items)


def embed_split_sharded(model, tokenizer, dataset, batch_size: int, ctx: DistContext):
    """Like ``clipforge.eval.hooks.embed_split``, with the batches split between ranks and gathered."""
    from clipforge.data.loader import make_batch
    from clipforge.eval.embedding import embed_batches

    n = len(dataset)
    rows = embed_batches(model, lambda idx: make_batch(dataset, idx, tokenizer), n, batch_size, keep=("labels",),
                         rank=ctx.rank, world_size=ctx.world_size)
    return tuple(gather_rows_in_order(rows[key], rows["index"], n, ctx) for key in ("images", "texts", "labels"))


def late_interaction_logits_sharded(model, tokenizer, dataset, batch_size: int, classnames, templates,
                                   ctx: DistContext) -> torch.Tensor:
    """FILIP's zero-shot logits of a shapes eval split, its batches split between ranks and gathered in order."""
    from clipforge.eval.zeroshot import late_interaction_zero_shot_logits

    n = len(dataset)
    mine, rounds = shard_of(n, batch_size, ctx)
    # every rank runs `rounds` forwards (FSDP): one out of batches scores its last (or item 0) again, dropped after
    chunks = [mine[min(i, len(mine) - 1)] if mine else range(0, 1) for i in range(rounds)]
    logits = late_interaction_zero_shot_logits(model, tokenizer, dataset.render_chunks(chunks), classnames, templates)
    real = sum(len(c) for c in mine)
    index = torch.tensor([i for c in mine for i in c], dtype=torch.long)
    device = next(model.parameters()).device
    return gather_rows_in_order(logits[:real].to(device), index.to(device), n, ctx)


def sharded_shapes_eval(recipe) -> Callable:
    """The built-in shapes evaluation with the images split between ranks (a distributed hook):
    ``clipforge.eval.hooks.evaluate_shapes`` with sharded embedding and scoring; every rank gets the
    same metrics."""
    def shapes_hook(model, tokenizer, step):
        from clipforge.eval.hooks import evaluate_shapes

        ctx = current_context()
        return evaluate_shapes(model, tokenizer, recipe, embed=partial(embed_split_sharded, ctx=ctx),
                               score_tokens=partial(late_interaction_logits_sharded, ctx=ctx))

    shapes_hook.distributed = True  # the trainer runs it on every rank
    return shapes_hook


# ----------------------------------------------------------------------------- --nproc
def torchrun_command(nproc: int, module_args: Iterable[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m clipforge ...``.

    ``--standalone`` picks a free local port; torchrun's agent tears the whole group down when one
    worker fails, and forwards SIGTERM/SIGINT to the workers.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "clipforge", *module_args]


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """argv without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def relaunch_with_torchrun(nproc: int, argv: Sequence[str]) -> None:
    """Replace this process with torchrun running ``clipforge <argv minus --nproc>`` on ``nproc`` ranks.

    exec (not a child) so signals sent to this process reach torchrun, which passes them on.
    """
    command = torchrun_command(nproc, strip_nproc(argv))
    env = os.environ
    # one intra-op thread per rank unless asked otherwise: N ranks share the machine's cores
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, env)
