"""TinyCLIP automatic inheritance, the building blocks (methods.md section 4 checklist): hard-concrete
gates, expected sparsity, the Lagrangian penalty and the target warm-up."""

from __future__ import annotations

import torch

from clipforge.models.l0 import (
    HardConcreteGates,
    LagrangianPenalty,
    expected_tower_params,
    full_tower_params,
    target_sparsity,
)

L, H, HD, M, D = 3, 4, 8, 64, 32


def _gates(seed: int = 0) -> dict[str, HardConcreteGates]:
    torch.manual_seed(seed)
    gates = {"mha": HardConcreteGates(L), "ffn": HardConcreteGates(L), "heads": HardConcreteGates(L * H),
             "units": HardConcreteGates(L * M), "hidden": HardConcreteGates(D)}
    with torch.no_grad():
        for g in gates.values():
            g.log_alpha.add_(torch.randn_like(g.log_alpha))
    return gates


def _sparsity(gates: dict[str, HardConcreteGates]) -> torch.Tensor:
    p = {k: g.prob_nonzero() for k, g in gates.items()}
    expected = expected_tower_params(p["mha"], p["ffn"], p["heads"].view(L, H), p["units"].view(L, M), p["hidden"], HD)
    return 1 - expected / full_tower_params(L, H, HD, M, D)


def test_gates_are_hard_concrete_in_training_and_deterministic_in_eval():
    torch.manual_seed(0)
    g = HardConcreteGates(10_000, init_keep=0.5)
    z = g()
    assert z.min() == 0 and z.max() == 1 and ((z > 0) & (z < 1)).any()  # the stretch gives exact 0s and 1s
    # the share of non-zero samples is P(z > 0)
    assert abs(float((z > 0).float().mean()) - float(g.prob_nonzero()[0].detach())) < 0.02
    g.eval()
    assert torch.equal(g(), g())


def test_one_gate_of_a_set_stays_open_in_eval_however_closed_they_all_are():
    """A tower has 2-12 width groups and blocks: closing all of them would leave no model to prune to."""
    g = HardConcreteGates(3, init_keep=0.5)
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor([-9.0, -8.0, -10.0]))  # P(z > 0) ~ 0 for each
    g.eval()
    z = g()
    assert (z > 0).tolist() == [False, True, False]  # the highest-scored one
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor([-9.0, 9.0, 9.0]))
    assert (g() > 0).tolist() == [False, True, True]  # otherwise as CoFi: round(sum(1 - P)) closed


def test_expected_sparsity_is_monotone_in_log_alpha():
    gates = _gates()
    values = []
    for shift in (-3.0, -1.0, 0.0, 1.0, 3.0):
        shifted = _gates()
        with torch.no_grad():
            for g in shifted.values():
                g.log_alpha.add_(shift)
        values.append(_sparsity(shifted).item())
    assert all(a > b for a, b in zip(values, values[1:])), values  # more open gates, less sparsity
    # and gate by gate: d sparsity / d log_alpha <= 0 everywhere, < 0 for every gate
    _sparsity(gates).backward()
    for name, g in gates.items():
        assert (g.log_alpha.grad < 0).all(), name
    all_open = {k: HardConcreteGates(g.log_alpha.numel(), init_keep=0.999999) for k, g in gates.items()}
    assert abs(_sparsity(all_open).item()) < 1e-4  # every gate open: nothing removed


def test_penalty_is_zero_once_the_expected_sparsity_reaches_the_target():
    penalty = LagrangianPenalty()
    with torch.no_grad():
        penalty.lambda_1.fill_(0.7)
        penalty.lambda_2.fill_(0.3)
    s = _sparsity(_gates())
    assert penalty(s, s.item() - 0.05).item() == 0.0
    assert penalty(s, s.item()).item() == 0.0
    gap = 0.2
    expected = 0.7 * gap + 0.3 * gap * gap
    assert abs(penalty(s, s.item() + gap).item() - expected) < 1e-6


def test_lambda_gradients_have_the_opposite_sign_to_the_models():
    gates, penalty = _gates(), LagrangianPenalty()
    with torch.no_grad():
        penalty.lambda_1.fill_(0.5)
        penalty.lambda_2.fill_(0.5)
    s = _sparsity(gates)
    target = s.item() + 0.3
    penalty(s, target).backward()
    gap = target - s.item()
    # d penalty / d lambda is (gap, gap^2) > 0; the lambdas get its negative: a descent step raises them
    assert torch.allclose(penalty.lambda_1.grad, torch.tensor(-gap)) and penalty.lambda_2.grad < 0
    # the gates get the true gradient: a descent step lowers log_alpha, i.e. prunes more
    assert all((g.log_alpha.grad > 0).all() for g in gates.values())
    opt = torch.optim.SGD([*penalty.parameters(), *(g.log_alpha for g in gates.values())], lr=0.5)
    opt.step()
    assert penalty.lambda_1.item() > 0.5 and _sparsity(gates).item() > s.item()


def test_target_sparsity_warms_up_linearly():
    assert [target_sparsity(s, 0.5, 100) for s in (0, 50, 100, 400)] == [0.0, 0.25, 0.5, 0.5]
    assert target_sparsity(10, 0.6, 100, start=0.2) == 0.2 + 0.4 * 0.1
    assert target_sparsity(0, 0.5, 0) == 0.5
