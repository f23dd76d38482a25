"""`clipforge eval` / `clipforge embed` on wds: shards: materialised once into a cache, then read as jsonl."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipforge.cli import app
from clipforge.data import wds_files
from clipforge.data.shards import write_shards
from clipforge.data.sources import DataError, read_caption_data, read_classification_data

from datafiles import write_folder
from tiny_checkpoint import make_caption_jsonl, make_tiny_checkpoint

pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(pairs.jsonl with 24 images / 32 captions, a directory with the same samples in 2 shards, in order)."""
    root = tmp_path_factory.mktemp("data")
    pairs = make_caption_jsonl(root / "table", n=24)
    result = CliRunner().invoke(app, ["data", "shard", f"jsonl:{pairs}", "--out", str(root / "shards"),
                                      "--samples-per-shard", "12", "--no-shuffle"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (root / "shards").glob("*.tar")) == ["00000.tar", "00001.tar"]
    return pairs, root / "shards"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "wds"


def wds(shards: Path) -> str:
    return f"wds:{shards}/{{00000..00001}}.tar"


def run(*args) -> dict:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


# ----------------------------------------------------------------------------- eval
def test_eval_retrieval_on_shards_equals_the_jsonl_it_was_made_from(ckpt, data, tmp_path):
    pairs, shards = data
    run("eval", ckpt, "--task", "retrieval", "--data", wds(shards), "--out", tmp_path / "w.json", "--workers", "0")
    run("eval", ckpt, "--task", "retrieval", "--data", f"jsonl:{pairs}", "--out", tmp_path / "j.json", "--workers", "0")
    on_shards, on_table = (json.loads((tmp_path / f).read_text()) for f in ("w.json", "j.json"))
    assert on_shards["dataset"] == wds(shards)
    assert on_shards["data"] == on_table["data"]  # 24 images, 32 captions, nothing skipped
    assert on_shards["metrics"] == pytest.approx(on_table["metrics"], abs=1e-6)


def test_reader_gives_the_tables_captions_and_a_directory_spec_shares_the_cache(data, cache):
    pairs, shards = data
    on_shards, on_table = read_caption_data(wds(shards)), read_caption_data(f"jsonl:{pairs}")
    assert on_shards.source == wds(shards)
    assert (on_shards.captions, on_shards.text_to_image) == (on_table.captions, on_table.text_to_image)
    # the image files hold the tar's bytes, which are the table's files byte for byte (PNGs are copied)
    assert [p.read_bytes() for p in on_shards.paths] == [p.read_bytes() for p in on_table.paths]
    assert all(cache in p.parents for p in on_shards.paths)
    assert read_caption_data(f"wds:{shards}").paths == on_shards.paths  # same shards, same cache directory
    assert len(list(cache.iterdir())) == 1


# ----------------------------------------------------------------------------- embed / serve
def test_embed_on_shards_and_the_server_finds_the_images(ckpt, data, tmp_path, cache):
    pytest.importorskip("pyarrow")
    pytest.importorskip("faiss")
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipforge.index.dense import build_index_dir
    from clipforge.index.embed import load_embeddings
    from clipforge.index.server import create_app

    pairs, shards = data
    run("embed", ckpt, "--data", wds(shards), "--out", tmp_path / "emb", "--workers", "0")
    run("embed", ckpt, "--data", f"jsonl:{pairs}", "--out", tmp_path / "emb_table", "--workers", "0")
    vectors, table, _ = load_embeddings(tmp_path / "emb", "images")
    expected, _, _ = load_embeddings(tmp_path / "emb_table", "images")
    rows = table.to_pylist()
    assert len(rows) == 24 and all(Path(r["image"]).is_file() and cache in Path(r["image"]).parents for r in rows)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)  # the same images, in the same order

    build_index_dir(tmp_path / "emb", tmp_path / "idx", kind="flat")
    client = TestClient(create_app(tmp_path / "idx"))
    response = client.get("/image/5")  # a thumbnail made from the cached file
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"


# ----------------------------------------------------------------------------- cache
def test_second_call_reuses_the_cache_and_a_changed_shard_makes_a_new_one(data, tmp_path, cache, monkeypatch):
    _, original = data
    shards = tmp_path / "shards"
    shutil.copytree(original, shards)
    first = read_caption_data(wds(shards))
    extract = wds_files._extract

    def must_not_run(*args):
        raise AssertionError("extracted again although the shards did not change")

    monkeypatch.setattr(wds_files, "_extract", must_not_run)
    assert read_caption_data(wds(shards)).paths == first.paths
    monkeypatch.setattr(wds_files, "_extract", extract)
    stat = (shards / "00001.tar").stat()
    os.utime(shards / "00001.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "rewritten"
    second = read_caption_data(wds(shards))
    assert second.paths != first.paths and len(second.paths) == 24
    assert sorted(p.name.startswith(".") for p in cache.iterdir()) == [False, False]  # two caches, no temp dir


def test_an_interrupted_extraction_leaves_no_cache(data, cache, monkeypatch):
    _, shards = data
    calls = Counter()
    label = wds_files._label

    def interrupt_at_the_fifth_sample(files):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return label(files)

    monkeypatch.setattr(wds_files, "_label", interrupt_at_the_fifth_sample)
    with pytest.raises(KeyboardInterrupt):
        read_caption_data(wds(shards))
    assert list(cache.iterdir()) == []  # neither a half cache nor its temporary directory
    monkeypatch.setattr(wds_files, "_label", label)
    assert len(read_caption_data(wds(shards)).paths) == 24


# ----------------------------------------------------------------------------- faults and labels
def test_a_truncated_shard_is_skipped_with_a_count(ckpt, data, tmp_path):
    _, original = data
    shards = tmp_path / "shards"
    shutil.copytree(original, shards)
    cut = shards / "00001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"truncated_tar: \d+") as caught:
        read = read_caption_data(wds(shards))
    lost = int(str(caught[0].message).split("truncated_tar: ")[1].split(")")[0].split(",")[0])
    assert 12 <= len(read.paths) < 24 and lost == 24 - len(read.paths)  # sizes.json says 12 per shard
    info = json.loads(next((tmp_path / "cache" / "wds").glob("*/materialised.json")).read_text())
    assert info["samples"] == 24 and info["skipped"] == {"truncated_tar": lost}
    out = tmp_path / "r.json"
    with pytest.warns(UserWarning, match=f"truncated_tar: {lost}"):  # said again when the cache is reused
        run("eval", ckpt, "--task", "retrieval", "--data", wds(shards), "--out", out, "--workers", "0")
    assert json.loads(out.read_text())["data"]["images"] == len(read.paths)


def test_labels_come_from_the_shards_json_and_unlabelled_shards_are_a_clear_error(data, tmp_path):
    folder = write_folder(tmp_path / "folder", per_class=3)
    write_shards(f"imagefolder:{folder}", tmp_path / "labelled", samples_per_shard=4)
    labelled = read_classification_data(f"wds:{tmp_path / 'labelled'}")
    assert labelled.classnames == ["cat", "dog", "pickup truck"]  # the .json's classname: words for prompts
    assert Counter(labelled.classnames[i] for i in labelled.labels) == {"cat": 3, "dog": 3, "pickup truck": 3}
    with pytest.raises(DataError, match="no sample's .json has a 'label'"):
        read_classification_data(wds(data[1]))


def test_remote_shards_are_refused_with_a_message():
    with pytest.raises(DataError, match="local wds: shards only"):
        read_caption_data("wds:https://example.com/{00000..00001}.tar")
    with pytest.raises(DataError, match="local wds: shards only"):
        read_caption_data("wds:pipe:curl -s https://example.com/00000.tar")


def test_recipe_eval_tasks_take_shards(ckpt, data):
    """[[eval.tasks]] on wds: builds its hook from the same cache and scores like the jsonl table."""
    import clipforge
    from clipforge.config import load_recipe
    from clipforge.eval.hooks import eval_task_hooks

    pairs, shards = data
    model, _, tokenizer = clipforge.load(ckpt)
    scores = []
    for spec in (wds(shards), f"jsonl:{pairs}"):
        recipe = load_recipe("tiny-shapes", [f'eval.tasks=[{{task="retrieval", data="{spec}", name="pairs"}}]'])
        (hook,) = eval_task_hooks(recipe)
        scores.append(hook(model, tokenizer, 1))
    assert scores[0] == scores[1] and any(k.startswith("val/retrieval/pairs/") for k in scores[0])


def test_cache_folders_get_the_usual_mode(data, cache):
    """Not mkdtemp's 0700: a search server running as another user reads the thumbnails from here."""
    import os

    from clipforge.data.sources import read_caption_data

    _, shards = data
    old = os.umask(0o022)
    try:
        read_caption_data(wds(shards))
    finally:
        os.umask(old)
    (folder,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert folder.stat().st_mode & 0o777 == 0o755
