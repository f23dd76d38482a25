"""Bring OpenCLIP weights into clipforge: key mapping, config mapping, and a checkpoint writer.

    clipforge import openclip open_clip_model.safetensors --config open_clip_config.json --out ckpt/

OpenCLIP's ViT CLIP and ours are the same network op for op (tests/test_model.py checks it), so
importing is renaming keys and transposing the two projections. CLIP's ResNet and timm image towers
keep OpenCLIP's names; only their projection becomes ours (tests/test_resnet.py, test_timm_tower.py).
What has no counterpart here (layer scale, attentional pooling, a Hugging Face image tower, ...) is
refused with a message naming the option, instead of producing a model that silently computes
something else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from clipforge.config import ModelConfig
from clipforge.outputs import new_output_dir
from clipforge.train import checkpoint as ckpt

# OpenCLIP's defaults (open_clip.constants) for configs that do not say
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ConversionError(ValueError):
    """A model that cannot be converted faithfully; the message names the option and what to do."""


# ----------------------------------------------------------------------------- weights
# OpenCLIP name -> ours: key prefixes, then names inside a residual block; the two projections are
# W×E parameters there and E×W nn.Linear weights here
OPENCLIP_PREFIXES = {
    "visual.conv1.": "visual.patch_embed.",
    "visual.class_embedding": "visual.class_token",
    "visual.positional_embedding": "visual.pos_embed",
    "visual.transformer.resblocks.": "visual.blocks.",
    "transformer.resblocks.": "text.blocks.",
    "token_embedding.": "text.token_embed.",
    "positional_embedding": "text.pos_embed",
    "ln_final.": "text.ln_final.",
}
OPENCLIP_BLOCK_KEYS = {
    ".attn.in_proj_weight": ".attn.qkv.weight",
    ".attn.in_proj_bias": ".attn.qkv.bias",
    ".attn.out_proj.": ".attn.proj.",
    ".mlp.c_fc.": ".mlp.fc.",
    ".mlp.c_proj.": ".mlp.proj.",
}
OPENCLIP_PROJECTIONS = {"visual.proj": "image_projection.weight", "text_projection": "text_projection.weight"}
# CLIP's ResNet tower has OpenCLIP's names already (models/resnet.py); its attention pool's output
# projection is our image projection (both nn.Linear, with a bias: nothing transposed)
RESNET_MARK = "visual.attnpool.positional_embedding"
OPENCLIP_RESNET_PROJECTION = {"visual.attnpool.c_proj.weight": "image_projection.weight",
                              "visual.attnpool.c_proj.bias": "image_projection.bias"}
# a timm trunk keeps timm's names under visual.trunk. in both; OpenCLIP's linear head is our projection
TIMM_PREFIX = "visual.trunk."
OPENCLIP_TIMM_PROJECTION = {"visual.head.proj.weight": "image_projection.weight",
                            "visual.head.proj.bias": "image_projection.bias"}


def _own_named_tower(keys) -> dict[str, str]:
    """OpenCLIP name -> ours of the projection of a ResNet or timm image tower, whose other keys have the same
    names on both sides (a state dict of either side tells which it is); {} for the ViT, renamed key by key."""
    if RESNET_MARK in keys:
        return OPENCLIP_RESNET_PROJECTION
    if any(k.startswith(TIMM_PREFIX) for k in keys):
        return OPENCLIP_TIMM_PROJECTION
    return {}


def _renamed(key: str, prefixes: dict[str, str], inside_blocks: dict[str, str]) -> str:
    for old, new in prefixes.items():
        if key.startswith(old):
            key = new + key[len(old):]
            break
    for old, new in inside_blocks.items():
        key = key.replace(old, new)
    return key


def openclip_state_dict_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP ViT, ResNet or timm / text CLIP weights -> our key names (the ViT's and text projections are
    stored transposed there)."""
    tower_projection = _own_named_tower(sd)
    out = {}
    for key, value in sd.items():
        if key.startswith("text."):  # CustomTextCLIP keeps its text tower under "text."
            key = key[len("text."):]
        if key == "attn_mask":
            continue
        if tower_projection and key.startswith("visual."):
            out[tower_projection.get(key, key)] = value
        elif key in OPENCLIP_PROJECTIONS:
            out[OPENCLIP_PROJECTIONS[key]] = value.T.contiguous()
        else:
            out[_renamed(key, OPENCLIP_PREFIXES, OPENCLIP_BLOCK_KEYS)] = value
    return out


def ours_to_openclip_state_dict(sd: dict[str, torch.Tensor], hf_text: bool = False) -> dict[str, torch.Tensor]:
    """The inverse of ``openclip_state_dict_to_ours``: our weights under open_clip.model.CLIP's names.

    ``hf_text``: the text tower is a Hugging Face encoder (``model.text_tower = "hf"``), which OpenCLIP's
    CustomTextCLIP keeps as ``text.transformer`` with its linear projection ``text.proj`` (nn.Linear, as ours)."""
    prefixes = {v: k for k, v in OPENCLIP_PREFIXES.items()}
    inside_blocks = {v: k for k, v in OPENCLIP_BLOCK_KEYS.items()}
    projections = {v: k for k, v in OPENCLIP_PROJECTIONS.items()}
    tower_projection = {v: k for k, v in _own_named_tower(sd).items()}
    out = {}
    for key, value in sd.items():
        if tower_projection and (key.startswith("visual.") or key in tower_projection):
            theirs = tower_projection.get(key, key)
        elif hf_text and key.startswith("text.hf."):
            theirs = "text.transformer." + key[len("text.hf."):]
        elif hf_text and key == "text_projection.weight":
            theirs = "text.proj.weight"
        else:
            theirs = projections.get(key) or _renamed(key, prefixes, inside_blocks)
            value = value.T if key in projections else value
        out[theirs] = value.detach().clone().contiguous()
    return out


def _load_reason(e: Exception) -> str:
    """The first line that says what failed: torch's weights-only text is a page of advice that does not apply."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)[:200]


def read_openclip_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (never unpickling code); training
    checkpoints ({"state_dict": ...}, DDP's "module." prefix) are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OpenCLIP weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle and safetensors errors come in many types
        raise ConversionError(f"{path} is not an OpenCLIP weights file ({_load_reason(e)}; torch files are read "
                              "weights-only, never unpickling code): pass the model's .safetensors (e.g. "
                              "open_clip_model.safetensors) or a torch .bin/.pt holding only its state dict") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # a training checkpoint
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ----------------------------------------------------------------------------- config
def read_openclip_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_cfg, preprocess_cfg)`` from a bare model config (as in open_clip/model_configs)
    or a Hub-style ``open_clip_config.json`` ({"model_cfg": ..., "preprocess_cfg": ...})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OpenCLIP config not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    if "model_cfg" in raw:
        return raw["model_cfg"], raw.get("preprocess_cfg") or {}
    if "vision_cfg" not in raw or "text_cfg" not in raw:
        raise ConversionError(f"{path} is not an OpenCLIP model config: it needs vision_cfg and text_cfg "
                              "(or model_cfg, as in a Hub open_clip_config.json)")
    return raw, {}


# options that change the computation and that our towers do not have: name -> what it would need
_VISION_UNSUPPORTED = {
    "ls_init_value": "layer scale",
    "attentional_pool": "an attentional pooler",
    "no_ln_pre": "a ViT without ln_pre",
    "final_ln_after_pool": "LayerNorm after pooling",
    "act_kwargs": "custom activation arguments",
    "qk_norm": "q/k normalisation", "scaled_cosine_attn": "scaled cosine attention", "scale_heads": "head scales",
    "scale_attn_inner": "inner attention LayerNorm", "scale_attn": "attention LayerNorm", "scale_fc": "MLP LayerNorm",
}
_TEXT_UNSUPPORTED = {
    "hf_model_name": "a Hugging Face text tower",
    "ls_init_value": "layer scale",
    "embed_cls": "a text class token",
    "no_causal_mask": "a bidirectional text tower",
    "final_ln_after_pool": "LayerNorm after pooling",
    "proj_bias": "a text projection bias",
    "act_kwargs": "custom activation arguments",
    "qk_norm": "q/k normalisation", "scaled_cosine_attn": "scaled cosine attention", "scale_heads": "head scales",
    "scale_attn_inner": "inner attention LayerNorm", "scale_attn": "attention LayerNorm", "scale_fc": "MLP LayerNorm",
}
_DEFAULT_FALSY = (None, False, 0, 0.0, {}, "")


def _refuse_unsupported(cfg: dict[str, Any], table: dict[str, str], where: str) -> None:
    for key, needs in table.items():
        if cfg.get(key) not in _DEFAULT_FALSY:
            raise ConversionError(
                f"cannot import: {where}.{key} = {cfg[key]!r} needs {needs}, which clipforge's CLIP does not have"
            )


def _check_layer_norm_eps(cfg: dict[str, Any], where: str) -> None:
    eps = (cfg.get("norm_kwargs") or {}).get("eps", 1e-5)
    if eps != 1e-5:
        raise ConversionError(f"cannot import: {where}.norm_kwargs.eps = {eps} (clipforge's LayerNorms use 1e-5)")


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"cannot import: {name} = {list(value)} is not square (clipforge's ViT is)")
        value = value[0]
    return int(value)


def openclip_config_to_ours(model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any] | None = None) -> ModelConfig:
    """Our ModelConfig for an OpenCLIP CLIP config (ViT, ResNet or timm image tower); options with no equivalent
    are refused by name."""
    preprocess_cfg = preprocess_cfg or {}
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    resnet = isinstance(vision.get("layers", 12), (list, tuple))  # CLIP's ModifiedResNet (RN50, RN101, ...)
    timm = bool(vision.get("timm_model_name"))  # a timm backbone (ConvNeXt CLIPs, ...)
    _refuse_unsupported(vision, _VISION_UNSUPPORTED, "vision_cfg")
    _refuse_unsupported(text, _TEXT_UNSUPPORTED, "text_cfg")
    _check_layer_norm_eps(vision, "vision_cfg")
    _check_layer_norm_eps(text, "text_cfg")
    if vision.get("pool_type", "tok") != "tok":
        raise ConversionError(f"cannot import: vision_cfg.pool_type = {vision['pool_type']!r}; "
                              "only 'tok' (class token) pooling is supported")
    # 'last' pools the context's last position, padding included: not end-of-text for shorter texts
    if text.get("pool_type", "argmax") not in ("argmax", "eos"):
        raise ConversionError(f"cannot import: text_cfg.pool_type = {text['pool_type']!r}; clipforge pools "
                              "at the end-of-text token ('argmax' with CLIP's tokenizer, or 'eos', in OpenCLIP)")
    if text.get("proj_type", "linear") != "linear":
        raise ConversionError(f"cannot import: text_cfg.proj_type = {text['proj_type']!r}; only 'linear' is supported")
    if vision.get("pos_embed_type", "learnable") != "learnable":
        raise ConversionError(f"cannot import: vision_cfg.pos_embed_type = {vision['pos_embed_type']!r}; "
                              "only learnable positional embeddings are supported")
    vision_mlp, text_mlp = vision.get("mlp_ratio", 4.0), text.get("mlp_ratio", 4.0)
    if vision_mlp != text_mlp:
        raise ConversionError(f"cannot import: vision mlp_ratio {vision_mlp} != text mlp_ratio {text_mlp}; "
                              "clipforge uses one model.mlp_ratio for both towers")

    vision_width = int(vision.get("width", 768))
    head_width = int(vision.get("head_width", 64))
    if timm:
        image_tower = _timm_tower(vision)
    elif resnet:
        image_tower = dict(image_tower="resnet", resnet_layers=[int(n) for n in vision["layers"]],
                           vision_heads=_resnet_heads(vision_width, head_width))
    else:
        if vision_width % head_width:
            raise ConversionError(f"cannot import: vision width {vision_width} is not a multiple of head_width "
                                  f"{head_width}")
        image_tower = dict(patch_size=_square(vision.get("patch_size", 16), "vision_cfg.patch_size"),
                           vision_layers=int(vision.get("layers", 12)), vision_heads=vision_width // head_width,
                           vision_pool="cls", patch_dropout=float(vision.get("patch_dropout", 0.0)))
    bias = model_cfg.get("init_logit_bias")
    return ModelConfig(
        image_size=_square(vision.get("image_size", 224), "vision_cfg.image_size"),
        vision_width=vision_width,
        **image_tower,
        mlp_ratio=float(vision_mlp),
        activation="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",  # OpenAI-trained weights
        vocab_size=int(text.get("vocab_size", 49408)),
        context_length=int(text.get("context_length", 77)),
        text_width=int(text.get("width", 512)),
        text_layers=int(text.get("layers", 12)),
        text_heads=int(text.get("heads", 8)),
        embed_dim=int(model_cfg["embed_dim"]),
        logit_bias_init=None if bias is None else float(bias),
        image_mean=tuple(preprocess_cfg.get("mean", OPENAI_MEAN)),
        image_std=tuple(preprocess_cfg.get("std", OPENAI_STD)),
    )


def _timm_tower(vision: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig keys for OpenCLIP's TimmModel: a trunk pooled by timm, a linear head or none."""
    proj = vision.get("timm_proj", "linear")
    proj = "timm" if proj is None else proj  # OpenCLIP: null = timm's own classifier outputs the embedding
    pool = vision.get("timm_pool", "avg")
    if proj not in ("linear", "none", "timm"):
        raise ConversionError(f"cannot import: vision_cfg.timm_proj = {proj!r}; clipforge's timm tower projects "
                              "linearly, with timm's classifier (null) or not at all ('none')")
    if pool in ("abs_attn", "rot_attn"):
        raise ConversionError(f"cannot import: vision_cfg.timm_pool = {pool!r} is OpenCLIP's own attention pool; "
                              "clipforge's timm tower pools with timm's global_pool")
    if vision.get("timm_drop", 0.0):
        raise ConversionError(f"cannot import: vision_cfg.timm_drop = {vision['timm_drop']} (dropout before the "
                              "projection); clipforge's timm tower has none")
    return dict(image_tower="timm", timm_model=vision["timm_model_name"], timm_pool=pool, timm_proj=proj,
                timm_proj_bias=bool(vision.get("timm_proj_bias", False)), timm_drop_path=vision.get("timm_drop_path"))


def _resnet_heads(width: int, head_width: int) -> int:
    """OpenCLIP's ModifiedResNet has 32 x width / head_width attention-pool heads (32 for RN50)."""
    if (32 * width) % head_width:
        raise ConversionError(f"cannot import: the ResNet's attention pool width 32 x {width} is not a multiple of "
                              f"vision_cfg.head_width {head_width}")
    return 32 * width // head_width


# ----------------------------------------------------------------------------- checkpoint
def write_model_checkpoint(out: str | Path, model: torch.nn.Module, tokenizer, config: dict[str, Any]) -> Path:
    """Write weights, config and tokenizer to ``out`` via a temp dir and a rename (never half-written)."""
    out = new_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    ckpt.write_model_files(tmp, model, config, tokenizer)
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    return out


# the weight files open_clip's "local-dir:" looks for, in its order of preference
OPENCLIP_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                        "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")


def openclip_dir_files(directory: Path) -> tuple[Path, Path]:
    """``(weights, config)`` of an OpenCLIP model directory (a Hub download, or ``clipforge export --to openclip``)."""
    config = directory / "open_clip_config.json"
    weights = next((directory / n for n in OPENCLIP_DIR_WEIGHTS if (directory / n).is_file()), None)
    if not config.is_file() or weights is None:
        raise FileNotFoundError(f"{directory} is not an OpenCLIP model directory: it needs open_clip_config.json and "
                                f"one of {', '.join(OPENCLIP_DIR_WEIGHTS)} (or pass the weights file and --config)")
    return weights, config


def import_openclip(
    weights: str | Path, config: str | Path | None, out: str | Path, vocab_file: str | Path | None = None
) -> Path:
    """Convert an OpenCLIP CLIP (ViT, ResNet or timm image tower; weights + JSON config, or a model
    directory holding both, with ``config=None``) into a clipforge checkpoint directory."""
    from clipforge.models.clip import CLIP
    from clipforge.models.tokenizer import ClipBPETokenizer

    if config is None:
        weights, config = openclip_dir_files(Path(weights))
    model_cfg, preprocess_cfg = read_openclip_config(config)
    cfg = openclip_config_to_ours(model_cfg, preprocess_cfg)
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        tokenizer = _tokenizer_beside(Path(config), text_cfg, cfg.context_length)
    else:
        tokenizer = ClipBPETokenizer.from_vocab_file(vocab_file, cfg.context_length)
    if text_cfg.get("pool_type") == "eos" and text_cfg.get("eos_id", 2) != tokenizer.eot_id:
        raise ConversionError(f"cannot import: text_cfg.eos_id = {text_cfg.get('eos_id', 2)} is not the tokenizer's "
                              f"end-of-text id {tokenizer.eot_id}; clipforge pools at end-of-text")
    if text_cfg.get("pool_type", "argmax") == "argmax" and tokenizer.kind != "clip-bpe":
        raise ConversionError("cannot import: text_cfg.pool_type = 'argmax' pools at the largest token id, which is "
                              "end-of-text only for CLIP's tokenizer; this model has another one")
    # CLIP's BPE fills the embedding table exactly; a clipforge BPE may have fewer tokens than rows
    if tokenizer.vocab_size > cfg.vocab_size or (tokenizer.kind == "clip-bpe" and tokenizer.vocab_size != cfg.vocab_size):
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} tokens but text_cfg.vocab_size "
                              f"is {cfg.vocab_size}; this model was trained with another tokenizer")
    state = openclip_state_dict_to_ours(read_openclip_weights(weights))
    model = CLIP(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ConversionError(f"{weights} does not match {config}: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ConversionError(
            f"{weights} does not match {config}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]} "
            "(is the config the one these weights were trained with?)"
        )
    source = {"from": "openclip", "weights": str(weights), "config": str(config)}
    return write_model_checkpoint(out, model, tokenizer, ckpt.checkpoint_config(cfg, tokenizer, source=source))


def _clipforge_bpe(path: Path, context_length: int):
    """The clipforge BPE tokenizer in ``path`` (a tokenizer.json that `clipforge export` wrote), or None when
    there is no such file or it is another tokenizer (CLIP's own has no <sot>/<eot>/<pad>/<unk>)."""
    from clipforge.models.tokenizer import BPETokenizer

    if not path.is_file():
        return None
    try:
        return BPETokenizer.load(path, context_length)
    except Exception:  # noqa: BLE001 - ours lacks a special token (ValueError); tokenizers' parse errors are bare Exceptions
        return None


def _tokenizer_beside(config: Path, text_cfg: dict[str, Any], context_length: int):
    """A clipforge BPE tokenizer saved as a Hugging Face tokenizer next to the config, as ``clipforge export
    --to openclip`` writes it (OpenCLIP reads it from there with ``local-dir:``)."""
    path = config.parent / "tokenizer.json"
    tokenizer = _clipforge_bpe(path, context_length)
    if tokenizer is None:
        raise ConversionError(f"cannot import: text_cfg.hf_tokenizer_name = {text_cfg['hf_tokenizer_name']!r} names a "
                              f"Hugging Face tokenizer; clipforge reads only its own BPE from tokenizer.json beside the "
                              f"config (as `clipforge export --to openclip` writes it), and {path} is not one")
    return tokenizer


# ----------------------------------------------------------------------------- Hugging Face CLIPModel
# our key -> transformers CLIPModel's, for import (here) and export (clipforge.export) alike
HF_KEYS = {
    "logit_scale": "logit_scale",
    "image_projection.weight": "visual_projection.weight",
    "text_projection.weight": "text_projection.weight",
    "text.token_embed.weight": "text_model.embeddings.token_embedding.weight",
    "text.pos_embed": "text_model.embeddings.position_embedding.weight",
    "visual.class_token": "vision_model.embeddings.class_embedding",
    "visual.patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.pos_embed": "vision_model.embeddings.position_embedding.weight",
    **{f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in (
        ("text.ln_final", "text_model.final_layer_norm"), ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm")) for p in ("weight", "bias")},
}
# inside each transformer block (our qkv is fused: HF's q_proj, k_proj, v_proj are its row thirds)
HF_BLOCK_KEYS = {f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in (
    ("attn.proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
    ("mlp.fc", "mlp.fc1"), ("mlp.proj", "mlp.fc2")) for p in ("weight", "bias")}
HF_TOWERS = (("text.blocks", "text_model"), ("visual.blocks", "vision_model"))


def hf_config_to_ours(config: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> ModelConfig:
    """Our ModelConfig for a ``transformers.CLIPModel`` config.json; what has no equivalent is refused."""
    if config.get("model_type", "clip") != "clip":
        raise ConversionError(f"cannot import: model_type = {config.get('model_type')!r}; "
                              "clipforge imports transformers' CLIPModel (model_type 'clip')")
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
        raise ConversionError(f"cannot import: hidden_act {sorted(acts)}; clipforge has gelu or quick_gelu, "
                              "the same in both towers")
    for where, cfg in (("text_config", text), ("vision_config", vision)):
        if abs(float(cfg.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
            raise ConversionError(f"cannot import: {where}.layer_norm_eps = {cfg['layer_norm_eps']}; "
                                  "clipforge's LayerNorms use 1e-5")
    t_width, v_width = int(text.get("hidden_size", 512)), int(vision.get("hidden_size", 768))
    t_ratio = int(text.get("intermediate_size", 2048)) / t_width
    v_ratio = int(vision.get("intermediate_size", 3072)) / v_width
    if t_ratio != v_ratio:
        raise ConversionError(f"cannot import: MLP ratio {v_ratio} (vision) != {t_ratio} (text); "
                              "clipforge uses one model.mlp_ratio for both towers")
    preprocessor = preprocessor or {}
    return ModelConfig(
        image_size=int(vision.get("image_size", 224)),
        patch_size=int(vision.get("patch_size", 32)),
        vision_width=v_width,
        vision_layers=int(vision.get("num_hidden_layers", 12)),
        vision_heads=int(vision.get("num_attention_heads", 12)),
        vision_pool="cls",
        mlp_ratio=float(v_ratio),
        activation=acts.pop(),
        vocab_size=int(text.get("vocab_size", 49408)),
        context_length=int(text.get("max_position_embeddings", 77)),
        text_width=t_width,
        text_layers=int(text.get("num_hidden_layers", 12)),
        text_heads=int(text.get("num_attention_heads", 8)),
        embed_dim=int(config.get("projection_dim", 512)),
        logit_scale_init=float(config.get("logit_scale_init_value", 2.6592)),
        image_mean=tuple(preprocessor.get("image_mean", OPENAI_MEAN)),
        image_std=tuple(preprocessor.get("image_std", OPENAI_STD)),
    )


def hf_state_dict_to_ours(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers CLIPModel key names -> ours (q, k, v projections fused into one qkv)."""
    out = {ours: sd[theirs] for ours, theirs in HF_KEYS.items()}
    for (ours, theirs), layers in zip(HF_TOWERS, (cfg.text_layers, cfg.vision_layers)):
        for i in range(layers):
            src, dst = f"{theirs}.encoder.layers.{i}", f"{ours}.{i}"
            for p in ("weight", "bias"):  # our fused rows are [q; k; v]
                out[f"{dst}.attn.qkv.{p}"] = torch.cat([sd[f"{src}.self_attn.{n}_proj.{p}"] for n in "qkv"])
            out.update({f"{dst}.{a}": sd[f"{src}.{b}"] for a, b in HF_BLOCK_KEYS.items()})
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").is_file():
        try:
            return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle with code in it, or a damaged file
            raise ConversionError(f"{directory / 'pytorch_model.bin'} cannot be read safely ({e}); "
                                  "re-save it as model.safetensors") from None
    if any(directory.glob("model-*.safetensors")):
        raise ConversionError(f"{directory} holds sharded weights; merge them (save_pretrained with a larger "
                              "max_shard_size) before importing")
    raise ConversionError(f"{directory} has no model.safetensors or pytorch_model.bin")


def import_hf(directory: str | Path, out: str | Path, vocab_file: str | Path | None = None) -> Path:
    """Convert a ``transformers.CLIPModel`` directory (config.json + weights) into a clipforge checkpoint.

    The tokenizer is CLIP's BPE (ids as OpenAI's CLIP and HF's CLIPTokenizer), so only models with its
    49,408-token vocabulary import, or, for a model `clipforge export --to hf` wrote, the clipforge BPE
    in its tokenizer.json; HF pools text at the end-of-text token, as ours does.
    """
    from clipforge.models.clip import CLIP
    from clipforge.models.tokenizer import ClipBPETokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ConversionError(f"{directory} is not a Hugging Face model directory: config.json is missing")
    config = json.loads((directory / "config.json").read_text())
    preprocessor_file = directory / "preprocessor_config.json"
    preprocessor = json.loads(preprocessor_file.read_text()) if preprocessor_file.is_file() else None
    cfg = hf_config_to_ours(config, preprocessor)
    eos = config.get("text_config", {}).get("eos_token_id", 2)
    tokenizer = _clipforge_bpe(directory / "tokenizer.json", cfg.context_length)
    if tokenizer is not None:  # our own export: HF pools at its first eos_token_id, our end-of-text
        if eos != tokenizer.eot_id or tokenizer.vocab_size > cfg.vocab_size:
            raise ConversionError(f"{directory}: its clipforge tokenizer (end-of-text {tokenizer.eot_id}, "
                                  f"{tokenizer.vocab_size} tokens) does not fit text_config (eos_token_id {eos}, "
                                  f"vocab_size {cfg.vocab_size})")
    else:
        tokenizer = ClipBPETokenizer.from_vocab_file(vocab_file, cfg.context_length)
        if tokenizer.vocab_size != cfg.vocab_size:
            raise ConversionError(f"{directory} has a text vocabulary of {cfg.vocab_size}, not CLIP's "
                                  f"{tokenizer.vocab_size}; clipforge cannot rebuild its tokenizer")
        if eos not in (2, tokenizer.eot_id):  # 2: legacy configs pool at argmax(ids), which is CLIP's EOT
            raise ConversionError(f"{directory}: text_config.eos_token_id = {eos}, not CLIP's end-of-text "
                                  f"{tokenizer.eot_id}; the text tower would pool elsewhere")
    state = _read_hf_weights(directory)
    try:
        ours = hf_state_dict_to_ours(state, cfg)
    except KeyError as e:
        raise ConversionError(f"{directory} is not a CLIPModel checkpoint: no weight {e}") from None
    model = CLIP(cfg)
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as e:
        raise ConversionError(f"{directory} does not match its config.json: {str(e).splitlines()[-1].strip()}") from None
    source = {"from": "huggingface", "directory": str(directory)}
    return write_model_checkpoint(out, model, tokenizer, ckpt.checkpoint_config(cfg, tokenizer, source=source))
