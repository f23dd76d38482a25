"""Objective terms against slow, obvious references (values and gradients) and the methods.md checklists."""

from __future__ import annotations

import math
import typing

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel

from clipforge.config import ObjectiveConfig, load_recipe
from clipforge.objectives import (
    TERMS,
    ClipLoss,
    Objective,
    SigLipLoss,
    Term,
    build_objective,
    build_term,
    clip_logits,
    clip_loss,
    sigmoid_pair_loss_sum,
    siglip_logits,
    siglip_loss,
    siglip_loss_chunked,
)
from clipforge.objectives.contrastive import retrieval_accuracy

DTYPE = torch.float64


# ----------------------------------------------------------------------------- helpers
def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=DTYPE), dim=-1)


def leaf(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=DTYPE).clone().requires_grad_(True)


def similarity(x, y, i: int, j: int):
    return sum(x[i][k] * y[j][k] for k in range(len(x[i])))


def reference_clip_loss(x, y, t, eps=0.0, exp=torch.exp, log=torch.log):
    """Loops over i, j; target (1 - eps) * onehot + eps / B. Works on nested float lists (math) or tensors (autograd)."""
    n = len(x)
    logits = [[t * similarity(x, y, i, j) for j in range(n)] for i in range(n)]

    def cross_entropy(rows):
        total = 0.0
        for i, row in enumerate(rows):
            log_norm = log(sum(exp(v) for v in row))
            for j, v in enumerate(row):
                target = (1 - eps) * (i == j) + eps / n
                total = total - target * (v - log_norm)
        return total / n

    columns = [[logits[i][j] for i in range(n)] for j in range(n)]
    return 0.5 * (cross_entropy(logits) + cross_entropy(columns))


def reference_siglip_loss(x, y, t, b, exp=torch.exp, log=torch.log):
    """-(1/B) sum_ij log sigmoid(z_ij (t s_ij + b)), written as log(1 + exp(-z L)) pair by pair."""
    n = len(x)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total + log(1 + exp(-z * (t * similarity(x, y, i, j) + b)))
    return total / n


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def assert_all_close(actual, expected, rtol=1e-10, atol=1e-12):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def clip_outputs(x, y, t, b=None):
    outputs = {"image_embeds": x, "text_embeds": y, "logit_scale": t}
    if b is not None:
        outputs["logit_bias"] = b
    return outputs


# ----------------------------------------------------------------------------- CLIP
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_clip_loss_value_matches_math_loop(eps):
    x, y = unit_rows(5, 4, 0), unit_rows(5, 4, 1)
    expected = reference_clip_loss(x.tolist(), y.tolist(), 3.0, eps, exp=math.exp, log=math.log)
    actual = clip_loss(x, y, torch.tensor(3.0, dtype=DTYPE), label_smoothing=eps)
    assert actual.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_clip_loss_gradients_match_loop(eps):
    x, y, t = leaf(unit_rows(5, 4, 2)), leaf(unit_rows(5, 4, 3)), leaf(3.0)
    expected = grads(reference_clip_loss(x, y, t, eps), [x, y, t])
    actual = grads(clip_loss(x, y, t, label_smoothing=eps), [x, y, t])
    assert_all_close(actual, expected)


def test_clip_label_smoothing_changes_the_loss():
    x, y, t = unit_rows(6, 8, 4), unit_rows(6, 8, 5), torch.tensor(5.0, dtype=DTYPE)
    assert clip_loss(x, y, t, 0.1).item() != pytest.approx(clip_loss(x, y, t, 0.0).item(), rel=1e-6)


def test_clip_identical_features_and_large_scale_give_zero_loss():
    x = unit_rows(8, 64, 6)
    assert clip_loss(x, x.clone(), torch.tensor(1000.0, dtype=DTYPE)).item() < 1e-8
    assert clip_loss(x, x.clone(), torch.tensor(1.0, dtype=DTYPE)).item() > 0.1  # small t: not zero


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_clip_all_equal_logits_give_log_batch(eps):
    n = 7
    x = unit_rows(1, 16, 7).expand(n, 16)
    y = unit_rows(1, 16, 8).expand(n, 16)
    loss = clip_loss(x, y, torch.tensor(14.3, dtype=DTYPE), label_smoothing=eps)
    assert loss.item() == pytest.approx(math.log(n), rel=1e-12)


def test_clip_invariant_to_permuting_aligned_pairs():
    x, y, t = unit_rows(9, 8, 9), unit_rows(9, 8, 10), torch.tensor(7.0, dtype=DTYPE)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clip_loss(x[perm], y[perm], t), clip_loss(x, y, t), rtol=1e-12, atol=0)
    # misaligning the pairs must change the loss
    assert clip_loss(x[perm], y, t).item() != pytest.approx(clip_loss(x, y, t).item(), rel=1e-6)


def test_clip_equals_mean_of_two_cross_entropies():
    x, y, t = unit_rows(6, 8, 11), unit_rows(6, 8, 12), torch.tensor(5.0, dtype=DTYPE)
    logits = t * x @ y.T
    labels = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(clip_loss(x, y, t), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(clip_logits(x, y, t), logits, rtol=1e-12, atol=0)


def test_clip_term_metrics():
    x = unit_rows(6, 32, 13)
    y = x[[1, 0, 2, 3, 4, 5]]  # first two captions swapped
    loss, metrics = ClipLoss()(clip_outputs(x, y, torch.tensor(50.0, dtype=DTYPE)), {})
    assert metrics["i2t_acc"] == pytest.approx(4 / 6)
    assert metrics["t2i_acc"] == pytest.approx(4 / 6)
    assert metrics["logit_scale"] == 50.0
    assert "loss" not in metrics
    torch.testing.assert_close(loss, clip_loss(x, y, torch.tensor(50.0, dtype=DTYPE)))


def test_retrieval_accuracy_counts_rows_and_columns_separately():
    logits = torch.tensor([[5.0, 0.0, 0.0], [4.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    # image 1 picks text 0 (wrong); every text's best image is its own
    assert retrieval_accuracy(logits) == pytest.approx((2 / 3, 1.0))


def test_clip_term_rejects_bad_label_smoothing():
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        ClipLoss(label_smoothing=1.0)


# ----------------------------------------------------------------------------- SigLIP
def test_siglip_loss_value_matches_math_loop():
    x, y = unit_rows(5, 4, 20), unit_rows(5, 4, 21)
    expected = reference_siglip_loss(x.tolist(), y.tolist(), 4.0, -2.0, exp=math.exp, log=math.log)
    actual = siglip_loss(x, y, torch.tensor(4.0, dtype=DTYPE), torch.tensor(-2.0, dtype=DTYPE))
    assert actual.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("t, b", [(4.0, -2.0), (10.0, -10.0)])
def test_siglip_loss_gradients_match_loop(t, b):
    x, y, t, b = leaf(unit_rows(5, 4, 22)), leaf(unit_rows(5, 4, 23)), leaf(t), leaf(b)
    expected = grads(reference_siglip_loss(x, y, t, b), [x, y, t, b])
    actual = grads(siglip_loss(x, y, t, b), [x, y, t, b])
    assert_all_close(actual, expected)


def test_siglip_equals_bce_over_all_pairs_divided_by_batch():
    x, y = unit_rows(7, 8, 24), unit_rows(7, 8, 25)
    t, b = torch.tensor(10.0, dtype=DTYPE), torch.tensor(-10.0, dtype=DTYPE)
    logits = t * x @ y.T + b
    expected = F.binary_cross_entropy_with_logits(logits, torch.eye(7, dtype=DTYPE), reduction="sum") / 7
    torch.testing.assert_close(siglip_loss(x, y, t, b), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(siglip_logits(x, y, t, b), logits, rtol=1e-12, atol=1e-12)


def test_siglip_at_init_is_dominated_by_positives():
    n = 6
    eye = torch.eye(2 * n, dtype=DTYPE)
    x, y = eye[:n], eye[n:]  # orthogonal: every similarity is exactly 0
    loss = siglip_loss(x, y, torch.tensor(10.0, dtype=DTYPE), torch.tensor(-10.0, dtype=DTYPE)).item()
    # positive: -log sigmoid(-10) = log(1 + e^10); each of the B-1 negatives: -log sigmoid(10) = log(1 + e^-10)
    expected = math.log1p(math.exp(10)) + (n - 1) * math.log1p(math.exp(-10))
    assert loss == pytest.approx(expected, rel=1e-13)
    assert loss == pytest.approx(10 + n * math.exp(-10), rel=1e-7)
    assert abs(loss - n * math.log(2)) > 5


def test_siglip_is_stable_for_large_logits():
    x = unit_rows(4, 8, 26)
    loss = siglip_loss(x, x.clone(), torch.tensor(1e4, dtype=torch.float32), torch.tensor(-10.0))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("num_chunks", [1, 2, 3, 4, 8])
def test_siglip_chunked_equals_full_values_and_gradients(num_chunks):
    x, y, t, b = leaf(unit_rows(8, 6, 27)), leaf(unit_rows(8, 6, 28)), leaf(10.0), leaf(-10.0)
    full = siglip_loss(x, y, t, b)
    chunked = siglip_loss_chunked(x, y, t, b, num_chunks)
    torch.testing.assert_close(chunked, full, rtol=1e-10, atol=0)
    assert_all_close(grads(chunked, [x, y, t, b]), grads(full, [x, y, t, b]), rtol=1e-10, atol=1e-12)


def test_siglip_chunked_rejects_bad_chunk_count():
    x = unit_rows(4, 4, 29)
    with pytest.raises(ValueError, match="num_chunks must be in 1..4"):
        siglip_loss_chunked(x, x, torch.tensor(10.0), torch.tensor(-10.0), 5)


def test_off_diagonal_blocks_use_only_negative_labels():
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(30), dtype=DTYPE)
    negatives = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="sum")
    torch.testing.assert_close(sigmoid_pair_loss_sum(logits, positives_on_diagonal=False), negatives)
    # and the chunked loss is exactly: own block with eye targets + other blocks with zero targets
    x, y = unit_rows(6, 5, 31), unit_rows(6, 5, 32)
    t, b = torch.tensor(10.0, dtype=DTYPE), torch.tensor(-10.0, dtype=DTYPE)
    expected = 0.0
    for d in range(2):
        for j in range(2):
            block = t * x[3 * d : 3 * d + 3] @ y[3 * j : 3 * j + 3].T + b
            target = torch.eye(3, dtype=DTYPE) if d == j else torch.zeros(3, 3, dtype=DTYPE)
            expected += F.binary_cross_entropy_with_logits(block, target, reduction="sum") / 6
    torch.testing.assert_close(siglip_loss_chunked(x, y, t, b, 2), expected, rtol=1e-12, atol=0)


def test_siglip_term_metrics():
    x = unit_rows(4, 32, 33)
    t, b = torch.tensor(10.0, dtype=DTYPE), torch.tensor(-5.0, dtype=DTYPE)
    loss, metrics = SigLipLoss()(clip_outputs(x, x.clone(), t, b), {})
    logits = t * x @ x.T + b
    off_diagonal = logits[~torch.eye(4, dtype=torch.bool)]
    assert metrics["pos_logit"] == pytest.approx(5.0)  # t * 1 + b
    assert metrics["neg_logit"] == pytest.approx(off_diagonal.mean().item())
    assert metrics["pair_acc"] == pytest.approx((4 + (off_diagonal < 0).sum().item()) / 16)
    assert metrics["logit_scale"] == 10.0 and metrics["logit_bias"] == -5.0
    torch.testing.assert_close(loss, siglip_loss(x, x, t, b))


def test_siglip_term_without_bias_says_how_to_fix():
    x = unit_rows(4, 8, 34)
    with pytest.raises(ValueError, match=r"'logit_bias'.*model\.logit_bias_init"):
        SigLipLoss()(clip_outputs(x, x, torch.tensor(10.0, dtype=DTYPE)), {})


def test_low_precision_embeddings_give_float32_loss():
    x, y = unit_rows(8, 16, 35), unit_rows(8, 16, 36)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    for loss_fn, args in [(clip_loss, (t,)), (siglip_loss, (t, b))]:
        low = loss_fn(x.bfloat16(), y.bfloat16(), *args)
        assert low.dtype == torch.float32
        assert low.item() == pytest.approx(loss_fn(x, y, *(a.double() for a in args)).item(), rel=2e-2)


# ----------------------------------------------------------------------------- objective
def test_objective_total_is_weighted_sum_of_terms():
    x, y, t, b = leaf(unit_rows(6, 8, 40)), leaf(unit_rows(6, 8, 41)), leaf(10.0), leaf(-10.0)
    objective = Objective([ClipLoss(weight=0.5, label_smoothing=0.1), SigLipLoss(weight=2.0)])
    total, metrics = objective(clip_outputs(x, y, t, b), {})
    manual = 0.5 * clip_loss(x, y, t, 0.1) + 2.0 * siglip_loss(x, y, t, b)
    torch.testing.assert_close(total, manual, rtol=1e-12, atol=0)
    assert_all_close(grads(total, [x, y, t, b]), grads(manual, [x, y, t, b]))
    assert metrics["loss"] == pytest.approx(manual.item(), rel=1e-12)
    assert metrics["clip/loss"] == pytest.approx(clip_loss(x, y, t, 0.1).item(), rel=1e-12)
    assert metrics["siglip/loss"] == pytest.approx(siglip_loss(x, y, t, b).item(), rel=1e-12)
    assert {"clip/i2t_acc", "clip/logit_scale", "siglip/pos_logit", "siglip/logit_bias"} <= set(metrics)


def test_zero_weight_term_is_logged_but_gives_no_gradient():
    x, y, t, b = leaf(unit_rows(6, 8, 42)), leaf(unit_rows(6, 8, 43)), leaf(10.0), leaf(-10.0)
    total, metrics = Objective([ClipLoss(), SigLipLoss(weight=0.0)])(clip_outputs(x, y, t, b), {})
    assert metrics["siglip/loss"] == pytest.approx(siglip_loss(x, y, t, b).item(), rel=1e-12)
    torch.testing.assert_close(total, clip_loss(x, y, t), rtol=1e-12, atol=0)
    (bias_grad,) = torch.autograd.grad(total, [b], allow_unused=True)
    assert bias_grad is None  # the siglip term never entered the graph


class GradModeSpy(Term):
    """A term that records whether autograd was on when it ran."""

    name = "spy"

    def forward(self, outputs, batch):
        self.grad_enabled = torch.is_grad_enabled()
        return outputs["image_embeds"].sum(), {}


def test_zero_weight_term_runs_without_autograd():
    x, t = leaf(unit_rows(4, 8, 45)), leaf(10.0)
    logged, trained = GradModeSpy(weight=0.0), GradModeSpy(weight=1.0)
    Objective([logged, trained])(clip_outputs(x, x, t), {})
    assert logged.grad_enabled is False and trained.grad_enabled is True


def test_objective_rejects_all_zero_weights():
    with pytest.raises(ValueError, match="weight > 0"):
        Objective([ClipLoss(weight=0.0)])


def test_repeated_term_names_get_distinct_metric_keys():
    x, t = unit_rows(4, 8, 44), torch.tensor(10.0, dtype=DTYPE)
    _, metrics = Objective([ClipLoss(), ClipLoss(label_smoothing=0.1)])(clip_outputs(x, x, t), {})
    assert metrics["clip/loss"] != metrics["clip_2/loss"]


def test_build_objective_from_recipe_with_two_terms(tmp_path):
    recipe_file = tmp_path / "two-terms.toml"
    recipe_file.write_text(
        'base = "tiny-shapes"\n'
        "[model]\nlogit_scale_init = 2.302585\nlogit_bias_init = -10.0\n"
        '[[objective.terms]]\nname = "siglip"\n'
        '[[objective.terms]]\nname = "clip"\nweight = 0.25\nlabel_smoothing = 0.1\n'
    )
    objective = build_objective(load_recipe(str(recipe_file)).objective)
    siglip, clip = objective.terms
    assert isinstance(siglip, SigLipLoss) and siglip.weight == 1.0
    assert isinstance(clip, ClipLoss) and clip.weight == 0.25 and clip.label_smoothing == 0.1
    assert (SigLipLoss.scope, ClipLoss.scope) == ("ring", "gathered")


def test_default_objective_is_clip():
    (term,) = build_objective(ObjectiveConfig()).terms
    assert isinstance(term, ClipLoss) and term.weight == 1.0 and term.label_smoothing == 0.0


def test_unknown_term_name_lists_registered_terms():
    class NoSuchTerm(BaseModel):
        name: str = "nosuchterm"
        weight: float = 1.0

    # other test modules may have registered terms of their own: the shipped ones must be listed
    with pytest.raises(ValueError, match=r"unknown objective term 'nosuchterm'.*Registered terms: (.*, )?clip, (.*, )?filip, (.*, )?siglip"):
        build_term(NoSuchTerm())


def test_every_registered_term_carries_its_config():
    # the recipe schema is built from the registry: each term's Config names the term
    for name, cls in TERMS.items():
        assert cls.Config.model_validate({"name": name}).name == name
