"""Fini et al.'s non-contrastive image-text variants ("Improved baselines for vision-language pre-training",
TMLR 2023, section 5; methods.md section 12, finding 3): BarLIP, SiamLIP, BYOLIP and SwALIP.

Each is CLIP 🚀 (``clipforge.methods.clip_rocket``: the global pair through the recipe's objective, A image
views x A text views through the view projectors) plus one cross-modal non-contrastive loss, as the
released code builds them (its ``CL2L_*_BARLIP`` / ``_SIAMLIP`` / ``_SWALIP`` models train the CL2L loss
and the new one together):

    L = L_CLIP🚀 + weight * L_nc

over the same pairs: the global (image, caption) pair and every (image view i, text view j).

- ``barlip`` (Barlow Twins across modalities). Heads width -> hidden -> hidden -> out with BN + ReLU, a
  last BN without affine, so each output dimension is standardised over the batch; per pair
  C = V_image^T V_text / B over the gathered batch and
  L_pair = scale * (sum_k (C_kk - 1)^2 + lambda * sum_{k != l} C_kl^2)  (lambda 5e-3, scale 0.025);
  L_nc = mean over the 1 + A^2 pairs.
- ``siamlip`` (SimSiam across modalities). Projector width -> hidden -> out (BN + ReLU, then a BN without
  affine), predictor out -> hidden -> out per direction (image -> text, text -> image); each modality
  predicts the other's stop-gradient projection, D(p, v) = 2 - 2 cos(p, sg(v)); L_nc = mean over the
  2 + 2 A^2 directed pairs.
- ``byolip`` (BYOL across modalities): siamlip whose targets come from the momentum model, an EMA of the
  towers (the recipe's ``[[teachers]] kind = "ema"``; the paper: 0.99, constant) and of the projectors.
- ``swalip`` (SwAV across modalities) has no heads of its own: for every (image view i, text view j) the
  logits of CLIP 🚀's view embeddings h_i H'_j^T over the gathered batch, at the views' logit scale,
  predict the Sinkhorn-Knopp codes (epsilon 0.05, 3 iterations, no gradient) of the swapped pair
  (i + 1, j + 1) mod A, which for the paper's A = 2 is the released code's (1 - i, 1 - j); both
  directions, mean over the A^2 pairs.

Weights: the released YFCC runs train 2 L_CL2L + L_nc (``--loss-avg-or-sum sum`` doubles only the
contrastive part) and SwALIP adds 0.2 L_swav. Adam(W) does not see a global factor of the loss (up to its
epsilon), so that is L_CL2L + 0.5 L_nc (0.1 for SwALIP): the defaults of ``weight``. Heads are method state
(``method.safetensors``); the exported model is the global one, as for CLIP 🚀.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from clipforge.config import Recipe
from clipforge.methods import register_method
from clipforge.methods.clip_rocket import ClipRocketConfig, ClipRocketStep, gather_views
from clipforge.objectives.base import Metrics
from clipforge.objectives.distributed import active_rank, active_world_size, gather_with_grad
from clipforge.objectives.selfsup import byol_loss, mlp
from clipforge.train.step import Outputs
from clipforge.train.teachers import ema_update_


# ----------------------------------------------------------------------------- configs
class NonContrastiveConfig(ClipRocketConfig):
    weight: float = Field(0.5, ge=0.0)  # L_nc's weight next to CLIP 🚀's loss (released YFCC runs: 1 against 2)
    separate_heads: bool = True  # the view pairs get their own heads (the released ViT runs' --separate-proj-child)


class BarlipConfig(NonContrastiveConfig):
    name: str = "barlip"
    head_hidden: int = Field(3000, ge=1)  # released code: width -> 3000 -> 3000 -> 8192
    head_out: int = Field(8192, ge=1)
    redundancy_weight: float = Field(5e-3, ge=0.0)  # lambda on the off-diagonal terms
    loss_scale: float = Field(0.025, gt=0.0)


class SiamlipConfig(NonContrastiveConfig):
    name: str = "siamlip"
    head_hidden: int = Field(2048, ge=1)  # released code: projector width -> 2048 -> 128, predictor 128 -> 2048 -> 128
    head_out: int = Field(128, ge=1)
    last_bn: bool = True  # a BN without affine after the projector (the code's default; --siamlip-no-last-bn drops it)


class ByolipConfig(SiamlipConfig):
    name: str = "byolip"
    teacher: str = "ema"  # the EMA teacher whose towers give the targets

    def check_recipe(self, recipe: Recipe) -> None:
        super().check_recipe(recipe)
        teacher = next((t for t in recipe.teachers if t.name == self.teacher), None)
        if teacher is None or teacher.kind != "ema":
            raise ValueError(f"method 'byolip' takes its targets from a momentum model: add [[teachers]] name = "
                             f"\"{self.teacher}\" kind = \"ema\" momentum = 0.99 momentum_schedule = \"constant\" "
                             "to the recipe (the recipe 'byolip-cifar' has it)")


class SwalipConfig(ClipRocketConfig):
    name: str = "swalip"
    weight: float = Field(0.1, ge=0.0)  # released code: 0.2 next to the doubled CL2L loss
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)  # the released code asserts 0 for SwALIP
    sinkhorn_iterations: int = Field(3, ge=1)
    sinkhorn_epsilon: float = Field(0.05, gt=0.0)

    def check_recipe(self, recipe: Recipe) -> None:
        super().check_recipe(recipe)
        if recipe.data.ssl_views < 2:
            raise ValueError("method 'swalip' predicts each view pair's codes from another pair: set "
                             f"data.ssl_views = data.text_views >= 2 (got {recipe.data.ssl_views})")


# ----------------------------------------------------------------------------- losses
def barlow_twins_loss(a: Tensor, b: Tensor, redundancy_weight: float, scale: float) -> Tensor:
    """scale * (sum_k (C_kk - 1)^2 + lambda * sum_{k != l} C_kl^2) with C = A^T B / N over the gathered
    batch (the rows of ``a`` and ``b`` are already batch-standardised by the heads' last BN)."""
    a, b = gather_with_grad(a.float()), gather_with_grad(b.float())
    c = a.T @ b / a.shape[0]
    diagonal = torch.diagonal(c)
    on = (diagonal - 1).pow(2).sum()
    off = c.pow(2).sum() - diagonal.pow(2).sum()
    return scale * (on + redundancy_weight * off)


@torch.no_grad()
def sinkhorn_codes(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
    """Soft assignments (b x K, rows sum to 1) of this rank's b samples to K prototypes from their
    similarities, by Sinkhorn-Knopp over the global batch: equal mass per prototype, per sample."""
    import torch.distributed as dist

    world = active_world_size()

    def all_reduce(x: Tensor) -> Tensor:
        if world > 1:
            dist.all_reduce(x)
        return x

    q = torch.exp(scores.float() / epsilon).T  # K x b
    prototypes, samples = q.shape[0], q.shape[1] * world
    q /= all_reduce(q.sum())
    for _ in range(iterations):
        q /= all_reduce(q.sum(dim=1, keepdim=True))  # each prototype's mass over every rank's samples ...
        q /= prototypes  # ... made 1 / K
        q /= q.sum(dim=0, keepdim=True)  # each sample's mass made 1 / B
        q /= samples
    return (q * samples).T


def swapped_assignment_loss(image_views: Tensor, text_views: Tensor, logit_scale: Tensor,
                            epsilon: float, iterations: int, gathered: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """SwALIP on b x A x D L2-normalised view embeddings: the pair (i, j)'s scaled logits against the
    gathered other modality predict the Sinkhorn codes of the pair ((i + 1) mod A, (j + 1) mod A).
    ``gathered``: every rank's view embeddings (``gather_views``; gathered here when not given)."""
    all_images, all_texts = gathered if gathered is not None else gather_views(image_views, text_views)
    views = image_views.shape[1]
    image_logits = [[image_views[:, i] @ all_texts[:, j].T for j in range(views)] for i in range(views)]
    text_logits = [[text_views[:, i] @ all_images[:, j].T for j in range(views)] for i in range(views)]
    image_codes = [[sinkhorn_codes(x.detach(), epsilon, iterations) for x in row] for row in image_logits]
    text_codes = [[sinkhorn_codes(x.detach(), epsilon, iterations) for x in row] for row in text_logits]

    def soft_cross_entropy(logits: Tensor, codes: Tensor) -> Tensor:
        return -(codes * F.log_softmax(logits.float() * logit_scale, dim=1)).sum(dim=1).mean()

    total = 0.0
    for i in range(views):
        for j in range(views):
            si, sj = (i + 1) % views, (j + 1) % views
            total = total + (soft_cross_entropy(image_logits[i][j], image_codes[si][sj])
                             + soft_cross_entropy(text_logits[i][j], text_codes[si][sj])) / 2
    return total / views**2


def redundancy_floor(cfg: BarlipConfig, batch: int) -> float:
    """The least off-diagonal part of the Barlow Twins loss once every C_kk = 1: C = A^T B / N has rank <= N,
    so ||C||_F^2 >= (tr C)^2 / N = D^2 / N and the off-diagonal squares sum to at least D (D / N - 1)."""
    d = cfg.head_out
    return cfg.loss_scale * cfg.redundancy_weight * d * max(d / batch - 1, 0.0)


def warn_if_heads_outgrow_the_batch(cfg: BarlipConfig, batch: int) -> None:
    """Heads much wider than the global batch make the redundancy term fight the alignment (its floor grows
    as D^2 / N): the paper's 8,192 over a batch of 4,096 is D = 2N (docs/methods/noncontrastive-lip.md)."""
    if cfg.head_out > 2 * batch:
        warnings.warn(f"method.head_out = {cfg.head_out} is more than twice the global batch ({batch}): the "
                      f"cross-correlation has rank <= {batch}, so the redundancy term cannot fall below "
                      f"{redundancy_floor(cfg, batch):.2f} once image and text align, and BarLIP trains poorly "
                      f"(docs/methods/noncontrastive-lip.md). The paper uses 8,192 for 4,096: set "
                      f"method.head_out to about {2 * batch}", stacklevel=2)


# ----------------------------------------------------------------------------- steps
def pair_positions(views: int) -> list[tuple[int, int]]:
    """The (image, text) pairs the non-contrastive losses run over, as positions in ``projections``' lists:
    the global pair (0, 0), then every (image view i, text view j)."""
    return [(0, 0)] + [(1 + i, 1 + j) for i in range(views) for j in range(views)]


class _HeadsStep(ClipRocketStep):
    """CLIP 🚀 plus heads on the pooled features of the global pair and of every view (BarLIP, SiamLIP)."""

    hook_only_clamps = True

    def __init__(self, recipe: Recipe, model: nn.Module, objective, teachers: dict[str, nn.Module]):
        super().__init__(recipe, model, objective, teachers)
        self.needs = self.needs | {"image_pooled", "text_pooled"}
        widths = {"image": recipe.model.vision_pooled_width, "text": getattr(model.text, "width", recipe.model.text_width)}
        self.heads = nn.ModuleDict({m: self.make_head(w) for m, w in widths.items()})
        if self.cfg.separate_heads:
            self.view_heads = nn.ModuleDict({m: self.make_head(w) for m, w in widths.items()})

    def make_head(self, width: int) -> nn.Module:
        raise NotImplementedError

    def head_sets(self) -> tuple[nn.ModuleDict, nn.ModuleDict]:
        """The heads of the global pair and those of the view pairs (the same ones unless separate_heads)."""
        return self.heads, (self.view_heads if self.cfg.separate_heads else self.heads)

    def projections(self, pooled: dict[str, Tensor], view_pooled: dict[str, Tensor],
                    heads: tuple[nn.ModuleDict, nn.ModuleDict]) -> dict[str, list[Tensor]]:
        """{modality: [global N x D, view 0 N x D, ...]}: each view through its head on its own (BatchNorm
        statistics per view, as the released code's list of views)."""
        global_heads, view_heads = heads
        return {m: [global_heads[m](pooled[m])] + [view_heads[m](view_pooled[m][:, i])
                                                   for i in range(view_pooled[m].shape[1])]
                for m in ("image", "text")}

    def encode(self, batch: dict[str, Any]) -> Outputs:
        outputs = super().encode(batch)
        if "view_pooled" not in outputs:  # eval mode: the plain model
            return outputs
        image_views, text_views = outputs["view_pooled"]
        pooled = {"image": outputs["image_pooled"], "text": outputs["text_pooled"]}
        outputs["heads"] = self.projections(pooled, {"image": image_views, "text": text_views}, self.head_sets())
        return outputs

    def pair_loss(self, outputs: Outputs, image: int, text: int) -> Tensor:
        """The term on one (image, text) pair, given as positions in ``projections``' lists."""
        raise NotImplementedError

    def noncontrastive_loss(self, outputs: Outputs) -> Tensor:
        losses = [self.pair_loss(outputs, i, j) for i, j in pair_positions(self.views)]
        return sum(losses) / len(losses)

    def compute_loss(self, outputs: Outputs, batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        total, metrics = super().compute_loss(outputs, batch)
        if "heads" not in outputs:
            return total, metrics
        nc = self.noncontrastive_loss(outputs)
        total = total + self.cfg.weight * nc
        return total, {**metrics, f"{self.name}/loss": nc.detach(), "loss": total.detach()}


@register_method
class BarlipStep(_HeadsStep):
    name = "barlip"
    Config = BarlipConfig

    def __init__(self, recipe: Recipe, model: nn.Module, objective, teachers: dict[str, nn.Module]):
        super().__init__(recipe, model, objective, teachers)
        if active_rank() == 0:  # once per run, not once per rank
            warn_if_heads_outgrow_the_batch(self.cfg, recipe.data.batch_size * active_world_size())

    def make_head(self, width: int) -> nn.Module:
        return mlp([width, self.cfg.head_hidden, self.cfg.head_hidden, self.cfg.head_out], last_bn=True)

    def pair_loss(self, outputs: Outputs, image: int, text: int) -> Tensor:
        v = outputs["heads"]
        return barlow_twins_loss(v["image"][image], v["text"][text], self.cfg.redundancy_weight, self.cfg.loss_scale)


@register_method
class SiamlipStep(_HeadsStep):
    name = "siamlip"
    Config = SiamlipConfig

    def __init__(self, recipe: Recipe, model: nn.Module, objective, teachers: dict[str, nn.Module]):
        super().__init__(recipe, model, objective, teachers)
        cfg: SiamlipConfig = self.cfg
        predictor = [cfg.head_out, cfg.head_hidden, cfg.head_out]  # "image" predicts text, "text" predicts image
        self.predictors = nn.ModuleDict({m: mlp(predictor) for m in ("image", "text")})
        if cfg.separate_heads:
            self.view_predictors = nn.ModuleDict({m: mlp(predictor) for m in ("image", "text")})

    def make_head(self, width: int) -> nn.Module:
        return mlp([width, self.cfg.head_hidden, self.cfg.head_out], last_bn=self.cfg.last_bn)

    def targets(self, batch: dict[str, Any], outputs: Outputs) -> dict:
        """What each modality's prediction is pulled towards: the online projections (stop-gradient)."""
        return outputs["heads"]

    def encode(self, batch: dict[str, Any]) -> Outputs:
        outputs = super().encode(batch)
        if "heads" not in outputs:
            return outputs
        v = outputs["heads"]
        predictions = {}
        view_predictors = self.view_predictors if self.cfg.separate_heads else self.predictors
        for m in ("image", "text"):
            predictions[m] = [self.predictors[m](v[m][0])] + [view_predictors[m](x) for x in v[m][1:]]
        outputs["predictions"] = predictions
        outputs["targets"] = self.targets(batch, outputs)
        return outputs

    def pair_loss(self, outputs: Outputs, image: int, text: int) -> Tensor:
        p, v = outputs["predictions"], outputs["targets"]  # each side predicts the other's target
        return (byol_loss(p["image"][image], v["text"][text]) + byol_loss(p["text"][text], v["image"][image])) / 2


@register_method
class ByolipStep(SiamlipStep):
    name = "byolip"
    Config = ByolipConfig
    hook_only_clamps = False  # moves the momentum projectors

    def __init__(self, recipe: Recipe, model: nn.Module, objective, teachers: dict[str, nn.Module]):
        super().__init__(recipe, model, objective, teachers)
        # the momentum model's projectors start as copies and follow the EMA teacher's momentum
        self.ema_heads = copy.deepcopy(self.heads).requires_grad_(False)
        if self.cfg.separate_heads:
            self.ema_view_heads = copy.deepcopy(self.view_heads).requires_grad_(False)

    @property
    def ema(self) -> nn.Module:
        return self.teachers[self.cfg.teacher]

    @torch.no_grad()
    def targets(self, batch: dict[str, Any], outputs: Outputs) -> dict:
        teacher = self.ema.module  # eval mode: every patch; the towers have no BatchNorm
        n, a = batch["views"].shape[:2]
        pooled = {"image": teacher.visual(teacher.normalize_images(batch["images"]))["pooled"],
                  "text": teacher.text(batch["input_ids"], batch["attention_mask"])["pooled"]}
        view_pooled = {
            "image": teacher.visual(teacher.normalize_images(batch["views"].flatten(0, 1)))["pooled"].view(n, a, -1),
            "text": teacher.text(batch["text_view_input_ids"], batch["text_view_attention_mask"])["pooled"].view(
                n, a, -1)}
        heads = (self.ema_heads, self.ema_view_heads if self.cfg.separate_heads else self.ema_heads)
        for h in heads:
            h.train(self.training)  # BYOL's target network normalises with batch statistics
        return self.projections(pooled, view_pooled, heads)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)  # clamps both scales, moves the EMA teacher's towers
        momentum = self.ema.momentum_at(step, self.total_steps)
        ema_update_(self.ema_heads, self.heads, momentum)
        if self.cfg.separate_heads:
            ema_update_(self.ema_view_heads, self.view_heads, momentum)


@register_method
class SwalipStep(ClipRocketStep):
    name = "swalip"
    Config = SwalipConfig

    def compute_loss(self, outputs: Outputs, batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        total, metrics = super().compute_loss(outputs, batch)
        if "view_embeds" not in outputs:
            return total, metrics
        swav = swapped_assignment_loss(*outputs["view_embeds"], outputs["view_logit_scale"],
                                       self.cfg.sinkhorn_epsilon, self.cfg.sinkhorn_iterations,
                                       gathered=self.gathered_view_embeds(outputs))
        total = total + self.cfg.weight * swav
        return total, {**metrics, "swalip/loss": swav.detach(), "loss": total.detach()}
