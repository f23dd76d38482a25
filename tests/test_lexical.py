"""LexLIP heads and terms (methods.md 9a/9b checklist): reference values and gradients of the
lexical weights and the FLOPs regulariser, padding never contributes, top-k sparsification, the
quadratic warm-up, sparse encode_* outputs, and 2 gloo ranks == 1 process for lexical + FLOPs."""

from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from clipforge.config import ModelConfig, load_recipe
from clipforge.models.clip import CLIP
from clipforge.models.lexical import PAD_LOGIT, keep_top_k, lexical_weights, sparsity_report
from clipforge.objectives.lexical import FlopsRegulariser, LexicalContrastive, flops, quadratic_warmup


def tiny_lexical_model(top_k: int = 8) -> CLIP:
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=16, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2, vocab_size=64,
                      context_length=8, text_width=16, text_layers=1, text_heads=2, embed_dim=16,
                      lexical_head=True, lexical_top_k=top_k)
    return CLIP(cfg).eval()


# ----------------------------------------------------------------------------- the heads
def reference_lexical_weights(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Slow and obvious: for each sample and word, the largest logit over real tokens, then log(1 + max(0, .))."""
    n, t, v = logits.shape
    out = torch.zeros(n, v, dtype=logits.dtype)
    for i in range(n):
        for w in range(v):
            best = max(float(logits[i, j, w]) for j in range(t) if mask[i, j])
            out[i, w] = math.log(1 + max(0.0, best))
    return out


def test_lexical_weights_match_the_reference_and_are_non_negative():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    got = lexical_weights(logits, mask)
    assert torch.allclose(got, reference_lexical_weights(logits, mask), atol=1e-12)
    assert (got >= 0).all() and (got == 0).any()  # ReLU zeroes words whose best logit is negative


def test_padding_never_contributes_even_with_huge_logits():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 9, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    before = lexical_weights(logits, mask)
    poisoned = logits.clone()
    poisoned[~mask.bool()] = 1e4  # padding positions "vote" hugely for every word
    assert torch.equal(lexical_weights(poisoned, mask), before)
    assert not torch.equal(lexical_weights(poisoned, None), before)  # the mask is what protects it
    assert PAD_LOGIT < -1e5


def test_lexical_weights_gradient_flows_only_to_the_winning_real_token():
    logits = torch.tensor([[[2.0, -1.0], [3.0, -2.0], [9.0, 9.0]]], requires_grad=True)  # token 2 is padding
    mask = torch.tensor([[1, 1, 0]])
    lexical_weights(logits, mask).sum().backward()
    # word 0: token 1 wins (3.0), d log(1 + x)/dx = 1/4; word 1: every real logit < 0 -> ReLU -> no gradient
    want = torch.tensor([[[0.0, 0.0], [0.25, 0.0], [0.0, 0.0]]])
    assert torch.allclose(logits.grad, want)


def test_model_text_lexical_ignores_padding_tokens():
    model = tiny_lexical_model()
    ids = torch.tensor([[1, 5, 9, 2, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    other_padding = ids.clone()
    other_padding[0, 4:] = torch.tensor([40, 41, 42, 43])
    with torch.no_grad():
        a = model(None, ids, mask, need={"text_lexical"})["text_lexical"]
        b = model(None, other_padding, mask, need={"text_lexical"})["text_lexical"]
    assert a.shape == (1, 64) and (a >= 0).all()
    assert torch.equal(a, b)


def test_keep_top_k_keeps_the_k_largest_per_row():
    w = torch.tensor([[0.1, 0.5, 0.0, 0.3, 0.9], [1.0, 0.0, 0.2, 0.0, 0.0]])
    got = keep_top_k(w, 2)
    assert torch.equal(got, torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.9], [1.0, 0.0, 0.2, 0.0, 0.0]]))
    assert torch.equal(keep_top_k(w, 5), w)


def test_encode_sparse_is_the_top_k_of_the_lexical_weights_on_both_sides():
    model = tiny_lexical_model(top_k=8)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=g)
    ids, mask = torch.randint(1, 64, (3, 8), generator=g), torch.ones(3, 8, dtype=torch.long)
    with torch.no_grad():
        image_sparse, text_sparse = model.encode_image(images, sparse=True), model.encode_text(ids, mask, sparse=True)
        full = model(images, ids, mask, need={"image_lexical", "text_lexical"})
    assert image_sparse.layout == torch.sparse_coo and image_sparse.shape == (3, 64)
    assert torch.equal(image_sparse.to_dense(), keep_top_k(full["image_lexical"], 8))
    assert torch.equal(text_sparse.to_dense(), keep_top_k(full["text_lexical"], 8))
    # the checklist's sparsity report: the same definition and the same count on both sides
    assert sparsity_report(image_sparse.to_dense()) == sparsity_report(text_sparse.to_dense()) == \
        {"nnz": 8.0, "density": 8 / 64}
    assert model.encode_image(images).shape == (3, 16)  # the dense path is unchanged


def test_lexical_outputs_without_heads_say_what_to_set():
    cfg = ModelConfig(image_size=16, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2, vocab_size=64,
                      context_length=8, text_width=16, text_layers=1, text_heads=2, embed_dim=16)
    with pytest.raises(ValueError, match="model.lexical_head = true"):
        CLIP(cfg).encode_text(torch.ones(1, 8, dtype=torch.long), sparse=True)


# ----------------------------------------------------------------------------- FLOPs
def test_flops_is_the_sum_of_squared_column_means():
    L = torch.tensor([[0.0, 2.0, 1.0], [4.0, 0.0, 1.0]])
    # column means of |L|: 2, 1, 1 -> 4 + 1 + 1
    assert float(flops(L)) == 6.0
    g = torch.Generator().manual_seed(4)
    R = torch.randn(5, 11, generator=g, dtype=torch.float64)
    reference = sum((sum(abs(float(R[i, v])) for i in range(5)) / 5) ** 2 for v in range(11))
    assert abs(float(flops(R)) - reference) < 1e-12


def test_flops_gradient_pushes_frequently_active_words_down_harder():
    # word 0 fires for every sample, word 1 for one sample, with the same weight where it fires
    L = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    flops(L).backward()
    # d/dl_iv = 2 * mean_v / B: word 0 -> 2 * 1 / 4, word 1 -> 2 * 0.25 / 4
    assert torch.allclose(L.grad[:, 0], torch.full((4,), 0.5))
    assert torch.isclose(L.grad[0, 1], torch.tensor(0.125))
    assert L.grad[0, 0] > L.grad[0, 1]
    R = torch.rand(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(flops, (R,))


def test_quadratic_warmup_schedule():
    assert [quadratic_warmup(t, 10) for t in (0, 5, 10, 20)] == [0.0, 0.25, 1.0, 1.0]
    assert quadratic_warmup(0, 0) == 1.0


def test_flops_term_applies_the_ramp_and_counts_steps():
    term = FlopsRegulariser(weight=0.1, warmup_steps=4)
    outputs = {"image_lexical": torch.tensor([[1.0, 0.0]]), "text_lexical": torch.tensor([[0.0, 2.0]])}
    loss, metrics = term(outputs, {})
    assert float(loss) == 0.0 and metrics["ramp"] == 0.0
    term.after_optimizer_step(2)
    loss, metrics = term(outputs, {})
    assert metrics["ramp"] == 0.25 and float(loss) == pytest.approx(0.25 * (1.0 + 4.0))
    assert "steps_done" in dict(term.named_buffers())  # checkpointed: a resumed run continues the ramp


# ----------------------------------------------------------------------------- lexical contrastive
def test_lexical_contrastive_is_infonce_on_normalised_weights():
    g = torch.Generator().manual_seed(5)
    img = torch.rand(4, 10, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.rand(4, 10, generator=g, dtype=torch.float64, requires_grad=True)
    loss, _ = LexicalContrastive(temperature=0.05)({"image_lexical": img, "text_lexical": txt}, {})
    # slow reference: explicit cosine similarities and per-row log-softmax
    sims = [[float(F.cosine_similarity(img[i], txt[j], dim=0).detach()) / 0.05 for j in range(4)] for i in range(4)]
    i2t = [-(sims[i][i] - math.log(sum(math.exp(s) for s in sims[i]))) for i in range(4)]
    t2i = [-(sims[j][j] - math.log(sum(math.exp(sims[i][j]) for i in range(4)))) for j in range(4)]
    assert abs(float(loss.detach()) - (sum(i2t) / 4 + sum(t2i) / 4) / 2) < 1e-9
    assert torch.autograd.gradcheck(
        lambda a, b: LexicalContrastive(temperature=0.05)({"image_lexical": a, "text_lexical": b}, {})[0], (img, txt))


def test_lexlip_recipe_builds_a_model_with_heads_and_both_terms():
    recipe = load_recipe("lexlip-shapes")
    assert recipe.model.lexical_head
    assert [t.name for t in recipe.objective.terms] == ["clip", "lexical", "flops"]
    with pytest.raises(ValueError, match="lexical_top_k"):
        load_recipe("lexlip-shapes", ["model.lexical_top_k=0"])


# ----------------------------------------------------------------------------- phase 2: momentum queue
def test_queue_is_fifo_with_pointer_wrap():
    from clipforge.methods.lexlip import enqueue_

    queue, pointer, count = torch.zeros(5, 2), torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)
    enqueue_(queue, pointer, count, torch.tensor([[1.0, 1], [2, 2], [3, 3]]))
    assert int(pointer) == 3 and int(count) == 3
    enqueue_(queue, pointer, count, torch.tensor([[4.0, 4], [5, 5], [6, 6]]))
    # slots 3, 4, then wrap to 0: the oldest key (1) is replaced first
    assert queue[:, 0].tolist() == [6, 2, 3, 4, 5] and int(pointer) == 1 and int(count) == 5
    enqueue_(queue, pointer, count, torch.arange(14.0).view(7, 2))  # more keys than slots: the newest 5 stay
    assert sorted(queue[:, 0].tolist()) == [4, 6, 8, 10, 12] and int(pointer) == 1


def lexlip_step(queue_size: int = 6):
    from clipforge.config import validate_recipe
    from clipforge.train.trainer import build_step

    raw = {"model": {"image_size": 16, "patch_size": 8, "vision_width": 16, "vision_layers": 1, "vision_heads": 2,
                     "vocab_size": 64, "context_length": 8, "text_width": 16, "text_layers": 1, "text_heads": 2,
                     "embed_dim": 16, "lexical_head": True},
           "data": {"tokenizer": {"vocab_size": 64}}, "objective": {"terms": [{"name": "lexical"}]},
           "method": {"name": "lexlip", "queue_size": queue_size, "temperature": 0.05},
           "teachers": [{"name": "ema", "kind": "ema", "momentum": 0.99, "momentum_schedule": "constant"}]}
    torch.manual_seed(0)
    return build_step(validate_recipe(raw), torch.device("cpu"), log=False)


def test_momentum_loss_uses_ema_keys_without_gradient_and_fills_the_queue():
    from test_method_distributed import global_batch

    step = lexlip_step(queue_size=6)
    step.train()
    batch = global_batch(4, 1, False)
    outputs = step(batch)
    loss, metrics = step.compute_loss(outputs, batch)
    # reference with an empty queue: in-batch CE of online queries against the EMA keys
    q_i, q_t = F.normalize(outputs["image_lexical"], dim=-1), F.normalize(outputs["text_lexical"], dim=-1)
    k_i, k_t = F.normalize(outputs["ema/image_lexical"], dim=-1), F.normalize(outputs["ema/text_lexical"], dim=-1)
    labels = torch.arange(4)
    want = (F.cross_entropy(q_i @ k_t.T / 0.05, labels) + F.cross_entropy(q_t @ k_i.T / 0.05, labels)) / 2
    assert metrics["moco/loss"] == pytest.approx(float(want.detach()), rel=1e-6) and metrics["moco/queue"] == 0
    loss.backward()
    assert all(p.grad is None for p in step.teachers["ema"].parameters())  # keys carry no gradient
    assert not outputs["ema/image_lexical"].requires_grad
    step.after_optimizer_step(1)
    assert int(step.queue_count) == 4 and int(step.queue_pointer) == 4
    assert torch.allclose(step.text_queue[:4], k_t.detach()) and torch.allclose(step.image_queue[:4], k_i.detach())
    outputs = step(batch)
    _, metrics = step.compute_loss(outputs, batch)
    assert metrics["moco/queue"] == 4  # the queued keys are negatives now
    # reference with the filled queue: image queries against [text keys; text queue], text against image
    q_i, q_t = F.normalize(outputs["image_lexical"], dim=-1), F.normalize(outputs["text_lexical"], dim=-1)
    k_i, k_t = F.normalize(outputs["ema/image_lexical"], dim=-1), F.normalize(outputs["ema/text_lexical"], dim=-1)
    t_queue, i_queue = step.text_queue[:4], step.image_queue[:4]
    want = (F.cross_entropy(torch.cat([q_i @ k_t.T, q_i @ t_queue.T], 1) / 0.05, labels)
            + F.cross_entropy(torch.cat([q_t @ k_i.T, q_t @ i_queue.T], 1) / 0.05, labels)) / 2
    assert metrics["moco/loss"] == pytest.approx(float(want.detach()), rel=1e-6)
    swapped = (F.cross_entropy(torch.cat([q_i @ k_t.T, q_i @ i_queue.T], 1) / 0.05, labels)
               + F.cross_entropy(torch.cat([q_t @ k_i.T, q_t @ t_queue.T], 1) / 0.05, labels)) / 2
    assert abs(float(swapped) - float(want)) > 1e-4  # the check can tell the two queues apart
    assert {"image_queue", "text_queue", "queue_pointer", "queue_count"} <= set(dict(step.named_buffers()))


def test_a_skipped_step_queues_no_keys():
    """A step the trainer skips (NaN/inf loss) runs no after-step hook: its keys must not reach the queue
    with the next good step's."""
    from test_method_distributed import global_batch

    step = lexlip_step(queue_size=6)
    step.train()
    batch = global_batch(4, 1, False)
    step.compute_loss(step(batch), batch)
    step.discard_step()  # what StepRunner.skip() calls
    outputs = step(batch)
    step.compute_loss(outputs, batch)
    step.after_optimizer_step(2)
    assert int(step.queue_count) == 4 and int(step.queue_pointer) == 4  # one step's keys, not two
    assert torch.allclose(step.text_queue[:4], F.normalize(outputs["ema/text_lexical"], dim=-1))


def test_lexlip_method_needs_heads_and_an_ema_teacher():
    from clipforge.config import validate_recipe

    raw = {"model": {"lexical_head": True}, "method": {"name": "lexlip"}}
    with pytest.raises(ValueError, match='kind = \\"ema\\"|kind = "ema"'):
        validate_recipe(raw)
    with pytest.raises(ValueError, match="lexical_head = true"):
        validate_recipe({"method": {"name": "lexlip"}, "teachers": [{"name": "ema", "kind": "ema"}]})


# ----------------------------------------------------------------------------- 2 ranks == 1 process
CASES = {
    "lexical+flops+clip": [{"name": "clip"}, {"name": "lexical"}, {"name": "flops", "weight": 0.05}],
    # lexical only: the dense projections get a zero gradient, so DDP still reduces every parameter
    "lexical-only": [{"name": "lexical", "temperature": 0.1}, {"name": "flops", "weight": 0.05}],
    # phase 2: the momentum step, EMA keys gathered without gradient, a pre-filled queue as negatives
    "lexlip-momentum": [{"name": "lexical"}, {"name": "flops", "weight": 0.05}],
}


def build(case: str):
    from clipforge.config import validate_recipe
    from clipforge.train.trainer import build_step

    raw = {"model": {"image_size": 16, "patch_size": 8, "vision_width": 16, "vision_layers": 1, "vision_heads": 2,
                     "vocab_size": 64, "context_length": 8, "text_width": 16, "text_layers": 1, "text_heads": 2,
                     "embed_dim": 16, "lexical_head": True},
           "data": {"tokenizer": {"vocab_size": 64}}, "objective": {"terms": CASES[case]}}
    if case == "lexlip-momentum":
        raw["method"] = {"name": "lexlip", "queue_size": 6}
        raw["teachers"] = [{"name": "ema", "kind": "ema", "momentum": 1.0, "momentum_end": 1.0}]
    torch.manual_seed(0)
    step = build_step(validate_recipe(raw), torch.device("cpu"), log=False)
    step.objective.after_optimizer_step(10**6)  # the FLOPs ramp at full weight
    if case == "lexlip-momentum":  # the same queue on every rank; a teacher that differs from the student
        g = torch.Generator().manual_seed(3)
        step.image_queue.copy_(F.normalize(torch.rand(6, 64, generator=g), dim=-1))
        step.text_queue.copy_(F.normalize(torch.rand(6, 64, generator=g), dim=-1))
        step.queue_count.fill_(6)
        with torch.no_grad():
            for p in step.teachers["ema"].module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return step


def _worker(rank: int, port: int, results: str) -> None:
    from test_distributed import WORLD
    from test_method_distributed import global_batch, rank_rows, run_step

    from clipforge.train import distributed as D

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    ctx = D.current_context()
    report = {}
    for case in CASES:
        step = build(case)
        wrapped = D.wrap_model(step, ctx, torch.device("cpu"), False)
        loss, grads = run_step(step, wrapped, rank_rows(global_batch(8, 1, False), rank, 1))
        report[case] = {"loss": D.sum_over_ranks([loss], ctx, torch.device("cpu"))[0] / WORLD, "grads": grads}
    if rank == 0:
        torch.save(report, results)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    from test_distributed import spawn_ranks

    results = tmp_path_factory.mktemp("lexical_ranks") / "report.pt"
    spawn_ranks(_worker, results)
    return torch.load(results, weights_only=True)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(report, case):
    from test_distributed import relative_error
    from test_method_distributed import B, global_batch, run_step

    assert B == 4  # the workers split global_batch(8) into two halves of B
    step = build(case)
    want_loss, want = run_step(step, step, global_batch(8, 1, False))
    got = report[case]
    assert abs(got["loss"] - want_loss) <= 1e-6 * abs(want_loss)
    assert any("image_lexical" in n for n in want) and any("text_lexical" in n for n in want)
    assert set(got["grads"]) == set(want)
    errors = {name: relative_error(got["grads"][name], want[name]) for name in want if want[name].norm() > 0}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-6, (worst, errors[worst])


# ----------------------------------------------------------------------------- exact resume
@pytest.mark.slow
def test_lexlip_sigkill_then_resume_is_exact(tmp_path):
    """Kill during the FLOPs warm-up with a wrapped momentum queue (step counter, EMA, queues and pointer
    are method state), resume: bitwise equal losses."""
    from test_method_resume import check_kill_and_resume

    check_kill_and_resume(tmp_path, "lexlip-moco-shapes", "\n[[objective.terms]]\nname = \"clip\"\n"
                          "[[objective.terms]]\nname = \"lexical\"\n[[objective.terms]]\nname = \"flops\"\n"
                          "warmup_steps = 16\n[method]\nqueue_size = 20\n", 16, 7)
