"""One optimiser step's gradient from k micro-batches: plain averaging or GradCache.

Plain accumulation averages the k micro-batch losses, so a contrastive loss only sees the
negatives inside each micro-batch. GradCache (Gao et al. 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup") gives exactly the gradient of one batch k
times larger at the memory of one micro-batch:

1. embed every micro-batch without autograd (no activations kept);
2. compute the objective once on all k*b embeddings, treated as leaf tensors, and backpropagate
   it to them: this caches d loss / d embedding for every sample (and for the logit scale/bias);
3. replay each micro-batch with autograd and backpropagate ``sum(embedding * cached_grad)``,
   whose gradient with respect to the weights is the chain rule's share of that micro-batch.

The replay restores the RNG state of the first pass, so random patch dropout keeps the same
patches. Under DDP all but the last replay run inside ``no_sync()``, so gradients cross the
network once per step. Outputs are split into per-sample tensors (dim 0 = the micro-batch)
and 0-d tensors that do not depend on the batch (logit scale and bias).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from clipforge.objectives.base import Metrics

ForwardFn = Callable[[dict[str, Any]], dict[str, Any]]


def no_sync_unless_last(model: torch.nn.Module, is_last: bool):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP2) for every micro-batch but the last."""
    if is_last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def plain_accumulation(model, objective, micro_batches: list[dict], forward: ForwardFn,
                       autocast: Callable[[], Any]) -> tuple[Tensor, Metrics]:
    """Backpropagate the mean of the micro-batch losses; returns (mean loss, last metrics).

    The loss stays a 0-d tensor on the device (no host synchronisation here)."""
    k = len(micro_batches)
    loss_sum: Tensor | float = 0.0
    metrics: Metrics = {}
    for i, batch in enumerate(micro_batches):
        with no_sync_unless_last(model, i == k - 1):
            with autocast():
                loss, metrics = objective(forward(batch), batch)
            (loss / k).backward()
        loss_sum = loss_sum + loss.detach().float() / k
    return loss_sum, metrics


class _RngFork:
    """Capture the RNG state before a forward pass so the replay draws the same numbers."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        self.restore()
        yield


def split_outputs(outputs: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(per-sample tensors, 0-d batch-independent tensors); anything else cannot be cached."""
    per_sample, scalars = {}, {}
    for key, value in outputs.items():
        if not torch.is_tensor(value):
            raise ValueError(
                f"train.accum_mode='gradcache' cannot cache model output '{key}' (a {type(value).__name__}); "
                "use train.accum_mode='plain' with objectives that need it"
            )
        (scalars if value.ndim == 0 else per_sample)[key] = value
    return per_sample, scalars


def concat_batches(micro_batches: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch dict holding the k micro-batches in order (tensors and lists concatenated)."""
    out: dict[str, Any] = {}
    for key, first in micro_batches[0].items():
        values = [b[key] for b in micro_batches]
        if key == "text_owner":  # image indices are per micro-batch: shift them to the concatenated batch
            starts = [0]
            for b in micro_batches[:-1]:
                starts.append(starts[-1] + b["images"].shape[0])
            out[key] = torch.cat([v + s for v, s in zip(values, starts)])
        elif torch.is_tensor(first):
            out[key] = torch.cat(values)
        elif isinstance(first, list):
            out[key] = [x for v in values for x in v]
        else:
            out[key] = first
    return out


def _leaf(x: Tensor) -> Tensor:
    return x.detach().requires_grad_(x.is_floating_point())


def gradcache_accumulation(model, objective, micro_batches: list[dict], forward: ForwardFn,
                           autocast: Callable[[], Any], device: torch.device) -> tuple[Tensor, Metrics]:
    """GradCache: the gradient of the objective on all micro-batches together; returns (loss, metrics)."""
    # 1. embed without autograd, remembering each micro-batch's RNG state
    forks, cached = [], []
    with torch.no_grad():
        for batch in micro_batches:
            forks.append(_RngFork(device))
            with autocast():
                cached.append(split_outputs(forward(batch)))
    after_first_pass = _RngFork(device)  # where the RNG stands after a normal step

    # 2. one loss over every sample; gradients land on the cached embeddings
    per_sample = {key: _leaf(torch.cat([c[0][key] for c in cached])) for key in cached[0][0]}
    scalars = {key: _leaf(value) for key, value in cached[0][1].items()}
    with autocast():
        loss, metrics = objective({**per_sample, **scalars}, concat_batches(micro_batches))
    loss.backward()

    # 3. replay each micro-batch with autograd and push the cached gradients through it
    k = len(micro_batches)
    offsets = dict.fromkeys(per_sample, 0)  # per output: images and captions may differ in rows (T per image)
    for i, (batch, fork) in enumerate(zip(micro_batches, forks)):
        is_last = i == k - 1
        with no_sync_unless_last(model, is_last), fork.replay():
            with autocast():
                outputs, batch_scalars = split_outputs(forward(batch))
            surrogate = _dot_with_cached_grads(outputs, per_sample, offsets)
            if is_last:  # batch-independent outputs (logit scale/bias) get their gradient once
                surrogate = surrogate + _dot_with_cached_grads(batch_scalars, scalars, None)
            surrogate.backward()
        for key, value in outputs.items():
            offsets[key] += value.shape[0]
    after_first_pass.restore()  # the replays redrew the same numbers; leave the stream as one pass would
    return loss.detach().float(), metrics


def _dot_with_cached_grads(outputs: dict[str, Tensor], leaves: dict[str, Tensor], offsets: dict[str, int] | None) -> Tensor:
    """sum over outputs of <output, cached gradient>; its gradient w.r.t. the weights is the chain rule's."""
    total = torch.zeros((), device=next(iter(leaves.values())).device) if leaves else torch.zeros(())
    for key, value in outputs.items():
        grad = leaves[key].grad
        if grad is None:  # not used by the objective (e.g. integer indices)
            continue
        if offsets is not None:
            grad = grad[offsets[key]:offsets[key] + value.shape[0]]
        total = total + (value.float() * grad.float()).sum()
    return total
