"""Batch schema v2: raw captions, stable sample keys, T captions per image with text_owner, per-sample weights."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pydantic
import pytest
import torch

from clipforge.config import DataConfig, RecipeError, load_recipe
from clipforge.data.augment import decode_crop_resize
from clipforge.data.loader import build_train_loader
from clipforge.data.pipeline import build_source_train_loader, unique_suffixes
from clipforge.data.shards import inspect_shards, write_shards
from clipforge.data.sources import DataError

from datafiles import jpeg_bytes, write_csv, write_folder, write_good_shards, write_images, write_jsonl


class FakeTokenizer:
    """One id per word (8 columns), so token rows can be matched back to their captions."""

    def __call__(self, texts):
        ids = torch.zeros(len(texts), 8, dtype=torch.long)
        for i, t in enumerate(texts):
            words = [sum(map(ord, w)) % 1000 + 1 for w in t.split()][:8]
            ids[i, : len(words)] = torch.tensor(words)
        return ids, (ids > 0).long()


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def keyed(batches: list[dict]) -> list[tuple[int, str]]:
    """(index, key) of every sample, in stream order."""
    return [(i, k) for b in batches for i, k in zip(b["indices"].tolist(), b["keys"])]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch_v2")
    write_jsonl(root / "jsonl", 24)
    write_csv(root / "csv", 24)
    write_folder(root / "folder", per_class=8)  # 24 images
    write_good_shards(root / "shards", shards=4, per_shard=6)
    return root


def specs(root: Path) -> dict[str, str]:
    return {
        "wds": f"wds:{root}/shards/{{00000..00003}}.tar",
        "jsonl": f"jsonl:{root}/jsonl/pairs.jsonl",
        "csv": f"csv:{root}/csv/pairs.csv",
        "imagefolder": f"imagefolder:{root}/folder",
        "shapes": "shapes",
    }


def expected_key(kind: str, index: int, caption: str) -> str:
    """What the key of a sample of the test data must be (captions 'picture i' name the sample)."""
    i = int(caption.split()[-1]) if kind in ("wds", "jsonl", "csv") else index
    return {"wds": f"{i // 6:05d}.tar/{i:06d}", "jsonl": f"pairs.jsonl:{i + 1}", "csv": f"pairs.csv:{i + 2}",
            "shapes": f"shapes:{index}"}[kind]


# ----------------------------------------------------------------------------- every source
@pytest.mark.parametrize("kind", ["wds", "jsonl", "csv", "imagefolder", "shapes"])
def test_every_source_carries_captions_and_keys(data_dir, kind):
    cfg = DataConfig(train=specs(data_dir)[kind], batch_size=6, num_workers=0)
    batch = next(build_train_loader(cfg, 16, FakeTokenizer()))
    captions, keys = batch["captions"], batch["keys"]
    assert isinstance(captions, list) and len(captions) == 6 and all(isinstance(c, str) and c for c in captions)
    assert isinstance(keys, list) and len(keys) == 6 and len(set(keys)) == 6 and all(isinstance(k, str) for k in keys)
    ids, mask = FakeTokenizer()(captions)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)  # row j is captions[j]
    assert "text_owner" not in batch and "weights" not in batch  # T = 1, no weight column
    if kind == "imagefolder":
        names = ["cat", "dog", "pickup_truck"]
        for key, label in zip(keys, batch["labels"].tolist()):
            folder, file = key.split("/")
            assert folder == names[label] and file.startswith("img") and file.endswith(".jpg")
    else:
        assert keys == [expected_key(kind, i, c) for i, c in zip(batch["indices"].tolist(), captions)]


def test_shapes_batches_keep_captions_and_key_by_index_with_workers():
    cfg = DataConfig(batch_size=4, num_workers=2)
    batches = take(build_train_loader(cfg, 16, FakeTokenizer(), start_sample=8), 3)
    assert [k for b in batches for k in b["keys"]] == [f"shapes:{i}" for i in range(8, 20)]
    assert all(len(b["captions"]) == 4 for b in batches)
    two_ranks = [next(build_train_loader(cfg, 16, None, start_sample=8, rank=r, world_size=2))["keys"] for r in (0, 1)]
    assert two_ranks == [[f"shapes:{i}" for i in range(8, 12)], [f"shapes:{i}" for i in range(12, 16)]]


# ----------------------------------------------------------------------------- stable keys
@pytest.mark.parametrize("kind", ["wds", "jsonl", "imagefolder"])
def test_keys_are_the_same_for_any_number_of_workers_or_ranks_and_every_epoch(data_dir, kind):
    # epoch mode: 3 epochs per stream; every (index -> key) pair must agree everywhere
    n = 24
    pairs: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for workers, world in [(0, 1), (1, 1), (2, 1), (2, 2)]:
        streams = world * max(1, workers)
        cfg = DataConfig(train=specs(data_dir)[kind], num_workers=workers, batch_size=n // (2 * streams),
                         shuffle_buffer=4)
        seen = []
        for rank in range(world):
            seen += keyed(take(build_source_train_loader(cfg, 16, None, rank=rank, world_size=world),
                               2 * max(1, workers) * 3))
        assert Counter(seen) == Counter({pair: 3 for pair in set(seen)})  # each sample once per epoch, same key
        pairs[workers, world] = sorted(set(seen))
    first = pairs[0, 1]
    assert len(first) == n and len({k for _, k in first}) == n  # one key per sample, no two alike
    assert all(p == first for p in pairs.values())


def test_keys_survive_a_kill_and_resume(data_dir):
    cfg = DataConfig(train=specs(data_dir)["wds"], num_workers=2, batch_size=5, shuffle_buffer=7)
    full = take(build_source_train_loader(cfg, 16, None), 14)  # past the end of the first epoch
    first = build_source_train_loader(cfg, 16, None)
    before = take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    take(first, 2)  # lost in the kill
    after = take(build_source_train_loader(cfg, 16, None, start_sample=25, state=state), 9)
    assert keyed(before + after) == keyed(full)
    assert [c for b in before + after for c in b["captions"]] == [c for b in full for c in b["captions"]]
    # and the built-in source, resumed from the sample count
    shapes = DataConfig(batch_size=4, num_workers=2)
    whole = [k for b in take(build_train_loader(shapes, 16, None), 4) for k in b["keys"]]
    resumed = [k for b in take(build_train_loader(shapes, 16, None, start_sample=8), 2) for k in b["keys"]]
    assert resumed == whole[8:]


@pytest.mark.parametrize("kind", ["wds", "jsonl", "imagefolder"])
def test_source_samples_give_the_keys_training_looks_up(data_dir, kind):
    from clipforge.data.pipeline import source_samples

    cfg = DataConfig(train=specs(data_dir)[kind], num_workers=0, batch_size=8)
    listed = [(raw.uid, raw.key) for raw in source_samples(cfg)]
    assert [uid for uid, _ in listed] == list(range(24))
    assert sorted(keyed(take(build_source_train_loader(cfg, 16, None), 3))) == listed


def test_table_keys_come_from_an_id_or_key_column(tmp_path):
    paths = write_images(tmp_path / "images", 4)
    rows = [{"image": f"images/{p.name}", "text": f"picture {i}"} for i, p in enumerate(paths)]
    rows[0]["id"], rows[1]["id"], rows[2]["id"] = "cat-001", 17, ""  # an empty id falls back to file:line
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig(train=f"jsonl:{tmp_path}/t.jsonl", batch_size=4, num_workers=0, shuffle_buffer=1)
    batch = next(build_source_train_loader(cfg, 16, None))
    assert dict(zip(batch["captions"], batch["keys"])) == {"picture 0": "cat-001", "picture 1": "17",
                                                            "picture 2": "t.jsonl:3", "picture 3": "t.jsonl:4"}
    (tmp_path / "t.csv").write_text("key,filepath,caption\n" + "".join(f"k{i},images/{p.name},picture {i}\n"
                                                                      for i, p in enumerate(paths)))
    batch = next(build_source_train_loader(cfg.model_copy(update={"train": f"csv:{tmp_path}/t.csv"}), 16, None))
    assert dict(zip(batch["captions"], batch["keys"])) == {f"picture {i}": f"k{i}" for i in range(4)}


def test_keys_of_same_named_tables_and_shards_are_told_apart(tmp_path):
    write_jsonl(tmp_path / "a", 3, start=0)
    write_jsonl(tmp_path / "b", 3, start=100)
    cfg = DataConfig(train=f"jsonl:{tmp_path}/a/pairs.jsonl + jsonl:{tmp_path}/b/pairs.jsonl", batch_size=6,
                     num_workers=0)
    batch = next(build_source_train_loader(cfg, 16, None))
    assert sorted(batch["keys"]) == [f"{d}/pairs.jsonl:{i}" for d in "ab" for i in (1, 2, 3)]
    write_good_shards(tmp_path / "x" / "s", shards=1, per_shard=2)
    write_good_shards(tmp_path / "y" / "s", shards=1, per_shard=2)
    cfg = DataConfig(train=f"wds:{tmp_path}/x/s/00000.tar::{tmp_path}/y/s/00000.tar", batch_size=4, num_workers=0)
    assert sorted(next(build_source_train_loader(cfg, 16, None))["keys"]) == [
        f"{d}/s/00000.tar/00000{i}" for d in "xy" for i in (0, 1)]
    assert unique_suffixes(["/d/a/0.tar", "/d/b/0.tar", "/d/a/1.tar", "/d/a/0.tar", "0.tar"]) == [
        "a/0.tar", "b/0.tar", "1.tar", "a/0.tar", "0.tar"]


# ----------------------------------------------------------------------------- T captions per image
def write_caption_lists(root: Path, lengths: list[int]) -> Path:
    """Row i: image i and a caption list of lengths[i] captions 'sample i caption c' (c = a, b, ...)."""
    paths = write_images(root / "images", len(lengths))
    rows = [{"image": f"images/{p.name}", "captions": [f"sample {i} caption {chr(97 + c)}" for c in range(n)]}
            for i, (p, n) in enumerate(zip(paths, lengths))]
    table = root / "lists.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table


def owner_of(caption: str) -> int:
    return int(caption.split()[1])


def check_owned_captions(batch: dict, per_sample: int, lengths: list[int], sample_of) -> None:
    """Rows are sample-major, text_owner names each row's image, every caption is from that image's own list."""
    n = batch["images"].shape[0]
    assert batch["text_owner"].dtype == torch.long
    assert batch["text_owner"].tolist() == [i for i in range(n) for _ in range(per_sample)]
    assert len(batch["captions"]) == n * per_sample
    for i in range(n):
        mine = batch["captions"][i * per_sample: (i + 1) * per_sample]
        sample = sample_of(batch, i)
        assert {owner_of(c) for c in mine} == {sample}
        if lengths[sample] >= per_sample:
            assert len(set(mine)) == per_sample  # drawn without replacement
        else:
            assert set(mine) <= {f"sample {sample} caption {chr(97 + c)}" for c in range(lengths[sample])}


def test_several_captions_per_image_from_a_jsonl_list(tmp_path):
    lengths = [3, 1, 2, 5, 4, 3, 2, 1, 3, 2, 6, 3]
    table = write_caption_lists(tmp_path, lengths)
    cfg = DataConfig(train=f"jsonl:{table}", batch_size=4, num_workers=0, captions_per_sample=2)
    loader = build_source_train_loader(cfg, 16, FakeTokenizer())
    batches = take(loader, 6)  # two epochs
    for b in batches:
        assert b["input_ids"].shape == b["attention_mask"].shape == (8, 8)
        assert torch.equal(b["input_ids"], FakeTokenizer()(b["captions"])[0])
        check_owned_captions(b, 2, lengths, lambda b, i: b["indices"][i].item())
    # per epoch, a sample's draw differs (seeded per epoch and position), and the stream is seeded
    again = take(build_source_train_loader(cfg, 16, FakeTokenizer()), 6)
    assert [b["captions"] for b in again] == [b["captions"] for b in batches]
    by_epoch = [{i: tuple(b["captions"][2 * j: 2 * j + 2]) for b in half for j, i in enumerate(b["indices"].tolist())}
                for half in (batches[:3], batches[3:])]
    assert by_epoch[0] != by_epoch[1]


def test_several_captions_per_image_resume_exactly(tmp_path):
    table = write_caption_lists(tmp_path, [4] * 20)
    cfg = DataConfig(train=f"jsonl:{table}", batch_size=3, num_workers=2, captions_per_sample=3, shuffle_buffer=5)
    full = take(build_source_train_loader(cfg, 16, None), 10)
    first = build_source_train_loader(cfg, 16, None)
    before = take(first, 3)
    after = take(build_source_train_loader(cfg, 16, None, start_sample=9, state=first.state_dict()), 7)
    for a, b in zip(before + after, full):
        assert a["captions"] == b["captions"] and a["keys"] == b["keys"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["text_owner"], b["text_owner"])


def test_csv_cells_holding_json_lists_are_caption_lists(tmp_path):
    import csv

    from clipforge.data.sources import read_caption_data

    lengths = [2, 3, 1, 4, 2, 2]
    paths = write_images(tmp_path / "images", len(lengths))
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "captions"])
        for i, (p, n) in enumerate(zip(paths, lengths)):
            w.writerow([f"images/{p.name}", json.dumps([f"sample {i} caption {chr(97 + c)}" for c in range(n)])])
        w.writerow([f"images/{paths[0].name}", "[sic] sample 0 in brackets"])  # not JSON: one plain caption
    cfg = DataConfig(train=f"csv:{tmp_path}/t.csv", batch_size=7, num_workers=0, captions_per_sample=2)
    batch = next(build_source_train_loader(cfg, 16, None))
    assert batch["text_owner"].tolist() == [i // 2 for i in range(14)]
    for i, row in enumerate(batch["indices"].tolist()):
        mine = batch["captions"][2 * i: 2 * i + 2]
        if row == 6:
            assert mine == ["[sic] sample 0 in brackets"] * 2
        else:  # row i of the table is sample i: both captions from its own list, distinct when it has two
            assert {owner_of(c) for c in mine} == {row} and len(set(mine)) == min(2, lengths[row])
    assert len(read_caption_data(f"csv:{tmp_path}/t.csv").captions) == sum(lengths) + 1  # retrieval reads lists too


def test_one_caption_per_image_draws_one_from_the_list_and_has_no_owner(tmp_path):
    table = write_caption_lists(tmp_path, [3] * 8)
    cfg = DataConfig(train=f"jsonl:{table}", batch_size=8, num_workers=0)
    batch = next(build_source_train_loader(cfg, 16, FakeTokenizer()))
    assert "text_owner" not in batch and batch["input_ids"].shape == (8, 8)
    assert [owner_of(c) for c in batch["captions"]] == batch["indices"].tolist()


def test_shapes_with_several_captions_is_a_config_error():
    with pytest.raises(pydantic.ValidationError, match="needs caption lists.*jsonl:/csv: list-valued caption column"):
        DataConfig(captions_per_sample=2)
    with pytest.raises(RecipeError, match="data.captions_per_sample=3 needs caption lists"):
        load_recipe("tiny-shapes", ["data.captions_per_sample=3"])
    with pytest.raises(pydantic.ValidationError, match="greater than or equal to 1"):
        DataConfig(train="jsonl:x.jsonl", captions_per_sample=0)
    assert DataConfig(train="jsonl:x.jsonl", captions_per_sample=5).captions_per_sample == 5


# ----------------------------------------------------------------------------- weights
def test_weights_come_from_a_weight_column(tmp_path):
    paths = write_images(tmp_path / "images", 4)
    (tmp_path / "w.csv").write_text("filepath,caption,weight\n" + "".join(
        f"images/{p.name},picture {i},{0.5 * i}\n" for i, p in enumerate(paths)))
    cfg = DataConfig(train=f"csv:{tmp_path}/w.csv", batch_size=4, num_workers=0)
    batch = next(build_source_train_loader(cfg, 16, None))
    assert batch["weights"].dtype == torch.float32 and batch["weights"].shape == (4,)
    assert batch["weights"].tolist() == [0.5 * owner for owner in (int(c.split()[1]) for c in batch["captions"])]
    # a mixture: samples of the table without the column weigh 1
    write_jsonl(tmp_path / "plain", 4, start=50)
    mixed = cfg.model_copy(update={"train": f"csv:{tmp_path}/w.csv + jsonl:{tmp_path}/plain/pairs.jsonl",
                                   "batch_size": 8})
    batch = next(build_source_train_loader(mixed, 16, None))
    expected = {f"picture {i}": 0.5 * i for i in range(4)} | {f"picture {i}": 1.0 for i in range(50, 54)}
    assert dict(zip(batch["captions"], batch["weights"].tolist())) == expected


@pytest.mark.parametrize("bad", ["heavy", "-1", ""])
def test_a_bad_weight_names_the_line(tmp_path, bad):
    paths = write_images(tmp_path / "images", 2)
    (tmp_path / "w.csv").write_text(
        f"filepath,caption,weight\nimages/{paths[0].name},a,1\nimages/{paths[1].name},b,{bad}\n")
    cfg = DataConfig(train=f"csv:{tmp_path}/w.csv", batch_size=2, num_workers=0)
    with pytest.raises(DataError, match=r"w.csv, line 3: 'weight' must be a number >= 0, got '" + bad + "'"):
        build_source_train_loader(cfg, 16, None)


# ----------------------------------------------------------------------------- shards round trip
def test_caption_lists_round_trip_through_shards(tmp_path):
    lengths = [3, 1, 2, 4, 2, 3, 1, 5, 2, 3]
    table = write_caption_lists(tmp_path / "in", lengths)
    stats = write_shards(f"jsonl:{table}", tmp_path / "s", samples_per_shard=4)
    assert stats["caption_lists"] == {"samples": 10, "mean_captions": 2.6,
                                      "captions_per_sample": {"1": 2, "2": 3, "3": 3, "4": 1, "5": 1}}
    import webdataset as wds

    for s in wds.WebDataset(str(tmp_path / "s" / "{00000..00002}.tar"), shardshuffle=False):
        meta, first = json.loads(s["json"]), s["txt"].decode()
        sample = owner_of(first)
        assert meta["captions"] == [f"sample {sample} caption {chr(97 + c)}" for c in range(lengths[sample])]
        assert first == meta["captions"][0]
    report = inspect_shards(tmp_path / "s", tmp_path / "report", grid=4)
    assert report["readable"] == 10 and report["caption_lists"] == stats["caption_lists"]

    # the loader prefers the .json list: T = 2 captions from each image's own list, next to its own image
    cfg = DataConfig(train=f"wds:{tmp_path}/s/{{00000..00002}}.tar", batch_size=5, num_workers=0,
                     captions_per_sample=2, augment={"random_resized_crop": False})
    batches = take(build_source_train_loader(cfg, 16, FakeTokenizer()), 4)  # two epochs
    images = {i: decode_crop_resize(jpeg_bytes(i), 16, None) for i in range(10)}

    def sample_of(batch, i):
        sample = owner_of(batch["captions"][2 * i])
        assert torch.equal(batch["images"][i], images[sample])  # the captions are this image's
        return sample

    for b in batches:
        assert b["input_ids"].shape == (10, 8)
        check_owned_captions(b, 2, lengths, sample_of)
        assert all(k.split("/")[0] in ("00000.tar", "00001.tar", "00002.tar") for k in b["keys"])
    assert sorted(k for b in batches[:2] for k in b["keys"]) == sorted(k for b in batches[2:] for k in b["keys"])
    assert len({k for b in batches for k in b["keys"]}) == 10


def test_a_wds_json_list_without_txt_still_gives_captions(tmp_path):
    from datafiles import write_tar

    write_tar(tmp_path / "00000.tar", [
        {"__key__": "a", "jpg": jpeg_bytes(1),
         "json": json.dumps(["sample 0 caption a", "sample 0 caption b"]).encode()},
        {"__key__": "b", "jpg": jpeg_bytes(2), "txt": b"sample 1 caption a", "json": b"{not json"},
    ])
    cfg = DataConfig(train=f"wds:{tmp_path}/00000.tar", batch_size=2, num_workers=0, captions_per_sample=2,
                     shuffle_buffer=1)
    batch = next(build_source_train_loader(cfg, 16, None))
    assert batch["keys"] == ["00000.tar/a", "00000.tar/b"]
    assert sorted(batch["captions"][:2]) == ["sample 0 caption a", "sample 0 caption b"]
    assert batch["captions"][2:] == ["sample 1 caption a"] * 2  # one caption: repeated
