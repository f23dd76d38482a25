"""CLIP's ResNet image tower (model.image_tower = "resnet", models/resnet.py): the same network as
OpenCLIP's ModifiedResNet (import and export give the same embeddings; weights round-trip bit for
bit), its attention pool against a hand-written reference, training and exact resume with its
BatchNorm statistics, and every ViT-only option refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import clipforge
from clipforge.config import ModelConfig, load_recipe
from clipforge.export import ExportError, export_hf, export_onnx, export_openclip
from clipforge.models.clip import CLIP
from clipforge.models.convert import import_openclip, openclip_config_to_ours
from clipforge.models.inherit import InheritError, student_config
from clipforge.models.resnet import AttentionPool, ModifiedResNet
from clipforge.train.trainer import Trainer
from test_resume_matrix import stop_and_resume

ATOL = 1e-5
OPENCLIP_RN = {  # a one-block-per-stage RN at 64 px: 2 x 2 positions reach the attention pool
    "embed_dim": 24,
    "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 16, "head_width": 64},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
RN_MODEL = dict(image_tower="resnet", resnet_layers=[1, 1, 1, 1], image_size=64, vision_width=16, vision_heads=8,
                embed_dim=24, text_width=32, text_layers=1, text_heads=2, context_length=16, vocab_size=256)


def random_openclip_resnet():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(OPENCLIP_RN["embed_dim"], OPENCLIP_RN["vision_cfg"], OPENCLIP_RN["text_cfg"])
    with torch.no_grad():  # BatchNorm statistics, scales and biases away from their initial 0 / 1
        for name, t in model.state_dict().items():
            if name.endswith(("running_mean", "bias")):
                t.add_(0.1 * torch.randn_like(t))
            elif name.endswith(("running_var", "bn3.weight")):
                t.copy_(0.5 + torch.rand_like(t))
    return model.eval()


@pytest.fixture(scope="module")
def openclip_resnet(tmp_path_factory):
    d = tmp_path_factory.mktemp("openclip-rn")
    theirs = random_openclip_resnet()
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, d / "open_clip_model.safetensors")
    (d / "open_clip_config.json").write_text(json.dumps(OPENCLIP_RN))
    return theirs, d


def test_an_imported_openclip_resnet_gives_the_same_embeddings(openclip_resnet, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    theirs, d = openclip_resnet
    ours, _, tokenizer = clipforge.load(import_openclip(d, None, tmp_path / "ckpt"))
    assert ours.cfg.image_tower == "resnet" and ours.cfg.resnet_layers == [1, 2, 1, 1]
    assert ours.cfg.vision_heads == 8  # OpenCLIP's 32 x width / head_width
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    texts = ["a photo of a cat.", "two dogs"]
    with torch.no_grad():
        their_image = theirs.encode_image(ours.normalize_images(images), normalize=True)
        assert (ours.encode_image(images) - their_image).abs().max() <= ATOL
        ids, mask = tokenizer(texts)
        their_text = theirs.encode_text(open_clip.tokenize(texts, context_length=24), normalize=True)
        assert (ours.encode_text(ids, mask) - their_text).abs().max() <= ATOL


def test_openclip_resnet_goes_to_clipforge_and_back_bit_for_bit(openclip_resnet, tmp_path):
    theirs, d = openclip_resnet
    out = export_openclip(import_openclip(d, None, tmp_path / "ckpt"), tmp_path / "oc")
    back, original = load_file(str(out / "open_clip_model.safetensors")), theirs.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]["layers"] == [1, 2, 1, 1]


def test_a_trained_resnet_exports_to_open_clip_and_onnx_with_the_same_embeddings(tmp_path, monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    Trainer(load_recipe("tiny-shapes-rn", [*QUIET, *SMALL, "train.steps=2"]), run).fit()  # BatchNorm stats moved
    ckpt = run / "checkpoints" / "latest"
    ours, _, _ = clipforge.load(ckpt)
    assert ours.visual.bn1.num_batches_tracked.item() == 2
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export_openclip(ckpt, tmp_path / 'oc')}")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        mine = ours.encode_image(images)
        assert (theirs.eval().encode_image(ours.normalize_images(images), normalize=True) - mine).abs().max() <= ATOL
    ort = pytest.importorskip("onnxruntime")
    onnx_dir = export_onnx(ckpt, tmp_path / "onnx")
    session = ort.InferenceSession(str(onnx_dir / "image_encoder.onnx"))
    got = session.run(None, {"images": images.numpy()})[0]
    assert np.abs(got - mine.numpy()).max() <= ATOL


def test_the_attention_pool_is_one_mean_query_over_every_position():
    """Against a per-head loop written from the paper's description: the spatial mean (plus its
    positional embedding) queries the mean and every position (plus theirs)."""
    torch.manual_seed(0)
    pool = AttentionPool(grid=2, width=8, heads=2)
    x = torch.randn(3, 8, 2, 2)
    tokens = torch.cat([x.mean(dim=(2, 3))[:, None], x.flatten(2).transpose(1, 2)], dim=1) + pool.positional_embedding
    q, k, v = pool.q_proj(tokens[:, 0]), pool.k_proj(tokens), pool.v_proj(tokens)
    heads = []
    for h in range(2):
        part = slice(4 * h, 4 * h + 4)
        weights = torch.softmax((k[:, :, part] @ q[:, part, None]).squeeze(-1) / 2.0, dim=-1)  # sqrt(4) = 2
        heads.append((weights[:, :, None] * v[:, :, part]).sum(1))
    assert torch.allclose(pool(x), torch.cat(heads, dim=-1), atol=1e-6)


def test_the_tower_downsamples_by_32_and_every_block_starts_as_its_shortcut():
    torch.manual_seed(0)
    tower = ModifiedResNet(image_size=64, layers=[2, 1, 1, 1], width=8, heads=4).eval()
    assert tower(torch.randn(2, 3, 64, 64))["pooled"].shape == (2, 256)  # 32 x width
    assert tower.attnpool.positional_embedding.shape == (2 * 2 + 1, 256)
    block = tower.layer1[1]  # same shape in and out: the shortcut is the identity
    x = torch.rand(2, 32, 16, 16)  # >= 0, as a ReLU's output
    assert torch.equal(block(x), x)  # bn3's scale starts at 0 (CLIP's init)
    with pytest.raises(ValueError, match="image_size divisible by 32"):
        ModifiedResNet(image_size=48, layers=[1, 1, 1, 1], width=8, heads=4)


QUIET = ["train.threads=1", "train.checkpoint_every_steps=2", "schedule.kind=constant", "schedule.warmup_steps=0",
         "eval.at_end=false", "eval.every_steps=none", "logging.tensorboard=false", "logging.progress=false",
         "logging.every_steps=1", "data.batch_size=8", "data.num_workers=0"]
SMALL = ["model.image_size=32", "model.vision_width=16", "model.vision_heads=8", "model.text_width=16",
         "model.text_layers=1", "model.embed_dim=16", "model.vocab_size=128", "data.tokenizer.vocab_size=128", "model.context_length=8"]


def test_a_resnet_run_resumes_exactly_with_its_batchnorm_statistics(tmp_path):
    stop_and_resume(tmp_path, "tiny-shapes-rn", [*QUIET, *SMALL])  # the same losses, bit for bit
    weights = load_file(str(tmp_path / "cut" / "checkpoints" / "latest" / "model.safetensors"))
    full = load_file(str(tmp_path / "full" / "checkpoints" / "latest" / "model.safetensors"))
    assert torch.equal(weights["visual.layer4.0.bn2.running_var"], full["visual.layer4.0.bn2.running_var"])


@pytest.mark.parametrize("change, message", [
    ({"patch_dropout": 0.5}, r"patch_dropout = 0.5 works on clipforge's ViT patch tokens"),
    ({"token_selection": "attentive"}, "token_selection"),
    ({"lexical_head": True}, "lexical_head"),
    ({"image_size": 48}, "multiple of 32"),
    ({"vision_heads": 7}, "vision_heads = 7 must divide"),
    ({"resnet_layers": [3, 4, 6]}, "4 stages"),
])
def test_vit_only_options_and_bad_shapes_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**RN_MODEL, **change})


def test_what_needs_patch_tokens_is_refused_before_training(tmp_path):
    resnet = ["model.image_tower=resnet", *SMALL]
    with pytest.raises(Exception, match="objective term 'filip' reads the image tower's patch tokens"):
        load_recipe("filip-shapes", resnet)
    with pytest.raises(Exception, match="grad_checkpointing .* ResNet"):
        CLIP(ModelConfig(**RN_MODEL)).set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="patch tokens exist in clipforge.s own ViT image tower only"):
        CLIP(ModelConfig(**RN_MODEL))(torch.zeros(1, 3, 64, 64), None, need={"image_token_embeds"})
    from clipforge.eval.evaluate import EvalError, evaluate
    from tiny_checkpoint import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "rn", **RN_MODEL)
    with pytest.raises(EvalError, match="late-interaction scores the ViT's patch tokens"):
        evaluate(ckpt, task="retrieval", data="shapes:binding", similarity="late-interaction")
    with pytest.raises(InheritError, match="image tower is model.image_tower = 'resnet'"):
        student_config(ModelConfig(**RN_MODEL), {"width": 0.5})


def test_hf_export_refuses_a_resnet_and_says_where_it_can_go(tmp_path):
    from tiny_checkpoint import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "rn", **RN_MODEL)
    with pytest.raises(ExportError, match="Export to OpenCLIP"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_openclip_config_maps_rn50_to_clip_s_shapes():
    open_clip = pytest.importorskip("open_clip")
    rn50 = {"embed_dim": 1024, "quick_gelu": True, "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}
    cfg = openclip_config_to_ours(rn50)
    assert (cfg.image_tower, cfg.resnet_layers, cfg.vision_width, cfg.vision_heads) == ("resnet", [3, 4, 6, 3], 64, 32)
    assert cfg.vision_pooled_width == 2048 and cfg.activation == "quick_gelu"
    ours = CLIP(cfg)
    assert ours.image_projection.weight.shape == (1024, 2048) and ours.image_projection.bias is not None
    theirs = open_clip.model.CLIP(rn50["embed_dim"], rn50["vision_cfg"], rn50["text_cfg"], quick_gelu=True)
    image_side = sum(p.numel() for p in ours.visual.parameters()) + sum(p.numel() for p in ours.image_projection.parameters())
    assert image_side == sum(p.numel() for p in theirs.visual.parameters())  # RN50's image tower, 38 M
    assert ours.state_dict().keys() - {"image_projection.weight", "image_projection.bias"} >= {
        k for k in theirs.state_dict() if k.startswith("visual.") and "c_proj" not in k}


def test_resnets_trained_for_different_steps_merge_weights_and_batchnorm_statistics(tmp_path):
    """WiSE-FT / soups of ResNets: running means and variances are averaged like the weights; the
    step counters differ (fine-tuned longer) and the first model's is kept, BatchNorm not reading it."""
    from clipforge.merge import merge_weights
    from tiny_checkpoint import make_tiny_checkpoint

    paths = [make_tiny_checkpoint(tmp_path / f"m{i}", seed=i, **RN_MODEL) for i in range(2)]
    states = []
    for i, path in enumerate(paths):
        state = load_file(str(path / "model.safetensors"))
        state["visual.bn1.running_var"] = torch.full_like(state["visual.bn1.running_var"], 1.0 + i)
        state["visual.bn1.num_batches_tracked"] = torch.tensor(10 * (i + 1))
        save_file(state, str(path / "model.safetensors"))
        states.append(state)
    merged = merge_weights(paths)[0]
    assert torch.equal(merged["visual.bn1.running_var"], torch.full_like(merged["visual.bn1.running_var"], 1.5))
    assert merged["visual.bn1.num_batches_tracked"].item() == 10
    assert torch.allclose(merged["visual.conv1.weight"], (states[0]["visual.conv1.weight"] + states[1]["visual.conv1.weight"]) / 2)
