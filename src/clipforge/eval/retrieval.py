"""Image <-> text retrieval Recall@k with several captions per image.

Convention ("any positive in top k", as in CLIP_benchmark):
- ``text_retrieval_recall@k``  (image -> text): an image counts as a hit if ANY of its captions is
  among its k nearest texts.
- ``image_retrieval_recall@k`` (text -> image): a caption counts as a hit if its image is among
  its k nearest images.

Scores are computed in chunks with a running top-k, so memory is O(chunk x chunk + queries x k)
and a million captions never form an N x N matrix.
"""

from __future__ import annotations

from typing import Sequence

import torch


def streaming_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Indices (Q, k) of the k keys with the largest dot product for each query, best first."""
    k = min(k, keys.shape[0])
    out = []
    for qs in range(0, queries.shape[0], chunk):
        q = queries[qs : qs + chunk]
        best_vals = torch.full((q.shape[0], 0), float("-inf"), dtype=q.dtype, device=q.device)
        best_idx = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for ks in range(0, keys.shape[0], chunk):
            scores = q @ keys[ks : ks + chunk].T
            vals = torch.cat([best_vals, scores], dim=1)
            idx = torch.cat([best_idx, torch.arange(ks, ks + scores.shape[1], device=q.device).expand_as(scores)], dim=1)
            top = vals.topk(min(k, vals.shape[1]), dim=1)
            best_vals, best_idx = top.values, idx.gather(1, top.indices)
        out.append(best_idx)
    return torch.cat(out)


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 4096,
) -> dict[str, float]:
    """Recall@k both ways. ``text_to_image[j]`` is the index of the image caption j describes."""
    if text_embeds.shape[0] != text_to_image.shape[0]:
        raise ValueError("text_to_image needs one image index per caption")
    kmax = max(ks)
    metrics: dict[str, float] = {}
    # text -> image: is the caption's own image in its top k?
    t2i = streaming_topk(text_embeds, image_embeds, kmax, chunk)
    hit_t2i = t2i == text_to_image[:, None]
    # image -> text: is any of the image's captions in its top k?
    i2t = streaming_topk(image_embeds, text_embeds, kmax, chunk)
    owner = text_to_image[i2t]  # (num_images, kmax): which image each retrieved caption belongs to
    hit_i2t = owner == torch.arange(image_embeds.shape[0], device=owner.device)[:, None]
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = hit_t2i[:, :k].any(dim=1).sum().item() / hit_t2i.shape[0]
        metrics[f"text_retrieval_recall@{k}"] = hit_i2t[:, :k].any(dim=1).sum().item() / hit_i2t.shape[0]
    return metrics
