"""LexLIP's objective terms (methods.md section 9a) on the lexical weights of both towers.

- ``lexical``: in-batch contrastive loss on the L2-normalised lexical vectors with a fixed
  temperature (LexLIP: tau = 0.05), i.e. CLIP's symmetric InfoNCE over l_img . l_txt / tau.
  Gathered across ranks like ``clip``; several captions per image work the same way.
- ``flops``: the FLOPs regulariser FLOPs(L) = sum_v ((1/B) sum_i |l_iv|)^2 on the image and the
  text weights, with SPLADE's quadratic warm-up of its weight: lambda_t = min(1, t / T)^2. The
  square of the column mean makes a word that fires for many samples cost much more than one that
  fires for a few, so the common words are pushed to zero first and posting lists stay short.
  The column mean is over the global batch (features gathered), so 2 ranks == 1 process.

Both read ``image_lexical`` / ``text_lexical``: a model built with ``model.lexical_head = true``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from clipforge.models.lexical import sparsity_report
from clipforge.objectives.base import Metrics, Term, TermConfig, register_term, require_output, upcast_low_precision

HINT = "Set model.lexical_head = true (see the lexlip-shapes recipe)."


def flops(weights: Tensor) -> Tensor:
    """FLOPs(L) = sum over the vocabulary of the squared column mean of |L| (L: B×V)."""
    return weights.abs().mean(dim=0).pow(2).sum()


def quadratic_warmup(step: int, warmup_steps: int) -> float:
    """SPLADE's schedule of the FLOPs weight: (t / T)^2 up to step T, then 1 (T = 0: 1 from the start)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps) ** 2


class LexicalConfig(TermConfig):
    name: str = "lexical"
    temperature: float = Field(0.05, gt=0.0)  # LexLIP's tau; fixed, not learned


@register_term
class LexicalContrastive(Term):
    """CLIP's loss on normalised lexical weights with a fixed temperature (gathered like ``clip``)."""

    name = "lexical"
    Config = LexicalConfig
    needs = frozenset({"image_lexical", "text_lexical"})
    scope = "gathered"

    def __init__(self, weight: float = 1.0, temperature: float = 0.05):
        super().__init__(weight)
        self.temperature = float(temperature)

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        from clipforge.objectives.contrastive import ClipLoss

        image = require_output(outputs, "image_lexical", self.name, HINT)
        text = require_output(outputs, "text_lexical", self.name, HINT)
        scale = torch.tensor(1.0 / self.temperature, device=image.device)
        normalised = {"image_embeds": F.normalize(upcast_low_precision(image), dim=-1),
                      "text_embeds": F.normalize(upcast_low_precision(text), dim=-1), "logit_scale": scale}
        loss, metrics = ClipLoss()(normalised, batch)
        metrics.pop("logit_scale", None)
        loss = loss + _dense_anchor(outputs)
        return loss, metrics

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}"


def _dense_anchor(outputs: dict[str, Tensor]) -> Tensor | float:
    """0 x the dense outputs: a lexical-only objective leaves the dense projections and the logit scale
    unused, and DDP must reduce the same parameters every step; a zero gradient keeps them in the graph."""
    keys = ("image_embeds", "text_embeds", "logit_scale", "logit_bias")
    dense = [outputs[k] for k in keys if isinstance(outputs.get(k), Tensor) and outputs[k].requires_grad]
    return 0.0 * sum(x.sum() for x in dense) if dense else 0.0


class FlopsConfig(TermConfig):
    name: str = "flops"
    weight: float = Field(2e-3, ge=0.0, allow_inf_nan=False)  # LexLIP phase 2: 0.002 (at |V| = 30,522)
    warmup_steps: int = Field(0, ge=0)  # quadratic ramp of the weight over the first T optimiser steps


@register_term
class FlopsRegulariser(Term):
    """FLOPs(l_image) + FLOPs(l_text) over the global batch, times the quadratic warm-up factor."""

    name = "flops"
    Config = FlopsConfig
    needs = frozenset({"image_lexical", "text_lexical"})
    scope = "gathered"

    def __init__(self, weight: float = 2e-3, warmup_steps: int = 0):
        super().__init__(weight)
        self.warmup_steps = int(warmup_steps)
        # optimiser steps done: saved with the method state, so a resumed run continues the ramp
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        from clipforge.objectives.distributed import gather_with_grad

        image = upcast_low_precision(require_output(outputs, "image_lexical", self.name, HINT))
        text = upcast_low_precision(require_output(outputs, "text_lexical", self.name, HINT))
        image_flops, text_flops = flops(gather_with_grad(image)), flops(gather_with_grad(text))
        ramp = quadratic_warmup(int(self.steps_done), self.warmup_steps)
        image_nnz, text_nnz = sparsity_report(image)["nnz"], sparsity_report(text)["nnz"]
        metrics = {"image_flops": image_flops.detach(), "text_flops": text_flops.detach(),
                   "ramp": ramp, "image_nnz": image_nnz, "text_nnz": text_nnz}
        return ramp * (image_flops + text_flops), metrics

    def after_optimizer_step(self, step: int) -> None:
        self.steps_done.fill_(step)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, warmup_steps={self.warmup_steps}"
