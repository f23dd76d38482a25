"""Write WebDataset shards from tables or folders, and inspect shards (``clipforge data shard|inspect``).

Shards use the img2dataset layout, so OpenCLIP and webdataset read them too::

    out/00000.tar      000000000.jpg  000000000.txt  000000000.json  000000001.png ...
    out/sizes.json     {"00000.tar": 10000, ...}      (samples per shard; the loader plans epochs from it)
    out/stats.json     totals, skipped inputs per reason, caption-length and image-size summaries

``.txt`` holds the (first) caption; ``.json`` the metadata: caption, source path, image size,
label and class name, and, when the input's caption is a list, ``"captions": [...]`` with all
of them. The loader reads that list when present (``data.captions_per_sample`` draws from it).

Images are copied byte for byte (JPEG/PNG/WebP; other formats are re-encoded as PNG) after a
full decode check, so an unreadable input is skipped and counted instead of landing in a shard.
Samples are shuffled (seeded) before writing: an image folder lists one class after another, and
shards of a single class would make every training batch nearly single-class.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from clipforge.data.augment import decode_crop_resize
from clipforge.data.mixture import parse_train_spec
from clipforge.data.pipeline import (
    IMAGE_SUFFIXES,
    SIZES_FILE,
    _caption_choices,
    _caption_text,
    _image_bytes,
    image_error_reason,
    require_webdataset,
    tar_caption,
    tar_samples,
    ImageFolderSource,
    TableSource,
)
from clipforge.data.sources import DECODE_ERRORS, DataError

STATS_FILE = "stats.json"
CAPTION_BINS = (0, 1, 3, 5, 8, 12, 16, 24, 32, 48, 64, 128, 10**9)  # word-count histogram edges
_FORMAT_SUFFIX = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


# ----------------------------------------------------------------------------- shared helpers
def _lines_kept(text: str) -> str:
    """A caption cleaned as the loader cleans it (whitespace runs -> one space), but line by line."""
    return "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def caption_histogram(word_counts: list[int]) -> dict[str, int]:
    """Word counts -> {"0": n, "1-2": n, ...} over CAPTION_BINS (empty bins left out)."""
    counts, _ = np.histogram(word_counts, bins=CAPTION_BINS)
    out = {}
    for lo, hi, n in zip(CAPTION_BINS[:-1], CAPTION_BINS[1:], counts):
        if n:
            out[f"{lo}" if hi == lo + 1 else (f"{lo}+" if hi == CAPTION_BINS[-1] else f"{lo}-{hi - 1}")] = int(n)
    return out


def caption_summary(word_counts: list[int]) -> dict:
    if not word_counts:
        return {"count": 0}
    a = np.asarray(word_counts)
    return {"count": int(a.size), "mean_words": round(float(a.mean()), 2), "min_words": int(a.min()),
            "max_words": int(a.max()), "histogram": caption_histogram(word_counts)}


def caption_list_summary(list_lengths: list[int]) -> dict:
    """Samples whose caption is a list (``.json`` "captions") and how many captions they have."""
    if not list_lengths:
        return {"samples": 0}
    counts = Counter(list_lengths)
    return {"samples": len(list_lengths), "mean_captions": round(float(np.mean(list_lengths)), 2),
            "captions_per_sample": {str(k): counts[k] for k in sorted(counts)}}


def check_image(data: bytes) -> tuple[str, tuple[int, int]] | str:
    """(suffix to store it under, size) if Pillow decodes ``data`` completely, else the skip reason."""
    if not data:
        return "empty_image"
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, size = image.format, image.size
            image.load()
    except DECODE_ERRORS as e:
        return image_error_reason(data, e)
    return _FORMAT_SUFFIX.get(fmt, "png"), size


def _as_png(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()


# ----------------------------------------------------------------------------- writer
@dataclass
class _Input:
    image: str | None  # file path
    caption: object  # str or list of str
    label: int
    classname: str | None


def _inputs_of(spec: str, caption_template: str, caption_key: str | None = None) -> tuple[list[_Input], str]:
    from clipforge.config import DataConfig
    from clipforge.data.dedup import check_source

    check_source(spec)
    sources = parse_train_spec(spec)
    if len(sources) != 1 or sources[0].kind not in ("jsonl", "csv", "imagefolder"):
        raise DataError(f"clipforge data shard reads one jsonl:FILE, csv:FILE or imagefolder:DIR, got '{spec}'")
    s = sources[0]
    if s.kind == "imagefolder":
        folder = ImageFolderSource(s, caption_template)
        return [_Input(p, caption_template.format(folder.classnames[l]), l, folder.classnames[l])
                for p, l in zip(folder.paths, folder.labels)], str(s)
    try:
        table = TableSource(s, DataConfig(train=str(s), caption_key=caption_key))
    except DataError as e:  # the loader's words name recipe keys; data shard takes an option instead
        raise DataError(str(e).replace("data.caption_key", "--caption-key").replace(
            ", or name a class column with data.label_key to caption images with data.caption_template", "")) from None
    return [_Input(p, c, -1, None) for p, c in zip(table.paths, table.caption_list)], str(s)


def write_shards(
    spec: str,
    out_dir: str | Path,
    samples_per_shard: int = 10000,
    *,
    caption_template: str = "a photo of a {}.",
    caption_key: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write ``spec`` (jsonl:/csv:/imagefolder:) as tar shards + sizes.json + stats.json; returns the stats."""
    require_webdataset()
    import webdataset as wds

    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    inputs, source = _inputs_of(spec, caption_template, caption_key)
    out = Path(out_dir)
    if out.exists() and any(out.glob("*.tar")):
        raise DataError(f"{out} already holds .tar shards; choose an empty --out directory")
    out.mkdir(parents=True, exist_ok=True)
    order = list(range(len(inputs)))
    if shuffle:
        random.Random(seed).shuffle(order)
    sizes: dict[str, int] = {}
    skipped: Counter = Counter()
    words, widths, heights, list_lengths = [], [], [], []
    writer, shard_name, written = None, None, 0
    for done, i in enumerate(order, 1):
        item = inputs[i]
        caption = _caption_text(item.caption, None)
        data = _image_bytes(item.image)
        checked = check_image(data) if not isinstance(data, tuple) else data[0]
        reason = caption[0] if isinstance(caption, tuple) else (checked if isinstance(checked, str) else None)
        if reason:
            skipped[reason] += 1
        else:
            suffix, (w, h) = checked
            if suffix == "png" and not data[:8] == b"\x89PNG\r\n\x1a\n":
                data = _as_png(data)  # BMP/GIF/TIFF: store in a format every reader decodes
            if writer is None or sizes[shard_name] == samples_per_shard:
                if writer is not None:
                    writer.close()
                shard_name = f"{len(sizes):05d}.tar"
                sizes[shard_name] = 0
                writer = wds.TarWriter(str(out / shard_name))
            meta = {"caption": caption, "source": str(item.image), "width": w, "height": h}
            if isinstance(item.caption, list):  # the whole list, cleaned as the loader would; .txt is its first
                meta["captions"] = [_lines_kept(c) for c in _caption_choices(item.caption)]
                list_lengths.append(len(meta["captions"]))
            elif isinstance(item.caption, str) and "\n" in item.caption.strip():
                # a long caption with one sentence a line: the .json keeps its line breaks (sentence ends
                # for data.sub_captions); the .txt has it on one line, as every caption
                meta["captions"] = [_lines_kept(item.caption)]
            if item.label >= 0:
                meta.update(label=item.label, classname=item.classname)
            writer.write({"__key__": f"{written:09d}", suffix: data, "txt": caption, "json": meta})
            sizes[shard_name] += 1
            written += 1
            words.append(len(caption.split()))
            widths.append(w), heights.append(h)
        if progress is not None:
            progress(done, len(order))
    if writer is not None:
        writer.close()
    if not written:
        raise DataError(f"{source}: none of the {len(inputs)} inputs was readable ({dict(skipped)}); nothing written")
    stats = {
        "source": source, "samples": written, "shards": len(sizes), "samples_per_shard": samples_per_shard,
        "inputs": len(inputs), "skipped": dict(sorted(skipped.items())), "shuffled": shuffle, "seed": seed,
        "captions": caption_summary(words), "caption_lists": caption_list_summary(list_lengths),
        "image_size": {"mean_width": round(float(np.mean(widths)), 1), "mean_height": round(float(np.mean(heights)), 1),
                       "min_side": int(min(min(widths), min(heights))), "max_side": int(max(max(widths), max(heights)))},
    }
    (out / SIZES_FILE).write_text(json.dumps(sizes, indent=1))
    (out / STATS_FILE).write_text(json.dumps(stats, indent=1))
    return stats


# ----------------------------------------------------------------------------- inspector
def shard_urls(target: str | Path) -> list[str]:
    """A directory (its *.tar, sorted), a ``wds:`` spec, or a brace pattern -> shard paths/URLs."""
    text = str(target)
    kind = text.partition(":")[0]
    if kind in ("jsonl", "csv", "imagefolder", "shapes") or text == "shapes":
        raise DataError(f"data inspect reads WebDataset shards (a directory of .tar files or 'wds:PATTERN'), not "
                        f"{text}; run `clipforge data shard {text} --out DIR` (it checks every input and reports "
                        "the unreadable ones), then inspect DIR")
    if text.startswith("wds:"):
        text = text[4:]
    path = Path(text)
    if not path.exists() and "{" not in text and "://" not in text and not text.startswith("pipe:"):
        raise FileNotFoundError(f"shards not found: {text}; pass a directory of .tar shards or a pattern such as "
                                "'wds:/data/{00000..00099}.tar'")
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        sizes = path / SIZES_FILE
        if sizes.is_file():  # shards that sizes.json names but that are gone are reported as missing
            try:
                urls = sorted(set(urls) | {str(path / name) for name in json.loads(sizes.read_text())})
            except (ValueError, TypeError):
                pass
        if not urls:
            raise DataError(f"{path} holds no .tar files")
        return urls
    from webdataset.shardlists import expand_urls

    return expand_urls(text)


def _read_shard(url: str) -> Iterator[dict[str, bytes] | str]:
    """A shard's samples, then a final string naming the failure if it could not be read to the end."""
    from webdataset.gopen import gopen

    seen = 0
    try:
        stream = gopen(url)
    except FileNotFoundError:
        yield "missing_shard"
        return
    try:
        for files in tar_samples(stream):
            seen += 1
            yield files
    except (tarfile.TarError, OSError, EOFError, ValueError):
        yield "missing_shard" if seen == 0 else "truncated_tar"
    finally:
        try:
            stream.close()
        except Exception:
            pass


def inspect_shards(
    target: str | Path,
    out_dir: str | Path | None = None,
    *,
    grid: int = 16,
    grid_size: int = 96,
    write_sizes: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Read every sample of every shard: counts, unreadable samples per reason, caption lengths, a grid PNG."""
    if grid < 0:
        raise DataError(f"--grid is the number of samples shown in samples.png, >= 0 (0: none); got {grid}")
    urls = shard_urls(target)
    expected = _expected_sizes(urls)
    shards, skipped, words, examples, list_lengths = [], Counter(), [], [], []
    for n, url in enumerate(urls, 1):
        record = {"shard": url, "samples": 0, "readable": 0, "skipped": {}}
        bad: Counter = Counter()
        for item in _read_shard(url):
            if isinstance(item, str):
                record["error"] = item
                continue
            record["samples"] += 1
            reason, example = _check_sample(item, grid_size if len(examples) < grid else None)
            if reason:
                bad[reason] += 1
                continue
            record["readable"] += 1
            words.append(len(example[1].split()))
            if example[2]:
                list_lengths.append(example[2])
            if example[0] is not None:
                examples.append(example)
        name = Path(url).name
        if name in expected:
            record["expected"] = expected[name]
            lost = expected[name] - record["samples"]
            if lost > 0:
                bad[record.get("error", "truncated_tar")] += lost
        elif record.get("error") == "missing_shard":
            bad["missing_shard"] += 1  # unknown size: count the shard
        record["skipped"] = dict(bad)
        skipped.update(bad)
        shards.append(record)
        if progress is not None:
            progress(n, len(urls))
    report = {
        "shards": len(urls), "samples": sum(r["samples"] for r in shards),
        "readable": sum(r["readable"] for r in shards), "skipped": dict(sorted(skipped.items())),
        "bad_shards": [r["shard"] for r in shards if r["skipped"] or "error" in r],
        "captions": caption_summary(words), "caption_lists": caption_list_summary(list_lengths), "per_shard": shards,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if examples:
            report["grid"] = str(save_grid(examples, out / "samples.png"))
        (out / "inspect.json").write_text(json.dumps(report, indent=1))
        report["report"] = str(out / "inspect.json")
    if write_sizes:
        report["sizes_file"] = str(_write_sizes(urls, shards))
    return report


def _expected_sizes(urls: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for f in sorted({Path(u).parent / SIZES_FILE for u in urls}):
        if f.is_file():
            try:
                found.update({str(k): int(v) for k, v in json.loads(f.read_text()).items()})
            except (ValueError, AttributeError):
                pass
    return found


def _check_sample(files: dict[str, bytes], thumb: int | None):
    image = next((files[s] for s in IMAGE_SUFFIXES if s in files), None)
    if image is None:
        return "missing_image", None
    value = tar_caption(files)  # the .json caption list when there is one, as the loader reads it
    caption = _caption_text(value, None)
    if isinstance(caption, tuple):
        return caption[0], None
    listed = len(_caption_choices(value)) if isinstance(value, list) else 0
    if not image:
        return "empty_image", None
    try:
        # a thumbnail for the grid doubles as the decode check (draft mode keeps it cheap)
        pixels = decode_crop_resize(image, thumb or 32, None)
    except DECODE_ERRORS as e:
        return image_error_reason(image, e), None
    return None, (pixels if thumb else None, caption, listed)


def save_grid(examples: list[tuple], path: Path, columns: int = 4) -> Path:
    """Thumbnails with their captions (wrapped) as one PNG; (pixels, caption[, captions in its list]) each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import textwrap

    rows = -(-len(examples) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (pixels, caption, *listed) in zip(axes.flat, examples):
        if listed and listed[0] > 1:  # a caption list: its first caption and how many more it holds
            caption = f"{caption} (+{listed[0] - 1} more)"
        ax.imshow(pixels.permute(1, 2, 0).numpy())
        ax.set_title("\n".join(textwrap.wrap(caption, 28)[:3]), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _write_sizes(urls: list[str], shards: list[dict]) -> Path:
    dirs = {Path(u).parent for u in urls}
    if len(dirs) != 1:
        raise DataError("--write-sizes needs all shards in one directory")
    path = next(iter(dirs)) / SIZES_FILE
    path.write_text(json.dumps({Path(r["shard"]).name: r["samples"] for r in shards}, indent=1))
    return path
