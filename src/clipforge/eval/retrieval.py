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
        best = empty_topk(q.shape[0], q.dtype, q.device)
        for ks in range(0, keys.shape[0], chunk):
            best = merge_topk(best, q @ keys[ks : ks + chunk].T, ks, k)
        out.append(best[1])
    return torch.cat(out)


def empty_topk(rows: int, dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A running top-k that has seen no keys yet: (values, indices), both rows x 0."""
    return (torch.full((rows, 0), float("-inf"), dtype=dtype, device=device),
            torch.zeros((rows, 0), dtype=torch.long, device=device))


def merge_topk(best: tuple[torch.Tensor, torch.Tensor], scores: torch.Tensor, first: int, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k (values, indices) merged with ``scores`` of keys ``first, first + 1, ...``."""
    best_vals, best_idx = best
    vals = torch.cat([best_vals, scores], dim=1)
    idx = torch.cat([best_idx, torch.arange(first, first + scores.shape[1], device=scores.device).expand_as(scores)],
                    dim=1)
    top = vals.topk(min(k, vals.shape[1]), dim=1)
    return top.values, idx.gather(1, top.indices)


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
    t2i = streaming_topk(text_embeds, image_embeds, kmax, chunk)
    i2t = streaming_topk(image_embeds, text_embeds, kmax, chunk)
    return recall_from_topk(t2i, i2t, text_to_image, ks)


def recall_from_topk(t2i: torch.Tensor, i2t: torch.Tensor, text_to_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways from ranked indices: ``t2i`` (captions x k, image indices, best first) and
    ``i2t`` (images x k, caption indices), however they were scored (pooled or late interaction)."""
    metrics: dict[str, float] = {}
    # text -> image: is the caption's own image in its top k?
    hit_t2i = t2i == text_to_image[:, None]
    # image -> text: is any of the image's captions in its top k?
    owner = text_to_image[i2t]  # (num_images, kmax): which image each retrieved caption belongs to
    hit_i2t = owner == torch.arange(i2t.shape[0], device=owner.device)[:, None]
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = hit_t2i[:, :k].any(dim=1).sum().item() / hit_t2i.shape[0]
        metrics[f"text_retrieval_recall@{k}"] = hit_i2t[:, :k].any(dim=1).sum().item() / hit_i2t.shape[0]
    return metrics
