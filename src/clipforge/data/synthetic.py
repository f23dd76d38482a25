"""The built-in ``shapes`` dataset: procedurally rendered coloured shapes with captions.

Nothing is downloaded. Every image is drawn from a colour (``COLOURS``), a shape (``SHAPES``),
a size (small/large) and a position (3x3 grid: centre, left, top, top left, ...), and captioned
with one of several phrasings that always name colour and shape next to each other
("a red circle", "a small red circle on the left", "a photo of a red circle",
"red circle in the top right corner"). Optionally a second object is added with a spatial
relation ("a red circle left of a blue square", ``ShapesConfig.two_objects_prob``) and the
plain grey background is replaced by a grey texture (``ShapesConfig.textured_background_prob``).

Compositional hold-out: a fixed, balanced set of colour-shape pairs (``held_out_pairs``) never
appears in the ``train`` split, neither as the main object nor as the second object, while
every colour and every shape still appears in training with most partners. The ``seen`` and
``unseen`` eval splits hold ``eval_samples_per_class`` single-object images per class of
the trained and held-out pairs respectively; they measure compositional zero-shot transfer.

Binding: the ``binding`` eval split holds two-object scenes of trained pairs ("a red circle
left of a blue square", ``eval_samples_per_class`` per trained pair as the first-named object;
the two objects differ in colour and in shape). Each image comes with hard distractor captions
that use the very same words (``DISTRACTOR_KINDS``): the colours swapped between the objects
("a blue circle left of a red square"), the shapes swapped ("a red square left of a blue
circle"), the relation flipped ("a red circle right of a blue square") and the objects swapped
around the relation ("a blue square left of a red circle"). Every distractor describes a scene
that differs from the image (``PairScene.layout``).

Every sample is a pure function of ``(seed, split, index)``: its random numbers come from
``numpy.random.default_rng([seed, split_tag, index])``. Nothing depends on call order, so
the train stream can be resumed at any sample index and rendered by any number of workers.

API
---
- ``COLOURS: dict[str, tuple[int, int, int]]``, ``SHAPES: list[str]``, ``SIZES``, ``POSITIONS``
- ``class_names() -> list[str]``: all colour-shape pairs, label ``c * len(SHAPES) + s``
  (e.g. ``"red circle"``).
- ``held_out_pairs(cfg) -> set[int]``: labels never used in training.
- ``ShapesDataset(cfg, image_size, seed, split)`` with ``split`` in ``"train" | "seen" | "unseen" | "binding"``:
    - ``sample(index) -> (uint8 HxWx3 array, caption, label)``
    - ``render_batch(indices) -> (uint8 tensor Nx3xHxW, captions, LongTensor labels)``
    - ``len(ds)`` for eval splits (the train split is an unbounded index space: ``TypeError``)
    - ``classes``: the labels this split draws from
    - ``caption_corpus(n) -> list[str]``: captions covering every word any split can produce
      (held-out pairs included: their words are known, only the combinations are not)
    - ``binding_scene(index) -> PairScene`` (binding split): the scene of an image, without
      rendering; ``scene.caption()`` is its caption, ``scene.distractors()`` the swapped scenes

Rendering composites cached anti-aliased alpha masks (4x4 supersampled signed inequality
masks, one per shape and quantised radius) onto the background, so a 64 px image costs
tens of microseconds; see ``bench/render.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from clipforge.config import ShapesConfig

Split = Literal["train", "seen", "unseen", "binding"]

# Hues spread around the colour wheel plus white; each is far from the others in RGB so a
# small CPU model can name them reliably. The background is always grey, never one of these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 175, 55),
    "cyan": (40, 210, 220),
    "blue": (45, 80, 235),
    "purple": (150, 55, 205),
    "white": (240, 240, 240),
}
SHAPES: list[str] = ["circle", "square", "triangle", "star", "cross", "ring"]
SIZES: list[str] = ["small", "large"]
# (column, row) in a 3x3 grid; -1 = left/top, 0 = centre, 1 = right/bottom
POSITIONS: dict[str, tuple[int, int]] = {
    "centre": (0, 0),
    "left": (-1, 0),
    "right": (1, 0),
    "top": (0, -1),
    "bottom": (0, 1),
    "top left": (-1, -1),
    "top right": (1, -1),
    "bottom left": (-1, 1),
    "bottom right": (1, 1),
}
POSITION_PHRASES: dict[str, list[str]] = {
    "centre": ["in the centre", "in the middle"],
    "left": ["on the left"],
    "right": ["on the right"],
    "top": ["at the top"],
    "bottom": ["at the bottom"],
    "top left": ["in the top left corner", "at the top left"],
    "top right": ["in the top right corner", "at the top right"],
    "bottom left": ["in the bottom left corner", "at the bottom left"],
    "bottom right": ["in the bottom right corner", "at the bottom right"],
}
# Caption templates for one object; {a} is the article for the next word, {p} a position phrase.
SINGLE_TEMPLATES: list[str] = [
    "{a} {c} {s}",
    "{c} {s}",
    "a photo of {a} {c} {s}",
    "a picture of {a} {c} {s}",
    "a drawing of {a} {c} {s}",
    "{a} {z} {c} {s}",
    "a photo of {a} {z} {c} {s}",
    "{a} {c} {s} {p}",
    "{a} {z} {c} {s} {p}",
    "{c} {s} {p}",
    "there is {a} {c} {s} {p}",
]
# Relation of the main object to the second one -> (main position offset along the axis, axis)
RELATIONS: dict[str, tuple[int, int]] = {
    "left of": (-1, 0),
    "to the left of": (-1, 0),
    "right of": (1, 0),
    "to the right of": (1, 0),
    "above": (-1, 1),
    "below": (1, 1),
}
PAIR_TEMPLATES: list[str] = [
    "{a1} {c1} {s1} {r} {a2} {c2} {s2}",
    "a photo of {a1} {c1} {s1} {r} {a2} {c2} {s2}",
]
# the same relation seen from the other object: "left of" <-> "right of", "above" <-> "below"
OPPOSITE_RELATIONS: dict[str, str] = {
    "left of": "right of", "right of": "left of",
    "to the left of": "to the right of", "to the right of": "to the left of",
    "above": "below", "below": "above",
}
# binding distractors, in the order ``PairScene.distractors`` lists them
DISTRACTOR_KINDS: tuple[str, ...] = ("attribute_swap", "shape_swap", "relation_flip", "order_swap")

# background kinds of ``_fill_background`` (plain grey, then the four textures)
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "stripes", "checks", "noise")

SPLIT_TAGS = {"train": 0, "seen": 1, "unseen": 2, "binding": 3}
RADIUS_FRACTION = {"small": 0.15, "large": 0.23}  # object radius as a fraction of image size
SUPERSAMPLE = 4  # samples per pixel side for anti-aliased edges
RADIUS_STEP = 0.25  # radii are quantised so alpha masks can be cached


def class_names() -> list[str]:
    """All colour-shape pairs; a label is an index into this list (``c * len(SHAPES) + s``)."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def class_label(colour: str, shape: str) -> int:
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def named_pairs(text: str) -> set[int]:
    """Labels of the colour-shape pairs a text names: a colour word right before a shape word
    ("a small red ring left of ..." names red ring), as every shapes caption writes them."""
    words = text.lower().split()
    return {class_label(a, b) for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES}


def held_out_pairs(cfg: ShapesConfig) -> set[int]:
    """Labels of the colour-shape pairs that never appear in training.

    The pairs are spread evenly: walking the (colour, shape) grid along wrapped diagonals
    means any prefix takes at most ceil(n / n_colours) pairs per colour and ceil(n / n_shapes)
    per shape, so every colour and shape keeps most of its partners in training. Which
    colours and shapes land on which diagonal is a permutation drawn from ``cfg.holdout_seed``.
    """
    n_colours, n_shapes = len(COLOURS), len(SHAPES)
    n_pairs = n_colours * n_shapes
    n_held = math.ceil(cfg.holdout_fraction * n_pairs - 1e-9)
    rng = np.random.default_rng([cfg.holdout_seed, 7])
    colour_perm = rng.permutation(n_colours)
    shape_perm = rng.permutation(n_shapes)
    period = math.lcm(n_colours, n_shapes)
    held = set()
    for k in range(n_held):
        # k and k // period shift the shape index so the walk visits every pair exactly once
        c = colour_perm[k % n_colours]
        s = shape_perm[(k + k // period) % n_shapes]
        held.add(int(c) * n_shapes + int(s))
    assert len(held) == n_held
    return held


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class PairScene:
    """Two objects and where the first-named one is relative to the second ("left of", "above", ...)."""

    first: int  # label (colour-shape pair) of the object the caption names first
    second: int
    relation: str  # a key of RELATIONS
    template: str = PAIR_TEMPLATES[0]

    def caption(self) -> str:
        return _fill_pair(self.template, _split_label(self.first), _split_label(self.second), self.relation)

    def layout(self) -> tuple[int, int, int]:
        """``(axis, label on the left/top, label on the right/bottom)``: equal layouts = the same picture,
        whichever object a caption names first and whichever synonym it uses."""
        side, axis = RELATIONS[self.relation]
        return (axis, self.first, self.second) if side < 0 else (axis, self.second, self.first)

    def distractors(self) -> dict[str, "PairScene"]:
        """Scenes that use the caption's words but bind them differently (keys: ``DISTRACTOR_KINDS``)."""
        (c1, s1), (c2, s2) = _split_label(self.first), _split_label(self.second)
        return {
            "attribute_swap": PairScene(class_label(c2, s1), class_label(c1, s2), self.relation, self.template),
            "shape_swap": PairScene(class_label(c1, s2), class_label(c2, s1), self.relation, self.template),
            "relation_flip": PairScene(self.first, self.second, OPPOSITE_RELATIONS[self.relation], self.template),
            "order_swap": PairScene(self.second, self.first, self.relation, self.template),
        }


@dataclass(frozen=True)
class SceneFacts:
    """What an image shows, recorded while drawing it (the long and synthetic captions state these facts).

    ``objects``: (colour, shape, size, position) per object, the caption's main object first;
    position is a key of ``POSITIONS`` or None for the objects of a pair (placed by ``relation``).
    """

    objects: tuple[tuple[str, str, str, str | None], ...]
    relation: str | None  # the first object relative to the second (a key of RELATIONS), pairs only
    background: str  # a key of BACKGROUNDS
    caption: str  # the templated ("raw") caption the image is trained with


# ----------------------------------------------------------------------------- shape masks
def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of points (u, v) inside ``shape``; units of the object radius, v points down."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= 1.0) & (d2 >= 0.55**2)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":
        # equilateral, apex up at v=-1, base at v=0.75 (height 1.75, centred on the circumcircle)
        return (v <= 0.75) & (np.abs(u) * math.sqrt(3.0) <= v + 1.0)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "star":
        return _inside_star(u, v, outer=1.05, inner=0.45)
    raise ValueError(f"unknown shape '{shape}'; known: {SHAPES}")


def _inside_star(u: np.ndarray, v: np.ndarray, outer: float, inner: float) -> np.ndarray:
    """Five-pointed star, one point up: fold each point into the wedge between a tip and a notch."""
    sector = 2.0 * math.pi / 5.0
    theta = np.mod(np.arctan2(u, -v), sector)
    a = np.minimum(theta, sector - theta)  # angle from the nearest tip, in [0, pi/5]
    rho = np.hypot(u, v)
    px, py = rho * np.cos(a), rho * np.sin(a)
    tip = np.array([outer, 0.0])
    notch = np.array([inner * math.cos(sector / 2), inner * math.sin(sector / 2)])
    normal = np.array([notch[1] - tip[1], tip[0] - notch[0]])  # perpendicular to the edge
    origin_side = np.sign(-tip @ normal)
    return (px - tip[0]) * normal[0] * origin_side + (py - tip[1]) * normal[1] * origin_side >= 0


@lru_cache(maxsize=4096)
def _alpha_mask(shape: str, radius: float) -> np.ndarray:
    """Anti-aliased coverage (float32 n x n x 1) of ``shape`` centred in an n x n pixel box."""
    n = int(math.ceil(2 * radius)) + 2
    offsets = (np.arange(n * SUPERSAMPLE, dtype=np.float64) + 0.5) / SUPERSAMPLE - n / 2
    u = offsets[None, :] / radius
    v = offsets[:, None] / radius
    inside = _inside(shape, np.broadcast_to(u, (u.size, u.size)), np.broadcast_to(v, (v.size, v.size)))
    coverage = inside.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).mean(axis=(1, 3))
    return coverage.astype(np.float32)[:, :, None]


# ----------------------------------------------------------------------------- drawing
def _paint(image: np.ndarray, shape: str, colour: np.ndarray, radius: float, cx: float, cy: float) -> None:
    """Alpha-blend one object into ``image`` (H x W x 3 uint8) in place."""
    radius = max(RADIUS_STEP, round(radius / RADIUS_STEP) * RADIUS_STEP)
    alpha = _alpha_mask(shape, radius)
    n = alpha.shape[0]
    x0, y0 = int(round(cx - n / 2)), int(round(cy - n / 2))
    h, w = image.shape[:2]
    # clip the box to the image (objects are placed inside, but stay safe for any input)
    ax0, ay0 = max(0, -x0), max(0, -y0)
    ax1, ay1 = min(n, w - x0), min(n, h - y0)
    if ax1 <= ax0 or ay1 <= ay0:
        return
    a = alpha[ay0:ay1, ax0:ax1]
    region = image[y0 + ay0 : y0 + ay1, x0 + ax0 : x0 + ax1]
    base = region.astype(np.float32)
    region[...] = (base + (colour - base) * a + 0.5).astype(np.uint8)


@lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x along columns, y along rows)."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return t[None, :], t[:, None]


def _fill_background(image: np.ndarray, rng: np.random.Generator, textured: bool) -> str:
    """Plain grey, or (if ``textured``) a low-contrast grey gradient, stripes, checks or noise; returns
    which (a key of ``BACKGROUNDS``, for the long captions)."""
    grey = float(rng.uniform(25, 75))
    if not textured:
        image[...] = int(grey)
        return "plain"
    size = image.shape[0]
    x, y = _grid(size)
    kind = int(rng.integers(4))
    angle = rng.uniform(0, 2 * math.pi)
    along = x * math.cos(angle) + y * math.sin(angle)  # coordinate along a random direction
    if kind == 0:  # linear gradient
        field = along * rng.uniform(15, 30)
    elif kind == 1:  # stripes
        field = np.sin(along * rng.uniform(6, 14) * math.pi) * rng.uniform(8, 16)
    elif kind == 2:  # checks
        freq = rng.uniform(3, 7) * math.pi
        field = np.sign(np.sin(x * freq) * np.sin(y * freq)) * rng.uniform(6, 12)
    else:  # pixel noise
        field = rng.normal(0, rng.uniform(5, 12), size=(size, size)).astype(np.float32)
    image[...] = np.clip(grey + field, 0, 255).astype(np.uint8)[:, :, None]
    return BACKGROUNDS[kind + 1]


def _jittered_colour(colour: str, rng: np.random.Generator) -> np.ndarray:
    # small per-channel jitter so the model learns colour names, not exact RGB triples
    rgb = np.asarray(COLOURS[colour], dtype=np.float32) + rng.uniform(-15, 15, size=3).astype(np.float32)
    return np.clip(rgb, 0, 255)


def _grid_centre(size: int, radius: float, col: int, row: int, rng: np.random.Generator) -> tuple[float, float]:
    """Object centre for a 3x3 grid cell: sides hug the border, centre sits in the middle."""
    margin = 0.04 * size

    def along(cell: int) -> float:
        if cell == 0:
            return size / 2 + rng.uniform(-0.05, 0.05) * size
        offset = radius + margin + rng.uniform(0, 0.05) * size
        return offset if cell < 0 else size - offset

    return along(col), along(row)


# ----------------------------------------------------------------------------- dataset
class ShapesDataset:
    """One split of the shapes data; ``sample(i)`` is a pure function of ``(seed, split, i)``."""

    def __init__(self, cfg: ShapesConfig, image_size: int, seed: int, split: Split = "train"):
        if split not in SPLIT_TAGS:
            raise ValueError(f"unknown shapes split '{split}'; expected one of {list(SPLIT_TAGS)}")
        if image_size < 16:
            raise ValueError(f"shapes images need image_size >= 16 to stay recognisable, got {image_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.cfg = cfg
        self.image_size = image_size
        self.seed = seed
        self.split = split
        self.held_out = held_out_pairs(cfg)
        self.train_classes = [k for k in range(len(class_names())) if k not in self.held_out]
        if split == "unseen":
            self.classes = sorted(self.held_out)
        else:  # binding scenes use trained pairs only: they test binding, not unseen pairs
            self.classes = list(self.train_classes)

    def __len__(self) -> int:
        if self.split == "train":
            raise TypeError("the shapes train split is an unbounded index space and has no length")
        return len(self.classes) * self.cfg.eval_samples_per_class

    def __repr__(self) -> str:
        return f"ShapesDataset(split={self.split!r}, image_size={self.image_size}, seed={self.seed})"

    def binding_scene(self, index: int) -> PairScene:
        """The scene of binding image ``index`` (drawn first from the sample's rng, so no rendering)."""
        if self.split != "binding":
            raise ValueError(f"binding_scene needs the binding split, not {self.split!r}")
        return self._binding_scene(self._eval_rng(index), index)

    def _binding_scene(self, rng: np.random.Generator, index: int) -> PairScene:
        first = self.classes[index // self.cfg.eval_samples_per_class]
        colour, shape = _split_label(first)
        # a partner with another colour AND another shape, so that every swap changes the scene
        partners = [k for k in self.train_classes if _split_label(k)[0] != colour and _split_label(k)[1] != shape]
        second = partners[int(rng.integers(len(partners)))]
        relation = list(RELATIONS)[int(rng.integers(len(RELATIONS)))]
        template = PAIR_TEMPLATES[int(rng.integers(len(PAIR_TEMPLATES)))]
        return PairScene(first, second, relation, template)

    def _eval_rng(self, index: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        if index >= len(self):
            raise IndexError(f"index {index} out of range for the {self.split} split of length {len(self)}")
        return np.random.default_rng([self.seed, SPLIT_TAGS[self.split], index])

    def label_of(self, index: int) -> int:
        """Label of eval sample ``index`` without rendering it (train labels need the rng)."""
        if self.split == "train":
            return self.sample(index)[2]
        return self.classes[index // self.cfg.eval_samples_per_class]

    def sample(self, index: int) -> tuple[np.ndarray, str, int]:
        image = np.empty((self.image_size, self.image_size, 3), dtype=np.uint8)
        caption, label, _ = self._draw(image, index)
        return image, caption, label

    def render_chunks(self, chunks):
        """The uint8 images of each chunk of indices, one N x 3 x H x W batch at a time (evaluation streams)."""
        for chunk in chunks:
            yield self.render_batch(list(chunk))[0]

    def render_batch(self, indices) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Render many samples into one uint8 N x 3 x H x W tensor (plus captions, labels)."""
        pixels, facts, labels = self.render_scenes(indices)
        return pixels, [f.caption for f in facts], labels

    def render_scenes(self, indices) -> tuple[torch.Tensor, list[SceneFacts], torch.Tensor]:
        """``render_batch`` with each image's ``SceneFacts`` (its caption included) instead of the caption."""
        indices = [int(i) for i in indices]
        images = np.empty((len(indices), self.image_size, self.image_size, 3), dtype=np.uint8)
        facts, labels = [], []
        for row, index in enumerate(indices):
            _, label, scene = self._draw(images[row], index)
            facts.append(scene)
            labels.append(label)
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        return pixels, facts, torch.tensor(labels, dtype=torch.long)

    # The drawing itself: choose the scene from the sample's own rng, paint it, caption it.
    def _draw(self, image: np.ndarray, index: int) -> tuple[str, int, SceneFacts]:
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        if self.split == "train":
            rng = np.random.default_rng([self.seed, SPLIT_TAGS["train"], index])
            label = self._train_label(rng)
            two_objects = rng.random() < self.cfg.two_objects_prob
        elif self.split == "binding":
            rng = self._eval_rng(index)
            scene = self._binding_scene(rng, index)
            background = _fill_background(image, rng, textured=rng.random() < self.cfg.textured_background_prob)
            self._paint_pair(image, rng, scene.first, scene.second, scene.relation)
            facts = _pair_facts(scene.first, scene.second, scene.relation, background, scene.caption())
            return facts.caption, scene.first, facts
        else:
            rng = self._eval_rng(index)
            label = self.classes[index // self.cfg.eval_samples_per_class]
            two_objects = False  # eval images show exactly the labelled object
        background = _fill_background(image, rng, textured=rng.random() < self.cfg.textured_background_prob)
        if two_objects:
            facts = self._draw_pair(image, rng, label, background)
        else:
            facts = self._draw_single(image, rng, label, background)
        return facts.caption, label, facts

    def _train_label(self, rng: np.random.Generator) -> int:
        """The main pair of a train sample: uniform, or Zipf over the trained pairs (pair_zipf_exponent)."""
        if self.cfg.pair_zipf_exponent == 0.0:  # the uniform draw, unchanged
            return self.train_classes[int(rng.integers(len(self.train_classes)))]
        labels, probs = pair_frequencies(self.cfg)
        return int(labels[int(np.searchsorted(np.cumsum(probs), rng.random(), side="right").clip(0, len(labels) - 1))])

    def _draw_single(self, image: np.ndarray, rng: np.random.Generator, label: int, background: str) -> SceneFacts:
        colour, shape = _split_label(label)
        size = SIZES[int(rng.integers(len(SIZES)))]
        position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        radius = RADIUS_FRACTION[size] * self.image_size * rng.uniform(0.92, 1.08)
        cx, cy = _grid_centre(self.image_size, radius, *POSITIONS[position], rng)
        _paint(image, shape, _jittered_colour(colour, rng), radius, cx, cy)
        template = SINGLE_TEMPLATES[int(rng.integers(len(SINGLE_TEMPLATES)))]
        phrases = POSITION_PHRASES[position]
        caption = _fill_single(template, colour, shape, size, phrases[int(rng.integers(len(phrases)))])
        return SceneFacts(((colour, shape, size, position),), None, background, caption)

    def _draw_pair(self, image: np.ndarray, rng: np.random.Generator, label: int, background: str) -> SceneFacts:
        """Main object plus a second (trained) pair on the opposite side, both small."""
        others = [k for k in self.train_classes if k != label]
        second = others[int(rng.integers(len(others)))]
        relation = list(RELATIONS)[int(rng.integers(len(RELATIONS)))]
        self._paint_pair(image, rng, label, second, relation)
        template = PAIR_TEMPLATES[int(rng.integers(len(PAIR_TEMPLATES)))]
        caption = _fill_pair(template, _split_label(label), _split_label(second), relation)
        return _pair_facts(label, second, relation, background, caption)

    def _paint_pair(self, image: np.ndarray, rng: np.random.Generator, label: int, second: int, relation: str) -> None:
        """Paint ``label`` on the ``relation`` side of ``second`` (both small, on opposite sides)."""
        side, axis = RELATIONS[relation]
        size = self.image_size
        for obj, obj_side in ((label, side), (second, -side)):
            colour, shape = _split_label(obj)
            radius = RADIUS_FRACTION["small"] * size * rng.uniform(0.92, 1.08)
            cell = (obj_side, 0) if axis == 0 else (0, obj_side)
            cx, cy = _grid_centre(size, radius, *cell, rng)
            # shift across the axis a little so pairs are not always perfectly aligned
            if axis == 0:
                cy += rng.uniform(-0.12, 0.12) * size
            else:
                cx += rng.uniform(-0.12, 0.12) * size
            _paint(image, shape, _jittered_colour(colour, rng), radius, cx, cy)

    def caption_corpus(self, n: int) -> list[str]:
        """Captions for tokenizer training: every word any split can produce, then random fill.

        Uses all pairs, held-out ones included (their words are known; only the combinations
        are withheld from images). Returns ``max(n, number of coverage captions)`` captions.
        """
        corpus = _coverage_captions()
        rng = np.random.default_rng([self.seed, 99])
        n_classes = len(class_names())
        while len(corpus) < n:
            label = int(rng.integers(n_classes))
            if rng.random() < 0.25:
                second = int(rng.integers(n_classes))
                relation = list(RELATIONS)[int(rng.integers(len(RELATIONS)))]
                template = PAIR_TEMPLATES[int(rng.integers(len(PAIR_TEMPLATES)))]
                corpus.append(_fill_pair(template, _split_label(label), _split_label(second), relation))
            else:
                colour, shape = _split_label(label)
                template = SINGLE_TEMPLATES[int(rng.integers(len(SINGLE_TEMPLATES)))]
                size = SIZES[int(rng.integers(len(SIZES)))]
                phrases = POSITION_PHRASES[list(POSITIONS)[int(rng.integers(len(POSITIONS)))]]
                corpus.append(_fill_single(template, colour, shape, size, phrases[int(rng.integers(len(phrases)))]))
        return corpus


def _pair_facts(first: int, second: int, relation: str, background: str, caption: str) -> SceneFacts:
    # both objects of a pair are painted small, on opposite sides (see ``_paint_pair``)
    objects = tuple((*_split_label(k), "small", None) for k in (first, second))
    return SceneFacts(objects, relation, background, caption)


@lru_cache(maxsize=16)
def _pair_frequencies(holdout_fraction: float, holdout_seed: int, exponent: float) -> tuple[np.ndarray, np.ndarray]:
    held = held_out_pairs(ShapesConfig(holdout_fraction=holdout_fraction, holdout_seed=holdout_seed))
    trained = np.array([k for k in range(len(class_names())) if k not in held])
    # which pair is frequent: a fixed shuffle, so the head is not simply the first colours
    ranked = trained[np.random.default_rng([holdout_seed, 0x21FF]).permutation(len(trained))]
    weights = 1.0 / np.arange(1, len(ranked) + 1) ** exponent
    return ranked, weights / weights.sum()


def pair_frequencies(cfg: ShapesConfig) -> tuple[np.ndarray, np.ndarray]:
    """(trained labels, their probability as the main object of a train sample), most frequent first."""
    ranked, probs = _pair_frequencies(cfg.holdout_fraction, cfg.holdout_seed, cfg.pair_zipf_exponent)
    return ranked.copy(), probs.copy()


def _split_label(label: int) -> tuple[str, str]:
    colour_index, shape_index = divmod(label, len(SHAPES))
    return list(COLOURS)[colour_index], SHAPES[shape_index]


def _fill_single(template: str, colour: str, shape: str, size: str, position_phrase: str) -> str:
    # the article agrees with whatever word follows it: the size if present, else the colour
    next_word = size if "{a} {z}" in template else colour
    return template.format(a=_article(next_word), c=colour, s=shape, z=size, p=position_phrase)


def _fill_pair(template: str, first: tuple[str, str], second: tuple[str, str], relation: str) -> str:
    return template.format(
        a1=_article(first[0]), c1=first[0], s1=first[1], r=relation,
        a2=_article(second[0]), c2=second[0], s2=second[1],
    )


def _coverage_captions() -> list[str]:
    """A deterministic list that uses every class, template, size, position phrase and relation."""
    names = class_names()
    phrases = [p for options in POSITION_PHRASES.values() for p in options]
    out = []
    for k in range(len(names)):
        colour, shape = _split_label(k)
        template = SINGLE_TEMPLATES[k % len(SINGLE_TEMPLATES)]
        out.append(_fill_single(template, colour, shape, SIZES[k % len(SIZES)], phrases[k % len(phrases)]))
    # make sure every template is used with both sizes and every phrase appears at least once
    for k, phrase in enumerate(phrases):
        colour, shape = _split_label(k % len(names))
        out.append(_fill_single("{a} {z} {c} {s} {p}", colour, shape, SIZES[k % len(SIZES)], phrase))
    for k, relation in enumerate(RELATIONS):
        template = PAIR_TEMPLATES[k % len(PAIR_TEMPLATES)]
        out.append(_fill_pair(template, _split_label(k), _split_label(len(names) - 1 - k), relation))
    return out
