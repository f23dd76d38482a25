"""SemDeDup: planted near-duplicate groups collapse to exactly one member each; the CLI writes a keep-list."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("pyarrow")

from clipforge.data.dedup import earlier_max_cos, semdedup  # noqa: E402
from clipforge.data.keep import read_keep_list  # noqa: E402
from clipforge.data.sources import DataError  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted(n_unique: int = 300, groups: int = 40, dim: int = 64, seed: int = 0):
    """Distinct random items plus ``groups`` groups of 2-4 near-copies (cos > 0.995) of some of them."""
    rng = np.random.default_rng(seed)
    base = unit(rng.normal(size=(n_unique, dim)))
    rows, group_of = [base], list(range(n_unique))
    for g in range(groups):
        copies = int(rng.integers(1, 4))
        rows.append(unit(base[g] + 0.004 * rng.normal(size=(copies, dim))))
        group_of += [g] * copies
    x = np.concatenate(rows).astype(np.float32)
    perm = rng.permutation(len(x))  # duplicates scattered through the data
    return x[perm], np.array(group_of)[perm]


def test_planted_near_duplicates_keep_exactly_one_per_group():
    x, group = planted()
    result = semdedup(x, eps=0.01, clusters=12, seed=0)
    kept_groups = group[result.keep]
    assert sorted(kept_groups.tolist()) == list(range(300))  # every group once, every distinct item kept
    # the removed ones name a member of their own group as the reason
    removed = np.flatnonzero(~result.keep)
    assert np.all(group[result.duplicate_of[removed]] == group[removed])
    assert result.stats["kept"] == 300 and result.stats["removed"] == len(x) - 300


def test_hard_order_keeps_the_member_farthest_from_its_centroid():
    x, group = planted(seed=1)
    result = semdedup(x, eps=0.01, clusters=8, seed=0, order="hard")
    for g in range(40):
        members = np.flatnonzero(group == g)
        kept = members[result.keep[members]]
        assert len(kept) == 1
        assert result.centroid_cos[kept[0]] == result.centroid_cos[members].min()


def test_exact_duplicates_collapse_and_a_larger_eps_never_keeps_more():
    x, _ = planted(seed=2)
    x = np.concatenate([x, x[:10]])  # exact copies
    kept = [int(semdedup(x, eps, clusters=10, seed=3).keep.sum()) for eps in (0.0, 0.01, 0.05, 0.2, 0.5)]
    assert kept == sorted(kept, reverse=True) and kept[0] < len(x)
    zero = semdedup(x, 0.0, clusters=10, seed=3)
    assert zero.keep.sum() == len(x) - 10  # eps = 0 still removes the 10 exact copies (float rounding aside)
    # deterministic for a seed: the same clusters and the same decision
    again = semdedup(x, 0.05, clusters=10, seed=3)
    first = semdedup(x, 0.05, clusters=10, seed=3)
    assert np.array_equal(again.labels, first.labels) and np.array_equal(again.keep, first.keep)


def test_a_given_labelling_without_centroids_uses_its_members_unit_means():
    from clipforge.data.dedup import centroids_of

    x, group = planted(seed=4)
    x = unit(x).astype(np.float32)
    by_group = semdedup(x, eps=0.01, order="hard", labels=group)  # one cluster per planted group
    means = np.stack([x[group == g].mean(axis=0) for g in range(group.max() + 1)])
    assert np.allclose(centroids_of(x, group), unit(means), atol=1e-6)
    assert np.array_equal(by_group.labels, group) and by_group.stats["clusters"] == group.max() + 1
    assert np.allclose(by_group.centroid_cos, np.einsum("ij,ij->i", x, unit(means)[group]), atol=1e-5)
    assert sorted(group[by_group.keep].tolist()) == sorted(set(group.tolist()))  # one per group, as with K-means
    with pytest.raises(DataError, match="one non-negative cluster index per embedding"):
        semdedup(x, eps=0.01, labels=group[:-1])


def test_blocked_triangle_equals_the_full_matrix():
    rng = np.random.default_rng(0)
    x = unit(rng.normal(size=(57, 8))).astype(np.float32)
    full = x @ x.T
    expected = np.array([-np.inf] + [full[:j, j].max() for j in range(1, 57)], dtype=np.float32)
    best, arg = earlier_max_cos(x, block=5)
    assert np.allclose(best, expected) and arg[0] == -1
    assert all(full[arg[j], j] == pytest.approx(expected[j]) for j in range(1, 57))


def test_bad_eps_is_explained_and_cache_sources_compare_by_path(tmp_path, monkeypatch):
    from clipforge.data.dedup import same_source

    with pytest.raises(DataError, match="--eps must be in"):
        semdedup(np.eye(4, dtype=np.float32), eps=1.5, clusters=1)
    monkeypatch.chdir(tmp_path)
    assert same_source("jsonl:pairs.jsonl", f"jsonl:{tmp_path}/pairs.jsonl")
    assert not same_source("jsonl:pairs.jsonl", "csv:pairs.jsonl") and not same_source("jsonl:a.jsonl", "jsonl:b.jsonl")


def test_cli_dedups_duplicate_images_of_a_table(tmp_path, capsys):
    from tiny_checkpoint import make_caption_jsonl, make_tiny_checkpoint, run_cli

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    table = make_caption_jsonl(tmp_path / "data", n=12)
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    dup = [dict(rows[i], text=f"copy {i}") for i in (0, 0, 3)]  # image 0 three times, image 3 twice
    table.write_text("".join(json.dumps(r) + "\n" for r in rows + dup))
    out = tmp_path / "keep.parquet"
    code, stdout, stderr = run_cli(capsys, "data", "dedup", f"jsonl:{table}", "--model", ckpt, "--eps", "0.00001",
                                   "--clusters", "2", "--out", out)
    assert code == 0, stdout + stderr
    kept = read_keep_list(out)
    assert len(kept) == 12 and len(set(kept)) == 12
    report = json.loads((tmp_path / "keep.report.json").read_text())
    assert report["removed"] == 3 and report["samples"] == 15
    assert Path(report["pairs_png"]).is_file()
    assert "n_by_n_would_be_bytes" in report["memory"]


@pytest.mark.parametrize("args, says", [
    (["foo:bar"], "source 'foo:bar': unknown source kind 'foo:'"),
    (["jsonl:x.jsonl", "--order", "weird"], "--order must be hard, easy or random, got 'weird'"),
    (["jsonl:x.jsonl", "--clusters", "0"], "--clusters must be >= 1, got 0"),
    (["jsonl:x.jsonl", "--eps", "2"], "--eps must be in [0, 1)"),
])
def test_cli_refuses_bad_arguments_before_embedding(tmp_path, capsys, args, says):
    from tiny_checkpoint import refused_before_embedding

    refused_before_embedding(capsys, tmp_path, "dedup", args, says)
