"""DreamLIP's sub-caption grouping loss (Zheng et al., ECCV 2024; methods.md section 7).

DreamLIP splits each image's long caption into sentences and samples K of them per step
(``data.sub_captions``, ``clipforge.data.captions``). Its two losses:

1. **Multi-positive contrastive**: the image is scored against all B(1+K) texts and its own 1+K texts
   are its positives; every text's positive is its image. That is the ``clip`` term on a batch with
   ``text_owner`` (``objectives.contrastive.multi_positive_clip_loss``), nothing new here.
2. **Grouping** (this term): for sub-caption k of image i, with y_k its embedding and p_m the image's
   projected, L2-normalised patch tokens,

       a_km = y_k . p_m,   min-max over m,   entries below delta set to 0,   w_km = a_km / sum_m a_km,
       g_k  = normalise(sum_m w_km p_m)

   and a symmetric InfoNCE between all {y_k} and all {g_k} of the batch (B*K x B*K, positives on the
   diagonal: every other (sub-caption, group) pair, other images' and the same image's other
   sub-captions', is a negative), with its own learnable temperature.

A constant similarity row (max = min) has no preferred patch: its weights are uniform (1/M) instead of
0/eps; so is a row that the threshold empties. Gathered across ranks: local rows against every rank's
columns, as the CLIP loss (every rank holds the same number of sub-captions, B_local * K).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from clipforge.objectives.base import Metrics, Term, TermConfig, register_term, require_output, upcast_low_precision
from clipforge.objectives.contrastive import symmetric_cross_entropy

RAW, SUB_CAPTION = 0, 2  # clipforge.data.captions' kinds (objectives do not import the data layer)
EPS = 1e-6


def grouping_weights(similarity: Tensor, threshold: float = 0.0, normalize: str = "minmax") -> Tensor:
    """(K, M) sub-caption-to-patch similarities -> (K, M) weights >= 0 summing to 1 over patches.

    Min-max normalised per row (or a softmax over the row, the released code's other option); entries
    below ``threshold`` (< 0 means 1/M) set to 0; renormalised. A constant row, or one the threshold
    empties, gets uniform weights.
    """
    m = similarity.shape[1]
    delta = 1.0 / m if threshold < 0 else threshold
    low = similarity.amin(dim=1, keepdim=True)
    spread = similarity.amax(dim=1, keepdim=True) - low
    if normalize == "softmax":
        scaled = similarity.softmax(dim=1)
    else:
        scaled = (similarity - low) / spread.clamp_min(EPS)
    scaled = scaled * (scaled >= delta)
    total = scaled.sum(dim=1, keepdim=True)
    degenerate = (spread <= EPS) | (total <= EPS)
    uniform = torch.full_like(scaled, 1.0 / m)
    return torch.where(degenerate, uniform, scaled / total.clamp_min(EPS))


def grouped_features(sub_embeds: Tensor, patch_embeds: Tensor, threshold: float = 0.0,
                     normalize: str = "minmax") -> tuple[Tensor, Tensor]:
    """(K, D) sub-caption embeddings, (K, M, D) the patches of each one's image -> (K, D) groups, (K, M) weights."""
    similarity = upcast_low_precision(torch.einsum("kd,kmd->km", sub_embeds, patch_embeds))
    weights = grouping_weights(similarity, threshold, normalize)
    groups = torch.einsum("km,kmd->kd", weights.to(patch_embeds.dtype), patch_embeds)
    return F.normalize(groups, dim=-1), weights


def grouping_loss(sub_embeds: Tensor, groups: Tensor, scale: Tensor) -> Tensor:
    """Symmetric InfoNCE between sub-captions and their groups, positives on the diagonal (one process)."""
    logits = upcast_low_precision((scale * sub_embeds) @ groups.T)
    return symmetric_cross_entropy(logits, logits.T)


class GroupingConfig(TermConfig):
    name: str = "dreamlip_grouping"
    threshold: float = Field(0.0, le=1.0)  # delta: normalised weights below it are dropped (< 0: 1/M)
    normalize: Literal["minmax", "softmax"] = "minmax"  # how similarities become weights over the patches
    logit_scale_init: float = Field(math.log(1 / 0.07), ge=0.0)  # its own temperature, learnable
    logit_scale_max: float = Field(100.0, ge=1.0)


@register_term
class DreamlipGrouping(Term):
    """Sub-caption <-> attention-pooled patch group contrastive loss (needs ``data.sub_captions``)."""

    name = "dreamlip_grouping"
    Config = GroupingConfig
    needs = frozenset({"image_token_embeds"})
    scope = "gathered"

    def __init__(self, weight: float = 1.0, threshold: float = 0.0, normalize: str = "minmax",
                 logit_scale_init: float = math.log(1 / 0.07), logit_scale_max: float = 100.0):
        super().__init__(weight)
        if threshold > 1:
            raise ValueError(f"dreamlip_grouping threshold must be <= 1 (normalised weights are in [0, 1]), got {threshold}")
        if normalize not in ("minmax", "softmax"):
            raise ValueError(f"dreamlip_grouping normalize must be 'minmax' or 'softmax', got {normalize!r}")
        self.threshold = float(threshold)
        self.normalize = normalize
        self.logit_scale_max = float(logit_scale_max)
        self.log_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        from clipforge.objectives.distributed import active_world_size, gather_with_grad

        patches = require_output(outputs, "image_token_embeds", self.name)
        texts = outputs["text_embeds"]
        kinds, owner = batch.get("caption_kind"), batch.get("text_owner")
        if kinds is None or owner is None:
            raise ValueError("objective term 'dreamlip_grouping' needs sub-captions: set data.sub_captions = K "
                             "(long captions split into sentences, K drawn per image per step)")
        rows = (kinds == SUB_CAPTION).nonzero().squeeze(1)
        if rows.numel() == 0:
            raise ValueError("objective term 'dreamlip_grouping': the batch has no sub-caption rows (caption_kind)")
        sub = texts[rows]
        groups, weights = grouped_features(sub, patches[owner[rows]], self.threshold, self.normalize)
        # the clamp bounds the scale without cutting its gradient inside the range (as CLIP's t)
        scale = self.log_scale.clamp(0, math.log(self.logit_scale_max)).exp()
        if active_world_size() > 1:
            import torch.distributed as dist

            from clipforge.objectives.distributed import _check_equal_local_batches

            _check_equal_local_batches(sub)
            all_sub, all_groups = gather_with_grad(sub), gather_with_grad(groups)
            labels = torch.arange(sub.shape[0], device=sub.device) + dist.get_rank() * sub.shape[0]
            loss = symmetric_cross_entropy(upcast_low_precision((scale * sub) @ all_groups.T),
                                           upcast_low_precision((scale * groups) @ all_sub.T), labels)
        else:
            loss = grouping_loss(sub, groups, scale)
        with torch.no_grad():  # how peaked the groups are: 1 = one patch, 0 = all patches alike
            entropy = -(weights * weights.clamp_min(EPS).log()).sum(1).mean() / math.log(weights.shape[1])
        return loss, {"logit_scale": scale.detach(), "group_peakedness": float(1 - entropy)}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, threshold={self.threshold}, normalize={self.normalize}"


class SubCaptionClipConfig(TermConfig):
    name: str = "sub_caption_clip"
    include_raw: bool = False  # the raw caption's slot in the mean too (the released code's declip form)


@register_term
class SubCaptionClip(Term):
    """DreamLIP's per-sub-caption InfoNCE (the released code's ``declip`` flag): for each sub-caption
    slot k, CLIP's loss between the B images and their k-th sub-captions (each image's k-th text is its
    one positive, the other images' k-th texts its negatives); the mean over the K slots. Gathered
    across ranks as the clip term. Sits beside the multi-positive ``clip`` term, which scores every
    image against all B(1+K) texts at once."""

    name = "sub_caption_clip"
    Config = SubCaptionClipConfig
    scope = "gathered"

    def __init__(self, weight: float = 1.0, include_raw: bool = False):
        super().__init__(weight)
        self.include_raw = bool(include_raw)

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        from clipforge.objectives.contrastive import clip_logits, clip_loss
        from clipforge.objectives.distributed import _check_equal_local_batches, active_world_size, gather_with_grad

        logit_scale = require_output(outputs, "logit_scale", self.name)
        images, texts = outputs["image_embeds"], outputs["text_embeds"]
        kinds, owner = batch.get("caption_kind"), batch.get("text_owner")
        if kinds is None or owner is None:
            raise ValueError("objective term 'sub_caption_clip' needs sub-captions: set data.sub_captions = K "
                             "(long captions split into sentences, K drawn per image per step)")
        per = texts.shape[0] // images.shape[0]
        # the loaders write an image's 1+K texts as consecutive rows: slot j of image i is row i * per + j
        if per * images.shape[0] != texts.shape[0] or not torch.equal(
                owner, torch.arange(images.shape[0], device=owner.device).repeat_interleave(per)):
            raise ValueError("objective term 'sub_caption_clip': the batch's texts are not per-image slots "
                             "(text_owner must be each image's 1+K rows in turn, as data.sub_captions writes them)")
        wanted = (SUB_CAPTION, RAW) if self.include_raw else (SUB_CAPTION,)
        slots = [j for j in range(per) if int(kinds[j]) in wanted]
        if not slots:
            raise ValueError("objective term 'sub_caption_clip': the batch has no sub-caption rows (caption_kind)")
        if active_world_size() == 1:
            losses = [clip_loss(images, texts[j::per], logit_scale) for j in slots]
            return torch.stack(losses).mean(), {"slots": float(len(slots))}
        import torch.distributed as dist

        _check_equal_local_batches(images)
        # one gather each: every rank's rows are sample-major with the same per, so slot j of the
        # gathered texts is all_texts[j::per], in the order of the gathered images
        all_images, all_texts = gather_with_grad(images), gather_with_grad(texts)
        labels = torch.arange(images.shape[0], device=images.device) + dist.get_rank() * images.shape[0]
        losses = [symmetric_cross_entropy(clip_logits(images, all_texts[j::per], logit_scale),
                                          clip_logits(texts[j::per], all_images, logit_scale), labels)
                  for j in slots]
        return torch.stack(losses).mean(), {"slots": float(len(slots))}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, include_raw={self.include_raw}"
