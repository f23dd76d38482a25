"""Lexical search: `embed --sparse` stores the model's top-k vocabulary weights, `index --kind lexical`
builds posting lists whose top-k equals a dense dot product on the same sparse vectors (checklist),
and the server answers text / image / item queries from it with each query's and result's top words."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("pyarrow")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import clipforge  # noqa: E402
from clipforge.cli import app  # noqa: E402
from clipforge.index.dense import SearchIndexError  # noqa: E402
from clipforge.index.embed import EmbedError, embed_dataset, load_embeddings  # noqa: E402
from clipforge.index.lexical import (  # noqa: E402
    LexicalIndex,
    PostingLists,
    build_lexical_index_dir,
    load_sparse_embeddings,
    open_index,
)
from clipforge.index.server import create_app  # noqa: E402
from clipforge.models.lexical import keep_top_k  # noqa: E402
from tiny_checkpoint import make_caption_jsonl, make_tiny_checkpoint  # noqa: E402

TOP_K = 8


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("lexical")
    ckpt = make_tiny_checkpoint(root / "ckpt", lexical_head=True, lexical_top_k=TOP_K)
    pairs = make_caption_jsonl(root / "data", n=24)
    embed_dataset(ckpt, f"jsonl:{pairs}", root / "emb", batch_size=5, shard_size=10, progress=False, sparse=True)
    build_lexical_index_dir(root / "emb", root / "idx")
    return ckpt, pairs, root


@pytest.fixture(scope="module")
def client(built):
    return TestClient(create_app(built[2] / "idx"))


# ----------------------------------------------------------------------------- embedding
def test_embed_sparse_stores_the_models_top_k_weights(built):
    ckpt, pairs, root = built
    docs, table, manifest = load_sparse_embeddings(root / "emb", "texts")
    assert manifest["sparse"] and manifest["embed_dim"] == 256  # the model's vocabulary size
    assert sorted(p.suffix for p in (root / "emb" / "texts").glob("shard_*")) == [".npz"] * 4 + [".parquet"] * 4
    model, _, tokenizer = clipforge.load(ckpt)
    captions = table.column("caption").to_pylist()
    with torch.no_grad():
        want = keep_top_k(model(None, *tokenizer(captions), need={"text_lexical"})["text_lexical"], TOP_K)
    assert np.allclose(docs.toarray(), want.numpy(), atol=1e-6)
    assert (np.diff(docs.indptr) <= TOP_K).all() and docs.nnz > 0
    images, _, _ = load_sparse_embeddings(root / "emb", "images")
    assert images.shape == (24, 256) and (images.data > 0).all()


def test_sparse_and_dense_embedding_directories_refuse_the_wrong_reader(built, tmp_path):
    ckpt, pairs, root = built
    with pytest.raises(EmbedError, match="--kind lexical"):
        load_embeddings(root / "emb")
    dense_ckpt = make_tiny_checkpoint(tmp_path / "dense")
    with pytest.raises(SearchIndexError, match="lexical_head = true"):
        embed_dataset(dense_ckpt, f"jsonl:{pairs}", tmp_path / "e", progress=False, sparse=True)
    assert not (tmp_path / "e").exists()  # a failed start leaves nothing behind
    embed_dataset(dense_ckpt, f"jsonl:{pairs}", tmp_path / "dense_emb", progress=False)
    with pytest.raises(EmbedError, match="--sparse"):
        build_lexical_index_dir(tmp_path / "dense_emb", tmp_path / "idx")


# ----------------------------------------------------------------------------- posting lists
def test_posting_lists_return_the_same_top_k_as_a_dense_dot_product():
    rng = np.random.default_rng(0)
    docs = rng.random((300, 50)).astype(np.float32) * (rng.random((300, 50)) < 0.1)
    queries = rng.random((40, 50)).astype(np.float32) * (rng.random((40, 50)) < 0.15)
    scores, positions = PostingLists.from_documents(docs).search(queries, 10)
    dense = queries @ docs.T
    for q in range(len(queries)):
        matched = int((dense[q] > 0).sum())
        want = np.lexsort((np.arange(300), -dense[q]))[:min(10, matched)]
        assert positions[q, :len(want)].tolist() == want.tolist()
        assert np.allclose(scores[q, :len(want)], dense[q, want], atol=1e-6)
        assert (positions[q, len(want):] == -1).all()  # documents sharing no word are no match


def test_lexical_index_directory_finds_each_stored_vector(built):
    _, _, root = built
    info = json.loads((root / "idx" / "index.json").read_text())
    assert info["kind"] == "lexical" and info["backend"] == "scipy" and info["count"] == 24
    assert info["recall@10"] == 1.0 and 0 < info["avg_nonzeros"] <= TOP_K and info["index_bytes"] > 0
    index = open_index(root / "idx")
    assert isinstance(index, LexicalIndex) and index.dim == 256 and len(index) == 24
    docs, table, _ = load_sparse_embeddings(root / "emb")
    scores, ids = index.search(docs.toarray(), 3)
    dense = docs.toarray() @ docs.toarray().T
    assert np.allclose(scores[:, 0], dense.max(axis=1), atol=1e-5)  # each vector's best match scores its own norm
    vocab = json.loads((root / "idx" / "vocab.json").read_text())
    assert len(vocab) == 256 and "red" in vocab  # words from the checkpoint's tokenizer
    assert index.top_words(docs[0].toarray()[0], 3)[0][1] == pytest.approx(docs[0].data.max(), abs=1e-4)


def test_a_quantized_index_stores_integer_impacts_and_searches_them_exactly(built, tmp_path):
    """LexLIP's quantisation: each weight as round(w x Q) in uint8 (words rounding to 0 leave the lists); the
    index's scores are the dot products with those impacts / Q; recall against float32 is measured."""
    from clipforge.index.lexical import POSTINGS_FILE, quantize_weights
    from scipy import sparse

    _, _, root = built
    docs, _, _ = load_sparse_embeddings(root / "emb")
    info = build_lexical_index_dir(root / "emb", tmp_path / "q", quantize=20)
    stored = sparse.load_npz(tmp_path / "q" / POSTINGS_FILE)
    assert stored.dtype == np.uint8 and info["impact_dtype"] == "uint8" and info["quantize"] == 20
    impacts = np.rint(docs.toarray() * 20)
    assert np.array_equal(stored.T.toarray(), impacts)  # vocabulary x documents on disk
    assert stored.nnz == int((impacts > 0).sum()) <= docs.nnz
    small = quantize_weights(sparse.csr_matrix(np.array([[0.001, 0.5], [0.2, 0.0]], dtype=np.float32)), 10)
    assert small.toarray().tolist() == [[0, 5], [2, 0]] and small.nnz == 2  # weights under 0.5 / Q leave
    assert info["index_bytes"] < json.loads((root / "idx" / "index.json").read_text())["index_bytes"]
    assert 0.0 <= info["recall@10_vs_float32"] <= 1.0 and info["recall@10"] == 1.0
    index = open_index(tmp_path / "q")
    queries = docs[:6].toarray()
    scores, ids = index.search(queries, 5)
    want = queries @ (impacts / 20).T
    for q in range(len(queries)):
        matched = want[q] > 0
        order = np.lexsort((np.arange(len(want[q])), -want[q]))[:min(5, int(matched.sum()))]
        assert np.allclose(scores[q, :len(order)], want[q, order], atol=1e-5)
    assert np.allclose(index.vector(int(index.ids[0])), impacts[0] / 20)  # the weights the impacts stand for
    wide = quantize_weights(docs, 1000.0)  # impacts above 255 need 16 bits
    assert wide.dtype == np.uint16 if wide.data.max() > 255 else wide.dtype == np.uint8
    with pytest.raises(SearchIndexError, match="positive scale"):
        build_lexical_index_dir(root / "emb", tmp_path / "bad", quantize=0)
    with pytest.raises(SearchIndexError, match="more than a uint16"):
        quantize_weights(docs, 1e9)


def test_seismic_back_end_is_measured_against_exact_search(built, tmp_path):
    pytest.importorskip("seismic")
    _, _, root = built
    info = build_lexical_index_dir(root / "emb", tmp_path / "seismic", backend="seismic")
    assert info["backend"] == "seismic" and 0.0 <= info["recall@10"] <= 1.0
    index = LexicalIndex(tmp_path / "seismic")
    docs, _, _ = load_sparse_embeddings(root / "emb")
    assert index.search(docs[:2].toarray(), 5)[1].shape == (2, 5)


def test_lexical_index_errors_name_the_problem(built, tmp_path):
    _, _, root = built
    with pytest.raises(SearchIndexError, match="unknown lexical back end"):
        build_lexical_index_dir(root / "emb", tmp_path / "a", backend="lucene")
    with pytest.raises(FileExistsError, match="not empty"):
        build_lexical_index_dir(root / "emb", root / "idx")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "index.json").write_text(json.dumps({"kind": "lexical"}))
    with pytest.raises(SearchIndexError, match="postings.npz is missing or damaged"):
        open_index(broken)


# ----------------------------------------------------------------------------- serving
def test_text_query_ranks_by_sparse_dot_product_and_shows_words(built, client):
    ckpt, _, root = built
    response = client.post("/search", json={"text": "a red circle", "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    model, _, tokenizer = clipforge.load(ckpt)
    with torch.no_grad():
        query = model.encode_text(*tokenizer(["a red circle"]), sparse=True).to_dense()[0].numpy()
    docs, table, _ = load_sparse_embeddings(root / "emb")
    dense = docs.toarray() @ query
    expected = np.lexsort((np.arange(len(dense)), -dense))[:len(body["results"])]
    assert [r["id"] for r in body["results"]] == table.column("id").to_numpy()[expected].tolist()
    assert body["results"][0]["score"] == pytest.approx(float(dense[expected[0]]), abs=1e-4)
    # interpretability: the query's top words are its largest weights, each result shows its own
    top = np.argsort(-query)[:len(body["query_words"])]
    assert [w["weight"] for w in body["query_words"]] == pytest.approx(query[top].tolist(), abs=1e-4)
    assert all(r["words"] and r["words"][0]["weight"] > 0 for r in body["results"])


def test_image_and_item_queries_and_health(client):
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (220, 30, 30)).save(buf, format="PNG")
    response = client.post("/search", json={"image": base64.b64encode(buf.getvalue()).decode(), "k": 4})
    assert response.status_code == 200, response.text
    assert response.json()["query_words"]
    similar = client.get("/similar/3?k=3").json()
    assert similar["results"][0]["id"] == 3 and similar["query_words"]
    health = client.get("/health").json()
    assert health == {"kind": "lexical", "what": "images", "count": 24, "dim": 256}
    assert "query-words" in client.get("/").text


def test_cli_embed_sparse_then_index_lexical(built, tmp_path):
    ckpt, pairs, _ = built
    runner = CliRunner()
    result = runner.invoke(app, ["embed", str(ckpt), "--data", f"jsonl:{pairs}", "--out", str(tmp_path / "emb"),
                                 "--workers", "0", "--sparse"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["index", str(tmp_path / "emb"), "--kind", "lexical", "--out", str(tmp_path / "idx")])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["kind"] == "lexical" and printed["count"] == 24 and printed["recall@10"] == 1.0
    result = runner.invoke(app, ["index", str(tmp_path / "emb"), "--kind", "lexical", "--quantize", "100",
                                 "--out", str(tmp_path / "qidx")])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["quantize"] == 100 and printed["impact_dtype"] in ("uint8", "uint16") and "recall@10_vs_float32" in printed
    result = runner.invoke(app, ["index", str(tmp_path / "emb"), "--quantize", "100", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "--kind lexical" in result.output
