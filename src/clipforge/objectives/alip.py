"""ALIP's adaptive contrastive loss with its two gates (Yang et al., ICCV 2023; methods.md section 13a).

Each image i has a raw caption T_i and a synthetic caption C_i (``data.shapes.captions = "raw+synthetic"``,
or a caption list [raw, synthetic]: rows sample-major with ``caption_kind`` 0 = raw, 1 = synthetic).
With x, t, c the normalised embeddings (one text encoder for both),

    LCG (per sample):  s_i = cos(t_i, c_i),   w^s_i = min(exp(s_i - mu_TC)^2, 1)
    DCG (per pair):    w^T_i = exp(cos(x_i, t_i) - mu_IT)^2,   w^C_i = exp(cos(x_i, c_i) - mu_IC)^2,
                       applied only where w^s_i < 1 (raw and synthetic disagree), else 1
    L = mean_i w^s_i w^T_i ½(CE_i2t + CE_t2i)(x, t)_i + mean_i w^s_i w^C_i ½(CE_i2t + CE_t2i)(x, c)_i

CE_i2t(i) is image i's InfoNCE over the batch's raw (resp. synthetic) captions, CE_t2i(i) caption i's
over the images. The weights are computed without gradient. Each mu is an EMA of the batch mean of its
cosine (mu <- 0.99 mu + 0.01 mean, mu_0 = 1), over the whole (gathered) batch. The weights of a step use
the mus as they were before it; the mus move once per optimiser step (``after_optimizer_step``, the mean
of the step's micro-batch means), identically on every rank; they are buffers, so they are checkpointed
and a resumed run continues with them exactly.

Distributed (``scope = "gathered"``): images and both caption sets are all-gathered with gradient; each
rank computes its own rows' per-sample losses (mean over ranks = the global loss).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from clipforge.objectives.base import Metrics, Term, TermConfig, register_term, require_output, upcast_low_precision

RAW, SYNTHETIC = 0, 1  # clipforge.data.captions caption kinds
NOISE_NAMES = ("clean", "other_image", "dropped", "altered")  # clipforge.data.captions.NOISE_KINDS


def per_sample_clip(images: Tensor, texts: Tensor, all_images: Tensor, all_texts: Tensor, scale: Tensor,
                    offset: int = 0) -> Tensor:
    """½(CE image i -> all texts + CE text i -> all images) for each local pair i -> (b,)."""
    labels = torch.arange(images.shape[0], device=images.device) + offset
    i2t = F.cross_entropy(upcast_low_precision((scale * images) @ all_texts.T), labels, reduction="none")
    t2i = F.cross_entropy(upcast_low_precision((scale * texts) @ all_images.T), labels, reduction="none")
    return (i2t + t2i) / 2


@torch.no_grad()
def alip_gates(images: Tensor, raw: Tensor, synthetic: Tensor, mu_tc: float, mu_it: float,
               mu_ic: float) -> tuple[Tensor, Tensor, Tensor]:
    """(w^s, w^T, w^C) per sample from the normalised embeddings and the running means."""
    images, raw, synthetic = map(upcast_low_precision, (images, raw, synthetic))
    s = (raw * synthetic).sum(-1)
    w_s = torch.exp(2 * (s - mu_tc)).clamp(max=1.0)
    disagree = w_s < 1
    w_t = torch.where(disagree, torch.exp(2 * ((images * raw).sum(-1) - mu_it)), torch.ones_like(s))
    w_c = torch.where(disagree, torch.exp(2 * ((images * synthetic).sum(-1) - mu_ic)), torch.ones_like(s))
    return w_s, w_t, w_c


class AlipConfig(TermConfig):
    name: str = "alip"
    momentum: float = Field(0.99, ge=0.0, lt=1.0)  # the running means' EMA factor
    # false: every weight 1, i.e. plain CLIP on (image, raw) + (image, synthetic) -- the ablation that
    # separates the extra caption from the gating (the means still move and are logged)
    gates: bool = True


@register_term
class AlipLoss(Term):
    """Adaptive contrastive loss over (image, raw caption) and (image, synthetic caption) with ALIP's gates."""

    name = "alip"
    Config = AlipConfig
    scope = "gathered"

    def __init__(self, weight: float = 1.0, momentum: float = 0.99, gates: bool = True):
        super().__init__(weight)
        self.gates = bool(gates)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"alip momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        # mu_TC, mu_IT, mu_IC, initialised to 1 (the paper's code)
        self.register_buffer("running_means", torch.ones(3, dtype=torch.float64))
        self._pending: list[Tensor] = []  # this optimiser step's batch means, applied after it

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        from clipforge.objectives.distributed import active_world_size, gather_no_grad, gather_with_grad

        scale = require_output(outputs, "logit_scale", self.name)
        kinds = batch.get("caption_kind")
        if kinds is None or batch.get("text_owner") is None:
            raise ValueError("objective term 'alip' needs a raw and a synthetic caption per image: set "
                             "data.shapes.captions = \"raw+synthetic\" (or give caption_kind 0 / 1 rows)")
        images, texts = outputs["image_embeds"], outputs["text_embeds"]
        raw, synthetic = texts[kinds == RAW], texts[kinds == SYNTHETIC]
        if raw.shape[0] != images.shape[0] or synthetic.shape[0] != images.shape[0]:
            raise ValueError(f"objective term 'alip' needs exactly one raw and one synthetic caption per image; "
                             f"got {raw.shape[0]} raw and {synthetic.shape[0]} synthetic for {images.shape[0]} images")
        all_images, all_raw, all_syn = images, raw, synthetic
        offset = 0
        if active_world_size() > 1:
            import torch.distributed as dist

            all_images, all_raw, all_syn = gather_with_grad(images), gather_with_grad(raw), gather_with_grad(synthetic)
            offset = dist.get_rank() * images.shape[0]
        mu_tc, mu_it, mu_ic = self.running_means.tolist()
        w_s, w_t, w_c = alip_gates(images.detach(), raw.detach(), synthetic.detach(), mu_tc, mu_it, mu_ic)
        if not self.gates:
            w_s, w_t, w_c = torch.ones_like(w_s), torch.ones_like(w_t), torch.ones_like(w_c)
        loss_raw = per_sample_clip(images, raw, all_images, all_raw, scale, offset)
        loss_syn = per_sample_clip(images, synthetic, all_images, all_syn, scale, offset)
        loss = (w_s * w_t * loss_raw).mean() + (w_s * w_c * loss_syn).mean()
        with torch.no_grad():  # batch means of the three cosines over the whole (gathered) batch
            cosines = torch.stack([(all_raw * all_syn).sum(-1), (all_images * all_raw).sum(-1),
                                   (all_images * all_syn).sum(-1)]).double().mean(1)
            if self.training:
                self._pending.append(cosines)
        metrics: Metrics = {"logit_scale": scale.detach(), "mu_tc": mu_tc, "mu_it": mu_it, "mu_ic": mu_ic}
        metrics.update(self._weights_by_noise(w_s * w_t, w_s * w_c, batch.get("noise"), gather_no_grad))
        return loss, metrics

    @staticmethod
    def _weights_by_noise(raw_weight: Tensor, syn_weight: Tensor, noise: Tensor | None, gather) -> Metrics:
        """Mean raw-pair and synthetic-pair weight per noise kind of the raw caption (whole batch)."""
        if noise is None:
            return {"raw_weight": float(raw_weight.mean()), "synthetic_weight": float(syn_weight.mean())}
        raw_weight, syn_weight, noise = gather(raw_weight), gather(syn_weight), gather(noise)
        out: Metrics = {}
        for kind, name in enumerate(NOISE_NAMES):
            rows = noise == kind
            if rows.any():
                out[f"raw_weight/{name}"] = float(raw_weight[rows].mean())
                out[f"synthetic_weight/{name}"] = float(syn_weight[rows].mean())
        return out

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        if not self._pending:
            return
        mean = torch.stack(self._pending).mean(0).to(self.running_means.device)
        self.running_means.mul_(self.momentum).add_((1 - self.momentum) * mean)
        self._pending = []

    def discard_step(self) -> None:
        self._pending = []  # a skipped step's batch means never reach the running means

    def extra_repr(self) -> str:
        return f"weight={self.weight}, momentum={self.momentum}, gates={self.gates}"
