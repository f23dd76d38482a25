"""Embed a data set's images and captions into shards on disk, resumably.

    clipforge embed CKPT --data jsonl:pairs.jsonl --out emb/

Layout of an embedding directory::

    manifest.json             checkpoint, data spec, dtype, shard size; "complete" once finished
    images/shard_00000.npy    N x E unit-norm embeddings (float16 or float32)
    images/shard_00000.parquet  id, image, caption of each row of that shard (same order)
    texts/shard_00000.npy     captions, likewise (parquet: id, image_id, image, caption)
    (--sparse: shard_00000.npz, a SciPy CSR matrix N x |V| of top-k lexical weights; see index/lexical.py)
    images.parquet / texts.parquet   all shards' metadata in one table (written at the end)

A shard is written to a temporary name and renamed, so a shard file on disk is always complete;
a rerun with the same arguments skips the finished shards. Unreadable images are skipped and
counted (their ids simply do not appear), and the run stops if too many are bad.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from clipforge.devices import pick_device
from clipforge.outputs import load_array_no_pickle, read_json_object

MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")
KINDS = ("images", "texts")


class EmbedError(ValueError):
    """An embedding run that cannot go on as asked; the message says what to do."""


def require_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise EmbedError("embedding tables need pyarrow: pip install 'clipforge[index]'") from None
    return pyarrow


# ----------------------------------------------------------------------------- what to embed
@dataclass
class Items:
    """The unique images (with one caption each, for display) and every caption (with its image)."""

    image_paths: list[str]
    image_captions: list[str]
    captions: list[str]
    caption_image: list[int]


def read_items(data: str) -> Items:
    """Read a data spec through clipforge.data.sources (the readers evaluation uses)."""
    from clipforge.data.sources import parse_data_spec, read_caption_data, read_classification_data

    spec = parse_data_spec(data)
    if spec.kind == "imagefolder":  # no captions: the class name stands in for one
        folder = read_classification_data(spec)
        names = [folder.classnames[label] for label in folder.labels]
        return Items([str(p) for p in folder.paths], names, names, list(range(len(names))))
    table = read_caption_data(spec)
    first_caption: dict[int, str] = {}
    for caption, image in zip(table.captions, table.text_to_image):
        first_caption.setdefault(image, caption)
    return Items([str(p) for p in table.paths], [first_caption.get(i, "") for i in range(len(table.paths))],
                 list(table.captions), list(table.text_to_image))


# ----------------------------------------------------------------------------- manifest / resume
def _settings(ckpt: str, data: str, dtype: str, shard_size: int, items: Items) -> dict[str, Any]:
    return {"checkpoint": str(Path(ckpt).resolve()), "data": data, "dtype": dtype, "shard_size": shard_size,
            "num_images": len(items.image_paths), "num_texts": len(items.captions)}


def _open_output(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Start a new directory or continue one made with the same settings; anything else is an error."""
    if out.exists() and not out.is_dir():
        raise EmbedError(f"{out} is a file; --out is the embedding directory to write (or to continue)")
    path = out / MANIFEST
    if path.is_file():
        manifest = _read_manifest(path)
        changed = [k for k, v in settings.items() if manifest.get(k) != v]
        if changed and not any(_shards(out, kind) for kind in KINDS):
            # a run that failed before its first shard holds nothing to keep: start over with these
            # settings rather than block the corrected command
            manifest = {**settings, "complete": False, "skipped_images": []}
            _write_json_atomic(path, manifest)
            return manifest
        if changed:
            raise EmbedError(
                f"{out} holds embeddings made with different settings ({', '.join(changed)} changed); "
                "pass a new --out directory or delete this one"
            )
        return manifest
    if out.exists() and any(out.iterdir()):
        raise EmbedError(f"{out} is not empty and is not an embedding directory; pass a new --out directory")
    for kind in KINDS:
        (out / kind).mkdir(parents=True, exist_ok=True)
    manifest = {**settings, "complete": False, "skipped_images": []}
    _write_json_atomic(path, manifest)
    return manifest


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def shard_name(i: int) -> str:
    return f"shard_{i:05d}"


def _done(out: Path, kind: str, i: int) -> bool:
    # the .npy (.npz when sparse) is renamed into place last, so its presence means the shard is complete
    return any((out / kind / f"{shard_name(i)}{suffix}").is_file() for suffix in (".npy", ".npz"))


def _save_shard(out: Path, kind: str, i: int, embeds: np.ndarray, rows: dict[str, list], sparse: bool = False) -> None:
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    base = out / kind / shard_name(i)
    pq.write_table(pa.table(rows), f"{base}.parquet")
    if sparse:  # top-k lexical weights: keep only the non-zeros (float32: SciPy has no float16 sparse maths)
        from clipforge.index.lexical import require_scipy, to_csr

        tmp = base.with_name(f".{base.name}.tmp.npz")
        require_scipy().save_npz(tmp, to_csr(embeds), compressed=False)
        os.replace(tmp, f"{base}.npz")
        return
    tmp = base.with_name(f".{base.name}.tmp.npy")
    np.save(tmp, embeds)
    os.replace(tmp, f"{base}.npy")


# ----------------------------------------------------------------------------- embedding
def _remove_new_output_on_failure(embed):
    """A failed run that wrote no shard removes the output directory it created itself, so nothing
    is left for the corrected command to trip over (one with shards stays: a rerun resumes it)."""

    @functools.wraps(embed)
    def run(ckpt, data, out, **options):
        out = Path(out)
        created = not out.exists()
        try:
            return embed(ckpt, data, out, **options)
        except BaseException:
            if created and out.is_dir() and not any(_shards(out, kind) for kind in KINDS):
                shutil.rmtree(out, ignore_errors=True)
            raise

    return run


def _embed_image_shard(model, paths: list[str], preprocess, image_size: int, batch_size: int, workers: int,
                       advance: Callable[[int], None]) -> tuple[np.ndarray, list[bool], list[tuple[str, str]]]:
    from clipforge.eval.datasets import DecodedImages
    from clipforge.eval.embedding import embed_images

    decoded = DecodedImages([Path(p) for p in paths], preprocess, image_size, batch_size=batch_size,
                            workers=workers, advance=advance)
    embeds = embed_images(model, decoded, out_device="cpu")
    return embeds.numpy(), decoded.ok.tolist(), decoded.bad


def _embed_text_shard(model, tokenizer, texts: list[str], batch_size: int, advance) -> np.ndarray:
    from clipforge.eval.embedding import embed_captions

    return embed_captions(model, tokenizer, texts, batch_size=batch_size, out_device="cpu", advance=advance).numpy()


@_remove_new_output_on_failure
def embed_dataset(
    ckpt: str | Path,
    data: str,
    out: str | Path,
    *,
    batch_size: int = 64,
    shard_size: int = 8192,
    dtype: str = "float16",
    workers: int = 0,
    device: str | None = None,
    max_bad_fraction: float = 0.05,
    progress: bool = True,
    stop_after_shards: int | None = None,
    sparse: bool = False,
) -> dict[str, Any]:
    """Embed every image and caption of ``data`` with the checkpoint; resume an unfinished ``out``.

    ``ckpt``: a checkpoint directory or a run directory (its latest checkpoint), as for evaluation.

    ``stop_after_shards`` stops after writing that many new shards (to test resuming).
    ``sparse``: store the top-k lexical weights of a LexLIP model (``model.lexical_head``) instead.
    Returns counts: images, texts, skipped_images, shards_written.
    """
    from clipforge.api import load
    from clipforge.eval.datasets import check_bad_fraction, progress_bar
    from clipforge.eval.evaluate import checkpoint_dir

    if dtype not in DTYPES:
        raise EmbedError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise EmbedError("--shard-size and --batch-size must be >= 1")
    device = pick_device(device)  # before the output directory is made
    require_pyarrow()
    out = Path(out)
    ckpt = checkpoint_dir(ckpt)  # a run directory means its latest checkpoint, as in `clipforge eval`
    items = read_items(data)
    settings = _settings(str(ckpt), data, dtype, shard_size, items)
    if sparse:  # only when asked, so dense directories made before this option still resume
        settings["sparse"] = True
    manifest = _open_output(out, settings)
    if manifest.get("complete"):
        return _summary(manifest, 0)
    model, preprocess, tokenizer = load(ckpt, device=device)
    if sparse:
        from clipforge.index.lexical import SparseEncoder

        model = SparseEncoder(model)  # encode_* give top-k vocabulary weights
    bad: list[tuple[str, str]] = [tuple(b) for b in manifest["skipped_images"]]
    written = 0

    num_images, num_texts = len(items.image_paths), len(items.captions)
    image_shards = range(0, num_images, shard_size)
    todo = sum(min(shard_size, num_images - s) for i, s in enumerate(image_shards) if not _done(out, "images", i))
    with progress_bar(todo, "embedding images", progress) as advance:
        for i, start in enumerate(image_shards):
            if _done(out, "images", i):
                continue
            ids = list(range(start, min(start + shard_size, num_images)))
            paths = [items.image_paths[j] for j in ids]
            embeds, ok, shard_bad = _embed_image_shard(model, paths, preprocess, model.cfg.image_size,
                                                       batch_size, workers, advance)
            bad += shard_bad
            check_bad_fraction(bad, num_images, max_bad_fraction)
            kept = [j for j, good in zip(ids, ok) if good]
            _save_shard(out, "images", i, embeds.astype("float32" if sparse else dtype),
                        {"id": kept, "image": [items.image_paths[j] for j in kept],
                         "caption": [items.image_captions[j] for j in kept]}, sparse)
            manifest["skipped_images"] = [list(b) for b in bad]
            _write_json_atomic(out / MANIFEST, manifest)
            written += 1
            if stop_after_shards is not None and written >= stop_after_shards:
                return _summary(manifest, written)

    text_shards = range(0, num_texts, shard_size)
    todo = sum(min(shard_size, num_texts - s) for i, s in enumerate(text_shards) if not _done(out, "texts", i))
    with progress_bar(todo, "embedding captions", progress) as advance:
        for i, start in enumerate(text_shards):
            if _done(out, "texts", i):
                continue
            ids = list(range(start, min(start + shard_size, num_texts)))
            texts = [items.captions[j] for j in ids]
            embeds = _embed_text_shard(model, tokenizer, texts, batch_size, advance)
            image_ids = [items.caption_image[j] for j in ids]
            _save_shard(out, "texts", i, embeds.astype("float32" if sparse else dtype),
                        {"id": ids, "image_id": image_ids, "image": [items.image_paths[j] for j in image_ids],
                         "caption": texts}, sparse)
            written += 1
            if stop_after_shards is not None and written >= stop_after_shards:
                return _summary(manifest, written)

    for kind in KINDS:
        _merge_metadata(out, kind)
    manifest["complete"] = True
    manifest["embed_dim"] = model.cfg.embed_dim
    _write_json_atomic(out / MANIFEST, manifest)
    return _summary(manifest, written)


def _summary(manifest: dict[str, Any], written: int) -> dict[str, Any]:
    skipped = len(manifest["skipped_images"])
    return {"images": manifest["num_images"] - skipped, "texts": manifest["num_texts"],
            "skipped_images": skipped, "shards_written": written, "complete": manifest["complete"]}


def _shards(out: Path, kind: str) -> list[Path]:
    return sorted((out / kind).glob("shard_*.np[yz]"))


def _merge_metadata(out: Path, kind: str) -> None:
    require_pyarrow()
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p.with_suffix(".parquet")) for p in _shards(out, kind)]
    if tables:
        pq.write_table(pa.concat_tables(tables), out / f"{kind}.parquet")


# ----------------------------------------------------------------------------- reading back
def load_embeddings(emb_dir: str | Path, kind: str = "images") -> tuple[np.ndarray, Any, dict[str, Any]]:
    """``(float32 N x E array, pyarrow metadata table, manifest)`` of a finished embedding directory."""
    require_pyarrow()
    import pyarrow.parquet as pq

    emb_dir = Path(emb_dir)
    if kind not in KINDS:
        raise EmbedError(f"--what must be one of {', '.join(KINDS)} (the image or the caption embeddings), "
                         f"got {kind!r}")
    if not (emb_dir / MANIFEST).is_file():
        raise EmbedError(f"{emb_dir} is not an embedding directory ({MANIFEST} missing); run `clipforge embed` first")
    manifest = _read_manifest(emb_dir / MANIFEST)
    if manifest.get("sparse"):
        raise EmbedError(f"{emb_dir} holds sparse lexical weights (embed --sparse): build a lexical index, "
                         "`clipforge index EMB_DIR --kind lexical --out NEW_DIR`, or re-embed without --sparse")
    if not manifest.get("complete"):
        raise EmbedError(f"{emb_dir} is unfinished; rerun the same `clipforge embed` command to complete it")
    shards = _shards(emb_dir, kind)
    if not shards:
        raise EmbedError(f"{emb_dir} has no {kind} embeddings")
    vectors = [_read_shard(p) for p in shards]
    if len({v.shape[1] for v in vectors}) != 1:
        raise EmbedError(f"{emb_dir}: the {kind} shards have different widths ({sorted({v.shape[1] for v in vectors})}); "
                         f"they come from different runs; {REEMBED}")
    vectors = np.concatenate(vectors)
    try:
        table = pq.read_table(emb_dir / f"{kind}.parquet")
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise EmbedError(f"{emb_dir / f'{kind}.parquet'} is missing or damaged ({str(e)[:160]}); {REEMBED}") from None
    if table.num_rows != len(vectors):
        raise EmbedError(f"{emb_dir}: {kind}.parquet has {table.num_rows} rows but the shards hold {len(vectors)}")
    return vectors, table, manifest


REEMBED = "re-create the embeddings with `clipforge embed CKPT --data ... --out NEW_DIR`"


def _read_manifest(path: Path) -> dict[str, Any]:
    return read_json_object(path, EmbedError, REEMBED, "a clipforge embedding manifest")


def _read_shard(path: Path) -> np.ndarray:
    """One .npy shard as float32, refused unless it is a plain 2-D float array."""
    array = load_array_no_pickle(path, EmbedError, REEMBED, "embeddings")
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise EmbedError(f"{path} holds {array.dtype} {array.shape}, not an N x E float array of embeddings; "
                         f"{REEMBED}")
    return array.astype(np.float32)
