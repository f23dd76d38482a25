"""Per-layer tower shapes (model.*_layer_heads / *_layer_mlp / *_head_dim): the models a CoFi-granularity
TinyCLIP pruning gives. Each layer has its own head count and MLP width, 0 removing that sublayer; the
attention's width (heads x head_dim) is apart from the residual width. Exports that cannot hold them
refuse by name; ONNX keeps them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipforge.config import ModelConfig
from clipforge.export import ExportError, check_hf_compatible, check_openclip_compatible, export_onnx
from clipforge.models.clip import CLIP
from clipforge.models.inherit import InheritError, check_inheritable, student_config
from tiny_checkpoint import make_tiny_checkpoint, perturb_biases_

PLAIN = dict(image_size=32, patch_size=8, vision_width=20, vision_layers=3, vision_heads=4, vocab_size=64,
             context_length=12, text_width=20, text_layers=3, text_heads=4, embed_dim=16)
SHAPED = dict(PLAIN, vision_head_dim=8, vision_layer_heads=[2, 0, 3], vision_layer_mlp=[16, 24, 0],
              text_head_dim=4, text_layer_heads=[0, 5, 1], text_layer_mlp=[8, 0, 12])


def _model(fields: dict, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return perturb_biases_(CLIP(ModelConfig(**fields))).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    ids = torch.randint(1, 64, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return images, ids, mask


def test_each_layer_gets_the_heads_and_mlp_units_it_names():
    model = _model(SHAPED)
    v, t = model.visual.blocks, model.text.blocks
    assert v[0].attn.qkv.weight.shape == (3 * 2 * 8, 20) and v[0].attn.proj.weight.shape == (20, 16)
    assert v[1].attn is None and v[1].ln_1 is None and v[1].mlp.fc.weight.shape == (24, 20)
    assert v[2].mlp is None and v[2].ln_2 is None and v[2].attn.qkv.weight.shape == (3 * 3 * 8, 20)
    assert t[0].attn is None and t[1].mlp is None and t[1].attn.proj.weight.shape == (20, 5 * 4)
    assert [b.mlp.fc.out_features if b.mlp else 0 for b in t] == [8, 0, 12]
    assert ModelConfig(**SHAPED).block_shapes("vision") == [(2, 16), (0, 24), (3, 0)]
    out = model(*_inputs())
    assert out["image_embeds"].shape == out["text_embeds"].shape == (3, 16)
    assert torch.isfinite(out["image_embeds"]).all() and torch.isfinite(out["text_embeds"]).all()


def test_a_block_without_attention_or_mlp_adds_only_the_other_sublayer():
    model = _model(SHAPED)
    x = torch.randn(2, 5, 20)
    no_attn, no_mlp = model.visual.blocks[1], model.visual.blocks[2]
    torch.testing.assert_close(no_attn(x)[0], x + no_attn.mlp(no_attn.ln_2(x)))
    torch.testing.assert_close(no_mlp(x)[0], x + no_mlp.attn(no_mlp.ln_1(x))[0])


def test_the_pooled_token_only_last_layer_equals_the_full_last_layer():
    """The towers compute their last block at the pooled position only (class token, end-of-text): with a
    last layer that lacks attention (text) or an MLP (vision) that still equals reading the full output."""
    model = _model(SHAPED)
    images, ids, mask = _inputs()
    pixels = model.normalize_images(images)
    with torch.no_grad():
        short_v = model.visual(pixels)["pooled"]
        full_v = model.visual(pixels, return_tokens=True)["pooled"]
        shaped_text = dict(SHAPED, text_layer_heads=[1, 5, 0], text_layer_mlp=[8, 0, 12])
        text = _model(shaped_text).text
        short_t = text(ids, mask)["pooled"]
        full_t = text(ids, mask, return_tokens=True)["pooled"]
    torch.testing.assert_close(short_v, full_v, rtol=0, atol=1e-5)
    torch.testing.assert_close(short_t, full_t, rtol=0, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"vision_layer_heads": [2, 0]}, "one count >= 0 for each of the model.vision_layers = 3"),
    ({"text_layer_mlp": [8, -1, 4]}, "one count >= 0"),
    ({"text_layer_heads": [0, 0, 0], "text_layer_mlp": [0, 0, 0]}, "every text layer has 0 heads and 0 MLP units"),
    ({"vision_head_dim": None}, "must be divisible by model.vision_heads (4) (or set model.vision_head_dim)"),
])
def test_shapes_that_name_no_model_are_refused_with_the_key(change, message):
    fields = dict(SHAPED, **change)
    if change.get("vision_head_dim", 1) is None:
        fields["vision_width"] = 22
    with pytest.raises(ValueError) as e:
        ModelConfig(**fields)
    assert message in str(e.value)


def test_uniform_layers_is_what_openclip_and_hf_can_hold_and_exports_refuse_the_rest():
    assert ModelConfig(**PLAIN).uniform_layers()
    assert ModelConfig(**PLAIN, vision_head_dim=5, vision_layer_heads=[4, 4, 4]).uniform_layers()  # spelt out
    assert not ModelConfig(**PLAIN, vision_head_dim=4).uniform_layers()  # 4 heads x 4 != 20 wide
    shaped = ModelConfig(**SHAPED)
    assert not shaped.uniform_layers()
    for check, target in ((check_hf_compatible, "Hugging Face"), (check_openclip_compatible, "OpenCLIP")):
        with pytest.raises(ExportError) as e:
            check(shaped)
        assert f"cannot export to {target}" in str(e.value) and "--to onnx" in str(e.value)
    with pytest.raises(InheritError, match="teacher's layers differ"):
        check_inheritable(shaped, ModelConfig(**PLAIN))
    with pytest.raises(InheritError, match="use --student sparsity=S"):
        student_config(shaped, {"width": 0.5})


def test_a_shaped_model_saves_loads_and_exports_to_onnx_with_the_same_embeddings(tmp_path):
    import clipforge

    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    shapes = dict(vision_layers=3, vision_head_dim=8, vision_layer_heads=[2, 0, 3], vision_layer_mlp=[16, 24, 0],
                  text_layers=3, text_head_dim=4, text_layer_heads=[0, 5, 1], text_layer_mlp=[8, 0, 12])
    step_dir = make_tiny_checkpoint(tmp_path / "run", **shapes)
    assert json.loads((step_dir / "config.json").read_text())["model"]["vision_layer_heads"] == [2, 0, 3]
    model, _, tokenizer = clipforge.load(step_dir)
    assert model.visual.blocks[1].attn is None and model.text.blocks[1].mlp is None
    images = _inputs()[0]
    onnx_dir = export_onnx(step_dir, tmp_path / "onnx")
    session = ort.InferenceSession(str(onnx_dir / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})[0]
    assert np.abs(got - model.encode_image(images).detach().numpy()).max() <= 1e-4
    ids, mask = tokenizer(["a red circle", "two yellow stars"])
    session = ort.InferenceSession(str(onnx_dir / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.abs(got - model.encode_text(ids, mask).detach().numpy()).max() <= 1e-4
