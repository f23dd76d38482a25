"""Decode + crop + resize in one pass, straight to uint8 (the worker side of the data pipeline).

The crop is chosen from the image *header* before any pixel is decoded, so a JPEG can be decoded
at the smallest DCT scale (1/2, 1/4, 1/8 via Pillow ``draft``) that still covers the crop at the
output size; the crop is then resampled with torch's uint8 antialiased bicubic kernel (Pillow's
filter, vectorised), straight into a ``3 x S x S`` uint8 tensor. Transparency is
composited onto white and EXIF orientation honoured (the crop is chosen in upright coordinates).
Normalisation is left to the model on the device.

    training   random-resized-crop (area ``scale``, log-uniform aspect ``ratio``) + optional flip
    evaluation shorter side -> size, centre crop (the same as ``transforms.EvalPreprocess``)
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from clipforge.data.transforms import to_rgb

ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def random_resized_crop_box(
    width: int, height: int, rng: random.Random, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[float, float, float, float]:
    """(left, top, crop_w, crop_h) as torchvision's RandomResizedCrop draws it (10 tries, then centre)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # fallback: the largest centred crop with the aspect clamped into range
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The centred square of side min(w, h): resizing it to S = resize shorter side + centre crop."""
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, side, side


def upright_size(image: Image.Image) -> tuple[tuple[int, int], int]:
    """(size after EXIF orientation, orientation tag) read from the header only."""
    try:
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block should not cost the image
        orientation = 1
    w, h = image.size
    return ((h, w) if orientation in _SWAPS_AXES else (w, h)), orientation


def decode_crop_resize(
    data: bytes | str | Path,
    size: int,
    rng: random.Random | None = None,
    *,
    scale=(0.9, 1.0),
    ratio=(3 / 4, 4 / 3),
    hflip: bool = False,
) -> torch.Tensor:
    """Encoded image -> uint8 ``3 x size x size``. ``rng=None``: evaluation crop; else a random-resized crop.

    Raises what Pillow raises on unreadable data (see ``sources.DECODE_ERRORS``).
    """
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with Image.open(source) as image:
        (uw, uh), orientation = upright_size(image)
        if rng is None:
            left, top, cw, ch = center_crop_box(uw, uh)
        else:
            left, top, cw, ch = random_resized_crop_box(uw, uh, rng, scale, ratio)
        if image.format == "JPEG":
            # DCT scaling keeps both sides >= the request; ask for the crop to stay >= size
            shrink = size / min(cw, ch)
            if shrink < 1.0:
                image.draft("RGB", (math.ceil(image.size[0] * shrink), math.ceil(image.size[1] * shrink)))
        image.load()  # decode now, so a truncated file fails here
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        if image.mode != "RGB":
            image = to_rgb(image)
        with warnings.catch_warnings():  # a read-only view of Pillow's buffer; never written to
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(np.asarray(image))  # H x W x 3 uint8
    fx, fy = pixels.shape[1] / uw, pixels.shape[0] / uh  # draft may have shrunk the image
    x0, y0 = int(left * fx), int(top * fy)
    x1, y1 = max(x0 + 1, round((left + cw) * fx)), max(y0 + 1, round((top + ch) * fy))
    crop = pixels[y0:y1, x0:x1].permute(2, 0, 1)[None]  # 1 x 3 x h x w, channels-last in memory
    if crop.shape[-2:] != (size, size):
        # torch's uint8 antialiased bicubic: the same filter as Pillow's, about 3x faster on one core
        crop = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
    out = crop[0]
    if hflip and rng is not None and rng.random() < 0.5:
        out = out.flip(-1)
    return out


def describe_train_preprocess(augment, image_size: int) -> dict:
    """What training did to images, for the checkpoint's config.json (evaluation uses resize + centre crop)."""
    if not augment.random_resized_crop:
        crop = {"crop": "center", "resize": "shortest-side-bicubic"}
    else:
        crop = {"crop": "random-resized", "scale": list(augment.scale), "ratio": list(augment.ratio),
                "resize": "bicubic"}
    out = {"image_size": image_size, **crop, "hflip": augment.hflip, "jpeg_draft": True,
           "exif_orientation": True, "transparency": "white", "dtype": "uint8", "normalize": "on-device"}
    if augment.policy != "default":  # only when set: checkpoints trained without it read as before
        out["policy"] = {"name": augment.policy, "color_jitter": [0.4, 0.4, 0.4, 0.1], "color_jitter_p": 0.8,
                         "grayscale_p": 0.2, "gaussian_blur_p": 0.5, "blur_sigma": [0.1, 2.0]}
    return out
