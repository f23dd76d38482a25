"""SLIP and the improved-baseline knobs (methods.md section 12): NT-Xent against a loop written from the
paper, SLIP's step (ssl_scale 0 = CLIP exactly; 2 processes == 1), the SSL views, the strong policy and
EDA in the data workers (seeded, exact on resume, the plain stream untouched when off)."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.config import RecipeError, load_recipe
from clipforge.data.loader import build_train_loader
from clipforge.data.text_augment import EDA, STOP_WORDS, caption_words, find_wordnet
from clipforge.objectives.contrastive import clip_loss
from clipforge.objectives.selfsup import simclr_loss

from test_distributed import WORLD


# ----------------------------------------------------------------------------- NT-Xent
def nt_xent_by_the_paper(z1, z2, tau):
    """SimCLR's loss written pair by pair: 2B anchors; for anchor k the positive is its other view,
    the denominator runs over the 2B - 1 other embeddings (self excluded)."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    b = z1.shape[0]
    total = 0.0
    for k in range(2 * b):
        positive = (k + b) % (2 * b)
        others = [j for j in range(2 * b) if j != k]
        assert len(others) - 1 == 2 * b - 2  # 2B - 2 negatives
        sims = torch.stack([z[k] @ z[j] / tau for j in others])
        total = total - (z[k] @ z[positive] / tau - torch.logsumexp(sims, 0))
    return total / (2 * b)


def test_nt_xent_matches_the_paper_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    want = nt_xent_by_the_paper(a, b, 0.1)
    got = simclr_loss(a, b, 0.1)
    assert torch.allclose(got.double(), want, rtol=1e-5)
    ga = torch.autograd.grad(got, [a, b])
    wa = torch.autograd.grad(want, [a, b])
    for x, y in zip(ga, wa):
        assert torch.allclose(x.double(), y, rtol=1e-4, atol=1e-6)


def test_nt_xent_masks_self_similarity():
    # with the diagonal left in, identical views would put each anchor's own (largest) similarity in
    # the denominator twice; the masked loss of identical views is exactly log(2B - 1) for orthogonal rows
    z = torch.eye(4)
    assert math.isclose(float(simclr_loss(z, z, 1.0)), -1 + math.log(math.e + 2 * 4 - 2), rel_tol=1e-6)


# ----------------------------------------------------------------------------- the SLIP step
# a method recipe shrunk to a 16 px, 16-wide model on shapes (also tests/test_clip_rocket.py)
TINY = ["data.train=shapes", "model.image_size=16", "model.patch_size=8", "model.vision_width=16",
        "model.vision_layers=1", "model.vision_heads=2", "model.text_width=16", "model.text_layers=1",
        "model.text_heads=2", "model.embed_dim=16", "model.vocab_size=64", "model.context_length=8",
        "data.tokenizer.vocab_size=64"]


def build_tiny_step(recipe):
    from clipforge.train.trainer import build_step

    torch.manual_seed(0)
    return build_step(recipe, torch.device("cpu"), log=False).train()


def with_frozen_bn(step):
    """BatchNorm in the heads normalises per rank (as in the papers): compare ranks with running statistics."""
    for m in step.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.eval()
    return step


def slip_recipe(*extra: str):
    return load_recipe("slip-cifar", [*TINY, "method.simclr_hidden=32", "method.simclr_out=8", *extra])


def build_slip(*extra: str):
    return build_tiny_step(slip_recipe(*extra))


def slip_batch(n: int = 6, seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n,), generator=g)
    return {"images": torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g),
            "views": torch.randint(0, 256, (n, 2, 3, 16, 16), dtype=torch.uint8, generator=g),
            "input_ids": torch.randint(1, 64, (n, 8), generator=g),
            "attention_mask": (torch.arange(8)[None, :] < lengths[:, None]).long()}


def test_slip_loss_is_clip_plus_simclr_on_the_two_views():
    step = build_slip()
    batch = slip_batch()
    out = step(batch)
    loss, metrics = step.compute_loss(out, batch)
    z1, z2 = out["simclr"]
    assert not torch.allclose(z1, z2)  # two different views
    want = clip_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"]) + simclr_loss(z1, z2, 0.1)
    assert torch.allclose(loss, want)
    assert metrics["simclr/loss"] > 0
    loss.backward()  # the views train the image tower, the head trains
    assert step.simclr_head[0].weight.grad is not None
    assert step.model.visual.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_the_head_normalises_each_view_on_its_own_or_both_in_one_call():
    """SLIP's code calls its head once per view: BatchNorm statistics over one view's samples (default);
    ``joint`` sends both views in one call. Equal with running statistics, different with batch ones."""
    batch = slip_batch()
    per_view, joint = build_slip(), build_slip("method.view_batchnorm=joint")
    joint.load_state_dict(per_view.state_dict())
    for step in (per_view, joint):  # first with running statistics (nothing updated yet)
        step.simclr_head.eval()
    a, b = per_view(batch)["simclr"], joint(batch)["simclr"]
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))
    per_view.simclr_head.train(), joint.simclr_head.train()
    out = per_view(batch)
    pooled = per_view.model.visual(per_view.model.normalize_images(batch["views"].flatten(0, 1)))["pooled"]
    pooled = pooled.view(len(pooled) // 2, 2, -1)
    for v in (0, 1):  # the head on one view's rows alone
        assert torch.allclose(out["simclr"][v], per_view.simclr_head(pooled[:, v]), atol=1e-6)
    assert not torch.allclose(out["simclr"][0], joint(batch)["simclr"][0], atol=1e-4)


def test_ssl_scale_zero_is_the_plain_clip_step_exactly():
    from clipforge.train.trainer import build_step

    batch = slip_batch()
    slip = build_slip("method.ssl_scale=0")
    torch.manual_seed(0)
    plain_recipe = slip_recipe().model_copy(update={"method": load_recipe("tiny-shapes").method})
    clip = build_step(plain_recipe, torch.device("cpu"), log=False).train()
    losses = []
    for step in (slip, clip):
        loss, _ = step.compute_loss(step(batch), batch)
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(slip.model.named_parameters(), clip.model.parameters()):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad), name


def test_slip_without_views_is_refused_with_the_fix():
    with pytest.raises(RecipeError, match="data.ssl_views = 2"):
        load_recipe("slip-cifar", ["data.ssl_views=0"])
    step = build_slip()
    batch = slip_batch()
    del batch["views"]
    with pytest.raises(ValueError, match="data.ssl_views = 2"):
        step(batch)


def build_slip_with_frozen_bn():
    return with_frozen_bn(build_slip("model.patch_dropout=0"))


def _worker(rank, port, results):
    from test_method_distributed import one_step_on_rank

    full = slip_batch(2 * WORLD)
    one_step_on_rank(rank, port, results, build_slip_with_frozen_bn,
                     {k: v[rank * 2:(rank + 1) * 2] for k, v in full.items()})


def test_two_ranks_equal_one_process(tmp_path):
    from test_method_distributed import assert_same_as_one_process, run_step, two_ranks_report

    got = two_ranks_report(tmp_path, _worker)
    step = build_slip_with_frozen_bn()
    want_loss, want = run_step(step, step, slip_batch(2 * WORLD))
    assert "simclr_head.0.weight" in want
    assert_same_as_one_process(got, want_loss, want, tol=1e-5)


# ----------------------------------------------------------------------------- views and the strong policy
def shapes_loader(*extra: str, start: int = 0, workers: int = 0):
    r = load_recipe("tiny-shapes", ["data.batch_size=4", f"data.num_workers={workers}", *extra])
    return build_train_loader(r.data, r.model.image_size, None, start)


def test_ssl_views_are_two_different_seeded_crops_and_the_clip_image_is_unchanged():
    plain = next(shapes_loader())
    a = next(shapes_loader("data.ssl_views=2"))
    b = next(shapes_loader("data.ssl_views=2"))
    assert a["views"].shape == (4, 2, 3, 32, 32) and a["views"].dtype == torch.uint8
    assert torch.equal(a["views"], b["views"])  # a pure function of the sample
    assert not torch.equal(a["views"][:, 0], a["views"][:, 1])
    assert torch.equal(a["images"], plain["images"]) and a["captions"] == plain["captions"]
    assert "views" not in plain


def test_views_resume_exactly_and_do_not_depend_on_workers():
    it = shapes_loader("data.ssl_views=2", "data.augment.policy=strong")
    next(it)
    second = next(it)
    resumed = next(shapes_loader("data.ssl_views=2", "data.augment.policy=strong", start=4, workers=1))
    assert torch.equal(second["views"], resumed["views"]) and torch.equal(second["images"], resumed["images"])


def test_strong_policy_changes_the_pixels_and_leaves_the_global_rng_alone():
    plain = next(shapes_loader())
    torch.manual_seed(5)
    strong = next(shapes_loader("data.augment.policy=strong"))
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))  # the workers' draws do not move the trainer's RNG
    assert not torch.equal(plain["images"], strong["images"])
    assert strong["images"].dtype == torch.uint8 and strong["images"].shape == plain["images"].shape


def test_the_photometric_policy_seeds_the_cpu_generator_only(monkeypatch):
    """With num_workers = 0 on a GPU, reseeding CUDA from each image's seed would tie the run's GPU draws
    (patch dropout, dropout) to the data; fork_rng(devices=[]) would not restore it."""
    import random

    from clipforge.data.views import photometric

    def no_cuda_seed(seed):
        raise AssertionError("the photometric policy reseeded the CUDA generators")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", no_cuda_seed)
    pixels = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    first = [photometric(pixels, random.Random(seed)) for seed in range(4)]
    again = [photometric(pixels, random.Random(seed)) for seed in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # still seeded: the same draw per seed
    assert not all(torch.equal(first[0], f) for f in first[1:])


@pytest.fixture
def image_folder(tmp_path):
    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    return tmp_path


def test_views_and_eda_on_sources_on_disk_resume_exactly(image_folder):
    from clipforge.data.pipeline import build_source_train_loader

    r = load_recipe("tiny-shapes", [f"data.train=imagefolder:{image_folder}", "data.batch_size=3", "data.num_workers=0",
                                    "data.ssl_views=2", "data.augment.policy=strong", "data.text_augment=eda",
                                    "data.eda.synonyms=none", "data.eda.p=1", "data.eda.ops=['rs','rd','sw']"])
    plain = load_recipe("tiny-shapes", [f"data.train=imagefolder:{image_folder}", "data.batch_size=3",
                                        "data.num_workers=0"])
    loader = build_source_train_loader(r.data, 32, None)
    first = next(loader)
    state = loader.state_dict()
    second = next(loader)
    assert first["views"].shape == (3, 2, 3, 32, 32)
    resumed = next(build_source_train_loader(r.data, 32, None, state=state))
    assert torch.equal(second["views"], resumed["views"]) and torch.equal(second["images"], resumed["images"])
    assert second["captions"] == resumed["captions"]
    base = next(build_source_train_loader(plain.data, 32, None))
    assert base["keys"] == first["keys"]  # the same samples in the same order: the plan is untouched
    assert not torch.equal(base["images"], first["images"])  # the strong policy changed the pixels
    assert all(c != "a photo of a {}." for c in first["captions"])


# ----------------------------------------------------------------------------- EDA
THESAURUS = {"photo": ["picture", "snapshot"], "cat": ["kitty"], "small": ["little", "tiny"]}


def eda(**kw) -> EDA:
    return EDA(synonyms=THESAURUS, **kw)


def test_eda_is_seeded():
    e = eda(alpha=0.3, p=1.0, ops=("sr", "ri", "rs", "rd"))
    text = "a small photo of a cat sitting on the old red mat"
    outs = [e(text, random.Random(s)) for s in range(40)]
    assert outs == [e(text, random.Random(s)) for s in range(40)]
    assert len(set(outs)) > 10


@pytest.mark.parametrize("op", ["sr", "ri", "rs", "rd", "sw"])
def test_every_operation_keeps_at_least_one_word(op):
    e = eda(alpha=1.0, p=1.0, ops=(op,))
    for text in ["cat", "a", "of the", "the of a an", "a small photo", "!!", ""]:
        for s in range(30):
            out = e(text, random.Random(s))
            assert out.split() or not caption_words(text), (op, text, out)


def test_operations_do_what_eda_says():
    text = "a small photo of a cat on the mat"
    words = caption_words(text)
    for s in range(20):
        rng = random.Random(s)
        swapped = eda(ops=("rs",), p=1.0, alpha=0.2)(text, rng).split()
        assert sorted(swapped) == sorted(words)  # a permutation
        kept = eda(ops=("rd",), p=1.0, alpha=0.3)(text, random.Random(s)).split()
        it = iter(words)
        assert all(w in it for w in kept)  # a subsequence
        assert eda(ops=("sw",), p=1.0)(text, random.Random(s)).split() == [w for w in words if w not in STOP_WORDS]
        replaced = eda(ops=("sr",), p=1.0, alpha=0.2)(text, random.Random(s)).split()
        changed = [(a, b) for a, b in zip(words, replaced) if a != b]
        assert len(replaced) == len(words) and len(changed) == 1 and changed[0][1] in THESAURUS[changed[0][0]]
        inserted = eda(ops=("ri",), p=1.0, alpha=0.2)(text, random.Random(s)).split()
        extra = list(inserted)
        for w in words:
            extra.remove(w)
        assert len(extra) == 1 and any(extra[0] in v for v in THESAURUS.values())
    assert eda(p=0.0)(text, random.Random(0)) == " ".join(words)  # p = 0: only EDA's clean-up


needs_wordnet = pytest.mark.skipif(find_wordnet() is None and not os.environ.get("CI"),
                                   reason="no WordNet database (apt-get install wordnet-base); CI installs it")


@needs_wordnet
def test_wordnet_synonyms_are_read_from_the_database_files():
    e = EDA(p=1.0, ops=("sr",))
    assert "picture" in e.synonyms["photo"] and "photograph" in e.synonyms["photo"]
    assert "photo" not in e.synonyms["photo"]
    assert all(w == w.lower() and "_" not in w for w in e.synonyms["ice cream"])


def test_missing_wordnet_and_bad_thesaurus_say_what_to_do(tmp_path, monkeypatch):
    import clipforge.data.text_augment as T

    monkeypatch.setattr(T, "wordnet_dirs", lambda: [tmp_path / "nowhere"])
    with pytest.raises(ValueError, match="apt-get install wordnet-base"):
        EDA(synonyms="wordnet")
    bad = tmp_path / "syn.json"
    bad.write_text(json.dumps(["not", "a", "table"]))
    with pytest.raises(ValueError, match="JSON object mapping words"):
        EDA(synonyms=str(bad))
    with pytest.raises(RecipeError, match="data.eda.ops"):
        load_recipe("tiny-shapes", ["data.eda.ops=[]"])


def test_eda_on_shapes_changes_captions_seeded_and_leaves_images(tmp_path):
    path = tmp_path / "syn.json"
    path.write_text(json.dumps({"circle": ["ring"], "square": ["box"]}))
    extra = ["data.text_augment=eda", f"data.eda.synonyms={path}", "data.eda.p=1"]
    plain = next(shapes_loader())
    a, b = next(shapes_loader(*extra)), next(shapes_loader(*extra))
    assert a["captions"] == b["captions"] and a["captions"] != plain["captions"]
    assert torch.equal(a["images"], plain["images"])


def test_eda_on_shapes_never_names_a_held_out_pair(tmp_path):
    """Held-out colour-shape pairs stay out of training text under EDA too: a thesaurus that maps
    every colour to the other colours and every shape to the other shapes makes EDA name held-out
    pairs often; the loader puts those captions back as they were, with nothing else changed."""
    from clipforge.data.synthetic import COLOURS, SHAPES, ShapesDataset, held_out_pairs, named_pairs
    from clipforge.data.views import SampleAugmenter, shapes_augment_rng

    path = tmp_path / "syn.json"
    path.write_text(json.dumps({**{s: [t for t in SHAPES if t != s] for s in SHAPES},
                                **{c: [d for d in COLOURS if d != c] for c in COLOURS}}))
    extra = ["data.text_augment=eda", f"data.eda.synonyms={path}", "data.eda.p=1", "data.eda.ops=['sr','ri']",
             "data.eda.alpha=0.5", "data.batch_size=64"]
    recipe = load_recipe("tiny-shapes", extra)
    held = frozenset(held_out_pairs(recipe.data.shapes))
    loader = build_train_loader(recipe.data, recipe.model.image_size, None, 0)
    guarded = [c for _, batch in zip(range(4), loader) for c in batch["captions"]]
    assert guarded and not any(named_pairs(c) & held for c in guarded)
    # the same samples through EDA without the guard: many name a held-out pair; only those differ
    dataset = ShapesDataset(recipe.data.shapes, recipe.model.image_size, seed=recipe.data.seed)
    augmenter = SampleAugmenter(recipe.data, recipe.model.image_size)
    originals = [dataset.sample(i)[1] for i in range(len(guarded))]
    free = [augmenter.captions([c], shapes_augment_rng(recipe.data.seed, i))[0] for i, c in enumerate(originals)]
    leaked = [i for i, c in enumerate(free) if named_pairs(c) & held]
    assert len(leaked) > 10
    assert all(guarded[i] == (" ".join(originals[i].lower().split()) if i in leaked else free[i])
               for i in range(len(guarded)))


# ----------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_slip_with_strong_policy_and_eda_sigkill_then_resume_is_exact(tmp_path):
    from test_method_resume import check_kill_and_resume

    check_kill_and_resume(tmp_path, "slip-cifar", "[method]\nsimclr_hidden = 32\nsimclr_out = 16\n", 12, 6,
                          "--set", "data.train=shapes", "--set", "data.augment.policy=strong",
                          "--set", "data.text_augment=eda", "--set", "data.eda.synonyms=none", "--set", "data.eda.p=1")


def test_the_improved_baseline_knobs_round_trip_through_recipe_toml():
    from clipforge.config import recipe_to_toml, validate_recipe
    import tomllib

    r = load_recipe("tiny-shapes", ["data.text_augment=eda", "data.eda.synonyms=none", "data.augment.policy=strong",
                                    "data.ssl_views=2", "data.eda.ops=['sw','rd']"])
    assert r.data.eda.synonyms == "none"
    assert validate_recipe(tomllib.loads(recipe_to_toml(r))) == r


def test_the_checkpoint_says_when_training_used_the_strong_policy():
    from clipforge.data.augment import describe_train_preprocess

    plain = load_recipe("tiny-shapes").data.augment
    strong = load_recipe("tiny-shapes", ["data.augment.policy=strong"]).data.augment
    assert "policy" not in describe_train_preprocess(plain, 32)
    assert describe_train_preprocess(strong, 32)["policy"]["name"] == "strong"
