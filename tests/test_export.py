"""Export to Hugging Face / ONNX and import from OpenCLIP: same embeddings on the other side, clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import clipforge
from clipforge.cli import app
from clipforge.export import ExportError, export_hf, export_onnx, export_openclip
from clipforge.models.clip import CLIP
from clipforge.models.convert import ConversionError, import_hf, import_openclip, openclip_config_to_ours
from clipforge.models.tokenizer import ClipBPETokenizer
from tiny_checkpoint import make_tiny_checkpoint

TEXTS = ["a red circle", "two yellow stars next to a very long caption that must be cut off at the end", "xyz! UNSEEN words", "a"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def random_uint8_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def features(output) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and an output object (pooler_output) in 5."""
    return output if torch.is_tensor(output) else output.pooler_output


# ----------------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def hf_dir(tiny_ckpt, tmp_path_factory):
    pytest.importorskip("transformers")
    return export_hf(tiny_ckpt, tmp_path_factory.mktemp("export") / "hf")


def test_hf_export_gives_the_same_embeddings_offline(tiny_ckpt, hf_dir, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours, _, tokenizer = clipforge.load(tiny_ckpt)
    hf = transformers.CLIPModel.from_pretrained(hf_dir, local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)

    ids, mask = tokenizer(TEXTS)
    enc = hf_tok(TEXTS, padding="max_length", max_length=ours.cfg.context_length, truncation=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)

    images = random_uint8_images(4, ours.cfg.image_size)
    with torch.no_grad():
        hf_text = F.normalize(features(hf.get_text_features(**enc)), dim=-1)
        hf_image = F.normalize(features(hf.get_image_features(pixel_values=ours.normalize_images(images))), dim=-1)
        assert (hf_text - ours.encode_text(ids, mask)).abs().max() <= ATOL
        assert (hf_image - ours.encode_image(images)).abs().max() <= ATOL
        assert hf.logit_scale.exp().item() == pytest.approx(ours.logit_scale.exp().item())


def test_hf_export_imports_back_with_our_tokenizer(tiny_ckpt, hf_dir, tmp_path):
    """clipforge (own BPE) -> HF CLIPModel directory -> clipforge import hf: bitwise the same model and ids."""
    back = import_hf(hf_dir, tmp_path / "back")
    ours, _, tokenizer = clipforge.load(tiny_ckpt)
    again, _, tokenizer_again = clipforge.load(back)
    assert tokenizer_again.kind == "bpe"
    ids, mask = tokenizer(TEXTS)
    assert all(torch.equal(a, b) for a, b in zip(tokenizer_again(TEXTS), (ids, mask)))
    images = random_uint8_images(2, ours.cfg.image_size)
    with torch.no_grad():
        assert torch.equal(again.encode_text(ids, mask), ours.encode_text(ids, mask))
        assert torch.equal(again.encode_image(images), ours.encode_image(images))


def test_hf_image_processor_matches_our_normalisation(tiny_ckpt, hf_dir):
    transformers = pytest.importorskip("transformers")
    ours, preprocess, _ = clipforge.load(tiny_ckpt)
    processor = transformers.AutoImageProcessor.from_pretrained(hf_dir, local_files_only=True)
    size = ours.cfg.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)  # already at the model's size: resize and crop are no-ops
    theirs = processor(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(theirs, ours.normalize_images(preprocess(image)[None]), rtol=0, atol=1e-5)


def test_hf_export_refuses_mean_pooling_and_logit_bias_by_name(tmp_path):
    pytest.importorskip("transformers")
    mean = make_tiny_checkpoint(tmp_path / "mean", vision_pool="mean")
    with pytest.raises(ExportError, match="vision_pool = 'mean'.*class token"):
        export_hf(mean, tmp_path / "out_mean")
    siglip = make_tiny_checkpoint(tmp_path / "siglip", logit_bias_init=-10.0)
    with pytest.raises(ExportError, match="logit bias.*SiglipModel"):
        export_hf(siglip, tmp_path / "out_siglip")
    assert not (tmp_path / "out_mean").exists() and not (tmp_path / "out_siglip").exists()


def test_siglip_refusal_names_why_and_its_reasons_hold_in_transformers(tmp_path):
    """The SigLIP refusal says what SiglipModel lacks; if transformers grows a causal, end-of-text
    pooled text tower or a class-token ViT with ln_pre, this fails and the export can be written."""
    transformers = pytest.importorskip("transformers")
    siglip = make_tiny_checkpoint(tmp_path / "siglip", logit_bias_init=-10.0)
    with pytest.raises(ExportError) as err:
        export_hf(siglip, tmp_path / "out")
    for reason in ("bidirectional", "end-of-text", "class token", "ln_pre", "MAP", "--to onnx"):
        assert reason in str(err.value)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = transformers.SiglipModel(transformers.SiglipConfig(
        text_config=dict(small, vocab_size=50, max_position_embeddings=8),
        vision_config=dict(small, image_size=16, patch_size=8)))
    names = [n for n, _ in model.named_parameters()]
    assert not model.text_model.encoder.layers[0].self_attn.is_causal
    assert not any("class_embedding" in n or "pre_layrnorm" in n or "visual_projection" in n for n in names)
    assert model.vision_model.use_head  # the MAP head; without it pooler_output is None
    ids = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0]])
    with torch.no_grad():  # the last position is pooled, whatever the mask says
        a = model.get_text_features(input_ids=ids, attention_mask=(ids > 0).long())
        ids2 = ids.clone()
        ids2[0, -1] = 9
        b = model.get_text_features(input_ids=ids2, attention_mask=(ids > 0).long())
    a, b = (getattr(x, "pooler_output", x) for x in (a, b))
    assert not torch.allclose(a, b)


def test_export_refuses_a_non_empty_output_directory(tiny_ckpt, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_onnx(tiny_ckpt, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- ONNX
def test_onnx_export_gives_the_same_embeddings_at_any_batch_size(tiny_ckpt, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = export_onnx(tiny_ckpt, tmp_path / "onnx")
    assert {"image_encoder.onnx", "text_encoder.onnx", "tokenizer.json", "onnx_config.json"} <= {p.name for p in out.iterdir()}
    ours, _, tokenizer = clipforge.load(tiny_ckpt)
    image_session = ort.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    text_session = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # exported with batch 2: the batch axis must be dynamic
        images = random_uint8_images(n, ours.cfg.image_size, seed=n)
        got = image_session.run(None, {"images": images.numpy()})[0]
        assert np.abs(got - ours.encode_image(images).detach().numpy()).max() <= ATOL
    ids, mask = tokenizer(TEXTS[:3])
    got = text_session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.abs(got - ours.encode_text(ids, mask).detach().numpy()).max() <= ATOL
    config = json.loads((out / "onnx_config.json").read_text())
    assert config["preprocess"]["image_size"] == 32 and config["tokenizer"]["kind"] == "bpe"


# ----------------------------------------------------------------------------- OpenCLIP import
OPENCLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def random_openclip_model(cfg: dict):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"],
                                 quick_gelu=cfg.get("quick_gelu", False)).eval()
    with torch.no_grad():  # non-trivial biases / norms, so a mapping mistake cannot hide behind zeros and ones
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def openclip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("openclip")
    theirs = random_openclip_model(OPENCLIP_TINY)
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, d / "open_clip_model.safetensors")
    (d / "open_clip_config.json").write_text(json.dumps(OPENCLIP_TINY))
    return theirs, d / "open_clip_model.safetensors", d / "open_clip_config.json"


def test_imported_openclip_gives_the_same_embeddings_for_the_same_images_and_texts(openclip_files, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    theirs, weights, config = openclip_files
    out = import_openclip(weights, config, tmp_path / "ckpt")
    ours, preprocess, tokenizer = clipforge.load(out)
    assert tokenizer.kind == "clip-bpe"

    texts = ["a photo of a cat.", "Hello  World!!  it's 2024, naïve café", "x", "a " * 40]
    ids, mask = tokenizer(texts)
    their_ids = open_clip.tokenize(texts, context_length=24)
    assert torch.equal(ids, their_ids)

    # the same PIL images through each side's own preprocessing
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    their_preprocess = open_clip.transform.image_transform(32, is_train=False)
    with torch.no_grad():
        their_image = theirs.encode_image(torch.stack([their_preprocess(im) for im in pil]), normalize=True)
        their_text = theirs.encode_text(their_ids, normalize=True)
        our_image = ours.encode_image(torch.stack([preprocess(im) for im in pil]))
        our_text = ours.encode_text(ids, mask)
    assert (our_text - their_text).abs().max() <= ATOL
    assert (our_image - their_image).abs().max() <= ATOL
    assert ours.logit_scale.exp().item() == pytest.approx(theirs.logit_scale.exp().item())


def test_eval_preprocess_gives_open_clip_s_exact_pixels_for_any_image_size():
    """clipforge.load's preprocess = OpenCLIP's eval transform (torchvision Resize + CenterCrop) bit for bit,
    including non-square images where the longer side's rounding and the crop offset matter."""
    open_clip = pytest.importorskip("open_clip")
    from clipforge.data.transforms import EvalPreprocess

    rng = np.random.default_rng(0)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    sizes = [(48, 64), (33, 47), (47, 33), (64, 48), (100, 37), (32, 32), (20, 90)]  # (h, w), down and up
    for size in (32, 224):
        theirs = open_clip.transform.image_transform(size, is_train=False)
        for h, w in sizes + [tuple(rng.integers(size // 2, 3 * size, 2)) for _ in range(10)]:
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            ours = (EvalPreprocess(size)(image).float() / 255 - mean) / std
            assert torch.equal(ours, theirs(image)), (size, h, w)


def test_import_reads_hub_style_config_and_wrapped_torch_checkpoints(openclip_files, tmp_path):
    theirs, _, _ = openclip_files
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, tmp_path / "epoch_3.pt")
    hub = {"model_cfg": OPENCLIP_TINY, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(hub))
    out = import_openclip(tmp_path / "epoch_3.pt", tmp_path / "open_clip_config.json", tmp_path / "ckpt")
    ours, _, _ = clipforge.load(out)
    assert ours.cfg.image_mean == (0.5, 0.5, 0.5) and ours.cfg.image_std == (0.25, 0.25, 0.25)
    images = random_uint8_images(2, 32)
    floats = (images.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        assert (ours.encode_image(images) - theirs.encode_image(floats, normalize=True)).abs().max() <= ATOL


def test_imported_model_exports_to_hf_with_clip_tokenizer(openclip_files, tmp_path):
    transformers = pytest.importorskip("transformers")
    theirs, weights, config = openclip_files
    ckpt = import_openclip(weights, config, tmp_path / "ckpt")
    hf_dir = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.CLIPModel.from_pretrained(hf_dir, local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    texts = ["wow! a dog!!", "two cats"]
    enc = hf_tok(texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    their_ids = pytest.importorskip("open_clip").tokenize(texts, context_length=24)
    real = enc["attention_mask"].bool()
    assert torch.equal(enc["input_ids"][real], their_ids[real])  # padding differs (EOT vs 0), tokens do not
    with torch.no_grad():
        got = F.normalize(features(hf.get_text_features(**enc)), dim=-1)
        assert (got - theirs.encode_text(their_ids, normalize=True)).abs().max() <= ATOL


def test_quick_gelu_models_import_and_export_with_the_same_embeddings(tmp_path):
    """OpenAI-style weights (QuickGELU): a random open_clip QuickGELU model imports with
    model.activation = quick_gelu, embeds as OpenCLIP does, and exports to HF CLIPModel likewise."""
    open_clip = pytest.importorskip("open_clip")
    transformers = pytest.importorskip("transformers")
    cfg = {**OPENCLIP_TINY, "quick_gelu": True}
    theirs = random_openclip_model(cfg)
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / "w.safetensors")
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    out = import_openclip(tmp_path / "w.safetensors", tmp_path / "c.json", tmp_path / "ckpt")
    ours, _, tokenizer = clipforge.load(out)
    assert ours.cfg.activation == "quick_gelu"
    texts = ["a photo of a cat.", "two dogs"]
    ids, mask = tokenizer(texts)
    images = torch.randn(2, 3, 32, 32)  # float input: already normalised, same for both
    with torch.no_grad():
        their_text = theirs.encode_text(open_clip.tokenize(texts, context_length=24), normalize=True)
        assert (ours.encode_text(ids, mask) - their_text).abs().max() <= ATOL
        assert (ours.encode_image(images) - theirs.encode_image(images, normalize=True)).abs().max() <= ATOL
        # the same weights with exact GELU differ: the option matters
        gelu = CLIP(ours.cfg.model_copy(update={"activation": "gelu"})).eval()
        gelu.load_state_dict(ours.state_dict())
        assert (gelu.encode_text(ids, mask) - their_text).abs().max() > 100 * ATOL

    hf_dir = export_hf(out, tmp_path / "hf")
    hf = transformers.CLIPModel.from_pretrained(hf_dir, local_files_only=True).eval()
    assert hf.config.text_config.hidden_act == "quick_gelu"
    with torch.no_grad():
        got = F.normalize(features(hf.get_image_features(pixel_values=images)), dim=-1)
        assert (got - theirs.encode_image(images, normalize=True)).abs().max() <= ATOL


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vision_cfg": {**OPENCLIP_TINY["vision_cfg"], "ls_init_value": 1e-5}}, r"vision_cfg.ls_init_value.*layer scale"),
        ({"vision_cfg": {**OPENCLIP_TINY["vision_cfg"], "timm_model_name": "convnext_base", "timm_proj": "mlp"}},
         "timm_proj = 'mlp'"),
        ({"text_cfg": {**OPENCLIP_TINY["text_cfg"], "hf_model_name": "roberta-base"}}, "Hugging Face text tower"),
        ({"text_cfg": {**OPENCLIP_TINY["text_cfg"], "pool_type": "mean"}}, "text_cfg.pool_type = 'mean'"),
        ({"text_cfg": {**OPENCLIP_TINY["text_cfg"], "pool_type": "last"}}, "text_cfg.pool_type = 'last'"),
    ],
)
def test_import_refuses_options_it_cannot_reproduce_by_name(change, message):
    with pytest.raises(ConversionError, match=message):
        openclip_config_to_ours({**OPENCLIP_TINY, **change})


def test_import_errors_name_the_problem(openclip_files, tmp_path):
    _, weights, config = openclip_files
    wrong = {**OPENCLIP_TINY, "embed_dim": 8}
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    with pytest.raises(ConversionError, match="does not match.*wrong.json"):
        import_openclip(weights, tmp_path / "wrong.json", tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="OpenCLIP weights not found"):
        import_openclip(tmp_path / "nope.safetensors", config, tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="vocabulary file not found"):
        import_openclip(weights, config, tmp_path / "c", vocab_file=tmp_path / "missing.txt.gz")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConversionError, match="needs vision_cfg and text_cfg"):
        import_openclip(weights, tmp_path / "bad.json", tmp_path / "d")
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_clip_tokenizer_matches_open_clip_and_decodes():
    open_clip = pytest.importorskip("open_clip")
    tok = ClipBPETokenizer.from_vocab_file(None, 77)
    texts = ["Don't STOP   me\tnow", "emoji 🙂 and 中文", "C++ & co.", "", "naïve café — déjà vu", "word " * 100]
    ids, mask = tok(texts)
    assert torch.equal(ids, open_clip.tokenize(texts, context_length=77))
    assert torch.equal(mask.sum(1) - 1, (ids == tok.eot_id).int().argmax(1))  # EOT is the last real token
    assert tok.decode(ids[0]) == "don 't stop me now"
    assert tok.spec()["vocab_size"] == 49408


# ----------------------------------------------------------------------------- OpenCLIP export
def open_clip_side(out):
    """What a user of open_clip does with an exported directory."""
    open_clip = pytest.importorskip("open_clip")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{out}")


def pil_images(n: int, size: int = 48):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8)) for i in range(n)]


def test_openclip_export_loads_in_open_clip_with_the_same_embeddings(tiny_ckpt, tmp_path, monkeypatch):
    """A checkpoint with our own BPE tokenizer: open_clip builds the model and its tokenizer from the
    directory alone (offline) and gives our ids, embeddings and logit scale."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = export_openclip(tiny_ckpt, tmp_path / "oc")
    theirs, their_preprocess, their_tokenizer = open_clip_side(out)
    ours, preprocess, tokenizer = clipforge.load(tiny_ckpt)

    ids, mask = tokenizer(TEXTS)  # TEXTS has a caption longer than the context: cut the same way
    assert torch.equal(their_tokenizer(TEXTS), ids)
    pil = pil_images(3)  # other sizes and aspect ratios than the model's: each side resizes and crops
    with torch.no_grad():
        their_image = theirs.encode_image(torch.stack([their_preprocess(im) for im in pil]), normalize=True)
        our_image = ours.encode_image(torch.stack([preprocess(im) for im in pil]))
        assert (their_image - our_image).abs().max() <= ATOL
        assert (theirs.encode_text(ids, normalize=True) - ours.encode_text(ids, mask)).abs().max() <= ATOL
    assert theirs.logit_scale.exp().item() == pytest.approx(ours.logit_scale.exp().item())
    assert theirs.logit_bias is None


def test_openclip_import_then_export_gives_back_the_same_weights_and_tokenizer(openclip_files, tmp_path):
    """OpenCLIP -> clipforge -> OpenCLIP: every tensor bitwise equal, CLIP's BPE as open_clip's own tokenizer."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import load_file

    theirs, weights, config = openclip_files
    ckpt = import_openclip(weights, config, tmp_path / "ckpt")
    out = export_openclip(ckpt, tmp_path / "oc")
    back = load_file(str(out / "open_clip_model.safetensors"))
    original = theirs.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    model_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert "hf_tokenizer_name" not in model_cfg["text_cfg"]  # open_clip's SimpleTokenizer
    reloaded, _, tokenizer = open_clip_side(out)
    texts = ["a photo of a cat.", "two dogs!"]
    assert torch.equal(tokenizer(texts), open_clip.tokenize(texts, context_length=24))
    with torch.no_grad():
        assert torch.equal(reloaded.encode_text(tokenizer(texts)), theirs.encode_text(tokenizer(texts)))


def test_our_bpe_model_goes_to_openclip_and_back(tiny_ckpt, tmp_path):
    """clipforge (own BPE) -> OpenCLIP directory -> clipforge import: the same tokenizer ids and embeddings;
    the tokenizer is read from beside the config, where the export put it."""
    pytest.importorskip("transformers")
    out = export_openclip(tiny_ckpt, tmp_path / "oc")
    back = import_openclip(out, None, tmp_path / "back")  # the model directory, as open_clip's "local-dir:"
    ours, _, tokenizer = clipforge.load(tiny_ckpt)
    again, _, tokenizer_again = clipforge.load(back)
    assert tokenizer_again.kind == "bpe"
    ids, mask = tokenizer(TEXTS)
    ids2, mask2 = tokenizer_again(TEXTS)
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)
    images = random_uint8_images(2, ours.cfg.image_size)
    with torch.no_grad():
        assert torch.equal(again.encode_text(ids, mask), ours.encode_text(ids, mask))
        assert torch.equal(again.encode_image(images), ours.encode_image(images))
    (out / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="hf_tokenizer_name.*its own BPE from tokenizer.json.*is not one"):
        import_openclip(out / "open_clip_model.safetensors", out / "open_clip_config.json", tmp_path / "none")


def test_clip_benchmark_loads_an_openclip_export_as_an_open_clip_model(tiny_ckpt, tmp_path, monkeypatch):
    """CLIP_benchmark's own open_clip loader (--model_type open_clip --model local-dir:DIR) takes the export."""
    pytest.importorskip("transformers")
    clip_benchmark_models = pytest.importorskip("clip_benchmark.models")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = export_openclip(tiny_ckpt, tmp_path / "oc")
    model, transform, tok = clip_benchmark_models.load_clip("open_clip", f"local-dir:{out}", "", None, "cpu")
    ours, preprocess, tokenizer = clipforge.load(tiny_ckpt)
    ids, mask = tokenizer(TEXTS)
    image = pil_images(1)[0]
    with torch.no_grad():
        assert (model.eval().encode_text(tok(TEXTS), normalize=True) - ours.encode_text(ids, mask)).abs().max() <= ATOL
        assert (model.encode_image(transform(image)[None], normalize=True) - ours.encode_image(preprocess(image)[None])).abs().max() <= ATOL


def test_openclip_export_keeps_a_siglip_logit_bias(tmp_path):
    pytest.importorskip("transformers")
    ckpt = make_tiny_checkpoint(tmp_path / "siglip", logit_bias_init=-10.0)
    ours, _, _ = clipforge.load(ckpt)
    theirs, _, _ = open_clip_side(export_openclip(ckpt, tmp_path / "oc"))
    assert theirs.logit_bias is not None
    assert theirs.logit_bias.item() == pytest.approx(ours.logit_bias.item())


@pytest.mark.parametrize("override, message", [
    ({"vision_pool": "mean"}, r"vision_pool = 'mean'.*class token"),
    ({"lexical_head": True}, r"LexLIP lexical heads"),
])
def test_openclip_export_refuses_what_open_clip_cannot_compute(tmp_path, override, message):
    ckpt = make_tiny_checkpoint(tmp_path / "ck", **override)
    with pytest.raises(ExportError, match=message):
        export_openclip(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_openclip_export_refuses_cls_pooling_and_flame_s_adapter():
    """(A LiT model, mean pooling and a linear projection, exports: tests/test_lit.py.)"""
    from clipforge.config import ModelConfig
    from clipforge.export import check_openclip_compatible

    base = ModelConfig().model_dump()
    cls = ModelConfig.model_construct(**{**base, "text_tower": "hf", "text_pooling": "cls"})
    with pytest.raises(ExportError, match="text_pooling = 'cls'.*pooler output.*--to onnx"):
        check_openclip_compatible(cls)
    mlp = ModelConfig.model_construct(**{**base, "text_tower": "hf", "text_projection": "mlp"})
    with pytest.raises(ExportError, match="text_projection = 'mlp'.*LayerNorm.*--to onnx"):
        check_openclip_compatible(mlp)
    check_openclip_compatible(ModelConfig.model_construct(**{**base, "text_tower": "hf"}))  # LiT: mean + linear


# ----------------------------------------------------------------------------- CLI
def test_cli_import_and_export_and_their_errors(openclip_files, tmp_path):
    _, weights, config = openclip_files
    runner = CliRunner()
    result = runner.invoke(app, ["import", "openclip", str(weights), "--config", str(config), "--out", str(tmp_path / "ck")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ck" / "model.safetensors").is_file()
    result = runner.invoke(app, ["export", str(tmp_path / "ck"), "--to", "onnx", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "onnx" / "text_encoder.onnx").is_file()
    result = runner.invoke(app, ["export", str(tmp_path / "ck"), "--to", "openclip", str(tmp_path / "oc")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "oc" / "open_clip_model.safetensors").is_file()
    result = runner.invoke(app, ["import", "openclip", str(tmp_path / "oc"), "--out", str(tmp_path / "ck2")])
    assert result.exit_code == 0, result.output  # a model directory needs no --config
    result = runner.invoke(app, ["import", "openclip", str(tmp_path / "ck"), "--out", str(tmp_path / "ck3")])
    assert result.exit_code != 0 and "not an OpenCLIP model directory" in str(result.exception) + result.output
    result = runner.invoke(app, ["export", str(tmp_path / "ck"), "--to", "tflite", str(tmp_path / "x")])
    assert result.exit_code != 0 and "hf, onnx" in result.output
    result = runner.invoke(app, ["import", "timm", str(weights), "--config", str(config), "--out", str(tmp_path / "y")])
    assert result.exit_code != 0 and "openclip, hf" in result.output
    result = runner.invoke(app, ["import", "openclip", str(weights), "--out", str(tmp_path / "y")])
    assert result.exit_code != 0 and "--config" in result.output  # openclip weights need their config


def random_hf_clip(tmp_path, hidden_act: str = "quick_gelu"):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=24, hidden_act=hidden_act),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act=hidden_act),
        projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # non-trivial biases / norms
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf_in")
    return model


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_import_hf_gives_the_same_embeddings(tmp_path, hidden_act):
    open_clip = pytest.importorskip("open_clip")
    theirs = random_hf_clip(tmp_path, hidden_act)
    proc = CliRunner().invoke(app, ["import", "hf", str(tmp_path / "hf_in"), "--out", str(tmp_path / "ckpt")])
    assert proc.exit_code == 0, proc.output
    ours, _, tokenizer = clipforge.load(tmp_path / "ckpt")
    assert ours.cfg.activation == hidden_act and tokenizer.kind == "clip-bpe"
    texts = ["a photo of a cat.", "two dogs on a sofa"]
    ids, mask = tokenizer(texts)
    their_ids = open_clip.tokenize(texts, context_length=24)  # CLIP's ids; HF pools at argmax = end-of-text
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        their_text = F.normalize(features(theirs.get_text_features(input_ids=their_ids)), dim=-1)
        their_image = F.normalize(features(theirs.get_image_features(pixel_values=images)), dim=-1)
        assert (ours.encode_text(ids, mask) - their_text).abs().max() <= ATOL
        assert (ours.encode_image(images) - their_image).abs().max() <= ATOL
    assert ours.logit_scale.item() == pytest.approx(theirs.logit_scale.item())


def test_import_hf_refuses_what_it_cannot_reproduce(tmp_path):
    random_hf_clip(tmp_path)
    config = json.loads((tmp_path / "hf_in" / "config.json").read_text())
    config["vision_config"]["layer_norm_eps"] = 1e-6
    (tmp_path / "hf_in" / "config.json").write_text(json.dumps(config))
    proc = CliRunner().invoke(app, ["import", "hf", str(tmp_path / "hf_in"), "--out", str(tmp_path / "ckpt")])
    assert proc.exit_code != 0
    assert "layer_norm_eps" in str(proc.exception or proc.output)
    with pytest.raises(ConversionError, match="config.json is missing"):
        from clipforge.models.convert import import_hf

        import_hf(tmp_path, tmp_path / "c2")


@pytest.mark.parametrize("name, content", [("notes.txt", b"{this is not a model}\n"),
                                           ("broken.safetensors", b"\x00\x01 not a header")])
def test_cli_import_of_a_file_that_is_not_weights_says_what_to_pass(openclip_files, tmp_path, capsys, name, content):
    from tiny_checkpoint import run_cli

    _, _, config = openclip_files
    (tmp_path / name).write_bytes(content)
    code, out, err = run_cli(capsys, "import", "openclip", tmp_path / name, "--config", config, "--out", tmp_path / "ck")
    err = " ".join(err.split())
    assert code == 2 and "Traceback" not in out + err, out + err
    assert f"{tmp_path / name} is not an OpenCLIP weights file" in err and ".safetensors" in err
    assert "Please file an issue" not in err and "weights_only=False" not in err and "will likely succeed" not in err
    assert not (tmp_path / "ck").exists()
