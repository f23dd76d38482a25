"""The CLIP model: shapes, normalisation, pooling, causality, logit scale, FLIP masking, extras."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.config import ModelConfig
from clipforge.models.clip import CLIP
from clipforge.models.convert import openclip_state_dict_to_ours
from clipforge.models.vit import random_keep_indices

TINY = dict(
    image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
    vocab_size=100, context_length=12, text_width=32, text_layers=2, text_heads=2, embed_dim=16,
)
N, L = 4, 12
P = (32 // 8) ** 2  # patches per image


def make_model(**overrides) -> CLIP:
    torch.manual_seed(0)
    return CLIP(ModelConfig(**{**TINY, **overrides}))


def make_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=g)
    input_ids = torch.randint(1, 100, (N, L), generator=g)
    lengths = torch.tensor([3, 5, 12, 7])
    attention_mask = (torch.arange(L) < lengths[:, None]).long()
    return images, input_ids * attention_mask, attention_mask


# ----------------------------------------------------------------------------- outputs
def test_forward_shapes_unit_norm_and_no_extras_by_default():
    model = make_model().eval()
    images, ids, mask = make_inputs()
    out = model(images, ids, mask)
    assert set(out) == {"image_embeds", "text_embeds", "logit_scale"}
    assert out["image_embeds"].shape == (N, 16) and out["text_embeds"].shape == (N, 16)
    assert out["logit_scale"].shape == ()
    torch.testing.assert_close(out["image_embeds"].norm(dim=-1), torch.ones(N))
    torch.testing.assert_close(out["text_embeds"].norm(dim=-1), torch.ones(N))
    torch.testing.assert_close(model.encode_image(images), out["image_embeds"])
    torch.testing.assert_close(model.encode_text(ids, mask), out["text_embeds"])


def test_uint8_images_equal_manually_normalised_floats():
    model = make_model().eval()
    images, _, _ = make_inputs()
    cfg = model.cfg
    mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    manual = (images.float() / 255.0 - mean) / std
    torch.testing.assert_close(model.encode_image(images), model.encode_image(manual))
    # and the float path really is taken as-is (unnormalised floats give something else)
    assert not torch.allclose(model.encode_image(images), model.encode_image(images.float()), atol=1e-3)


def test_every_parameter_gets_a_gradient():
    model = make_model(logit_bias_init=-10.0).train()
    images, ids, mask = make_inputs()
    out = model(images, ids, mask)
    loss = (out["image_embeds"] @ out["text_embeds"].T * out["logit_scale"] + out["logit_bias"]).logsumexp(1).mean()
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_state_dict_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model(logit_bias_init=-10.0).eval()
    save_file(model.state_dict(), tmp_path / "model.safetensors")  # fails on shared tensors
    loaded = CLIP(ModelConfig(**model.cfg.model_dump()))
    loaded.load_state_dict(load_file(tmp_path / "model.safetensors"))
    loaded.eval()
    images, ids, mask = make_inputs()
    a, b = model(images, ids, mask), loaded(images, ids, mask)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert "image_mean" not in model.state_dict()  # preprocessing lives in the config


# ----------------------------------------------------------------------------- text tower
def test_text_embedding_reads_end_of_text_from_attention_mask():
    model = make_model().eval()
    _, ids, mask = make_inputs()
    base = model.encode_text(ids, mask)

    after_eot = ids.clone()
    after_eot[0, 3:] = 7  # sample 0 has 3 real tokens: positions 3.. are padding
    after_eot[1, 5:] = 9
    torch.testing.assert_close(model.encode_text(after_eot, mask), base, rtol=0, atol=0)

    before_eot = ids.clone()
    before_eot[0, 1] = (ids[0, 1] + 1) % 100  # a real token of sample 0
    changed = model.encode_text(before_eot, mask)
    assert not torch.allclose(changed[0], base[0], atol=1e-4)
    torch.testing.assert_close(changed[1:], base[1:])  # other samples untouched


def test_text_without_mask_pools_at_last_position():
    model = make_model().eval()
    _, ids, _ = make_inputs()
    torch.testing.assert_close(model.encode_text(ids), model.encode_text(ids, torch.ones_like(ids)))
    shorter = torch.ones_like(ids)
    shorter[:, -1] = 0
    assert not torch.allclose(model.encode_text(ids), model.encode_text(ids, shorter), atol=1e-4)


def test_text_tower_is_causal():
    model = make_model().eval()
    images, ids, _ = make_inputs()
    tokens = model(images, ids, need={"text_tokens"})["text_tokens"]
    assert tokens.shape == (N, L, 32)
    changed_ids = ids.clone()
    changed_ids[:, 6] = (ids[:, 6] + 1) % 100
    changed = model(images, changed_ids, need={"text_tokens"})["text_tokens"]
    torch.testing.assert_close(changed[:, :6], tokens[:, :6], rtol=0, atol=0)  # the past cannot see it
    assert not torch.allclose(changed[:, 6:], tokens[:, 6:], atol=1e-4)


def test_too_long_text_is_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match="context length is 12"):
        model.encode_text(torch.zeros(2, 13, dtype=torch.long))


# ----------------------------------------------------------------------------- pooled token only
def _pooled_and_grads(model: CLIP, images, ids, mask, need: set[str]):
    out = model(images, ids, mask, need=need)
    loss = (out["image_embeds"] * torch.linspace(-1, 1, 16)).sum() + (out["text_embeds"] ** 3).sum()
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return out["image_embeds"], out["text_embeds"], grads


@pytest.mark.parametrize("overrides", [{}, {"patch_dropout": 0.5}], ids=["plain", "flip"])
def test_last_block_on_the_pooled_token_only_equals_the_full_last_block(overrides):
    """Without tokens asked for, each tower's last block runs its query, attention and MLP on the
    pooled token alone (class token / end of text). Same embeddings and gradients as the full
    block, in float64 to rounding (not bitwise: the matmuls have other shapes)."""
    model = make_model(**overrides).double().train()
    images, ids, mask = make_inputs()
    images = images.double()
    keep = random_keep_indices(N, P, 0.5, generator=torch.Generator().manual_seed(1)) if overrides else None
    pooled_only = model(images, ids, mask, keep_indices=keep)
    full = model(images, ids, mask, keep_indices=keep, need={"image_tokens", "text_tokens"})
    for key in ("image_embeds", "text_embeds"):
        torch.testing.assert_close(pooled_only[key], full[key], rtol=0, atol=1e-12)
    if keep is None:  # gradients (FLIP without given indices would draw different patches)
        a = _pooled_and_grads(model, images, ids, mask, set())
        b = _pooled_and_grads(model, images, ids, mask, {"image_tokens", "text_tokens"})
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-12)
        for ga, gb in zip(a[2], b[2]):
            assert (ga is None) == (gb is None)
            if ga is not None:
                torch.testing.assert_close(ga, gb, rtol=0, atol=1e-10)


def test_pooled_token_only_text_sees_no_later_tokens():
    """The end-of-text query attends to positions up to its own: changing padding after it (or a
    mask shorter than the ids) changes nothing, in float32 to 1e-6 of the full path."""
    model = make_model().eval()
    images, ids, mask = make_inputs()
    noisy = torch.where(mask.bool(), ids, torch.randint(1, 100, ids.shape, generator=torch.Generator().manual_seed(3)))
    a = model.encode_text(ids, mask)
    b = model.encode_text(noisy, mask)
    full = model(images, noisy, mask, need={"text_tokens"})["text_embeds"]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(b, full, rtol=0, atol=1e-6)
    no_mask = model(images, ids, None)["text_embeds"]  # pooled at the last position, all visible
    torch.testing.assert_close(no_mask, model(images, ids, None, need={"text_tokens"})["text_embeds"], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- logit scale / bias
def test_logit_scale_init_and_clamp_after_a_large_step():
    model = make_model()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    images, ids, mask = make_inputs()
    assert model(images, ids, mask)["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert "logit_bias" not in model(images, ids, mask) and model.logit_bias is None

    opt = torch.optim.SGD([model.logit_scale], lr=1000.0)
    (-model(images, ids, mask)["logit_scale"]).backward()  # pushes t up, hard
    opt.step()
    assert model.logit_scale.exp().item() > 100  # the step really overshoots...
    model.clamp_logit_scale_()
    assert model(images, ids, mask)["logit_scale"].item() == pytest.approx(100.0)  # ...and the clamp holds t <= 100

    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 0.0  # t >= 1


def test_siglip_init():
    model = make_model(logit_scale_init=math.log(10), logit_bias_init=-10.0)
    images, ids, mask = make_inputs()
    out = model(images, ids, mask)
    assert out["logit_scale"].item() == pytest.approx(10.0)
    assert out["logit_bias"].item() == -10.0
    assert "logit_bias" in dict(model.named_parameters())


# ----------------------------------------------------------------------------- FLIP patch dropout
def test_random_keep_indices_count_uniqueness_and_per_sample_subsets():
    g = torch.Generator().manual_seed(0)
    keep = random_keep_indices(64, 49, 0.5, generator=g)
    assert keep.shape == (64, int(49 * 0.5)) and keep.dtype == torch.long
    for row in keep:
        assert len(set(row.tolist())) == keep.shape[1]  # no patch twice
        assert row.min() >= 0 and row.max() < 49
    assert len({tuple(row.tolist()) for row in keep}) > 60  # different subsets across samples
    assert random_keep_indices(3, 16, 0.75).shape == (3, 4)
    assert torch.equal(random_keep_indices(3, 16, 0.0), torch.arange(16).expand(3, -1))
    with pytest.raises(ValueError, match="drop_ratio"):
        random_keep_indices(3, 16, 1.0)


def test_flip_keeps_int_fraction_of_patches_in_training():
    model = make_model(patch_dropout=0.5).train()
    images, ids, mask = make_inputs()
    out = model(images, ids, mask, need={"kept_indices", "image_tokens"})
    keep = out["kept_indices"]
    assert keep.shape == (N, int(P * 0.5))
    assert out["image_tokens"].shape == (N, int(P * 0.5), 32)
    assert len({tuple(row.tolist()) for row in keep}) > 1


def test_flip_kept_tokens_carry_their_original_positional_embedding():
    model = make_model(patch_dropout=0.75).train()
    images, ids, mask = make_inputs()
    seen = {}
    hook = model.visual.ln_pre.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    out = model(images, ids, mask, need={"kept_indices"})
    hook.remove()
    keep = out["kept_indices"]

    visual = model.visual
    patches = visual.embed_patches(model.normalize_images(images))  # N×P×W (equal to the conv: tested below)
    with_pos = patches + visual.pos_embed[1:]
    expected = torch.stack([with_pos[i, keep[i]] for i in range(N)])  # gather by hand
    cls = (visual.class_token + visual.pos_embed[0]).expand(N, 1, -1)
    torch.testing.assert_close(seen["x"], torch.cat([cls, expected], dim=1), rtol=0, atol=0)


def test_flip_ratio_zero_is_bit_identical_to_the_unmasked_forward():
    images, ids, mask = make_inputs()
    plain = make_model().train()
    unmasked = plain(images, ids, mask, need={"image_tokens"})
    every_patch = torch.arange(P).expand(N, -1)
    explicit = plain(images, ids, mask, need={"image_tokens"}, keep_indices=every_patch)
    assert torch.equal(unmasked["image_embeds"], explicit["image_embeds"])
    assert torch.equal(unmasked["image_tokens"], explicit["image_tokens"])
    # same weights, FLIP configured but evaluated: identical to the plain model in eval mode
    flip = make_model(patch_dropout=0.5)
    flip.load_state_dict(plain.state_dict())
    assert torch.equal(flip.eval()(images, ids, mask)["image_embeds"], plain.eval()(images, ids, mask)["image_embeds"])


def test_flip_never_masks_in_eval_mode():
    model = make_model(patch_dropout=0.75).eval()
    images, ids, mask = make_inputs()
    first = model(images, ids, mask, need={"kept_indices", "image_tokens"})
    second = model(images, ids, mask, need={"image_tokens"})  # the same path, no patches given
    assert torch.equal(first["kept_indices"], torch.arange(P).expand(N, -1))
    assert first["image_tokens"].shape == (N, P, 32)
    assert torch.equal(first["image_embeds"], second["image_embeds"])
    model.train()
    assert not torch.allclose(model(images, ids, mask)["image_embeds"], first["image_embeds"], atol=1e-4)


# ----------------------------------------------------------------------------- extras on request
def test_extras_only_when_asked_and_unknown_names_rejected():
    model = make_model().eval()
    images, ids, mask = make_inputs()
    for name in ["image_tokens", "text_tokens", "cls_attention", "kept_indices"]:
        out = model(images, ids, mask, need={name})
        assert set(out) == {"image_embeds", "text_embeds", "logit_scale", name}
    out = model(images, ids, mask, need={"image_tokens", "text_tokens"})
    assert out["image_tokens"].shape == (N, P, 32) and out["text_tokens"].shape == (N, L, 32)
    with pytest.raises(ValueError, match="unknown extras.*available"):
        model(images, ids, mask, need={"patch_tokens"})


def test_pooled_extras_are_the_features_the_projections_read():
    model = make_model().eval()
    images, ids, mask = make_inputs()
    out = model(images, ids, mask, need={"image_pooled", "text_pooled"})
    torch.testing.assert_close(F.normalize(model.image_projection(out["image_pooled"]), dim=-1), out["image_embeds"])
    torch.testing.assert_close(F.normalize(model.text_projection(out["text_pooled"]), dim=-1), out["text_embeds"])
    cached = model(None, None, text_features=out["text_pooled"], need={"text_pooled"})  # a frozen tower's cache
    assert cached["text_pooled"] is out["text_pooled"]


def test_cls_attention_is_a_distribution_row_and_matches_the_sdpa_path():
    model = make_model().eval()
    images, ids, mask = make_inputs()
    fast = model(images, ids, mask)
    slow = model(images, ids, mask, need={"cls_attention"})
    maps = slow["cls_attention"]
    assert len(maps) == 2 and all(m.shape == (N, 2, P) for m in maps)  # layers, N×heads×patches
    for m in maps:
        assert (m >= 0).all()
        row_sums = m.sum(-1)
        assert (row_sums <= 1 + 1e-6).all() and (row_sums > 0.5).all()  # the rest goes to the class token
    torch.testing.assert_close(slow["image_embeds"], fast["image_embeds"], rtol=1e-5, atol=1e-5)


def test_cls_attention_follows_kept_patches():
    model = make_model(patch_dropout=0.5).train()
    images, ids, mask = make_inputs()
    out = model(images, ids, mask, need={"cls_attention", "kept_indices"})
    assert all(m.shape == (N, 2, P // 2) for m in out["cls_attention"])


def test_mean_pooling_has_no_class_token_and_averages_patch_tokens():
    model = make_model(vision_pool="mean").eval()
    assert model.visual.class_token is None
    images, ids, mask = make_inputs()
    out = model(images, ids, mask, need={"image_tokens"})
    assert out["image_tokens"].shape == (N, P, 32)
    expected = torch.nn.functional.normalize(model.image_projection(out["image_tokens"].mean(1)), dim=-1)
    torch.testing.assert_close(out["image_embeds"], expected)
    with pytest.raises(ValueError, match="vision_pool = 'cls'"):
        model(images, ids, mask, need={"cls_attention"})
    # FLIP works without a class token too
    flip = make_model(vision_pool="mean", patch_dropout=0.5).train()
    assert flip(images, ids, mask, need={"image_tokens"})["image_tokens"].shape == (N, P // 2, 32)


# ----------------------------------------------------------------------------- peer parity
def test_same_architecture_as_openclip():
    """Converted OpenCLIP weights give the same embeddings: the architectures match op for op."""
    open_clip = pytest.importorskip("open_clip")
    cfg = ModelConfig(**TINY)
    torch.manual_seed(0)
    theirs = open_clip.model.CLIP(
        cfg.embed_dim,
        dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
        dict(context_length=12, vocab_size=100, width=32, heads=2, layers=2),
    ).eval()
    ours = CLIP(cfg).eval()
    ours.load_state_dict(openclip_state_dict_to_ours(theirs.state_dict()))

    images, ids, mask = make_inputs()
    ids = ids.clamp(max=98)
    ids[torch.arange(N), mask.sum(1) - 1] = 99  # OpenCLIP pools at argmax(id): make the last real token the max
    floats = ours.normalize_images(images)
    image_theirs, text_theirs, scale_theirs = theirs(floats, ids)
    out = ours(images, ids, mask)
    torch.testing.assert_close(out["image_embeds"], image_theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["text_embeds"], text_theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["logit_scale"], scale_theirs)


@pytest.mark.parametrize("size", [32, 35])  # 35: the pixels past the last whole patch are ignored, as by the conv
def test_patch_embedding_as_one_matmul_equals_the_strided_convolution(size):
    visual = make_model().visual.double()
    images = torch.randn(3, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    conv = visual.patch_embed(images).flatten(2).transpose(1, 2)  # N×W×g×g -> N×P×W, raster order
    torch.testing.assert_close(visual.embed_patches(images), conv, rtol=0, atol=1e-12)
