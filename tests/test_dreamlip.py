"""DreamLIP (methods.md section 7): the multi-positive loss and the sub-caption grouping loss against slow,
obvious references (values and gradients), the checklist, 2 gloo processes == 1 process, exact resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.objectives.contrastive import clip_logits, clip_loss, multi_positive_clip_loss
from clipforge.objectives.dreamlip import DreamlipGrouping, SubCaptionClip, grouped_features, grouping_weights

from test_distributed import WORLD

SUB = 2  # caption_kind of a sub-caption


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


# ----------------------------------------------------------------------------- multi-positive
def paper_multi_positive(images, texts, owner, t):
    """L_mp of the paper, row by row: image i against all texts, averaged over its positives; plus each
    text against all images with its owner as the label; the two directions averaged."""
    image_side = []
    for i in range(images.shape[0]):
        scores = [t * images[i] @ texts[j] for j in range(texts.shape[0])]
        log_norm = torch.logsumexp(torch.stack(scores), 0)
        positives = [j for j in range(texts.shape[0]) if owner[j] == i]
        image_side.append(-sum(scores[p] - log_norm for p in positives) / len(positives))
    text_side = []
    for j in range(texts.shape[0]):
        scores = torch.stack([t * texts[j] @ images[i] for i in range(images.shape[0])])
        text_side.append(-(scores[owner[j]] - torch.logsumexp(scores, 0)))
    return (torch.stack(image_side).mean() + torch.stack(text_side).mean()) / 2


def test_multi_positive_loss_matches_the_paper_form_in_value_and_gradient():
    images = unit(4, 8, seed=1).requires_grad_()
    texts = unit(12, 8, seed=2).requires_grad_()
    owner = torch.arange(4).repeat_interleave(3)
    t = torch.tensor(7.0, dtype=torch.float64)
    got = multi_positive_clip_loss(clip_logits(images, texts, t), clip_logits(texts, images, t), owner)
    want = paper_multi_positive(images, texts, owner, t)
    assert torch.allclose(got, want, rtol=1e-10)
    g_got = torch.autograd.grad(got, [images, texts])
    g_want = torch.autograd.grad(want, [images, texts])
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(g_got, g_want))


def test_multi_positive_with_one_positive_per_row_is_infonce():
    images, texts, t = unit(5, 8, seed=3), unit(5, 8, seed=4), torch.tensor(10.0, dtype=torch.float64)
    got = multi_positive_clip_loss(clip_logits(images, texts, t), clip_logits(texts, images, t), torch.arange(5))
    assert torch.allclose(got, clip_loss(images, texts, t), rtol=1e-12)


# ----------------------------------------------------------------------------- grouping
def slow_group(y, patches, threshold):
    """One sub-caption: min-max the similarities, threshold, renormalise, pool, normalise (plain loops)."""
    m = patches.shape[0]
    a = [y @ patches[j] for j in range(m)]
    lo, hi = torch.stack(a).min(), torch.stack(a).max()  # with their gradients, as the min-max itself
    if float((hi - lo).detach()) <= 1e-6:
        w = [torch.tensor(1.0 / m, dtype=y.dtype)] * m
    else:
        delta = 1.0 / m if threshold < 0 else threshold
        s = [(v - lo) / (hi - lo) for v in a]
        s = [v if float(v.detach()) >= delta else v * 0 for v in s]
        total = sum(s)
        w = [v / total for v in s] if float(total.detach()) > 1e-6 else [torch.tensor(1.0 / m, dtype=y.dtype)] * m
    g = sum(w[j] * patches[j] for j in range(m))
    return g / g.norm()


def slow_grouping_loss(sub, patches_of_owner, scale, threshold):
    groups = [slow_group(sub[k], patches_of_owner[k], threshold) for k in range(sub.shape[0])]
    n = sub.shape[0]
    rows = []
    for k in range(n):  # sub-caption k against every group: its own is the positive
        scores = torch.stack([scale * sub[k] @ groups[j] for j in range(n)])
        rows.append(torch.logsumexp(scores, 0) - scores[k])
    cols = []
    for k in range(n):  # group k against every sub-caption
        scores = torch.stack([scale * groups[k] @ sub[j] for j in range(n)])
        cols.append(torch.logsumexp(scores, 0) - scores[k])
    return (torch.stack(rows).mean() + torch.stack(cols).mean()) / 2


def grouping_batch(n_images=3, k=2, m=6, d=8):
    texts = unit(n_images * (1 + k), d, seed=5).requires_grad_()
    patches = unit(n_images, m, d, seed=6).requires_grad_()
    kinds = torch.tensor(([0] + [SUB] * k) * n_images)
    owner = torch.arange(n_images).repeat_interleave(1 + k)
    return texts, patches, {"caption_kind": kinds, "text_owner": owner}


@pytest.mark.parametrize("threshold", [0.0, 0.5, -1.0])
def test_grouping_loss_matches_a_slow_reference_in_value_and_gradient(threshold):
    texts, patches, batch = grouping_batch()
    term = DreamlipGrouping(threshold=threshold, logit_scale_init=math.log(5.0)).double()
    loss, metrics = term({"text_embeds": texts, "image_token_embeds": patches}, batch)
    rows = (batch["caption_kind"] == SUB).nonzero().squeeze(1)
    scale = term.log_scale.exp()
    want = slow_grouping_loss(texts[rows], patches[batch["text_owner"][rows]], scale, threshold)
    assert torch.allclose(loss, want, rtol=1e-10), (loss, want)
    got_g = torch.autograd.grad(loss, [texts, patches, term.log_scale])
    want_g = torch.autograd.grad(want, [texts, patches, term.log_scale])
    for a, b in zip(got_g, want_g):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-11)
    assert got_g[0][batch["caption_kind"] == 0].abs().max() == 0  # raw captions take no part
    assert 0 <= metrics["group_peakedness"] <= 1


def test_grouping_weights_are_a_distribution_over_patches_and_guard_constant_rows():
    sim = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    sim[2] = 0.3  # constant: min-max would be 0/eps
    for threshold in (0.0, 0.4, -1.0, 1.0):
        w = grouping_weights(sim, threshold)
        assert (w >= 0).all() and torch.allclose(w.sum(1), torch.ones(5))
        assert torch.allclose(w[2], torch.full((7,), 1 / 7))
    w = grouping_weights(sim, 0.0)
    assert (w[0] == 0).sum() >= 1 and w[0].argmax() == sim[0].argmax()  # the least similar patch drops out
    assert torch.allclose(grouping_weights(sim, 1.0)[0], F.one_hot(sim[0].argmax(), 7).float())


def test_softmax_grouping_weights_follow_their_definition():
    """normalize = "softmax" (the released code's option): softmax over the patches, threshold, renormalise."""
    sim = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for threshold in (0.0, 0.2, -1.0):
        delta = 1 / 6 if threshold < 0 else threshold
        p = sim.softmax(dim=1)
        p = torch.where(p >= delta, p, torch.zeros_like(p))
        total = p.sum(1, keepdim=True)
        want = torch.where(total > 0, p / total.clamp_min(1e-300), torch.full_like(p, 1 / 6))  # emptied rows: uniform
        got = grouping_weights(sim, threshold, "softmax")
        assert torch.allclose(got, want, rtol=1e-12) and torch.allclose(got.sum(1), torch.ones(4, dtype=torch.float64))
    assert not torch.allclose(grouping_weights(sim, 0.0, "softmax"), grouping_weights(sim, 0.0))  # the option matters
    with pytest.raises(ValueError, match="normalize must be 'minmax' or 'softmax'"):
        DreamlipGrouping(normalize="max")


def test_groups_pool_only_the_own_images_patches():
    texts, patches, batch = grouping_batch()
    rows = (batch["caption_kind"] == SUB).nonzero().squeeze(1)
    owner = batch["text_owner"][rows]
    groups, _ = grouped_features(texts[rows], patches[owner])
    other = patches.detach().clone()
    other[0] = unit(6, 8, seed=9)  # change image 0's patches only
    moved, _ = grouped_features(texts[rows], other[owner])
    changed = (groups - moved).abs().amax(1) > 1e-9
    assert changed.tolist() == (owner == 0).tolist()


def test_grouping_without_sub_captions_is_a_clear_error():
    texts, patches, _ = grouping_batch()
    with pytest.raises(ValueError, match="needs sub-captions: set data.sub_captions"):
        DreamlipGrouping()({"text_embeds": texts, "image_token_embeds": patches}, {})


# ----------------------------------------------------------------------------- per-sub-caption CLIP
def test_sub_caption_clip_is_the_mean_of_one_clip_loss_per_slot():
    """For each slot k: CLIP's loss between the images and every image's k-th sub-caption (by a plain loop
    over the rows); the mean over slots; with include_raw the raw caption's slot joins the mean."""
    images = unit(3, 8, seed=11).requires_grad_()
    texts, _, batch = grouping_batch()  # 3 images x (raw + 2 sub-captions), sample-major
    t = torch.tensor(6.0, dtype=torch.float64)
    outputs = {"image_embeds": images, "text_embeds": texts, "logit_scale": t}

    def slot_loss(j):
        rows = [i * 3 + j for i in range(3)]
        return clip_loss(images, texts[rows], t)

    loss, metrics = SubCaptionClip()(outputs, batch)
    assert torch.allclose(loss, (slot_loss(1) + slot_loss(2)) / 2, rtol=1e-12) and metrics["slots"] == 2
    grad = torch.autograd.grad(loss, texts)[0]
    assert grad[batch["caption_kind"] == 0].abs().max() == 0 and grad[batch["caption_kind"] == SUB].abs().max() > 0
    with_raw, _ = SubCaptionClip(include_raw=True)(outputs, batch)
    assert torch.allclose(with_raw, (slot_loss(0) + slot_loss(1) + slot_loss(2)) / 3, rtol=1e-12)
    with pytest.raises(ValueError, match="needs sub-captions: set data.sub_captions"):
        SubCaptionClip()(outputs, {})
    shuffled = {**batch, "text_owner": batch["text_owner"].flip(0)}
    with pytest.raises(ValueError, match="not per-image slots"):
        SubCaptionClip()(outputs, shuffled)


# ----------------------------------------------------------------------------- 2 processes == 1 process
B, K = 3, 2
TERMS = [{"name": "clip"}, {"name": "dreamlip_grouping", "weight": 0.7, "threshold": 0.2},
         {"name": "sub_caption_clip", "weight": 0.5}]


def build():
    from test_method_distributed import recipe_for

    from clipforge.train.trainer import build_step

    torch.manual_seed(0)
    return build_step(recipe_for(TERMS, False), torch.device("cpu"), log=False)


def dreamlip_batch(n_images: int) -> dict:
    from test_method_distributed import global_batch

    batch = global_batch(n_images, 1 + K, False)
    batch["caption_kind"] = torch.tensor(([0] + [SUB] * K) * n_images)
    return batch


def rank_part(batch: dict, rank: int) -> dict:
    t = 1 + K
    return {"images": batch["images"][rank * B:(rank + 1) * B],
            "input_ids": batch["input_ids"][rank * B * t:(rank + 1) * B * t],
            "attention_mask": batch["attention_mask"][rank * B * t:(rank + 1) * B * t],
            "caption_kind": batch["caption_kind"][rank * B * t:(rank + 1) * B * t],
            "text_owner": torch.arange(B).repeat_interleave(t)}


def _worker(rank: int, port: int, results: str) -> None:
    from test_method_distributed import one_step_on_rank

    one_step_on_rank(rank, port, results, build, rank_part(dreamlip_batch(WORLD * B), rank))


def test_two_ranks_equal_one_process(tmp_path):
    from test_method_distributed import assert_same_as_one_process, run_step, two_ranks_report

    got = two_ranks_report(tmp_path, _worker)
    step = build()
    want_loss, want = run_step(step, step, dreamlip_batch(WORLD * B))
    assert "objective.terms.1.log_scale" in want
    assert_same_as_one_process(got, want_loss, want)


# ----------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_dreamlip_sigkill_then_resume_is_exact(tmp_path):
    from test_method_resume import check_kill_and_resume

    check_kill_and_resume(tmp_path, "dreamlip-shapes", "", 12, 6)
