"""Fini et al.'s non-contrastive image-text variants (methods.md section 12, finding 3;
clipforge.methods.noncontrastive_lip): BarLIP's Barlow Twins loss and SwALIP's Sinkhorn codes against
their definitions written element by element, each step's total against CLIP 🚀's loss plus the weighted
new term (weight 0 = CLIP 🚀 exactly), the stop-gradients, BYOLIP's momentum model (equal to SiamLIP's
targets at initialisation, moved by the EMA after a step), 2 processes == 1, refusals, SIGKILL + resume."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from clipforge.config import RecipeError, load_recipe
from clipforge.methods.noncontrastive_lip import barlow_twins_loss, sinkhorn_codes, swapped_assignment_loss
from clipforge.objectives.selfsup import byol_loss

from test_clip_rocket import A, rocket_batch
from test_distributed import WORLD
from test_slip import TINY, build_tiny_step, with_frozen_bn

SMALL_HEADS = ["method.projector_hidden=32", "data.eda.synonyms=none"]
HEADS = {"barlip": ["method.head_hidden=24", "method.head_out=12"],
         "siamlip": ["method.head_hidden=24", "method.head_out=12"],
         "byolip": ["method.head_hidden=24", "method.head_out=12"], "swalip": []}


def build(method: str, *extra: str):
    return build_tiny_step(load_recipe(f"{method}-cifar", [*TINY, *SMALL_HEADS, *HEADS[method], *extra]))


def rocket_total(step, out, batch):
    """CLIP 🚀's loss on the same outputs (the parent class's compute_loss)."""
    from clipforge.methods.clip_rocket import ClipRocketStep

    return ClipRocketStep.compute_loss(step, out, batch)[0]


# ----------------------------------------------------------------------------- the losses, from their definitions
def test_barlow_twins_loss_is_its_definition_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    got = barlow_twins_loss(a, b, 0.3, 0.5)
    want = 0.0
    for k in range(4):
        for m in range(4):
            c = sum(a[n, k] * b[n, m] for n in range(7)) / 7
            want = want + ((c - 1) ** 2 if k == m else 0.3 * c**2)
    want = 0.5 * want
    assert torch.allclose(got.double(), want, rtol=1e-5)
    for x, y in zip(torch.autograd.grad(got, [a, b]), torch.autograd.grad(want, [a, b])):
        assert torch.allclose(x.double(), y, rtol=1e-4, atol=1e-8)
    # standardised, perfectly correlated and decorrelated dimensions: C = I, nothing to learn
    q, _ = torch.linalg.qr(torch.randn(8, 4, generator=g, dtype=torch.float64))
    z = q * math.sqrt(8)  # columns orthogonal with z^T z / N = I
    assert float(barlow_twins_loss(z, z, 5e-3, 0.025)) < 1e-10


def test_redundancy_floor_bounds_the_loss_once_aligned_and_wide_heads_are_warned():
    """With D > N the cross-correlation has rank <= N: once image and text agree (every C_kk = 1) the loss is
    still at least scale * lambda * D (D / N - 1); random aligned batches never go below it, and the
    whitest one (the N axes, each repeated D / N times) reaches it."""
    from clipforge.methods.noncontrastive_lip import BarlipConfig, redundancy_floor, warn_if_heads_outgrow_the_batch

    cfg = BarlipConfig(head_out=32, redundancy_weight=5e-3, loss_scale=0.025)
    n, d = 8, 32
    floor = redundancy_floor(cfg, n)
    assert math.isclose(floor, 0.025 * 5e-3 * 32 * 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # aligned (a == b), standardised per dimension: C_kk = 1
        z = torch.randn(n, d, generator=g, dtype=torch.float64)
        z = (z - z.mean(0)) / z.std(0, unbiased=False)
        assert float(barlow_twins_loss(z, z, 5e-3, 0.025)) >= floor - 1e-9
    # the N axes repeated D / N times (scaled so that C_kk = 1): z z^T / N = (D / N) I, the bound is met
    z = torch.eye(n, dtype=torch.float64).repeat(1, d // n) * math.sqrt(n)
    assert float(barlow_twins_loss(z, z, 5e-3, 0.025)) == pytest.approx(floor, rel=1e-6)  # float32 inside
    assert redundancy_floor(BarlipConfig(head_out=16), 16) == 0.0  # D <= N: no floor
    with pytest.warns(UserWarning, match=r"head_out = 2048 is more than twice the global batch \(128\).*about 256"):
        warn_if_heads_outgrow_the_batch(BarlipConfig(head_out=2048), 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_heads_outgrow_the_batch(BarlipConfig(head_out=256), 128)  # the recipe's ratio: no warning


def test_the_wide_heads_warning_comes_from_rank_zero_only(monkeypatch):
    """Under torchrun every rank builds the step: the warning is said once, by rank 0."""
    import clipforge.methods.noncontrastive_lip as nc

    wide = "method.head_out=4096"  # the tiny recipe's batch is far smaller
    with pytest.warns(UserWarning, match="more than twice the global batch"):
        build("barlip", wide)
    monkeypatch.setattr(nc, "active_rank", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build("barlip", wide)


def sinkhorn_by_the_code(scores, eps, iters):
    """SwAV's Sinkhorn-Knopp as the released code writes it, one process."""
    q = torch.exp(scores / eps).T
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def test_sinkhorn_codes_are_soft_assignments_with_equal_prototype_mass():
    g = torch.Generator().manual_seed(1)
    scores = F.normalize(torch.randn(6, 8, generator=g), dim=-1) @ F.normalize(torch.randn(5, 8, generator=g), dim=-1).T
    codes = sinkhorn_codes(scores, 0.05, 3)
    assert torch.allclose(codes, sinkhorn_by_the_code(scores, 0.05, 3), rtol=1e-5)
    assert torch.allclose(codes.sum(dim=1), torch.ones(6), atol=1e-5)  # each sample: one unit of assignment
    converged = sinkhorn_codes(scores, 0.05, 200)
    assert torch.allclose(converged.sum(dim=0), torch.full((5,), 6 / 5), rtol=1e-3)  # equal mass per prototype
    assert not converged.requires_grad


def test_swalip_loss_predicts_the_swapped_pairs_codes():
    g = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(5, 2, 6, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(5, 2, 6, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    s = torch.tensor(10.0, dtype=torch.float64)
    got = swapped_assignment_loss(images, texts, s, 0.05, 3)
    want = 0.0
    for i in range(2):
        for j in range(2):  # the released code's swap for two views: targets of the pair (1 - i, 1 - j)
            qi = sinkhorn_by_the_code((images[:, 1 - i] @ texts[:, 1 - j].T).detach(), 0.05, 3)
            qt = sinkhorn_by_the_code((texts[:, 1 - i] @ images[:, 1 - j].T).detach(), 0.05, 3)
            ce_i = -(qi * F.log_softmax(s * images[:, i] @ texts[:, j].T, dim=1)).sum(1).mean()
            ce_t = -(qt * F.log_softmax(s * texts[:, i] @ images[:, j].T, dim=1)).sum(1).mean()
            want = want + (ce_i + ce_t) / 2
    want = want / 4
    assert torch.allclose(got.double(), want, rtol=1e-5)
    for x, y in zip(torch.autograd.grad(got, [images, texts]), torch.autograd.grad(want, [images, texts])):
        assert torch.allclose(x.double(), y, rtol=1e-4, atol=1e-7)  # the codes carry no gradient


# ----------------------------------------------------------------------------- the steps
def test_barlip_step_adds_the_weighted_mean_over_the_global_and_view_pairs():
    step = build("barlip")
    batch = rocket_batch()
    out = step(batch)
    loss, metrics = step.compute_loss(out, batch)
    model = step.model
    image = model.visual(model.normalize_images(batch["images"]))["pooled"]
    text = model.text(batch["input_ids"], batch["attention_mask"])["pooled"]
    views_i = model.visual(model.normalize_images(batch["views"].flatten(0, 1)))["pooled"].view(6, A, -1)
    views_t = model.text(batch["text_view_input_ids"], batch["text_view_attention_mask"])["pooled"].view(6, A, -1)
    vi = [step.heads["image"](image)] + [step.view_heads["image"](views_i[:, k]) for k in range(A)]
    vt = [step.heads["text"](text)] + [step.view_heads["text"](views_t[:, k]) for k in range(A)]
    pairs = [(0, 0)] + [(1 + i, 1 + j) for i in range(A) for j in range(A)]
    nc = sum(barlow_twins_loss(vi[i], vt[j], 5e-3, 0.025) for i, j in pairs) / len(pairs)
    assert torch.allclose(metrics["barlip/loss"], nc.detach(), rtol=1e-5)
    assert torch.allclose(loss, rocket_total(step, out, batch) + 0.5 * nc, rtol=1e-5)
    loss.backward()
    for name in ("heads.image.0.weight", "view_heads.text.0.weight", "image_view_projector.0.weight",
                 "model.text.blocks.0.attn.qkv.weight", "model.visual.blocks.0.attn.qkv.weight"):
        grad = dict(step.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    shared = build("barlip", "method.separate_heads=false")
    assert not hasattr(shared, "view_heads")
    out = shared(batch)
    assert torch.allclose(out["heads"]["image"][1], shared.heads["image"](views_i[:, 0].detach()), atol=1e-5)


@pytest.mark.parametrize("method", ["barlip", "siamlip", "byolip", "swalip"])
def test_weight_zero_is_clip_rocket_exactly(method):
    step = build(method, "method.weight=0")
    batch = rocket_batch()
    out = step(batch)
    loss, metrics = step.compute_loss(out, batch)
    assert torch.equal(loss, rocket_total(step, out, batch))
    assert f"{method}/loss" in metrics and metrics[f"{method}/loss"] > 0
    step.eval()  # eval mode is the plain model: no views, no heads
    out = step(batch)
    assert "heads" not in out and "view_embeds" not in out


def test_siamlip_predicts_the_other_modalitys_stop_gradient_projection():
    step = build("siamlip")
    batch = rocket_batch()
    out = step(batch)
    p, v = out["predictions"], out["heads"]
    assert out["targets"] is v  # SiamLIP's targets are the online projections ...
    pairs = [(0, 0)] + [(1 + i, 1 + j) for i in range(A) for j in range(A)]
    want = sum(byol_loss(p["image"][i], v["text"][j]) + byol_loss(p["text"][j], v["image"][i])
               for i, j in pairs) / (2 * len(pairs))
    loss, metrics = step.compute_loss(out, batch)
    assert torch.allclose(metrics["siamlip/loss"], want.detach(), rtol=1e-6)
    # ... under stop-gradient: the projection v reaches the term only through its own prediction p = q(v)
    nc = step.noncontrastive_loss(out)
    v_text, p_text = v["text"][0], p["text"][0]
    grad_v, grad_p = torch.autograd.grad(nc, [v_text, p_text], retain_graph=True)
    through_prediction, = torch.autograd.grad(p_text, v_text, grad_p, retain_graph=True)
    assert grad_p.abs().sum() > 0
    assert torch.allclose(grad_v, through_prediction, atol=1e-9)


def test_byolip_targets_come_from_the_momentum_model_and_follow_it():
    siam, byol = build("siamlip"), build("byolip")
    batch = rocket_batch()
    # at initialisation the momentum model is the model: BYOLIP's targets and loss are SiamLIP's
    s_out, b_out = siam(batch), byol(batch)
    for m in ("image", "text"):
        for s_v, b_v in zip(s_out["targets"][m], b_out["targets"][m]):
            assert torch.allclose(s_v, b_v, atol=1e-5) and not b_v.requires_grad
    s_loss, _ = siam.compute_loss(s_out, batch)
    b_loss, _ = byol.compute_loss(b_out, batch)
    assert torch.allclose(s_loss, b_loss, rtol=1e-5)
    # after an update the momentum projectors move by (1 - 0.99) towards the online ones
    before = byol.ema_heads["image"][0].weight.clone()
    with torch.no_grad():
        byol.heads["image"][0].weight.add_(1.0)
    byol.after_optimizer_step(1)
    online = byol.heads["image"][0].weight
    assert torch.allclose(byol.ema_heads["image"][0].weight, 0.99 * before + 0.01 * online, atol=1e-6)
    assert not byol.after_step_keeps_no_state()
    names = byol.method_state_dict(byol.state_dict())
    assert "ema_heads.image.0.weight" in names and "ema_view_heads.text.0.weight" in names
    assert not any(p.requires_grad for p in byol.ema_heads.parameters())


def test_swalip_step_adds_the_swapped_prediction_on_the_view_embeddings():
    step = build("swalip")
    batch = rocket_batch()
    out = step(batch)
    loss, metrics = step.compute_loss(out, batch)
    swav = swapped_assignment_loss(*out["view_embeds"], out["view_logit_scale"], 0.05, 3)
    assert torch.allclose(loss, rocket_total(step, out, batch) + 0.1 * swav, rtol=1e-6)
    assert step.cfg.label_smoothing == 0.0
    assert step.after_step_keeps_no_state()


def test_refusals_say_what_to_change():
    with pytest.raises(RecipeError, match="kind = \"ema\""):
        load_recipe("siamlip-cifar", ["method.name=byolip"])
    with pytest.raises(RecipeError, match="data.ssl_views = data.text_views >= 2"):
        load_recipe("swalip-cifar", ["data.ssl_views=1", "data.text_views=1"])
    with pytest.raises(RecipeError, match="method 'barlip' pairs A augmented image views"):
        load_recipe("barlip-cifar", ["data.text_views=0"])
    with pytest.raises(RecipeError, match="gradcache"):
        load_recipe("siamlip-cifar", ["train.accum_mode=gradcache"])


# ----------------------------------------------------------------------------- 2 ranks == 1 process
def _build_frozen(method):
    return lambda: with_frozen_bn(build(method, "model.patch_dropout=0"))


def _worker(rank, port, results, method):
    from test_method_distributed import one_step_on_rank

    full = rocket_batch(2 * WORLD)
    half = {k: v[rank * 2:(rank + 1) * 2] for k, v in full.items()}
    for key in ("text_view_input_ids", "text_view_attention_mask"):
        half[key] = full[key][rank * 2 * A:(rank + 1) * 2 * A]
    one_step_on_rank(rank, port, results, _build_frozen(method), half)


def _barlip_worker(rank, port, results):
    _worker(rank, port, results, "barlip")


def _swalip_worker(rank, port, results):
    _worker(rank, port, results, "swalip")


@pytest.mark.parametrize("method,worker", [("barlip", _barlip_worker), ("swalip", _swalip_worker)])
def test_two_ranks_equal_one_process(tmp_path, method, worker):
    """The gathered cross-correlation (BarLIP) and the Sinkhorn normalisation across ranks (SwALIP)."""
    from test_method_distributed import assert_same_as_one_process, run_step, two_ranks_report

    got = two_ranks_report(tmp_path, worker)
    step = _build_frozen(method)()
    want_loss, want = run_step(step, step, rocket_batch(2 * WORLD))
    assert_same_as_one_process(got, want_loss, want, tol=1e-5)


@pytest.mark.slow
def test_byolip_sigkill_then_resume_is_exact(tmp_path):
    from test_method_resume import check_kill_and_resume

    check_kill_and_resume(tmp_path, "byolip-cifar", "[method]\nprojector_hidden = 32\nhead_hidden = 24\n", 12, 6,
                          "--set", "data.train=shapes", "--set", "data.eda.synonyms=none")
