"""CLIP 🚀: Fini et al.'s improved CLIP baseline ("Improved baselines for vision-language pre-training",
TMLR 2023; the released code calls it CL2L; methods.md section 12).

Per step, besides the recipe's objective on the global pair (the image with CLIP's weak crop and its
caption, through the model's own projections: plain CLIP by default), A augmented image views and A
augmented captions of each sample (``data.ssl_views = data.text_views = A``) go through the same towers
and through *separate* projectors (``projector = "mlp"``: 3-layer MLP with BN, ``projector_hidden``
wide) with their own logit scale s (init 1 / 0.1, clamped like t). Every (image view, text view) pair
is a CLIP problem with label smoothing eps:

    L_local  = 1/A^2 sum_{i,j} (CE_eps(s h_i H'_j^T) + CE_eps(s h'_j H_i^T)) / 2
    L        = (L_objective + A * L_local) / (1 + A)

(h_i: image view i, h'_j: text view j, both L2-normalised; capitals: gathered over ranks.) This is the
released code's per-direction (global + A * local) / (1 + A), averaged over the two directions.
Each view goes through the MLP projectors on its own (``view_batchnorm = "per_view"``: BatchNorm statistics
per view, as the released code); ``"joint"`` normalises all A views in one call. ``projector =
"linear"`` gives separate linear projectors; ``"shared"`` sends the views through the
model's own projections and logit scale (the code's ``separate_proj = False``). ``text_view_dropout`` is
the text tower's "local mode": dropout on the residual stream entering every block, for the text views
only (the code's ``--text-dropout-prob``: 0 on YFCC15M, 0.2 on CC3M). The projectors are
training state (``method.safetensors``): the exported model is the global one, which the paper
evaluates (its ``acc1_z``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from clipforge.config import MethodConfig, Recipe
from clipforge.methods import register_method
from clipforge.objectives.base import Metrics
from clipforge.objectives.contrastive import clip_logits, symmetric_cross_entropy
from clipforge.objectives.distributed import active_world_size, gather_with_grad
from clipforge.objectives.selfsup import mlp
from clipforge.train.step import Outputs, TrainStep


class ClipRocketConfig(MethodConfig):
    name: str = "clip_rocket"
    projector: Literal["mlp", "linear", "shared"] = "mlp"  # the views' projectors (paper: separate MLPs)
    projector_hidden: int = Field(4096, ge=1)  # paper: width -> 4096 -> 4096 -> embed_dim, BN + ReLU between
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)  # on the views' pairs only (paper: 0.1)
    local_temperature: float = Field(0.1, gt=0.0)  # the views' logit scale starts at 1 / this (paper: 0.1)
    # the text tower's "local mode": dropout on the residual stream of the text views only (paper: 0 on
    # YFCC15M, 0.2 on CC3M, 0.05-0.1 on CC12M)
    text_view_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # the MLP projectors' BatchNorm statistics: per view (the released code projects each view on its own)
    # or over all A views of the batch in one call (clipforge before 2026-11-27; its CIFAR figures)
    view_batchnorm: Literal["per_view", "joint"] = "per_view"

    def check_recipe(self, recipe: Recipe) -> None:
        d = recipe.data
        if d.ssl_views < 1 or d.text_views != d.ssl_views:
            raise ValueError(
                f"method '{self.name}' pairs A augmented image views with A augmented captions of each sample: set "
                f"data.ssl_views = data.text_views = A >= 1 (got ssl_views = {d.ssl_views}, text_views = "
                f"{d.text_views}); the paper and the recipe 'clip-rocket-cifar' use 2")
        if self.text_view_dropout > 0 and recipe.model.text_tower != "clip":
            raise ValueError(f"method.text_view_dropout = {self.text_view_dropout} needs clipforge's own text tower "
                             "(model.text_tower = 'clip'); a pretrained Hugging Face tower keeps its own dropout "
                             "settings: set method.text_view_dropout = 0")
        if recipe.train.accum_mode == "gradcache":
            raise ValueError(f"method '{self.name}' adds view branches with BatchNorm projectors; train.accum_mode = "
                             "'gradcache' cannot replay them: use 'plain'")


def gather_views(image_views: Tensor, text_views: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's view embeddings (W*b x A x D each, rank order; the local tensors in one process)."""
    return gather_with_grad(image_views), gather_with_grad(text_views)


def local_clip_loss(image_views: Tensor, text_views: Tensor, logit_scale: Tensor, label_smoothing: float,
                    gathered: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Mean over every (image view i, text view j) of the symmetric InfoNCE with label smoothing.
    ``image_views`` / ``text_views``: this rank's b x A x D, L2-normalised; ``gathered``: the same of every
    rank (``gather_views``; gathered here when not given)."""
    b, views = image_views.shape[:2]
    all_images, all_texts = gathered if gathered is not None else gather_views(image_views, text_views)
    rank = torch.distributed.get_rank() if active_world_size() > 1 else 0
    labels = torch.arange(b, device=image_views.device) + rank * b
    total = 0.0
    for i in range(views):
        for j in range(views):
            total = total + symmetric_cross_entropy(clip_logits(image_views[:, i], all_texts[:, j], logit_scale),
                                                    clip_logits(text_views[:, j], all_images[:, i], logit_scale),
                                                    labels, label_smoothing)
    return total / views**2


@register_method
class ClipRocketStep(TrainStep):
    name = "clip_rocket"
    Config = ClipRocketConfig
    supports_gradcache = False
    hook_only_clamps = True  # after_optimizer_step clamps a second logit scale, nothing else

    def __init__(self, recipe: Recipe, model: nn.Module, objective, teachers: dict[str, nn.Module]):
        super().__init__(recipe, model, objective, teachers)
        cfg: ClipRocketConfig = recipe.method
        self.cfg = cfg
        self.views = recipe.data.ssl_views
        self.max_log_scale = math.log(recipe.model.logit_scale_max)
        if cfg.projector != "shared":
            vision, out = recipe.model.vision_pooled_width, recipe.model.embed_dim
            text = getattr(model.text, "width", recipe.model.text_width)  # a pretrained (hf) tower has its own
            if cfg.projector == "mlp":
                self.image_view_projector = mlp([vision, cfg.projector_hidden, cfg.projector_hidden, out])
                self.text_view_projector = mlp([text, cfg.projector_hidden, cfg.projector_hidden, out])
            else:
                self.image_view_projector = nn.Linear(vision, out, bias=False)
                self.text_view_projector = nn.Linear(text, out, bias=False)
            self.local_logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.local_temperature)))

    def encode(self, batch: dict[str, Any]) -> Outputs:
        outputs = super().encode(batch)  # the global pair: the objective's pass, as the plain step
        if not self.training:
            return outputs
        views, ids, mask = batch.get("views"), batch.get("text_view_input_ids"), batch.get("text_view_attention_mask")
        a = self.views
        if (views is None or views.dim() != 5 or views.shape[1] != a
                or ids is None or ids.shape[0] != views.shape[0] * a):
            raise ValueError(f"method '{self.name}' needs batch['views'] (N x {a} x 3 x H x W) and "
                             f"batch['text_view_input_ids'] ({a}*N rows): set data.ssl_views = data.text_views = {a}")
        n = views.shape[0]
        # every view of the batch in one pass per tower (FLIP-style patch dropout applies, as to images)
        image_pooled = self.model.visual(self.model.normalize_images(views.flatten(0, 1)))["pooled"]
        local_mode = {"dropout": self.cfg.text_view_dropout} if self.cfg.text_view_dropout > 0 else {}
        text_pooled = self.model.text(ids, mask, **local_mode)["pooled"]
        if self.cfg.projector == "shared":
            image_z, text_z = self.model.image_projection(image_pooled), self.model.text_projection(text_pooled)
            scale = outputs["logit_scale"]
        else:
            image_z = self.project_views(self.image_view_projector, image_pooled, n)
            text_z = self.project_views(self.text_view_projector, text_pooled, n)
            scale = self.local_logit_scale.exp()
        outputs["view_embeds"] = (F.normalize(image_z, dim=-1).view(n, a, -1),
                                  F.normalize(text_z, dim=-1).view(n, a, -1))
        outputs["view_logit_scale"] = scale
        outputs["view_pooled"] = (image_pooled.view(n, a, -1), text_pooled.view(n, a, -1))  # the heads of subclasses
        return outputs

    def project_views(self, projector: nn.Module, pooled: Tensor, n: int) -> Tensor:
        """(n*A) x W sample-major -> (n*A) x D. ``per_view``: each view through the projector on its own,
        so its BatchNorm normalises over the n samples of one view (the released code's list of views)."""
        if self.cfg.view_batchnorm == "joint" or self.cfg.projector == "linear":  # linear: the same either way
            return projector(pooled)
        return torch.stack([projector(v) for v in pooled.view(n, self.views, -1).unbind(1)], dim=1).flatten(0, 1)

    @staticmethod
    def gathered_view_embeds(outputs: Outputs) -> tuple[Tensor, Tensor]:
        """The view embeddings of every rank, gathered once a step (SwALIP's codes read them too)."""
        if "view_embeds_gathered" not in outputs:
            outputs["view_embeds_gathered"] = gather_views(*outputs["view_embeds"])
        return outputs["view_embeds_gathered"]

    def compute_loss(self, outputs: Outputs, batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        loss, metrics = self.objective(outputs, batch)
        if "view_embeds" not in outputs:
            return loss, metrics
        local = local_clip_loss(*outputs["view_embeds"], outputs["view_logit_scale"], self.cfg.label_smoothing,
                                gathered=self.gathered_view_embeds(outputs))
        total = (loss + self.views * local) / (1 + self.views)
        metrics = {**metrics, "global/loss": loss.detach(), "views/loss": local.detach(),
                   "views/logit_scale": outputs["view_logit_scale"].detach(), "loss": total.detach()}
        return total, metrics

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        if self.cfg.projector != "shared":  # clamped to [0, ln max] like the model's (the released code)
            self.local_logit_scale.clamp_(0.0, self.max_log_scale)
