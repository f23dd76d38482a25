"""The built-in shapes dataset and the train/eval loaders."""

import math
import re

import numpy as np
import pytest
import torch

from clipforge.config import DataConfig, ShapesConfig
from clipforge.data.loader import build_eval_set, build_train_loader, caption_corpus_for, eval_batches
from clipforge.data.synthetic import (
    COLOURS,
    SHAPES,
    ShapesDataset,
    class_names,
    held_out_pairs,
)
from clipforge.data.synthetic import _alpha_mask
from clipforge.models.tokenizer import BPETokenizer

N_CLASSES = len(COLOURS) * len(SHAPES)
MENTION = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")


def mentioned_labels(caption: str) -> list[int]:
    """Labels of every 'colour shape' pair named in a caption."""
    return [class_names().index(f"{c} {s}") for c, s in MENTION.findall(caption)]


@pytest.fixture(scope="module")
def busy_train():
    """Many train samples with second objects and textures switched on."""
    cfg = ShapesConfig(two_objects_prob=0.5, textured_background_prob=0.5)
    ds = ShapesDataset(cfg, 32, seed=3, split="train")
    images, captions, labels = ds.render_batch(range(3000))
    return cfg, images, captions, labels.tolist()


def test_grid_has_enough_colours_and_shapes():
    assert len(COLOURS) >= 8 and len(SHAPES) >= 6
    names = class_names()
    assert len(names) == len(set(names)) == N_CLASSES
    assert names[0] == f"{list(COLOURS)[0]} {SHAPES[0]}"
    # colours must be far apart so they can be named reliably
    rgb = np.array(list(COLOURS.values()), dtype=float)
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert distances.min() > 80


def test_sample_is_a_pure_function_of_seed_and_index():
    cfg = ShapesConfig(two_objects_prob=0.5, textured_background_prob=0.5)
    a = ShapesDataset(cfg, 64, seed=5, split="train")
    b = ShapesDataset(cfg, 64, seed=5, split="train")
    order = [17, 3, 1000003, 0, 17]
    first = [a.sample(i) for i in order]
    second = [b.sample(i) for i in reversed(order)][::-1]  # other instance, other call order
    for (img1, cap1, lab1), (img2, cap2, lab2) in zip(first, second):
        assert img1.dtype == np.uint8 and img1.shape == (64, 64, 3)
        assert img1.tobytes() == img2.tobytes() and cap1 == cap2 and lab1 == lab2
    assert first[0][0].tobytes() != first[1][0].tobytes()  # other index, other image
    other_seed = ShapesDataset(cfg, 64, seed=6, split="train").sample(17)[0]
    assert other_seed.tobytes() != first[0][0].tobytes()


def test_render_batch_matches_sample():
    ds = ShapesDataset(ShapesConfig(two_objects_prob=0.3), 32, seed=0, split="train")
    images, captions, labels = ds.render_batch([4, 9, 2])
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 32, 32) and images.is_contiguous()
    assert labels.dtype == torch.long
    for row, index in enumerate([4, 9, 2]):
        image, caption, label = ds.sample(index)
        assert torch.equal(images[row], torch.from_numpy(image).permute(2, 0, 1))
        assert captions[row] == caption and labels[row] == label


@pytest.mark.parametrize("fraction", [0.15, 0.2, 0.35, 0.5])
@pytest.mark.parametrize("holdout_seed", [0, 1234, 99])
def test_held_out_pairs_are_enough_and_spread(fraction, holdout_seed):
    cfg = ShapesConfig(holdout_fraction=fraction, holdout_seed=holdout_seed)
    held = held_out_pairs(cfg)
    assert held == held_out_pairs(cfg)  # deterministic
    assert len(held) == math.ceil(fraction * N_CLASSES - 1e-9) and len(held) >= 0.15 * N_CLASSES
    trained = [k for k in range(N_CLASSES) if k not in held]
    # each colour keeps most of its shapes and each shape most of its colours in training
    colour_counts = np.bincount([k // len(SHAPES) for k in trained], minlength=len(COLOURS))
    shape_counts = np.bincount([k % len(SHAPES) for k in trained], minlength=len(SHAPES))
    assert colour_counts.min() >= len(SHAPES) // 2
    assert shape_counts.min() >= len(COLOURS) // 2


def test_holdout_seed_changes_the_held_out_set():
    assert held_out_pairs(ShapesConfig(holdout_seed=1)) != held_out_pairs(ShapesConfig(holdout_seed=2))


def test_held_out_pairs_never_appear_in_training(busy_train):
    cfg, _, captions, labels = busy_train
    held = held_out_pairs(cfg)
    assert not held & set(labels)
    n_pairs = 0
    for caption in captions:
        named = mentioned_labels(caption)
        assert named, caption
        n_pairs += len(named) == 2
        assert not held & set(named), caption  # neither the main nor the second object
    assert n_pairs > 1000  # the second-object path was exercised


def test_every_colour_and_shape_appears_in_training(busy_train):
    cfg, _, _, labels = busy_train
    trained = set(range(N_CLASSES)) - held_out_pairs(cfg)
    assert set(labels) == trained
    assert {k // len(SHAPES) for k in labels} == set(range(len(COLOURS)))
    assert {k % len(SHAPES) for k in labels} == set(range(len(SHAPES)))
    counts = np.bincount(labels, minlength=N_CLASSES)[sorted(trained)]
    assert counts.min() > 0.5 * counts.mean()  # roughly uniform over trained pairs


def test_caption_names_colour_and_shape_of_the_label(busy_train):
    _, _, captions, labels = busy_train
    for caption, label in zip(captions, labels):
        assert class_names()[label] in caption
        assert mentioned_labels(caption)[0] == label  # the labelled object is named first


def _foreground(image: np.ndarray) -> np.ndarray:
    background = image[0, 0].astype(int)  # plain backgrounds are uniform
    return np.abs(image.astype(int) - background).max(-1) > 60


def test_images_show_what_the_caption_says():
    ds = ShapesDataset(ShapesConfig(), 64, seed=1, split="train")
    rgb = np.array(list(COLOURS.values()), dtype=float)
    sides = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}
    checked_sides = 0
    for index in range(300):
        image, caption, label = ds.sample(index)
        fg = _foreground(image)
        assert fg.sum() > 30, caption  # the object is big enough to see
        mean_colour = image[fg].mean(0)
        assert np.argmin(np.linalg.norm(rgb - mean_colour, axis=1)) == label // len(SHAPES), caption
        centre = np.argwhere(fg).mean(0)[::-1]  # (x, y)
        for word, (axis, sign) in sides.items():
            if re.search(rf"\b{word}\b", caption):
                assert sign * (centre[axis] - 32) > 5, (caption, centre)
                checked_sides += 1
    assert checked_sides > 50


@pytest.mark.parametrize("radius", [4.75, 9.5, 14.75])  # small at 32 px .. large at 64 px
def test_shapes_are_distinct_and_solid(radius):
    """At the sizes we draw, every shape covers a fair area and differs from every other one."""
    masks = {shape: _alpha_mask(shape, radius)[..., 0] for shape in SHAPES}
    disc = math.pi * radius**2
    for shape, mask in masks.items():
        assert 0.25 * disc < mask.sum() < 1.1 * disc, shape
        assert mask.max() == 1.0  # solid inside
    assert ((masks["circle"] > 0) & (masks["circle"] < 1)).sum() > radius  # anti-aliased edge
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert np.abs(masks[a] - masks[b]).sum() > 0.15 * disc, (a, b)


def test_eval_splits_are_disjoint_stable_and_complete():
    data = DataConfig(shapes=ShapesConfig(eval_samples_per_class=3))
    seen = build_eval_set(data, 32, "seen")
    unseen = build_eval_set(data, 32, "unseen")
    held = held_out_pairs(data.shapes)
    assert set(unseen.classes) == held
    assert set(seen.classes) == set(range(N_CLASSES)) - held
    assert len(seen) == 3 * len(seen.classes) and len(unseen) == 3 * len(unseen.classes)
    for split in (seen, unseen):
        labels = [split.sample(i)[2] for i in range(len(split))]
        assert labels == [split.label_of(i) for i in range(len(split))]
        assert np.bincount(labels, minlength=N_CLASSES)[split.classes].tolist() == [3] * len(split.classes)
        captions = [split.sample(i)[1] for i in range(len(split))]
        assert all(mentioned_labels(c) == [lab] for c, lab in zip(captions, labels))  # one object
    # stable: rebuilt sets and another training seed give the same images
    again = build_eval_set(DataConfig(seed=7, shapes=ShapesConfig(eval_samples_per_class=3)), 32, "unseen")
    assert all(again.sample(i)[0].tobytes() == unseen.sample(i)[0].tobytes() for i in range(len(unseen)))
    with pytest.raises(IndexError, match="out of range"):
        unseen.sample(len(unseen))
    batches = list(eval_batches(unseen, 7))
    assert sum(len(b["labels"]) for b in batches) == len(unseen)
    assert torch.equal(batches[0]["images"][1], torch.from_numpy(unseen.sample(1)[0]).permute(2, 0, 1))


def test_train_split_has_no_length_and_checks_arguments():
    ds = ShapesDataset(ShapesConfig(), 32, seed=0, split="train")
    with pytest.raises(TypeError, match="unbounded"):
        len(ds)
    with pytest.raises(IndexError, match=">= 0"):
        ds.sample(-1)
    with pytest.raises(ValueError, match="unknown shapes split 'val'"):
        ShapesDataset(ShapesConfig(), 32, seed=0, split="val")
    with pytest.raises(ValueError, match="unknown eval split 'train'"):
        build_eval_set(DataConfig(), 32, "train")


def test_caption_corpus_covers_every_word_of_every_split():
    cfg = ShapesConfig(two_objects_prob=1.0)
    corpus = ShapesDataset(cfg, 32, seed=0).caption_corpus(100)
    assert len(corpus) == 100
    vocabulary = {w for c in corpus for w in c.split()}
    produced = ShapesDataset(cfg, 32, seed=0).render_batch(range(500))[1]
    produced += ShapesDataset(ShapesConfig(), 32, seed=0).render_batch(range(500))[1]
    unseen = build_eval_set(DataConfig(), 32, "unseen")
    produced += [unseen.sample(i)[1] for i in range(0, len(unseen), 5)]
    assert {w for c in produced for w in c.split()} <= vocabulary
    # held-out pairs are named in the corpus (words known), only their images are withheld
    named = {k for c in corpus for k in mentioned_labels(c)}
    assert named == set(range(N_CLASSES))
    assert caption_corpus_for(DataConfig(), 100) == caption_corpus_for(DataConfig(), 100)


# ----------------------------------------------------------------------------- loader
@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train(caption_corpus_for(DataConfig(), 300), vocab_size=200, context_length=24)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_train_loader_batches_are_contiguous_index_ranges(tokenizer):
    data = DataConfig(batch_size=8, num_workers=0)
    batches = _take(build_train_loader(data, 32, tokenizer), 3)
    for k, batch in enumerate(batches):
        assert batch["indices"].tolist() == list(range(8 * k, 8 * k + 8))
        assert batch["images"].shape == (8, 3, 32, 32) and batch["images"].dtype == torch.uint8
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, 24)
        assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["labels"].dtype == torch.long
        eot = batch["attention_mask"].sum(1) - 1
        assert (batch["input_ids"][torch.arange(8), eot] == tokenizer.eot_id).all()


def test_train_loader_same_stream_for_any_worker_count_and_resume(tokenizer):
    data = DataConfig(batch_size=8, num_workers=0, seed=2)
    single = _take(build_train_loader(data, 32, tokenizer), 4)
    multi = _take(build_train_loader(data.model_copy(update={"num_workers": 2}), 32, tokenizer), 4)
    resumed = _take(build_train_loader(data, 32, tokenizer, start_sample=13), 2)
    for a, b in zip(single, multi):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key] for key in a)
    # captions and keys are lists (batch schema v2): joined with sum, tensors with cat
    join = lambda parts: torch.cat(parts) if torch.is_tensor(parts[0]) else sum(parts, [])  # noqa: E731
    stream = {key: join([b[key] for b in single]) for key in single[0]}
    resumed = {key: join([b[key] for b in resumed]) for key in resumed[0]}
    assert resumed["indices"].tolist() == list(range(13, 29))
    assert all(torch.equal(resumed[key], stream[key][13:29]) if torch.is_tensor(stream[key])
               else resumed[key] == stream[key][13:29] for key in stream)
    other_seed = next(build_train_loader(data.model_copy(update={"seed": 3}), 32, tokenizer))
    assert not torch.equal(other_seed["images"], single[0]["images"])


def test_unknown_train_source_is_a_clear_error(tokenizer):
    # caught by the recipe schema: the message says how to write a source
    with pytest.raises(ValueError, match=r"data.train source 'laion' has no kind prefix; write 'shapes' or KIND:PATH"):
        build_train_loader(DataConfig(train="laion"), 32, tokenizer)
    with pytest.raises(ValueError, match="start_sample must be >= 0"):
        build_train_loader(DataConfig(), 32, tokenizer, start_sample=-1)
