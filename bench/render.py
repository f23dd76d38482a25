"""Rendering and loading throughput of the built-in shapes data; prints one JSON object.

    python bench/render.py [--repeats 7] [--images 2000]

Rendering is measured on ONE core (torch and numpy pinned to one thread) and reported as the
median over repeats, because the data must never be what a small CPU run waits on.
"""

from __future__ import annotations

import argparse
import json
import os

# pin BLAS/OpenMP pools before numpy and torch start them
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"

import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from clipforge.config import DataConfig, ShapesConfig  # noqa: E402
from clipforge.data.loader import build_train_loader, caption_corpus_for  # noqa: E402
from clipforge.data.synthetic import ShapesDataset  # noqa: E402
from clipforge.models.tokenizer import BPETokenizer  # noqa: E402


def images_per_second(dataset: ShapesDataset, n_images: int, repeats: int) -> float:
    """Median rate of ``render_batch`` over ``repeats`` fresh index ranges (after a warm-up)."""
    dataset.render_batch(range(n_images))  # warm the alpha-mask cache
    rates = []
    for r in range(repeats):
        first = (r + 1) * n_images
        start = time.perf_counter()
        dataset.render_batch(range(first, first + n_images))
        rates.append(n_images / (time.perf_counter() - start))
    return statistics.median(rates)


def tokenize_per_second(tokenizer: BPETokenizer, captions: list[str], repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(captions), 128):
            tokenizer(captions[i : i + 128])
        rates.append(len(captions) / (time.perf_counter() - start))
    return statistics.median(rates)


def loader_samples_per_second(data: DataConfig, tokenizer: BPETokenizer, n_batches: int) -> float:
    loader = build_train_loader(data, 64, tokenizer)
    next(loader)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(n_batches):
        next(loader)
    return n_batches * data.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    result = {}
    for size in (64, 32):
        ds = ShapesDataset(ShapesConfig(), size, seed=0, split="train")
        result[f"images_per_s_one_core_{size}px"] = round(images_per_second(ds, args.images, args.repeats))
    busy = ShapesConfig(two_objects_prob=0.5, textured_background_prob=0.5)
    result["images_per_s_one_core_64px_two_objects_textured"] = round(
        images_per_second(ShapesDataset(busy, 64, seed=0, split="train"), args.images, args.repeats)
    )
    data = DataConfig()
    tokenizer = BPETokenizer.train(caption_corpus_for(data, data.tokenizer.corpus_size), data.tokenizer.vocab_size, 32)
    captions = ShapesDataset(ShapesConfig(), 64, seed=0).render_batch(range(args.images))[1]
    result["captions_tokenized_per_s_one_core"] = round(tokenize_per_second(tokenizer, captions, args.repeats))
    for workers in (0, 1):
        cfg = data.model_copy(update={"num_workers": workers})
        result[f"loader_samples_per_s_64px_workers{workers}"] = round(loader_samples_per_second(cfg, tokenizer, 20))
    result["repeats"] = args.repeats
    result["images_per_repeat"] = args.images
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
