"""Write a teacher cache: a model's embeddings of every sample of a training source, keyed by the
sample keys the training loader puts in ``batch["keys"]``.

    clipforge embed runs/big/checkpoints/latest --data jsonl:pairs.jsonl --out teacher_cache/ --teacher-cache

Layout (read by ``clipforge.train.teachers.CacheTeacher``, memory-mapped)::

    keys.json           ["pairs.jsonl:1", "pairs.jsonl:2", ...]  row order of the arrays
    image_embeds.npy    N x E float32, unit norm (eval preprocessing: resize + centre crop)
    text_embeds.npy     N x E float32, unit norm (the sample's first caption)
    logit_scale.json    the model's logit scale t
    manifest.json       checkpoint, data spec, counts, unreadable samples skipped

The cache holds one embedding per sample: the image without training augmentation and the first
caption, as a precomputed teacher does (TinyCLIP / LiT feature caches). Unreadable samples are
left out; training skips them too, so they are never looked up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.config import DataConfig
from clipforge.outputs import new_output_dir


def write_teacher_cache(ckpt: str | Path, data: str, out: str | Path, batch_size: int = 256,
                        device: str | None = None, caption_template: str | None = None) -> dict[str, Any]:
    """Embed every sample of the training source ``data`` with the checkpoint's model; returns the manifest."""
    from clipforge.api import load
    from clipforge.devices import pick_device

    out = new_output_dir(out)
    device = pick_device(device)
    model, _, tokenizer = load(ckpt, device=device)
    data_cfg = DataConfig(train=data, **({"caption_template": caption_template} if caption_template else {}))
    keys, image_embeds, text_embeds, skipped = embed_source_samples(model, tokenizer, data_cfg, batch_size)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "image_embeds.npy", image_embeds.numpy().astype(np.float32))
    np.save(tmp / "text_embeds.npy", text_embeds.numpy().astype(np.float32))
    (tmp / "keys.json").write_text(json.dumps(keys))
    (tmp / "logit_scale.json").write_text(json.dumps(float(model.logit_scale.exp())))
    manifest = {"checkpoint": str(ckpt), "data": data, "samples": len(keys), "skipped": skipped,
                "embed_dim": int(image_embeds.shape[1])}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    return manifest


def embed_source_samples(model, tokenizer, data_cfg: DataConfig, batch_size: int = 256):
    """The one embedding loop over a training source: ``(keys, image_embeds, text_embeds, skipped)``.

    Every readable sample once, in dataset order, keyed by the loader's sample keys (so a keep-list
    or a cache made from it matches ``batch["keys"]``); images without augmentation, first caption.
    Memory: one chunk of ``batch_size`` decoded images plus the N x E embeddings.
    """
    from clipforge.data.pipeline import decode_raw, source_samples
    from clipforge.eval.embedding import embed_captions, embed_images

    keys, image_rows, text_rows, skipped = [], [], [], 0
    images, captions = [], []

    def flush() -> None:  # embed one chunk
        with torch.no_grad():
            image_rows.append(embed_images(model, torch.stack(images), batch_size=batch_size, out_device="cpu"))
            text_rows.append(embed_captions(model, tokenizer, captions, batch_size=batch_size, out_device="cpu"))
        images.clear()
        captions.clear()

    for raw in source_samples(data_cfg):
        decoded = decode_raw(raw, model.cfg.image_size, None, None)
        if isinstance(decoded, str):
            skipped += 1
            continue
        pixels, caption, _ = decoded
        keys.append(raw.key)
        captions.append(caption[0] if isinstance(caption, list) else caption)
        images.append(pixels)
        if len(images) == batch_size:
            flush()
    if images:
        flush()
    if not keys:
        raise ValueError(f"{data_cfg.train}: no readable sample to embed")
    return keys, torch.cat(image_rows), torch.cat(text_rows), skipped
