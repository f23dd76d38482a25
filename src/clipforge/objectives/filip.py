"""FILIP: token-wise late interaction (Yao et al., ICLR 2022; methods.md section 6).

Image i has n1 projected, L2-normalised patch tokens x_i^k; text j has n2 real (non-padding) tokens
y_j^r. The two similarities are asymmetric:

    s^I_ij = mean_k max_r x_i^k . y_j^r      (each image token's best word, averaged over patches)
    s^T_ij = mean_r max_k y_j^r . x_i^k      (each word's best patch, averaged over real words)

Padding is removed from both the max and the mean. The loss is CLIP's InfoNCE with logits t * s^I
for image -> text rows and t * s^T for text -> image rows.

Across ranks each rank gathers every rank's token features. With ``token_keep`` < 1 (FILIP: 0.25) a rank
sends only each sample's ``token_keep`` share of its real tokens, those whose best match among the
other modality's tokens on the same rank is highest (``most_matched_tokens``): its own rows still use
all of their tokens, the gathered columns the sent ones (its own shard's included, so every rank
scores the same columns).

Memory: the token-pair similarities of a block are Ni x c x n1 x n2 floats. ``late_interaction_scores``
walks the texts in chunks of ``chunk`` so only one block exists at a time (its max keeps just the
Ni x c x n1 and Ni x c x n2 argmax indices for backward). With B gathered samples, n1 = 64, n2 = 16
and chunk = 64 that is B x 64 x 64 x 16 x 4 bytes = 16 MB per 64 samples of B.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from clipforge.objectives.base import Metrics, Term, TermConfig, register_term, require_output, upcast_low_precision
from clipforge.objectives.contrastive import multi_positive_clip_loss, retrieval_accuracy


def late_interaction_scores(
    image_tokens: Tensor,
    text_tokens: Tensor,
    text_mask: Tensor | None = None,
    image_mask: Tensor | None = None,
    chunk: int = 64,
    sides: str = "both",
) -> tuple[Tensor | None, Tensor | None]:
    """(Ni, n1, E), (Nt, n2, E) token embeddings -> (s^I, s^T), both Ni x Nt.

    ``text_mask`` / ``image_mask`` (1 = real token) drop padding from both the max and the mean.
    ``sides`` = "image" or "text" computes that score only (the other is None): a distributed step needs
    one direction from each of its two calls.
    """
    if sides not in ("both", "image", "text"):
        raise ValueError(f"sides must be 'both', 'image' or 'text', got {sides!r}")
    ni, n1, _ = image_tokens.shape
    nt, n2, _ = text_tokens.shape
    if text_mask is None:
        text_mask = torch.ones(nt, n2, dtype=torch.bool, device=text_tokens.device)
    if image_mask is None:
        image_mask = torch.ones(ni, n1, dtype=torch.bool, device=image_tokens.device)
    text_mask, image_mask = text_mask.bool(), image_mask.bool()
    image_count = image_mask.sum(1).clamp(min=1).to(image_tokens.dtype)  # Ni
    text_count = text_mask.sum(1).clamp(min=1).to(text_tokens.dtype)  # Nt
    image_scores, text_scores = [], []
    for start in range(0, nt, chunk):
        t_tok = text_tokens[start:start + chunk]
        t_mask = text_mask[start:start + chunk]
        sim = upcast_low_precision(torch.einsum("ikd,jrd->ijkr", image_tokens, t_tok))  # Ni x c x n1 x n2
        if sides != "text":  # image side: each patch's best real word, averaged over real patches
            # max(dim).values, not amax: its backward keeps the argmax indices, amax's a copy of the whole block
            best_word = sim.masked_fill(~t_mask[None, :, None, :], float("-inf")).max(dim=3).values  # Ni x c x n1
            best_word = best_word.masked_fill(~image_mask[:, None, :], 0.0)
            image_scores.append(best_word.sum(2) / image_count[:, None])
        if sides != "image":  # text side: each real word's best real patch, averaged over real words
            best_patch = sim.masked_fill(~image_mask[:, None, :, None], float("-inf")).max(dim=2).values  # Ni x c x n2
            best_patch = best_patch.masked_fill(~t_mask[None], 0.0)
            text_scores.append(best_patch.sum(2) / text_count[start:start + chunk][None])
    return (torch.cat(image_scores, dim=1) if image_scores else None,
            torch.cat(text_scores, dim=1) if text_scores else None)


def most_matched_tokens(tokens: Tensor, mask: Tensor | None, others: Tensor, others_mask: Tensor | None,
                        keep: float, block_elements: int = 1 << 25) -> tuple[Tensor, Tensor]:
    """FILIP's token reduction before the all-gather: of each sample's real tokens (``mask``, 1 = real;
    None: all), the ceil(keep x its real count) (at least 1) whose best similarity with any real token of
    ``others`` (the other modality's tokens on this rank) is highest.

    (N, n, E) -> (N, K, E) selected tokens (gradient flows to them) and their (N, K) mask, K =
    ceil(keep x n), highest first; a sample with fewer real tokens pads the rest, masked out.
    Memory: the similarities are computed a block of rows at a time, at most ``block_elements`` floats.
    """
    n_samples, length, dim = tokens.shape
    real = torch.ones(n_samples, length, dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
    other = others.detach().reshape(-1, others.shape[-1])
    if others_mask is not None:
        other = other[others_mask.bool().reshape(-1)]
    with torch.no_grad():  # the ranking carries no gradient
        flat = tokens.detach().reshape(-1, dim)
        rows = max(1, block_elements // max(1, other.shape[0]))  # token rows per block of similarities
        best = torch.cat([upcast_low_precision(flat[start:start + rows] @ other.T).amax(dim=1)
                          for start in range(0, flat.shape[0], rows)])
        best = best.view(n_samples, length).masked_fill(~real, float("-inf"))
        size = max(1, math.ceil(keep * length))
        order = best.topk(size, dim=1).indices  # N x K, highest first
        count = (real.sum(1).float() * keep).ceil().clamp(min=1).long()  # each sample's own share
        kept = torch.arange(size, device=tokens.device)[None, :] < count[:, None]
    picked = tokens.gather(1, order[:, :, None].expand(-1, -1, dim))
    return picked, kept


def filip_loss(
    image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor, logit_scale: Tensor,
    text_owner: Tensor | None = None, chunk: int = 64, weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """FILIP's InfoNCE: rows of t*s^I (image -> text) and of t*s^T transposed (text -> image).

    Returns (loss, s^I, s^T). ``text_owner`` maps each text to its image (default: text i <-> image i).
    """
    s_image, s_text = late_interaction_scores(image_tokens, text_tokens, text_mask, chunk=chunk)
    loss = multi_positive_clip_loss(logit_scale * s_image, logit_scale * s_text.T, text_owner, weights=weights)
    return loss, s_image, s_text


class FilipConfig(TermConfig):
    name: str = "filip"
    chunk: int = Field(64, ge=1)  # texts per block of token-pair similarities (memory bound, see the module doc)
    # share of each sample's real tokens a rank sends to the others (FILIP: 0.25): the ones best matched
    # by the other modality on the same rank (most_matched_tokens). 1: all of them. One process: no effect
    token_keep: float = Field(1.0, gt=0.0, le=1.0)
    # across ranks: send the token features (and their gradients back) in float16, FILIP's half of the bytes
    gather_half: bool = False


@register_term
class FilipLoss(Term):
    """Late-interaction contrastive loss over projected token features (gathered across ranks)."""

    name = "filip"
    Config = FilipConfig
    needs = frozenset({"image_token_embeds", "text_token_embeds"})
    scope = "gathered"

    def __init__(self, weight: float = 1.0, chunk: int = 64, token_keep: float = 1.0, gather_half: bool = False):
        super().__init__(weight)
        if chunk < 1:
            raise ValueError(f"filip chunk must be >= 1, got {chunk}")
        if not 0.0 < token_keep <= 1.0:
            raise ValueError(f"filip token_keep is a share in (0, 1], got {token_keep}")
        self.chunk, self.token_keep, self.gather_half = int(chunk), float(token_keep), bool(gather_half)

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        from clipforge.objectives.distributed import active_world_size

        logit_scale = require_output(outputs, "logit_scale", self.name)
        image_tokens = require_output(outputs, "image_token_embeds", self.name)
        text_tokens = require_output(outputs, "text_token_embeds", self.name)
        text_mask = batch["attention_mask"][:, : text_tokens.shape[1]]
        owner = batch.get("text_owner")
        if active_world_size() > 1:  # every rank scores its rows against all ranks' tokens
            return self._distributed(image_tokens, text_tokens, text_mask, logit_scale, owner, batch.get("weights"))
        loss, s_image, _ = filip_loss(image_tokens, text_tokens, text_mask, logit_scale, owner, self.chunk,
                                      batch.get("weights"))
        metrics: Metrics = {"logit_scale": logit_scale.detach()}
        if owner is None:
            metrics["i2t_acc"], metrics["t2i_acc"] = retrieval_accuracy(s_image)
        return loss, metrics

    def _distributed(self, image_tokens, text_tokens, text_mask, logit_scale, owner, weights):
        """Local rows against gathered columns, as the gathered CLIP loss (exact global gradient)."""
        import torch.distributed as dist

        from clipforge.objectives.distributed import gather_no_grad, gather_with_grad, gathered_owner

        sent_images, sent_image_mask, sent_texts, sent_mask = image_tokens, None, text_tokens, text_mask
        if self.token_keep < 1.0:  # FILIP: send each sample's best-matched tokens only
            sent_images, sent_image_mask = most_matched_tokens(image_tokens, None, text_tokens, text_mask,
                                                               self.token_keep)
            sent_texts, sent_mask = most_matched_tokens(text_tokens, text_mask, image_tokens, None, self.token_keep)
        if self.gather_half:  # FILIP: fp16 on the wire (the scores are computed in the tokens' own precision)
            sent_images, sent_texts = sent_images.half(), sent_texts.half()
        all_images = gather_with_grad(sent_images).to(image_tokens.dtype)
        all_image_mask = None if sent_image_mask is None else gather_no_grad(sent_image_mask)
        all_texts = gather_with_grad(sent_texts).to(text_tokens.dtype)
        all_mask = gather_no_grad(sent_mask)
        rank, b_img, b_txt = dist.get_rank(), image_tokens.shape[0], text_tokens.shape[0]
        # image -> text rows: this rank's images (all their tokens) against every text
        s_image, _ = late_interaction_scores(image_tokens, all_texts, all_mask, chunk=self.chunk, sides="image")
        # text -> image rows: this rank's texts against every image
        _, s_text = late_interaction_scores(all_images, text_tokens, text_mask, image_mask=all_image_mask,
                                            chunk=self.chunk, sides="text")
        local_owner = owner if owner is not None else torch.arange(b_txt, device=text_tokens.device)
        global_owner = gathered_owner(local_owner, b_img)  # owners of all texts, in global image indices
        loss = multi_positive_clip_loss(
            logit_scale * s_image, logit_scale * s_text.T, global_owner,
            image_offset=rank * b_img, text_offset=rank * b_txt, weights=weights,
        )
        metrics: Metrics = {"logit_scale": logit_scale.detach()}
        return loss, metrics
