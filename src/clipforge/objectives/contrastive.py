"""CLIP: symmetric InfoNCE over in-batch image-text pairs (Radford et al. 2021).

logits L = t * X @ Y^T (t = exp(t'), already exponentiated and clamped by the model);
loss = (CE(L, arange) + CE(L^T, arange)) / 2. Label smoothing eps uses the target
(1 - eps) * onehot + eps / B, which is exactly ``F.cross_entropy(..., label_smoothing=eps)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from clipforge.objectives.base import Metrics, Term, TermConfig, register_term, require_output, upcast_low_precision
from clipforge.objectives.chunked import CHUNK_HINT, clip_loss_chunked


def clip_logits(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor) -> Tensor:
    """(N, D), (M, D) -> (N, M) logits t * x_i . y_j."""
    # Scale the (N, D) side rather than the (N, M) product: one matmul, no extra N x M copy.
    return upcast_low_precision((logit_scale * image_embeds) @ text_embeds.T)


def symmetric_cross_entropy(
    logits_per_image: Tensor,
    logits_per_text: Tensor,
    labels: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """(CE(image -> text) + CE(text -> image)) / 2.

    Single process: ``logits_per_text = logits_per_image.T`` and labels = arange(B).
    Distributed (local rows vs gathered columns): labels = arange(b) + rank * b.
    """
    if labels is None:
        labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_to_text = F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
    text_to_image = F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    return (image_to_text + text_to_image) / 2


def multi_positive_clip_loss(
    logits_per_image: Tensor,
    logits_per_text: Tensor,
    text_owner: Tensor | None = None,
    image_offset: int = 0,
    text_offset: int = 0,
    weights: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Symmetric InfoNCE where each image may own several texts (its positives).

    ``logits_per_image`` is (n images here) x (all T texts), ``logits_per_text`` (n' texts here) x
    (all N images); ``text_owner`` (length T, global image indices) says which image each text belongs
    to; ``image_offset`` / ``text_offset`` place this process's rows in the global batch.

    - image -> text: cross-entropy against the uniform distribution over the image's positives
      (with one positive per image this is CLIP's CE exactly);
    - text -> image: cross-entropy with the owner as the label.

    ``weights`` (one per local image) scale each image's loss and its texts' losses; the loss is the
    plain mean of the weighted per-row losses, so the mean over ranks of the per-rank losses is the
    global loss (the gathered path stays exact).
    """
    n_images, n_texts = logits_per_image.shape[0], logits_per_text.shape[0]
    device = logits_per_image.device
    if text_owner is None:
        text_owner = torch.arange(logits_per_image.shape[1], device=device)
    image_ids = torch.arange(n_images, device=device) + image_offset
    positives = (text_owner[None, :] == image_ids[:, None]).to(logits_per_image.dtype)  # n x T
    counts = positives.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("multi-positive CLIP loss: an image has no caption (text_owner never names it)")
    target = positives / counts[:, None]
    if label_smoothing:
        target = (1 - label_smoothing) * target + label_smoothing / target.shape[1]
    image_to_text = -(target * logits_per_image.log_softmax(dim=1)).sum(1)  # n
    own = text_owner[text_offset:text_offset + n_texts]
    text_to_image = F.cross_entropy(logits_per_text, own, reduction="none", label_smoothing=label_smoothing)
    if weights is not None:
        image_to_text = image_to_text * weights
        text_to_image = text_to_image * weights[own - image_offset]
    return (image_to_text.mean() + text_to_image.mean()) / 2


def clip_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """The CLIP loss of aligned pairs (x_i, y_i); embeddings L2-normalised, logit_scale = t."""
    logits = clip_logits(image_embeds, text_embeds, logit_scale)
    return symmetric_cross_entropy(logits, logits.T, label_smoothing=label_smoothing)


@torch.no_grad()
def retrieval_accuracy(logits: Tensor) -> tuple[Tensor, Tensor]:
    """In-batch top-1 accuracy (image -> text, text -> image) of a square logit matrix (0-d tensors)."""
    target = torch.arange(logits.shape[0], device=logits.device)
    image_to_text = (logits.argmax(dim=1) == target).float().mean()
    text_to_image = (logits.argmax(dim=0) == target).float().mean()
    return image_to_text, text_to_image


class ClipConfig(TermConfig):
    name: str = "clip"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    # rows of the logit matrix at a time: the N x N logits are never held (recomputed in backward);
    # for very large batches in one process (with GradCache). None: the plain loss
    chunk_size: int | None = Field(None, ge=1)


@register_term
class ClipLoss(Term):
    """CLIP's loss on the step's embeddings; several captions per image (``text_owner``) and
    per-sample ``weights`` from the batch make it multi-positive / weighted."""

    name = "clip"
    Config = ClipConfig
    scope = "gathered"  # softmax over the global batch: all-gather keeping the local gradient

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0, chunk_size: int | None = None):
        super().__init__(weight)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"clip label_smoothing must be in [0, 1), got {label_smoothing}")
        if chunk_size is not None and label_smoothing:
            raise ValueError(f"clip: label_smoothing={label_smoothing} with chunk_size={chunk_size}. {CHUNK_HINT}")
        self.label_smoothing = float(label_smoothing)
        self.chunk_size = chunk_size

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        logit_scale = require_output(outputs, "logit_scale", self.name)
        from clipforge.objectives.distributed import active_world_size, distributed_clip_loss

        if batch.get("text_owner") is not None or batch.get("weights") is not None:
            if self.chunk_size is not None:
                raise ValueError(f"clip: this batch has several captions per image or sample weights. {CHUNK_HINT}")
            return self._multi_positive(outputs, batch, logit_scale)
        if active_world_size() > 1:  # softmax over the global batch: gather the other ranks' features
            # (each rank holds only its b x B block: chunk_size is not needed there)
            loss, metrics = distributed_clip_loss(
                outputs["image_embeds"], outputs["text_embeds"], logit_scale, self.label_smoothing
            )
            return loss, {**metrics, "logit_scale": logit_scale.detach()}
        if self.chunk_size is not None:
            loss, accuracy = clip_loss_chunked(outputs["image_embeds"], outputs["text_embeds"], logit_scale,
                                               self.chunk_size)
            return loss, {"i2t_acc": accuracy[0], "t2i_acc": accuracy[1], "logit_scale": logit_scale.detach()}
        logits = clip_logits(outputs["image_embeds"], outputs["text_embeds"], logit_scale)
        loss = symmetric_cross_entropy(logits, logits.T, label_smoothing=self.label_smoothing)
        image_to_text, text_to_image = retrieval_accuracy(logits)
        metrics = {
            "i2t_acc": image_to_text,
            "t2i_acc": text_to_image,
            "logit_scale": logit_scale.detach(),
        }
        return loss, metrics

    def _multi_positive(self, outputs, batch, logit_scale) -> tuple[Tensor, Metrics]:
        from clipforge.objectives.distributed import active_world_size, gather_with_grad, gathered_owner

        images, texts = outputs["image_embeds"], outputs["text_embeds"]
        owner = batch.get("text_owner")
        if owner is None:
            owner = torch.arange(texts.shape[0], device=texts.device)
        image_offset = text_offset = 0
        all_images, all_texts, all_owner = images, texts, owner
        if active_world_size() > 1:
            import torch.distributed as dist

            all_images, all_texts = gather_with_grad(images), gather_with_grad(texts)
            all_owner = gathered_owner(owner, images.shape[0])
            image_offset, text_offset = dist.get_rank() * images.shape[0], dist.get_rank() * texts.shape[0]
        loss = multi_positive_clip_loss(
            clip_logits(images, all_texts, logit_scale), clip_logits(texts, all_images, logit_scale),
            all_owner, image_offset, text_offset, batch.get("weights"), self.label_smoothing,
        )
        return loss, {"logit_scale": logit_scale.detach()}

    def extra_repr(self) -> str:
        chunk = f", chunk_size={self.chunk_size}" if self.chunk_size is not None else ""
        return f"weight={self.weight}, label_smoothing={self.label_smoothing}{chunk}"
