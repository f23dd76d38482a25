"""A-CLIP: Attentive Mask CLIP (Yang et al., ICCV 2023; methods.md section 3b).

Per step and sample:

1. Two random-resized crops v1, v2 of the image, and v_e = the smallest box holding both (the
   released code's ``GetThreeRandomResizedCrop``). All three are cut on the device from the batch
   images with the torch RNG, so they resume exactly.
2. The EMA teacher (recipe ``[[teachers]] kind = "ema"``) encodes v_e without masking and without
   gradient; the keep score of a patch is the class token's attention to it, averaged over heads and
   layers. The score map is resampled into each view's box.
3. Each view keeps the patches of its top-scored blocks (``model.token_selection = "attentive"``;
   ``"random"`` gives FLIP's random masking for the ablation) and the online model sees only those.
4. Losses: the recipe's objective (CLIP by default; any terms compose) on each masked view with
   the captions, averaged over the two views; SimCLR NT-Xent between the two masked views (tau 0.1,
   2B - 2 negatives, gathered across ranks); BYOL from each masked view to the EMA's v_e (2 - 2 cos).
   Total = L_objective + simclr_weight * L_simclr + byol_weight * L_byol (paper: 1 and 2).
5. After each optimiser step the EMA teacher and the EMA BYOL projector move towards the online
   weights with the teacher's momentum schedule (cosine from 0.996 to 1).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from clipforge.config import MethodConfig, Recipe
from clipforge.methods import register_method
from clipforge.objectives.base import Metrics
from clipforge.objectives.selfsup import byol_loss, mlp, simclr_loss
from clipforge.train.step import Outputs, TrainStep, attention_keep_scores, attentive_keep_indices
from clipforge.train.teachers import ema_update_


class AclipConfig(MethodConfig):
    name: str = "aclip"
    teacher: str = "ema"  # the ema teacher that scores patches and is BYOL's target
    crop_scale: tuple[float, float] = (0.5, 1.0)  # area of each view as a fraction of the image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    simclr_weight: float = Field(1.0, ge=0.0)
    byol_weight: float = Field(2.0, ge=0.0)
    simclr_temperature: float = Field(0.1, gt=0.0)
    simclr_hidden: int = Field(4096, ge=1)  # paper: 768 -> 4096 -> 4096 -> 256, BN + ReLU
    simclr_out: int = Field(256, ge=1)
    byol_hidden: int = Field(4096, ge=1)  # projector and predictor: 2 layers, 4096 hidden, 256 out
    byol_out: int = Field(256, ge=1)

    def check_recipe(self, recipe: Recipe) -> None:
        teacher = next((t for t in recipe.teachers if t.name == self.teacher), None)
        if teacher is None or teacher.kind != "ema":
            raise ValueError(f"method 'aclip' scores patches with an EMA teacher named '{self.teacher}': add "
                             f"[[teachers]] name = \"{self.teacher}\" kind = \"ema\" to the recipe")
        if recipe.model.vision_pool != "cls":
            raise ValueError("method 'aclip' needs the class token's attention: set model.vision_pool = 'cls'")
        if recipe.train.accum_mode == "gradcache":
            raise ValueError("method 'aclip' runs two masked views, SimCLR and BYOL heads in one step; "
                             "train.accum_mode = 'gradcache' cannot replay that: use 'plain'")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"method.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")


# ----------------------------------------------------------------------------- views
def random_boxes(n: int, scale: tuple[float, float], ratio: tuple[float, float], device) -> Tensor:
    """Random-resized-crop boxes N x 4 (x0, y0, w, h) in [0, 1] image coordinates."""
    area = torch.empty(n, device=device).uniform_(*scale)
    log_ratio = torch.empty(n, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)
    h = (area / aspect).sqrt().clamp(max=1.0)
    x0 = torch.rand(n, device=device) * (1 - w)
    y0 = torch.rand(n, device=device) * (1 - h)
    return torch.stack([x0, y0, w, h], dim=1)


def union_boxes(a: Tensor, b: Tensor) -> Tensor:
    """The smallest box holding both (A-CLIP's v_e)."""
    x0 = torch.minimum(a[:, 0], b[:, 0])
    y0 = torch.minimum(a[:, 1], b[:, 1])
    x1 = torch.maximum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2])
    y1 = torch.maximum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3])
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1)


def relative_boxes(inner: Tensor, outer: Tensor) -> Tensor:
    """``inner`` boxes in the coordinates of ``outer`` boxes (both N x 4)."""
    return torch.stack([(inner[:, 0] - outer[:, 0]) / outer[:, 2], (inner[:, 1] - outer[:, 1]) / outer[:, 3],
                        inner[:, 2] / outer[:, 2], inner[:, 3] / outer[:, 3]], dim=1)


def crop_resize(x: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Cut each box out of N x C x H x W (float) and resize it to size x size (bilinear)."""
    x0, y0, w, h = boxes.unbind(1)
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = w, 2 * x0 + w - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * y0 + h - 1
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------- the step
@register_method
class AclipStep(TrainStep):
    name = "aclip"
    Config = AclipConfig
    supports_gradcache = False

    def __init__(self, recipe: Recipe, model: nn.Module, objective, teachers: dict[str, nn.Module]):
        super().__init__(recipe, model, objective, teachers)
        cfg: AclipConfig = recipe.method
        self.cfg = cfg
        width = recipe.model.vision_pooled_width
        self.simclr_head = mlp([width, cfg.simclr_hidden, cfg.simclr_hidden, cfg.simclr_out])
        self.byol_projector = mlp([width, cfg.byol_hidden, cfg.byol_out])
        self.byol_predictor = mlp([cfg.byol_out, cfg.byol_hidden, cfg.byol_out])
        # the EMA target of the projector moves with the EMA teacher's momentum
        self.ema_projector = copy.deepcopy(self.byol_projector).requires_grad_(False)

    @property
    def ema(self) -> nn.Module:
        return self.teachers[self.cfg.teacher]

    def view_keep_indices(self, scores: Tensor, boxes_in_e: Tensor) -> Tensor | None:
        """Keep indices for one view from v_e's score map resampled into the view's box."""
        if self.token_selection == "random" or self.drop_ratio == 0:
            return None  # FLIP's random subset, drawn by the ViT
        grid = self.model.visual.grid
        score_map = scores.view(-1, 1, grid, grid)
        view_scores = crop_resize(score_map, boxes_in_e, grid).flatten(1)  # N x P
        return attentive_keep_indices(view_scores, grid, self.drop_ratio, self.attentive_block)

    def encode(self, batch: dict[str, Any]) -> Outputs:
        model, cfg = self.model, self.cfg
        images = model.normalize_images(batch["images"])
        size = model.cfg.image_size
        n = images.shape[0]
        box1 = random_boxes(n, cfg.crop_scale, cfg.crop_ratio, images.device)
        box2 = random_boxes(n, cfg.crop_scale, cfg.crop_ratio, images.device)
        box_e = union_boxes(box1, box2)
        with torch.no_grad():  # the EMA model: every patch of v_e, no gradient
            teacher = self.ema.module
            vision_e = teacher.visual(crop_resize(images, box_e, size), return_cls_attention=True)
            scores = attention_keep_scores(vision_e["cls_attention"])
            self.ema_projector.train(self.training)  # BYOL's target uses batch statistics
            byol_target = self.ema_projector(vision_e["pooled"])
        term_needs = frozenset(k for k in self.needs if "/" not in k)
        outputs: Outputs = self.teacher_outputs(batch, self.needs)
        outputs.update(model(None, batch["input_ids"], batch["attention_mask"], need=term_needs))  # text once
        views = []
        for box in (box1, box2):
            keep = self.view_keep_indices(scores, relative_boxes(box, box_e)) if self.training else None
            out = model(crop_resize(images, box, size), None, need=term_needs | {"image_pooled"}, keep_indices=keep)
            views.append(out)
        outputs["views"] = views
        pooled = [v["image_pooled"] for v in views]
        outputs["simclr"] = [self.simclr_head(p) for p in pooled]
        outputs["byol"] = [self.byol_predictor(self.byol_projector(p)) for p in pooled]
        outputs["byol_target"] = byol_target
        return outputs

    def compute_loss(self, outputs: Outputs, batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        shared = {k: v for k, v in outputs.items() if k not in {"views", "simclr", "byol", "byol_target"}}
        losses, metrics = [], {}
        for i, view in enumerate(outputs["views"]):
            loss, view_metrics = self.objective({**shared, **view}, batch)
            losses.append(loss)
            for k, v in view_metrics.items():  # the mean over the two views
                metrics[k] = metrics.get(k, 0.0) + v / len(outputs["views"])
        contrastive = sum(losses) / len(losses)
        z1, z2 = outputs["simclr"]
        simclr = simclr_loss(z1, z2, self.cfg.simclr_temperature)
        target = outputs["byol_target"]
        byol = sum(byol_loss(p, target) for p in outputs["byol"]) / len(outputs["byol"])
        total = contrastive + self.cfg.simclr_weight * simclr + self.cfg.byol_weight * byol
        metrics.update({"contrastive/loss": contrastive.detach(), "simclr/loss": simclr.detach(),
                        "byol/loss": byol.detach(), "loss": total.detach()})
        return total, metrics

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)  # clamps t, updates the EMA teacher, term state
        momentum = self.ema.momentum_at(step, self.total_steps)
        ema_update_(self.ema_projector, self.byol_projector, momentum)
