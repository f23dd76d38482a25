"""Training batches from data on disk: WebDataset shards, CSV/JSONL tables, image folders, mixtures.

The dataset is a list of *parts* with known sizes: a tar shard is a part of N samples (sizes from
``sizes.json`` or a header scan), a table row or a folder image is a part of one sample. The
sample stream is planned, never discovered, which is what makes the data position exact:

- G = world_size x max(1, num_workers) *slots*; slot ``rank*W + w`` is worker w of that rank.
- **epoch mode**: epoch e permutes the parts (seed, e), concatenates them into one virtual sequence
  of all N samples and gives slot j the contiguous range [j*N/G, (j+1)*N/G). Every sample is read
  exactly once per epoch; a slot reads whole shards front to back (at most one shard is entered
  mid-way), so reads stay sequential.
- **resampled mode**: slot j of virtual epoch e draws parts with replacement (seed, e, j), with
  probability ``weight / samples-in-source`` so that mixture weights are sample fractions, until
  it has ``samples_per_epoch / G`` samples.
- Each slot shuffles its stream in consecutive blocks of ``shuffle_buffer`` undecoded samples
  (permutation seeded by seed, epoch, slot, block). Unlike a rolling buffer, a block shuffle can be
  resumed at any position by re-reading one block.
- A worker forms whole batches from its own slot; the DataLoader takes batches from workers
  round-robin, so the stream is deterministic for a given (seed, num_workers, world_size).
- Batches follow the schema of ``clipforge.data.loader`` (v2): raw ``captions``, stable ``keys``
  (``<shard>/<__key__>``, ``<table>:<line>`` or the row's id, the image folder's relative path),
  ``captions_per_sample`` captions per image with ``text_owner``, and ``weights`` from a table's
  ``weight`` column. Caption draws use the sample's seeded RNG, like its crop: exact on resume.

The cursor of a slot is (epoch, position in its stream); each batch carries its slot's cursor after
its last sample, and ``SourceTrainLoader.state_dict()`` holds the cursors of the batches the
trainer actually consumed. Restoring it continues every slot where it stopped: no sample repeated,
none skipped. Unreadable samples are skipped and counted per reason (they still advance the
cursor); ``metrics()`` reports them and the loader raises ``DataError`` when their fraction passes
``data.max_skip_fraction``.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.config import DataConfig
from clipforge.data.augment import decode_crop_resize
from clipforge.data.mixture import SourceSpec, parse_train_spec
from clipforge.data.sources import (
    CAPTION_COLUMNS,
    DECODE_ERRORS,
    DataError,
    DataSpec,
    _columns_found,
    _image_column,
    caption_cell,
    caption_column,
    _image_path,
    named_column,
    read_image_folder,
    read_table,
    table_labels,
)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # first one present in a tar sample is its image
CAPTION_SUFFIX = "txt"
META_SUFFIX = "json"  # img2dataset metadata; a "captions" list in it (or a bare list) is the sample's caption list
KEY_COLUMNS = ("id", "key")  # jsonl/csv: a stable sample key, first one present
WEIGHT_COLUMN = "weight"  # jsonl/csv: optional per-sample loss weight
SIZES_FILE = "sizes.json"
# skip reasons, as they appear in metrics (data/skipped/<reason>)
SKIP_REASONS = ("missing_image", "empty_image", "truncated_image", "bad_image", "missing_caption",
                "non_utf8_caption", "missing_shard", "truncated_tar")
MIN_SAMPLES_FOR_SKIP_CHECK = 100  # judge the skip rate only once this many samples were read


# ----------------------------------------------------------------------------- raw samples
@dataclass
class RawSample:
    """One sample before decoding: encoded image bytes (or a file path), caption bytes/str/list."""

    uid: int  # stable id of the sample in the whole (mixed) dataset
    image: bytes | str | None = None
    caption: bytes | str | list[str] | None = None
    label: int = -1
    reason: str | None = None  # already known to be unusable (missing shard, cut tar, ...)
    key: str = ""  # stable sample key (see ``batch["keys"]``): the same in every epoch, slot and resume
    weight: float | None = None  # per-sample weight from a table's ``weight`` column


def sample_key(name: str) -> tuple[str | None, str]:
    """``"dir/000123.jpg"`` -> (``"dir/000123"``, ``"jpg"``): the key is the name up to the first dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:
        return None, ""
    return name[:dot], name[dot + 1:].lower()


def _is_meta(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith("__") and base.endswith("__") or base.startswith("_")


def tar_samples(stream) -> Iterator[dict[str, bytes]]:
    """Samples of a tar stream: consecutive members with the same key -> {suffix: bytes, "__key__": key}.

    A sample is yielded once the next key's header arrives (or the tar ends), so a tar cut in the
    middle loses only the sample being read; the error is raised after the complete ones.
    The same rule (``sample_key``) counts shard sizes.
    """
    current: dict[str, bytes] | None = None
    current_key = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg() or _is_meta(info.name):
                continue
            key, suffix = sample_key(info.name)
            if key is None:
                continue
            if key != current_key:
                if current is not None:
                    yield current
                current, current_key = {"__key__": key}, key
            current[suffix] = tar.extractfile(info).read()
            tar.members = []  # streaming: keep no per-member state
    if current is not None:
        yield current


def tar_sample_keys(path: str | Path) -> list[str]:
    """The ``__key__`` of every sample of a local tar, in order (headers only, as ``count_tar_samples``)."""
    keys: list[str] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isreg() or _is_meta(member.name):
                continue
            key, _ = sample_key(member.name)
            if key is not None and (not keys or key != keys[-1]):
                keys.append(key)
    return keys


def count_tar_samples(path: str | Path) -> int:
    """Number of samples in a local tar (headers only: member data is seeked over, not read)."""
    keys, last = 0, None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isreg() or _is_meta(member.name):
                continue
            key, _ = sample_key(member.name)
            if key is not None and key != last:
                keys, last = keys + 1, key
    return keys


# ----------------------------------------------------------------------------- sources
class TarShardSource:
    """``wds:`` WebDataset tar shards (img2dataset layout: key.jpg|png|webp + key.txt [+ key.json])."""

    def __init__(self, spec: SourceSpec, sizes_file: str | None = None) -> None:
        require_webdataset()
        from webdataset.shardlists import expand_urls

        self.spec = spec
        self.urls = expand_urls(spec.target)  # '::' joins patterns, braces expand
        if not self.urls:
            raise DataError(f"{spec}: the pattern expands to no shard")
        self.sizes = np.array(shard_sizes(self.urls, sizes_file, str(spec)), dtype=np.int64)
        self.labels = None
        self.weights = None
        self.kept_positions = None  # data.keep: per shard, the tar-order positions of the kept samples
        # sample keys are "<shard name>/<__key__>"; open_sources() lengthens names that clash
        self.key_names = [Path(p).name for p in self.key_paths()]

    def key_paths(self) -> list[str]:
        """Each shard's own path (no ``file:``, the .tar word of a ``pipe:`` command): what keys are named after."""
        return [_shard_path_of(u).removeprefix("file:") for u in self.urls]

    def __len__(self) -> int:
        return len(self.urls)

    def read(self, part: int, start: int, count: int, uid0: int) -> Iterator[RawSample]:
        """Samples ``start .. start+count-1`` of shard ``part``; always exactly ``count`` items."""
        from webdataset.gopen import gopen  # local paths, file:, pipe:, http(s): ...

        url, done, seen, reason = self.urls[part], 0, 0, None
        # the tar-order positions to yield: start.. of the shard, or of its kept samples (data.keep)
        wanted = range(start, start + count) if self.kept_positions is None else \
            self.kept_positions[part][start:start + count].tolist()
        stream = None
        try:
            stream = gopen(url)
            for i, files in enumerate(tar_samples(stream)):
                seen = i + 1
                if done == count:
                    break
                if i != wanted[done]:
                    continue
                yield _tar_raw(files, uid0 + start + done, self.key_names[part])
                done += 1
        except FileNotFoundError:
            reason = "missing_shard"
        except (tarfile.TarError, OSError, EOFError, ValueError):
            # a stream that fails before its first sample is a missing shard (e.g. pipe: of a missing object)
            reason = "missing_shard" if seen == 0 else "truncated_tar"
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:  # a pipe: command's exit status; the counts below tell the story
                    pass
        if done < count:  # fewer samples than sizes.json promised: count every lost one
            reason = reason or ("missing_shard" if seen == 0 else "truncated_tar")
            for i in range(done, count):
                yield RawSample(uid0 + start + i, reason=reason)

    def captions(self, n: int) -> list[str]:
        """The first ``n`` readable captions, in shard order (for training the tokenizer)."""
        out: list[str] = []
        for part in range(len(self.urls)):
            for raw in self.read(part, 0, int(self.sizes[part]), 0):
                text = _caption_text(raw.caption, None)
                if isinstance(text, str):
                    out.append(text)
                if len(out) >= n:
                    return out
        return out


def require_webdataset() -> None:
    try:
        import webdataset  # noqa: F401
    except ImportError:
        raise DataError("wds: shards need the webdataset package: pip install 'clipforge[data]'") from None


def _tar_raw(files: dict[str, bytes], uid: int, shard_name: str) -> RawSample:
    image = next((files[s] for s in IMAGE_SUFFIXES if s in files), None)
    return RawSample(uid, image=image, caption=tar_caption(files), key=f"{shard_name}/{files.get('__key__', '')}")


def tar_caption(files: dict[str, bytes]) -> bytes | list[str] | None:
    """The caption list of the ``.json`` when it has one (``{"captions": [...]}`` or a bare list), else the ``.txt``."""
    meta = files.get(META_SUFFIX)
    if meta and (b"captions" in meta or meta.lstrip()[:1] == b"["):  # plain metadata is not parsed
        try:
            value = json.loads(meta)
        except (ValueError, UnicodeDecodeError):
            value = None  # unreadable metadata: the .txt still is the caption
        if isinstance(value, dict):
            value = value.get("captions")
        if isinstance(value, list) and any(isinstance(v, str) and v.strip() for v in value):
            return value
    return files.get(CAPTION_SUFFIX)


def shard_sizes(urls: list[str], sizes_file: str | None, what: str) -> list[int]:
    """Samples per shard: from ``sizes_file``, a ``sizes.json`` next to the shards, or a header scan."""
    known: dict[str, int] = {}
    files = [Path(sizes_file)] if sizes_file else sorted({Path(u).parent / SIZES_FILE for u in urls if _is_local(u)})
    for f in files:
        if f.is_file():
            try:
                known.update({str(k): int(v) for k, v in json.loads(f.read_text()).items()})
            except (ValueError, AttributeError) as e:
                raise DataError(f"{f}: not a sizes file ({e}); expected a JSON object {{shard name: samples}}") from None
        elif sizes_file:
            raise DataError(f"data.sizes_file not found: {f}")
    sizes = []
    for url in urls:
        name = Path(_shard_path_of(url)).name
        if name in known:
            sizes.append(known[name])
        elif url in known:
            sizes.append(known[url])
        elif _is_local(url):
            path = Path(url.removeprefix("file:"))
            if not path.is_file():
                raise DataError(
                    f"{what}: shard {path} does not exist and no {SIZES_FILE} lists it; check the pattern "
                    f"(e.g. wds:/data/{{00000..00099}}.tar expands to 00000.tar .. 00099.tar)"
                )
            try:
                sizes.append(count_tar_samples(path))
            except (tarfile.TarError, OSError, EOFError) as e:
                warnings.warn(f"shard {path} cannot be scanned ({e}); it counts as empty. "
                              f"Write a {SIZES_FILE} with `clipforge data inspect DIR --write-sizes`")
                sizes.append(0)
        else:
            raise DataError(
                f"{what}: no sample count for {url}; the loader plans epochs from shard sizes. Pass "
                f"data.sizes_file=PATH to a JSON object {{\"{name}\": samples, ...}} (OpenCLIP's sizes.json format)"
            )
    return sizes


def _shard_path_of(url: str) -> str:
    """The shard's own path in a URL or a ``pipe:`` command (the word ending in .tar)."""
    if not url.startswith("pipe:"):
        return url
    words = url[5:].split()
    return next((w for w in reversed(words) if w.endswith(".tar")), words[-1] if words else url)


def _is_local(url: str) -> bool:
    return url.startswith("file:") or "://" not in url and not url.startswith("pipe:")


class TableSource:
    """``csv:`` / ``jsonl:`` rows with an image path (relative to the table) and a caption (or a list).

    Optional columns: ``id``/``key`` (the sample key; else ``<file name>:<line>``) and ``weight``.
    ``data.image_key`` / ``caption_key`` / ``label_key`` name the columns and ``data.csv_separator``
    the CSV separator (see ``DataConfig``); with a label column, ``labels`` are class indices
    (sorted class names, or integer ids as they are) and a table without captions gets
    ``data.caption_template`` filled with the class name, as an image folder does.
    """

    def __init__(self, spec: SourceSpec, data_cfg: DataConfig | None = None) -> None:
        cfg = data_cfg or DataConfig()
        self.spec = spec
        path = Path(spec.target).expanduser()
        rows = read_table(DataSpec(spec.kind, path), cfg.csv_separator)
        column = _image_column(rows, path, cfg.image_key)
        caption_col = caption_column(rows, path, cfg.caption_key)
        self.labels = self.classnames = None
        if cfg.label_key is not None:
            self.labels, self.classnames = table_labels(rows, named_column(rows, path, cfg.label_key, "data.label_key"),
                                                        path)
        if caption_col is None and self.labels is None:
            raise DataError(f"{path}: training needs a caption column, one of {', '.join(CAPTION_COLUMNS)} "
                            f"(found {_columns_found(rows, path)}); name another with data.caption_key, or name a "
                            "class column with data.label_key to caption images with data.caption_template")
        self.paths = [_row_path(r, column, path) for r in rows]
        if caption_col is None:  # labels only: the class name fills the template, as for an image folder
            self.caption_list = [cfg.caption_template.format(self.classnames[i]) for i in self.labels]
        else:
            self.caption_list = [r.get(caption_col) for r in rows]
        if spec.kind == "csv" and caption_col is not None:  # a cell may hold a JSON list of captions
            self.caption_list = [caption_cell(c) for c in self.caption_list]
        self.sizes = np.ones(len(rows), dtype=np.int64)
        self.ids = [_row_id(r) for r in rows]
        self.lines = [int(r["_line"]) for r in rows]
        self.weights = [_row_weight(r, path) for r in rows] if WEIGHT_COLUMN in rows[0] else None
        self.key_name = path.name  # open_sources() lengthens it when two tables share a file name

    def key_paths(self) -> list[str]:
        return [self.spec.target]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, part: int, start: int, count: int, uid0: int) -> Iterator[RawSample]:
        path = self.paths[part]
        key = self.ids[part] or f"{self.key_name}:{self.lines[part]}"
        yield RawSample(uid0, image=path, caption=self.caption_list[part], reason=None if path else "missing_image",
                        label=-1 if self.labels is None else self.labels[part],
                        key=key, weight=None if self.weights is None else self.weights[part])

    def captions(self, n: int) -> list[str]:
        out = [_caption_text(c, random.Random(0)) for c in self.caption_list[: 2 * n]]
        return [c for c in out if isinstance(c, str)][:n]


def _row_id(row: dict) -> str | None:
    for column in KEY_COLUMNS:
        value = row.get(column)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return None


def _row_weight(row: dict, table: Path) -> float:
    value = row.get(WEIGHT_COLUMN)
    try:
        if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError
        weight = float(value)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise DataError(f"{table}, line {row['_line']}: '{WEIGHT_COLUMN}' must be a number >= 0, got {value!r}; "
                        f"give every row a weight or drop the column") from None
    return weight


def _row_path(row: dict, column: str, table: Path) -> str | None:
    try:
        return str(_image_path(row, column, table))
    except DataError:
        return None  # a row without an image path is skipped and counted, not fatal


class ImageFolderSource:
    """``imagefolder:DIR``: DIR/<class>/*.jpg, caption = ``data.caption_template`` filled with the class name."""

    def __init__(self, spec: SourceSpec, template: str) -> None:
        self.spec = spec
        data = read_image_folder(Path(spec.target).expanduser())
        self.paths = [str(p) for p in data.paths]
        self.labels = list(data.labels)
        self.classnames = data.classnames
        self.template = template
        self.sizes = np.ones(len(self.paths), dtype=np.int64)
        self.weights = None
        root = Path(spec.target).expanduser()
        # keys: the path relative to DIR ("cat/001.jpg"), always with "/" whatever the OS
        self.rel_paths = [Path(p).relative_to(root).as_posix() for p in data.paths]
        self.key_name = ""  # open_sources() sets "<folder name>/" when a mixture holds several image folders

    def key_paths(self) -> list[str]:
        return [self.spec.target]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, part: int, start: int, count: int, uid0: int) -> Iterator[RawSample]:
        label = self.labels[part]
        yield RawSample(uid0, image=self.paths[part], caption=self.template.format(self.classnames[label]), label=label,
                        key=self.key_name + self.rel_paths[part])

    def captions(self, n: int) -> list[str]:
        return [self.template.format(c) for c in self.classnames]


def open_source(spec: SourceSpec, data_cfg: DataConfig):
    if spec.kind == "wds":
        return TarShardSource(spec, data_cfg.sizes_file)
    if spec.kind in ("csv", "jsonl"):
        return TableSource(spec, data_cfg)
    if spec.kind == "imagefolder":
        return ImageFolderSource(spec, data_cfg.caption_template)
    raise DataError(f"source '{spec}' cannot be read from disk")  # shapes goes through data.loader


def open_sources(specs: list[SourceSpec], data_cfg: DataConfig) -> list:
    """Every source of ``data.train``, with sample-key names that tell its shards / tables / folders apart.

    A key names its shard or table by file name ("00000.tar/000000123", "pairs.jsonl:7") so that it
    survives moving the data (e.g. to a node's local disk); when two shards or tables of the same
    ``data.train`` share a file name, as many parent folders are added as it takes to tell them
    apart ("cc3m/00000.tar/..." and "cc12m/00000.tar/...").
    """
    sources = [open_source(s, data_cfg) for s in specs]
    for kinds in (("wds",), ("jsonl", "csv"), ("imagefolder",)):
        group = [src for src, spec in zip(sources, specs) if spec.kind in kinds]
        paths = [p for src in group for p in src.key_paths()]
        names = iter(unique_suffixes(paths))
        for src in group:
            if isinstance(src, TarShardSource):
                src.key_names = [next(names) for _ in src.urls]
            elif isinstance(src, ImageFolderSource):
                name = next(names)
                src.key_name = f"{name}/" if len(group) > 1 else ""  # one folder: keys are its relative paths
            else:
                src.key_name = next(names)
    if data_cfg.keep:  # a subset by sample key, without rewriting anything (clipforge.data.keep)
        from clipforge.data.keep import filter_sources, read_keep_list

        filter_sources(sources, set(read_keep_list(data_cfg.keep)))
    return sources


def unique_suffixes(paths: list[str]) -> list[str]:
    """For each path the fewest trailing components that no *other* path of the list ends with."""
    split = [tuple(p for p in path.replace("\\", "/").split("/") if p not in ("", ".")) or (path,) for path in paths]
    distinct = set(split)  # the same shard listed twice is the same data: same key
    names: dict[tuple, str] = {}
    n = 1
    while len(names) < len(distinct):  # one pass per folder level: linear in the number of shards
        counts = Counter(t[-n:] for t in distinct)
        for t in distinct:
            if t not in names and (counts[t[-n:]] == 1 or n >= len(t)):
                names[t] = "/".join(t[-n:])
        n += 1
    return [names[t] for t in split]


# ----------------------------------------------------------------------------- the part index
class PartIndex:
    """Every part of every source in one table: source id, part id in the source, size, uid offset, draw weight."""

    def __init__(self, sources: list, specs: list[SourceSpec]) -> None:
        self.sources = sources
        self.part_source = np.concatenate([np.full(len(s.sizes), i, dtype=np.int64) for i, s in enumerate(sources)])
        self.part_local = np.concatenate([np.arange(len(s.sizes), dtype=np.int64) for s in sources])
        self.part_size = np.concatenate([s.sizes for s in sources]).astype(np.int64)
        self.part_uid = np.concatenate([[0], np.cumsum(self.part_size)[:-1]]).astype(np.int64)
        self.total = int(self.part_size.sum())
        # P(part) = weight / samples-in-source: a source's expected share of samples is its weight
        weights = np.concatenate([
            np.full(len(s.sizes), spec.weight / max(1, int(s.sizes.sum())), dtype=np.float64)
            for s, spec in zip(sources, specs)
        ]) * (self.part_size > 0)
        self.draw_p = weights / weights.sum() if weights.sum() > 0 else weights
        # one source with a weight column gives every batch weights (1.0 for the other sources' samples)
        self.has_weights = any(getattr(s, "weights", None) is not None for s in sources)

    def read(self, part: int, start: int, count: int) -> Iterator[RawSample]:
        src = self.sources[self.part_source[part]]
        return src.read(int(self.part_local[part]), start, count, int(self.part_uid[part]))


def slot_length(total: int, slot: int, slots: int) -> int:
    return (slot + 1) * total // slots - slot * total // slots


def plan_epoch_slot(index: PartIndex, seed: int, epoch: int, slot: int, slots: int) -> list[tuple[int, int, int]]:
    """Epoch mode: (part, first sample, count) segments of slot ``slot``'s contiguous share of epoch ``epoch``."""
    order = np.random.default_rng([seed, epoch, 0xE90C]).permutation(len(index.part_size))
    ends = np.cumsum(index.part_size[order])
    a, b = slot * index.total // slots, (slot + 1) * index.total // slots
    segments = []
    i = int(np.searchsorted(ends, a, side="right"))
    while a < b:
        start_of_part = int(ends[i] - index.part_size[order[i]])
        take = min(int(ends[i]), b) - a
        if take > 0:
            segments.append((int(order[i]), a - start_of_part, take))
        a += take
        i += 1
    return segments


def plan_resampled_slot(index: PartIndex, seed: int, epoch: int, slot: int, length: int) -> list[tuple[int, int, int]]:
    """Resampled mode: parts drawn with replacement until the slot has ``length`` samples."""
    rng = np.random.default_rng([seed, epoch, slot, 0x5A3B])
    mean = max(1.0, float((index.draw_p * index.part_size).sum()))
    segments, have = [], 0
    while have < length:
        for part in rng.choice(len(index.part_size), size=max(4, math.ceil((length - have) / mean * 1.1)), p=index.draw_p):
            take = min(int(index.part_size[part]), length - have)
            if take <= 0:
                continue
            segments.append((int(part), 0, take))
            have += take
            if have >= length:
                break
    return segments


# ----------------------------------------------------------------------------- one slot's stream
@dataclass
class SlotPlan:
    mode: str
    seed: int
    slots: int
    samples_per_epoch: int  # per slot of this plan: length of one epoch of its stream
    shuffle_block: int

    def segments(self, index: PartIndex, epoch: int, slot: int) -> list[tuple[int, int, int]]:
        if self.mode == "epoch":
            return plan_epoch_slot(index, self.seed, epoch, slot, self.slots)
        return plan_resampled_slot(index, self.seed, epoch, slot, self.samples_per_epoch)


def raw_stream(index: PartIndex, segments: list[tuple[int, int, int]], skip: int) -> Iterator[RawSample]:
    """The raw samples of ``segments`` in order, starting ``skip`` samples in (opens no skipped part)."""
    for part, first, count in segments:
        if skip >= count:
            skip -= count
            continue
        yield from index.read(part, first + skip, count - skip)
        skip = 0


def shuffled_slot_stream(index: PartIndex, plan: SlotPlan, epoch: int, slot: int, pos: int) -> Iterator[tuple[int, RawSample]]:
    """(position after, raw sample) of slot ``slot``'s epoch ``epoch`` from position ``pos``, block-shuffled."""
    segments = plan.segments(index, epoch, slot)
    length = sum(c for _, _, c in segments)
    k = plan.shuffle_block
    block = pos // k
    raws = raw_stream(index, segments, block * k)
    while block * k < length:
        n = min(k, length - block * k)
        items = list(itertools.islice(raws, n))
        if len(items) != n:  # a source yielded fewer items than planned: a bug, not bad data
            raise RuntimeError(f"slot {slot} epoch {epoch}: planned {n} samples in block {block}, read {len(items)}")
        perm = np.random.default_rng([plan.seed, epoch, slot, block, 0xB10C]).permutation(n) if k > 1 else range(n)
        for i in range(pos - block * k, n):
            yield block * k + i + 1, items[perm[i]]
        pos = (block + 1) * k
        block += 1


def _caption_text(value, rng: random.Random | None) -> str | tuple[str]:
    """A caption string, or a 1-tuple with the skip reason."""
    if isinstance(value, list):
        value = _caption_choices(value)
        if not value:
            return ("missing_caption",)
        value = rng.choice(value) if rng is not None else value[0]
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return ("non_utf8_caption",)
    if not isinstance(value, str) or not value.strip():
        return ("missing_caption",)
    if not is_valid_utf8(value):
        return ("non_utf8_caption",)
    return " ".join(value.split())


def _caption_choices(values: list) -> list[str]:
    return [v for v in values if isinstance(v, str) and v.strip() and is_valid_utf8(v)]


def is_valid_utf8(text: str) -> bool:
    """False for strings with lone surrogates (undecodable bytes, or JSON escapes like \\ud800)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sub_caption_plan(cfg) -> tuple[int, bool, int]:
    """What ``sub_caption_texts`` needs from the data config: (K, keep the raw caption, sentences merged)."""
    return cfg.sub_captions, cfg.sub_caption_raw, cfg.sub_caption_merge


def sub_caption_list(value, rng: random.Random, count: int, keep_raw: bool, merge: int = 1) -> list[str] | tuple[str]:
    """DreamLIP's texts of a sample (``data.sub_captions``): its raw caption (the first of a list) and
    ``count`` sentences of its long captions (the rest of the list, or the only caption); see
    ``clipforge.data.captions.sub_caption_texts``. Or a 1-tuple with the skip reason."""
    from clipforge.data.captions import sub_caption_texts

    values = value if isinstance(value, list) else [value]
    texts = []
    for v in values:  # newlines still in: they end sentences
        if isinstance(v, (bytes, bytearray)):
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError:
                v = None
        texts.append(v if isinstance(v, str) and v.strip() and is_valid_utf8(v) else None)
    long = [t for t in texts[1:] if t is not None]
    if texts and texts[0] is None and not keep_raw and long:  # the raw caption is not used: its slot
        texts[0] = long[0]  # only serves as the fallback sentence
    if not texts or texts[0] is None:  # the first is the raw caption: never a long one in its place
        first = _caption_text(values[0] if values else None, None)
        return first if isinstance(first, tuple) else ("missing_caption",)
    return sub_caption_texts([texts[0], *long], count, keep_raw, rng, merge)[0]


def caption_texts(value, rng: random.Random | None, count: int) -> list[str] | tuple[str]:
    """``count`` captions of a sample, or a 1-tuple with the skip reason.

    From a caption list they are drawn without replacement when it has at least ``count``
    captions, else with replacement; a single caption is repeated. ``count`` = 1 is exactly
    ``_caption_text`` (the same draw from ``rng``), so the default stream is unchanged.
    """
    if count == 1 or rng is None:
        text = _caption_text(value, rng)
        return text if isinstance(text, tuple) else [text] * count
    if isinstance(value, list):
        choices = _caption_choices(value)
        if not choices:
            return ("missing_caption",)
        value = rng.sample(choices, count) if len(choices) >= count else rng.choices(choices, k=count)
    else:
        value = [value] * count
    texts = [_caption_text(v, None) for v in value]
    bad = next((t for t in texts if isinstance(t, tuple)), None)
    return bad or texts


def _image_bytes(image) -> bytes | tuple[str]:
    if image is None:
        return ("missing_image",)
    if isinstance(image, str):
        try:
            with open(image, "rb") as f:
                image = f.read()
        except FileNotFoundError:
            return ("missing_image",)
        except OSError:
            return ("bad_image",)
    if len(image) == 0:
        return ("empty_image",)
    return image


def decode_raw(raw: RawSample, image_size: int, augment, rng: random.Random | None, captions_per_sample: int = 1,
               sub_captions: tuple[int, bool, int] | None = None):
    """RawSample -> (uint8 3xHxW tensor, list of ``captions_per_sample`` captions, label), or the skip reason.
    ``sub_captions`` = (K, keep raw, merge): DreamLIP's raw caption + K sub-captions instead."""
    if raw.reason:
        return raw.reason
    # captions are drawn before the crop, from the same per-sample RNG: exact on resume
    if sub_captions:
        caption = sub_caption_list(raw.caption, rng or random.Random(raw.uid), *sub_captions)
    else:
        caption = caption_texts(raw.caption, rng, captions_per_sample)
    if isinstance(caption, tuple):
        return caption[0]
    data = _image_bytes(raw.image)
    if isinstance(data, tuple):
        return data[0]
    try:
        if rng is not None and augment.random_resized_crop:
            pixels = decode_crop_resize(data, image_size, rng, scale=augment.scale, ratio=augment.ratio,
                                        hflip=augment.hflip)
        else:
            pixels = decode_crop_resize(data, image_size, None)
            if rng is not None and augment.hflip and rng.random() < 0.5:
                pixels = pixels.flip(-1)
    except DECODE_ERRORS as e:
        return image_error_reason(data, e)
    return pixels, caption, raw.label


def decode_augmented(raw: RawSample, image_size: int, augment, rng: random.Random, captions_per_sample: int,
                     sub_captions: tuple[int, bool, int] | None, augmenter):
    """``decode_raw`` for training, then ``augmenter`` (``clipforge.data.views``; may be None): EDA on the
    captions, the strong policy on the image, the SSL views, the text views
    -> (pixels, captions, label, views or None, text views or None)."""
    out = decode_raw(raw, image_size, augment, rng, captions_per_sample, sub_captions)
    if isinstance(out, str):
        return out
    if augmenter is None:
        return (*out, None, None)
    pixels, own, label = out
    extra = random.Random(rng.getrandbits(63))  # drawn after the crop: the plain stream is unchanged
    captions = augmenter.captions(own, extra)
    pixels = augmenter.image(pixels, extra)
    views = None
    if augmenter.views:
        try:
            views = augmenter.views_from_bytes(_image_bytes(raw.image), extra)
        except DECODE_ERRORS as e:  # decoded once already; a file changed under us
            return image_error_reason(b"", e)
    text_views = None
    if augmenter.text_views:  # drawn last; each view draws from the sample's whole caption list (Fini et al.)
        pool = _caption_choices(raw.caption) if isinstance(raw.caption, list) and not sub_captions else own
        text_views = augmenter.text_view_captions(pool, extra)
    return pixels, captions, label, views, text_views


def image_error_reason(data: bytes, error: BaseException) -> str:
    """``truncated_image`` when the file stops early (no JPEG end marker / PNG IEND), else ``bad_image``."""
    ends_early = (data[:2] == b"\xff\xd8" and not data.rstrip(b"\0").endswith(b"\xff\xd9")) or (
        data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-16:])
    return "truncated_image" if ends_early or "truncated" in str(error).lower() else "bad_image"


def sample_rng(seed: int, epoch: int, slot: int, pos: int) -> random.Random:
    # one integer seed from the sample's place in the plan: the same augmentation after a resume
    return random.Random(((seed * 1_000_003 + epoch) * 1_000_003 + slot) * 10_000_000_019 + pos)


# ----------------------------------------------------------------------------- worker side
def new_cursor(slot: int) -> dict[str, Any]:
    return {"slot": slot, "epoch": 0, "pos": 0, "read": 0, "skipped": {}}


def skip_message(skipped: dict[str, int], read: int, limit: float, where: str) -> str:
    total = sum(skipped.values())
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1]))
    return (f"{total} of {read} samples read {where} were unreadable ({total / max(1, read):.1%} > "
            f"data.max_skip_fraction={limit:g}; {reasons}). Check the data with `clipforge data inspect` "
            f"(shards) or `clipforge data shard` (files: it checks every input as it writes), or raise "
            f"data.max_skip_fraction")


def over_skip_limit(skipped: dict[str, int], read: int, limit: float, epoch_done: bool = False) -> bool:
    total = sum(skipped.values())
    return total > limit * read and (read >= MIN_SAMPLES_FOR_SKIP_CHECK or epoch_done)


class SlotBatches(IterableDataset):
    """Each DataLoader worker turns its slot's stream into whole batches (with the slot's cursor)."""

    def __init__(self, index: PartIndex, plan: SlotPlan, data_cfg: DataConfig, image_size: int, tokenizer,
                 rank: int, workers: int, cursors: dict[int, dict], rotation: int, slot_lengths: dict[int, int]):
        self.index, self.plan, self.cfg = index, plan, data_cfg
        self.image_size, self.tokenizer = image_size, tokenizer
        self.rank, self.workers, self.cursors, self.rotation = rank, workers, cursors, rotation
        self.slot_lengths = slot_lengths
        from clipforge.data.views import SampleAugmenter

        self.augmenter = SampleAugmenter.from_config(data_cfg, image_size)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotation) % self.workers
        slot = self.rank * self.workers + worker
        cursor = dict(self.cursors.get(slot) or new_cursor(slot))
        cursor["skipped"] = dict(cursor["skipped"])
        return self._batches(slot, cursor)

    def _batches(self, slot: int, cursor: dict) -> Iterator[dict]:
        cfg, length = self.cfg, self.slot_lengths[slot]
        samples: list[tuple] = []  # (pixels, captions, label, uid, key, weight) of the batch being formed
        while True:
            epoch, good_this_epoch, read_this_epoch = cursor["epoch"], 0, 0
            for pos, raw in shuffled_slot_stream(self.index, self.plan, epoch, slot, cursor["pos"]):
                cursor["pos"], cursor["read"] = pos, cursor["read"] + 1
                read_this_epoch += 1
                out = decode_augmented(raw, self.image_size, cfg.augment, sample_rng(cfg.seed, epoch, slot, pos),
                                       cfg.captions_per_sample,
                                       sub_caption_plan(cfg) if cfg.sub_captions else None,
                                       self.augmenter)
                if isinstance(out, str):
                    cursor["skipped"][out] = cursor["skipped"].get(out, 0) + 1
                    if over_skip_limit(cursor["skipped"], cursor["read"], cfg.max_skip_fraction):
                        yield {"_error": skip_message(cursor["skipped"], cursor["read"], cfg.max_skip_fraction,
                                                     f"by data worker {slot}")}
                        return
                    continue
                good_this_epoch += 1
                pixels, captions, label, views, text_views = out  # not raw itself: it holds the encoded image
                samples.append((pixels, captions, label, raw.uid, raw.key, raw.weight, views, text_views))
                if len(samples) == cfg.batch_size:
                    cursor["progress"] = epoch + pos / max(1, length)
                    yield self._collate(samples, cursor)
                    samples = []
            if good_this_epoch == 0 and read_this_epoch >= length > 0:  # a whole epoch and nothing readable
                yield {"_error": skip_message(cursor["skipped"], cursor["read"], cfg.max_skip_fraction,
                                             f"by data worker {slot} in a whole epoch (none of them readable)")}
                return
            cursor["epoch"], cursor["pos"] = epoch + 1, 0

    def _collate(self, samples: list[tuple], cursor: dict) -> dict:
        """Batch v2 (see ``clipforge.data.loader``): caption rows are sample-major, T per sample."""
        per_sample = len(samples[0][1])  # data.captions_per_sample, or raw + data.sub_captions
        pixels, texts, labels, uids, keys, weights, views, text_views = zip(*samples)
        captions = [c for sample_texts in texts for c in sample_texts]
        batch = {"images": torch.stack(pixels),  # N x 3 x H x W uint8
                 "labels": torch.tensor(labels, dtype=torch.long), "indices": torch.tensor(uids, dtype=torch.long),
                 "captions": captions, "keys": list(keys),
                 "_cursor": {**cursor, "skipped": dict(cursor["skipped"])}}
        if views[0] is not None:
            batch["views"] = torch.stack(views)  # N x V x 3 x H x W uint8 (data.ssl_views)
        if text_views[0] is not None:
            batch["text_views"] = [t for sample_views in text_views for t in sample_views]  # N*A (data.text_views)
        if self.tokenizer is not None:
            from clipforge.data.captions import tokenize_checked
            from clipforge.data.views import tokenize_text_views

            batch["input_ids"], batch["attention_mask"] = tokenize_checked(self.tokenizer, captions)
            tokenize_text_views(self.tokenizer, batch)
        if self.cfg.sub_captions:
            from clipforge.data.captions import RAW, SUB_CAPTION

            kinds = [RAW] * self.cfg.sub_caption_raw + [SUB_CAPTION] * self.cfg.sub_captions
            batch["caption_kind"] = torch.tensor(kinds * len(samples), dtype=torch.long)
        if per_sample > 1:
            batch["text_owner"] = torch.arange(len(samples)).repeat_interleave(per_sample)
        if self.index.has_weights:
            batch["weights"] = torch.tensor([1.0 if w is None else w for w in weights], dtype=torch.float32)
        return batch


# ----------------------------------------------------------------------------- main-process side
class SourceTrainLoader:
    """Endless batch iterator with the data cursor (``state_dict``) and skip metrics (``metrics``)."""

    def __init__(self, batches: Iterator[dict], fingerprint: dict, cursors: dict[int, dict], batches_done: int,
                 max_skip_fraction: float) -> None:
        self._batches = batches
        self.fingerprint = fingerprint
        self.cursors = {int(k): v for k, v in cursors.items()}
        self.batches_done = batches_done
        self.max_skip_fraction = max_skip_fraction

    def __iter__(self) -> "SourceTrainLoader":
        return self

    def __next__(self) -> dict:
        batch = next(self._batches)
        if "_error" in batch:
            raise DataError(batch["_error"])
        cursor = batch.pop("_cursor")
        self.cursors[cursor["slot"]] = cursor
        self.batches_done += 1
        skipped, read = self._skip_totals()
        if over_skip_limit(skipped, read, self.max_skip_fraction):
            raise DataError(skip_message(skipped, read, self.max_skip_fraction, "on this rank"))
        return batch

    def _skip_totals(self) -> tuple[dict[str, int], int]:
        skipped: dict[str, int] = {}
        for c in self.cursors.values():
            for k, v in c["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
        return skipped, sum(c["read"] for c in self.cursors.values())

    def state_dict(self) -> dict:
        """The data cursor to save in a checkpoint (plain ints/strings: loads with weights_only)."""
        return {**self.fingerprint, "batches_done": self.batches_done,
                "cursors": {str(k): v for k, v in sorted(self.cursors.items())}}

    def metrics(self) -> dict[str, float]:
        """``data/skipped/<reason>`` counts, the skipped fraction and the (slowest slot's) epoch."""
        skipped, read = self._skip_totals()
        out = {f"data/skipped/{k}": float(v) for k, v in sorted(skipped.items())}
        out["data/skipped_fraction"] = sum(skipped.values()) / read if read else 0.0
        progress = [c["progress"] for c in self.cursors.values() if "progress" in c]
        if progress:
            out["data/epoch"] = float(min(progress))
        return out


def _cursors_from_samples(start_sample: int, batch_size: int, world_size: int, rank: int, workers: int,
                          slot_lengths: dict[int, int]) -> tuple[int, dict[int, dict]]:
    """Without a saved cursor: each slot's position, assuming no sample was skipped so far."""
    batches_done = start_sample // (batch_size * world_size)
    cursors = {}
    for w in range(workers):
        slot = rank * workers + w
        taken = batch_size * ((batches_done - w + workers - 1) // workers if batches_done > w else 0)
        length = max(1, slot_lengths[slot])
        cursors[slot] = {**new_cursor(slot), "epoch": taken // length, "pos": taken % length, "read": taken}
    return batches_done, cursors


def build_source_train_loader(
    data_cfg: DataConfig,
    image_size: int,
    tokenizer,
    start_sample: int = 0,
    *,
    rank: int = 0,
    world_size: int = 1,
    state: dict | None = None,
    pin_memory: bool = False,
    prefetch_batches: int = 4,
) -> SourceTrainLoader:
    """Endless training batches from ``data_cfg.train`` (see the module docstring for the plan).

    ``state`` is a previous loader's ``state_dict()`` (exact resume); without it, ``start_sample``
    (samples consumed by all ranks) places every slot, exactly when no sample had been skipped.
    """
    specs = parse_train_spec(data_cfg.train)
    index = PartIndex(open_sources(specs, data_cfg), specs)
    workers = max(1, data_cfg.num_workers)
    slots = world_size * workers
    if index.total < slots:
        raise DataError(f"{data_cfg.train} has {index.total} samples, fewer than the {slots} data streams "
                        f"(ranks x workers); use fewer data.num_workers")
    total = data_cfg.samples_per_epoch or index.total if data_cfg.mode == "resampled" else index.total
    slot_lengths = {s: slot_length(total, s, slots) for s in range(slots)}
    plan = SlotPlan(data_cfg.mode, data_cfg.seed, slots, 0, data_cfg.shuffle_buffer)
    fingerprint = {"kind": "sources", "train": data_cfg.train, "mode": data_cfg.mode, "seed": data_cfg.seed,
                   "world_size": world_size, "workers": workers, "batch_size": data_cfg.batch_size,
                   "shuffle_buffer": data_cfg.shuffle_buffer, "samples_per_epoch": total}
    if data_cfg.keep:  # only when set: cursors saved before keep-lists existed still match
        from clipforge.data.keep import keep_fingerprint

        fingerprint["keep"] = keep_fingerprint(data_cfg.keep)
    batches_done, cursors = _cursors_from_samples(start_sample, data_cfg.batch_size, world_size, rank, workers,
                                                  slot_lengths)
    if state is not None:
        changed = [k for k, v in fingerprint.items() if state.get(k) != v]
        if state.get("keep") and "keep" not in fingerprint:  # a keep-list dropped on resume
            changed.append("keep")
        if changed:
            warnings.warn(f"the saved data cursor does not match the data config ({', '.join(changed)}); "
                          "placing the data stream from the sample count instead (not exact)")
        else:
            batches_done = int(state["batches_done"])
            cursors = {int(k): v for k, v in state["cursors"].items() if int(k) // workers == rank} or cursors
    # resampled epochs have a per-slot length; epoch mode plans from the whole epoch
    if data_cfg.mode == "resampled":
        plans = {s: SlotPlan("resampled", data_cfg.seed, slots, slot_lengths[s], data_cfg.shuffle_buffer)
                 for s in range(slots)}
        plan = _PerSlotPlan(plans)
    dataset = SlotBatches(index, plan, data_cfg, image_size, tokenizer, rank, workers, cursors,
                          batches_done % workers, slot_lengths)
    n = data_cfg.num_workers
    loader = DataLoader(
        dataset,
        batch_size=None,  # items already are batches
        # a private generator: creating the iterator must not draw from the global torch RNG, which
        # patch dropout, A-CLIP's crops and L0 gates use and which a resumed run restores (as loader.py)
        generator=torch.Generator().manual_seed(data_cfg.seed),
        num_workers=n,
        worker_init_fn=leave_stop_signals_to_the_trainer,
        pin_memory=pin_memory,
        persistent_workers=n > 0,
        prefetch_factor=max(2, -(-prefetch_batches // n)) if n > 0 else None,
    )
    return SourceTrainLoader(iter(loader), fingerprint, cursors, batches_done, data_cfg.max_skip_fraction)


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """DataLoader worker start-up: ignore SIGTERM (and SIGINT). ``timeout``, SLURM's scancel and job
    limits signal the whole process group; a worker that died of it would fail the next batch before
    the trainer, which saves a checkpoint on that signal, could take its step. The workers still end
    with the loader, and on their own when the trainer's process is gone (torch's watchdog)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _PerSlotPlan:
    """Resampled mode: each slot plans its own epoch length."""

    def __init__(self, plans: dict[int, SlotPlan]) -> None:
        self.plans = plans
        first = next(iter(plans.values()))
        self.seed, self.shuffle_block = first.seed, first.shuffle_block

    def segments(self, index: PartIndex, epoch: int, slot: int):
        return self.plans[slot].segments(index, epoch, slot)


def source_samples(data_cfg: DataConfig) -> Iterator[RawSample]:
    """Every sample of ``data.train`` once, in dataset (uid) order, undecoded, with the loader's ``key``.

    For tools that precompute something per sample (a teacher cache: ``clipforge embed --teacher-cache``):
    the keys are exactly the ``batch["keys"]`` training will look them up by. Unreadable samples
    come too, with ``reason`` set.
    """
    specs = parse_train_spec(data_cfg.train)
    if any(s.kind == "shapes" for s in specs):
        raise DataError("the built-in 'shapes' source is endless; its key of sample i is 'shapes:<i>'")
    index = PartIndex(open_sources(specs, data_cfg), specs)
    for part in range(len(index.part_size)):
        yield from index.read(part, 0, int(index.part_size[part]))


# ----------------------------------------------------------------------------- tokenizer corpus
def caption_corpus(data_cfg: DataConfig, n: int) -> list[str]:
    """The first captions of each source (shares by mixture weight), to train the tokenizer on."""
    specs = parse_train_spec(data_cfg.train)
    total_weight = sum(s.weight for s in specs)
    corpus: list[str] = []
    for spec in specs:
        corpus += open_source(spec, data_cfg).captions(max(1, round(n * spec.weight / total_weight)))
    if not corpus:
        raise DataError(f"{data_cfg.train}: no readable caption found to train the tokenizer on")
    return corpus
