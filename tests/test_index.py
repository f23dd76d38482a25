"""embed -> index: shards and metadata, resume, bad images, FAISS kinds, recall against exact search."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import clipforge
from clipforge.cli import app
from clipforge.data.sources import DataError
from clipforge.index.dense import DenseIndex, SearchIndexError, build_index, build_index_dir, recall_at_k
from clipforge.index.embed import EmbedError, embed_dataset, load_embeddings
from tiny_checkpoint import make_caption_jsonl, make_tiny_checkpoint

pytest.importorskip("faiss")
pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_caption_jsonl(tmp_path_factory.mktemp("data"), n=24)


@pytest.fixture(scope="module")
def emb(ckpt, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "emb"
    embed_dataset(ckpt, f"jsonl:{pairs}", out, batch_size=5, shard_size=10, dtype="float32", progress=False)
    return out


# ----------------------------------------------------------------------------- embed
def test_embed_writes_shards_and_metadata_equal_to_the_model(ckpt, pairs, emb):
    manifest = json.loads((emb / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_images"] == 24 and manifest["num_texts"] == 32
    assert sorted(p.name for p in (emb / "images").glob("*.npy")) == ["shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]

    vectors, table, _ = load_embeddings(emb, "images")
    assert vectors.shape == (24, 16) and table.column_names == ["id", "image", "caption"]
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == list(range(24))
    assert rows[5]["image"].endswith("img/005.png") and rows[5]["caption"] == "a black square"

    model, preprocess, tokenizer = clipforge.load(ckpt)
    from clipforge.data.sources import load_image

    with torch.no_grad():
        expected = model.encode_image(torch.stack([preprocess(load_image(rows[i]["image"])) for i in (0, 13, 23)]))
        np.testing.assert_allclose(vectors[[0, 13, 23]], expected.numpy(), atol=1e-5)

        texts, text_table, _ = load_embeddings(emb, "texts")
        text_rows = text_table.to_pylist()
        assert len(text_rows) == 32 and text_rows[1] == {"id": 1, "image_id": 0, "image": rows[0]["image"], "caption": "image 0, red"}
        ids, mask = tokenizer([r["caption"] for r in text_rows[:4]])
        np.testing.assert_allclose(texts[:4], model.encode_text(ids, mask).numpy(), atol=1e-5)


def test_embed_resumes_where_it_stopped_and_matches_an_uninterrupted_run(ckpt, pairs, emb, tmp_path):
    out = tmp_path / "emb"
    first = embed_dataset(ckpt, f"jsonl:{pairs}", out, batch_size=5, shard_size=10, dtype="float32",
                          progress=False, stop_after_shards=2)
    assert first == {"images": 24, "texts": 32, "skipped_images": 0, "shards_written": 2, "complete": False}
    with pytest.raises(EmbedError, match="unfinished; rerun"):
        load_embeddings(out)
    stamp = (out / "images" / "shard_00000.npy").stat().st_mtime_ns
    second = embed_dataset(ckpt, f"jsonl:{pairs}", out, batch_size=5, shard_size=10, dtype="float32", progress=False)
    assert second["shards_written"] == 5 and second["complete"]  # 1 image shard + 4 caption shards left
    assert (out / "images" / "shard_00000.npy").stat().st_mtime_ns == stamp  # not recomputed
    for kind in ("images", "texts"):
        np.testing.assert_array_equal(load_embeddings(out, kind)[0], load_embeddings(emb, kind)[0])
    again = embed_dataset(ckpt, f"jsonl:{pairs}", out, batch_size=5, shard_size=10, dtype="float32", progress=False)
    assert again["shards_written"] == 0


def test_embed_refuses_to_mix_settings_in_one_directory(ckpt, pairs, tmp_path):
    out = tmp_path / "emb"
    embed_dataset(ckpt, f"jsonl:{pairs}", out, shard_size=10, progress=False, stop_after_shards=1)
    with pytest.raises(EmbedError, match="different settings \\(dtype, shard_size changed\\)"):
        embed_dataset(ckpt, f"jsonl:{pairs}", out, shard_size=7, dtype="float32", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(EmbedError, match="not an embedding directory"):
        embed_dataset(ckpt, f"jsonl:{pairs}", tmp_path / "other", progress=False)
    with pytest.raises(EmbedError, match="--dtype must be one of float16, float32"):
        embed_dataset(ckpt, f"jsonl:{pairs}", tmp_path / "x", dtype="int8", progress=False)


def test_embed_float16_shards_and_skipped_images(ckpt, tmp_path):
    pairs = make_caption_jsonl(tmp_path / "data", n=30, broken=1)
    summary = embed_dataset(ckpt, f"jsonl:{pairs}", tmp_path / "emb", shard_size=16, progress=False)
    assert summary["images"] == 29 and summary["skipped_images"] == 1
    assert np.load(tmp_path / "emb" / "images" / "shard_00000.npy").dtype == np.float16
    vectors, table, manifest = load_embeddings(tmp_path / "emb")
    assert len(vectors) == 29 and 29 not in table.column("id").to_pylist()
    assert manifest["skipped_images"][0][0].endswith("029.png")
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=2e-3)

    many_bad = make_caption_jsonl(tmp_path / "bad", n=10, broken=5)
    with pytest.raises(DataError, match="could not be read"):
        embed_dataset(ckpt, f"jsonl:{many_bad}", tmp_path / "emb_bad", progress=False)


def test_embed_reads_image_folders_with_class_names_as_captions(ckpt, tmp_path):
    from PIL import Image

    for cls in ("red_things", "blue_things"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (200, 0, 0) if cls.startswith("red") else (0, 0, 200)).save(tmp_path / "folder" / cls / f"{i}.png")
    embed_dataset(ckpt, f"imagefolder:{tmp_path / 'folder'}", tmp_path / "emb", progress=False)
    _, table, _ = load_embeddings(tmp_path / "emb")
    assert table.column("caption").to_pylist() == ["blue things"] * 3 + ["red things"] * 3


# ----------------------------------------------------------------------------- index
def test_recall_at_k_against_a_hand_count():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 1], [-1, -1, -1, -1]])
    assert recall_at_k(found, exact, k=4) == pytest.approx((3 / 4 + 0) / 2)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_kinds_find_each_indexed_vector_and_report_recall(emb, tmp_path, kind):
    info = build_index_dir(emb, tmp_path / kind, kind=kind, nlist=2 if kind == "ivf" else None, nprobe=2, num_queries=3)
    assert info["count"] == 24 and info["dim"] == 16 and info["queries"] == 2  # at most a tenth is held out
    assert info["recall@10"] == pytest.approx(1.0)  # tiny data: every kind is exact here (nprobe = nlist)
    index = DenseIndex(tmp_path / kind)
    vectors, table, _ = load_embeddings(emb)
    ids = table.column("id").to_pylist()
    scores, found = index.search(vectors, 5)
    assert found[:, 0].tolist() == ids  # each vector's nearest neighbour is itself, under its own id
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5) and (np.diff(scores, axis=1) <= 1e-6).all()


def test_approximate_recall_is_measured_not_assumed():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((4000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:100]
    exact = build_index(vectors, "flat").search(queries, 10)[1]
    narrow = build_index(vectors, "ivf", nlist=64, nprobe=1)
    wide = build_index(vectors, "ivf", nlist=64, nprobe=64)
    r_narrow = recall_at_k(narrow.search(queries, 10)[1], exact)
    r_wide = recall_at_k(wide.search(queries, 10)[1], exact)
    assert r_wide == pytest.approx(1.0) and r_narrow < 0.9  # random data: one probe of 64 misses a lot


def test_index_errors_name_the_problem(emb, ckpt, pairs, tmp_path):
    with pytest.raises(SearchIndexError, match="unknown index kind 'pq'; choose one of flat, ivf, hnsw"):
        build_index_dir(emb, tmp_path / "a", kind="pq")
    with pytest.raises(SearchIndexError, match="--nlist 500 is more than"):
        build_index_dir(emb, tmp_path / "b", kind="ivf", nlist=500)
    with pytest.raises(EmbedError, match="not an embedding directory"):
        build_index_dir(tmp_path, tmp_path / "c")
    with pytest.raises(SearchIndexError, match="not an index directory"):
        DenseIndex(tmp_path)


def test_cli_embed_then_index_prints_recall(ckpt, pairs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["embed", str(ckpt), "--data", f"jsonl:{pairs}", "--out", str(tmp_path / "emb"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["index", str(tmp_path / "emb"), "--kind", "hnsw", "--out", str(tmp_path / "idx")])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["kind"] == "hnsw" and printed["count"] == 24 and 0.0 <= printed["recall@10"] <= 1.0


def test_an_existing_file_as_out_is_refused_by_embed_and_index(ckpt, pairs, emb, tmp_path):
    from clipforge.index.embed import EmbedError

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(EmbedError, match="is a file; --out is the embedding directory"):
        embed_dataset(ckpt, f"jsonl:{pairs}", a_file, batch_size=5, progress=False)
    with pytest.raises(FileExistsError, match="is a file, and --out here names a directory"):
        build_index_dir(emb, a_file, kind="flat")
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize("args, says", [
    (["--what", "audio"], "'audio': index the image or the caption embeddings, one of images, texts"),
    (["--kind", "hnsw", "--backend", "seismic"], "--backend chooses how a lexical index searches: use it with --kind"),
])
def test_cli_index_names_the_option_that_is_wrong(emb, tmp_path, args, says):
    result = CliRunner().invoke(app, ["index", str(emb), *args, "--out", str(tmp_path / "idx")])
    output = " ".join(result.output.replace("│", " ").split())  # the usage-error box wraps
    assert result.exit_code == 2 and says in output, result.output
    assert not (tmp_path / "idx").exists()
    with pytest.raises(EmbedError, match="--what must be one of images, texts"):
        load_embeddings(emb, "audio")
