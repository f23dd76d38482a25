"""Block-by-block CLIP / SigLIP losses (clipforge.objectives.chunked): the plain losses' values,
gradients and metrics, without the N x N logits in memory; the terms' ``chunk_size`` option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge.objectives import build_objective
from clipforge.objectives.base import build_term
from clipforge.objectives.chunked import clip_loss_chunked, siglip_loss_recomputed
from clipforge.objectives.contrastive import clip_logits, clip_loss, retrieval_accuracy
from clipforge.objectives.sigmoid import sigmoid_pair_metrics, siglip_logits, siglip_loss


def _pairs(n: int, d: int = 16, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(n, d, generator=g, dtype=dtype) + 0.5 * x.detach(), dim=-1).requires_grad_()
    return x, y, torch.tensor(7.0, dtype=dtype, requires_grad=True), torch.tensor(-3.0, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("chunk", [1, 5, 37, 100])  # one row, uneven blocks, exactly N, more than N
def test_chunked_clip_equals_the_plain_loss(chunk):
    x, y, t, _ = _pairs(37)
    want = clip_loss(x, y, t)
    want_grads = torch.autograd.grad(want, (x, y, t))
    got, accuracy = clip_loss_chunked(x, y, t, chunk)
    got_grads = torch.autograd.grad(got, (x, y, t))
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert accuracy.tolist() == pytest.approx([float(v) for v in retrieval_accuracy(clip_logits(x, y, t))])


@pytest.mark.parametrize("chunk", [1, 5, 37, 100])
def test_recomputed_siglip_equals_the_plain_loss(chunk):
    x, y, t, b = _pairs(37, seed=1)
    want = siglip_loss(x, y, t, b)
    want_grads = torch.autograd.grad(want, (x, y, t, b))
    got, stats = siglip_loss_recomputed(x, y, t, b, chunk)
    got_grads = torch.autograd.grad(got, (x, y, t, b))
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    for a, g in zip(got_grads, want_grads):
        torch.testing.assert_close(a, g, rtol=1e-10, atol=1e-12)
    metrics = sigmoid_pair_metrics(siglip_logits(x, y, t, b))
    assert stats.tolist() == pytest.approx([float(metrics[k]) for k in ("pos_logit", "neg_logit", "pair_acc")])


def _saved_elements(loss_fn) -> int:
    """Elements autograd keeps for backward while ``loss_fn`` builds its graph."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn()
    return total[0]


def test_no_n_by_n_tensor_is_kept_for_backward():
    n, d = 512, 16
    x, y, t, b = _pairs(n, d, dtype=torch.float32)
    assert _saved_elements(lambda: clip_loss(x, y, t)) >= n * n  # the plain losses keep the logits
    assert _saved_elements(lambda: siglip_loss(x, y, t, b)) >= n * n
    # the chunked ones keep the embeddings and two length-N vectors
    assert _saved_elements(lambda: clip_loss_chunked(x, y, t, 64)) <= 2 * n * d + 2 * n + 1
    assert _saved_elements(lambda: siglip_loss_recomputed(x, y, t, b, 64)) <= 2 * n * d + 2


def test_low_precision_embeddings_are_computed_in_float32():
    x, y, t, b = _pairs(24, dtype=torch.float32)
    xb, yb = x.detach().bfloat16().requires_grad_(), y.detach().bfloat16().requires_grad_()
    loss, _ = clip_loss_chunked(xb, yb, t, 7)
    loss.backward()
    assert loss.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16 and t.grad.dtype == torch.float32
    assert loss.item() == pytest.approx(clip_loss(xb.float(), yb.float(), t).item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the blocks stay float32
        inside, _ = siglip_loss_recomputed(x, y, t, b, 7)
    assert inside.item() == pytest.approx(siglip_loss(x, y, t, b).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_term_chunk_size_gives_the_plain_terms_loss_and_gradients(name):
    x, y, t, b = _pairs(40, dtype=torch.float32)
    outputs = {"image_embeds": x, "text_embeds": y, "logit_scale": t, "logit_bias": b}
    results = {}
    for chunk in (None, 9):
        objective = build_objective(type("Cfg", (), {"terms": [{"name": name, "chunk_size": chunk}]})())
        loss, metrics = objective(outputs, {})
        results[chunk] = (loss, torch.autograd.grad(loss, (x, y, t)), metrics)
    (plain, plain_grads, plain_metrics), (chunked, chunked_grads, chunked_metrics) = results[None], results[9]
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    for a, g in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, g, rtol=1e-4, atol=1e-6)
    assert set(chunked_metrics) == set(plain_metrics)
    for key in plain_metrics:
        assert float(chunked_metrics[key]) == pytest.approx(float(plain_metrics[key]), rel=1e-4, abs=1e-6), key


def test_chunk_size_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="label_smoothing=0.1 with chunk_size=8"):
        build_term({"name": "clip", "label_smoothing": 0.1, "chunk_size": 8})
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        build_term({"name": "siglip", "chunk_size": 0})
    x, y, t, b = _pairs(6, dtype=torch.float32)
    outputs = {"image_embeds": x, "text_embeds": y, "logit_scale": t, "logit_bias": b}
    owner = {"text_owner": torch.arange(6)}
    for name in ("clip", "siglip"):
        with pytest.raises(ValueError, match="several captions per image or sample weights"):
            build_term({"name": name, "chunk_size": 4})(outputs, owner)
    with pytest.raises(ValueError, match="one caption per image"):
        clip_loss_chunked(x, y[:4], t, 2)
