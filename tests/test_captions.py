"""Caption studies data (issue 11, parts 1 and 5): long one-fact-per-sentence captions, synthetic vs
noisy raw captions with the noise recorded per sample, sentence splitting and DreamLIP's sub-caption
draw, from the built-in shapes data and from caption lists on disk (tables and shards)."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
import torch

from clipforge.config import DataConfig, ShapesConfig
from clipforge.data import captions as C
from clipforge.data.loader import build_train_loader, caption_corpus_for, make_batch
from clipforge.data.synthetic import COLOURS, SHAPES, ShapesDataset

STUDY = ShapesConfig(two_objects_prob=0.3, textured_background_prob=0.5)


class FakeTokenizer:
    context_length = 8

    def __call__(self, texts):
        ids = torch.tensor([[len(t) % 50 + 1] * 8 for t in texts])
        return ids, torch.ones_like(ids)

    def truncated(self, texts):
        return [len(t.split()) > 6 for t in texts]


def dataset(split="train", **kw) -> ShapesDataset:
    return ShapesDataset(STUDY.model_copy(update=kw), 32, seed=3, split=split)


# ----------------------------------------------------------------------------- long captions
def test_long_captions_state_one_true_fact_per_sentence_in_varied_order():
    _, facts, _ = dataset().render_scenes(range(300))
    firsts = set()
    for i, scene in enumerate(facts):
        sentences = C.split_sentences(C.long_caption(scene, C.caption_rng(3, "train", i)))
        assert len(sentences) == 5
        firsts.add(sentences[0].split()[0])
        words = [set(s.lower().split()) for s in sentences]
        if len(scene.objects) == 1:
            colour, shape, size, _ = scene.objects[0]
            # exactly one sentence names the colour, one the size; no sentence names a wrong colour or shape
            assert sum(colour in w for w in words) == 1 and sum(size in w for w in words) == 1
            assert sum(any(x in w for x in SHAPES) for w in words) == 4  # all but the background sentence
            assert all(not (w & (set(COLOURS) - {colour})) and not (w & (set(SHAPES) - {shape})) for w in words)
        else:
            (c1, s1, _, _), (c2, s2, _, _) = scene.objects
            assert any(scene.relation.split()[-2 if scene.relation.startswith("to the") else 0] in " ".join(s)
                       for s in map(sorted, words))
            assert all(w & {"grey", "gray"} or w & {c1, c2, "shapes"} for w in words)
        assert any("background" in w for w in words)
    assert len(firsts) >= 4  # the order and phrasing vary


def test_caption_lists_do_not_change_images_or_the_plain_stream():
    plain = dataset()
    pixels, raw, _ = plain.render_batch(range(16))
    for mode in ("raw", "long", "raw+long", "raw+synthetic"):
        batch = C.make_caption_batch(dataset(captions=mode), list(range(16)), None)
        assert torch.equal(batch["images"], pixels)
        if mode.startswith("raw"):
            assert batch["captions"][:: len(mode.split("+"))] == raw  # noise 0: the raw caption as before
    # the default loader still uses the plain batch (no caption kinds): unchanged numbers
    cfg = DataConfig(batch_size=4, num_workers=0, seed=3, shapes=STUDY)
    batch = next(build_train_loader(cfg, 32, None))
    assert "caption_kind" not in batch and batch["captions"] == raw[:4]


def test_synthetic_captions_are_always_correct_and_raw_noise_is_recorded():
    ds = dataset(captions="raw+synthetic", raw_caption_noise=0.3)
    n = 1200
    batch = C.make_caption_batch(ds, list(range(n)), None)
    _, facts, _ = ds.render_scenes(range(n))
    raw, synthetic = batch["captions"][0::2], batch["captions"][1::2]
    assert batch["caption_kind"].tolist() == [C.RAW, C.SYNTHETIC] * n
    noise = batch["noise"]
    assert 0.25 < (noise > 0).float().mean() < 0.35
    assert set(noise.tolist()) == {0, 1, 2, 3}
    for r, s, scene, kind in zip(raw, synthetic, facts, noise.tolist()):
        colour, shape = scene.objects[0][:2]
        assert s.split()[1:3] == [colour, shape]
        if kind == 0:
            assert r == scene.caption
        else:
            assert r != scene.caption
        if kind == 1:  # another scene: its main pair is not this image's
            assert f"{colour} {shape}" not in r
        if kind == 2:
            assert len(r.split()) < len(scene.caption.split()) or "shape" in r.split()
    # eval splits are never noised
    seen = C.make_caption_batch(dataset("seen", captions="raw+synthetic", raw_caption_noise=1.0), list(range(40)), None)
    assert (seen["noise"] == 0).all()


def test_noisy_raw_captions_never_name_a_held_out_pair():
    """The held-out colour-shape pairs never reach training, not even as a wrong caption's text."""
    ds = dataset(captions="raw", raw_caption_noise=1.0)
    held_names = {C.class_label(c, s): f"{c} {s}" for c in COLOURS for s in SHAPES}
    held = {held_names[k] for k in ds.held_out}
    n = 3000
    batch = C.make_caption_batch(ds, list(range(n)), None)
    assert set(batch["noise"].tolist()) == {1, 2, 3}  # every caption corrupted, every kind drawn
    named = set()
    for caption in batch["captions"]:
        words = caption.split()
        named |= {f"{a} {b}" for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES}
    assert named and not named & held
    assert len(named) > 0.9 * (len(held_names) - len(held))  # the trained pairs are all still drawn


def test_the_loader_carries_caption_kinds_noise_and_sub_captions_and_resumes():
    cfg = DataConfig(batch_size=4, num_workers=0, seed=3, sub_captions=3,
                     shapes=STUDY.model_copy(update={"captions": "raw+long", "raw_caption_noise": 0.5}))
    batches = [b for b, _ in zip(build_train_loader(cfg, 32, FakeTokenizer()), range(3))]
    for b in batches:
        assert b["input_ids"].shape[0] == len(b["captions"]) == 16
        assert b["caption_kind"].tolist() == [C.RAW, C.SUB_CAPTION, C.SUB_CAPTION, C.SUB_CAPTION] * 4
        assert b["text_owner"].tolist() == [i for i in range(4) for _ in range(4)]
        assert b["noise"].shape == (4,)
    resumed = next(build_train_loader(cfg, 32, FakeTokenizer(), start_sample=8))
    assert resumed["captions"] == batches[2]["captions"]
    # a random sentence per image (CLIP's baseline on long captions): one caption row per image
    one = cfg.model_copy(update={"sub_captions": 1, "sub_caption_raw": False,
                                 "shapes": cfg.shapes.model_copy(update={"captions": "long"})})
    b = next(build_train_loader(one, 32, None))
    assert len(b["captions"]) == 4 and "text_owner" not in b and all(not c.endswith(".") for c in b["captions"])


def test_tokenizer_corpus_covers_the_study_captions():
    cfg = DataConfig(shapes=STUDY.model_copy(update={"captions": "raw+long"}))
    words = {w.strip(".") for c in caption_corpus_for(cfg, 400) for w in c.split()}
    for sentence in C.study_corpus(dataset(), 4):
        assert set(w.strip(".") for w in sentence.split()) <= words


def test_bad_caption_settings_are_clear_errors():
    with pytest.raises(ValueError, match="sub_captions and data.captions_per_sample"):
        DataConfig(train="jsonl:x.jsonl", sub_captions=2, captions_per_sample=2)
    with pytest.raises(ValueError, match="raw_caption_noise"):
        ShapesConfig(raw_caption_noise=1.5)
    with pytest.raises(ValueError, match="captions"):
        ShapesConfig(captions="short")


# ----------------------------------------------------------------------------- sentences, sub-captions
def test_sentence_splitting_of_real_text_drops_empty_pieces():
    text = "A brown dog runs on 3.5 m of grass.  It looks happy!\n\nIs it wet?</s> The sky is blue .. "
    assert C.split_sentences(text) == ["A brown dog runs on 3.5 m of grass", "It looks happy", "Is it wet",
                                       "The sky is blue"]
    assert C.split_sentences(" . \n </s>") == []
    # a sentence may end in a number: only a point between two digits is kept
    assert C.split_sentences("There are 3 people in 2024. They smile.") == ["There are 3 people in 2024", "They smile"]
    assert C.split_sentences("Version 2.0 ships.It works") == ["Version 2.0 ships", "It works"]


def test_sub_captions_are_always_k_without_replacement_when_possible():
    rng = random.Random(0)
    long = "One. Two. Three. Four. Five."
    for _ in range(50):
        texts, kinds = C.sub_caption_texts(["raw  caption", long], 3, True, rng)
        assert texts[0] == "raw caption" and len(texts) == 4 and len(set(texts[1:])) == 3
        assert set(texts[1:]) <= {"One", "Two", "Three", "Four", "Five"}
        assert kinds == [C.RAW] + [C.SUB_CAPTION] * 3
    texts, _ = C.sub_caption_texts(["only one sentence"], 4, False, rng)  # fewer than K: with replacement
    assert texts == ["only one sentence"] * 4
    texts, _ = C.sub_caption_texts(["raw  text", " . "], 2, True, rng)  # nothing but separators
    assert texts == ["raw text"] * 3  # the raw caption stands in for the sentences, never "."


def test_merged_sub_captions_are_windows_of_consecutive_sentences():
    """DreamLIP's merged_num: m consecutive sentences joined by ". ", every window drawable; m = 1 draws
    exactly what it drew before (the same rng calls)."""
    long = "One. Two. Three. Four. Five."
    windows = {"One. Two", "Two. Three", "Three. Four", "Four. Five"}
    seen = set()
    for seed in range(40):
        texts, kinds = C.sub_caption_texts(["raw", long], 3, True, random.Random(seed), merge=2)
        assert texts[0] == "raw" and len(set(texts[1:])) == 3 and set(texts[1:]) <= windows
        seen |= set(texts[1:])
    assert seen == windows
    texts, _ = C.sub_caption_texts(["raw", "A. B."], 2, False, random.Random(0), merge=3)  # fewer than m sentences
    assert texts == ["A. B", "A. B"]
    for seed in range(5):
        assert C.sub_caption_texts(["raw", long], 2, True, random.Random(seed), merge=1) == \
            C.sub_caption_texts(["raw", long], 2, True, random.Random(seed))


def test_the_shapes_loader_and_a_table_merge_sentences(tmp_path):
    from clipforge.data.pipeline import build_source_train_loader

    cfg = DataConfig(batch_size=4, num_workers=0, sub_captions=2, sub_caption_merge=2,
                     shapes={"captions": "raw+long"})
    batch = next(iter(build_train_loader(cfg, 16, FakeTokenizer())))
    subs = [t for t, k in zip(batch["captions"], batch["caption_kind"].tolist()) if k == C.SUB_CAPTION]
    assert len(subs) == 8 and all(". " in t for t in subs)
    table = _long_caption_table(tmp_path)
    cfg = DataConfig(train=f"jsonl:{table}", batch_size=4, num_workers=0, sub_captions=2, sub_caption_merge=2)
    batch = next(iter(build_source_train_loader(cfg, 16, FakeTokenizer())))
    i = batch["indices"][0].item()
    assert set(batch["captions"][1:3]) <= {f"Image {i} is grey. Its shade is {i * 10}", f"Its shade is {i * 10}. It has no object"}


def test_truncation_warning_names_the_context_length(monkeypatch):
    monkeypatch.setitem(C._truncation_checks, "left", 5)
    with pytest.warns(UserWarning, match=r"1 of 2 captions .* \(8 tokens\) and were cut.*model.context_length"):
        C.tokenize_checked(FakeTokenizer(), ["short one", "a b c d e f g h i j"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process
        C.tokenize_checked(FakeTokenizer(), ["a b c d e f g h i j"])


# ----------------------------------------------------------------------------- caption lists on disk
def _long_caption_table(tmp_path, n=12):
    from PIL import Image

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(n):
        Image.fromarray(np.full((20, 20, 3), i * 10, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        long = f"Image {i} is grey\nIts shade is {i * 10}\nIt has no object"  # one sentence a line
        rows.append({"image": f"img/{i}.png", "caption": [f"raw {i}", long] if i % 2 else long})
    (tmp_path / "t.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    return tmp_path / "t.jsonl"


def check_sub_caption_batch(batch, k):
    per = k + 1
    for j, i in enumerate(batch["indices"].tolist()):
        texts = batch["captions"][j * per:(j + 1) * per]
        assert texts[0] == (f"raw {i}" if i % 2 else f"Image {i} is grey Its shade is {i * 10} It has no object")
        assert set(texts[1:]) <= {f"Image {i} is grey", f"Its shade is {i * 10}", "It has no object"}
        assert len(set(texts[1:])) == k
    assert batch["caption_kind"].tolist() == ([C.RAW] + [C.SUB_CAPTION] * k) * 4


def test_sub_captions_from_a_table_and_from_shards_written_by_clipforge(tmp_path):
    from clipforge.data.pipeline import build_source_train_loader
    from clipforge.data.shards import write_shards

    table = _long_caption_table(tmp_path)
    cfg = DataConfig(train=f"jsonl:{table}", batch_size=4, num_workers=0, sub_captions=2)
    for b, _ in zip(build_source_train_loader(cfg, 16, FakeTokenizer()), range(3)):
        check_sub_caption_batch(b, 2)
    write_shards(f"jsonl:{table}", tmp_path / "shards", samples_per_shard=5, shuffle=False)
    cfg = cfg.model_copy(update={"train": f"wds:{tmp_path}/shards/{{00000..00002}}.tar"})
    for b, _ in zip(build_source_train_loader(cfg, 16, FakeTokenizer()), range(3)):
        check_sub_caption_batch(b, 2)


def test_an_invalid_raw_caption_is_never_replaced_by_a_long_one():
    """data.sub_captions reads [raw, long...]: a bad raw caption skips the sample (with keep_raw) rather than
    letting the first long caption be taken for the raw one; bad long captions are dropped."""
    from clipforge.data.pipeline import sub_caption_list

    rng = random.Random(0)
    assert sub_caption_list(["", "One. Two."], rng, 2, True) == ("missing_caption",)
    assert sub_caption_list(["\ud800 bad", "One. Two."], rng, 2, True) == ("non_utf8_caption",)
    texts = sub_caption_list(["raw", "", "One. Two."], rng, 2, True)
    assert texts[0] == "raw" and set(texts[1:]) == {"One", "Two"}
    texts = sub_caption_list(["", "One. Two."], rng, 2, False)  # the raw caption is not used: no skip
    assert set(texts) == {"One", "Two"}
