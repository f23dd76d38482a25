"""Contrastive losses across processes, with gradients equal to the global-batch loss's.

Each of the W ranks holds b pairs; the global batch is B = W * b. Under DDP the gradients of the
per-rank losses are averaged over ranks, so every rank returns a loss whose mean over ranks is
the global loss, and the collectives' backward passes send each rank the gradient *summed* over
every rank that used its features. Mean over ranks of those sums = gradient of the global loss.

- ``clip`` (softmax over the global batch): all-gather both embeddings with autograd; rank r
  scores its own b rows against all B columns (labels r*b + i). Only b x B logits per rank.
- ``siglip`` (independent pairs): the ring of methods.md section 2. Rank r scores its images
  against its own texts (positives on the diagonal), then passes the texts to its right
  neighbour W-1 times, scoring each received block as negatives. Only b x b logits at a time,
  no all-gather.

Both are plain functions of tensors; the terms in ``contrastive.py`` and ``sigmoid.py`` switch
to them when a process group with more than one rank is active.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from clipforge.objectives.base import Metrics
from clipforge.objectives.contrastive import clip_logits, symmetric_cross_entropy
from clipforge.objectives.sigmoid import sigmoid_pair_loss_sum, siglip_logits


def active_world_size() -> int:
    """Ranks in the default process group, or 1 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def active_rank() -> int:
    """This process's rank in the default process group, or 0 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


# ----------------------------------------------------------------------------- autograd collectives
class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums every rank's gradient for this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rows, ctx.rank = x.shape[0], rank
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        parts[rank] = x  # the local shard as computed (bitwise; all_gather copies it anyway)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """(b, ...) on each rank -> (W*b, ...) in rank order; gradients flow back to every rank's rows.

    All ranks must pass the same shape.
    """
    if active_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: Tensor) -> Tensor:
    """(b, ...) on each rank -> (W*b, ...) in rank order, without autograd (indices, masks)."""
    if active_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gathered_owner(local_owner: Tensor, local_images: int) -> Tensor:
    """Every rank's ``text_owner`` in global image indices (rank r's owners + r * local_images)."""
    if active_world_size() == 1:
        return local_owner
    parts = gather_no_grad(local_owner).tensor_split(dist.get_world_size())
    return torch.cat([part + r * local_images for r, part in enumerate(parts)])


class _PassToRight(torch.autograd.Function):
    """Send to rank r+1, receive from rank r-1 (mod W); backward sends the gradient the other way."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _exchange(x.contiguous(), to=+1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _exchange(grad.contiguous(), to=-1)


def _exchange(x: Tensor, to: int) -> Tensor:
    world, rank = dist.get_world_size(), dist.get_rank()
    received = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x, (rank + to) % world),
        dist.P2POp(dist.irecv, received, (rank - to) % world),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def pass_to_right(x: Tensor) -> Tensor:
    """The ring's neighbour exchange with autograd: returns the left neighbour's ``x``."""
    return _PassToRight.apply(x)


# ----------------------------------------------------------------------------- losses
def gathered_clip_logits(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Local rows against gathered columns: (b x B image->text, b x B text->image, labels of length b)."""
    all_images = gather_with_grad(image_embeds)
    all_texts = gather_with_grad(text_embeds)
    b = image_embeds.shape[0]
    labels = torch.arange(b, device=image_embeds.device) + dist.get_rank() * b
    logits_per_image = clip_logits(image_embeds, all_texts, logit_scale)
    logits_per_text = clip_logits(text_embeds, all_images, logit_scale)
    return logits_per_image, logits_per_text, labels


def distributed_clip_loss(
    image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, Metrics]:
    """This rank's share of the global CLIP loss (mean over ranks = the global loss) and metrics.

    Cross-entropy is a mean over rows, and every rank holds b of the B rows of each direction,
    so the global loss is the mean over ranks of the local-rows losses.
    """
    _check_equal_local_batches(image_embeds)
    logits_per_image, logits_per_text, labels = gathered_clip_logits(image_embeds, text_embeds, logit_scale)
    loss = symmetric_cross_entropy(logits_per_image, logits_per_text, labels, label_smoothing)
    with torch.no_grad():
        image_to_text = (logits_per_image.argmax(dim=1) == labels).float().mean()
        text_to_image = (logits_per_text.argmax(dim=1) == labels).float().mean()
    # this rank's rows against all B candidates; the trainer averages metrics over ranks
    return loss, {"i2t_acc": image_to_text, "t2i_acc": text_to_image}


def ring_siglip_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's share of the global SigLIP loss, by the ring exchange; also the local b x b logits.

    Returns (sum over this rank's b x B pairs / b, local block logits for metrics). The global loss
    -(1/B) sum_ij is the mean over ranks of (1/b) * (rank's sum over its b rows x B columns).
    """
    _check_equal_local_batches(image_embeds)
    world = dist.get_world_size()
    local_logits = siglip_logits(image_embeds, text_embeds, logit_scale, logit_bias)
    total = sigmoid_pair_loss_sum(local_logits, positives_on_diagonal=True)
    texts = text_embeds
    for _ in range(world - 1):
        texts = pass_to_right(texts)  # after s passes: the texts of rank r - s, negatives only
        logits = siglip_logits(image_embeds, texts, logit_scale, logit_bias)
        total = total + sigmoid_pair_loss_sum(logits, positives_on_diagonal=False)
    return total / image_embeds.shape[0], local_logits


def _check_equal_local_batches(x: Tensor) -> None:
    """Gathers and exchanges need the same b on every rank; a mismatch would hang or mislabel."""
    b = x.shape[0]
    extremes = torch.tensor([b, -b], dtype=torch.long, device=x.device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)  # one collective: max b and -min b
    largest, smallest = int(extremes[0]), -int(extremes[1])
    if smallest != largest:
        raise ValueError(
            f"distributed contrastive loss needs the same local batch on every rank; "
            f"got sizes from {smallest} to {largest}"
        )
