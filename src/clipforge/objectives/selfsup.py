"""Image self-supervision pieces shared by the methods that add them to CLIP (A-CLIP, SLIP).

    mlp           Linear -> BN -> ReLU between every pair of widths, a plain Linear at the end
                  (SimCLR's / SLIP's projection head, BYOL's projector and predictor)
    simclr_loss   NT-Xent between two views (Chen et al. 2020): each row's positive is the same
                  sample's other view, the other 2B - 2 embeddings of the (gathered) batch are
                  negatives; the self-similarity is masked out; fixed temperature (0.1 in SLIP)
    byol_loss     2 - 2 cos(prediction, stop-grad target)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(dims: list[int], last_bn: bool = False) -> nn.Sequential:
    """Linear -> BN -> ReLU between every pair of dims; a plain Linear at the end."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=last))
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


def simclr_loss(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent between two views: each row's positive is the same sample's other view; the other
    2B - 2 embeddings are negatives. Gathered across ranks (local rows against all columns)."""
    from clipforge.objectives.distributed import active_world_size, gather_with_grad

    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    b = z1.shape[0]
    rank = 0
    all1, all2 = z1, z2
    if active_world_size() > 1:
        import torch.distributed as dist

        all1, all2, rank = gather_with_grad(z1), gather_with_grad(z2), dist.get_rank()
    total = all1.shape[0]
    columns = torch.cat([all1, all2])  # 2B x d
    rows = torch.cat([z1, z2])  # 2b x d (this rank's)
    logits = rows @ columns.T / temperature
    local = torch.arange(b, device=z1.device) + rank * b
    self_cols = torch.cat([local, local + total])
    positive_cols = torch.cat([local + total, local])
    logits = logits.masked_fill(F.one_hot(self_cols, 2 * total).bool(), float("-inf"))
    return F.cross_entropy(logits, positive_cols)


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """2 - 2 cos(prediction, stop-grad target), averaged over samples."""
    return (2 - 2 * F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1)).mean()
