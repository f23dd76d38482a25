"""Small data sets built on the fly for the data tests: images, tables, folders, tar shards, faults."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(i: int, size=(40, 32), quality=90) -> bytes:
    """A JPEG whose colour encodes i (so decoded images differ per sample)."""
    rng = np.random.default_rng(i)
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)
    pixels[: size[1] // 2] //= 2  # some structure for crops to see
    pixels += rng.integers(0, 8, pixels.shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(rgba=(255, 0, 0, 0), size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, rgba).save(buf, format="PNG")
    return buf.getvalue()


def write_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"img{i:04d}.jpg"
        p.write_bytes(jpeg_bytes(i))
        paths.append(p)
    return paths


def write_jsonl(root: Path, n: int, name: str = "pairs.jsonl", start: int = 0) -> Path:
    """root/images/img*.jpg + root/<name> with relative image paths and captions 'picture i'."""
    paths = write_images(root / "images", n, start)
    table = root / name
    table.write_text("".join(json.dumps({"image": f"images/{p.name}", "text": f"picture {start + i}"}) + "\n"
                             for i, p in enumerate(paths)))
    return table


def write_csv(root: Path, n: int) -> Path:
    paths = write_images(root / "images", n)
    table = root / "pairs.csv"
    table.write_text("filepath,caption\n" + "".join(f"images/{p.name},picture {i}\n" for i, p in enumerate(paths)))
    return table


def write_folder(root: Path, classes=("cat", "dog", "pickup_truck"), per_class: int = 4) -> Path:
    for c, name in enumerate(classes):
        write_images(root / name, per_class, start=100 * c)
    return root


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """A shard from {"__key__": str, suffix: bytes, ...} dicts (no checks: faults go in as given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for suffix, data in s.items():
                if suffix == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good_sample(i: int) -> dict[str, bytes]:
    return {"__key__": f"{i:06d}", "jpg": jpeg_bytes(i), "txt": f"picture {i}".encode(), "json": b"{}"}


def write_good_shards(folder: Path, shards: int, per_shard: int) -> Path:
    sizes = {}
    for s in range(shards):
        name = f"{s:05d}.tar"
        write_tar(folder / name, [good_sample(s * per_shard + i) for i in range(per_shard)])
        sizes[name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return folder


FAULTS = ("truncated_image", "empty_image", "missing_caption", "non_utf8_caption", "missing_shard", "truncated_tar")


def write_faulty_shards(folder: Path, per_shard: int = 20) -> dict[str, int]:
    """Five shards: 00000 has one sample of each per-sample fault, 00003 is missing, 00004 is cut mid-way.

    Returns the expected skip count per reason.
    """
    sizes = {}
    first = [good_sample(i) for i in range(per_shard)]
    first[2]["jpg"] = first[2]["jpg"][: len(first[2]["jpg"]) // 2]  # truncated JPEG
    first[5]["jpg"] = b""  # zero-byte image
    del first[7]["txt"]  # missing caption
    first[11]["txt"] = b"caf\xe9 \xff\xfe"  # Latin-1, not UTF-8
    write_tar(folder / "00000.tar", first)
    for s in (1, 2):
        write_tar(folder / f"{s:05d}.tar", [good_sample(s * per_shard + i) for i in range(per_shard)])
    write_tar(folder / "00004.tar", [good_sample(4 * per_shard + i) for i in range(per_shard)])
    for s in range(5):
        sizes[f"{s:05d}.tar"] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    cut_in_the_middle_of(folder / "00004.tar", sample=per_shard // 2)
    return {"truncated_image": 1, "empty_image": 1, "missing_caption": 1, "non_utf8_caption": 1,
            "missing_shard": per_shard, "truncated_tar": per_shard - per_shard // 2}


def cut_in_the_middle_of(path: Path, sample: int) -> None:
    """Cut a shard half-way through the image of sample ``sample``: samples before it stay whole."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        key = sorted({m.name.split(".")[0] for m in members})[sample]
        member = next(m for m in members if m.name == f"{key}.jpg")
        cut = member.offset_data + member.size // 2
    data = path.read_bytes()
    path.write_bytes(data[:cut])
