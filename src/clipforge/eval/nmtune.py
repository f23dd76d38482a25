"""NMTune (Chen et al., ICLR 2024): tune frozen features of a backbone pre-trained on noisy data.

    clipforge eval ckpt/ --task linear-probe --train-data imagefolder:train/ --data imagefolder:test/ --nmtune

On the frozen features f (the backbone never gets a gradient: only its features are used):

    z = f + alpha * MLP(f)          MLP: Linear(d, 4d) -> GELU -> Linear(4d, d), one layer, alpha starts at 1
    logits = Linear(d, C)(z)
    L = CE(logits, y)
        + 1.0   * MSE(normalise(z), sg(normalise(f)))         keep the tuned space near the pre-trained one
        + 0.04  * sum_{i != j} Cov(z)_ij^2 / d                decorrelate the feature dimensions
        - 0.001 * mean(top-5 singular values of z / their sum) favour a dominant spectrum (the minus sign)

MSE is the mean squared error over the batch and the d dimensions (the released code's nn.MSELoss);
Cov is the batch covariance
(centred, / (N - 1)); the singular values are those of the batch's z, normalised to sum to 1.
AdamW, lr 1e-3, 30 epochs (the paper's settings), batch 64, seeded: deterministic on CPU.
The checkpoint-selection-free protocol: train on all training features, report on test.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.eval.zeroshot import classification_metrics

WEIGHTS = {"mse": 1.0, "cov": 0.04, "svd": 0.001}
TOP_SINGULAR = 5
EPOCHS, LR, BATCH = 30, 1e-3, 64  # batch 64: probe sets are small; 256 would give a few steps per epoch


class NMTuneHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, hidden_ratio: int = 4):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_ratio * dim), nn.GELU(), nn.Linear(hidden_ratio * dim, dim))
        self.alpha = nn.Parameter(torch.ones(()))  # residual scale, initialised to 1
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = f + self.alpha * self.mlp(f)
        return z, self.classifier(z)


def mse_term(z: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(F.normalize(z, dim=-1), F.normalize(f, dim=-1).detach())  # mean over N x d, as nn.MSELoss


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    zc = z - z.mean(dim=0, keepdim=True)
    cov = zc.T @ zc / max(1, len(z) - 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return off.pow(2).sum() / z.shape[1]


def spectral_term(z: torch.Tensor, k: int = TOP_SINGULAR) -> torch.Tensor:
    s = torch.linalg.svdvals(z)
    s = s / s.sum().clamp_min(1e-12)
    return s[:k].mean()


def nmtune_loss(z: torch.Tensor, f: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                weights: dict[str, float] = WEIGHTS) -> tuple[torch.Tensor, dict[str, float]]:
    terms = {"ce": F.cross_entropy(logits, y), "mse": mse_term(z, f), "cov": covariance_term(z),
             "svd": spectral_term(z)}
    loss = terms["ce"] + weights["mse"] * terms["mse"] + weights["cov"] * terms["cov"] - weights["svd"] * terms["svd"]
    return loss, {k: float(v) for k, v in terms.items()}


def nmtune_probe(train_x, train_y, test_x, test_y, num_classes: int, *, fewshot_k: int | None = None,
                 seed: int = 0, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH) -> dict:
    """Train the NMTune head on frozen training features; metrics on the test features."""
    from clipforge.eval.linear_probe import fewshot_indices

    x = torch.as_tensor(np.asarray(train_x), dtype=torch.float32).detach()  # frozen: no grad to the backbone
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    if fewshot_k is not None:
        keep = torch.from_numpy(fewshot_indices(y.numpy(), fewshot_k, seed))
        x, y = x[keep], y[keep]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = NMTuneHead(x.shape[1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    last = {}
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # covariance and spectrum need a batch
                continue
            z, logits = head(x[idx])
            loss, last = nmtune_loss(z, x[idx], logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        _, logits = head(torch.as_tensor(np.asarray(test_x), dtype=torch.float32))
    test_y = torch.as_tensor(np.asarray(test_y), dtype=torch.long)
    return {"metrics": classification_metrics(logits, test_y, num_classes), "method": "nmtune",
            "epochs": epochs, "lr": lr, "weights": WEIGHTS, "last_batch_terms": last,
            "alpha": float(head.alpha), "train_samples": int(len(x)), "test_samples": int(len(test_y)),
            "predictions": logits.argmax(1)}
