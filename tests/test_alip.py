"""ALIP (methods.md section 13a): the gated adaptive contrastive loss against a slow reference (values and
gradients), the gates' formulas and running means (updated once per optimiser step, checkpointed),
weights logged by noise kind, and 2 gloo processes == 1 process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.objectives.alip import AlipLoss, alip_gates

from test_distributed import WORLD


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def alip_batch(n=5, d=8):
    images = unit(n, d, seed=1).requires_grad_()
    raw, syn = unit(n, d, seed=2), unit(n, d, seed=3)
    syn = F.normalize(syn + 1.5 * raw, dim=-1)  # some pairs agree, some do not
    texts = torch.stack([raw, syn], 1).reshape(2 * n, d).requires_grad_()
    batch = {"caption_kind": torch.tensor([0, 1] * n), "text_owner": torch.arange(n).repeat_interleave(2),
             "noise": torch.tensor([0, 1, 2, 0, 3][:n])}
    return images, texts, batch


def slow_alip(images, raw, syn, t, mus):
    """The paper's L, sample by sample, with the gates written out."""
    mu_tc, mu_it, mu_ic = mus
    n = images.shape[0]
    total = 0
    for texts, mu in ((raw, mu_it), (syn, mu_ic)):
        for i in range(n):
            s = float((raw[i] @ syn[i]).detach())
            w_s = min(math.exp(s - mu_tc) ** 2, 1.0)
            w_p = math.exp(float((images[i] @ texts[i]).detach()) - mu) ** 2 if w_s < 1 else 1.0
            i2t = -torch.log_softmax(torch.stack([t * images[i] @ texts[j] for j in range(n)]), 0)[i]
            t2i = -torch.log_softmax(torch.stack([t * texts[i] @ images[j] for j in range(n)]), 0)[i]
            total = total + w_s * w_p * (i2t + t2i) / 2 / n
    return total


def test_alip_loss_matches_the_paper_sample_by_sample_in_value_and_gradient():
    images, texts, batch = alip_batch()
    term = AlipLoss().double()
    term.running_means.copy_(torch.tensor([0.6, 0.2, 0.3]))
    t = torch.tensor(8.0, dtype=torch.float64)
    loss, metrics = term({"image_embeds": images, "text_embeds": texts, "logit_scale": t}, batch)
    want = slow_alip(images, texts[0::2], texts[1::2], t, (0.6, 0.2, 0.3))
    assert torch.allclose(loss, want, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(loss, [images, texts]), torch.autograd.grad(want, [images, texts])):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert {"raw_weight/clean", "raw_weight/other_image", "synthetic_weight/altered"} <= set(metrics)


def test_gates_off_is_clip_on_both_captions_and_gates_on_differs():
    """gates = false (the ablation): every weight 1, so the loss is L_clip(I, T) + L_clip(I, C), the two
    per-sample CLIP losses averaged, on the same raw and synthetic captions; the means still move."""
    from clipforge.objectives.contrastive import clip_loss

    images, texts, batch = alip_batch()
    raw, syn = texts[0::2], texts[1::2]
    t = torch.tensor(8.0, dtype=torch.float64)
    outputs = {"image_embeds": images, "text_embeds": texts, "logit_scale": t}
    means = torch.tensor([0.99, 0.2, 0.3], dtype=torch.float64)  # mu_TC near 1: w^s < 1, the gates act
    off, on = AlipLoss(gates=False).double(), AlipLoss().double()
    for term in (off, on):
        term.running_means.copy_(means)

    def per_sample(captions):  # ½(CE image i -> captions + CE caption i -> images), one value per i
        logits = t * images @ captions.T
        labels = torch.arange(images.shape[0])
        return (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none")) / 2

    loss_off, metrics_off = off(outputs, batch)
    want = per_sample(raw).mean() + per_sample(syn).mean()
    assert torch.allclose(loss_off, want, rtol=1e-12)
    assert torch.allclose(want, clip_loss(images, raw, t) + clip_loss(images, syn, t), rtol=1e-12)
    for a, b in zip(torch.autograd.grad(loss_off, [images, texts]), torch.autograd.grad(want, [images, texts])):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert all(metrics_off[f"{pair}_weight/{kind}"] == 1.0 for pair in ("raw", "synthetic")
               for kind in ("clean", "other_image", "dropped", "altered"))
    assert metrics_off["mu_tc"] == pytest.approx(0.99)  # the means are logged...

    w_s, w_t, w_c = alip_gates(images.detach(), raw.detach(), syn.detach(), *means.tolist())
    assert (w_s * w_t < 1).any() and (w_s * w_c < 1).any()  # on this batch the gates do act
    loss_on, metrics_on = on(outputs, batch)
    assert not torch.allclose(loss_on, loss_off)
    assert torch.allclose(loss_on, (w_s * w_t * per_sample(raw)).mean() + (w_s * w_c * per_sample(syn)).mean(), rtol=1e-12)
    assert metrics_on["raw_weight/other_image"] < 1

    for term in (off, on):  # ...and move as with the gates on (they do not depend on the weights)
        term.after_optimizer_step(1)
    assert not torch.equal(off.running_means, means)
    assert torch.equal(off.running_means, on.running_means)
    from clipforge.objectives.base import build_term  # the recipe's spelling reaches the term

    assert build_term({"name": "alip", "gates": False}).gates is False and build_term({"name": "alip"}).gates


def test_gates_follow_the_paper():
    x, t, c = unit(6, 4, seed=4), unit(6, 4, seed=5), unit(6, 4, seed=6)
    c[0] = t[0]  # raw and synthetic agree completely: w^s = 1 and no DCG
    w_s, w_t, w_c = alip_gates(x, t, c, 0.5, 0.1, 0.2)
    s = (t * c).sum(1)
    assert torch.allclose(w_s, torch.exp(2 * (s - 0.5)).clamp(max=1))
    assert w_s[0] == 1 and w_t[0] == 1 and w_c[0] == 1
    low = w_s < 1
    assert torch.allclose(w_t[low], torch.exp(2 * ((x * t).sum(1) - 0.1))[low])
    assert torch.allclose(w_c[low], torch.exp(2 * ((x * c).sum(1) - 0.2))[low])
    # with the initial mu = 1 every cosine < 1 is gated: the first steps down-weight everything a little
    assert (alip_gates(x, t, c, 1.0, 1.0, 1.0)[0][1:] < 1).all()


def test_running_means_move_once_per_optimiser_step_and_are_checkpointed():
    images, texts, batch = alip_batch()
    assert AlipLoss().momentum == 0.99  # the paper's EMA momentum is the default
    term = AlipLoss(momentum=0.9).double()
    outputs = {"image_embeds": images, "text_embeds": texts, "logit_scale": torch.tensor(5.0)}
    term(outputs, batch)
    term(outputs, batch)  # two micro-batches of one optimiser step
    assert torch.equal(term.running_means, torch.ones(3, dtype=torch.float64))  # not yet
    term.after_optimizer_step(1)
    raw, syn = texts.detach()[0::2], texts.detach()[1::2]
    means = torch.stack([(raw * syn).sum(1).mean(), (images.detach() * raw).sum(1).mean(),
                         (images.detach() * syn).sum(1).mean()])
    assert torch.allclose(term.running_means, 0.9 + 0.1 * means)
    assert "running_means" in dict(term.named_buffers())  # in method.safetensors: exact resume
    term.eval()
    term(outputs, batch)
    term.after_optimizer_step(2)  # evaluation does not move the means
    assert torch.allclose(term.running_means, 0.9 + 0.1 * means)
    term.train()
    term(outputs, batch)
    term.discard_step()  # a skipped step (NaN/inf): its batch means are dropped
    term.after_optimizer_step(3)
    assert torch.allclose(term.running_means, 0.9 + 0.1 * means)


def test_gates_down_weight_noisy_raw_captions_in_a_trained_like_space():
    # raw captions of noisy samples point elsewhere: their pairs get lower weights than clean ones
    n, d = 40, 16
    images = unit(n, d, seed=7)
    noise = torch.tensor([0, 1] * (n // 2))
    raw = torch.where(noise[:, None] == 1, unit(n, d, seed=8), images + 0.2 * unit(n, d, seed=9))
    syn = images + 0.2 * unit(n, d, seed=10)
    texts = torch.stack([F.normalize(raw, dim=-1), F.normalize(syn, dim=-1)], 1).reshape(2 * n, d)
    term = AlipLoss().double()
    term.running_means.copy_(torch.tensor([0.5, 0.5, 0.5]))
    _, m = term({"image_embeds": images, "text_embeds": texts, "logit_scale": torch.tensor(5.0)},
                {"caption_kind": torch.tensor([0, 1] * n), "text_owner": torch.arange(n).repeat_interleave(2),
                 "noise": noise})
    assert m["raw_weight/other_image"] < 0.5 * m["raw_weight/clean"]


# ----------------------------------------------------------------------------- 2 processes == 1 process
B = 3


def build():
    from test_method_distributed import recipe_for

    from clipforge.train.trainer import build_step

    torch.manual_seed(0)
    step = build_step(recipe_for([{"name": "alip"}], False), torch.device("cpu"), log=False)
    step.objective.terms[0].running_means.copy_(torch.tensor([0.3, 0.1, 0.2]))  # gates active
    return step


def full_batch(n):
    from test_method_distributed import global_batch

    batch = global_batch(n, 2, False)
    batch["caption_kind"] = torch.tensor([0, 1] * n)
    batch["noise"] = torch.arange(n) % 4
    return batch


def _means_after_the_step(step) -> dict:
    step.after_optimizer_step(1)
    return {"means": step.objective.terms[0].running_means}


def _worker(rank, port, results):
    from test_method_distributed import one_step_on_rank

    full = full_batch(WORLD * B)
    part = {"images": full["images"][rank * B:(rank + 1) * B], "text_owner": torch.arange(B).repeat_interleave(2),
            "noise": full["noise"][rank * B:(rank + 1) * B]}
    for key in ("input_ids", "attention_mask", "caption_kind"):
        part[key] = full[key][rank * 2 * B:(rank + 1) * 2 * B]
    one_step_on_rank(rank, port, results, build, part, _means_after_the_step)


def test_two_ranks_equal_one_process(tmp_path):
    from test_method_distributed import assert_same_as_one_process, run_step, two_ranks_report

    got = two_ranks_report(tmp_path, _worker)
    step = build()
    want_loss, want = run_step(step, step, full_batch(WORLD * B))
    assert_same_as_one_process(got, want_loss, want)
    assert torch.allclose(got["means"], _means_after_the_step(step)["means"], rtol=1e-6)


@pytest.mark.slow
def test_alip_sigkill_then_resume_is_exact(tmp_path):
    from test_method_resume import check_kill_and_resume

    check_kill_and_resume(tmp_path, "alip-shapes", "", 12, 6)  # the running means come back from the checkpoint
