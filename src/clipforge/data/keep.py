"""Keep-lists: train on a subset of a source without rewriting it (``data.keep = "keep.parquet"``).

A keep-list names the samples to keep by their stable sample key (``batch["keys"]``:
``"00000.tar/000123"``, ``"pairs.jsonl:7"``, ``"cat/001.jpg"``, ``"shapes:42"``). It is a
Parquet file with a ``key`` column (what ``clipforge data dedup|reduce`` write) or a text file
with one key per line.

How each source filters (nothing is rewritten, the plan of ``clipforge.data.pipeline`` stays
exact because it only ever sees the kept sizes):

- tables and image folders: every row/image is a part of one sample; rows not kept are dropped
  when the source is opened.
- ``wds:`` shards: the sample keys of each shard are read once from the tar headers (no image
  bytes are read); a shard's size becomes its number of kept samples and reading a shard skips
  the others. Shards need to be local files for the header scan.
- ``shapes``: the endless index space becomes the sorted kept indices, repeated: global sample
  position p renders index ``kept[p % len(kept)]`` (still a pure function of p: exact resume,
  and ranks split positions as before).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from clipforge.data.sources import DataError

KEY_COLUMN = "key"


def read_keep_list(path: str | Path) -> list[str]:
    """The keys of a keep-list file (Parquet ``key`` column, or text: one key per line), in file order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.keep: keep-list {path} not found; write one with `clipforge data dedup` or "
                        f"`clipforge data reduce`, or pass a text file with one sample key per line")
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("data.keep: a .parquet keep-list needs pyarrow: pip install 'clipforge[index]' "
                            "(or pass a .txt keep-list, one key per line)") from None
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as e:
            raise DataError(f"data.keep: {path} is not a readable Parquet file ({str(e)[:120]})") from None
        if KEY_COLUMN not in table.column_names:
            raise DataError(f"data.keep: {path} has no '{KEY_COLUMN}' column (columns: {', '.join(table.column_names)}); "
                            "a keep-list holds the stable sample keys to keep in a 'key' column")
        keys = [str(k) for k in table.column(KEY_COLUMN).to_pylist() if k is not None]
    else:
        keys = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not keys:
        raise DataError(f"data.keep: {path} lists no sample key; an empty keep-list would train on nothing")
    return keys


def keep_fingerprint(path: str | Path) -> str:
    """``path#sha1`` of the file: a resumed run notices when the keep-list changed under it."""
    digest = hashlib.sha1(Path(path).expanduser().read_bytes()).hexdigest()[:12]
    return f"{path}#{digest}"


def write_keep_list(path: str | Path, keys: list[str], extra: dict[str, list] | None = None) -> Path:
    """Write a Parquet keep-list (``key`` plus optional columns such as the cluster id)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({KEY_COLUMN: list(keys), **(extra or {})}), path)
    return path


# ----------------------------------------------------------------------------- filtering sources
def filter_sources(sources: list, keep: set[str]) -> None:
    """Restrict every opened source (tables, folders, shards) to the kept keys, in place."""
    from clipforge.data.pipeline import ImageFolderSource, TableSource, TarShardSource

    found = 0
    for src in sources:
        if isinstance(src, TarShardSource):
            found += _filter_shards(src, keep)
        elif isinstance(src, (TableSource, ImageFolderSource)):
            found += _filter_rows(src, keep)
        else:  # pragma: no cover - every disk source is one of the above
            raise DataError(f"data.keep cannot filter source {src.spec}")
    if found == 0:
        example = next(iter(keep))
        raise DataError(f"data.keep: none of the {len(keep)} keys (e.g. {example!r}) is a sample key of data.train; "
                        "was the keep-list made for this data? Keys look like '00000.tar/000123', "
                        "'pairs.jsonl:7' or 'cat/001.jpg'")


def _row_keys(src) -> list[str]:
    from clipforge.data.pipeline import TableSource

    if isinstance(src, TableSource):
        return [src.ids[i] or f"{src.key_name}:{src.lines[i]}" for i in range(len(src.paths))]
    return [src.key_name + rel for rel in src.rel_paths]


def _filter_rows(src, keep: set[str]) -> int:
    """Drop the rows/images whose key is not kept (each per-row list of the source, alike)."""
    rows = [i for i, key in enumerate(_row_keys(src)) if key in keep]
    for name in ("paths", "caption_list", "ids", "lines", "weights", "labels", "rel_paths"):
        values = getattr(src, name, None)
        if isinstance(values, list):
            setattr(src, name, [values[i] for i in rows])
    src.sizes = np.ones(len(rows), dtype=np.int64)
    return len(rows)


def _filter_shards(src, keep: set[str]) -> int:
    """Per shard: the positions (in tar order) of the kept samples; the shard's size becomes their count."""
    from clipforge.data.pipeline import tar_sample_keys

    kept = []
    for part, path in enumerate(src.key_paths()):
        if "://" in path or path.startswith("pipe:"):
            raise DataError(f"data.keep needs local shards to read their keys from the tar headers; {path} is not "
                            "local. Copy the shards to local disk, or write the kept samples as new shards")
        prefix = f"{src.key_names[part]}/"
        keys = tar_sample_keys(path) if Path(path).is_file() else []
        kept.append(np.array([i for i, key in enumerate(keys) if prefix + key in keep], dtype=np.int64))
    src.kept_positions = kept
    src.sizes = np.array([len(k) for k in kept], dtype=np.int64)
    return int(src.sizes.sum())


def shapes_indices(keys: list[str]) -> np.ndarray:
    """Sorted unique sample indices of ``shapes:<i>`` keys (the built-in source's keep-list)."""
    indices = set()
    for key in keys:
        kind, _, index = key.partition(":")
        if kind != "shapes" or not index.isdigit():
            raise DataError(f"data.keep: key {key!r} is not a key of the built-in shapes source; "
                            "its keys are 'shapes:<index>' (e.g. shapes:42)")
        indices.add(int(index))
    return np.array(sorted(indices), dtype=np.int64)
