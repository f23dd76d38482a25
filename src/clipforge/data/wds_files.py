"""``wds:`` shards for the file-based readers (``clipforge eval`` / ``clipforge embed``): materialised once.

Evaluation and embedding index images by file path (and ``embed``'s server shows those files as
thumbnails), so a ``wds:`` spec given to them is extracted once into a cache directory::

    <cache>/wds/<fingerprint>/
        images/00000/0000001.png   the image bytes as they are in the tar (shard 0, sample 1)
        captions.jsonl             {"image", "caption": [...], "key"}: samples with a usable caption
        labels.jsonl               {"image", "label", "key"}: samples whose .json has a label
        materialised.json          what was read and what was skipped, per reason

and the ordinary ``jsonl:`` readers read those tables. ``<cache>`` is ``$CLIPFORGE_CACHE``, else
``~/.cache/clipforge``; the fingerprint hashes the shards' paths, sizes and modification times, so
the next call with unchanged shards reuses the directory and a changed shard makes a new one. The
directory is filled under a temporary name and renamed when complete: a cache directory is never
half written (an interrupted run leaves at most a ``.<fingerprint>.*`` temporary directory).

Samples are read with the training reader (``pipeline.tar_samples`` through ``shards._read_shard``);
what it cannot use is skipped and counted under the training pipeline's reasons (missing_image,
empty_image, missing_caption, truncated_tar, ...). Image bytes are not decoded here: the readers
downstream decode them and skip and count undecodable ones as they do for image files.
Only local shards are read (a path, a brace pattern, ``a.tar::b.tar`` or a directory of .tar).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

from clipforge.data.pipeline import (
    IMAGE_SUFFIXES,
    META_SUFFIX,
    _caption_choices,
    _caption_text,
    require_webdataset,
    tar_caption,
)
from clipforge.data.shards import _expected_sizes, _read_shard, shard_urls
from clipforge.data.sources import (
    CaptionData,
    ClassificationData,
    DataError,
    DataSpec,
    read_caption_table,
    read_labelled_table,
)

CACHE_ENV = "CLIPFORGE_CACHE"
FORMAT_VERSION = 1  # part of the fingerprint: a new layout never reuses an old directory
INFO_FILE = "materialised.json"
CAPTIONS_FILE = "captions.jsonl"
LABELS_FILE = "labels.jsonl"


def cache_root() -> Path:
    """Where materialised shards live: ``$CLIPFORGE_CACHE/wds``, else ``~/.cache/clipforge/wds``."""
    base = os.environ.get(CACHE_ENV)
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "clipforge"
    return (root / "wds").resolve()  # absolute: the tables' image paths must not depend on the cwd


def local_shards(spec: DataSpec) -> list[Path]:
    """The shard files of a ``wds:`` spec (absolute); remote URLs and ``pipe:`` are refused."""
    require_webdataset()
    text = str(spec.path)
    # parse_data_spec made the target a Path, which folds "//" and so breaks URLs; they are not
    # supported here anyway: a fingerprint needs a size and mtime to notice a changed shard
    if text.startswith("pipe:") or re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", text) and not text.startswith("file:"):
        raise DataError(f"{spec}: evaluation and embedding read local wds: shards only (a path, a brace pattern "
                        "or a directory); download remote shards first")
    return [Path(u).resolve() for u in shard_urls(text.removeprefix("file:"))]


def fingerprint(shards: list[Path]) -> str:
    """A name for the cache directory that changes when any shard is added, removed or rewritten."""
    entries = []
    for path in shards:
        try:
            st = path.stat()
            entries.append([str(path), st.st_size, st.st_mtime_ns])
        except FileNotFoundError:
            entries.append([str(path), None, None])  # missing now: a later copy of it makes a new key
    return hashlib.sha256(json.dumps([FORMAT_VERSION, entries]).encode()).hexdigest()[:24]


def materialise(spec: DataSpec) -> tuple[Path, dict]:
    """(the cache directory of ``spec``'s shards, its ``materialised.json``); extracts them if needed."""
    shards = local_shards(spec)
    root = cache_root()
    target = root / fingerprint(shards)
    if not (target / INFO_FILE).is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        # mkdtemp makes it 0700; the usual mode (umask applied) lets a server running as another user read it
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        try:
            info = _extract(spec, shards, tmp)
            try:
                os.rename(tmp, target)  # atomic: the directory appears complete or not at all
            except OSError:
                if not (target / INFO_FILE).is_file():
                    raise DataError(f"{target} exists but is not a complete extraction; delete it and rerun") from None
                shutil.rmtree(tmp, ignore_errors=True)  # a concurrent run finished first; its copy is the same
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target, json.loads((target / INFO_FILE).read_text())


def _extract(spec: DataSpec, shards: list[Path], out: Path) -> dict:
    expected = _expected_sizes([str(p) for p in shards])
    skipped: Counter = Counter()  # the sample is unusable for anything
    no_caption: Counter = Counter()  # usable for labels only
    read = lost_total = images = captioned = labelled = 0
    with open(out / CAPTIONS_FILE, "w", encoding="utf-8") as captions, \
            open(out / LABELS_FILE, "w", encoding="utf-8") as labels:
        for s, shard in enumerate(shards):
            folder = out / "images" / f"{s:05d}"
            folder.mkdir(parents=True)
            seen, error = 0, None
            for files in _read_shard(str(shard)):
                if isinstance(files, str):  # the shard could not be read to its end
                    error = files
                    continue
                seen += 1
                suffix = next((x for x in IMAGE_SUFFIXES if x in files), None)
                if suffix is None or not files[suffix]:
                    skipped["missing_image" if suffix is None else "empty_image"] += 1
                    continue
                # the sample's number, not its key, names the file: keys may hold "/" or repeat across shards
                image = folder / f"{seen:07d}.{suffix}"
                image.write_bytes(files[suffix])
                images += 1
                row = {"image": image.relative_to(out).as_posix(), "key": f"{shard.name}/{files['__key__']}"}
                texts = _captions(files)
                if isinstance(texts, str):
                    no_caption[texts] += 1
                else:
                    captions.write(json.dumps({**row, "caption": texts}) + "\n")
                    captioned += 1
                label = _label(files)
                if label is not None:
                    labels.write(json.dumps({**row, "label": label}) + "\n")
                    labelled += 1
            read += seen
            # like `clipforge data inspect`: with a sizes.json every lost sample counts, without one
            # the failure counts once (the cut sample, or the missing shard)
            lost = expected[shard.name] - seen if shard.name in expected else int(error is not None)
            if lost > 0:
                skipped[error or "truncated_tar"] += lost
                lost_total += lost
    info = {
        "format": FORMAT_VERSION, "spec": str(spec), "shards": [str(p) for p in shards],
        "samples": read + lost_total,  # read, plus those a cut or missing shard lost
        "skipped": dict(sorted(skipped.items())),
        "captions": {"rows": captioned, "skipped": dict(sorted(no_caption.items()))},
        "labels": {"rows": labelled, "unlabelled": images - labelled},
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    return info


def _captions(files: dict[str, bytes]) -> list[str] | str:
    """All usable captions of a sample (the .json list, else the .txt), or the skip reason."""
    value = tar_caption(files)
    if isinstance(value, list):
        texts = [_caption_text(c, None) for c in _caption_choices(value)]
        return texts or "missing_caption"
    text = _caption_text(value, None)
    return text[0] if isinstance(text, tuple) else [text]


def _label(files: dict[str, bytes]) -> str | int | None:
    """The .json's class name (zero-shot puts it in prompts), else its label; None when it has neither."""
    try:
        meta = json.loads(files.get(META_SUFFIX) or b"null")
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    name, label = meta.get("classname"), meta.get("label")
    if isinstance(name, str) and name.strip():
        return name.strip()
    if isinstance(label, int) and not isinstance(label, bool) or isinstance(label, str) and label.strip():
        return label
    return None


def _warn_skipped(spec: DataSpec, out: Path, info: dict, extra: dict[str, int], what: str) -> None:
    counts = Counter(info["skipped"]) + Counter(extra)
    if counts:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        warnings.warn(f"{spec}: {sum(counts.values())} of {info['samples']} samples skipped for {what} "
                      f"({reasons}); the readable ones are in {out}")


def read_wds_captions(spec: DataSpec) -> CaptionData:
    """Images and captions of ``wds:`` shards, through their materialised ``captions.jsonl``."""
    out, info = materialise(spec)
    if not info["captions"]["rows"]:
        raise DataError(f"{spec}: none of the {info['samples']} samples has an image and a caption "
                        f"(skipped: {info['skipped']}, {info['captions']['skipped']})")
    _warn_skipped(spec, out, info, info["captions"]["skipped"], "retrieval")
    return replace(read_caption_table(DataSpec("jsonl", out / CAPTIONS_FILE)), source=str(spec))


def read_wds_labels(spec: DataSpec, classnames_file: Path | None = None) -> ClassificationData:
    """Labelled images of ``wds:`` shards (label: the .json's classname, else its label)."""
    out, info = materialise(spec)
    if not info["labels"]["rows"]:
        raise DataError(f"{spec}: no sample's .json has a 'label' or 'classname'; classification needs labelled "
                        "shards (e.g. `clipforge data shard imagefolder:DIR` writes them)")
    unlabelled = info["labels"]["unlabelled"]
    _warn_skipped(spec, out, info, {"no_label": unlabelled} if unlabelled else {}, "classification")
    return replace(read_labelled_table(DataSpec("jsonl", out / LABELS_FILE), classnames_file), source=str(spec))
