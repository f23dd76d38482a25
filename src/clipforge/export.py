"""Export a checkpoint for use outside clipforge: a Hugging Face ``CLIPModel`` directory, an OpenCLIP
model directory, or ONNX.

    clipforge export CKPT --to hf out_hf/      # transformers.CLIPModel / AutoTokenizer / CLIPImageProcessor
    clipforge export CKPT --to openclip out/   # open_clip.create_model_and_transforms("local-dir:out")
    clipforge export CKPT --to onnx out_onnx/  # image_encoder.onnx + text_encoder.onnx (+ tokenizer.json)

CKPT is a checkpoint directory or a run directory (its latest checkpoint), resolved as for
``clipforge eval``. The output is written next to OUT and renamed into place at the end, so a
failed export leaves nothing behind.

Hugging Face's CLIP is the same network as ours (pre-LN blocks, ln_pre, class token, bias-free
patch conv and projections) once the fused QKV is split into q/k/v; OpenCLIP's ``CLIP`` is the same
network under other names (``clipforge import openclip`` reads it back). Options a target cannot
express are refused by name instead of exporting a model that computes something else.
Needs the ``export`` extra: ``pip install 'clipforge[export]'`` (OpenCLIP: only for a tokenizer that is
not CLIP's own BPE, which is written as a Hugging Face tokenizer).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.models.convert import ConversionError

EXPORT_KINDS = ("hf", "onnx", "openclip")
ONNX_IMAGE_FILE = "image_encoder.onnx"
ONNX_TEXT_FILE = "text_encoder.onnx"
ONNX_OPSET = 17  # has LayerNormalization as one op


class ExportError(ConversionError):
    """A model or target that cannot be exported; the message says why and what to do."""


def _require(module: str, extra: str = "export"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"exporting needs the '{module}' package: pip install 'clipforge[{extra}]'") from None


def _checkpoint_dir(path: str | Path) -> Path:
    # the resolution `clipforge eval` uses: a checkpoint directory (or its model.safetensors), or a
    # run directory, meaning its latest checkpoint
    from clipforge.eval.evaluate import checkpoint_dir

    return checkpoint_dir(path)


def _check_out(out: Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output directory")
    return out


@contextmanager
def _staged_output(out: Path):
    """Yield a hidden directory next to ``out`` to write into; it becomes ``out`` only when the block
    succeeds. A failed export leaves nothing behind, so the corrected command is not told that
    ``out`` exists."""
    out = _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
    stage.mkdir()  # mkdir, not mkdtemp: the result gets the usual permissions (mkdtemp's are 0700)
    try:
        yield stage
        if out.exists():
            out.rmdir()  # an empty directory made beforehand (checked above): take its place
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- Hugging Face
# transformers' SiglipModel is another network than ours with a logit bias, in both towers; a
# weight mapping would export a model that computes something else (docs/export.md, "SigLIP")
SIGLIP_REFUSAL = (
    "cannot export to Hugging Face: the model has a logit bias (model.logit_bias_init, SigLIP). HF CLIPModel "
    "has no bias, and transformers' SiglipModel cannot compute this network: its text tower attends "
    "bidirectionally (ours is causal) and pools the last position, not end-of-text; its ViT has no class "
    "token and no LayerNorm before the blocks (our ln_pre), pools with an attention head (MAP) and has no "
    "image projection (the embedding width must equal the vision width). Export to ONNX instead (--to onnx), "
    "which keeps the logit bias in onnx_config.json"
)
def check_hf_compatible(cfg) -> None:
    """Refuse, by name, architecture options that transformers' CLIPModel has no equivalent for."""
    if cfg.image_tower != "vit":
        raise ExportError(
            f"cannot export to Hugging Face: the image tower is model.image_tower = '{cfg.image_tower}'; "
            "transformers' CLIPModel has ViT image towers only. Export to OpenCLIP (--to openclip), which has "
            "CLIP's ResNet and timm towers, or to ONNX (--to onnx)")
    if cfg.text_tower != "clip" or cfg.text_projection != "linear":
        raise ExportError(
            f"cannot export to Hugging Face: the text tower is a pretrained encoder (model.text_tower = "
            f"{cfg.text_tower!r}, text_projection = {cfg.text_projection!r}); HF CLIPModel only has CLIP's causal "
            "text transformer with a linear projection. Export to ONNX instead (--to onnx)"
        )
    if cfg.vision_pool != "cls":
        raise ExportError(
            f"cannot export to Hugging Face: model.vision_pool = {cfg.vision_pool!r}; HF CLIPModel always pools "
            "the image tower at the class token. Export to ONNX instead (--to onnx)"
        )
    if cfg.logit_bias_init is not None:
        raise ExportError(SIGLIP_REFUSAL)
    check_uniform_layers(cfg, "Hugging Face")


def check_uniform_layers(cfg, target: str) -> None:
    """Refuse a model whose layers differ (a CoFi-pruned TinyCLIP student): ``target`` has one shape per tower."""
    if not cfg.uniform_layers():
        raise ExportError(
            f"cannot export to {target}: the model's layers have their own head counts, MLP widths or head width "
            f"(model.*_layer_heads / *_layer_mlp / *_head_dim, e.g. a tinyclip_prune granularity = 'cofi' student), "
            f"and {target}'s CLIP has one shape per tower. Export to ONNX instead (--to onnx), or prune with "
            f"granularity 'groups' (clipforge distill --granularity groups) for a student {target} can hold")


def hf_clip_config(cfg, tokenizer) -> dict[str, Any]:
    """``transformers.CLIPConfig`` arguments describing our architecture."""
    # HF's "gelu" is exact GELU, "quick_gelu" x * sigmoid(1.702 x), as ours; torch's LayerNorm eps
    common = dict(hidden_act=cfg.activation, layer_norm_eps=1e-5, projection_dim=cfg.embed_dim)
    text = dict(
        common,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.text_width,
        intermediate_size=int(cfg.text_width * cfg.mlp_ratio),
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.context_length,
        # HF pools at the first eos_token_id (when it is not the legacy value 2; argmax(ids) then),
        # which is where our tokenizer puts end-of-text
        bos_token_id=tokenizer.sot_id,
        eos_token_id=tokenizer.eot_id,
        pad_token_id=tokenizer.pad_id,
    )
    if tokenizer.eot_id == 2:
        raise ExportError("cannot export to Hugging Face: the tokenizer's end-of-text id is 2, which HF CLIP "
                          "treats as a legacy config and pools at argmax(input_ids) instead")
    vision = dict(
        common,
        hidden_size=cfg.vision_width,
        intermediate_size=int(cfg.vision_width * cfg.mlp_ratio),
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
    )
    return dict(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim,
                logit_scale_init_value=float(cfg.logit_scale_init))


def _split_qkv(prefix: str, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    # our fused rows are [q; k; v]
    out = {}
    for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weight.chunk(3, dim=0), bias.chunk(3, dim=0)):
        out[f"{prefix}.self_attn.{name}.weight"] = w.contiguous()
        out[f"{prefix}.self_attn.{name}.bias"] = b.contiguous()
    return out


def ours_to_hf_state_dict(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers CLIPModel key names (the mapping ``import hf`` reads back)."""
    from clipforge.models.convert import HF_BLOCK_KEYS, HF_KEYS, HF_TOWERS

    out = {theirs: sd[ours] for ours, theirs in HF_KEYS.items()}
    for (ours, theirs), layers in zip(HF_TOWERS, (cfg.text_layers, cfg.vision_layers)):
        for i in range(layers):
            src, dst = f"{ours}.{i}", f"{theirs}.encoder.layers.{i}"
            out.update(_split_qkv(dst, sd[f"{src}.attn.qkv.weight"], sd[f"{src}.attn.qkv.bias"]))
            out.update({f"{dst}.{b}": sd[f"{src}.{a}"] for a, b in HF_BLOCK_KEYS.items()})
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _hf_tokenizer(tokenizer):
    """Our ``tokenizers`` object wrapped so ``AutoTokenizer.from_pretrained`` gives the same ids."""
    transformers = _require("transformers")
    from clipforge.models.tokenizer import CLIP_EOT

    backend = tokenizer._tok
    special = dict(bos_token=backend.id_to_token(tokenizer.sot_id), eos_token=backend.id_to_token(tokenizer.eot_id))
    if tokenizer.kind == "clip-bpe":
        # CLIP's padding id 0 is the ordinary token "!"; making it special would change how "!" in
        # text is split. Pad with end-of-text instead (HF's own CLIP does): the causal text tower
        # never looks past end-of-text, so the embeddings do not change
        special["pad_token"] = CLIP_EOT
    else:
        special["pad_token"] = backend.id_to_token(tokenizer.pad_id)
        special["unk_token"] = backend.id_to_token(tokenizer.unk_id)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend.__class__.from_str(backend.to_str()),  # a copy, ours keeps its settings
        model_max_length=tokenizer.context_length, padding_side="right", truncation_side="right", **special,
    )
    return fast


def _hf_image_processor(config: dict[str, Any]):
    transformers = _require("transformers")
    pre = config["preprocess"]
    size = pre["image_size"]
    return transformers.CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=3,  # PIL bicubic, as our EvalPreprocess
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(pre["mean"]), image_std=list(pre["std"]), do_convert_rgb=True,
    )


def export_hf(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write a directory that ``transformers.CLIPModel.from_pretrained`` and ``AutoTokenizer`` load offline."""
    transformers = _require("transformers")
    from clipforge.api import load
    from clipforge.train import checkpoint as ckpt

    ckpt_path = _checkpoint_dir(ckpt_path)
    _check_out(Path(out))  # before the slow part: a taken directory is refused at once
    model, _, tokenizer = load(ckpt_path)
    cfg = model.cfg
    check_hf_compatible(cfg)
    hf_config = transformers.CLIPConfig(**hf_clip_config(cfg, tokenizer))
    hf_model = transformers.CLIPModel(hf_config)
    # strict: every HF weight must come from ours, or the export is wrong
    result = hf_model.load_state_dict(ours_to_hf_state_dict(model.state_dict(), cfg), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ExportError(f"internal: HF key mapping incomplete (missing {missing[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}); transformers {transformers.__version__}")
    with _staged_output(Path(out)) as stage:
        hf_model.save_pretrained(stage, safe_serialization=True)
        _hf_tokenizer(tokenizer).save_pretrained(stage)
        _hf_image_processor(ckpt.read_config(ckpt_path)).save_pretrained(stage)
    return Path(out)


# ----------------------------------------------------------------------------- OpenCLIP
OPENCLIP_CONFIG_FILE = "open_clip_config.json"
OPENCLIP_WEIGHTS_FILE = "open_clip_model.safetensors"


def check_openclip_compatible(cfg) -> None:
    """Refuse, by name, what OpenCLIP's CLIP / CustomTextCLIP (ViT, ModifiedResNet or timm image tower; CLIP
    text transformer or a Hugging Face encoder, mean-pooled, linear projection) cannot compute."""
    if cfg.text_projection != "linear":
        raise ExportError(
            f"cannot export to OpenCLIP: model.text_projection = {cfg.text_projection!r} (FLAME's adapter: Linear, "
            "GELU, Linear and a LayerNorm); OpenCLIP's 'mlp' projection has no LayerNorm and other widths. "
            "Export to ONNX instead (--to onnx)")
    if cfg.text_tower == "hf" and cfg.text_pooling != "mean":
        raise ExportError(
            f"cannot export to OpenCLIP: model.text_pooling = {cfg.text_pooling!r}; OpenCLIP's 'cls_pooler' reads "
            "the encoder's pooler output (a dense layer + tanh), not the [CLS] token. Export to ONNX instead (--to onnx)")
    if cfg.vision_pool != "cls":
        raise ExportError(
            f"cannot export to OpenCLIP: model.vision_pool = {cfg.vision_pool!r}; OpenCLIP's ViT always has a class "
            "token (its 'avg' pooling attends to it), ours has none with mean pooling. Export to ONNX instead (--to onnx)")
    if cfg.lexical_head:
        raise ExportError(
            "cannot export to OpenCLIP: the model has LexLIP lexical heads (model.lexical_head), which OpenCLIP's CLIP "
            "does not have. Export to ONNX (--to onnx) for the dense embeddings")
    check_uniform_layers(cfg, "OpenCLIP")


def openclip_vision_cfg(cfg) -> dict[str, Any]:
    """OpenCLIP's ``vision_cfg`` for our image tower: a ViT, its ModifiedResNet (``layers`` a list; the
    recipe's heads divide 32 x width, so head_width is whole) or its TimmModel."""
    if cfg.image_tower == "resnet":
        return dict(image_size=cfg.image_size, layers=list(cfg.resnet_layers), width=cfg.vision_width,
                    head_width=32 * cfg.vision_width // cfg.vision_heads)
    if cfg.image_tower == "timm":
        return dict(image_size=cfg.image_size, timm_model_name=cfg.timm_model, timm_model_pretrained=False,
                    timm_pool=cfg.timm_pool, timm_proj=None if cfg.timm_proj == "timm" else cfg.timm_proj,
                    timm_proj_bias=cfg.timm_proj_bias,
                    timm_drop=0.0, timm_drop_path=cfg.timm_drop_path)
    return dict(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
                layers=cfg.vision_layers, head_width=cfg.vision_width // cfg.vision_heads, mlp_ratio=cfg.mlp_ratio,
                patch_dropout=cfg.patch_dropout)


def openclip_model_config(cfg, tokenizer, out_dir: str) -> dict[str, Any]:
    """``{"model_cfg": ..., "preprocess_cfg": ...}`` as in a Hub ``open_clip_config.json``; ``out_dir`` is
    where the export lands.

    CLIP's own BPE (kind clip-bpe) is OpenCLIP's default tokenizer, pooled at argmax (end-of-text is the
    largest id). Any other tokenizer is written beside the weights as a Hugging Face tokenizer
    (``hf_tokenizer_name``; with ``local-dir:`` OpenCLIP reads it from that directory) and the text tower
    pools at its end-of-text id (``pool_type = "eos"``), as ours does. A pretrained (``hf``) text tower
    becomes OpenCLIP's HFTextEncoder, built from the encoder's config.json in ``out_dir``."""
    vision = openclip_vision_cfg(cfg)
    if cfg.text_tower == "hf":  # the encoder's config.json is written beside the weights: OpenCLIP builds it from there
        text = dict(hf_model_name=out_dir, hf_tokenizer_name=out_dir, hf_pooler_type="mean_pooler",
                    hf_proj_type="linear", context_length=cfg.context_length)
    else:
        text = dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                    heads=cfg.text_heads, layers=cfg.text_layers, mlp_ratio=cfg.mlp_ratio)
    if cfg.text_tower == "clip" and tokenizer.kind != "clip-bpe":
        text.update(hf_tokenizer_name=out_dir, pool_type="eos", eos_id=tokenizer.eot_id, pad_id=tokenizer.pad_id)
    model_cfg = dict(embed_dim=cfg.embed_dim, quick_gelu=cfg.activation == "quick_gelu", vision_cfg=vision, text_cfg=text)
    if cfg.logit_bias_init is not None:
        model_cfg["init_logit_bias"] = cfg.logit_bias_init  # makes the logit_bias parameter; its value is in the weights
    preprocess = dict(size=cfg.image_size, mean=list(cfg.image_mean), std=list(cfg.image_std),
                      interpolation="bicubic", resize_mode="shortest")  # our EvalPreprocess: shorter side, centre crop
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def export_openclip(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write a directory that ``open_clip.create_model_and_transforms("local-dir:OUT")`` and
    ``open_clip.get_tokenizer("local-dir:OUT")`` load offline."""
    from safetensors.torch import save_file

    from clipforge.api import load
    from clipforge.models.convert import openclip_state_dict_to_ours, ours_to_openclip_state_dict

    ckpt_path = _checkpoint_dir(ckpt_path)
    _check_out(Path(out))
    model, _, tokenizer = load(ckpt_path)
    cfg = model.cfg
    check_openclip_compatible(cfg)
    hf_text = cfg.text_tower == "hf"
    ours = model.state_dict()
    theirs = ours_to_openclip_state_dict(ours, hf_text=hf_text)
    if not hf_text:  # the mapping `clipforge import openclip` reads, tested against open_clip
        back = openclip_state_dict_to_ours(theirs)
        if back.keys() != ours.keys():
            raise ExportError(f"internal: OpenCLIP key mapping is not one-to-one ({sorted(back.keys() ^ ours.keys())[:5]})")
    config = openclip_model_config(cfg, tokenizer, str(Path(out).resolve()))
    with _staged_output(Path(out)) as stage:
        save_file(theirs, str(stage / OPENCLIP_WEIGHTS_FILE))
        (stage / OPENCLIP_CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if hf_text:
            from clipforge.models.hf_text import HF_CONFIG_FILE, tower_config

            (stage / HF_CONFIG_FILE).write_text(json.dumps(tower_config(cfg.text_source), indent=2))
        if tokenizer.kind != "clip-bpe":
            _hf_tokenizer(tokenizer).save_pretrained(stage)
    return Path(out)


# ----------------------------------------------------------------------------- ONNX
class ImageEncoder(nn.Module):
    """uint8 images N×3×S×S (resized and centre-cropped) -> unit-norm embeddings N×E; the
    normalisation with the checkpoint's mean/std is part of the graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class TextEncoder(nn.Module):
    """input_ids and attention_mask (int64 N×L, L = context length) -> unit-norm embeddings N×E."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask)


def _onnx_export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_name: str) -> None:
    # The TorchScript-based exporter: fast, and needs no onnxscript. Only the batch axis is dynamic.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=input_names, output_names=[output_name],
            dynamic_axes={**{n: {0: "batch"} for n in input_names}, output_name: {0: "batch"}},
        )


def export_onnx(ckpt_path: str | Path, out: str | Path) -> Path:
    """Write ``image_encoder.onnx`` and ``text_encoder.onnx``, plus the tokenizer and a JSON that says
    how to feed them (``onnx_config.json``)."""
    _require("onnx")
    from clipforge.api import load

    source = _checkpoint_dir(ckpt_path)
    _check_out(Path(out))  # before the slow part: a taken directory is refused at once
    model, _, tokenizer = load(source)
    with _staged_output(Path(out)) as stage:
        _write_onnx(model, tokenizer, source, stage)
    return Path(out)


def _write_onnx(model, tokenizer, source: Path, out: Path) -> None:
    from clipforge.train import checkpoint as ckpt

    cfg = model.cfg
    images = torch.zeros(2, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
    ids, mask = tokenizer(["a photo", "an example caption"])
    with torch.no_grad():
        _onnx_export(ImageEncoder(model).eval(), (images,), out / ONNX_IMAGE_FILE, ["images"], "image_embeds")
        _onnx_export(TextEncoder(model).eval(), (ids, mask), out / ONNX_TEXT_FILE, ["input_ids", "attention_mask"],
                     "text_embeds")
    config = ckpt.read_config(source)
    shutil.copy(source / ckpt.TOKENIZER, out / ckpt.TOKENIZER)
    (out / "onnx_config.json").write_text(json.dumps({
        "image_encoder": {"file": ONNX_IMAGE_FILE, "input": "images: uint8 N x 3 x S x S (RGB, resized shorter "
                          "side to S, bicubic, centre-cropped)", "output": "image_embeds: float32 N x E, unit norm"},
        "text_encoder": {"file": ONNX_TEXT_FILE, "inputs": "input_ids, attention_mask: int64 N x L from tokenizer.json",
                         "output": "text_embeds: float32 N x E, unit norm"},
        "preprocess": config["preprocess"], "tokenizer": config["tokenizer"], "embed_dim": cfg.embed_dim,
        "logit_scale": float(model.logit_scale.detach().exp()), "opset": ONNX_OPSET,
        # SigLIP: logits = logit_scale * cos + logit_bias (None: a softmax CLIP model)
        "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
    }, indent=2))


def export(ckpt_path: str | Path, to: str, out: str | Path) -> Path:
    """Export ``ckpt_path`` (a checkpoint directory, or a run directory: its latest checkpoint) to ``out``."""
    if to not in EXPORT_KINDS:
        raise ExportError(f"unknown export target {to!r}; choose one of {', '.join(EXPORT_KINDS)}")
    return {"hf": export_hf, "onnx": export_onnx, "openclip": export_openclip}[to](ckpt_path, out)
