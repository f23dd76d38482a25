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
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out directory")
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
        self.info = json.loads((directory / INFO_FILE).read_text())
        self.index = faiss.read_index(str(directory / INDEX_FILE))
        params = self.info.get("params", {})
        if self.info["kind"] == "ivf" and params.get("nprobe"):
            self.index.nprobe = params["nprobe"]
        if self.info["kind"] == "hnsw" and params.get("ef_search"):
            self.index.hnsw.efSearch = params["ef_search"]
        self.ids = np.load(directory / IDS_FILE)
        self.dim = self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        scores, positions = self.index.search(queries, min(k, len(self)))
        ids = np.where(positions >= 0, self.ids[np.clip(positions, 0, None)], -1)
        return scores, ids
