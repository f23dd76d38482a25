"""Training sources on disk: every source kind, both loader modes, exact resume, decoding and augmentation."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.config import DataConfig, RecipeError, load_recipe
from clipforge.data.augment import decode_crop_resize as decode_chw, random_resized_crop_box, upright_size
from clipforge.data.loader import build_train_loader, caption_corpus_for
from clipforge.data.pipeline import build_source_train_loader
from clipforge.data.sources import DataError, load_image
from clipforge.data.transforms import EvalPreprocess

from datafiles import jpeg_bytes, png_bytes, write_csv, write_folder, write_good_shards, write_jsonl, write_tar, good_sample


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def uids(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["indices"].tolist()]


def decode_crop_resize(*args, **kwargs) -> np.ndarray:
    """The decoder's 3xSxS uint8 tensor as an SxSx3 array, to compare with Pillow references."""
    out = decode_chw(*args, **kwargs)
    assert out.dtype == torch.uint8 and out.shape[0] == 3
    return out.permute(1, 2, 0).numpy()


class FakeTokenizer:
    """Stands in for the BPE tokenizer: one id per word, so batches carry real id tensors."""

    def __call__(self, texts):
        ids = torch.zeros(len(texts), 8, dtype=torch.long)
        for i, t in enumerate(texts):
            words = [sum(map(ord, w)) % 1000 for w in t.split()][:8]
            ids[i, : len(words)] = torch.tensor(words)
        return ids, (ids > 0).long()


# ----------------------------------------------------------------------------- every source
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    write_jsonl(root / "jsonl", 24)
    write_csv(root / "csv", 24)
    write_folder(root / "folder")
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


@pytest.mark.parametrize("kind", ["wds", "jsonl", "csv", "imagefolder", "shapes"])
def test_every_source_gives_the_same_batch_format(data_dir, kind):
    cfg = DataConfig(train=specs(data_dir)[kind], batch_size=4, num_workers=0)
    batch = next(build_train_loader(cfg, 32, FakeTokenizer()))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["input_ids"].shape == (4, 8) and batch["attention_mask"].shape == (4, 8)
    assert batch["labels"].dtype == torch.long and batch["indices"].dtype == torch.long
    assert len(set(batch["indices"].tolist())) == 4
    assert batch["images"].float().std() > 1  # real pixels, not a zero-filled placeholder


def test_imagefolder_captions_come_from_class_names_and_the_template(data_dir):
    cfg = DataConfig(train=specs(data_dir)["imagefolder"], caption_template="an image of a {}", batch_size=12,
                     num_workers=0)
    assert sorted(set(caption_corpus_for(cfg, 100))) == ["an image of a cat", "an image of a dog",
                                                         "an image of a pickup truck"]
    batch = next(build_source_train_loader(cfg, 16, None))
    names = ["cat", "dog", "pickup truck"]
    assert sorted(batch["captions"]) == sorted(f"an image of a {names[l]}" for l in batch["labels"].tolist())
    assert sorted(batch["labels"].tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_tokenizer_corpus_is_the_first_captions_of_the_source(data_dir):
    cfg = DataConfig(train=specs(data_dir)["jsonl"])
    assert caption_corpus_for(cfg, 5) == [f"picture {i}" for i in range(5)]
    cfg = DataConfig(train=specs(data_dir)["wds"])
    assert caption_corpus_for(cfg, 8) == [f"picture {i}" for i in range(8)]


def test_wds_patterns_several_patterns_and_pipe_commands(data_dir):
    shards = data_dir / "shards"
    joined = DataConfig(train=f"wds:{shards}/{{00000..00001}}.tar::{shards}/0000{{2,3}}.tar", batch_size=24,
                        num_workers=0, shuffle_buffer=1)
    assert sorted(uids(take(build_source_train_loader(joined, 16, None), 1))) == list(range(24))
    piped = DataConfig(train=f"wds:pipe:cat {shards}/{{00000..00003}}.tar", sizes_file=str(shards / "sizes.json"),
                       batch_size=24, num_workers=0)
    assert sorted(uids(take(build_source_train_loader(piped, 16, None), 1))) == list(range(24))


def test_pipe_shards_without_sizes_are_a_clear_error(data_dir):
    cfg = DataConfig(train=f"wds:pipe:cat {data_dir}/shards/00000.tar", num_workers=0)
    with pytest.raises(DataError, match="data.sizes_file"):
        build_source_train_loader(cfg, 16, None)


def test_a_wrong_pattern_names_the_missing_shard(data_dir):
    cfg = DataConfig(train=f"wds:{data_dir}/nowhere/{{00000..00001}}.tar", num_workers=0)
    with pytest.raises(DataError, match=r"nowhere/00000.tar does not exist"):
        build_source_train_loader(cfg, 16, None)


def test_bad_train_specs_fail_at_recipe_validation():
    with pytest.raises(RecipeError, match="unknown source kind 'parquet:'"):
        load_recipe("tiny-shapes", ["data.train=parquet:x"])
    with pytest.raises(RecipeError, match="data.mode=resampled"):
        load_recipe("tiny-shapes", ["data.train=0.5*jsonl:a.jsonl + 0.5*csv:b.csv"])
    with pytest.raises(RecipeError, match="no kind prefix"):
        load_recipe("tiny-shapes", ["data.train=pairs.jsonl"])
    r = load_recipe("tiny-shapes", ["data.train=0.5*jsonl:a.jsonl + 0.5*csv:b.csv", "data.mode=resampled"])
    assert r.data.mode == "resampled"


# ----------------------------------------------------------------------------- epoch mode
@pytest.mark.parametrize("workers,world", [(0, 1), (2, 1), (2, 2)])
def test_epoch_mode_reads_every_sample_once_per_epoch(data_dir, workers, world):
    # 24 samples, G = world * max(1, workers) streams of 24/G; 2 batches per stream per epoch
    cfg = DataConfig(train=specs(data_dir)["wds"], num_workers=workers, batch_size=24 // (2 * world * max(1, workers)),
                     shuffle_buffer=4)
    seen = []
    for rank in range(world):
        loader = build_source_train_loader(cfg, 16, None, rank=rank, world_size=world)
        batches = take(loader, 2 * max(1, workers) * 3)  # three epochs
        seen += uids(batches)
    assert Counter(seen) == {i: 3 for i in range(24)}


def test_epochs_are_shuffled_differently_and_seeded(data_dir):
    def order(seed):
        cfg = DataConfig(train=specs(data_dir)["jsonl"], num_workers=0, batch_size=24, seed=seed, shuffle_buffer=8)
        return uids(take(build_source_train_loader(cfg, 16, None), 2))

    a, b = order(0), order(1)
    assert a == order(0)
    assert a != b and a[:24] != a[24:] and sorted(a[:24]) == sorted(a[24:]) == list(range(24))


def test_resume_with_the_saved_cursor_neither_repeats_nor_skips(tmp_path):
    shards = write_good_shards(tmp_path / "shards", shards=6, per_shard=10)
    # a broken sample shifts every later position: only a cursor that counts raw samples resumes exactly
    broken = [good_sample(1000 + i) for i in range(10)]
    broken[3]["jpg"] = b"not a jpeg"
    write_tar(shards / "00006.tar", broken)
    sizes = json.loads((shards / "sizes.json").read_text()) | {"00006.tar": 10}
    (shards / "sizes.json").write_text(json.dumps(sizes))
    cfg = DataConfig(train=f"wds:{shards}/{{00000..00006}}.tar", num_workers=2, batch_size=5, shuffle_buffer=7,
                     max_skip_fraction=0.2)
    full = take(build_source_train_loader(cfg, 16, None), 30)  # 150 samples: over two epochs of 69

    first = build_source_train_loader(cfg, 16, None)
    before = take(first, 11)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps (plain data)
    take(first, 3)  # consumed after the checkpoint, lost in the kill
    resumed = build_source_train_loader(cfg, 16, None, start_sample=11 * 5, state=state)
    after = take(resumed, 19)

    assert Counter(uids(before + after)) == Counter(uids(full))
    assert uids(before + after) == uids(full)  # the very same order
    for a, b in zip(before + after, full):  # and the same augmentation
        assert torch.equal(a["images"], b["images"])
    assert resumed.metrics()["data/skipped/bad_image"] == 2.0  # one per epoch, counted once


def test_resume_from_the_sample_count_alone_is_exact_without_skips(data_dir):
    cfg = DataConfig(train=specs(data_dir)["csv"], num_workers=2, batch_size=5, shuffle_buffer=5)
    full = uids(take(build_source_train_loader(cfg, 16, None), 12))
    after = uids(take(build_source_train_loader(cfg, 16, None, start_sample=7 * 5), 5))
    assert after == full[35:]


def test_a_cursor_from_another_worker_count_is_not_used_silently(data_dir):
    cfg = DataConfig(train=specs(data_dir)["csv"], num_workers=2, batch_size=4)
    loader = build_source_train_loader(cfg, 16, None)
    take(loader, 3)
    other = cfg.model_copy(update={"num_workers": 0})
    with pytest.warns(UserWarning, match="workers"):
        build_source_train_loader(other, 16, None, start_sample=12, state=loader.state_dict())


# ----------------------------------------------------------------------------- resampled mode
def test_resampled_mode_draws_with_replacement_in_virtual_epochs(data_dir):
    cfg = DataConfig(train=specs(data_dir)["wds"], mode="resampled", samples_per_epoch=60, num_workers=2,
                     batch_size=10, shuffle_buffer=6)
    loader = build_source_train_loader(cfg, 16, None)
    seen = uids(take(loader, 6))  # one virtual epoch: 60 samples from 24
    assert len(seen) == 60 and set(seen) <= set(range(24)) and max(Counter(seen).values()) > 1
    assert loader.metrics()["data/epoch"] == pytest.approx(1.0)
    again = build_source_train_loader(cfg, 16, None)
    assert uids(take(again, 6)) == seen  # seeded
    # resume mid-epoch from the cursor
    first = build_source_train_loader(cfg, 16, None)
    head = uids(take(first, 4))
    tail = uids(take(build_source_train_loader(cfg, 16, None, start_sample=40, state=first.state_dict()), 5))
    assert head + tail == uids(take(build_source_train_loader(cfg, 16, None), 9))


def test_mixture_weights_are_sample_fractions(tmp_path):
    write_jsonl(tmp_path / "a", 10, start=0)
    write_jsonl(tmp_path / "b", 40, start=100)  # four times bigger, but weighted 0.2
    cfg = DataConfig(train=f"0.8*jsonl:{tmp_path}/a/pairs.jsonl + 0.2*jsonl:{tmp_path}/b/pairs.jsonl",
                     mode="resampled", samples_per_epoch=600, num_workers=0, batch_size=100)
    seen = uids(take(build_source_train_loader(cfg, 8, None), 6))
    from_a = sum(i < 10 for i in seen) / len(seen)  # uids 0..9 are source a, 10..49 source b
    assert 0.74 < from_a < 0.86


def test_epoch_mode_mixture_reads_both_sources_once(tmp_path):
    write_jsonl(tmp_path / "a", 6)
    write_folder(tmp_path / "f", per_class=2)
    cfg = DataConfig(train=f"jsonl:{tmp_path}/a/pairs.jsonl + imagefolder:{tmp_path}/f", num_workers=0, batch_size=12)
    batch = next(build_source_train_loader(cfg, 16, None))
    assert sorted(batch["indices"].tolist()) == list(range(12))
    assert sum(c.startswith("picture") for c in batch["captions"]) == 6


# ----------------------------------------------------------------------------- decoding and augmentation
def test_eval_decode_matches_the_eval_preprocess():
    data = jpeg_bytes(7, size=(90, 60))
    ours = decode_crop_resize(data, 32)
    ref = EvalPreprocess(32)(Image.open(io.BytesIO(data))).permute(1, 2, 0).numpy()
    assert ours.shape == (32, 32, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - ref.astype(int)).mean() < 3


def test_jpeg_is_decoded_in_draft_mode_when_downscaling(monkeypatch):
    from PIL import JpegImagePlugin

    calls = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size, *a, **k):
        result = real(self, mode, size, *a, **k)
        calls.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    big = jpeg_bytes(3, size=(512, 384))
    out = decode_crop_resize(big, 64, None)
    assert out.shape == (64, 64, 3)
    assert calls and calls[0][1] < 384 and calls[0][1] >= 64  # decoded at a DCT-reduced size covering 64 px
    ref = EvalPreprocess(64)(Image.open(io.BytesIO(big))).permute(1, 2, 0).numpy()
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 4


def test_transparency_goes_onto_white():
    out = decode_crop_resize(png_bytes((255, 0, 0, 0)), 16)
    assert (out == 255).all()
    half = decode_crop_resize(png_bytes((0, 0, 0, 128)), 16)
    assert 120 < half.mean() < 135


def test_exif_orientation_is_honoured():
    # a landscape JPEG (left half black) tagged "rotate 90 CW": upright it is portrait, top half black
    pixels = np.full((40, 80, 3), 255, np.uint8)
    pixels[:, :40] = 0
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        assert upright_size(im) == ((40, 80), 6)
    out = decode_crop_resize(data, 40, random.Random(0), scale=(1.0, 1.0), ratio=(0.5, 0.5))  # the whole image
    assert out[:15].mean() < 40 and out[-15:].mean() > 215
    ref = np.asarray(load_image(io.BytesIO(data)).resize((40, 40)))
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 10


def test_random_resized_crop_boxes_stay_inside_and_follow_scale():
    rng = random.Random(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(300, 200, rng, scale=(0.3, 0.6), ratio=(3 / 4, 4 / 3))
        assert 0 <= left and left + w <= 300 and 0 <= top and top + h <= 200
        assert 0.28 <= w * h / 60000 <= 0.62


def test_training_crops_vary_and_flip_is_seeded(data_dir):
    data = jpeg_bytes(11, size=(120, 80))
    crops = {decode_crop_resize(data, 24, random.Random(s), scale=(0.2, 0.5)).tobytes() for s in range(5)}
    assert len(crops) == 5
    a = decode_crop_resize(data, 24, random.Random(3), hflip=True)
    assert np.array_equal(a, decode_crop_resize(data, 24, random.Random(3), hflip=True))
    flips = [np.array_equal(decode_crop_resize(data, 24, random.Random(s), scale=(1, 1), ratio=(1.5, 1.5), hflip=True),
                            decode_crop_resize(data, 24, random.Random(s), scale=(1, 1), ratio=(1.5, 1.5)))
             for s in range(12)]
    assert 0 < sum(flips) < 12  # about half the samples are flipped
