"""Image preprocessing shared by training, evaluation and ``clipforge.load``.

Images travel as uint8 (decoding and resizing happen in workers); normalisation happens on the
device inside the model. ``EvalPreprocess`` is the PIL -> tensor callable a user gets back from
``clipforge.load`` (the same role as OpenCLIP's preprocess): resize the shorter side, centre-crop.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (not black, which would shift colours)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic), then the centre ``size`` x ``size``, with torchvision's
    rounding (``Resize(size)`` + ``CenterCrop(size)``, as OpenCLIP and OpenAI's CLIP preprocess): the
    longer side is truncated, int(size * long / short), and the crop offset rounded half to even, so a
    non-square image gives OpenCLIP's exact pixels."""
    w, h = image.size
    if min(w, h) != size:
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        image = image.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
    w, h = image.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def pil_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """HxWx3 PIL -> 3xHxW uint8 tensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class EvalPreprocess:
    """PIL image -> uint8 3xHxW tensor, resized (shorter side, bicubic) and centre-cropped.

    The model normalises uint8 input itself with the mean/std from its config, so the same tensor
    works on any device and precision.
    """

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return pil_to_uint8_tensor(resize_center_crop(to_rgb(image), self.image_size))

    def __repr__(self) -> str:
        return f"EvalPreprocess(image_size={self.image_size}, resize=shortest-side-bicubic, crop=center)"
