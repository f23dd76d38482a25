"""Dense search over unit-norm embeddings with FAISS (inner product = cosine similarity).

    clipforge index emb/ --kind flat|ivf|hnsw --out idx/

- ``flat``: exact search; right for up to a few hundred thousand vectors.
- ``ivf``: vectors bucketed by k-means (``nlist`` buckets); a query scans the ``nprobe`` nearest.
- ``hnsw``: a navigable small-world graph; no training, more memory, fast queries.

Approximate kinds are measured against exact search on held-out queries: rows are held out of
the index while recall@10 is measured and added back afterwards, so a query never finds itself.

Layout of an index directory::

    index.faiss      the FAISS index (position p holds item ids.npy[p])
    ids.npy          item id of each position
    metadata.parquet id, image, caption of the indexed items (copied from the embedding directory)
    index.json       kind, parameters, count, dim, recall@10, checkpoint, embedding directory
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.outputs import load_array_no_pickle, new_output_dir, read_json_object

INDEX_KINDS = ("flat", "ivf", "hnsw")
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
META_FILE = "metadata.parquet"
INFO_FILE = "index.json"


class SearchIndexError(ValueError):
    """An index that cannot be built or read as asked; the message says what to do."""


def require_faiss():
    try:
        import faiss
    except ImportError:
        raise SearchIndexError("indexing needs faiss: pip install 'clipforge[index]' (faiss-cpu)") from None
    return faiss


def default_nlist(n: int) -> int:
    # FAISS's rule of thumb: ~4 sqrt(N) lists, and >= 39 training points per list
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_index(vectors: np.ndarray, kind: str, *, nlist: int | None = None, nprobe: int = 16,
                hnsw_m: int = 32, ef_search: int = 64, ef_construction: int = 80, seed: int = 0):
    """A FAISS inner-product index over float32 ``vectors`` (N x E), with its search parameters set."""
    faiss = require_faiss()
    if kind not in INDEX_KINDS:
        raise SearchIndexError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = nlist or default_nlist(n)
        if nlist > n:
            raise SearchIndexError(f"--nlist {nlist} is more than the {n} vectors to cluster; use a smaller --nlist")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        # 64 points per list is plenty for k-means and bounds training time on large sets
        sample = vectors if n <= 64 * nlist else vectors[np.random.default_rng(seed).choice(n, 64 * nlist, replace=False)]
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
    else:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    index.add(vectors)
    return index


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    faiss = require_faiss()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-k that the approximate top-k also returns."""
    hits = [len(set(f[:k].tolist()) & set(e[:k].tolist()) - {-1}) for f, e in zip(found, exact)]
    return float(np.mean(hits) / k)


def split_held_out(n: int, num_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indexed rows, held-out rows): at most a tenth of the data is held out."""
    num_queries = max(1, min(num_queries, n // 10)) if n >= 20 else 0
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[num_queries:]), np.sort(order[:num_queries])


def build_index_dir(emb_dir: str | Path, out: str | Path, *, kind: str = "flat", what: str = "images",
                    nlist: int | None = None, nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 64,
                    num_queries: int = 1000, k: int = 10) -> dict[str, Any]:
    """Index an embedding directory; measure recall@k of approximate kinds vs exact search."""
    from clipforge.index.embed import load_embeddings

    faiss = require_faiss()
    if kind not in INDEX_KINDS:
        raise SearchIndexError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    out = new_output_dir(out)
    vectors, table, manifest = load_embeddings(emb_dir, what)
    ids = np.asarray(table.column("id").to_pylist(), dtype=np.int64)

    start = time.perf_counter()
    kept, held = split_held_out(len(vectors), num_queries)
    index = build_index(vectors[kept], kind, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search)
    recall = None
    if len(held):
        queries = vectors[held]
        kk = min(k, len(kept))
        if kind == "flat":
            recall = 1.0  # exact by construction
        else:
            found = index.search(queries, kk)[1]
            recall = recall_at_k(found, exact_neighbours(vectors[kept], queries, kk), kk)
        index.add(np.ascontiguousarray(queries))  # held-out rows join the index after measuring
    build_seconds = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / INDEX_FILE))
    np.save(out / IDS_FILE, np.concatenate([ids[kept], ids[held]]))
    import pyarrow.parquet as pq

    pq.write_table(table.select([c for c in ("id", "image", "caption") if c in table.column_names]), out / META_FILE)
    info = {
        "kind": kind, "what": what, "count": int(len(vectors)), "dim": int(vectors.shape[1]),
        f"recall@{k}": recall, "queries": int(len(held)), "build_seconds": round(build_seconds, 3),
        "params": {"nlist": getattr(index, "nlist", None), "nprobe": getattr(index, "nprobe", None),
                   "hnsw_m": hnsw_m if kind == "hnsw" else None, "ef_search": ef_search if kind == "hnsw" else None},
        "checkpoint": manifest["checkpoint"], "embeddings": str(Path(emb_dir).resolve()),
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


class DenseIndex:
    """A built index directory, loaded for search: ``search(queries, k) -> (scores, ids)``."""

    def __init__(self, directory: str | Path):
        faiss = require_faiss()
        directory = Path(directory)
        if not (directory / INFO_FILE).is_file() or not (directory / INDEX_FILE).is_file():
            raise SearchIndexError(f"{directory} is not an index directory; build one with `clipforge index`")
        self.directory = directory
        self.info = _read_info(directory / INFO_FILE)
        try:
            self.index = faiss.read_index(str(directory / INDEX_FILE))
        except (RuntimeError, MemoryError) as e:
            # FAISS reports a short or corrupt file as a RuntimeError naming C++ source lines; keep its reason
            reason = str(e).rsplit("Error: ", 1)[-1].strip()[:160] or type(e).__name__
            raise SearchIndexError(
                f"{directory / INDEX_FILE} is damaged or truncated and FAISS cannot read it ({reason}); "
                f"{REBUILD}") from None
        params = self.info.get("params") or {}
        if hasattr(self.index, "nprobe"):  # IVF (asked of the index itself, in case index.json disagrees)
            if params.get("nprobe"):
                self.index.nprobe = params["nprobe"]
            self.index.make_direct_map()  # so vector(id) can reconstruct stored vectors (search by an item)
        if hasattr(self.index, "hnsw") and params.get("ef_search"):
            self.index.hnsw.efSearch = params["ef_search"]
        self.ids = _read_ids(directory / IDS_FILE, self.index.ntotal)
        self.dim = self.index.d
        self._sorted = None  # (order, sorted ids), built on the first vector() call

    def vector(self, item_id: int) -> np.ndarray | None:
        """The stored (unit-norm) vector of indexed item ``item_id``, or None if it is not indexed."""
        if self._sorted is None:
            order = np.argsort(self.ids, kind="stable")
            self._sorted = (order, self.ids[order])  # a benign race: two threads build the same arrays
        order, sorted_ids = self._sorted
        if not -2**63 <= item_id < 2**63:  # beyond int64 no id can match (and numpy would overflow)
            return None
        at = int(np.searchsorted(sorted_ids, np.int64(item_id)))
        if at >= len(sorted_ids) or sorted_ids[at] != item_id:
            return None
        return self.index.reconstruct(int(order[at]))

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        scores, positions = self.index.search(queries, min(k, len(self)))
        ids = np.where(positions >= 0, self.ids[np.clip(positions, 0, None)], -1)
        return scores, ids


REBUILD = "rebuild the index with `clipforge index EMB_DIR --out NEW_DIR` (from its embedding directory)"


def _read_info(path: Path) -> dict[str, Any]:
    info = read_json_object(path, SearchIndexError, REBUILD, "a clipforge index description")
    if info.get("kind") not in INDEX_KINDS:
        raise SearchIndexError(f"{path} does not describe a clipforge index (no known \"kind\"); {REBUILD}")
    return info


def _read_ids(path: Path, count: int) -> np.ndarray:
    """ids.npy, refused unless it is a plain integer array with one id per indexed vector."""
    ids = load_array_no_pickle(path, SearchIndexError, REBUILD, "integer ids")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or len(ids) != count:
        raise SearchIndexError(f"{path} holds {ids.dtype} {ids.shape}, not {count} integer ids (one per indexed "
                               f"vector): it does not belong to this index; {REBUILD}")
    return ids.astype(np.int64, copy=False)
