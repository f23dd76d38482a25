"""Batches for training and evaluation.

``build_train_loader(data_cfg, image_size, tokenizer, start_sample=0)`` is an endless iterator of
batches of exactly ``data_cfg.batch_size`` samples; batch k holds the global sample indices
``[start_sample + k*B, start_sample + (k+1)*B)``. Samples are pure functions of their index, so
resuming with ``start_sample`` = samples already consumed continues the stream exactly, and
the stream is the same for any ``num_workers``.

With ``world_size`` W > 1 (one loader per rank; ``batch_size`` b is per rank), rank r's batch k
holds ``[start + k*b*W + r*b, start + k*b*W + (r+1)*b)``: the W ranks' k-th batches together are
exactly the single-process stream's k-th batch of b*W samples, and ``start_sample`` stays a
global count (samples consumed by all ranks together).

Each training batch is a dict (batch schema v2; the same keys for every source, also the ones on
disk of ``clipforge.data.pipeline``), with N = ``batch_size`` images and T = ``captions_per_sample``::

    images          uint8      N x 3 x H x W   (normalisation happens on the device, in the model)
    input_ids       long       N*T x L         [SOT] tokens [EOT] [PAD]...; rows sample-major (T per image)
    attention_mask  long       N*T x L         1 on SOT..EOT
    captions        list[str]  N*T             the raw caption of each token row (for other tokenizers)
    text_owner      long       N*T             only when T > 1: the image (0..N-1) of each caption row
    labels          long       N               class index; shapes: index into synthetic.class_names(); -1 unknown
    indices         long       N               global sample indices (ints, for this data.train only)
    keys            list[str]  N               stable sample keys: the same in every epoch, for any number
                                               of workers or ranks, and after a resume ("shapes:<index>",
                                               "<shard>.tar/<__key__>", "<table>:<line>" or its id, "cat/1.jpg")
    weights         float      N               only for tables with a ``weight`` column
    caption_kind    long       N*T             with caption lists (shapes.captions, data.sub_captions): what
                                               each row is, an index into ``data.captions.CAPTION_KINDS``
    noise           long       N               shapes with caption lists or noise: what happened to the raw
                                               caption, an index into ``data.captions.NOISE_KINDS``
    views           uint8      N x V x 3 x H x W only with data.ssl_views = V: self-supervised views (data.views)
    text_views      list[str]  N*A             only with data.text_views = A: augmented captions, sample-major
                                               (data.views); tokenized as text_view_input_ids / _attention_mask

``input_ids``/``attention_mask`` are there when a tokenizer is given. Caption row j belongs to image
``text_owner[j]`` (= j // T); with T = 1 the rows are the images' and ``text_owner`` is left out.

Workers render and tokenize whole batches (one DataLoader item = one batch), so per-sample
Python overhead stays inside one call; the DataLoader returns items in sampler order, which
keeps the order deterministic whatever the number of workers.

``build_eval_set(data_cfg, image_size, split)`` returns the finite ``seen``/``unseen`` eval split;
``eval_batches(dataset, batch_size, tokenizer=None)`` iterates it in batch dicts of the same form.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from clipforge.config import DataConfig
from clipforge.data.synthetic import ShapesDataset

TRAIN_SOURCES = ["shapes"]  # built in; sources on disk (wds:, jsonl:, csv:, imagefolder:) are in data.pipeline
EVAL_SPLITS = ["seen", "unseen"]


def _check_source(data_cfg: DataConfig) -> None:
    if data_cfg.train not in TRAIN_SOURCES:
        raise ValueError(
            f"unknown data.train source '{data_cfg.train}'; available sources: {', '.join(TRAIN_SOURCES)}"
        )


def build_train_dataset(data_cfg: DataConfig, image_size: int) -> ShapesDataset:
    _check_source(data_cfg)
    if data_cfg.captions_per_sample > 1:  # the config validator says so too; model_copy(update=) skips it
        raise ValueError(f"data.captions_per_sample={data_cfg.captions_per_sample} needs caption lists; the built-in "
                         "'shapes' source has one caption per image: set data.captions_per_sample=1")
    return ShapesDataset(data_cfg.shapes, image_size, seed=data_cfg.seed, split="train")


def caption_corpus_for(data_cfg: DataConfig, n: int) -> list[str]:
    """Captions to train a tokenizer on: every word the training source can produce."""
    if data_cfg.train != "shapes":  # sources on disk: the first n captions (clipforge.data.pipeline)
        from clipforge.data.pipeline import caption_corpus

        return caption_corpus(data_cfg, n)
    dataset = build_train_dataset(data_cfg, image_size=16)
    corpus = dataset.caption_corpus(n)
    if data_cfg.shapes.captions != "raw" or data_cfg.shapes.raw_caption_noise:  # the study captions' words too
        from clipforge.data.captions import study_corpus

        corpus += study_corpus(dataset, n)
    return corpus


def build_eval_set(data_cfg: DataConfig, image_size: int, split: str) -> ShapesDataset:
    """The ``seen`` or ``unseen`` eval split.

    Seeded by ``shapes.holdout_seed`` rather than ``data.seed`` so runs that differ only in
    their training seed are scored on the very same images.
    """
    _check_source(data_cfg)
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown eval split '{split}'; expected one of {EVAL_SPLITS}")
    return ShapesDataset(data_cfg.shapes, image_size, seed=data_cfg.shapes.holdout_seed, split=split)


def make_batch(dataset: ShapesDataset, indices: list[int], tokenizer=None) -> dict:
    """Render ``indices`` of ``dataset`` (and tokenize their captions) into one batch dict."""
    images, captions, labels = dataset.render_batch(indices)
    batch = {"images": images, "labels": labels, "indices": torch.tensor(indices, dtype=torch.long)}
    if tokenizer is not None:
        batch["input_ids"], batch["attention_mask"] = tokenizer(captions)
    batch["captions"] = captions
    return batch


def trim_text_padding(batch: dict, multiple: int = 8) -> dict:
    """The batch with ``input_ids`` / ``attention_mask`` cut to its longest caption (rounded up to a
    multiple of ``multiple``, for aligned kernels and few distinct shapes under torch.compile).

    Captions are right-padded and the text tower is causal, so no real token ever sees the cut
    columns and the pooled features are the same (``tests/test_perf_paths.py``). CIFAR captions
    use 7 of 32 positions: the text tower then runs a quarter of the context.
    """
    for prefix in ("", "text_view_"):  # the captions, and Fini et al.'s text views (data.text_views)
        mask = batch.get(prefix + "attention_mask")
        if mask is None or mask.dim() != 2:
            continue
        longest = int(mask.sum(dim=1).max()) if mask.numel() else 0
        keep = min(mask.shape[1], max(multiple, -(-longest // multiple) * multiple))
        if keep < mask.shape[1]:
            batch = {**batch, prefix + "input_ids": batch[prefix + "input_ids"][:, :keep],
                     prefix + "attention_mask": mask[:, :keep]}
    return batch


class _BatchDataset(Dataset):
    """Item k is the whole k-th batch of the stream (rendered and tokenized in the worker)."""

    def __init__(self, dataset: ShapesDataset, tokenizer, batch_size: int, start_sample: int,
                 rank: int = 0, world_size: int = 1, kept=None, caption_plan: tuple[int, bool, int] | None = None,
                 augmenter=None, seed: int = 0):
        self.augmenter, self.seed = augmenter, seed  # clipforge.data.views: strong policy, SSL views, EDA
        # (data.sub_captions, data.sub_caption_raw, data.sub_caption_merge), or None for plain captions
        self.caption_plan = caption_plan
        self.dataset = dataset
        self.kept = kept  # data.keep: position p renders index kept[p % len(kept)] (clipforge.data.keep)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.start_sample = start_sample
        self.rank = rank
        self.world_size = world_size

    def __getitem__(self, k: int) -> dict:
        first = rank_batch_start(self.start_sample, k, self.batch_size, self.rank, self.world_size)
        indices = list(range(first, first + self.batch_size))
        if self.kept is not None:
            indices = [int(self.kept[p % len(self.kept)]) for p in indices]
        tokenizer = self.tokenizer if self.augmenter is None else None  # augmented captions are tokenized after
        if self.caption_plan is not None:  # caption studies: lists, kinds, noise (clipforge.data.captions)
            from clipforge.data.captions import make_caption_batch

            batch = make_caption_batch(self.dataset, indices, tokenizer, *self.caption_plan)
        else:
            batch = make_batch(self.dataset, indices, tokenizer)
        if self.augmenter is not None:
            from clipforge.data.captions import tokenize_checked
            from clipforge.data.views import augment_shapes_batch, tokenize_text_views

            batch = augment_shapes_batch(batch, self.augmenter, self.seed, indices, self.dataset.held_out)
            if self.tokenizer is not None:
                batch["input_ids"], batch["attention_mask"] = tokenize_checked(self.tokenizer, batch["captions"])
                tokenize_text_views(self.tokenizer, batch)
        # samples are pure functions of their global index: it is the stable key
        batch["keys"] = [f"shapes:{i}" for i in indices]
        return batch


def rank_batch_start(start_sample: int, k: int, batch_size: int, rank: int = 0, world_size: int = 1) -> int:
    """First global sample index of rank ``rank``'s k-th batch (see the module docstring)."""
    return start_sample + k * batch_size * world_size + rank * batch_size


class _EndlessBatchIndices(Sampler):
    """0, 1, 2, ... forever: the batch numbers of an unbounded stream."""

    def __iter__(self) -> Iterator[int]:
        return itertools.count()


def build_train_loader(
    data_cfg: DataConfig,
    image_size: int,
    tokenizer,
    start_sample: int = 0,
    *,
    pin_memory: bool = False,
    prefetch_batches: int = 4,
    rank: int = 0,
    world_size: int = 1,
    data_state: dict | None = None,
) -> Iterator[dict]:
    """Endless iterator of training batches starting at global sample ``start_sample``.

    ``rank`` / ``world_size`` shard the stream between data-parallel processes; the DataLoader
    then splits this rank's batches between its workers.
    """
    if start_sample < 0:
        raise ValueError(f"start_sample must be >= 0, got {start_sample}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    if data_cfg.train != "shapes":
        # sources on disk (wds:, jsonl:, csv:, imagefolder:, mixtures): planned per (rank, worker) slot;
        # ``data_state`` is the returned loader's state_dict() from a checkpoint (exact resume)
        from clipforge.data.pipeline import build_source_train_loader

        return build_source_train_loader(data_cfg, image_size, tokenizer, start_sample, rank=rank,
                                         world_size=world_size, state=data_state, pin_memory=pin_memory,
                                         prefetch_batches=prefetch_batches)
    from clipforge.data.pipeline import sub_caption_plan
    from clipforge.data.pipeline import leave_stop_signals_to_the_trainer
    from clipforge.data.views import SampleAugmenter

    kept = None
    if data_cfg.keep:
        from clipforge.data.keep import read_keep_list, shapes_indices

        kept = shapes_indices(read_keep_list(data_cfg.keep))
    shapes = data_cfg.shapes
    plain = shapes.captions == "raw" and shapes.raw_caption_noise == 0 and data_cfg.sub_captions == 0
    batches = _BatchDataset(build_train_dataset(data_cfg, image_size), tokenizer, data_cfg.batch_size,
                            start_sample, rank, world_size, kept,
                            None if plain else sub_caption_plan(data_cfg),
                            SampleAugmenter.from_config(data_cfg, image_size), data_cfg.seed)
    workers = data_cfg.num_workers
    loader = DataLoader(
        batches,
        batch_size=None,  # items already are batches
        sampler=_EndlessBatchIndices(),
        # a private generator: creating the iterator must not draw from the global torch RNG,
        # which patch dropout uses and which a resumed run restores from the checkpoint
        generator=torch.Generator().manual_seed(data_cfg.seed),
        num_workers=workers,
        worker_init_fn=leave_stop_signals_to_the_trainer,  # the trainer saves on SIGTERM to the group
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        # prefetch_factor counts items per worker; keep about prefetch_batches in flight overall
        prefetch_factor=max(2, -(-prefetch_batches // workers)) if workers > 0 else None,
    )
    return iter(loader)


def eval_batches(dataset: ShapesDataset, batch_size: int, tokenizer=None) -> Iterator[dict]:
    """Iterate a finite eval split in order, as batch dicts (with ``captions`` kept)."""
    for first in range(0, len(dataset), batch_size):
        yield make_batch(dataset, list(range(first, min(first + batch_size, len(dataset)))), tokenizer)
