"""The shapes "binding" split and its metrics, and late-interaction (FILIP) retrieval evaluation."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.config import DataConfig, ModelConfig, Recipe, ShapesConfig, TokenizerConfig
from clipforge.data.synthetic import (
    COLOURS,
    DISTRACTOR_KINDS,
    OPPOSITE_RELATIONS,
    RELATIONS,
    ShapesDataset,
    class_label,
)
from clipforge.eval.binding import binding_candidates, binding_chance, binding_metrics
from clipforge.eval.evaluate import EvalError, evaluate
from clipforge.models.clip import CLIP
from clipforge.models.tokenizer import BPETokenizer
from clipforge.train.checkpoint import save_checkpoint
from test_eval_cli import run_cli
from tiny_checkpoint import TINY_MODEL, make_caption_jsonl

CFG = ShapesConfig(eval_samples_per_class=2)


@pytest.fixture(scope="module")
def binding():
    return ShapesDataset(CFG, 48, seed=CFG.holdout_seed, split="binding")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random tiny CLIP whose recipe asks for a small binding split (1 scene per trained pair)."""
    torch.manual_seed(0)
    shapes = ShapesConfig(eval_samples_per_class=1, holdout_seed=77)
    recipe = Recipe(name="tiny-binding", model=ModelConfig(**TINY_MODEL),
                    data=DataConfig(tokenizer=TokenizerConfig(vocab_size=200), shapes=shapes))
    corpus = ShapesDataset(shapes, 32, seed=0).caption_corpus(300)
    tokenizer = BPETokenizer.train(corpus, 200, recipe.model.context_length)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), 1, CLIP(recipe.model), recipe, tokenizer, None, keep_last=1)


# ----------------------------------------------------------------------------- a caption, read back by hand
PAIR = re.compile(r"^(?:a photo of )?an? (\w+) (\w+) (left of|to the left of|right of|to the right of|above|below) "
                  r"an? (\w+) (\w+)$")


def read_caption(caption: str) -> tuple[tuple[str, str], str, tuple[str, str]]:
    m = PAIR.match(caption)
    assert m, caption
    return (m[1], m[2]), m[3], (m[4], m[5])


def layout(caption: str) -> tuple[str, tuple[str, str], tuple[str, str]]:
    """("horizontal" | "vertical", object on the left/top, object on the right/bottom)."""
    first, relation, second = read_caption(caption)
    axis = "vertical" if relation in ("above", "below") else "horizontal"
    first_low = relation in ("above", "left of", "to the left of")
    return (axis, first, second) if first_low else (axis, second, first)


def centroid(image: np.ndarray, colour: str) -> np.ndarray:
    near = np.abs(image.astype(int) - np.array(COLOURS[colour])).max(axis=2) < 40
    assert near.sum() > 4, colour
    rows, cols = near.nonzero()
    return np.array([cols.mean(), rows.mean()])  # (x, y)


# ----------------------------------------------------------------------------- the split
def test_binding_split_is_a_pure_function_of_seed_and_index(binding):
    assert len(binding) == len(binding.classes) * CFG.eval_samples_per_class
    again = ShapesDataset(CFG, 48, seed=CFG.holdout_seed, split="binding")
    for i in (17, 3, 0, len(binding) - 1):  # any order
        image, caption, label = binding.sample(i)
        image2, caption2, label2 = again.sample(i)
        assert np.array_equal(image, image2) and caption == caption2 == binding.binding_scene(i).caption()
        assert label == label2 == binding.binding_scene(i).first
    images, captions, _ = binding.render_batch([5, 6])
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), binding.sample(5)[0]) and captions[1] == binding.sample(6)[1]
    other = ShapesDataset(ShapesConfig(eval_samples_per_class=2, holdout_seed=5), 48, seed=5, split="binding")
    assert [other.sample(i)[1] for i in range(20)] != [binding.sample(i)[1] for i in range(20)]
    with pytest.raises(IndexError, match="out of range for the binding split"):
        binding.sample(len(binding))
    with pytest.raises(ValueError, match="needs the binding split"):
        ShapesDataset(CFG, 48, seed=0, split="seen").binding_scene(0)


def test_images_show_the_scene_their_caption_describes(binding):
    for i in range(0, len(binding), 7):
        image, caption, _ = binding.sample(i)
        (c1, s1), relation, (c2, s2) = read_caption(caption)
        assert c1 != c2 and s1 != s2  # so that every swap changes the scene
        assert class_label(c1, s1) in binding.classes and class_label(c2, s2) in binding.classes  # trained pairs
        side, axis = RELATIONS[relation]
        offset = (centroid(image, c1) - centroid(image, c2))[axis]
        assert np.sign(offset) == side and abs(offset) > 48 * 0.2, (i, caption)


def test_distractors_differ_and_describe_the_swapped_scene(binding):
    for i in range(len(binding)):
        scene = binding.binding_scene(i)
        caption = scene.caption()
        (c1, s1), relation, (c2, s2) = read_caption(caption)
        distractors = {kind: d.caption() for kind, d in scene.distractors().items()}
        assert list(distractors) == list(DISTRACTOR_KINDS)
        assert read_caption(distractors["attribute_swap"]) == ((c2, s1), relation, (c1, s2))
        assert read_caption(distractors["shape_swap"]) == ((c1, s2), relation, (c2, s1))
        assert read_caption(distractors["relation_flip"]) == ((c1, s1), OPPOSITE_RELATIONS[relation], (c2, s2))
        assert read_caption(distractors["order_swap"]) == ((c2, s2), relation, (c1, s1))
        layouts = {layout(caption), *(layout(d) for d in distractors.values())}
        assert len(layouts) == 4  # no distractor shows the image's scene (flip and order swap show the same one)
        for kind in ("attribute_swap", "shape_swap", "order_swap"):  # the very same words, bound differently
            assert sorted(distractors[kind].split()) == sorted(caption.split()) and distractors[kind] != caption
        assert scene.layout() != scene.distractors()["relation_flip"].layout()


def scores_from(scorer, binding) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(selection, i2t, t2i) of a scorer(image index, caption) over the whole split."""
    n = len(binding)
    candidates = binding_candidates([binding.binding_scene(i) for i in range(n)])
    selection = torch.tensor([[scorer(i, c) for c in row] for i, row in enumerate(candidates)])
    i2t = torch.tensor([[scorer(i, row[0]) for row in candidates] for i in range(n)])
    return selection, i2t, i2t.T


def test_a_perfect_scorer_gets_everything_and_a_constant_one_gets_chance(binding):
    scenes = [layout(binding.binding_scene(i).caption()) for i in range(len(binding))]
    layouts = [binding.binding_scene(i).layout() for i in range(len(binding))]

    def perfect(i, caption):  # reads the caption, compares with what image i shows
        return float(layout(caption) == scenes[i])

    metrics = binding_metrics(*scores_from(perfect, binding), DISTRACTOR_KINDS, layouts)
    assert metrics == {**{f"binding_acc_{k}": 1.0 for k in DISTRACTOR_KINDS}, "binding_acc": 1.0,
                       "image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}
    constant = binding_metrics(*scores_from(lambda i, c: 0.5, binding), DISTRACTOR_KINDS, layouts)
    chance = binding_chance(DISTRACTOR_KINDS, layouts)
    assert constant == pytest.approx(chance, abs=1e-12)
    assert chance["binding_acc"] == 1 / 5 and chance["binding_acc_order_swap"] == 0.5
    assert 1 / len(binding) <= chance["image_retrieval_recall@1"] < 0.05

    def colour_blind(i, caption):  # sees the shapes and where they are, not which colour is which
        axis, low, high = layout(caption)
        return float((axis, low[1], high[1]) == (scenes[i][0], scenes[i][1][1], scenes[i][2][1]))

    blind = binding_metrics(*scores_from(colour_blind, binding), DISTRACTOR_KINDS, layouts)
    assert blind["binding_acc_attribute_swap"] == 0.5  # a tie with the colour swap: a coin flip
    assert blind["binding_acc_shape_swap"] == blind["binding_acc_relation_flip"] == blind["binding_acc_order_swap"] == 1.0
    assert blind["binding_acc"] == 0.5


def test_binding_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="selection scores must be 3 x 5"):
        binding_metrics(torch.zeros(3, 4), torch.zeros(3, 3), torch.zeros(3, 3), DISTRACTOR_KINDS, [1, 2, 3])


# ----------------------------------------------------------------------------- clipforge eval --data shapes:binding
@pytest.mark.parametrize("similarity", ["pooled", "late-interaction"])
def test_cli_scores_the_binding_split_of_the_checkpoints_recipe(capsys, ckpt, tmp_path, similarity):
    out = tmp_path / "binding.json"
    code, stdout, err = run_cli(capsys, "eval", ckpt, "--task", "retrieval", "--data", "shapes:binding",
                                "--similarity", similarity, "--batch-size", "16", "--out", out)
    assert code == 0, err
    assert "binding_acc_attribute_swap" in stdout and "chance" in stdout
    result = json.loads(out.read_text())
    assert result["task"] == "retrieval" and result["dataset"] == "shapes:binding"
    assert result["options"]["similarity"] == similarity
    assert set(result["metrics"]) == {"binding_acc", *(f"binding_acc_{k}" for k in DISTRACTOR_KINDS),
                                      "image_retrieval_recall@1", "text_retrieval_recall@1"}
    assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())
    n_trained = len(ShapesDataset(ShapesConfig(holdout_seed=77), 32, seed=0).train_classes)
    assert result["data"]["images"] == n_trained  # eval_samples_per_class = 1 in the checkpoint's recipe
    assert result["binding"]["seed"] == 77 and result["binding"]["chance"]["binding_acc"] == 0.2
    assert result["binding"]["examples"][0]["caption"] == ShapesDataset(
        ShapesConfig(eval_samples_per_class=1, holdout_seed=77), 32, seed=77, split="binding").sample(0)[1]


def test_late_interaction_binding_scores_equal_the_full_score_matrices(ckpt):
    """The streamed scores (own candidates per image) equal FILIP's scores over every caption at once."""
    from clipforge.api import load
    from clipforge.eval.binding import evaluate_binding
    from clipforge.objectives.filip import late_interaction_scores

    model, _, tokenizer = load(ckpt)
    shapes = ShapesConfig(eval_samples_per_class=1, holdout_seed=77)
    got = evaluate_binding(model, tokenizer, shapes, 32, similarity="late-interaction", batch_size=7)
    dataset = ShapesDataset(shapes, 32, seed=77, split="binding")
    n, m = len(dataset), 1 + len(DISTRACTOR_KINDS)
    candidates = binding_candidates([dataset.binding_scene(i) for i in range(n)])
    ids, mask = tokenizer([c for row in candidates for c in row])
    with torch.no_grad():
        image_tokens = model.encode_image_tokens(dataset.render_batch(range(n))[0])
        text_tokens = model.encode_text_tokens(ids, mask)
    s_image, s_text = late_interaction_scores(image_tokens, text_tokens, mask)
    own = torch.arange(n) * m
    selection = torch.stack([s_image[i, i * m : (i + 1) * m] for i in range(n)])
    layouts = [dataset.binding_scene(i).layout() for i in range(n)]
    expected = binding_metrics(selection, s_image[:, own], s_text[:, own].T, DISTRACTOR_KINDS, layouts)
    assert got["metrics"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--data", "shapes:binding", "--similarity", "colbert"],
     "unknown --similarity 'colbert'; choose one of pooled, late-interaction"),
    (["--data", "shapes:colours"], "unknown built-in split 'shapes:colours'; the built-in evaluation data is "
                                   "shapes:binding (--task retrieval), shapes:seen (--task zeroshot), shapes:unseen"),
    (["--data", "shapes:unseen"], "shapes:unseen is scored as zeroshot (every colour-shape class, zero-shot); "
                                  "use --task zeroshot (got --task retrieval)"),
])
def test_cli_bad_similarity_or_split_is_a_clear_error(capsys, ckpt, args, message):
    code, _, err = run_cli(capsys, "eval", ckpt, "--task", "retrieval", *args)
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err, err


def test_similarity_is_for_zeroshot_and_retrieval_and_each_built_in_split_for_its_task(ckpt, tmp_path):
    with pytest.raises(EvalError, match="--similarity late-interaction scores images against texts .*linear probe"):
        evaluate(ckpt, "linear-probe", f"imagefolder:{tmp_path}", train_data=f"imagefolder:{tmp_path}",
                 similarity="late-interaction")
    with pytest.raises(EvalError, match="shapes:binding is scored as retrieval.*use --task retrieval"):
        evaluate(ckpt, "zeroshot", "shapes:binding")
    with pytest.raises(EvalError, match="shapes:seen has its own classes .* leave out --classnames"):
        evaluate(ckpt, "zeroshot", "shapes:seen", classnames=tmp_path / "names.txt")


# ----------------------------------------------------------------------------- zero-shot: shapes:seen / unseen
def test_shapes_zero_shot_splits_equal_the_trainers_own_evaluation(ckpt):
    """`clipforge eval --task zeroshot --data shapes:<split>` scores what the trainer's end-of-run
    evaluation scores (the checkpoint recipe's hold-out, all classes, the shapes prompts)."""
    from clipforge.api import load
    from clipforge.config import Recipe
    from clipforge.eval.hooks import evaluate_shapes
    from clipforge.train.checkpoint import read_config

    model, _, tokenizer = load(ckpt)
    recipe = Recipe.model_validate(read_config(ckpt)["recipe"])
    recipe.eval.late_interaction = True  # the trainer also logs FILIP's zero-shot (zeroshot-li/...)
    trainer = evaluate_shapes(model, tokenizer, recipe)
    keys = ("acc1", "acc5", "mean_per_class_recall")
    for split in ("seen", "unseen"):
        got = evaluate(ckpt, "zeroshot", f"shapes:{split}", batch_size=recipe.eval.batch_size)
        assert got["metrics"] == {k: trainer[f"zeroshot/{split}/{k}"] for k in keys}
        assert got["shapes"] == {"split": split, "seed": 77, "image_size": 32}
        assert got["options"]["similarity"] == "pooled" and got["options"]["templates"] == "shapes"
        li = evaluate(ckpt, "zeroshot", f"shapes:{split}", batch_size=recipe.eval.batch_size,
                      similarity="late-interaction")
        assert li["metrics"] == {k: trainer[f"zeroshot-li/{split}/{k}"] for k in keys}
    n_unseen = len(ShapesDataset(recipe.data.shapes, 32, seed=77, split="unseen"))
    assert got["data"]["images"] == n_unseen and got["data"]["classes"] == len(got["classnames"])


def test_late_interaction_zero_shot_is_the_mean_over_each_class_prompts_of_s_image(ckpt, tmp_path):
    """FILIP's zero-shot score of class c for image i: mean over c's prompts of s^I(i, prompt)."""
    from clipforge.api import load
    from clipforge.data.sources import load_image, parse_data_spec, read_classification_data
    from clipforge.eval.zeroshot import fill_template, late_interaction_zero_shot_logits
    from datafiles import write_folder

    model, preprocess, tokenizer = load(ckpt)
    folder = write_folder(tmp_path / "val", classes=("red circle", "blue star", "green ring"), per_class=3)
    (folder / "red circle" / "broken.png").write_bytes(b"not an image")  # skipped, counted
    templates = ["a {}.", "a photo of a {}", "{}"]
    (tmp_path / "t.txt").write_text("\n".join(templates) + "\n")
    result = evaluate(ckpt, "zeroshot", f"imagefolder:{folder}", templates=str(tmp_path / "t.txt"),
                      similarity="late-interaction", batch_size=4, max_bad_fraction=0.2, out=tmp_path / "zs.json")
    data = read_classification_data(parse_data_spec(f"imagefolder:{folder}"), None)
    ok = [i for i, p in enumerate(data.paths) if p.name != "broken.png"]
    images = torch.stack([preprocess(load_image(data.paths[i], 32)) for i in ok])
    prompts = [fill_template(t, c) for c in data.classnames for t in templates]
    ids, mask = tokenizer(prompts)
    with torch.no_grad():
        s_image, _ = slow_late_interaction(model.encode_image_tokens(images), model.encode_text_tokens(ids, mask), mask)
    expected = s_image.view(len(ok), len(data.classnames), len(templates)).mean(dim=2)
    streamed = late_interaction_zero_shot_logits(model, tokenizer, (images[s : s + 4] for s in range(0, len(ok), 4)),
                                                 data.classnames, templates)
    assert torch.allclose(streamed.double(), expected, atol=1e-5)
    labels = torch.tensor([data.labels[i] for i in ok])
    assert result["metrics"]["acc1"] == (expected.argmax(1) == labels).double().mean().item()
    assert result["data"]["images"] == len(ok) and result["data"]["skipped"] == 1
    assert json.loads((tmp_path / "zs.json").read_text())["options"]["similarity"] == "late-interaction"


def test_cli_late_interaction_zero_shot_on_a_built_in_split(capsys, ckpt, tmp_path):
    out = tmp_path / "unseen.json"
    code, stdout, err = run_cli(capsys, "eval", ckpt, "--task", "zeroshot", "--data", "shapes:unseen",
                                "--similarity", "late-interaction", "--per-class", "--out", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["options"]["similarity"] == "late-interaction" and result["shapes"]["split"] == "unseen"
    assert 0.0 <= result["metrics"]["acc1"] <= result["metrics"]["acc5"] <= 1.0
    counts = [v["count"] for v in result["per_class"].values()]
    assert sum(counts) == result["data"]["images"] and (out.parent / "unseen_confusion.png").exists()
    assert "acc1" in stdout and "zeroshot (late-interaction)" in " ".join(stdout.split())


# ----------------------------------------------------------------------------- late interaction on files
def slow_late_interaction(image_tokens, text_tokens, text_masks):
    """FILIP's s^I and s^T pair by pair, from the definition."""
    s_image = torch.zeros(len(image_tokens), len(text_tokens), dtype=torch.float64)
    s_text = torch.zeros_like(s_image)
    for i, patches in enumerate(image_tokens.double()):
        for j, (words, mask) in enumerate(zip(text_tokens.double(), text_masks)):
            sim = patches @ words[mask.bool()].T  # P x real words
            s_image[i, j] = sim.max(dim=1).values.mean()  # each patch's best word, averaged
            s_text[i, j] = sim.max(dim=0).values.mean()  # each word's best patch, averaged
    return s_image, s_text


def slow_recall(s_image, s_text, text_to_image, ks=(1, 5, 10)):
    out = {}
    for k in ks:
        hits = sum(int(text_to_image[j] in sorted(range(len(s_text)), key=lambda i: -s_text[i, j])[:k])
                   for j in range(s_text.shape[1]))
        out[f"image_retrieval_recall@{k}"] = hits / s_text.shape[1]
        hits = sum(int(any(text_to_image[j] == i for j in sorted(range(s_image.shape[1]), key=lambda j: -s_image[i, j])[:k]))
                   for i in range(len(s_image)))
        out[f"text_retrieval_recall@{k}"] = hits / len(s_image)
    return out


def test_late_interaction_retrieval_equals_a_slow_reference(ckpt, tmp_path):
    from clipforge.api import load
    from clipforge.data.sources import load_image, read_caption_data

    pairs = make_caption_jsonl(tmp_path, n=14, broken=1)  # the broken image's captions are dropped
    result = evaluate(ckpt, "retrieval", f"jsonl:{pairs}", similarity="late-interaction", batch_size=4,
                      max_bad_fraction=0.1)
    model, preprocess, tokenizer = load(ckpt)
    data = read_caption_data(f"jsonl:{pairs}")
    ok = list(range(13))
    captions = [(c, ok.index(i)) for c, i in zip(data.captions, data.text_to_image) if i in ok]
    ids, mask = tokenizer([c for c, _ in captions])
    with torch.no_grad():
        image_tokens = model.encode_image_tokens(torch.stack([preprocess(load_image(data.paths[i], 32)) for i in ok]))
        text_tokens = model.encode_text_tokens(ids, mask)
    expected = slow_recall(*slow_late_interaction(image_tokens, text_tokens, mask), [i for _, i in captions])
    assert result["metrics"] == expected
    assert result["data"]["images"] == 13 and result["data"]["skipped"] == 1 and result["data"]["captions"] == len(captions)
    assert 0 < expected["image_retrieval_recall@1"] < expected["image_retrieval_recall@10"]
    pooled = evaluate(ckpt, "retrieval", f"jsonl:{pairs}", max_bad_fraction=0.1)
    assert pooled["metrics"] != result["metrics"]  # a different ranking, not the pooled one renamed


def test_streamed_token_scores_equal_the_definition_with_chunked_captions(ckpt):
    """Captions embedded 3 at a time (each chunk cut to its own longest caption), images 5 at a time."""
    from clipforge.api import load
    from clipforge.eval.late_interaction import embed_text_tokens, late_interaction_topk, score_image_batches

    model, _, tokenizer = load(ckpt)
    dataset = ShapesDataset(ShapesConfig(eval_samples_per_class=1), 32, seed=1, split="seen")
    images, captions, _ = dataset.render_batch(range(12))
    captions = [c if k % 2 else c.split()[-1] for k, c in enumerate(captions)]  # long and one-word captions
    texts = embed_text_tokens(model, tokenizer, captions, batch_size=3)
    assert len(texts) == 12 and len({t.shape[1] for t in texts.tokens}) > 1
    streamed = list(score_image_batches(model, (images[s : s + 5] for s in range(0, 12, 5)), texts))
    ids, mask = tokenizer(captions)
    with torch.no_grad():
        expected = slow_late_interaction(model.encode_image_tokens(images), model.encode_text_tokens(ids, mask), mask)
    assert torch.allclose(torch.cat([s[1] for s in streamed]).double(), expected[0], atol=1e-5)
    assert torch.allclose(torch.cat([s[2] for s in streamed]).double(), expected[1], atol=1e-5)
    i2t, t2i = late_interaction_topk(model, (images[s : s + 5] for s in range(0, 12, 5)), texts, k=3)
    assert torch.equal(i2t, expected[0].topk(3, dim=1).indices)
    assert torch.equal(t2i, expected[1].T.topk(3, dim=1).indices)
    kept = texts.select(torch.arange(12) % 3 != 0)
    assert len(kept) == 8 and torch.equal(torch.cat(kept.masks[:1])[0], texts.masks[0][1])
