"""Decoded + augmented images/s per data worker from JPEG WebDataset shards: clipforge vs OpenCLIP 3.3.0.

Both pipelines read the same tar shards in one process on one thread (what one DataLoader worker
does), interleaved round by round (A B, B A, ...), and produce training batches:

- clipforge: ``build_source_train_loader`` (epoch mode): tar read, block shuffle, caption check,
  JPEG draft decode + random-resized crop (scale 0.9-1) + bicubic resize in one pass -> uint8,
  BPE tokenization. Normalisation is left to the device.
- OpenCLIP: ``open_clip_train.data.get_wds_dataset`` with its default training transform
  (``open_clip.image_transform(size, is_train=True)``: RandomResizedCrop(0.9-1, bicubic), RGB,
  ToTensor, Normalize) and its tokenizer.

    .venv/bin/python bench/data_loader.py --rounds 7

Prints one JSON object; the headline is the median over rounds of ours / OpenCLIP in the same round.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A smooth colour field with edges and noise: compresses like a photo, not like a flat colour."""
    low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image).astype(np.int16)
    pixels += rng.integers(-12, 13, pixels.shape, dtype=np.int16)
    x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
    pixels[y0: y0 + height // 3, x0: x0 + width // 3] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_jpeg_shards(folder: Path, count: int, sides: tuple[int, int], per_shard: int, seed: int = 0) -> str:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes, shards = {}, -(-count // per_shard)
    for s in range(shards):
        name = f"{s:05d}.tar"
        with wds.TarWriter(str(folder / name)) as w:
            n = min(per_shard, count - s * per_shard)
            for i in range(n):
                width, height = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
                w.write({"__key__": f"{s * per_shard + i:09d}", "jpg": synthetic_jpeg(rng, width, height),
                         "txt": f"a photo of thing number {i} with colour {i % 7}"})
        sizes[name] = n
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


def ours(pattern: str, size: int, batch: int):
    from clipforge.config import DataConfig
    from clipforge.data.pipeline import build_source_train_loader
    from clipforge.models.tokenizer import BPETokenizer

    tokenizer = BPETokenizer.train([f"a photo of thing number {i} with colour {i % 7}" for i in range(200)], 300, 77)
    cfg = DataConfig(train=f"wds:{pattern}", batch_size=batch, num_workers=0, shuffle_buffer=1000)
    return build_source_train_loader(cfg, size, tokenizer)


def openclip(pattern: str, size: int, batch: int, count: int):
    import open_clip
    from open_clip_train.data import get_wds_dataset

    args = SimpleNamespace(train_data=pattern, val_data=None, dataset_resampled=False, train_num_samples=count,
                           train_data_upsampling_factors=None, seed=0, batch_size=batch, world_size=1, workers=0)
    transform = open_clip.image_transform(size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    def endless():
        epoch = 0
        while True:
            info = get_wds_dataset(args, transform, is_train=True, epoch=epoch, tokenizer=tokenizer)
            yield from info.dataloader
            epoch += 1

    return endless()


def time_batches(it, n: int, batch: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch / (time.perf_counter() - t0)


def summary(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"median": round(med, 1), "min": round(min(values), 1), "max": round(max(values), 1),
            "spread_pct": round(100 * (max(values) - min(values)) / med, 1), "rounds": [round(v, 1) for v in values]}


def bench_size(tmp: Path, size: int, sides: tuple[int, int], count: int, batch: int, rounds: int, per_round: int) -> dict:
    pattern = write_jpeg_shards(tmp / f"s{size}", count, sides, per_shard=max(batch, count // 8))
    runners = {"clipforge": ours(pattern, size, batch), "openclip": openclip(pattern, size, batch, count)}
    for it in runners.values():  # warm-up: open shards, fill buffers, first decodes
        time_batches(it, 2, batch)
    results: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            results[name].append(time_batches(runners[name], per_round, batch))
    ratios = [a / b for a, b in zip(results["clipforge"], results["openclip"])]
    return {"image_size": size, "source_jpeg_sides": list(sides), "images_in_shards": count,
            "img_per_s_per_worker": {k: summary(v) for k, v in results.items()},
            "ratio_per_round": summary(ratios) | {"median": round(statistics.median(ratios), 2)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--per-round", type=int, default=4, help="batches per pipeline per round")
    a = p.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker runs one thread
    import open_clip
    import PIL

    with tempfile.TemporaryDirectory() as tmp:
        cases = [bench_size(Path(tmp), 64, (64, 160), 1200, a.batch, a.rounds, a.per_round),
                 bench_size(Path(tmp), 224, (256, 512), 600, a.batch, a.rounds, a.per_round)]
    print(json.dumps({"bench": "data_loader", "torch": torch.__version__, "pillow": PIL.__version__,
                      "openclip_version": open_clip.__version__, "threads": 1, "batch": a.batch,
                      "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
