"""SigLIP: every image-text pair is its own binary classification (Zhai et al. 2023).

logits L = t * X @ Y^T + b; label z_ij = +1 if i == j else -1;
loss = -(1/B) * sum_ij log sigmoid(z_ij * L_ij)   (sum over B^2 pairs, divided by the B positives).

The ring form (methods.md section 2): with D shards of b = B/D pairs, shard d computes its
local b x b block (positives on the diagonal plus local negatives), then D-1 blocks against
the other shards' texts, which hold negatives only. ``siglip_loss_chunked`` runs that
schedule in one process; the distributed version swaps the loop for a neighbour exchange.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from clipforge.objectives.base import Metrics, Term, TermConfig, register_term, require_output, upcast_low_precision
from clipforge.objectives.chunked import CHUNK_HINT, siglip_loss_recomputed

MISSING_BIAS_HINT = (
    "SigLIP needs a learnable logit bias: set model.logit_bias_init = -10 "
    "(and model.logit_scale_init = 2.302585, i.e. t = 10) in the recipe."
)


def siglip_logits(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """(N, D), (M, D) -> (N, M) logits t * x_i . y_j + b."""
    # Scale the (N, D) side and fold the bias into the matmul: one N x M tensor.
    bias = logit_bias.reshape(()).to(image_embeds.dtype)
    return upcast_low_precision(torch.addmm(bias, logit_scale * image_embeds, text_embeds.T))


def sigmoid_pair_loss_sum(logits: Tensor, positives_on_diagonal: bool) -> Tensor:
    """sum_ij -log sigmoid(z_ij * L_ij) over one block; z = +1 on the diagonal if it holds positives, else -1.

    No label matrix: every pair is first scored as a negative, -log sigmoid(-L) (logsigmoid is
    exact for any L). A positive's loss is -log sigmoid(L) = -log sigmoid(-L) - L, so the
    positives only need the diagonal subtracted.
    """
    loss = -F.logsigmoid(-logits).sum()
    if positives_on_diagonal:
        loss = loss - logits.diagonal().sum()
    return loss


def sigmoid_masked_loss_sum(logits: Tensor, positives: Tensor, row_weights: Tensor | None = None) -> Tensor:
    """sum_ij -log sigmoid(z_ij * L_ij) with z = +1 where ``positives`` (bool, same shape) else -1;
    ``row_weights`` scale each image row. Several positives per row (multi-caption) are allowed."""
    loss = -F.logsigmoid(-logits) - logits * positives.to(logits.dtype)
    if row_weights is not None:
        loss = loss * row_weights[:, None]
    return loss.sum()


def siglip_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """The SigLIP loss of aligned pairs (x_i, y_i); embeddings L2-normalised, logit_scale = t, logit_bias = b."""
    logits = siglip_logits(image_embeds, text_embeds, logit_scale, logit_bias)
    return sigmoid_pair_loss_sum(logits, positives_on_diagonal=True) / image_embeds.shape[0]


def siglip_loss_chunked(
    image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, logit_bias: Tensor, num_chunks: int
) -> Tensor:
    """``siglip_loss`` computed as the ring would: ``num_chunks`` simulated shards, one b x b block per step.

    Shard d scores its images against its own texts (positives on the diagonal), then against
    the texts received from its left neighbour at each of the num_chunks - 1 ring steps
    (negatives only). Shards may differ in size by one when B is not divisible. In one process
    autograd still keeps every block for backward: this is for checking the ring, not for memory.
    """
    batch_size = image_embeds.shape[0]
    if not 1 <= num_chunks <= batch_size:
        raise ValueError(f"num_chunks must be in 1..{batch_size} (the batch size), got {num_chunks}")
    image_shards = image_embeds.tensor_split(num_chunks)
    text_shards = text_embeds.tensor_split(num_chunks)
    block_losses = []
    for shard in range(num_chunks):
        for step in range(num_chunks):
            source = (shard - step) % num_chunks  # step 0 is the local block
            logits = siglip_logits(image_shards[shard], text_shards[source], logit_scale, logit_bias)
            block_losses.append(sigmoid_pair_loss_sum(logits, positives_on_diagonal=(step == 0)))
    return torch.stack(block_losses).sum() / batch_size


@torch.no_grad()
def sigmoid_pair_metrics(logits: Tensor) -> Metrics:
    """Mean positive and negative logits and the share of pairs classified right (logit > 0 iff positive)."""
    n = logits.shape[0]
    diagonal_sum = logits.diagonal().sum()
    positive_right = (logits.diagonal() > 0).sum()
    negative_right = (logits < 0).sum() - (logits.diagonal() < 0).sum()
    pairs = n * logits.shape[1]
    return {
        "pos_logit": diagonal_sum / n,
        "neg_logit": (logits.sum() - diagonal_sum) / (pairs - n) if pairs > n else float("nan"),
        "pair_acc": (positive_right + negative_right) / pairs,
    }


class SigLipConfig(TermConfig):
    name: str = "siglip"
    # rows of the logit matrix at a time, recomputed in backward: the N x N logits are never held
    chunk_size: int | None = Field(None, ge=1)


@register_term
class SigLipLoss(Term):
    """SigLIP's loss; ``text_owner`` (several captions per image) and ``weights`` in the batch are honoured."""

    name = "siglip"
    Config = SigLipConfig
    scope = "ring"  # pairs are independent: pass text blocks around the ranks, no all-gather

    def __init__(self, weight: float = 1.0, chunk_size: int | None = None):
        super().__init__(weight)
        self.chunk_size = chunk_size

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        logit_scale = require_output(outputs, "logit_scale", self.name)
        logit_bias = require_output(outputs, "logit_bias", self.name, MISSING_BIAS_HINT)
        image_embeds = outputs["image_embeds"]
        from clipforge.objectives.distributed import active_world_size, ring_siglip_loss

        owner, weights = batch.get("text_owner"), batch.get("weights")
        if owner is not None or weights is not None:
            if self.chunk_size is not None:
                raise ValueError(f"siglip: this batch has several captions per image or sample weights. {CHUNK_HINT}")
            return self._multi_positive(image_embeds, outputs["text_embeds"], logit_scale, logit_bias, owner, weights)
        if self.chunk_size is not None and active_world_size() == 1:
            loss, stats = siglip_loss_recomputed(image_embeds, outputs["text_embeds"], logit_scale, logit_bias,
                                                 self.chunk_size)
            return loss, {"pos_logit": stats[0], "neg_logit": stats[1], "pair_acc": stats[2],
                          "logit_scale": logit_scale.detach(), "logit_bias": logit_bias.detach()}
        if active_world_size() > 1:  # ring exchange of text blocks; metrics from the local block
            loss, logits = ring_siglip_loss(image_embeds, outputs["text_embeds"], logit_scale, logit_bias)
        else:
            logits = siglip_logits(image_embeds, outputs["text_embeds"], logit_scale, logit_bias)
            loss = sigmoid_pair_loss_sum(logits, positives_on_diagonal=True) / image_embeds.shape[0]
        metrics = sigmoid_pair_metrics(logits)
        metrics["logit_scale"] = logit_scale.detach()
        metrics["logit_bias"] = logit_bias.detach()
        return loss, metrics

    def _multi_positive(self, images, texts, logit_scale, logit_bias, owner, weights) -> tuple[Tensor, Metrics]:
        """Positives where text_owner names the image; other ranks' texts (ring) are negatives only,
        since every text's owner is on its own rank. Loss = sum over pairs / number of images."""
        from clipforge.objectives.distributed import active_world_size, pass_to_right

        if owner is None:
            owner = torch.arange(texts.shape[0], device=texts.device)
        positives = owner[None, :] == torch.arange(images.shape[0], device=images.device)[:, None]
        logits = siglip_logits(images, texts, logit_scale, logit_bias)
        total = sigmoid_masked_loss_sum(logits, positives, weights)
        if active_world_size() > 1:
            import torch.distributed as dist

            received = texts
            for _ in range(dist.get_world_size() - 1):
                received = pass_to_right(received)
                block = siglip_logits(images, received, logit_scale, logit_bias)
                total = total + sigmoid_masked_loss_sum(block, torch.zeros_like(block, dtype=torch.bool), weights)
        return total / images.shape[0], {"logit_scale": logit_scale.detach(),
                                          "logit_bias": logit_bias.detach()}


def multi_positive_labels(owner: Tensor, num_images: int) -> Tensor:
    """num_images x T bool: text j is a positive of image i when ``owner[j] == i`` (FLAME: the M rows of
    image i's caption and facet embeddings)."""
    return owner[None, :] == torch.arange(num_images, device=owner.device)[:, None]


def multi_positive_sigmoid_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                                owner: Tensor) -> Tensor:
    """FLAME's loss: -(1/T) sum_ij log sigmoid(z_ij (t x_i.y_j + b)), z = +1 where text j belongs to image i.
    With T = B*M texts (M per image); with M = 1 and owner = arange(B) it is SigLIP's loss."""
    logits = siglip_logits(image_embeds, text_embeds, logit_scale, logit_bias)
    positives = multi_positive_labels(owner, image_embeds.shape[0])
    return sigmoid_masked_loss_sum(logits, positives) / text_embeds.shape[0]


@register_term
class MultiPositiveSigmoid(SigLipLoss):
    """FLAME's multi-positive sigmoid: each image is positive with all M of its text embeddings (its
    caption and facet prompts, ``outputs["text_owner"]`` from ``clipforge.methods.lit``), negative
    with every other image's; averaged over the B*M texts (SigLIP averages over the B images: the two
    agree at M = 1). Other ranks' texts arrive by ring exchange, as negatives only."""

    name = "multi_sigmoid"
    Config = TermConfig  # no chunk_size: its texts are not one per image
    scope = "ring"

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        logit_scale = require_output(outputs, "logit_scale", self.name)
        logit_bias = require_output(outputs, "logit_bias", self.name, MISSING_BIAS_HINT)
        images, texts = outputs["image_embeds"], outputs["text_embeds"]
        owner = outputs.get("text_owner", batch.get("text_owner"))
        loss, metrics = self._multi_positive(images, texts, logit_scale, logit_bias, owner, batch.get("weights"))
        metrics["texts_per_image"] = texts.shape[0] / images.shape[0]
        return loss * images.shape[0] / texts.shape[0], metrics
