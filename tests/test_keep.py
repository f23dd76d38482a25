"""data.keep: every source trains on exactly the kept samples, resumes exactly and splits across ranks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from clipforge.config import DataConfig
from clipforge.data.keep import read_keep_list, write_keep_list
from clipforge.data.loader import build_train_loader
from clipforge.data.pipeline import build_source_train_loader, source_samples
from clipforge.data.sources import DataError

from datafiles import write_csv, write_folder, write_good_shards, write_jsonl

N = 24


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("keep")
    write_jsonl(root / "jsonl", N)
    write_csv(root / "csv", N)
    write_folder(root / "folder", per_class=8)
    write_good_shards(root / "shards", shards=4, per_shard=6)
    return root


def spec(root: Path, kind: str) -> str:
    return {"wds": f"wds:{root}/shards/{{00000..00003}}.tar", "jsonl": f"jsonl:{root}/jsonl/pairs.jsonl",
            "csv": f"csv:{root}/csv/pairs.csv", "imagefolder": f"imagefolder:{root}/folder"}[kind]


def all_keys(train: str) -> list[str]:
    return [raw.key for raw in source_samples(DataConfig(train=train))]


def kept_subset(keys: list[str]) -> list[str]:
    # uneven on purpose: shard 0 keeps 4 of 6, another shard keeps none of its samples
    return [k for i, k in enumerate(keys) if (i % 3 != 1 and i < 12) or i in (20, 23)]


@pytest.mark.parametrize("kind", ["wds", "jsonl", "csv", "imagefolder"])
def test_every_disk_source_reads_exactly_the_kept_samples_each_epoch(data_dir, tmp_path, kind):
    train = spec(data_dir, kind)
    keep = kept_subset(all_keys(train))
    path = write_keep_list(tmp_path / "keep.parquet", keep)
    assert read_keep_list(path) == keep
    cfg = DataConfig(train=train, keep=str(path), batch_size=2, num_workers=0, shuffle_buffer=3)
    assert sorted(raw.key for raw in source_samples(cfg)) == sorted(keep)
    seen = keys_of(take(build_source_train_loader(cfg, 16, None), len(keep)))  # two epochs
    assert Counter(seen) == Counter({k: 2 for k in keep})
    # the captions still belong to their samples (wds/tables: 'picture i' is sample i)
    if kind != "imagefolder":
        batch = next(build_source_train_loader(cfg, 16, None))
        keys = all_keys(train)
        for key, caption in zip(batch["keys"], batch["captions"]):
            assert caption == f"picture {keys.index(key)}"


def test_a_text_keep_list_works_too(data_dir, tmp_path):
    train = spec(data_dir, "jsonl")
    keep = all_keys(train)[:5]
    (tmp_path / "keep.txt").write_text("\n".join(keep) + "\n")
    cfg = DataConfig(train=train, keep=str(tmp_path / "keep.txt"), batch_size=5, num_workers=0)
    assert sorted(next(build_source_train_loader(cfg, 16, None))["keys"]) == sorted(keep)


@pytest.mark.parametrize("kind", ["wds", "jsonl"])
def test_kept_stream_resumes_exactly_and_ranks_split_it(data_dir, tmp_path, kind):
    train = spec(data_dir, kind)
    keep = kept_subset(all_keys(train))  # 10 samples
    path = write_keep_list(tmp_path / "keep.parquet", keep)
    cfg = DataConfig(train=train, keep=str(path), batch_size=2, num_workers=2, shuffle_buffer=3)
    full = keys_of(take(build_source_train_loader(cfg, 16, None), 8))  # past the first epoch
    first = build_source_train_loader(cfg, 16, None)
    before = take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    take(first, 2)  # lost in the kill
    after = take(build_source_train_loader(cfg, 16, None, start_sample=6, state=state), 5)
    assert keys_of(before + after) == full
    # two ranks x two workers: one epoch together is every kept sample once (8 = 4 slots x 2)
    path = write_keep_list(tmp_path / "keep8.parquet", keep[:8])
    one = cfg.model_copy(update={"batch_size": 1, "keep": str(path)})
    ranks = [keys_of(take(build_source_train_loader(one, 16, None, rank=r, world_size=2), 4)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(keep[:8])


def test_a_changed_keep_list_is_noticed_on_resume(data_dir, tmp_path):
    train = spec(data_dir, "jsonl")
    path = write_keep_list(tmp_path / "keep.parquet", all_keys(train)[:10])
    cfg = DataConfig(train=train, keep=str(path), batch_size=2, num_workers=0)
    state = build_source_train_loader(cfg, 16, None).state_dict()
    write_keep_list(path, all_keys(train)[:12])
    with pytest.warns(UserWarning, match="keep"):
        build_source_train_loader(cfg, 16, None, state=state)
    with pytest.warns(UserWarning, match="keep"):  # and a keep-list dropped on resume
        build_source_train_loader(cfg.model_copy(update={"keep": None}), 16, None, state=state)


def test_shapes_keep_list_cycles_the_kept_indices(tmp_path):
    path = tmp_path / "keep.txt"
    path.write_text("shapes:7\nshapes:3\nshapes:11\n")
    cfg = DataConfig(keep=str(path), batch_size=2, num_workers=2)
    keys = keys_of(take(build_train_loader(cfg, 16, None), 4))
    assert keys == ["shapes:3", "shapes:7", "shapes:11"] * 2 + ["shapes:3", "shapes:7"]
    resumed = keys_of(take(build_train_loader(cfg, 16, None, start_sample=4), 2))
    assert resumed == keys[4:]
    ranks = [keys_of(take(build_train_loader(cfg, 16, None, rank=r, world_size=2), 1)) for r in (0, 1)]
    assert ranks == [["shapes:3", "shapes:7"], ["shapes:11", "shapes:3"]]


def test_bad_keep_lists_say_what_is_wrong(data_dir, tmp_path):
    train = spec(data_dir, "jsonl")
    with pytest.raises(DataError, match="not found"):
        next(build_source_train_loader(DataConfig(train=train, keep=str(tmp_path / "nope.parquet")), 16, None))
    write_keep_list(tmp_path / "other.parquet", ["something/else:1"])
    with pytest.raises(DataError, match="none of the 1 keys"):
        build_source_train_loader(DataConfig(train=train, keep=str(tmp_path / "other.parquet")), 16, None)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "nokey.parquet")
    with pytest.raises(DataError, match="no 'key' column"):
        build_source_train_loader(DataConfig(train=train, keep=str(tmp_path / "nokey.parquet")), 16, None)
    (tmp_path / "bad.txt").write_text("pairs.jsonl:1\n")
    with pytest.raises(DataError, match="shapes:<index>"):
        next(build_train_loader(DataConfig(keep=str(tmp_path / "bad.txt")), 16, None))
