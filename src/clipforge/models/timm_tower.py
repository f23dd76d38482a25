"""A timm backbone as the image tower (``model.image_tower = "timm"``): ConvNeXt, EfficientNet, timm's
ViTs, ... as OpenCLIP's ``TimmModel`` builds them, so OpenCLIP's timm-tower CLIPs (the LAION ConvNeXt
CLIPs, e.g. ``convnext_base_w``) import and export.

    images N×3×S×S -> timm trunk (its own pooling: model.timm_pool) -> pooled N×C -> image_projection

``timm_proj = "linear"``: the trunk has no classifier and ``CLIP.image_projection`` maps its C features
to the joint space (OpenCLIP's ``head.proj``; a bias with ``timm_proj_bias``). ``"timm"``: the trunk's
own classifier outputs the embedding (OpenCLIP's ``timm_proj = null``); ``"none"``: the pooled features
are the embedding (C = embed_dim). With either, ``CLIP.image_projection`` is the identity.
Weights are never downloaded: a new tower starts from timm's random initialisation; trained weights
come from a clipforge checkpoint or ``clipforge import openclip``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from clipforge.models.vit import refuse_patch_outputs


def require_timm():
    try:
        import timm
    except ImportError:
        raise ImportError("model.image_tower = 'timm' needs timm: pip install 'clipforge[timm]'") from None
    return timm


def create_trunk(name: str, pool: str, proj: str, embed_dim: int, drop_path: float | None = None) -> nn.Module:
    """A timm model, randomly initialised, built as OpenCLIP's TimmModel builds it (so weights map by name).

    ``proj = "linear"``: the classifier is removed and ``pool`` replaces the model's pooling ("" keeps
    its own); ``"timm"``: timm's classifier outputs the ``embed_dim`` embedding; ``"none"``: the pooled
    features are the embedding (no classifier)."""
    timm = require_timm()
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.8)
        raise ValueError(f"model.timm_model = {name!r} is not a timm model" +
                         (f" (similar: {', '.join(close)})" if close else "") + "; timm.list_models() lists them")
    kwargs = {} if drop_path is None else {"drop_path_rate": drop_path}
    if proj != "linear":
        num_classes = embed_dim if proj == "timm" else 0
        return timm.create_model(name, pretrained=False, num_classes=num_classes, global_pool=pool, **kwargs)
    trunk = timm.create_model(name, pretrained=False, **kwargs)
    trunk.reset_classifier(0, **({"global_pool": pool} if pool else {}))
    return trunk


@lru_cache(maxsize=None)
def pooled_width(name: str, pool: str, proj: str, embed_dim: int) -> int:
    """The trunk's output width, read off a copy built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        trunk = create_trunk(name, pool, proj, embed_dim)
    return embed_dim if proj == "timm" else trunk.num_features


class TimmTower(nn.Module):
    """Normalised images -> ``{"pooled": N×C}``, the ViT's interface."""

    def __init__(self, name: str, pool: str, proj: str, embed_dim: int, drop_path: float | None = None):
        super().__init__()
        self.trunk = create_trunk(name, pool, proj, embed_dim, drop_path)
        self.low_precision_residual = False  # train.bf16_residual concerns clipforge's own transformers

    @property
    def grad_checkpointing(self) -> bool:
        # timm keeps the switch on the model or on its stages (ConvNeXt)
        return any(getattr(m, "grad_checkpointing", False) is True for m in self.trunk.modules())

    @grad_checkpointing.setter
    def grad_checkpointing(self, on: bool) -> None:
        """train.grad_checkpointing, through timm's own switch (what OpenCLIP's --grad-checkpointing does)."""
        if not on and not self.grad_checkpointing:
            return
        try:
            self.trunk.set_grad_checkpointing(on)
        except (AssertionError, AttributeError, NotImplementedError):
            raise ValueError(f"train.grad_checkpointing: the timm model {type(self.trunk).__name__} does not support "
                             "it; leave it off, or lower data.batch_size and raise train.accum_steps") from None

    def forward(
        self,
        images: torch.Tensor,
        keep_indices: torch.Tensor | None = None,
        return_tokens: bool = False,
        return_cls_attention: bool = False,
    ) -> dict[str, torch.Tensor]:
        refuse_patch_outputs("timm", keep_indices, return_tokens, return_cls_attention)
        return {"pooled": self.trunk(images)}
