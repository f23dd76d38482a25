"""SemDeDup time and memory vs N on synthetic embeddings (prints one JSON object).

    python bench/dedup.py --sizes 10000 100000 1000000 --dim 64 --timeout 300

Each size runs in its own process (so its peak RSS is its own): N unit vectors around N/50 random
centres (spread 0.3), 10% of them replaced by near-copies of others (noise 0.003), clusters =
sqrt(N) (the command's default), eps 0.01, seed 0. Reported per size: K-means and dedup seconds,
kept count, planted copies, the process RSS before dedup (imports + data) and its peak, and the predicted bytes of
``estimate_memory`` (embeddings + one cosine block of the largest cluster; N x N shown for scale).
A size that does not finish within --timeout seconds is reported as such, not silently dropped.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(n: int, dim: int, seed: int) -> dict:
    import numpy as np

    from clipforge.data.dedup import semdedup

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 50), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)
    copies = rng.choice(n, size=n // 10, replace=False)
    sources = rng.integers(0, n, size=len(copies))
    x[copies] = x[sources] + 0.003 * rng.normal(size=(len(copies), dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    before = _rss_mb()  # imports (torch, faiss) and the data itself, before any dedup work
    start = time.perf_counter()
    result = semdedup(x, eps=0.01, seed=seed)
    total = time.perf_counter() - start
    stats = result.stats
    return {"n": n, "dim": dim, "clusters": stats["clusters"], "largest_cluster": stats["largest_cluster"],
            "kmeans_s": stats["kmeans_seconds"], "dedup_s": stats["dedup_seconds"], "total_s": round(total, 3),
            "kept": stats["kept"], "planted_copies": int(len(copies)),
            "rss_before_dedup_mb": before,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "predicted_mb": round(stats["memory"]["total_bytes"] / 2**20, 1),
            "n_by_n_would_be_gb": round(stats["memory"]["n_by_n_would_be_bytes"] / 2**30, 1)}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return round(int(line.split()[1]) / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.dim, args.seed)))
        return
    results = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--dim", str(args.dim), "--seed", str(args.seed)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        except subprocess.TimeoutExpired:
            results.append({"n": n, "skipped": f"did not finish within {args.timeout:g} s"})
        except subprocess.CalledProcessError as e:
            results.append({"n": n, "failed": e.stderr.strip().splitlines()[-1:]})
    import faiss
    import torch

    print(json.dumps({"bench": "semdedup", "faiss": faiss.__version__, "threads": torch.get_num_threads(),
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
