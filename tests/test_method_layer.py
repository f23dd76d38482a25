"""The method layer: token selection, EMA teachers, A-CLIP's pieces, FILIP's late interaction,
multi-positive losses, recipe composition checks and terms registered from outside the package."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipforge.config import ModelConfig, RecipeError, TeacherConfig, load_recipe
from clipforge.models.clip import CLIP
from clipforge.objectives.contrastive import clip_loss, multi_positive_clip_loss
from clipforge.objectives.filip import late_interaction_scores
from clipforge.objectives.sigmoid import siglip_loss
from clipforge.train.step import attention_keep_scores, attentive_keep_indices, cosine_momentum
from clipforge.train.teachers import EmaTeacher, ema_update_


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(image_size=16, patch_size=4, vision_width=16, vision_layers=2, vision_heads=2, vocab_size=64,
                context_length=8, text_width=16, text_layers=1, text_heads=2, embed_dim=16)
    return ModelConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- token selection (A-CLIP)
def test_attentive_selection_keeps_exactly_the_top_blocks():
    grid, block = 4, 2  # 4 blocks of 2x2 patches
    scores = torch.zeros(1, 16)
    # block (row 1, col 0) = patches 8, 9, 12, 13 scores highest; block (0, 1) next
    scores[0, [8, 9, 12, 13]] = 5.0
    scores[0, [2, 3, 6, 7]] = 3.0
    keep = attentive_keep_indices(scores, grid, drop_ratio=0.5, block=block)
    assert keep.tolist() == [[2, 3, 6, 7, 8, 9, 12, 13]]
    # as many tokens as FLIP keeps at the same ratio: equal compute
    assert keep.shape[1] == int(16 * 0.5)


def test_attentive_selection_ties_are_deterministic_and_per_sample():
    scores = torch.ones(3, 64)  # all equal: the lowest block indices win, every time
    a = attentive_keep_indices(scores, 8, 0.5, 2)
    b = attentive_keep_indices(scores.clone(), 8, 0.5, 2)
    assert torch.equal(a, b) and a.shape == (3, 32)
    # 8 blocks of 2x2 on a 4x4 grid of blocks: blocks 0..7 are the top two block rows = patch rows 0..3
    assert a.tolist() == [list(range(32))] * 3
    scores = torch.rand(3, 64, generator=torch.Generator().manual_seed(0))
    keep = attentive_keep_indices(scores, 8, 0.5, 1)
    top = scores.topk(32, dim=1).indices.sort(dim=1).values
    assert torch.equal(keep, top)  # block 1 = plain top-k per sample


def test_keep_scores_average_heads_and_layers():
    layer1 = torch.tensor([[[0.1, 0.9], [0.3, 0.7]]])  # N=1, H=2, P=2
    layer2 = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])
    assert torch.allclose(attention_keep_scores([layer1, layer2]), torch.tensor([[0.35, 0.65]]))


def test_vit_keeps_original_positions_for_attentive_indices():
    torch.manual_seed(0)
    model = CLIP(tiny_cfg()).eval()
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    ids = torch.randint(1, 64, (2, 8))
    keep = attentive_keep_indices(torch.rand(2, 16), 4, 0.5, 2)
    out = model(images, ids, need={"kept_indices", "image_tokens"}, keep_indices=keep)
    assert torch.equal(out["kept_indices"], keep) and out["image_tokens"].shape == (2, 8, 16)


# ----------------------------------------------------------------------------- EMA teacher
def _ema_cfg(**kw) -> TeacherConfig:
    return TeacherConfig(name="ema", kind="ema", **kw)


def test_ema_update_with_m1_keeps_the_teacher_and_with_m0_copies_the_student():
    torch.manual_seed(0)
    student = CLIP(tiny_cfg())
    teacher = EmaTeacher(student, _ema_cfg())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    ema_update_(teacher.module, student, 1.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.module.state_dict().items())
    ema_update_(teacher.module, student, 0.0)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in teacher.module.state_dict().items())
    other = CLIP(tiny_cfg())
    ema_update_(teacher.module, other, 0.25)  # 0.25 * teacher + 0.75 * other
    want = 0.25 * student.visual.pos_embed + 0.75 * other.visual.pos_embed
    assert torch.allclose(teacher.module.visual.pos_embed, want, atol=1e-6)


def test_ema_momentum_schedule_runs_from_0996_to_1():
    assert cosine_momentum(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_momentum(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    values = [cosine_momentum(s, 100, 0.996, 1.0) for s in range(101)]
    assert values == sorted(values)  # monotone
    teacher = EmaTeacher(CLIP(tiny_cfg()), _ema_cfg(momentum_schedule="constant", momentum=0.9))
    assert teacher.momentum_at(50, 100) == 0.9


def test_ema_teacher_is_frozen_and_never_trains():
    student = CLIP(tiny_cfg())
    teacher = EmaTeacher(student, _ema_cfg())
    teacher.train()
    assert not teacher.training and not teacher.module.training
    assert all(not p.requires_grad for p in teacher.parameters())


# ----------------------------------------------------------------------------- the A-CLIP step
def aclip_recipe(*extra: str):
    return load_recipe("aclip-shapes", ["model.image_size=16", "model.patch_size=4", "model.vision_width=16",
                                         "model.vision_layers=2", "model.vision_heads=2", "model.text_width=16",
                                         "model.text_layers=1", "model.text_heads=2", "model.embed_dim=16",
                                         "model.vocab_size=64", "model.context_length=8",
                                         "data.tokenizer.vocab_size=64", "method.simclr_hidden=32",
                                         "method.simclr_out=8", "method.byol_hidden=32", "method.byol_out=8",
                                         *extra])


def build_aclip(*extra: str):
    from clipforge.train.trainer import build_step

    torch.manual_seed(0)
    return build_step(aclip_recipe(*extra), torch.device("cpu"), log=False).train()


def aclip_batch(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return {"images": torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g),
            "input_ids": torch.randint(1, 64, (n, 8), generator=g),
            "attention_mask": torch.ones(n, 8, dtype=torch.long)}


def _aclip_scores(step, batch, seed: int = 5) -> torch.Tensor:
    """The patch scores the step hands to the view masking (same crops: the boxes are seeded)."""
    seen = []
    real = step.view_keep_indices
    step.view_keep_indices = lambda scores, boxes: (seen.append(scores.clone()), real(scores, boxes))[1]
    torch.manual_seed(seed)
    step(batch)
    del step.view_keep_indices
    return seen[0]


def test_aclip_scores_come_from_the_ema_teacher_without_gradient():
    step = build_aclip()
    batch = aclip_batch()
    loss, _ = step.compute_loss(step(batch), batch)
    loss.backward()
    assert all(p.grad is None for p in step.teachers["ema"].parameters())
    assert all(p.grad is None for p in step.ema_projector.parameters())
    assert step.model.visual.blocks[0].attn.qkv.weight.grad is not None
    # the scores are the EMA model's: moving the student leaves them, moving the teacher changes them
    before = _aclip_scores(step, batch)
    assert not before.requires_grad
    with torch.no_grad():
        for p in step.model.visual.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert torch.equal(_aclip_scores(step, batch), before)
    with torch.no_grad():
        for p in step.teachers["ema"].module.visual.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert not torch.allclose(_aclip_scores(step, batch), before)


def test_aclip_simclr_uses_two_different_views_and_the_total_weights_them():
    from clipforge.objectives.selfsup import byol_loss, simclr_loss

    step = build_aclip()
    batch = aclip_batch()
    out = step(batch)
    loss, metrics = step.compute_loss(out, batch)
    z1, z2 = out["simclr"]
    assert not torch.allclose(z1, z2)  # the released code's bug fed view 1 twice
    assert metrics["simclr/loss"] == pytest.approx(float(simclr_loss(z1, z2, 0.1)), rel=1e-6)
    assert abs(float(simclr_loss(z1, z1, 0.1)) - float(metrics["simclr/loss"])) > 1e-3  # the bug's value differs
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    assert simclr_loss(a, a, 0.1) < simclr_loss(a, b, 0.1)  # identical views: the known lower value
    # BYOL: each view's prediction against sg(EMA projector(EMA [CLS] of v_e)), averaged over the views
    target = out["byol_target"]
    assert not target.requires_grad
    byol = sum(byol_loss(p, target) for p in out["byol"]) / 2
    assert metrics["byol/loss"] == pytest.approx(float(byol), rel=1e-6)
    scale = out["logit_scale"]
    contrastive = sum(clip_loss(v["image_embeds"], out["text_embeds"], scale) for v in out["views"]) / 2
    # the paper's weights: 1 x SimCLR + 2 x BYOL
    assert torch.allclose(loss, contrastive + simclr_loss(z1, z2, 0.1) + 2 * byol)


def test_aclip_with_ssl_weights_zero_is_the_mean_of_two_clip_losses():
    step = build_aclip("method.simclr_weight=0", "method.byol_weight=0")
    batch = aclip_batch()
    out = step(batch)
    loss, metrics = step.compute_loss(out, batch)
    scale = out["logit_scale"]
    want = sum(clip_loss(v["image_embeds"], out["text_embeds"], scale) for v in out["views"]) / 2
    assert torch.allclose(loss, want)
    assert metrics["simclr/loss"] > 0 and metrics["byol/loss"] > 0  # still computed and logged


def test_aclip_views_keep_half_the_patches_and_eval_keeps_all():
    step = build_aclip()
    out = step.model(aclip_batch()["images"], None, need={"kept_indices"},
                     keep_indices=step.view_keep_indices(torch.rand(6, 16), torch.tensor([[0.1, 0.1, 0.8, 0.8]] * 6)))
    assert out["kept_indices"].shape == (6, 8)
    step.eval()
    assert step.model(aclip_batch()["images"], None, need={"kept_indices"})["kept_indices"].shape == (6, 16)


def test_aclip_refuses_a_recipe_without_an_ema_teacher(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('base = "tiny-shapes"\n[method]\nname = "aclip"\n')
    with pytest.raises(RecipeError, match=r"EMA teacher named 'ema'.*\[\[teachers\]\]"):
        load_recipe(str(recipe))


def test_incompatible_combinations_are_refused_with_the_reason():
    with pytest.raises(RecipeError, match="needs model.vision_pool = 'cls'"):
        load_recipe("tiny-shapes", ["model.token_selection=attentive", "model.patch_dropout=0.5",
                                    "model.vision_pool=mean"])
    with pytest.raises(RecipeError, match="set model.patch_dropout > 0"):
        load_recipe("tiny-shapes", ["model.token_selection=attentive"])
    with pytest.raises(RecipeError, match="gradcache"):
        load_recipe("aclip-shapes", ["train.accum_mode=gradcache"])
    with pytest.raises(RecipeError, match=r"unknown method 'aclp'\. Did you mean 'aclip'"):
        load_recipe("tiny-shapes", ["method.name=aclp"])
    with pytest.raises(RecipeError, match=r"objective.terms.0.chunk"):
        load_recipe("filip-shapes", ["objective.terms.0.chunk=0"])


# ----------------------------------------------------------------------------- FILIP
def slow_late_interaction(img, txt, txt_mask):
    """One pair at a time, padding removed by slicing."""
    ni, nt = img.shape[0], txt.shape[0]
    s_i, s_t = torch.zeros(ni, nt), torch.zeros(ni, nt)
    for i in range(ni):
        for j in range(nt):
            words = txt[j][txt_mask[j].bool()]
            sim = img[i] @ words.T  # n1 x n2
            s_i[i, j] = sim.max(dim=1).values.mean()
            s_t[i, j] = sim.max(dim=0).values.mean()
    return s_i, s_t


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_filip_vectorised_equals_the_pairwise_loop_and_chunks_do_not_matter():
    img, txt = unit(5, 7, 8), unit(6, 4, 8, seed=1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    want_i, want_t = slow_late_interaction(img, txt, mask)
    for chunk in (1, 4, 64):
        s_i, s_t = late_interaction_scores(img, txt, mask, chunk=chunk)
        assert torch.allclose(s_i, want_i, atol=1e-6) and torch.allclose(s_t, want_t, atol=1e-6)
    assert not torch.allclose(want_i, want_t)  # asymmetric
    only_i, none_t = late_interaction_scores(img, txt, mask, chunk=4, sides="image")
    none_i, only_t = late_interaction_scores(img, txt, mask, chunk=4, sides="text")
    assert none_t is None and none_i is None  # one direction computed, the other not at all
    assert torch.allclose(only_i, want_i, atol=1e-6) and torch.allclose(only_t, want_t, atol=1e-6)
    with pytest.raises(ValueError, match="sides must be"):
        late_interaction_scores(img, txt, mask, sides="rows")


def test_filip_one_token_each_is_the_cosine_and_padding_is_ignored():
    img, txt = unit(3, 1, 8), unit(4, 1, 8, seed=1)
    s_i, s_t = late_interaction_scores(img, txt)
    cos = img[:, 0] @ txt[:, 0].T
    assert torch.allclose(s_i, cos, atol=1e-6) and torch.allclose(s_t, cos, atol=1e-6)
    # padding tokens, even ones identical to image tokens (similarity 1), change nothing
    txt2, mask = unit(4, 3, 8, seed=2), torch.tensor([[1, 0, 0]] * 4)
    padded = txt2.clone()
    padded[:, 1:] = img[0, 0]
    a = late_interaction_scores(img, txt2, mask)
    b = late_interaction_scores(img, padded, mask)
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    # image-side padding (token_keep's sent images): equal to dropping the padded patches by hand
    img3 = unit(3, 4, 8, seed=3)
    image_mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    img3_padded = img3.clone()
    img3_padded[image_mask == 0] = txt2[0, 0]  # padding identical to a real word: similarity 1
    s_i, s_t = late_interaction_scores(img3_padded, txt2, mask, image_mask=image_mask)
    for i in range(3):
        real = img3[i : i + 1, : int(image_mask[i].sum())]
        want_i, want_t = late_interaction_scores(real, txt2, mask)
        assert torch.allclose(s_i[i], want_i[0], atol=1e-6) and torch.allclose(s_t[i], want_t[0], atol=1e-6)


def test_filip_loss_uses_s_image_for_rows_and_s_text_for_columns():
    from clipforge.objectives.filip import filip_loss

    img, txt = unit(4, 5, 8), unit(4, 3, 8, seed=1)
    mask = torch.ones(4, 3, dtype=torch.long)
    scale = torch.tensor(10.0)
    loss, s_i, s_t = filip_loss(img, txt, mask, scale)
    labels = torch.arange(4)
    want = (F.cross_entropy(scale * s_i, labels) + F.cross_entropy(scale * s_t.T, labels)) / 2
    assert torch.allclose(loss, want)


def test_filip_token_reduction_keeps_each_samples_best_matched_real_tokens():
    """FILIP's 25 %: per sample, the ceil(keep x real) real tokens whose best match among the other side's
    real tokens is highest (brute force here); padding never sent; gradient only to the sent tokens."""
    import math

    from clipforge.objectives.filip import most_matched_tokens

    txt, img = unit(6, 5, 8, seed=3), unit(4, 7, 8, seed=4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1]])
    txt[1, 2:] = img[0, 0]  # padding identical to an image token (similarity 1) must still not be sent
    txt.requires_grad_()
    for keep in (0.25, 0.5, 1.0):
        picked, kept = most_matched_tokens(txt, mask, img, None, keep, block_elements=60)  # several blocks
        assert picked.shape == (6, math.ceil(keep * 5), 8) and kept.shape == (6, math.ceil(keep * 5))
        for i in range(6):
            real = [r for r in range(5) if mask[i, r]]
            t = txt.detach()
            best = {r: max(float(t[i, r] @ img[j, k]) for j in range(4) for k in range(7)) for r in real}
            want = sorted(real, key=lambda r: -best[r])[:max(1, math.ceil(keep * len(real)))]
            got = [int(torch.nonzero(torch.all(t[i] == picked[i, k], dim=1))[0]) for k in range(kept.shape[1])
                   if kept[i, k]]
            assert got == want, (keep, i, got, want)
    # the image side (no padding), with the texts' padding left out of the other side's tokens
    picked, kept = most_matched_tokens(img, None, txt.detach(), mask, 0.25)
    assert kept.all() and picked.shape == (4, 2, 8)
    hit = [max(float(img[0, k] @ txt.detach()[j, r]) for j in range(6) for r in range(5) if mask[j, r])
           for k in range(7)]
    assert torch.equal(picked[0, 0], img[0, max(range(7), key=hit.__getitem__)])
    # keep = 1 sends every real token: the late-interaction scores against them are the full ones
    picked, kept = most_matched_tokens(txt, mask, img, None, 1.0)
    full = late_interaction_scores(img, txt, mask)
    sent = late_interaction_scores(img, picked, kept)
    assert torch.allclose(full[0], sent[0], atol=1e-6) and torch.allclose(full[1], sent[1], atol=1e-6)
    # gradient reaches exactly the sent tokens
    picked, kept = most_matched_tokens(txt, mask, img, None, 0.5)
    (picked * kept[..., None]).sum().backward()
    touched = txt.grad.abs().sum(-1) > 0
    assert int(touched.sum()) == int(kept.sum()) and not touched[~mask.bool()].any()


# ----------------------------------------------------------------------------- multi-positive losses
def test_multi_positive_clip_with_one_caption_each_is_clip():
    x, y = unit(6, 8), unit(6, 8, seed=1)
    scale = torch.tensor(5.0)
    logits = scale * x @ y.T
    assert torch.allclose(multi_positive_clip_loss(logits, logits.T, torch.arange(6)), clip_loss(x, y, scale))


def test_multi_positive_clip_matches_a_slow_reference_with_weights():
    x, y = unit(3, 8), unit(6, 8, seed=1)  # 2 captions per image
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    w = torch.tensor([1.0, 0.5, 2.0])
    logits = 4.0 * x @ y.T  # 3 x 6
    got = multi_positive_clip_loss(logits, logits.T, owner, weights=w)
    i2t = []
    for i in range(3):
        logp = logits[i].log_softmax(0)
        i2t.append(-w[i] * logp[owner == i].mean())
    t2i = [-w[owner[j]] * logits[:, j].log_softmax(0)[owner[j]] for j in range(6)]
    want = (torch.stack(i2t).mean() + torch.stack(t2i).mean()) / 2
    assert torch.allclose(got, want)


def test_clip_and_siglip_terms_read_text_owner_from_the_batch():
    from clipforge.objectives import build_objective
    from clipforge.config import ObjectiveConfig

    x, y = unit(2, 8), unit(4, 8, seed=1)
    outputs = {"image_embeds": x, "text_embeds": y, "logit_scale": torch.tensor(3.0), "logit_bias": torch.tensor(-1.0)}
    owner = torch.tensor([0, 0, 1, 1])
    siglip = build_objective(ObjectiveConfig.model_validate({"terms": [{"name": "siglip"}]}))
    loss, _ = siglip(outputs, {"text_owner": owner})
    logits = 3.0 * x @ y.T - 1.0
    z = torch.where(owner[None] == torch.arange(2)[:, None], 1.0, -1.0)
    assert torch.allclose(loss, -F.logsigmoid(z * logits).sum() / 2)
    # without owners, the plain loss: unchanged numbers
    loss, _ = siglip({**outputs, "text_embeds": y[:2]}, {})
    assert torch.allclose(loss, siglip_loss(x, y[:2], torch.tensor(3.0), torch.tensor(-1.0)))


# ----------------------------------------------------------------------------- a term from outside the package
PLUGIN = '''
import torch
from pydantic import Field
from clipforge.objectives.base import Term, TermConfig, register_term


class CenteringConfig(TermConfig):
    name: str = "centering"
    momentum: float = Field(0.9, ge=0.0, le=1.0)


@register_term
class Centering(Term):
    """A toy term with a learnable parameter and a buffer updated once per optimiser step."""

    name = "centering"
    Config = CenteringConfig
    needs = frozenset({"image_pooled"})

    def __init__(self, weight=1.0, momentum=0.9):
        super().__init__(weight)
        self.momentum = momentum
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, outputs, batch):
        pooled = outputs["image_pooled"]
        return (self.scale * pooled.mean(0)).pow(2).mean(), {"updates": float(self.updates)}

    def after_optimizer_step(self, step):
        self.updates += 1
'''


def test_a_term_defined_outside_the_package_trains_through_the_cli(tmp_path):
    (tmp_path / "my_terms.py").write_text(PLUGIN)
    recipe = tmp_path / "r.toml"
    recipe.write_text(textwrap.dedent(f'''
        base = "tiny-shapes"
        imports = ["{tmp_path / 'my_terms.py'}"]
        [model]
        vision_width = 32
        vision_heads = 2
        vision_layers = 1
        text_width = 32
        [data]
        batch_size = 8
        num_workers = 0
        [data.tokenizer]
        corpus_size = 300
        [[objective.terms]]
        name = "clip"
        [[objective.terms]]
        name = "centering"
        weight = 0.1
        momentum = 0.5
        [train]
        steps = 4
        checkpoint_every_steps = 2
        [eval]
        at_end = false
        [logging]
        progress = false
        tensorboard = false
    '''))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "clipforge", "train", str(recipe), "--run-dir", str(run)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["centering/updates"] for l in lines] == [0.0, 1.0, 2.0, 3.0]  # state changes once per step
    from safetensors.torch import load_file

    state = load_file(str(run / "checkpoints" / "latest" / "method.safetensors"))
    assert int(state["objective.terms.1.updates"]) == 4  # the term's buffer is checkpointed
    assert float(state["objective.terms.1.scale"]) != 1.0  # and its parameter was trained


def test_the_step_clamps_the_temperature_after_every_optimiser_step():
    """CLIP: t <= 100. The clamp is the step's after-step hook, which every method's hook calls first."""
    step = build_aclip()
    with torch.no_grad():
        step.model.logit_scale.fill_(math.log(150.0))
    step.after_optimizer_step(1)
    assert float(step.model.logit_scale.exp()) == pytest.approx(100.0, rel=1e-5)


def test_filip_training_memory_is_bounded_by_the_chunk():
    """What autograd keeps for backward: the argmax indices of each block, never a block of token-pair
    similarities (amax would keep one per max). The saved floats must stay far below one full B x B x n1 x n2."""
    ni, nt, n1, n2, e = 8, 32, 16, 6, 4
    g = torch.Generator().manual_seed(0)
    images = torch.randn(ni, n1, e, generator=g, requires_grad=True)
    texts = torch.randn(nt, n2, e, generator=g, requires_grad=True)
    mask = torch.ones(nt, n2, dtype=torch.long)
    mask[:, 4:] = 0
    saved = []

    def pack(t):
        saved.append((t.numel(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s_image, s_text = late_interaction_scores(images, texts, mask, chunk=8)
    full_block = ni * nt * n1 * n2
    floats = sum(n for n, dtype in saved if dtype.is_floating_point)
    assert floats < full_block / 4, (floats, full_block)
    (s_image.sum() + s_text.sum()).backward()
    assert images.grad is not None and texts.grad is not None
