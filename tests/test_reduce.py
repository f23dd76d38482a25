"""TL;DR-style reduction: per-cluster representative selection, the kept count, the caption plug-in."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("pyarrow")

from clipforge.data.reduce import append_caption, match_filter, reduce_embeddings, select_per_cluster  # noqa: E402
from clipforge.data.sources import DataError  # noqa: E402


def test_every_nth_per_cluster_and_the_kept_count():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), [1, 7, 10, 13, 20])
    cos = rng.random(len(labels))
    mask = select_per_cluster(labels, cos, keep=1 / 5)
    assert mask.sum() == sum(math.ceil(n / 5) for n in (1, 7, 10, 13, 20))
    for c in range(5):  # uniform over clusters: each keeps its share, the closest to the centroid first
        members = np.flatnonzero(labels == c)
        ranked = members[np.argsort(-cos[members])]
        assert np.array_equal(np.flatnonzero(mask[ranked]), np.arange(0, len(members), 5))


def test_half_keeps_half_of_each_cluster_of_clustered_data():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 32))
    sizes = [200, 100, 50, 25, 20, 5]  # long-tailed clusters: a uniform draw would starve the small ones
    x = np.concatenate([c + 0.1 * rng.normal(size=(n, 32)) for c, n in zip(centres, sizes)])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    truth = np.repeat(np.arange(6), sizes)
    mask, labels, stats, _ = reduce_embeddings(x, keep=0.5, clusters=6, seed=0)
    for c in np.unique(labels):  # every cluster found keeps its share exactly
        assert mask[labels == c].sum() == math.ceil((labels == c).sum() / 2)
    for c, n in enumerate(sizes):  # so every true cluster, big or small, keeps about half
        assert abs(int(mask[truth == c].sum()) - n / 2) <= 1
    assert stats["kept"] == int(mask.sum())
    again, _, _, _ = reduce_embeddings(x, keep=0.5, clusters=6, seed=0)
    assert np.array_equal(mask, again)  # deterministic


def test_the_match_filter_intersects_the_per_cluster_selection():
    """TL;DR's order: every N-th sample per cluster on all the data, then AND the better-ITM half; the
    selected count is sum ceil(n_c / N) whatever the filter does."""
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(4, 16))
    sizes = [40, 30, 20, 10]
    x = np.concatenate([c + 0.1 * rng.normal(size=(n, 16)) for c, n in zip(centres, sizes)])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    t = x + 0.8 * rng.normal(size=x.shape).astype(np.float32)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    plain, labels, _, _ = reduce_embeddings(x, keep=0.25, clusters=4, seed=0)
    mask, _, stats, table = reduce_embeddings(x, keep=0.25, clusters=4, seed=0, texts=t, min_match_quantile=0.5)
    sizes_found = np.bincount(labels)
    assert stats["selected_per_cluster"] == sum(math.ceil(n / 4) for n in sizes_found) == int(plain.sum())
    assert np.array_equal(table["selected"], plain)
    assert np.array_equal(mask, plain & match_filter(x, t, 0.5)) and stats["kept"] == int(mask.sum())
    assert np.array_equal(table["cluster"], labels) and np.array_equal(table["kept"], mask)


def test_match_filter_and_caption_plugin():
    images = np.eye(4, dtype=np.float32)
    texts = np.array([[1, 0, 0, 0], [0, 0.5, 0.866, 0], [0, 0, 0, 1], [0, 0, 0, 1]], dtype=np.float32)
    assert match_filter(images, texts, 0.5).tolist() == [True, False, False, True]
    assert append_caption("a dog", "a brown dog on grass") == "a dog; a brown dog on grass"
    assert append_caption("", "a brown dog") == "a brown dog" and append_caption("a dog", "") == "a dog"
    with pytest.raises(DataError, match="--keep must be"):
        select_per_cluster(np.zeros(3, dtype=int), np.zeros(3), 0.0)
    with pytest.raises(DataError, match="needs caption embeddings"):
        match_filter(images, None, 0.5)


def test_cli_reduce_writes_a_keep_list_that_trains(tmp_path, capsys):
    from clipforge.config import DataConfig
    from clipforge.data.keep import read_keep_list
    from clipforge.data.pipeline import build_source_train_loader
    from tiny_checkpoint import make_caption_jsonl, make_tiny_checkpoint, run_cli

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    table = make_caption_jsonl(tmp_path / "data", n=16)
    out = tmp_path / "keep.parquet"
    code, stdout, stderr = run_cli(capsys, "data", "reduce", f"jsonl:{table}", "--model", ckpt, "--keep", "0.5",
                                   "--clusters", "3", "--out", out)
    assert code == 0, stdout + stderr
    kept = read_keep_list(out)
    report = json.loads((tmp_path / "keep.report.json").read_text())
    assert 8 <= len(kept) <= 8 + 3 and report["kept"] == len(kept)
    import pyarrow.parquet as pq

    clusters = pq.read_table(report["clusters_table"]).to_pydict()  # every sample's label is kept
    assert len(clusters["key"]) == 16 and set(clusters["cluster"]) <= {0, 1, 2}
    assert sorted(k for k, m in zip(clusters["key"], clusters["kept"]) if m) == sorted(kept)
    cfg = DataConfig(train=f"jsonl:{table}", keep=str(out), batch_size=len(kept), num_workers=0)
    assert sorted(next(build_source_train_loader(cfg, 16, None))["keys"]) == sorted(kept)


@pytest.mark.parametrize("args, says", [
    (["foo:bar"], "source 'foo:bar': unknown source kind 'foo:'"),
    (["jsonl:x.jsonl", "--keep", "0"], "--keep must be a fraction in (0, 1], got 0.0"),
    (["jsonl:x.jsonl", "--keep", "1.5"], "--keep must be a fraction in (0, 1], got 1.5"),
    (["jsonl:x.jsonl", "--min-match-quantile", "2"], "--min-match-quantile must be in [0, 1)"),
    (["jsonl:x.jsonl", "--clusters", "0"], "--clusters must be >= 1, got 0"),
])
def test_cli_refuses_bad_arguments_before_embedding(tmp_path, capsys, args, says):
    from tiny_checkpoint import refused_before_embedding

    refused_before_embedding(capsys, tmp_path, "reduce", args, says)
