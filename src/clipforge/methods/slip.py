"""SLIP: self-supervision meets language-image pre-training (Mu et al. 2022; methods.md section 12).

Per step: the recipe's objective (CLIP by default; any terms compose) on the images and captions, as
the plain step computes it, plus SimCLR on two more views of each image:

    L = L_objective + ssl_scale * NT-Xent(h(f(v1)), h(f(v2)); tau = 0.1, 2B - 2 negatives, gathered)

f is the image tower (its pooled output, before the CLIP projection), h the SimCLR head: a 3-layer MLP
(width -> 4096 -> 4096 -> 256, BN + ReLU between). The two views come from the data workers
(``data.ssl_views = 2``: random-resized crops of area 0.08-1, flip, SimCLR's colour / blur policy;
``clipforge.data.views``), while the CLIP image gets the weaker crop of ``data.augment.scale``
(SLIP: 0.5-1). ``ssl_scale = 0`` skips the SSL branch: the step is then the plain step exactly.
Each view goes through h on its own (``view_batchnorm = "per_view"``: BatchNorm statistics over one
view's samples, as the released code calls its head once per view); ``"joint"`` normalises both views
in one call.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from clipforge.config import MethodConfig, Recipe
from clipforge.methods import register_method
from clipforge.objectives.base import Metrics
from clipforge.objectives.selfsup import mlp, simclr_loss
from clipforge.train.step import Outputs, TrainStep


class SlipConfig(MethodConfig):
    name: str = "slip"
    ssl_scale: float = Field(1.0, ge=0.0)  # lambda: the SimCLR loss's weight (paper: 1)
    simclr_temperature: float = Field(0.1, gt=0.0)
    simclr_hidden: int = Field(4096, ge=1)  # paper: width -> 4096 -> 4096 -> 256
    simclr_out: int = Field(256, ge=1)
    view_batchnorm: Literal["per_view", "joint"] = "per_view"  # the head's BN: one view at a time (SLIP's code)

    def check_recipe(self, recipe: Recipe) -> None:
        if self.ssl_scale > 0 and recipe.data.ssl_views != 2:  # at 0 the views would go unused
            raise ValueError(f"method 'slip' trains SimCLR on two extra views of each image: set data.ssl_views = 2 "
                             f"(got {recipe.data.ssl_views}); the recipe 'slip-cifar' does")
        if recipe.train.accum_mode == "gradcache":
            raise ValueError("method 'slip' adds a SimCLR branch with BatchNorm heads; train.accum_mode = "
                             "'gradcache' cannot replay it: use 'plain'")


@register_method
class SlipStep(TrainStep):
    name = "slip"
    Config = SlipConfig
    supports_gradcache = False

    def __init__(self, recipe: Recipe, model: nn.Module, objective, teachers: dict[str, nn.Module]):
        super().__init__(recipe, model, objective, teachers)
        cfg: SlipConfig = recipe.method
        self.cfg = cfg
        self.simclr_head = mlp([recipe.model.vision_pooled_width, cfg.simclr_hidden, cfg.simclr_hidden, cfg.simclr_out])

    def encode(self, batch: dict[str, Any]) -> Outputs:
        outputs = super().encode(batch)  # the plain step: the objective's pass over images and captions
        if self.cfg.ssl_scale == 0 or not self.training:
            return outputs
        views = batch.get("views")
        if views is None or views.dim() != 5 or views.shape[1] != 2:
            raise ValueError("method 'slip' needs batch['views'] of shape N x 2 x 3 x H x W: set data.ssl_views = 2")
        n = views.shape[0]
        # both views in one pass of the image tower (every patch: FLIP-style dropout applies, as to images)
        pooled = self.model.visual(self.model.normalize_images(views.flatten(0, 1)))["pooled"].view(n, 2, -1)
        if self.cfg.view_batchnorm == "joint":
            z = self.simclr_head(pooled.flatten(0, 1)).view(n, 2, -1)
            outputs["simclr"] = (z[:, 0], z[:, 1])
        else:  # the tower has no batch statistics, so one pass over both views is the same as two
            outputs["simclr"] = (self.simclr_head(pooled[:, 0]), self.simclr_head(pooled[:, 1]))
        return outputs

    def compute_loss(self, outputs: Outputs, batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        loss, metrics = self.objective(outputs, batch)
        if "simclr" not in outputs:
            return loss, metrics
        ssl = simclr_loss(*outputs["simclr"], self.cfg.simclr_temperature)
        total = loss + self.cfg.ssl_scale * ssl
        metrics = {**metrics, "contrastive/loss": loss.detach(), "simclr/loss": ssl.detach(),
                   "loss": total.detach()}
        return total, metrics
