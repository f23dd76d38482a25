"""Concept frequency: plural-aware counts, intersection of multi-word concepts, the log-linear fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipforge.data.concepts import (
    calibrate_threshold, caption_index, lemma, load_concepts, log_linear_fit, text_hits,
)
from clipforge.data.sources import DataError


def test_lemmas_map_plurals_to_the_concept():
    assert [lemma(w) for w in ["dogs", "boxes", "berries", "mice", "wolves", "bus", "glass", "circles", "crosses"]] == [
        "dog", "box", "berry", "mouse", "wolf", "bus", "glass", "circle", "cross"]
    # the plurals a bare suffix rule gets wrong
    words = ["shoes", "toes", "canoes", "potatoes", "movies", "cookies", "buses", "gases", "lenses", "horses",
             "houses", "heroes"]
    assert [lemma(w) for w in words] == ["shoe", "toe", "canoe", "potato", "movie", "cookie", "bus", "gas", "lens",
                                         "horse", "house", "hero"]


def test_multi_word_concepts_are_the_intersection():
    index, n = caption_index(["Two red circles!", "a red square", "a blue circle", "red circle left of a star",
                              "a circle of red dogs"])
    assert n == 5
    assert text_hits("red circle", index).tolist() == [0, 3, 4]  # bag of words: order does not matter
    assert text_hits("dog", index).tolist() == [4] and text_hits("zebra", index).tolist() == []
    index, _ = caption_index(["a coffee cup on a table", "a cup of tea", "coffee beans"])
    assert text_hits("cup of coffee", index).tolist() == [0]  # "of" is not required; both nouns are


def test_the_fit_recovers_a_planted_slope():
    rng = np.random.default_rng(0)
    freq = 10 ** rng.uniform(0, 5, size=200)
    acc = 0.1 + 0.12 * np.log10(freq) + rng.normal(0, 0.02, size=200)
    fit = log_linear_fit(np.concatenate([freq, [0, 0]]), np.concatenate([acc, [0.9, 0.9]]), seed=0)
    assert fit.slope == pytest.approx(0.12, abs=0.005) and fit.intercept == pytest.approx(0.1, abs=0.02)
    assert fit.slope_ci95[0] < 0.12 < fit.slope_ci95[1] and fit.slope_ci95[1] - fit.slope_ci95[0] < 0.01
    assert fit.r2 > 0.95 and fit.points == 200 and fit.zero_frequency_left_out == 2
    flat = log_linear_fit(freq, 0.5 + rng.normal(0, 0.02, size=200), seed=0)
    assert flat.slope_ci95[0] < 0 < flat.slope_ci95[1] and flat.r2 < 0.05
    with pytest.raises(DataError, match="at least 3 concepts"):
        log_linear_fit([0, 1, 0], [0.1, 0.2, 0.3])


def test_calibrated_threshold_separates_matching_scores():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.35]])
    weak = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=bool)
    t, f1 = calibrate_threshold(scores, weak)
    assert 0.35 < t < 0.7 and f1 == 1.0


def test_cli_counts_joins_accuracy_and_writes_the_long_tail(tmp_path, capsys):
    from tiny_checkpoint import make_caption_jsonl, run_cli

    table = make_caption_jsonl(tmp_path / "data", n=24)  # "a <colour> square", a few "image i, <colour>"
    (tmp_path / "concepts.txt").write_text("red square\nsquares\nimage\nblue\nzebra\n")
    acc = {"per_class": {"red square": {"accuracy": 0.3, "count": 10}, "squares": {"accuracy": 0.9, "count": 10},
                         "image": {"accuracy": 0.6, "count": 10}, "blue": {"accuracy": 0.35, "count": 10},
                         "zebra": {"accuracy": 0.0, "count": 10}}}
    (tmp_path / "zs.json").write_text(json.dumps(acc))
    code, stdout, stderr = run_cli(capsys, "data", "concepts", f"jsonl:{table}", "--concepts",
                                   tmp_path / "concepts.txt", "--accuracy", tmp_path / "zs.json", "--out",
                                   tmp_path / "out", "--tail", "0.2")
    assert code == 0, stdout + stderr
    result = json.loads((tmp_path / "out" / "concepts.json").read_text())
    freq = {r["concept"]: r["text_frequency"] for r in result["per_concept"]}
    assert freq == {"red square": 3, "squares": 24, "image": 8, "blue": 3, "zebra": 0}
    assert result["fit"]["zero_frequency_left_out"] == 1 and result["fit"]["slope"] > 0 and (tmp_path / "out" / "frequency_vs_accuracy.png").is_file()
    assert (tmp_path / "out" / "longtail.txt").read_text().splitlines()[0] == "zebra"
    assert load_concepts("cifar10")[:2] == ["airplane", "automobile"]


def test_eval_per_class_accuracy_adds_up_to_top1(tmp_path):
    from clipforge.eval.evaluate import EvalError, evaluate
    from datafiles import write_folder
    from tiny_checkpoint import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    folder = write_folder(tmp_path / "val", classes=("cat", "dog", "pickup_truck"), per_class=4)
    result = evaluate(ckpt, "zeroshot", f"imagefolder:{folder}", per_class=True, out=tmp_path / "zs.json",
                      plots=False)
    per_class = json.loads((tmp_path / "zs.json").read_text())["per_class"]
    assert set(per_class) == {"cat", "dog", "pickup truck"} and all(v["count"] == 4 for v in per_class.values())
    weighted = sum(v["accuracy"] * v["count"] for v in per_class.values()) / 12
    assert weighted == pytest.approx(result["metrics"]["acc1"])
    with pytest.raises(EvalError, match="--per-class applies to classification"):
        evaluate(ckpt, "retrieval", f"jsonl:{tmp_path / 'none.jsonl'}", per_class=True)


def test_with_a_model_the_matched_count_is_the_intersection_of_text_and_image_hits(tmp_path):
    """methods.md §11: integrated (matched) count <= min(text count, image count); with a fixed threshold the
    image count is the number of images whose cosine to the concept's prompt is above it."""
    from clipforge.data.concepts import concept_embeddings, concept_frequencies, source_captions_and_images
    from clipforge.api import load
    from tiny_checkpoint import make_caption_jsonl, make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    table = make_caption_jsonl(tmp_path / "data", n=24)
    (tmp_path / "concepts.txt").write_text("red square\nsquares\nimage\nblue\n")
    net, _, tokenizer = load(ckpt, device="cpu")
    _, images = source_captions_and_images(f"jsonl:{table}", (net, tokenizer), None, ckpt, 64)
    scores = images @ concept_embeddings(net, tokenizer, ["red square", "squares", "image", "blue"]).T
    threshold = float(np.median(scores))
    result = concept_frequencies(f"jsonl:{table}", str(tmp_path / "concepts.txt"), tmp_path / "out", model=ckpt,
                                 image_threshold=threshold, device="cpu")
    rows = result["per_concept"]
    assert [r["image_frequency"] for r in rows] == [int(c) for c in (scores > threshold).sum(0)]
    for r in rows:
        assert r["matched_frequency"] <= min(r["text_frequency"], r["image_frequency"])
    assert sum(r["matched_frequency"] for r in rows) > 0 and result["measure"] == "matched_frequency"
    calibrated = concept_frequencies(f"jsonl:{table}", str(tmp_path / "concepts.txt"), tmp_path / "out2",
                                     model=ckpt, device="cpu")
    assert "image_threshold_calibration" in calibrated
    assert all(r["matched_frequency"] <= min(r["text_frequency"], r["image_frequency"])
               for r in calibrated["per_concept"])


@pytest.mark.parametrize("args, says", [
    (["foo:bar"], "source 'foo:bar': unknown source kind 'foo:'"),
    (["shapes", "--measure", "foo", "--model", "ckpt"],
     "--measure must be one of text_frequency, image_frequency, matched_frequency, got 'foo'"),
    (["shapes", "--measure", "image_frequency"], "--measure image_frequency counts concepts in images: pass --model"),
    (["shapes", "--tail", "0"], "--tail is the fraction of rarest concepts in the long-tail subset, in (0, 1]"),
    (["shapes", "--tail", "-1"], "in (0, 1]; got -1.0"),
    (["shapes", "--accuracy", "nosuch.json"], "--accuracy nosuch.json: file not found; pass a result of "
                                              "`clipforge eval --per-class"),
])
def test_cli_refuses_bad_arguments_before_counting(tmp_path, capsys, monkeypatch, args, says):
    from tiny_checkpoint import run_cli

    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_cli(capsys, "data", "concepts", *args, "--concepts", "shapes", "--max-samples", "8",
                                   "--out", tmp_path / "c")
    err = " ".join(stderr.split())
    assert code == 2 and "Traceback" not in stdout + stderr and says in err, stdout + stderr
    assert not (tmp_path / "c").exists()
