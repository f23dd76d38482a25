"""Search and embedding benchmark; prints one JSON object.

    .venv/bin/python bench/search.py                      # 100k and 1M vectors, dim 512
    .venv/bin/python bench/search.py --sizes 100000 --queries 500

For each size: random unit vectors (the hardest case for approximate search: no clusters to
exploit), flat (exact) vs IVF vs HNSW: build seconds, single-query latency p50/p99 (ms), and
recall@10 against exact search on held-out queries (drawn from the same distribution, not in the
index). Then the embedding throughput (img/s) of the tiny model on uint8 images. Vectors are
generated in chunks straight into FAISS where possible, so 1M x 512 float32 (2 GB) exists once.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clipforge.index.dense import build_index, default_nlist, recall_at_k  # noqa: E402


def random_unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # chunked: no float64 copy of the whole set
        chunk = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        out[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def latencies_ms(index, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, list[float]]:
    found, times = [], []
    for q in queries:  # one query at a time: what a search request sees
        start = time.perf_counter()
        found.append(index.search(q[None], k)[1][0])
        times.append(1000 * (time.perf_counter() - start))
    return np.stack(found), times


def summary(times: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3)}


def bench_size(n: int, dim: int, num_queries: int, kinds: list[str], nprobe: int, hnsw_m: int, ef_search: int) -> dict:
    vectors = random_unit_vectors(n, dim, seed=0)
    queries = random_unit_vectors(num_queries, dim, seed=1)  # held out: never added to the index
    result: dict = {"n": n, "dim": dim, "queries": num_queries}
    start = time.perf_counter()
    flat = build_index(vectors, "flat")
    result["flat"] = {"build_s": round(time.perf_counter() - start, 2)}
    exact, times = latencies_ms(flat, queries)
    result["flat"].update(summary(times), recall_at_10=1.0)
    del flat
    for kind in kinds:
        start = time.perf_counter()
        index = build_index(vectors, kind, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search)
        entry = {"build_s": round(time.perf_counter() - start, 2)}
        found, times = latencies_ms(index, queries)
        entry.update(summary(times), recall_at_10=round(recall_at_k(found, exact), 4))
        entry["params"] = ({"nlist": index.nlist, "nprobe": index.nprobe} if kind == "ivf"
                           else {"M": hnsw_m, "efSearch": ef_search})
        # a second operating point: how much recall more search effort buys
        if kind == "ivf":
            index.nprobe = min(index.nlist, nprobe * 8)
        else:
            index.hnsw.efSearch = ef_search * 4
        found, times = latencies_ms(index, queries)
        entry["wider"] = {**summary(times), "recall_at_10": round(recall_at_k(found, exact), 4),
                          **({"nprobe": index.nprobe} if kind == "ivf" else {"efSearch": index.hnsw.efSearch})}
        result[kind] = entry
        del index
    return result


def bench_embedding(seconds: float = 5.0, batch: int = 64) -> dict:
    import torch

    from clipforge.config import ModelConfig
    from clipforge.models.clip import CLIP

    cfg = ModelConfig()  # the tiny-shapes model: 64 px, ViT width 192, 6 layers
    model = CLIP(cfg).eval()
    images = torch.randint(0, 256, (batch, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    with torch.inference_mode():
        model.encode_image(images)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.encode_image(images)
            done += batch
    elapsed = time.perf_counter() - start
    return {"model": "tiny-shapes ViT (64 px, width 192, 6 layers)", "batch": batch, "threads": torch.get_num_threads(),
            "img_per_s": round(done / elapsed, 1), "note": "model forward on uint8 tensors; no image decoding"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000, help="queries at sizes below 1M")
    parser.add_argument("--queries-1m", type=int, default=200, help="queries at >= 1M vectors (flat search is slow)")
    parser.add_argument("--kinds", nargs="+", default=["ivf", "hnsw"])
    parser.add_argument("--kinds-1m", nargs="+", default=["ivf"],
                        help="approximate kinds at >= 1M (HNSW takes ~30 min to build 1M x 512 on 2 cores)")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-search", type=int, default=64)
    args = parser.parse_args()

    import faiss

    out = {"bench": "search", "machine": platform.machine(), "faiss": faiss.__version__,
           "faiss_threads": faiss.omp_get_max_threads(), "sizes": []}
    for n in args.sizes:
        q = args.queries_1m if n >= 1_000_000 else args.queries
        kinds = args.kinds_1m if n >= 1_000_000 else args.kinds
        out["sizes"].append(bench_size(n, args.dim, q, kinds, args.nprobe, args.hnsw_m, args.ef_search))
        print(json.dumps(out["sizes"][-1]), file=sys.stderr, flush=True)  # progress: sizes can take minutes
    out["embedding"] = bench_embedding()
    out["default_nlist"] = {n: default_nlist(n) for n in args.sizes}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
