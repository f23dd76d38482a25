"""Caption studies: long captions, synthetic vs raw captions, caption noise, sentence splitting, sub-captions.

For the built-in shapes data (``clipforge.data.synthetic``), every image's ``SceneFacts`` give

- ``long_caption``: several sentences, each stating one fact (which shapes, their colours, sizes,
  positions, the relation between two objects, the background), in a random order and phrasing;
- ``synthetic_caption``: terse and always correct ("a red circle", "a red circle left of a blue square");
- ``noisy_raw_caption``: the templated caption, replaced with probability ``shapes.raw_caption_noise``
  by a caption of another scene (``other_image``) or with one attribute dropped (``dropped``) or
  changed (``altered``), never into a held-out colour-shape pair; the kind is recorded per sample
  (``NOISE_KINDS``, ``batch["noise"]``).

All draws come from the sample's own generator ``default_rng([seed, split, index, CAPTION_STREAM])``:
a stream apart from the one that drew the image, so adding these captions changes no image and no
raw caption of a recipe that does not ask for them.

For any source (on disk too), ``split_sentences`` cuts a caption into sentences (newline, ``.``, ``!``,
``?``, ``</s>``; empty pieces dropped) and ``sub_caption_texts`` draws DreamLIP's K sub-captions
per sample: without replacement when there are at least K sentences, else with replacement.
"""

from __future__ import annotations

import random
import re
import warnings
from typing import Sequence

import numpy as np

from clipforge.data.synthetic import (COLOURS, POSITION_PHRASES, SHAPES, SIZES, SPLIT_TAGS, SceneFacts, class_label,
                                      held_out_pairs)

# batch["caption_kind"]: what each caption row is
CAPTION_KINDS: tuple[str, ...] = ("raw", "synthetic", "sub_caption", "long")
RAW, SYNTHETIC, SUB_CAPTION, LONG = range(4)
# batch["noise"]: what happened to each sample's raw caption
NOISE_KINDS: tuple[str, ...] = ("clean", "other_image", "dropped", "altered")
CAPTION_STREAM = 7  # the 4th seed word of the caption generator (the image generator has 3)

# ----------------------------------------------------------------------------- long captions
# One fact per sentence; {s} shape, {c} colour, {z} size, {p} position phrase, {a}/{b} whole objects.
SHAPE_SENTENCES = ["There is {art} {s}.", "The image shows {art} {s}.", "{Art} {s} can be seen.",
                   "The picture contains {art} {s}."]
COLOUR_SENTENCES = ["The {s} is {c}.", "The colour of the {s} is {c}.", "The {s} is coloured {c}."]
SIZE_SENTENCES = ["The {s} is {z}.", "The {s} is of {z} size.", "The {s} looks {z}."]
POSITION_SENTENCES = ["The {s} is {p}.", "The {s} sits {p}.", "The {s} is placed {p}."]
OBJECT_SENTENCES = ["There is {a}.", "The image shows {a}.", "{A} can be seen.", "The picture contains {a}."]
RELATION_SENTENCES = ["The {a} is {r} the {b}.", "The {a} appears {r} the {b}."]
PAIR_SIZE_SENTENCES = ["Both shapes are small.", "The two shapes are small."]
BACKGROUND_SENTENCES = {
    "plain": ["The background is plain grey.", "The background is a flat grey.", "It is on a plain grey background."],
    "gradient": ["The background is a grey gradient.", "The grey background fades from dark to light."],
    "stripes": ["The background has grey stripes.", "The background is striped grey."],
    "checks": ["The background is a grey checkerboard.", "The background has grey checks."],
    "noise": ["The background is noisy grey.", "The background is grainy grey."],
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(options: Sequence[str], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def long_caption(facts: SceneFacts, rng: np.random.Generator) -> str:
    """The scene's facts, one per sentence, in a random order and phrasing."""
    sentences = []
    if len(facts.objects) == 1:
        colour, shape, size, position = facts.objects[0]
        art = _article(shape)
        sentences.append(_pick(SHAPE_SENTENCES, rng).format(art=art, Art=art.capitalize(), s=shape))
        sentences.append(_pick(COLOUR_SENTENCES, rng).format(s=shape, c=colour))
        sentences.append(_pick(SIZE_SENTENCES, rng).format(s=shape, z=size))
        sentences.append(_pick(POSITION_SENTENCES, rng).format(s=shape, p=_pick(POSITION_PHRASES[position], rng)))
    else:
        names = [f"{c} {s}" for c, s, _, _ in facts.objects]
        for name in names:
            a = f"{_article(name)} {name}"
            sentences.append(_pick(OBJECT_SENTENCES, rng).format(a=a, A=a.capitalize()))
        sentences.append(_pick(PAIR_SIZE_SENTENCES, rng))
        sentences.append(_pick(RELATION_SENTENCES, rng).format(a=names[0], b=names[1], r=facts.relation))
    sentences.append(_pick(BACKGROUND_SENTENCES[facts.background], rng))
    order = rng.permutation(len(sentences))
    return " ".join(sentences[i] for i in order)


def synthetic_caption(facts: SceneFacts) -> str:
    """Terse and always correct: the object(s), and the relation of a pair."""
    names = [f"{c} {s}" for c, s, _, _ in facts.objects]
    if len(names) == 1:
        return f"{_article(names[0])} {names[0]}"
    return f"{_article(names[0])} {names[0]} {facts.relation} {_article(names[1])} {names[1]}"


# ----------------------------------------------------------------------------- raw-caption noise
def noisy_raw_caption(facts: SceneFacts, noise: float, rng: np.random.Generator,
                      held_out: frozenset[int] = frozenset()) -> tuple[str, int]:
    """The raw caption, or with probability ``noise`` a corrupted one; returns (caption, noise kind index).

    A corrupted caption never names a ``held_out`` colour-shape pair: those pairs must not reach
    training, not even as the text of a wrong caption (at most half of any colour's or shape's
    partners are held out, so a trained alternative always exists).
    """
    if noise <= 0 or rng.random() >= noise:
        return facts.caption, 0
    kind = 1 + int(rng.integers(3))
    if kind == 1:  # a caption of another scene: a different trained colour-shape pair, random template words
        colour, shape = facts.objects[0][:2]
        others = [(c, s) for c in COLOURS for s in SHAPES
                  if (c, s) != (colour, shape) and class_label(c, s) not in held_out]
        c, s = others[int(rng.integers(len(others)))]
        size, position = _pick(SIZES, rng), _pick(list(POSITION_PHRASES), rng)
        phrase = _pick(POSITION_PHRASES[position], rng)
        return f"{_article(size)} {size} {c} {s} {phrase}", kind
    words = facts.caption.split()
    colour_at = [i for i, w in enumerate(words) if w in COLOURS]
    shape_at = [i for i, w in enumerate(words) if w in SHAPES]
    use_colour = rng.random() < 0.5
    at = _pick(colour_at if use_colour else shape_at, rng)
    if kind == 2:  # dropped: the colour word goes, or the shape becomes "shape"
        if use_colour:
            del words[at]
        else:
            words[at] = "shape"
    else:  # altered: another colour or another shape (captions name a colour right before its shape)
        if use_colour:
            pool = [c for c in COLOURS if c != words[at] and class_label(c, words[at + 1]) not in held_out]
        else:
            pool = [s for s in SHAPES if s != words[at] and class_label(words[at - 1], s) not in held_out]
        words[at] = _pick(pool, rng)
    return " ".join(_fix_articles(words)), kind


def _fix_articles(words: list[str]) -> list[str]:
    return [(_article(words[i + 1]) if w in ("a", "an") and i + 1 < len(words) else w) for i, w in enumerate(words)]


def caption_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_TAGS[split], index, CAPTION_STREAM])


def shapes_caption_lists(facts: list[SceneFacts], indices: Sequence[int], seed: int, split: str, mode: str,
                         noise: float, held_out: frozenset[int] = frozenset()
                         ) -> tuple[list[list[str]], list[list[int]], list[int]]:
    """Each sample's caption list for ``shapes.captions = mode``, the kinds of its captions, its noise kind.

    ``raw`` -> [raw]; ``long`` -> [long]; ``raw+long`` -> [raw, long]; ``raw+synthetic`` -> [raw, synthetic].
    Raw captions are noised (``noise``) in the train split only, never into a ``held_out`` pair.
    """
    lists, kinds, noise_kinds = [], [], []
    for scene, index in zip(facts, indices):
        rng = caption_rng(seed, split, int(index))
        raw, noise_kind = noisy_raw_caption(scene, noise if split == "train" else 0.0, rng, held_out)
        long = long_caption(scene, rng)  # always drawn, so the long caption does not depend on the noise
        options = {"raw": ([raw], [RAW]), "long": ([long], [LONG]), "raw+long": ([raw, long], [RAW, LONG]),
                   "raw+synthetic": ([raw, synthetic_caption(scene)], [RAW, SYNTHETIC])}
        texts, text_kinds = options[mode]
        lists.append(texts)
        kinds.append(text_kinds)
        noise_kinds.append(noise_kind)
    return lists, kinds, noise_kinds


# ----------------------------------------------------------------------------- sentences, sub-captions
_SENTENCE_END = re.compile(r"</s>|\n|[!?]|(?<!\d)\.|\.(?!\d)")  # not the point of "3.5"; "in 2024." ends one


def split_sentences(text: str) -> list[str]:
    """Sentences of a (long) caption: split on newlines, ``.``, ``!``, ``?`` and ``</s>``; empty pieces dropped."""
    return [" ".join(piece.split()) for piece in _SENTENCE_END.split(text) if piece.strip()]


def sub_caption_texts(captions: Sequence[str], count: int, keep_raw: bool,
                      rng: random.Random, merge: int = 1) -> tuple[list[str], list[int]]:
    """DreamLIP's texts of one sample: [raw] + ``count`` sub-captions, and their kinds.

    ``captions[0]`` is the raw caption; the sentences come from ``captions[1:]`` (the long captions, in
    order), or from ``captions[0]`` itself when it is the only one. A sub-caption is one sentence, or
    with ``merge`` = m > 1 (DreamLIP's merged_num) m consecutive sentences joined by ". " (every window
    of m; all the sentences when there are fewer). Drawn without replacement when there are at least
    ``count`` of them, else with replacement; always exactly ``count``.
    """
    if not captions:
        raise ValueError("a sample without captions has no sub-captions")
    pool = [s for c in (captions[1:] or captions[:1]) for s in split_sentences(c)]
    if not pool:  # nothing but separators: the raw caption is the only sentence there is
        pool = [" ".join(captions[0].split())]
    if merge > 1:
        pool = [". ".join(pool[i : i + merge]) for i in range(max(1, len(pool) - merge + 1))]
    if len(pool) >= count:
        chosen = rng.sample(pool, count)
    else:
        chosen = [pool[rng.randrange(len(pool))] for _ in range(count)]
    texts = ([" ".join(captions[0].split())] if keep_raw else []) + chosen
    kinds = ([RAW] if keep_raw else []) + [SUB_CAPTION] * count
    return texts, kinds


# ----------------------------------------------------------------------------- tokenizing
_truncation_checks = {"left": 50}  # batches checked per process before we stop looking


def tokenize_checked(tokenizer, captions: list[str]):
    """``tokenizer(captions)``, warning (once per process) when captions are cut to the context length."""
    if _truncation_checks["left"] > 0 and hasattr(tokenizer, "truncated"):
        cut = sum(tokenizer.truncated(captions))
        _truncation_checks["left"] -= 1
        if cut:
            _truncation_checks["left"] = 0
            warnings.warn(f"{cut} of {len(captions)} captions in a training batch are longer than the text "
                          f"context ({tokenizer.context_length} tokens) and were cut; raise model.context_length, "
                          "or split long captions into sub-captions (data.sub_captions)", stacklevel=2)
    return tokenizer(captions)


# ----------------------------------------------------------------------------- shapes batches
def make_caption_batch(dataset, indices: list[int], tokenizer, sub_captions: int = 0, keep_raw: bool = True,
                       merge: int = 1) -> dict:
    """A shapes batch with ``dataset.cfg.captions`` lists (sub-captions drawn when ``sub_captions`` > 0):
    rows sample-major with ``text_owner`` when an image has several, ``caption_kind`` and ``noise``."""
    import torch

    cfg = dataset.cfg
    pixels, facts, labels = dataset.render_scenes(indices)
    lists, kinds, noise = shapes_caption_lists(facts, indices, dataset.seed, dataset.split, cfg.captions,
                                               cfg.raw_caption_noise, frozenset(held_out_pairs(cfg)))
    if sub_captions:
        drawn = [sub_caption_texts(texts, sub_captions, keep_raw, random.Random(_sub_caption_seed(dataset.seed, i)),
                                   merge) for texts, i in zip(lists, indices)]
        lists, kinds = [d[0] for d in drawn], [d[1] for d in drawn]
    per_sample = len(lists[0])
    captions = [c for texts in lists for c in texts]
    batch = {"images": pixels, "labels": labels, "indices": torch.tensor(indices, dtype=torch.long),
             "captions": captions, "caption_kind": torch.tensor([k for ks in kinds for k in ks], dtype=torch.long),
             "noise": torch.tensor(noise, dtype=torch.long)}
    if tokenizer is not None:
        batch["input_ids"], batch["attention_mask"] = tokenize_checked(tokenizer, captions)
    if per_sample > 1:
        batch["text_owner"] = torch.arange(len(indices)).repeat_interleave(per_sample)
    return batch


def _sub_caption_seed(seed: int, index: int) -> int:
    # its own stream per sample (shapes samples are unique per index, so per step)
    return ((seed * 1_000_003 + index) * 1_000_003 + CAPTION_STREAM) & (2**63 - 1)


def study_corpus(dataset, n: int) -> list[str]:
    """Tokenizer captions for the caption studies: every template word with every shape / colour /
    size / position / background, then long and synthetic captions of the first train scenes."""
    out = []
    for k, shape in enumerate(SHAPES):
        colour = list(COLOURS)[k % len(COLOURS)]
        art = _article(shape)
        out += [t.format(art=art, Art=art.capitalize(), s=shape) for t in SHAPE_SENTENCES]
        out += [t.format(s=shape, c=c) for t in COLOUR_SENTENCES for c in COLOURS]
        out += [t.format(s=shape, z=z) for t in SIZE_SENTENCES for z in SIZES]
        out += [t.format(s=shape, p=p) for t in POSITION_SENTENCES for ps in POSITION_PHRASES.values() for p in ps]
        name = f"{_article(colour)} {colour} {shape}"
        out += [t.format(a=name, A=name.capitalize()) for t in OBJECT_SENTENCES]
        out += [t.format(a=f"{colour} {shape}", b=f"{colour} {shape}", r="left of") for t in RELATION_SENTENCES]
    out += PAIR_SIZE_SENTENCES + [s for options in BACKGROUND_SENTENCES.values() for s in options]
    out += ["a shape", "a red shape left of a blue shape"]  # the noise's "dropped" shape word
    _, facts, _ = dataset.render_scenes(range(max(1, n // 4)))
    for i, scene in enumerate(facts):
        out += [long_caption(scene, caption_rng(dataset.seed, dataset.split, i)), synthetic_caption(scene)]
    return out
