"""Per-sample augmentation in the data workers beyond the crop: strong image augmentation, extra
self-supervised views, and text augmentation (SLIP and the "improved baselines", methods.md section 12).

    data.augment.policy = "strong"   the CLIP image, after its crop, gets SimCLR's photometric policy:
                                     colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2,
                                     Gaussian blur (sigma 0.1-2, kernel ~10% of the side) p 0.5
    data.ssl_views = V               V more views per image in ``batch["views"]`` (uint8 N x V x 3 x S x S),
                                     each a random-resized crop of area ``data.ssl_view_scale`` (SLIP:
                                     0.08-1) of the whole image, flipped with p 0.5, then the policy above
    data.text_augment = "eda"        every caption row through EDA (``clipforge.data.text_augment``);
                     "stop_words"    only EDA's stop-word step (Fini et al.'s weak augmentation)
    data.text_views = A              A more captions per image in ``batch["text_views"]`` (N*A strings,
                                     sample-major; tokenized as ``text_view_input_ids``): each one of the
                                     sample's caption rows, drawn, through EDA (Fini et al.'s text views)

Everything runs on uint8 tensors with torchvision's transforms v2, in the workers, before the batch
is collated. The draws come from one ``random.Random`` per sample, derived from the sample's place
in the data plan (``pipeline.sample_rng``) or, for the built-in shapes, from its index: torchvision
draws from the global torch RNG, so each transform runs under ``torch.random.fork_rng`` seeded from
that stream. A resumed run therefore sees the same views and captions, whatever the number of workers.
"""

from __future__ import annotations

import random
from collections.abc import Set as AbstractSet
from functools import lru_cache

import torch
import torch.nn.functional as F

from clipforge.data.augment import random_resized_crop_box
from clipforge.data.synthetic import named_pairs
from clipforge.data.text_augment import caption_words

VIEW_RATIO = (3 / 4, 4 / 3)
SHAPES_AUGMENT_STREAM = 0x5EED_A06  # shapes: its own per-sample stream, apart from caption sampling


def require_torchvision():
    try:
        from torchvision.transforms import v2
    except ImportError:
        raise ImportError("data.augment.policy = 'strong' and data.ssl_views use torchvision's transforms: "
                          "pip install 'clipforge[augment]' (or torchvision matching your torch)") from None
    return v2


@lru_cache(maxsize=8)
def photometric_policy(size: int):
    """SimCLR's / SLIP's colour and blur augmentation for ``size`` px images (torchvision v2, uint8 in and out)."""
    v2 = require_torchvision()
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd, about a tenth of the side (SimCLR)
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
    ])


def photometric(pixels: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The photometric policy on one uint8 3 x S x S image, drawn from ``rng`` (the global torch RNG is left as it was)."""
    policy = photometric_policy(pixels.shape[-1])
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would also reseed CUDA, which fork_rng(devices=[]) leaves
        torch.random.default_generator.manual_seed(rng.getrandbits(63))
        return policy(pixels)


def crop_view(pixels: torch.Tensor, size: int, scale: tuple[float, float], rng: random.Random) -> torch.Tensor:
    """A random-resized crop (area ``scale`` of the image), flipped with p 0.5, of uint8 3 x H x W -> 3 x size x size."""
    h, w = pixels.shape[-2:]
    left, top, cw, ch = random_resized_crop_box(w, h, rng, scale, VIEW_RATIO)
    crop = pixels[:, top:top + ch, left:left + cw][None]
    if crop.shape[-2:] != (size, size):  # torch's uint8 antialiased bicubic, as the decode path
        crop = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)
    out = crop[0]
    return out.flip(-1) if rng.random() < 0.5 else out


class SampleAugmenter:
    """What ``data.augment.policy``, ``data.ssl_views`` and ``data.text_augment`` add to a training sample."""

    def __init__(self, data_cfg, image_size: int) -> None:
        self.strong = data_cfg.augment.policy == "strong"
        self.views = data_cfg.ssl_views
        self.view_scale = tuple(data_cfg.ssl_view_scale)
        self.size = image_size
        self.text_mode = data_cfg.text_augment
        self.text_views = data_cfg.text_views
        self.eda = None
        if self.strong or self.views:
            require_torchvision()
        if self.text_mode != "none" or self.text_views:
            from clipforge.data.text_augment import EDA

            e = data_cfg.eda
            self.eda = EDA(e.alpha, e.p, tuple(e.ops), e.synonyms, e.stop_words_p)

    @classmethod
    def from_config(cls, data_cfg, image_size: int) -> "SampleAugmenter | None":
        """None when the recipe asks for none of it (the sample stream is then exactly as before)."""
        on = (data_cfg.augment.policy != "default" or data_cfg.ssl_views or data_cfg.text_augment != "none"
              or data_cfg.text_views)
        return cls(data_cfg, image_size) if on else None

    def captions(self, captions: list[str], rng: random.Random, keep_out: AbstractSet[int] = frozenset()) -> list[str]:
        """Each caption through EDA (or its stop-word step alone). ``keep_out``: colour-shape pairs
        (shapes labels) that must not reach training text: an augmented caption that names one its
        original did not (a swap, a synonym: "red circle" -> "red ring") is replaced by the original
        after EDA's clean-up."""
        if self.text_mode == "none":
            return list(captions)
        augment = self.eda if self.text_mode == "eda" else self.eda.weak
        return [self._kept_out(augment(caption, rng), caption, keep_out) for caption in captions]

    def text_view_captions(self, captions: list[str], rng: random.Random,
                           keep_out: AbstractSet[int] = frozenset()) -> list[str]:
        """``data.text_views`` captions of one sample: each a draw among ``captions`` (a source's whole
        caption list, or the sample's caption rows) through EDA, as Fini et al.'s text views (``keep_out``
        as in ``captions``)."""
        out = []
        for _ in range(self.text_views):
            caption = captions[rng.randrange(len(captions))]
            out.append(self._kept_out(self.eda(caption, rng), caption, keep_out))
        return out

    @staticmethod
    def _kept_out(augmented: str, caption: str, keep_out: AbstractSet[int]) -> str:
        if keep_out and named_pairs(augmented) & keep_out and not named_pairs(caption) & keep_out:
            return " ".join(caption_words(caption))  # no extra draws: the sample's stream is unchanged
        return augmented

    def image(self, pixels: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return photometric(pixels, rng) if self.strong else pixels

    def views_from_pixels(self, pixels: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """The SSL views of an image already in memory (uint8 3 x H x W: a rendered shapes image)."""
        return torch.stack([photometric(crop_view(pixels, self.size, self.view_scale, rng), rng)
                            for _ in range(self.views)])

    def views_from_bytes(self, data: bytes, rng: random.Random) -> torch.Tensor:
        """The SSL views of an encoded image: each view decoded with its own crop (``augment.decode_crop_resize``)."""
        from clipforge.data.augment import decode_crop_resize

        views = []
        for _ in range(self.views):
            view = decode_crop_resize(data, self.size, rng, scale=self.view_scale, ratio=VIEW_RATIO, hflip=True)
            views.append(photometric(view, rng))
        return torch.stack(views)


def shapes_augment_rng(seed: int, index: int) -> random.Random:
    """The per-sample stream of a built-in shapes sample (samples are unique per index)."""
    return random.Random(((seed * 1_000_003 + index) * 1_000_003 + SHAPES_AUGMENT_STREAM) & (2**63 - 1))


def augment_shapes_batch(batch: dict, augmenter: SampleAugmenter, seed: int, indices: list[int],
                         held_out: AbstractSet[int] = frozenset()) -> dict:
    """Strong policy, SSL views and EDA on a rendered shapes batch (captions not yet tokenized).
    EDA never makes a caption name a ``held_out`` pair (``SampleAugmenter.captions``)."""
    per_sample = len(batch["captions"]) // len(indices)
    images, views, captions, text_views = [], [], [], []
    for row, index in enumerate(indices):
        rng = shapes_augment_rng(seed, index)
        own = batch["captions"][row * per_sample:(row + 1) * per_sample]
        captions += augmenter.captions(own, rng, held_out)
        original = batch["images"][row]
        images.append(augmenter.image(original, rng))
        if augmenter.views:
            views.append(augmenter.views_from_pixels(original, rng))
        if augmenter.text_views:  # drawn last: the streams above are unchanged
            text_views += augmenter.text_view_captions(own, rng, held_out)
    out = {**batch, "images": torch.stack(images), "captions": captions}
    if views:
        out["views"] = torch.stack(views)
    if augmenter.text_views:
        out["text_views"] = text_views
    return out


def tokenize_text_views(tokenizer, batch: dict) -> dict:
    """``text_view_input_ids`` / ``text_view_attention_mask`` ((N*A) x L) of ``batch["text_views"]``."""
    from clipforge.data.captions import tokenize_checked

    if "text_views" in batch:
        ids, mask = tokenize_checked(tokenizer, batch["text_views"])
        batch["text_view_input_ids"], batch["text_view_attention_mask"] = ids, mask
    return batch
