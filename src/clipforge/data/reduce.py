"""TL;DR-style data reduction (Wang et al. 2023): keep a representative fraction of every cluster.

    clipforge data reduce wds:shards/{00000..00099}.tar --model ckpt/ --keep 0.5 --out keep.parquet

The selection part of TL;DR: cluster the samples' embeddings (FAISS K-means, as for SemDeDup) and
keep the same fraction of every cluster, so that the kept set covers the data as the clusters do
(the paper keeps every N-th sample per cluster: "uniform over clusters"). Inside a cluster the
members are sorted by cosine to the centroid and ``ceil(keep * n_c)`` evenly spaced ranks are kept,
so the kept ones span the cluster from its core to its border; with ``keep = 1/N`` that is exactly
every N-th sample, and the kept count is sum over clusters of ceil(n_c / N).

What is *not* included, by design:

- TL;DR's codebook features (a BLIP with a VQ layer trained with captioning): any clipforge
  checkpoint's (or teacher cache's) image embeddings stand in for them.
- The image-text-matching filter, as the paper orders it: the per-cluster selection runs on every
  sample, then ``--min-match-quantile q`` intersects it with the samples whose image-caption cosine
  (the model's own, in place of BLIP's ITM head) is not in the lowest q of the data. The paper keeps
  the better half (q = 0.5); the default is 0 (off).
- Caption rewriting with a captioning model ("text refinement"): no captioner ships with clipforge.
  The plug-in point is ``CaptionRefiner``: pass one to ``reduce_source`` and the keep-list gets a
  ``caption`` column with ``append_caption(original, generated)`` ("original; generated", the
  paper's appended form). Training does not read that column yet; write it into a table
  (jsonl/csv ``text`` column) to train on it.

Outputs: the keep-list (Parquet ``key``, ``cluster``), ``<out stem>.clusters.parquet`` (every sample:
key, cluster, cosine to centroid, selected in its cluster, passed the match filter, kept) and
``<out stem>.report.json``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from clipforge.data.dedup import (
    check_clusters,
    check_source,
    default_clusters,
    sibling_path,
    source_embeddings,
    spherical_kmeans,
)
from clipforge.data.sources import DataError


class CaptionRefiner(Protocol):
    """The caption-rewriting plug-in: generated captions for kept samples (same order as ``keys``)."""

    def __call__(self, keys: list[str], captions: list[str]) -> list[str]: ...


def append_caption(original: str, generated: str) -> str:
    """TL;DR's appended form: the original caption stays the prefix."""
    if not original:  # no caption to keep: the generated one alone, not "; generated"
        return generated
    return f"{original}; {generated}" if generated else original


def check_keep(keep: float) -> None:
    if not 0.0 < keep <= 1.0:
        raise DataError(f"--keep must be a fraction in (0, 1], got {keep}")


def check_match_quantile(quantile: float) -> None:
    if not 0.0 <= quantile < 1.0:
        raise DataError(f"--min-match-quantile must be in [0, 1) (0: no filter; TL;DR: 0.5), got {quantile}")


def select_per_cluster(labels: np.ndarray, centroid_cos: np.ndarray, keep: float) -> np.ndarray:
    """Bool mask: ``ceil(keep * n_c)`` evenly spaced members of each cluster, ranked by centroid cosine."""
    check_keep(keep)
    mask = np.zeros(len(labels), dtype=bool)
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        ranked = members[np.argsort(-centroid_cos[members], kind="stable")]  # core first
        n = len(ranked)
        m = math.ceil(round(keep * n, 9))  # round: 0.5 * 6 must not become 3.0000000001 -> 4
        # ranks floor(i / keep): keep = 1/N gives 0, N, 2N, ...; always < n since (m - 1) < keep * n
        mask[ranked[np.minimum(np.floor(np.arange(m) / keep + 1e-9).astype(np.int64), n - 1)]] = True
    return mask


def match_filter(images: np.ndarray, texts: np.ndarray | None, quantile: float) -> np.ndarray:
    """Bool mask of the samples whose image-caption cosine is not in the lowest ``quantile``."""
    check_match_quantile(quantile)
    if quantile == 0:
        return np.ones(len(images), dtype=bool)
    if texts is None:
        raise DataError("--min-match-quantile needs caption embeddings; pass a checkpoint, or a teacher cache "
                        "that has text_embeds.npy")
    scores = np.einsum("ij,ij->i", images, texts)
    return scores >= np.quantile(scores, quantile)


def reduce_embeddings(images: np.ndarray, keep: float, clusters: int | None = None, seed: int = 0,
                      texts: np.ndarray | None = None, min_match_quantile: float = 0.0):
    """(kept mask, cluster labels, stats, per-sample columns) for unit image embeddings (and caption
    embeddings for the filter)."""
    check_keep(keep)
    check_clusters(clusters)
    check_match_quantile(min_match_quantile)
    n = len(images)
    start = time.perf_counter()
    labels, centroids = spherical_kmeans(images, default_clusters(n) if clusters is None else clusters, seed)
    centroid_cos = np.einsum("ij,ij->i", images, centroids[labels])
    selected = select_per_cluster(labels, centroid_cos, keep)  # every N-th per cluster, then the ITM half
    matched = match_filter(images, texts, min_match_quantile)
    mask = selected & matched
    sizes = np.bincount(labels, minlength=len(centroids))
    stats = {"samples": n, "kept": int(mask.sum()), "kept_fraction": float(mask.mean()), "keep": keep,
             "clusters": int(len(centroids)), "largest_cluster": int(sizes.max()), "seed": seed,
             "selected_per_cluster": int(selected.sum()), "min_match_quantile": min_match_quantile,
             "passed_match_filter": int(matched.sum()), "seconds": round(time.perf_counter() - start, 3)}
    table = {"cluster": labels, "centroid_cos": centroid_cos.astype(np.float32), "selected": selected,
             "matched": matched, "kept": mask}
    return mask, labels, stats, table


def reduce_source(data: str, model: str | Path, out: str | Path, *, keep: float = 0.5, clusters: int | None = None,
                  seed: int = 0, min_match_quantile: float = 0.0, batch_size: int = 256, device: str | None = None,
                  refiner: CaptionRefiner | None = None) -> dict:
    """``clipforge data reduce``: embed (or read a teacher cache), select, write the keep-list and a report."""
    from clipforge.data.keep import write_keep_list

    out = Path(out)
    if out.suffix.lower() != ".parquet":
        raise DataError(f"--out must name a .parquet keep-list (e.g. keep.parquet), got {out}")
    # all the arguments before the (long) embedding
    check_source(data)
    check_keep(keep)
    check_clusters(clusters)
    check_match_quantile(min_match_quantile)
    emb = source_embeddings(data, model, batch_size=batch_size, device=device)
    mask, labels, stats, table = reduce_embeddings(emb.images, keep, clusters, seed, emb.texts, min_match_quantile)
    keys = [k for k, m in zip(emb.keys, mask) if m]
    extra = {"cluster": labels[mask].tolist()}
    if refiner is not None:
        captions = kept_captions(data, set(keys))
        originals = [captions.get(k, "") for k in keys]
        extra["caption"] = [append_caption(o, g) for o, g in zip(originals, refiner(keys, originals))]
    write_keep_list(out, keys, extra)
    clusters_path = write_reduce_table(out, list(emb.keys), table)
    report = {"data": data, "embeddings": emb.origin, **stats, "keep_list": str(out),
              "clusters_table": str(clusters_path)}
    sibling_path(out, "report.json").write_text(json.dumps(report, indent=2))
    return report


def write_reduce_table(out: Path, keys: list[str], table: dict[str, np.ndarray]) -> Path:
    """``<out stem>.clusters.parquet``: every sample's cluster label and what the selection made of it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = sibling_path(out, "clusters.parquet")
    pq.write_table(pa.table({"key": keys, **table}), path)
    return path


def kept_captions(data: str, keys: set[str]) -> dict[str, str]:
    """key -> first caption of the kept samples (for the caption refiner)."""
    from clipforge.config import DataConfig
    from clipforge.data.pipeline import caption_texts, source_samples

    out = {}
    for raw in source_samples(DataConfig(train=data)):
        if raw.key in keys:
            text = caption_texts(raw.caption, None, 1)
            out[raw.key] = text[0] if isinstance(text, list) else ""
    return out
