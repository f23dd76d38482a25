"""Lexical (inverted-index) search over the sparse vocabulary weights of a LexLIP model.

    clipforge embed CKPT --data ... --out emb/ --sparse      # top-k weights per item (scipy CSR .npz shards)
    clipforge index emb/ --kind lexical --out idx/            # posting lists over the vocabulary
    clipforge serve idx/                                      # same API as a dense index, plus the top words

Two back ends, both libraries built for sparse retrieval (see docs/methods/lexlip.md for the measurement
behind the default):

- ``scipy`` (default): one posting list (doc positions + weights) per vocabulary word, as a SciPy CSR
  matrix; a query's sparse x sparse product touches only the posting lists of its non-zero words,
  so the scores are the exact dot products of the sparse vectors.
- ``seismic`` (``pip install pyseismic-lsr``): Seismic (Bruch et al., SIGIR 2024), posting lists pruned
  and grouped into blocks with summary vectors; approximate, its recall@10 against exact search
  is measured at build time like FAISS's approximate kinds.

Layout of a lexical index directory::

    postings.npz       vocabulary x documents, CSR: one posting list per word (exact search; /similar, top words)
    index.seismic      the Seismic index (seismic back end only)
    ids.npy            item id of each row
    metadata.parquet   id, image, caption (as for a dense index)
    vocab.json         the word of each vocabulary id (for showing a vector's top words)
    index.json         kind "lexical", back end, count, dim (= vocabulary size), average non-zeros, recall@10
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.index.dense import IDS_FILE, INFO_FILE, META_FILE, SearchIndexError, _read_ids, recall_at_k
from clipforge.outputs import new_output_dir

POSTINGS_FILE = "postings.npz"
SEISMIC_FILE = "index.seismic"
VOCAB_FILE = "vocab.json"
BACKENDS = ("scipy", "seismic")
REBUILD = "rebuild it with `clipforge index EMB_DIR --kind lexical --out NEW_DIR` (from a --sparse embedding directory)"


def require_scipy():
    try:
        import scipy.sparse as sp
    except ImportError:
        raise SearchIndexError("lexical indexes need scipy: pip install 'clipforge[lexical]'") from None
    return sp


def require_seismic():
    try:
        import seismic
    except ImportError:
        raise SearchIndexError("the seismic back end needs pyseismic-lsr: pip install 'clipforge[lexical]'") from None
    return seismic


@contextlib.contextmanager
def quiet_stdout():
    """Send file descriptor 1 to stderr for a while: Seismic's Rust code prints progress to stdout,
    which would mix into the JSON that `clipforge index` and the benchmarks print."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# ----------------------------------------------------------------------------- embedding side
class SparseEncoder:
    """A LexLIP model seen through the embedding loop: ``encode_*`` give the top-k lexical weights as
    dense N x |V| rows (zeros elsewhere), which ``clipforge embed --sparse`` stores as CSR shards."""

    def __init__(self, model):
        if not getattr(model.cfg, "lexical_head", False):
            raise SearchIndexError("--sparse needs a model with lexical heads (trained with model.lexical_head = "
                                   "true, e.g. the lexlip-shapes recipe); this checkpoint has none")
        self.model = model
        self.cfg = model.cfg.model_copy(update={"embed_dim": model.cfg.vocab_size})

    def parameters(self):
        return self.model.parameters()

    def encode_image(self, images):
        return self.model.encode_image(images, sparse=True).to_dense()

    def encode_text(self, input_ids, attention_mask=None):
        return self.model.encode_text(input_ids, attention_mask, sparse=True).to_dense()


def to_csr(rows: np.ndarray, dtype: str = "float32"):
    """Dense N x V rows (mostly zeros) -> scipy CSR of ``dtype``."""
    return require_scipy().csr_matrix(rows.astype(dtype))


def load_sparse_embeddings(emb_dir: str | Path, kind: str = "images"):
    """``(float32 CSR N x V, pyarrow metadata table, manifest)`` of a finished ``embed --sparse`` directory."""
    sp = require_scipy()
    import pyarrow.parquet as pq

    from clipforge.index.embed import MANIFEST, EmbedError, _read_manifest

    emb_dir = Path(emb_dir)
    if not (emb_dir / MANIFEST).is_file():
        raise EmbedError(f"{emb_dir} is not an embedding directory ({MANIFEST} missing); run `clipforge embed` first")
    manifest = _read_manifest(emb_dir / MANIFEST)
    if not manifest.get("sparse"):
        raise EmbedError(f"{emb_dir} holds dense embeddings; a lexical index needs sparse ones: "
                         "`clipforge embed CKPT --data ... --out NEW_DIR --sparse` (a model with lexical heads)")
    if not manifest.get("complete"):
        raise EmbedError(f"{emb_dir} is unfinished; rerun the same `clipforge embed` command to complete it")
    shards = sorted((emb_dir / kind).glob("shard_*.npz"))
    if not shards:
        raise EmbedError(f"{emb_dir} has no {kind} embeddings")
    parts = []
    for path in shards:
        try:
            parts.append(sp.load_npz(path))  # np.load underneath with allow_pickle=False
        except (OSError, ValueError, KeyError) as e:
            raise EmbedError(f"{path} is damaged or not a sparse shard ({str(e)[:160]}); re-embed into a new "
                             "--out directory") from None
    matrix = sp.vstack(parts, format="csr").astype(np.float32)
    table = pq.read_table(emb_dir / f"{kind}.parquet")
    if table.num_rows != matrix.shape[0]:
        raise EmbedError(f"{emb_dir}: {kind}.parquet has {table.num_rows} rows but the shards hold {matrix.shape[0]}")
    return matrix, table, manifest


# ----------------------------------------------------------------------------- search
class PostingLists:
    """Exact inverted-index search. ``lists`` is vocabulary x documents in CSR: row v is word v's
    posting list (document positions and weights). ``queries @ lists`` (scipy's sparse x sparse
    product) walks only the posting lists of each query's non-zero words, accumulating scores
    term at a time, so the scores are the exact dot products of the sparse vectors."""

    def __init__(self, lists):
        self.lists = require_scipy().csr_matrix(lists, dtype=np.float32)
        self.lists.sort_indices()

    @classmethod
    def from_documents(cls, docs) -> "PostingLists":
        return cls(require_scipy().csr_matrix(docs, dtype=np.float32).T)

    @property
    def num_docs(self) -> int:
        return self.lists.shape[1]

    def documents(self):
        """documents x vocabulary, CSR (each document's stored weights)."""
        return self.lists.T.tocsr()

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``queries``: CSR (or dense) Q x V -> (Q x k scores, Q x k positions; -1 past the matches)."""
        sp = require_scipy()
        matches = (sp.csr_matrix(queries, dtype=np.float32) @ self.lists).tocsr()  # Q x N, matched docs only
        k = min(k, self.num_docs)
        scores = np.zeros((matches.shape[0], k), dtype=np.float32)
        positions = np.full((matches.shape[0], k), -1, dtype=np.int64)
        for row in range(matches.shape[0]):
            start, end = matches.indptr[row], matches.indptr[row + 1]
            found, docs = matches.data[start:end], matches.indices[start:end]
            if len(found) > k:
                keep = np.argpartition(-found, k - 1)[:k]
                found, docs = found[keep], docs[keep]
            order = np.lexsort((docs, -found))  # by score, then position: deterministic
            scores[row, :len(order)], positions[row, :len(order)] = found[order], docs[order]
        return scores, positions

    def nbytes(self) -> int:
        return csr_bytes(self.lists)


class SeismicPostings:
    """Seismic's approximate search over the same vectors (documents keyed by their row)."""

    def __init__(self, index, query_cut: int, heap_factor: float):
        self.index, self.query_cut, self.heap_factor = index, query_cut, heap_factor

    @classmethod
    def build(cls, docs, *, n_postings: int = 3500, centroid_fraction: float = 0.1, summary_energy: float = 0.4,
              query_cut: int = 64, heap_factor: float = 0.9) -> "SeismicPostings":
        seismic = require_seismic()
        docs = require_scipy().csr_matrix(docs, dtype=np.float32)
        string = seismic.get_seismic_string()
        dataset = seismic.SeismicDataset()
        for row in range(docs.shape[0]):
            start, end = docs.indptr[row], docs.indptr[row + 1]
            words = docs.indices[start:end].astype(str).astype(string)
            dataset.add_document(str(row), words, docs.data[start:end].astype(np.float32))
        with quiet_stdout():
            index = seismic.SeismicIndex.build_from_dataset(dataset, n_postings=n_postings,
                                                            centroid_fraction=centroid_fraction,
                                                            summary_energy=summary_energy)
        return cls(index, query_cut, heap_factor)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        seismic = require_seismic()
        queries = require_scipy().csr_matrix(queries, dtype=np.float32)
        string = seismic.get_seismic_string()
        words, weights = [], []
        for row in range(queries.shape[0]):
            start, end = queries.indptr[row], queries.indptr[row + 1]
            words.append(queries.indices[start:end].astype(str).astype(string))
            weights.append(queries.data[start:end].astype(np.float32))
        found = self.index.batch_search(np.array([str(i) for i in range(len(words))], dtype=string), words, weights,
                                        k=k, query_cut=self.query_cut, heap_factor=self.heap_factor)
        scores = np.full((len(words), k), -np.inf, dtype=np.float32)
        positions = np.full((len(words), k), -1, dtype=np.int64)
        for q, hits in enumerate(found):
            for j, (_, score, doc) in enumerate(hits[:k]):
                scores[q, j], positions[q, j] = score, int(doc)
        return scores, positions


# ----------------------------------------------------------------------------- building
def vocabulary_words(checkpoint: str | Path | None, size: int) -> list[str]:
    """The word of each vocabulary id (from the checkpoint's tokenizer); "#id" where none is known."""
    words = [f"#{i}" for i in range(size)]
    if checkpoint and (Path(checkpoint) / "config.json").is_file():
        from clipforge.models.tokenizer import load_tokenizer
        from clipforge.train import checkpoint as ckpt

        tokenizer = load_tokenizer(ckpt.read_config(Path(checkpoint))["tokenizer"], checkpoint)
        for i in range(min(size, tokenizer.vocab_size)):
            words[i] = tokenizer.decode([i]).strip() or words[i]  # special tokens decode to ""
    return words


def quantize_weights(docs, scale: float):
    """LexLIP's (and Anserini's) integer term impacts: each weight as round(w x ``scale``), uint8 when every
    impact fits (else uint16); weights that round to 0 leave the posting lists. CSR in, CSR out."""
    impacts = docs.copy()
    impacts.data = np.rint(impacts.data * scale)
    top = float(impacts.data.max()) if impacts.nnz else 0.0
    if top > np.iinfo(np.uint16).max:
        raise SearchIndexError(f"--quantize {scale}: the largest weight becomes {top:.0f}, more than a uint16 "
                               "holds; use a smaller scale")
    impacts.data = impacts.data.astype(np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16)
    impacts.eliminate_zeros()
    return impacts


def build_lexical_index_dir(emb_dir: str | Path, out: str | Path, *, what: str = "images", backend: str = "scipy",
                            num_queries: int = 1000, k: int = 10, quantize: float | None = None) -> dict[str, Any]:
    """Index a ``--sparse`` embedding directory; measure the back end's recall@k against exact search.

    ``quantize``: store integer impacts round(w x quantize) (``quantize_weights``) instead of float32
    weights; search scores are divided by it again, and recall@k is then also measured against exact
    search on the float32 weights."""
    if backend not in BACKENDS:
        raise SearchIndexError(f"unknown lexical back end {backend!r}; choose one of {', '.join(BACKENDS)}")
    if quantize is not None and quantize <= 0:
        raise SearchIndexError(f"--quantize is a positive scale (LexLIP's impacts: 100), got {quantize}")
    out = new_output_dir(out)
    docs, table, manifest = load_sparse_embeddings(emb_dir, what)
    ids = np.asarray(table.column("id").to_pylist(), dtype=np.int64)
    float_docs, impacts = docs, None
    if quantize is not None:  # search runs on the dequantized impacts: what the stored index holds
        impacts = quantize_weights(docs, quantize)
        docs = impacts.astype(np.float32) / quantize

    start = time.perf_counter()
    exact = PostingLists.from_documents(docs)
    engine = exact if backend == "scipy" else SeismicPostings.build(docs)
    build_seconds = time.perf_counter() - start
    # recall of the back end against exact sparse dot products, the stored vectors as queries
    queries = docs[np.random.default_rng(0).permutation(docs.shape[0])[:num_queries]]
    recall = 1.0 if backend == "scipy" else recall_at_k(engine.search(queries, k)[1], exact.search(queries, k)[1], k)

    recall_float = None
    if impacts is not None:  # what quantizing costs: the index's top k against float32 exact search
        recall_float = recall_at_k(engine.search(queries, k)[1],
                                   PostingLists.from_documents(float_docs).search(queries, k)[1], k)
    out.mkdir(parents=True, exist_ok=True)
    stored = exact.lists if impacts is None else impacts.T.tocsr()
    require_scipy().save_npz(out / POSTINGS_FILE, stored, compressed=False)
    if backend == "seismic":
        with quiet_stdout():
            engine.index.save(str(out / "index"))  # writes index.index.seismic
        (out / "index.index.seismic").rename(out / SEISMIC_FILE)
    np.save(out / IDS_FILE, ids)
    import pyarrow.parquet as pq

    pq.write_table(table.select([c for c in ("id", "image", "caption") if c in table.column_names]), out / META_FILE)
    (out / VOCAB_FILE).write_text(json.dumps(vocabulary_words(manifest.get("checkpoint"), docs.shape[1])))
    nnz = np.diff(docs.indptr)
    info = {"kind": "lexical", "backend": backend, "what": what, "count": int(docs.shape[0]),
            "dim": int(docs.shape[1]), "avg_nonzeros": round(float(nnz.mean()), 3), f"recall@{k}": recall,
            "queries": int(queries.shape[0]), "build_seconds": round(build_seconds, 3),
            "index_bytes": (csr_bytes(stored) if backend == "scipy" else _file_bytes(out / SEISMIC_FILE)),
            "quantize": quantize, "checkpoint": manifest["checkpoint"], "embeddings": str(Path(emb_dir).resolve())}
    if quantize is not None:
        info.update({"impact_dtype": str(impacts.dtype), f"recall@{k}_vs_float32": recall_float,
                     "avg_nonzeros_float32": round(float(np.diff(float_docs.indptr).mean()), 3)})
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def csr_bytes(matrix) -> int:
    return int(matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes)


def _file_bytes(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# ----------------------------------------------------------------------------- loading
class LexicalIndex:
    """A built lexical index directory, with the ``DenseIndex`` interface the server uses."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.directory = directory
        try:
            self.info = json.loads((directory / INFO_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SearchIndexError(f"{directory / INFO_FILE} is missing or damaged ({type(e).__name__}); "
                                   f"{REBUILD}") from None
        try:
            exact = PostingLists(require_scipy().load_npz(directory / POSTINGS_FILE))
            if self.info.get("quantize"):  # integer impacts -> the weights they stand for
                exact.lists.data /= float(self.info["quantize"])
        except (OSError, ValueError, KeyError) as e:
            raise SearchIndexError(f"{directory / POSTINGS_FILE} is missing or damaged ({str(e)[:120]}); "
                                   f"{REBUILD}") from None
        self.postings = exact
        self.engine = exact
        if self.info.get("backend") == "seismic":
            seismic = require_seismic()
            try:
                with quiet_stdout():
                    index = seismic.SeismicIndex.load(str(directory / SEISMIC_FILE))
            except (OSError, ValueError, RuntimeError) as e:
                raise SearchIndexError(f"{directory / SEISMIC_FILE} cannot be read ({str(e)[:120]}); {REBUILD}") from None
            self.engine = SeismicPostings(index, query_cut=64, heap_factor=0.9)
        self.ids = _read_ids(directory / IDS_FILE, exact.num_docs)
        self.dim = exact.lists.shape[0]
        try:
            self.words = json.loads((directory / VOCAB_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.words = [f"#{i}" for i in range(self.dim)]  # search still works; words show as ids
        self._rows = exact.documents()
        self._position = {int(i): p for p, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return self.postings.num_docs

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Dense or CSR Q x V query weights -> (scores, item ids); -1 pads results past the matches."""
        scores, positions = self.engine.search(np.atleast_2d(queries) if isinstance(queries, np.ndarray) else queries,
                                               min(k, len(self)))
        positions = np.where((scores > 0) & (positions >= 0), positions, -1)  # sharing no word: no match
        ids = np.where(positions >= 0, self.ids[np.clip(positions, 0, None)], -1)
        return scores, ids

    def vector(self, item_id: int) -> np.ndarray | None:
        """The stored weights (dense, |V|) of indexed item ``item_id``, or None."""
        position = self._position.get(item_id)
        return None if position is None else self._rows[position].toarray()[0]

    def top_words(self, weights: np.ndarray, n: int = 8) -> list[tuple[str, float]]:
        """The ``n`` highest-weighted words of a dense |V| vector (non-zero only), best first."""
        order = np.argsort(-weights, kind="stable")[:n]
        return [(self.words[i] if i < len(self.words) else f"#{i}", round(float(weights[i]), 4))
                for i in order if weights[i] > 0]


def open_index(directory: str | Path):
    """The index in ``directory``: a ``LexicalIndex`` when index.json says kind "lexical", else a ``DenseIndex``."""
    from clipforge.index.dense import DenseIndex

    try:
        kind = json.loads((Path(directory) / INFO_FILE).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None  # DenseIndex gives the precise error
    return LexicalIndex(directory) if kind == "lexical" else DenseIndex(directory)
