"""Dense (FAISS flat / HNSW) vs lexical (inverted index) search on the same data; prints one JSON object.

    PYTHONPATH=src python bench/lexical.py --clip runs/clip/checkpoints/latest \
        --lexlip runs/lex/checkpoints/latest --scale 100000,1000000

Text -> image retrieval. For each data set (shapes eval images; the Noto emoji dev set at
``../shared/data/emoji-noto-dev`` when present):

- dense-flat / dense-hnsw: the dense CLIP model's embeddings (exact / HNSW M=32, efSearch=64);
- lexical-scipy / lexical-seismic: the LexLIP model's top-k vocabulary weights in SciPy posting lists
  (exact) / Seismic (approximate); lexical-scipy-qQ: the same posting lists with LexLIP's integer
  impacts round(w x Q) (``index --quantize Q``; bytes as stored, search on the dequantized impacts);

each with index bytes, build seconds, single-query latency p50/p99 (ms), recall@10 against exact
search of the same representation, overlap@10 with dense-flat's top 10, and quality against
ground truth: shapes: precision@10 = fraction of the top 10 with the query's colour-shape class;
emoji: recall@10 = the query's own image in the top 10.

Scale-up: the shapes vectors resampled with noise to N documents (dense: a real vector plus
Gaussian noise, renormalised; lexical: a real sparse vector with jittered weights and a quarter
of its words swapped for words drawn by document frequency), so posting-list lengths follow the
trained model's word distribution. No ground truth there: recall@10 against exact search only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import clipforge  # noqa: E402
from clipforge.index.dense import build_index, recall_at_k, require_faiss  # noqa: E402
from clipforge.index.lexical import (PostingLists, SeismicPostings, csr_bytes, quantize_weights,  # noqa: E402
                                     quiet_stdout, to_csr)

EMOJI = REPO.parent / "shared" / "data" / "emoji-noto-dev"  # ../shared/data relative to the repo (main checkout)


# ----------------------------------------------------------------------------- data and embeddings
def shapes_data(image_size: int, per_class: int, num_queries: int):
    from clipforge.config import ShapesConfig
    from clipforge.data.synthetic import ShapesDataset

    cfg = ShapesConfig(eval_samples_per_class=per_class)
    images, labels = [], []
    for split in ("seen", "unseen"):
        ds = ShapesDataset(cfg, image_size, seed=0, split=split)
        pixels, _, y = ds.render_batch(range(len(ds)))
        images.append(pixels)
        labels.append(y)
    images, labels = torch.cat(images), torch.cat(labels).numpy()
    # queries: captions of held-apart samples (another seed), labelled with their class
    queries = ShapesDataset(cfg, image_size, seed=1, split="seen")
    pick = np.random.default_rng(0).permutation(len(queries))[:num_queries]
    _, captions, query_labels = queries.render_batch(pick)
    return images, labels, captions, query_labels.numpy()


def emoji_data(root: Path, image_size: int):
    from PIL import Image

    from clipforge.data.transforms import EvalPreprocess

    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines() if line.strip()]
    prep = EvalPreprocess(image_size)
    images = torch.stack([prep(Image.open(root / r["image"])) for r in rows])
    return images, [r["text"] for r in rows]


@torch.no_grad()
def embed(model, tokenizer, images, captions, sparse: bool, batch: int = 256):
    image_rows, text_rows = [], []
    for s in range(0, len(images), batch):
        out = model.encode_image(images[s:s + batch], sparse=sparse) if sparse else model.encode_image(images[s:s + batch])
        image_rows.append(out.to_dense() if sparse else out)
    for s in range(0, len(captions), batch):
        ids, mask = tokenizer(captions[s:s + batch])
        out = model.encode_text(ids, mask, sparse=sparse) if sparse else model.encode_text(ids, mask)
        text_rows.append(out.to_dense() if sparse else out)
    return torch.cat(image_rows).float().numpy(), torch.cat(text_rows).float().numpy()


# ----------------------------------------------------------------------------- indexes
def timed_search(search, queries) -> tuple[np.ndarray, list[float]]:
    found, times = [], []
    for q in queries:  # one query at a time: what a search request sees
        start = time.perf_counter()
        found.append(search(q))
        times.append(1000 * (time.perf_counter() - start))
    return np.stack(found), times


def dense_method(kind: str, docs: np.ndarray, queries: np.ndarray) -> tuple[dict, np.ndarray]:
    faiss = require_faiss()
    start = time.perf_counter()
    index = build_index(docs, kind, hnsw_m=32, ef_search=64)
    build_s = time.perf_counter() - start
    found, times = timed_search(lambda q: index.search(q[None], 10)[1][0], queries)
    return {"index_bytes": int(len(faiss.serialize_index(index))), "build_s": round(build_s, 3), **percentiles(times)}, found


def lexical_method(backend: str, docs, queries) -> tuple[dict, np.ndarray]:
    start = time.perf_counter()
    engine = PostingLists.from_documents(docs) if backend == "scipy" else SeismicPostings.build(docs)
    build_s = time.perf_counter() - start
    queries = to_csr(queries)
    found, times = timed_search(lambda q: engine.search(q, 10)[1][0], queries)
    if backend == "scipy":
        size = engine.nbytes()
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp, quiet_stdout():
            engine.index.save(f"{tmp}/i")
            size = sum(p.stat().st_size for p in Path(tmp).iterdir())
    return {"index_bytes": int(size), "build_s": round(build_s, 3), **percentiles(times)}, found


def percentiles(times: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3)}


def compare(image_dense, text_dense, image_lex, text_lex, truth, seismic: bool, joint_dense=None,
            quantize: float = 0) -> dict:
    """Every method on one data set; ``truth(found) -> {metric: value}`` scores results against ground truth.
    ``joint_dense``: the LexLIP model's own dense head (image, text embeddings), searched exactly."""
    out = {}
    if joint_dense is not None:
        _, found = dense_method("flat", *joint_dense)
        out["lexlip-model-dense-flat"] = truth(found)
    flat, flat_found = dense_method("flat", image_dense, text_dense)
    out["dense-flat"] = {**flat, "recall@10_vs_exact": 1.0, **truth(flat_found)}
    hnsw, found = dense_method("hnsw", image_dense, text_dense)
    out["dense-hnsw"] = {**hnsw, "recall@10_vs_exact": round(recall_at_k(found, flat_found), 4),
                         **truth(found)}
    docs = to_csr(image_lex)
    exact, exact_found = lexical_method("scipy", docs, text_lex)
    out["lexical-scipy"] = {**exact, "recall@10_vs_exact": 1.0,
                            "overlap@10_vs_dense_flat": round(recall_at_k(exact_found, flat_found), 4),
                            **truth(exact_found)}
    if quantize:
        impacts = quantize_weights(docs, quantize)
        timing, found = lexical_method("scipy", impacts.astype(np.float32) / quantize, text_lex)
        out[f"lexical-scipy-q{quantize:g}"] = {
            **timing, "index_bytes": csr_bytes(impacts.T.tocsr()), "impact_dtype": str(impacts.dtype),
            "avg_nonzeros_images": round(float(np.diff(impacts.indptr).mean()), 2),
            "recall@10_vs_exact": round(recall_at_k(found, exact_found), 4),
            "overlap@10_vs_dense_flat": round(recall_at_k(found, flat_found), 4), **truth(found)}
    if seismic:
        approx, found = lexical_method("seismic", docs, text_lex)
        out["lexical-seismic"] = {**approx, "recall@10_vs_exact": round(recall_at_k(found, exact_found), 4),
                                  "overlap@10_vs_dense_flat": round(recall_at_k(found, flat_found), 4), **truth(found)}
    out["avg_nonzeros"] = {"images": round(float((image_lex > 0).sum(1).mean()), 2),
                           "texts": round(float((text_lex > 0).sum(1).mean()), 2)}
    return out


# ----------------------------------------------------------------------------- scale-up
def resample_dense(base: np.ndarray, n: int, rng) -> np.ndarray:
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        chunk = base[rng.integers(0, len(base), m)] + 0.1 * rng.standard_normal((m, base.shape[1]), dtype=np.float32)
        out[s:s + m] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def resample_sparse(base, n: int, rng):
    """Rows of ``base`` (CSR) with weights x lognormal(0, 0.25) and 25% of words redrawn by document frequency."""
    import scipy.sparse as sp

    vocab = base.shape[1]
    df = np.bincount(base.indices, minlength=vocab).astype(np.float64)
    df /= df.sum()
    rows = rng.integers(0, base.shape[0], n)
    counts = np.diff(base.indptr)[rows]
    starts = base.indptr[rows]
    idx = np.repeat(starts, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    words = base.indices[idx].copy()
    weights = base.data[idx] * rng.lognormal(0.0, 0.25, len(idx)).astype(np.float32)
    swap = rng.random(len(words)) < 0.25
    words[swap] = rng.choice(vocab, swap.sum(), p=df)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    matrix = sp.csr_matrix((weights.astype(np.float32), words, indptr), shape=(n, vocab))
    matrix.sum_duplicates()  # a redrawn word that was already there: one entry
    return matrix


def scale_up(image_dense, text_dense, image_lex, text_lex, sizes, seismic: bool, hnsw_max: int) -> list[dict]:
    rng = np.random.default_rng(0)
    base = to_csr(image_lex)
    results = []
    for n in sizes:
        start = time.perf_counter()
        dense, sparse = resample_dense(image_dense, n, rng), resample_sparse(base, n, rng)
        row = {"n": n, "generate_s": round(time.perf_counter() - start, 1)}
        flat, flat_found = dense_method("flat", dense, text_dense)
        row["dense-flat"] = {**flat, "recall@10_vs_exact": 1.0}
        if n <= hnsw_max:
            hnsw, found = dense_method("hnsw", dense, text_dense)
            row["dense-hnsw"] = {**hnsw, "recall@10_vs_exact": round(recall_at_k(found, flat_found), 4)}
        del dense
        exact, exact_found = lexical_method("scipy", sparse, text_lex)
        row["lexical-scipy"] = {**exact, "recall@10_vs_exact": 1.0}
        if seismic:
            approx, found = lexical_method("seismic", sparse, text_lex)
            row["lexical-seismic"] = {**approx, "recall@10_vs_exact": round(recall_at_k(found, exact_found), 4)}
        row["avg_nonzeros"] = round(float(np.diff(sparse.indptr).mean()), 2)
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # progress: a size at a time
    return results


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", required=True, help="dense CLIP checkpoint (e.g. a tiny-shapes run's latest)")
    parser.add_argument("--lexlip", required=True, help="LexLIP checkpoint (model.lexical_head = true)")
    parser.add_argument("--per-class", type=int, default=100, help="shapes eval images per class")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--scale", default="100000,1000000", help="comma-separated synthetic sizes ('' for none)")
    parser.add_argument("--hnsw-max", type=int, default=300_000, help="skip HNSW above this size (build time)")
    parser.add_argument("--emoji", type=Path, default=EMOJI, help="the emoji dev set (captions.jsonl + images/)")
    parser.add_argument("--no-seismic", action="store_true")
    parser.add_argument("--quantize", type=float, default=100.0, help="also the integer-impact index at this scale (0: not)")
    parser.add_argument("--top-k", type=int, default=None, help="override the model's lexical_top_k")
    parser.add_argument("--threads", type=int, default=1, help="torch / FAISS threads (1: per-query latency)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    require_faiss().omp_set_num_threads(args.threads)
    import importlib.util

    seismic = not args.no_seismic and importlib.util.find_spec("seismic") is not None
    clip, _, clip_tok = clipforge.load(args.clip)
    lex, _, lex_tok = clipforge.load(args.lexlip)
    if not lex.cfg.lexical_head:
        raise SystemExit(f"{args.lexlip} has no lexical heads; train it with the lexlip-shapes recipe")
    if args.top_k is not None:
        lex.cfg.lexical_top_k = args.top_k
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
              "clip": str(args.clip), "lexlip": str(args.lexlip), "lexical_top_k": lex.cfg.lexical_top_k,
              "vocab_size": lex.cfg.vocab_size, "embed_dim": clip.cfg.embed_dim}

    images, labels, captions, query_labels = shapes_data(clip.cfg.image_size, args.per_class, args.queries)
    image_dense, text_dense = embed(clip, clip_tok, images, captions, sparse=False)
    image_lex, text_lex = embed(lex, lex_tok, images, captions, sparse=True)

    def shapes_truth(found):
        return {"precision@10": round(float(np.mean(labels[found] == query_labels[:, None])), 4)}

    joint = embed(lex, lex_tok, images, captions, sparse=False)
    report["shapes"] = {"docs": len(images), "queries": len(captions),
                        **compare(image_dense, text_dense, image_lex, text_lex, shapes_truth, seismic, joint,
                                  args.quantize)}

    if (args.emoji / "captions.jsonl").is_file():
        e_images, e_captions = emoji_data(args.emoji, clip.cfg.image_size)
        e_dense, e_text_dense = embed(clip, clip_tok, e_images, e_captions, sparse=False)
        e_lex, e_text_lex = embed(lex, lex_tok, e_images, e_captions, sparse=True)

        def emoji_truth(found):
            return {"recall@10": round(float(np.mean([i in row for i, row in enumerate(found)])), 4)}

        joint = embed(lex, lex_tok, e_images, e_captions, sparse=False)
        report["emoji"] = {"docs": len(e_images), "queries": len(e_captions),
                           **compare(e_dense, e_text_dense, e_lex, e_text_lex, emoji_truth, seismic, joint,
                                   args.quantize)}
    else:
        report["emoji"] = f"skipped: {args.emoji} not found (pass --emoji DIR)"

    sizes = [int(s) for s in args.scale.split(",") if s.strip()]
    report["scale_up"] = scale_up(image_dense, text_dense, image_lex, text_lex, sizes, seismic, args.hnsw_max)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
