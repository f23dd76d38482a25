"""Hard-concrete L0 gates and the Lagrangian sparsity control of TinyCLIP's automatic inheritance
(CoFi-style; methods.md section 4). The building blocks; clipforge/methods/tinyclip_prune.py wires
them into training and pruning.

Gate (Louizos et al. 2018): u ~ U(0, 1), s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
z = clamp(s * (r - l) + l, 0, 1) with beta = 2/3 and stretch (l, r) = (-0.1, 1.1), so z is exactly 0
or 1 with positive probability. P(z > 0) = sigmoid(log_alpha - beta * log(-l / r)).

Sparsity: the expected fraction of prunable parameters removed, from the gates' P(z > 0) (a
structure's expected parameter count is its size times the probabilities of the gates it sits
under, e.g. a head under its layer's MHA gate).

Control: penalty = lambda_1 (t - s) + lambda_2 (t - s)^2 while the expected sparsity s is below the
target t (0 once s >= t, as in TinyCLIP's code); the lambdas are trained by gradient *ascent*, here
by reversing their gradient so one ordinary optimiser minimises the model and maximises the lambdas.
The target warms up linearly from ``start`` to ``target`` over ``warmup_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

TEMPERATURE = 2.0 / 3.0
STRETCH = (-0.1, 1.1)


class HardConcreteGates(nn.Module):
    """``n`` independent hard-concrete gates with learnable ``log_alpha``."""

    def __init__(self, n: int, init_keep: float = 0.9, temperature: float = TEMPERATURE,
                 stretch: tuple[float, float] = STRETCH):
        super().__init__()
        if not 0.0 < init_keep < 1.0:
            raise ValueError(f"init_keep is a probability in (0, 1), got {init_keep}")
        self.temperature, (self.low, self.high) = temperature, stretch
        # log_alpha such that the deterministic gate starts near init_keep (CoFi's droprate_init)
        self.log_alpha = nn.Parameter(torch.full((n,), math.log(init_keep / (1 - init_keep))))

    def prob_nonzero(self) -> Tensor:
        """P(z > 0) per gate: sigmoid(log_alpha - beta * log(-l / r))."""
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-self.low / self.high))

    def forward(self) -> Tensor:
        """Sampled gates in training mode, deterministic ones in eval mode (``deterministic``)."""
        if not self.training:
            return self.deterministic()
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.temperature)
        return (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def deterministic(self) -> Tensor:
        """CoFi's test-time gates: as many closed (exactly 0) as expected, round(sum(1 - P(z > 0))),
        the lowest-scored ones; the others keep the soft value sigmoid(0.8 log_alpha / beta). One gate
        of a set always stays open: with whole head groups and blocks as gates (2-12 per tower) closing all
        would leave a tower with no width or no block, which is no model."""
        soft = torch.sigmoid(self.log_alpha / self.temperature * 0.8)
        n = self.log_alpha.numel()
        closed = min(n - int(torch.round(self.prob_nonzero().sum())), n - 1)
        if closed > 0:
            soft = soft.clone()
            soft[torch.topk(soft, closed, largest=False).indices] = 0.0
        return soft


def expected_tower_params(layer_mha: Sequence, layer_ffn: Sequence, heads: Sequence, units: Sequence, hidden: Tensor,
                          head_dim: int) -> Tensor:
    """Expected prunable parameters of one transformer tower from its gates' P(z > 0).

    Per layer l: layer_mha[l], layer_ffn[l] (the sublayers' gates), heads[l] (H_l) and units[l] (M_l), None
    for a layer without that sublayer; hidden: D, shared by every layer. A head holds 4 * head_dim * D
    weights (q, k, v rows and proj columns) and an MLP unit 2 * D, scaled by the expected width
    E[D] = sum(P(hidden)) (biases and LayerNorms are left out, as in CoFi).
    """
    width = hidden.sum()
    total = hidden.new_zeros(())
    for mha, ffn, h, u in zip(layer_mha, layer_ffn, heads, units):
        if h is not None:
            total = total + mha * h.sum() * 4 * head_dim * width
        if u is not None:
            total = total + ffn * u.sum() * 2 * width
    return total


def full_tower_params(layers: int, heads: int, head_dim: int, units: int, width: int) -> int:
    """The same count with every gate open."""
    return layers * (heads * 4 * head_dim * width + units * 2 * width)


def target_sparsity(step: int, target: float, warmup_steps: int, start: float = 0.0) -> float:
    """Linear warm-up of the target from ``start`` to ``target`` over ``warmup_steps``."""
    if warmup_steps <= 0:
        return target
    return start + (target - start) * min(1.0, step / warmup_steps)


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return -grad


class LagrangianPenalty(nn.Module):
    """lambda_1 (t - s) + lambda_2 (t - s)^2, zero once the expected sparsity s reaches the target t.

    The lambdas see the negated gradient: a minimising optimiser raises them while s < t (the
    penalty grows until the gates give way), which is TinyCLIP's ascent with lr -0.02.
    """

    def __init__(self):
        super().__init__()
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))

    def forward(self, expected_sparsity: Tensor, target: float) -> Tensor:
        gap = target - expected_sparsity
        if float(gap.detach()) <= 0:  # the target is met: no push in either direction
            return expected_sparsity.new_zeros(()) + 0.0 * (self.lambda_1 + self.lambda_2)
        l1, l2 = _ReverseGrad.apply(self.lambda_1), _ReverseGrad.apply(self.lambda_2)
        return l1 * gap + l2 * gap * gap
