"""Lexical heads (LexLIP, Luo et al. ICCV 2023; LexVLA's top-k sparsification): each tower maps its
tokens to non-negative weights over the text vocabulary, so an image or a caption becomes a bag
of weighted words that an inverted index can search.

    tokens N×T×W -> MLM-style head (Linear, GELU, LayerNorm, Linear to |V|) -> logits N×T×V
                 -> padding set to -1e6 -> max over tokens -> log(1 + ReLU(.)) -> weights N×V >= 0

The max keeps, for every word, the token that votes for it most; log(1 + ReLU) saturates large
logits so no single word dominates the dot product. In training every weight stays (the FLOPs
regulariser, objectives/lexical.py, pushes most of them to 0); at inference ``keep_top_k`` keeps
the k largest per vector, which bounds the posting-list work per query and document.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PAD_LOGIT = -1e6  # LexLIP's mask value: a padding token can never win the max


class LexicalHead(nn.Module):
    """BERT's MLM prediction head shape: transform (Linear, GELU, LayerNorm), then a decoder to |V|."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, vocab_size)
        nn.init.normal_(self.dense.weight, std=width**-0.5)
        nn.init.zeros_(self.dense.bias)
        nn.init.normal_(self.decoder.weight, std=width**-0.5)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """N×T×W -> per-token vocabulary logits N×T×V."""
        return self.decoder(self.norm(self.act(self.dense(tokens))))


def max_pooled_logits(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token logits N×T×V (``mask`` N×T, 1 = real token) -> N×V: each word's largest logit over the
    real tokens (padding set to -1e6 first, so it never wins)."""
    if mask is not None:
        logits = logits.masked_fill(~mask.bool()[:, :, None], PAD_LOGIT)
    return logits.max(dim=1).values


def lexical_weights(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token logits N×T×V (``mask`` N×T, 1 = real token) -> non-negative weights N×V.

    l = log(1 + ReLU(max over real tokens of the logits)); padding positions are set to -1e6
    first, so they never change l (the checklist's padding test)."""
    return weights_from_pooled(max_pooled_logits(logits, mask))


def weights_from_pooled(pooled: Tensor) -> Tensor:
    """Max-pooled logits N×V -> the lexical weights log(1 + ReLU(.)) N×V."""
    return torch.log1p(torch.relu(pooled))


def keep_top_k(weights: Tensor, k: int) -> Tensor:
    """Zero all but the ``k`` largest weights of each row (N×V -> N×V, same dtype); k >= V keeps all."""
    if k >= weights.shape[-1]:
        return weights
    top = weights.topk(k, dim=-1)
    return torch.zeros_like(weights).scatter_(-1, top.indices, top.values)


@torch.no_grad()
def sparsity_report(weights: Tensor) -> dict[str, float]:
    """Average non-zeros per vector and the fraction of the vocabulary they cover (N×V)."""
    nonzero = (weights != 0).sum(dim=-1).float()
    return {"nnz": float(nonzero.mean()), "density": float(nonzero.mean() / weights.shape[-1])}
