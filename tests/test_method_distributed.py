"""The method layer under data parallelism: 2 gloo processes on a split batch == 1 process on the
concatenated batch (loss and every gradient, fp32, 1e-6 relative) for

- FILIP (gathered token features, both directions);
- CLIP and SigLIP with several captions per image (``text_owner``) and per-sample weights;
- a term that owns a parameter (trained and DDP-reduced with the model) next to CLIP;
all through the training step module that the trainer wraps.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from pydantic import Field

from clipforge.config import load_recipe
from clipforge.objectives.base import Term, TermConfig, register_term
from clipforge.train import distributed as D
from clipforge.train.gradcache import plain_accumulation

from test_distributed import WORLD, relative_error, spawn_ranks

TOL = 1e-6
B = 4  # images per rank


class LearnedScaleConfig(TermConfig):
    name: str = "learned_scale_clip"
    init: float = Field(2.0)


@register_term
class LearnedScaleClip(Term):
    """CLIP with its own learnable temperature: a term that owns a parameter (gathered scope)."""

    name = "learned_scale_clip"
    Config = LearnedScaleConfig
    scope = "gathered"

    def __init__(self, weight: float = 1.0, init: float = 2.0):
        super().__init__(weight)
        self.log_scale = torch.nn.Parameter(torch.tensor(float(init)))

    def forward(self, outputs, batch):
        from clipforge.objectives.contrastive import ClipLoss

        return ClipLoss()({**outputs, "logit_scale": self.log_scale.exp()}, batch)


CASES = {
    "filip": ([{"name": "filip", "chunk": 3}], False, False),
    "filip+clip": ([{"name": "clip"}, {"name": "filip", "weight": 0.5}], False, False),
    "clip-multi-caption-weighted": ([{"name": "clip", "label_smoothing": 0.1}], True, True),
    "siglip-multi-caption": ([{"name": "siglip"}], True, False),
    "term-with-parameter": ([{"name": "clip"}, {"name": "learned_scale_clip", "weight": 0.5}], False, False),
    # a term that owns a parameter but gives no gradient (weight 0): DDP must not stall on it
    "weight-zero-term-with-parameter": ([{"name": "clip"}, {"name": "learned_scale_clip", "weight": 0.0}],
                                        False, False),
    # TinyCLIP: affinities of local rows against gathered keys, the teacher's keys gathered without grad
    "affinity-distill+clip": ([{"name": "affinity_distill", "teacher": "teacher", "weight": 0.7},
                               {"name": "clip", "weight": 0.3}], False, False),
}


def recipe_for(terms: list[dict], siglip: bool):
    from clipforge.config import validate_recipe

    raw = {"model": {"image_size": 16, "patch_size": 8, "vision_width": 16, "vision_layers": 1, "vision_heads": 2,
                     "vocab_size": 64, "context_length": 8, "text_width": 16, "text_layers": 1, "text_heads": 2,
                     "embed_dim": 16},
           "data": {"tokenizer": {"vocab_size": 64}}, "objective": {"terms": terms}}
    if siglip:
        raw["model"].update(logit_scale_init=2.302585, logit_bias_init=-10.0)
    if any(t["name"] == "affinity_distill" for t in terms):
        raw["teachers"] = [{"name": "teacher", "kind": "ema", "momentum": 1.0, "momentum_end": 1.0}]
    return validate_recipe(raw)


def global_batch(n_images: int, captions: int, weighted: bool) -> dict:
    g = torch.Generator().manual_seed(7)
    t = n_images * captions
    lengths = torch.randint(2, 9, (t,), generator=g)
    batch = {"images": torch.randint(0, 256, (n_images, 3, 16, 16), dtype=torch.uint8, generator=g),
             "input_ids": torch.randint(1, 64, (t, 8), generator=g),
             "attention_mask": (torch.arange(8)[None, :] < lengths[:, None]).long()}
    if captions > 1:
        batch["text_owner"] = torch.arange(n_images).repeat_interleave(captions)
    if weighted:
        batch["weights"] = torch.rand(n_images, generator=g) + 0.5
    return batch


def rank_rows(batch: dict, rank: int, captions: int) -> dict:
    out = {"images": batch["images"][rank * B:(rank + 1) * B]}
    for key in ("input_ids", "attention_mask"):
        out[key] = batch[key][rank * B * captions:(rank + 1) * B * captions]
    if "text_owner" in batch:
        out["text_owner"] = torch.arange(B).repeat_interleave(captions)  # local image indices
    if "weights" in batch:
        out["weights"] = batch["weights"][rank * B:(rank + 1) * B]
    return out


def build(case: str):
    from clipforge.train.trainer import build_step

    terms, multi, weighted = CASES[case]
    torch.manual_seed(0)
    step = build_step(recipe_for(terms, any(t["name"] == "siglip" for t in terms)), torch.device("cpu"), log=False)
    if "teacher" in step.teachers:  # a teacher that differs from the student, the same on every rank
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in step.teachers["teacher"].module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return step, (2 if multi else 1), weighted


def run_step(step_module, wrapped, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """Two forward/backward passes (DDP notices a parameter left out of a step only at the next one);
    the second one's loss and gradients."""
    for _ in range(2):
        step_module.zero_grad(set_to_none=True)
        loss, _ = plain_accumulation(wrapped, step_module.compute_loss, [batch], lambda b: wrapped(b),
                                     lambda: torch.autocast("cpu", enabled=False))
    grads = {n: p.grad.clone() for n, p in step_module.named_parameters() if p.grad is not None}
    return loss, grads


def _worker(rank: int, port: int, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    ctx = D.current_context()
    report = {}
    for case in CASES:
        step, captions, weighted = build(case)
        wrapped = D.wrap_model(step, ctx, torch.device("cpu"), False)
        batch = rank_rows(global_batch(WORLD * B, captions, weighted), rank, captions)
        loss, grads = run_step(step, wrapped, batch)
        report[case] = {"loss": D.sum_over_ranks([loss], ctx, torch.device("cpu"))[0] / WORLD, "grads": grads}
    if rank == 0:
        torch.save(report, results)
    dist.destroy_process_group()


def one_step_on_rank(rank: int, port: int, results, build_step, part, extra=None) -> None:
    """The body of a spawned rank: join the gloo group, build the step module, wrap it as the trainer
    does, run one step on ``part`` (this rank's rows); rank 0 saves the loss averaged over ranks, its
    gradients and ``extra(step)`` (state after the step) to ``results``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    ctx = D.current_context()
    step = build_step()
    wrapped = D.wrap_model(step, ctx, torch.device("cpu"), False)
    loss, grads = run_step(step, wrapped, part)
    report = {"loss": D.sum_over_ranks([loss], ctx, torch.device("cpu"))[0] / WORLD, "grads": grads,
              **(extra(step) if extra is not None else {})}
    if rank == 0:
        torch.save(report, results)
    dist.destroy_process_group()


def two_ranks_report(tmp_path, worker) -> dict:
    """Spawn 2 gloo ranks running ``worker(rank, port, results)``; rank 0's saved report."""
    results = tmp_path / "report.pt"
    spawn_ranks(worker, results)
    return torch.load(results, weights_only=True)


def assert_same_as_one_process(got: dict, want_loss: float, want: dict, tol: float = TOL) -> None:
    """The 2-rank loss and every gradient equal the 1-process ones (relative ``tol``)."""
    assert abs(got["loss"] - want_loss) <= tol * abs(want_loss), (got["loss"], want_loss)
    assert set(got["grads"]) == set(want)
    errors = {name: relative_error(got["grads"][name], want[name]) for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, (worst, errors[worst])


# FILIP with token_keep < 1: each rank sends its samples' best-matched tokens only, so 2 ranks are not the
# 1-process loss; the reference is the definition on the concatenated batch: rank r's tokens chosen among
# rank r's rows, every row scored with all of its own tokens against the sent tokens of every column
FILIP_KEEP = 0.5


def _filip_keep_step(half: bool = False):
    from clipforge.train.trainer import build_step

    torch.manual_seed(0)
    term = {"name": "filip", "chunk": 3, "token_keep": 1.0 if half else FILIP_KEEP, "gather_half": half}
    return build_step(recipe_for([term], False), torch.device("cpu"), log=False)


def _filip_keep_worker(rank: int, port: int, results: str) -> None:
    one_step_on_rank(rank, port, results, _filip_keep_step, rank_rows(global_batch(WORLD * B, 1, False), rank, 1))


def _filip_half_worker(rank: int, port: int, results: str) -> None:
    one_step_on_rank(rank, port, results, lambda: _filip_keep_step(half=True),
                     rank_rows(global_batch(WORLD * B, 1, False), rank, 1))


def test_filip_half_precision_gather_is_the_loss_on_float16_rounded_columns(tmp_path):
    """gather_half: every column's tokens cross the wire in float16; each rank's rows keep theirs."""
    from clipforge.objectives.contrastive import multi_positive_clip_loss
    from clipforge.objectives.filip import late_interaction_scores

    got = two_ranks_report(tmp_path, _filip_half_worker)
    step, batch = _filip_keep_step(half=True), global_batch(WORLD * B, 1, False)
    out = step(batch)
    images, texts, scale = out["image_token_embeds"], out["text_token_embeds"], out["logit_scale"]
    mask = batch["attention_mask"][:, :texts.shape[1]]
    s_image, _ = late_interaction_scores(images, texts.half().float(), mask)
    _, s_text = late_interaction_scores(images.half().float(), texts, mask)
    loss = multi_positive_clip_loss(scale * s_image, scale * s_text.T)
    loss.backward()
    want = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
    # the loss to float rounding; the gradients to float16's (each rank's share is rounded before the sum)
    assert abs(got["loss"] - loss.item()) <= 1e-6 * abs(loss.item())
    errors = {name: relative_error(got["grads"][name], want[name]) for name in want}
    assert max(errors.values()) <= 2e-3, max(errors.items(), key=lambda kv: kv[1])
    full, _ = step.compute_loss(step(batch), batch)  # one process: nothing gathered, full precision
    assert abs(full.item() - loss.item()) > 1e-5 * abs(loss.item())  # so the rounding above is what was tested


def test_filip_token_reduction_across_two_ranks_is_its_definition_on_the_concatenated_batch(tmp_path):
    from clipforge.objectives.contrastive import multi_positive_clip_loss
    from clipforge.objectives.filip import late_interaction_scores, most_matched_tokens

    got = two_ranks_report(tmp_path, _filip_keep_worker)
    step, batch = _filip_keep_step(), global_batch(WORLD * B, 1, False)
    out = step(batch)
    images, texts, scale = out["image_token_embeds"], out["text_token_embeds"], out["logit_scale"]
    mask = batch["attention_mask"][:, :texts.shape[1]]
    sent = [(most_matched_tokens(images[r * B:(r + 1) * B], None, texts[r * B:(r + 1) * B], mask[r * B:(r + 1) * B],
                                 FILIP_KEEP),
             most_matched_tokens(texts[r * B:(r + 1) * B], mask[r * B:(r + 1) * B], images[r * B:(r + 1) * B], None,
                                 FILIP_KEEP)) for r in range(WORLD)]
    sent_images, sent_image_mask = (torch.cat(x) for x in zip(*(s[0] for s in sent)))
    sent_texts, sent_text_mask = (torch.cat(x) for x in zip(*(s[1] for s in sent)))
    assert sent_texts.shape[1] < texts.shape[1] and sent_images.shape[1] < images.shape[1]  # less is sent
    s_image, _ = late_interaction_scores(images, sent_texts, sent_text_mask)
    _, s_text = late_interaction_scores(sent_images, texts, mask, image_mask=sent_image_mask)
    loss = multi_positive_clip_loss(scale * s_image, scale * s_text.T)
    loss.backward()
    want = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
    assert_same_as_one_process(got, loss.item(), want)
    # and it is not the full-token loss: the reduction changed what was computed
    full, _ = step.compute_loss(step(batch), batch)
    assert abs(full.item() - loss.item()) > 1e-4


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    results = tmp_path_factory.mktemp("method_ranks") / "report.pt"
    spawn_ranks(_worker, results)
    return torch.load(results, weights_only=True)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_on_the_concatenated_batch(report, case):
    step, captions, weighted = build(case)
    want_loss, want = run_step(step, step, global_batch(WORLD * B, captions, weighted))
    got = report[case]
    assert abs(got["loss"] - want_loss) <= TOL * abs(want_loss), (got["loss"], want_loss)
    assert set(got["grads"]) == set(want) and len(want) > 10
    if "term-with-parameter" in case:
        assert "objective.terms.1.log_scale" in want  # the term's own parameter is in every step's graph
    errors = {name: relative_error(got["grads"][name], want[name]) for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, (worst, errors[worst])
