"""SemDeDup (Abbas et al. 2023): drop semantic near-duplicates, keep a list of the rest.

    clipforge data dedup wds:shards/{00000..00099}.tar --model ckpt/ --eps 0.05 --out keep.parquet

1. Embed every image (``embed_source_samples``: the one embedding loop over a training source,
   keyed by the loader's sample keys), or read a teacher cache (``clipforge embed --teacher-cache``).
2. Spherical K-means with FAISS (fixed seed: the same labels every run).
3. Inside each cluster, order the items by cosine to the centroid, *least* similar first (the
   paper's default "hard" order: the member kept is the one farthest from the centroid).
4. Item j is removed when some earlier item i of its cluster has cos(i, j) > 1 - eps, exactly the
   paper's rule (max over the strict upper triangle of the cluster's cosine matrix, per column).
   An exact duplicate (cos = 1) always collapses to one item, and a larger eps never keeps more.

Memory: the N x E embeddings (float32) plus one block of ``largest cluster x block`` cosines at a
time (``BLOCK`` columns); never an N x N matrix. ``estimate_memory`` states it before running.

Outputs: the keep-list (Parquet ``key``, ``cluster``), ``<out stem>.clusters.parquet`` (every
sample: key, cluster, cosine to centroid, kept, duplicate_of, its cosine) so the labels are kept,
and ``<out stem>.report.json`` plus ``<out stem>.pairs.png`` (removed items next to the item that
made them go).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipforge.data.sources import DataError

BLOCK = 1024  # columns of a cluster's cosine matrix computed at once
EXACT_TOLERANCE = 1e-5  # float32 cosines of identical unit vectors land a few ulps below 1
KMEANS_ITERATIONS = 20  # the paper runs 100 at LAION scale; 20 converge on the sizes a CPU sees
ORDERS = ("hard", "easy", "random")  # who is kept in a group of near-duplicates (see cluster_order)


# ----------------------------------------------------------------------------- arguments, checked first
def check_source(data: str) -> None:
    """A training source string parsed before anything is embedded (the parser's own words say what is wrong)."""
    from clipforge.data.mixture import parse_train_spec

    try:
        parse_train_spec(data)
    except ValueError as e:
        reason = str(e).removeprefix("data.train: ").removeprefix("data.train ")
        raise DataError(f"source {data!r}: {reason}") from None


def check_clusters(clusters: int | None) -> None:
    if clusters is not None and clusters < 1:
        raise DataError(f"--clusters must be >= 1, got {clusters}; leave it out for about sqrt(N) clusters")


def check_eps(eps: float) -> None:
    if not 0.0 <= eps < 1.0:
        raise DataError(f"--eps must be in [0, 1): items with cosine above 1 - eps are duplicates; got {eps}")


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise DataError(f"--order must be {', '.join(ORDERS[:-1])} or {ORDERS[-1]}, got {order!r}")


# ----------------------------------------------------------------------------- embeddings of a source
@dataclass
class SourceEmbeddings:
    keys: list[str]
    images: np.ndarray  # N x E float32, unit norm
    texts: np.ndarray | None = None  # N x E (first caption), when known
    origin: str = ""


def source_embeddings(data: str, model: str | Path, batch_size: int = 256, device: str | None = None,
                      caption_template: str | None = None) -> SourceEmbeddings:
    """Image (and caption) embeddings of every sample of ``data``: ``model`` is a checkpoint (or run)
    directory, or a teacher cache directory written for that source (no model is run then)."""
    check_source(data)
    model = Path(model)
    if (model / "keys.json").is_file():
        return read_teacher_cache(model, data)
    from clipforge.api import load
    from clipforge.config import DataConfig
    from clipforge.devices import pick_device
    from clipforge.eval.evaluate import checkpoint_dir
    from clipforge.train.teacher_cache import embed_source_samples

    ckpt = checkpoint_dir(model)
    net, _, tokenizer = load(ckpt, device=pick_device(device))
    cfg = DataConfig(train=data, **({"caption_template": caption_template} if caption_template else {}))
    keys, images, texts, _ = embed_source_samples(net, tokenizer, cfg, batch_size)
    return SourceEmbeddings(keys, _unit(images.numpy()), _unit(texts.numpy()), str(ckpt))


def read_teacher_cache(root: Path, data: str | None = None) -> SourceEmbeddings:
    manifest_file = root / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    if data and manifest.get("data") and not same_source(manifest["data"], data):
        raise DataError(f"teacher cache {root} was written for {manifest['data']!r}, not {data!r}; its keys would "
                        "not match. Pass the cache of this source, or a checkpoint to embed it now")
    if not (root / "image_embeds.npy").is_file():
        raise DataError(f"{root} holds no image_embeds.npy; write the cache with `clipforge embed CKPT --data ... "
                        "--out DIR --teacher-cache`")
    keys = json.loads((root / "keys.json").read_text())
    images = np.load(root / "image_embeds.npy", mmap_mode="r")
    texts = np.load(root / "text_embeds.npy", mmap_mode="r") if (root / "text_embeds.npy").is_file() else None
    if len(keys) != len(images):
        raise DataError(f"{root}: keys.json has {len(keys)} keys but image_embeds.npy {len(images)} rows")
    return SourceEmbeddings(keys, _unit(np.asarray(images, dtype=np.float32)),
                            None if texts is None else _unit(np.asarray(texts, dtype=np.float32)), str(root))


def same_source(a: str, b: str) -> bool:
    """Two data specs name the same source (``jsonl:pairs.jsonl`` == ``jsonl:/abs/pairs.jsonl`` from here)."""
    if a == b:
        return True
    (ka, _, pa), (kb, _, pb) = a.partition(":"), b.partition(":")
    return ka == kb and "{" not in pa + pb and Path(pa).expanduser().resolve() == Path(pb).expanduser().resolve()


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- clustering
def require_faiss():
    try:
        import faiss
    except ImportError:
        raise DataError("clustering needs faiss: pip install 'clipforge[index]'") from None
    return faiss


def default_clusters(n: int) -> int:
    """About sqrt(N) clusters (>= 1): at LAION scale the paper's 50k clusters hold ~9k items each; on
    small sets sqrt(N) keeps clusters large enough that duplicates share one, small enough to be cheap."""
    return max(1, min(n, round(n ** 0.5)))


def spherical_kmeans(x: np.ndarray, k: int, seed: int = 0, iterations: int = KMEANS_ITERATIONS):
    """(labels N, unit centroids k x E) of spherical K-means with FAISS; deterministic for a seed."""
    faiss = require_faiss()
    n, d = x.shape
    if not 1 <= k <= n:
        raise DataError(f"--clusters must be between 1 and the number of samples ({n}), got {k}")
    kmeans = faiss.Kmeans(d, k, niter=iterations, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=max(256, -(-n // k)))  # use every point: no FAISS subsampling
    kmeans.train(x)
    centroids = _unit(kmeans.centroids)
    _, labels = kmeans.index.search(x, 1)
    return labels[:, 0].astype(np.int64), centroids


# ----------------------------------------------------------------------------- the dedup rule
@dataclass
class DedupResult:
    keep: np.ndarray  # bool N
    labels: np.ndarray  # cluster of each item
    centroid_cos: np.ndarray  # cosine of each item to its centroid
    duplicate_of: np.ndarray  # removed item j: the earlier item i with the largest cos(i, j); else -1
    max_cos: np.ndarray  # that largest cosine (-inf for each cluster's first item)
    stats: dict = field(default_factory=dict)


def cluster_order(members: np.ndarray, centroid_cos: np.ndarray, order: str, seed: int) -> np.ndarray:
    """The cluster's members in the order that decides who is kept (the first of a group stays)."""
    if order == "hard":  # least similar to the centroid first: kept
        return members[np.argsort(centroid_cos[members], kind="stable")]
    if order == "easy":  # most similar first
        return members[np.argsort(-centroid_cos[members], kind="stable")]
    if order == "random":
        return np.random.default_rng([seed, int(members[0])]).permutation(members)
    raise DataError(f"--order must be hard, easy or random, got {order!r}")


def earlier_max_cos(x: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """For each row j of x (in order): max over i < j of cos(i, j) and that i (-inf / -1 for j = 0).

    Column blocks of the strict upper triangle: memory is len(x) x block floats at a time.
    """
    n = len(x)
    best = np.full(n, -np.inf, dtype=np.float32)
    arg = np.full(n, -1, dtype=np.int64)
    for a in range(1, n, block):
        b = min(n, a + block)
        sims = x[:b] @ x[a:b].T  # rows i < b, columns j in [a, b)
        rows = np.arange(b)[:, None]
        sims[rows >= np.arange(a, b)[None, :]] = -np.inf  # only earlier items count (i < j)
        arg[a:b] = sims.argmax(axis=0)
        best[a:b] = sims[arg[a:b], np.arange(b - a)]
    return best, arg


def centroids_of(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Unit mean of each cluster's members (k x E, k = labels.max() + 1): a given labelling's centroids."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(x),) or (len(labels) and labels.min() < 0):
        raise DataError(f"labels must be one non-negative cluster index per embedding ({len(x)}); got shape {labels.shape}")
    sums = np.zeros((int(labels.max()) + 1 if len(labels) else 0, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x)
    return _unit(sums.astype(np.float32))


def semdedup(x: np.ndarray, eps: float, clusters: int | None = None, seed: int = 0, order: str = "hard",
             labels: np.ndarray | None = None, centroids: np.ndarray | None = None) -> DedupResult:
    """SemDeDup on unit embeddings ``x`` (N x E); ``labels`` (and optionally ``centroids``) reuse a clustering."""
    check_eps(eps)
    check_order(order)
    check_clusters(clusters)
    x = _unit(x)
    n = len(x)
    start = time.perf_counter()
    if labels is None:
        labels, centroids = spherical_kmeans(x, default_clusters(n) if clusters is None else clusters, seed)
    elif centroids is None:
        centroids = centroids_of(x, labels)
    kmeans_s = time.perf_counter() - start
    centroid_cos = np.einsum("ij,ij->i", x, centroids[labels])
    keep = np.ones(n, dtype=bool)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    max_cos = np.full(n, -np.inf, dtype=np.float32)
    members_of = np.split(np.argsort(labels, kind="stable"), np.cumsum(np.bincount(labels, minlength=len(centroids)))[:-1])
    for members in members_of:
        if len(members) < 2:
            continue
        ordered = cluster_order(members, centroid_cos, order, seed)
        best, arg = earlier_max_cos(x[ordered])
        max_cos[ordered] = best
        has = arg >= 0
        duplicate_of[ordered[has]] = ordered[arg[has]]
        keep[ordered[best > 1.0 - eps - EXACT_TOLERANCE]] = False  # eps = 0: exact duplicates still go
    sizes = np.bincount(labels, minlength=len(centroids))
    stats = {"samples": n, "kept": int(keep.sum()), "removed": int((~keep).sum()),
             "kept_fraction": float(keep.mean()) if n else 0.0, "eps": eps, "clusters": int(len(centroids)),
             "largest_cluster": int(sizes.max()), "order": order, "seed": seed,
             "kmeans_seconds": round(kmeans_s, 3), "dedup_seconds": round(time.perf_counter() - start - kmeans_s, 3),
             "memory": estimate_memory(n, x.shape[1], int(sizes.max()))}
    duplicate_of[keep] = -1
    return DedupResult(keep, labels, centroid_cos, duplicate_of, max_cos, stats)


def estimate_memory(n: int, dim: int, largest_cluster: int, block: int = BLOCK) -> dict:
    """Bytes held at once: the embeddings, per-item arrays, and one cosine block of the largest cluster."""
    embeddings = 4 * n * dim
    per_item = n * (8 + 4 + 8 + 4 + 1)  # labels, centroid cos, duplicate_of, max_cos, keep
    cosine_block = 4 * largest_cluster * min(block, largest_cluster) * 2  # sims + the mask
    return {"embeddings_bytes": embeddings, "per_item_bytes": per_item, "cosine_block_bytes": cosine_block,
            "total_bytes": embeddings + per_item + cosine_block,
            "n_by_n_would_be_bytes": 4 * n * n}


# ----------------------------------------------------------------------------- the command
def dedup_source(data: str, model: str | Path, out: str | Path, *, eps: float = 0.05, clusters: int | None = None,
                 seed: int = 0, order: str = "hard", batch_size: int = 256, device: str | None = None,
                 pairs: int = 8) -> dict:
    """``clipforge data dedup``: embed (or read the cache), dedup, write the keep-list and its report."""
    from clipforge.data.keep import write_keep_list

    out = Path(out)
    if out.suffix.lower() != ".parquet":
        raise DataError(f"--out must name a .parquet keep-list (e.g. keep.parquet), got {out}")
    # before the (long) embedding
    check_eps(eps)
    check_order(order)
    check_clusters(clusters)
    start = time.perf_counter()
    emb = source_embeddings(data, model, batch_size=batch_size, device=device)
    embed_s = time.perf_counter() - start
    result = semdedup(emb.images, eps, clusters, seed, order)
    keys = np.array(emb.keys, dtype=object)
    write_keep_list(out, keys[result.keep].tolist(), {"cluster": result.labels[result.keep].tolist()})
    write_cluster_table(out, keys, result)
    report = {"data": data, "embeddings": emb.origin, "embed_seconds": round(embed_s, 3), **result.stats,
              "keep_list": str(out), "clusters_table": str(sibling_path(out, "clusters.parquet"))}
    removed = np.flatnonzero(~result.keep)
    examples = removed[np.argsort(-result.max_cos[removed], kind="stable")][:pairs]  # the surest duplicates first
    report["example_pairs"] = [{"removed": emb.keys[j], "kept_neighbour": emb.keys[result.duplicate_of[j]],
                                "cosine": round(float(result.max_cos[j]), 5)} for j in examples]
    if len(examples):
        report["pairs_png"] = str(pair_grid(data, [(emb.keys[result.duplicate_of[j]], emb.keys[j], result.max_cos[j])
                                                   for j in examples], sibling_path(out, "pairs.png")))
    sibling_path(out, "report.json").write_text(json.dumps(report, indent=2))
    return report


def sibling_path(out: Path, suffix: str) -> Path:
    """`<out stem>.<suffix>` beside a keep-list (its report, cluster table, pictures)."""
    return out.with_name(f"{out.stem}.{suffix}")


def write_cluster_table(out: Path, keys: np.ndarray, result: DedupResult) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dup = result.duplicate_of
    path = sibling_path(out, "clusters.parquet")
    pq.write_table(pa.table({
        "key": keys.tolist(), "cluster": result.labels, "centroid_cos": result.centroid_cos.astype(np.float32),
        "kept": result.keep, "duplicate_of": [keys[i] if i >= 0 else None for i in dup],
        "max_earlier_cos": np.where(np.isfinite(result.max_cos), result.max_cos, np.nan).astype(np.float32)}), path)
    return path


def sample_images(data: str, keys: set[str], size: int = 96) -> dict:
    """key -> uint8 H x W x 3 image, for the few samples a report shows (one pass over the source)."""
    from clipforge.config import DataConfig
    from clipforge.data.pipeline import decode_raw, source_samples

    found = {}
    for raw in source_samples(DataConfig(train=data)):
        if raw.key in keys:
            out = decode_raw(raw, size, None, None)
            if not isinstance(out, str):
                found[raw.key] = out[0].permute(1, 2, 0).numpy()
            if len(found) == len(keys):
                break
    return found


def pair_grid(data: str, pairs: list[tuple[str, str, float]], path: Path) -> Path:
    """A PNG with one row per pair: the kept item, the removed one, their cosine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = sample_images(data, {k for a, b, _ in pairs for k in (a, b)})
    fig, axes = plt.subplots(len(pairs), 2, figsize=(4, 2 * len(pairs)), squeeze=False)
    for row, (kept, removed, cos) in enumerate(pairs):
        for col, (key, what) in enumerate(((kept, "kept"), (removed, f"removed (cos {cos:.4f})"))):
            ax = axes[row][col]
            ax.axis("off")
            if key in images:
                ax.imshow(images[key])
            ax.set_title(f"{what}\n{key[-28:]}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
