"""A timm backbone as the image tower (model.image_tower = "timm", models/timm_tower.py): OpenCLIP's
TimmModel CLIPs in each of its head modes import with the same embeddings and go back bit for bit; a
tower trained here loads in open_clip and ONNX Runtime; stochastic depth resumes exactly; what it lacks
is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import clipforge
from clipforge.config import ModelConfig, load_recipe
from clipforge.export import ExportError, export_hf, export_onnx, export_openclip
from clipforge.models.clip import CLIP
from clipforge.models.convert import ConversionError, import_openclip, openclip_config_to_ours
from test_resume_matrix import stop_and_resume

pytest.importorskip("timm")
ATOL = 1e-5
TEXT_CFG = {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
MODES = {  # OpenCLIP vision_cfg (embed_dim): each way its TimmModel ends
    "convnext-linear": ({"timm_model_name": "test_convnext", "timm_pool": "", "timm_proj": "linear", "image_size": 64}, 24),
    "resnet-linear-bias": ({"timm_model_name": "test_resnet", "timm_pool": "avg", "timm_proj": "linear",
                            "timm_proj_bias": True, "image_size": 64}, 24),
    "vit-timm-classifier": ({"timm_model_name": "test_vit", "timm_pool": "token", "timm_proj": None, "image_size": 64}, 24),
    "vit-map-no-projection": ({"timm_model_name": "test_vit", "timm_pool": "map", "timm_proj": "none", "image_size": 64}, 64),
}


def openclip_timm_files(directory, vision, embed_dim):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    theirs = open_clip.model.CLIP(embed_dim, vision, TEXT_CFG).eval()
    with torch.no_grad():  # BatchNorm statistics and biases away from 0 / 1
        for name, t in theirs.state_dict().items():
            if name.startswith("visual.") and name.endswith(("running_mean", "bias")):
                t.add_(0.1 * torch.randn_like(t))
            elif name.startswith("visual.") and name.endswith("running_var"):
                t.copy_(0.5 + torch.rand_like(t))
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, directory / "open_clip_model.safetensors")
    (directory / "open_clip_config.json").write_text(json.dumps({"embed_dim": embed_dim, "vision_cfg": vision,
                                                                 "text_cfg": TEXT_CFG}))
    return theirs


@pytest.mark.parametrize("mode", sorted(MODES))
def test_openclip_timm_clips_import_with_the_same_embeddings_and_go_back_bit_for_bit(tmp_path, mode):
    vision, embed_dim = MODES[mode]
    theirs = openclip_timm_files(tmp_path / "oc", vision, embed_dim)
    ckpt = import_openclip(tmp_path / "oc", None, tmp_path / "ckpt")
    ours, _, _ = clipforge.load(ckpt)
    assert ours.cfg.image_tower == "timm" and ours.cfg.timm_model == vision["timm_model_name"]
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        their_image = theirs.encode_image(ours.normalize_images(images), normalize=True)
        assert (ours.encode_image(images) - their_image).abs().max() <= ATOL
    back = load_file(str(export_openclip(ckpt, tmp_path / "back") / "open_clip_model.safetensors"))
    original = theirs.state_dict()
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


QUIET = ["train.threads=1", "train.checkpoint_every_steps=2", "schedule.kind=constant", "schedule.warmup_steps=0",
         "eval.at_end=false", "eval.every_steps=none", "logging.tensorboard=false", "logging.progress=false",
         "logging.every_steps=1", "data.batch_size=8", "data.num_workers=0", "model.text_width=16",
         "model.text_layers=1", "model.embed_dim=16", "model.vocab_size=128", "data.tokenizer.vocab_size=128",
         "model.context_length=8"]
CONVNEXT = ["model.image_tower=timm", "model.timm_model=test_convnext", "model.image_size=32",
            "model.timm_drop_path=0.2"]  # stochastic depth: random draws a resume must replay


def test_a_timm_tower_trains_resumes_exactly_and_loads_in_open_clip(tmp_path, monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stop_and_resume(tmp_path, "tiny-shapes", [*QUIET, *CONVNEXT])  # the same losses, bit for bit

    ckpt = tmp_path / "full" / "checkpoints" / "latest"
    ours, _, _ = clipforge.load(ckpt)
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export_openclip(ckpt, tmp_path / 'oc')}")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        got = theirs.eval().encode_image(ours.normalize_images(images), normalize=True)
        assert (got - ours.encode_image(images)).abs().max() <= ATOL
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(export_onnx(ckpt, tmp_path / "onnx") / "image_encoder.onnx"))
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    assert (got - ours.encode_image(images).detach()).abs().max() <= ATOL


def test_grad_checkpointing_goes_through_timm_and_changes_no_gradient():
    torch.manual_seed(0)
    model = CLIP(ModelConfig(image_tower="timm", timm_model="test_convnext", image_size=32, embed_dim=16,
                             text_width=16, text_layers=1, text_heads=2, context_length=8, vocab_size=64))
    images, ids = torch.rand(2, 3, 32, 32), torch.randint(0, 64, (2, 8))

    def image_grads():
        model.zero_grad()
        model(images, ids)["image_embeds"].square().sum().backward()
        return [p.grad.clone() for p in model.visual.parameters() if p.grad is not None]

    plain = image_grads()
    model.set_grad_checkpointing(True)
    assert model.visual.grad_checkpointing and model.visual.trunk.stages[0].grad_checkpointing
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, image_grads()))


@pytest.mark.parametrize("change, message", [
    ({"timm_model": None}, "needs model.timm_model"),
    ({"timm_model": "convnext_tinny"}, "'convnext_tinny' is not a timm model .*similar: convnext"),
    ({"timm_proj": "none"}, "timm_proj = 'none' makes test_convnext's .* pooled features the embedding"),
    ({"timm_proj": "timm", "timm_proj_bias": True}, "timm_proj_bias applies to timm_proj = 'linear'"),
    ({"patch_dropout": 0.5}, "patch_dropout = 0.5 works on clipforge's ViT patch tokens"),
])
def test_what_a_timm_tower_cannot_be_is_refused_by_name(change, message):
    base = dict(image_tower="timm", timm_model="test_convnext", embed_dim=16)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**base, **change})


@pytest.mark.parametrize("change, message", [
    ({"timm_proj": "mlp"}, "timm_proj = 'mlp'"),
    ({"timm_pool": "abs_attn"}, "timm_pool = 'abs_attn' is OpenCLIP's own attention pool"),
    ({"timm_drop": 0.1}, "timm_drop = 0.1"),
])
def test_import_refuses_timm_heads_it_does_not_have(change, message):
    vision, embed_dim = MODES["convnext-linear"]
    with pytest.raises(ConversionError, match=message):
        openclip_config_to_ours({"embed_dim": embed_dim, "vision_cfg": {**vision, **change}, "text_cfg": TEXT_CFG})


def test_a_timm_tower_is_refused_where_it_cannot_go(tmp_path):
    from tiny_checkpoint import make_tiny_checkpoint

    with pytest.raises(Exception, match="objective term 'filip' reads the image tower's patch tokens"):
        load_recipe("filip-shapes", ["model.image_tower=timm", "model.timm_model=test_convnext"])
    ckpt = make_tiny_checkpoint(tmp_path / "t", image_tower="timm", timm_model="test_convnext")
    with pytest.raises(ExportError, match="model.image_tower = 'timm'.*Export to OpenCLIP"):
        export_hf(ckpt, tmp_path / "hf")
