"""CLIP: symmetric InfoNCE over in-batch image-text pairs (Radford et al. 2021).

logits L = t * X @ Y^T (t = exp(t'), already exponentiated and clamped by the model);
loss = (CE(L, arange) + CE(L^T, arange)) / 2. Label smoothing eps uses the target
(1 - eps) * onehot + eps / B, which is exactly ``F.cross_entropy(..., label_smoothing=eps)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clipforge.objectives.base import Metrics, Term, register_term, require_output, upcast_low_precision


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


def clip_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """The CLIP loss of aligned pairs (x_i, y_i); embeddings L2-normalised, logit_scale = t."""
    logits = clip_logits(image_embeds, text_embeds, logit_scale)
    return symmetric_cross_entropy(logits, logits.T, label_smoothing=label_smoothing)


@torch.no_grad()
def retrieval_accuracy(logits: Tensor) -> tuple[float, float]:
    """In-batch top-1 accuracy (image -> text, text -> image) of a square logit matrix."""
    target = torch.arange(logits.shape[0], device=logits.device)
    image_to_text = (logits.argmax(dim=1) == target).float().mean()
    text_to_image = (logits.argmax(dim=0) == target).float().mean()
    return float(image_to_text), float(text_to_image)


@register_term
class ClipLoss(Term):
    name = "clip"
    features = "gathered"  # softmax over the global batch: all-gather keeping the local gradient

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0):
        super().__init__(weight)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"clip label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        logit_scale = require_output(outputs, "logit_scale", self.name)
        from clipforge.objectives.distributed import active_world_size, distributed_clip_loss

        if active_world_size() > 1:  # softmax over the global batch: gather the other ranks' features
            loss, metrics = distributed_clip_loss(
                outputs["image_embeds"], outputs["text_embeds"], logit_scale, self.label_smoothing
            )
            return loss, {**metrics, "logit_scale": float(logit_scale.detach())}
        logits = clip_logits(outputs["image_embeds"], outputs["text_embeds"], logit_scale)
        loss = symmetric_cross_entropy(logits, logits.T, label_smoothing=self.label_smoothing)
        image_to_text, text_to_image = retrieval_accuracy(logits)
        metrics = {
            "i2t_acc": image_to_text,
            "t2i_acc": text_to_image,
            "logit_scale": float(logit_scale.detach()),
        }
        return loss, metrics

    def extra_repr(self) -> str:
        return f"weight={self.weight}, label_smoothing={self.label_smoothing}"
