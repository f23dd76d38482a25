"""clipforge merge: WiSE-FT interpolation and model soups (clipforge/merge.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import clipforge
from clipforge.merge import MergeError, greedy_soup, merge, merge_greedy, merge_weights
from clipforge.models.tokenizer import BPETokenizer
from tiny_checkpoint import CAPTIONS, make_tiny_checkpoint, run_cli


@pytest.fixture()
def three(tmp_path):
    return [make_tiny_checkpoint(tmp_path / f"m{i}", seed=i) for i in range(3)]


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_wise_ft_interpolates_every_tensor_and_its_ends_are_the_models(three, tmp_path):
    a, b = _weights(three[0]), _weights(three[1])
    state, _, used = merge_weights(three[:2], [0.75, 0.25])
    assert used == [0.75, 0.25] and state.keys() == a.keys()
    for key in a:
        assert torch.allclose(state[key], 0.75 * a[key] + 0.25 * b[key], atol=1e-6), key
    ends = merge_weights(three[:2], [1.0, 0.0])[0]
    assert all(torch.equal(ends[k], a[k]) for k in a)  # alpha = 0 is the first model, bitwise
    assert not torch.equal(a["logit_scale"] + a["visual.pos_embed"].sum(), b["logit_scale"] + b["visual.pos_embed"].sum())


def test_a_soup_is_the_mean_and_the_merged_checkpoint_loads_and_embeds(three, tmp_path):
    out = merge(three, tmp_path / "soup")
    merged, states = _weights(out), [_weights(p) for p in three]
    for key in merged:
        assert torch.allclose(merged[key], sum(s[key] for s in states) / 3, atol=1e-6), key
    model, preprocess, tokenizer = clipforge.load(out)
    ids, mask = tokenizer(["a red circle"])
    assert model.encode_text(ids, mask).shape == (1, 16)
    source = json.loads((out / "config.json").read_text())["source"]["merge"]
    assert [s["weight"] for s in source] == pytest.approx([1 / 3] * 3)
    assert source[0]["checkpoint"] == str(three[0].resolve())


def test_merging_what_is_not_one_network_is_refused(tmp_path, three):
    wider = make_tiny_checkpoint(tmp_path / "wide", seed=0, vision_width=64, vision_heads=2)
    with pytest.raises(MergeError, match="different networks.*model.vision_width: 32 vs 64"):
        merge_weights([three[0], wider])
    # training-only settings are not the network: a run with patch dropout merges with one without
    dropout = make_tiny_checkpoint(tmp_path / "drop", seed=1, patch_dropout=0.5)
    merge_weights([three[0], dropout])
    other_tokenizer = make_tiny_checkpoint(tmp_path / "tok", seed=2)
    BPETokenizer.train([c.upper() + " zebra" for c in CAPTIONS] * 4, 200, 16).save(other_tokenizer)
    with pytest.raises(MergeError, match="different tokenizers"):
        merge_weights([three[0], other_tokenizer])
    with pytest.raises(MergeError, match="sum to 1"):
        merge_weights(three[:2], [0.6, 0.6])
    with pytest.raises(MergeError, match="one weight per checkpoint"):
        merge_weights(three, [0.5, 0.5])
    with pytest.raises(MergeError, match="two or more"):
        merge_weights(three[:1])


def test_non_float_tensors_must_agree(tmp_path, three):
    for i, path in enumerate(three[:2]):  # an integer buffer that differs between the two
        state = _weights(path)
        state["counter"] = torch.tensor([i])
        save_file(state, str(path / "model.safetensors"))
    with pytest.raises(MergeError, match="counter is not floating point and differs"):
        merge_weights(three[:2])


def test_cli_merge_writes_a_checkpoint_eval_can_read_and_refuses_bad_options(tmp_path, capsys, three):
    code, out, err = run_cli(capsys, "merge", three[0], three[1], "--alpha", "0.4", "--out", tmp_path / "wise")
    assert code == 0, err
    assert torch.allclose(_weights(tmp_path / "wise")["logit_scale"],
                          0.6 * _weights(three[0])["logit_scale"] + 0.4 * _weights(three[1])["logit_scale"])
    code, _, err = run_cli(capsys, "merge", *three, "--alpha", "0.4", "--out", tmp_path / "x")
    assert code == 2 and "--alpha interpolates two checkpoints" in err
    code, _, err = run_cli(capsys, "merge", three[0], three[1], "--weights", "0.6,0.6", "--out", tmp_path / "y")
    assert code == 2 and "sum to 1" in err and not (tmp_path / "y").exists()
    code, _, err = run_cli(capsys, "eval", tmp_path / "wise", "--task", "zeroshot", "--data", "shapes:seen",
                           "--out", tmp_path / "zs.json")
    assert code == 0, err
    assert "acc1" in (tmp_path / "zs.json").read_text()


def _distance_scorer(target: dict[str, torch.Tensor]):
    """Held-out "accuracy" for the greedy logic alone: minus the squared distance to ``target``."""
    calls = []

    def score(state):
        calls.append(state)
        return -sum(float((state[k].double() - t.double()).square().sum()) for k, t in target.items()
                    if t.is_floating_point())

    return score, calls


def test_greedy_soup_adds_models_best_first_only_while_the_held_out_score_does_not_drop(three, tmp_path):
    a, b, c = (_weights(p) for p in three)
    target = {k: (a[k].double() + b[k].double()) / 2 if a[k].is_floating_point() else a[k] for k in a}
    score, calls = _distance_scorer(target)
    # c first on the command line; a and b are equally close to their mean, so a (given first) leads
    soup, _, kept, record = greedy_soup([three[2], three[0], three[1]], score)
    assert kept == [three[0], three[1]] and len(calls) == 3 + 2  # each alone, then two candidate soups
    assert [r["checkpoint"] for r in record] == [str(p.resolve()) for p in (three[0], three[1], three[2])]
    assert [r["kept"] for r in record] == [True, True, False]
    assert record[1]["soup"] == pytest.approx(0.0, abs=1e-6) and record[2]["soup"] < record[1]["soup"]
    assert record[0]["alone"] == record[0]["soup"] == record[1]["alone"]
    for k in a:  # the soup is the uniform mean of what was kept
        assert torch.allclose(soup[k], (a[k] + b[k]) / 2, atol=1e-6), k


def test_a_greedy_candidate_that_ties_joins_and_one_model_alone_is_itself(three, tmp_path):
    _, _, kept, _ = greedy_soup(three, lambda state: 0.5)
    assert kept == three  # ">=": a soup that is no worse is kept (the recipe's rule)
    a = _weights(three[0])
    soup, _, kept, record = greedy_soup(three, _distance_scorer(a)[0])
    assert kept == [three[0]] and [r["kept"] for r in record] == [True, False, False]
    assert all(torch.equal(soup[k], a[k]) for k in a)  # bitwise the one model kept


def test_cli_greedy_soup_scores_on_held_out_data_and_records_its_choices(tmp_path, capsys, three):
    code, _, err = run_cli(capsys, "merge", *three, "--greedy", "--data", "shapes:seen", "--out", tmp_path / "soup")
    assert code == 0, err
    assert "greedy soup of" in err and "acc1" in err
    source = json.loads((tmp_path / "soup" / "config.json").read_text())["source"]
    record, merged = source["greedy_soup"], source["merge"]
    assert len(record) == 3 and record[0]["kept"]
    assert [r["alone"] for r in record] == sorted((r["alone"] for r in record), reverse=True)
    best = record[0]["soup"]
    for r in record[1:]:  # each joins exactly when the soup with it scores at least the soup before it
        assert r["kept"] == (r["soup"] >= best)
        best = max(best, r["soup"]) if r["kept"] else best
    kept = [r["checkpoint"] for r in record if r["kept"]]
    assert [m["checkpoint"] for m in merged] == kept
    soup, states = _weights(tmp_path / "soup"), {str(p.resolve()): _weights(p) for p in three}
    for key in soup:
        assert torch.allclose(soup[key], sum(states[c][key] for c in kept) / len(kept), atol=1e-6), key
    # the record's score for the soup is what clipforge eval reports for the written checkpoint
    code, _, err = run_cli(capsys, "eval", tmp_path / "soup", "--task", "zeroshot", "--data", "shapes:seen",
                           "--out", tmp_path / "soup.json")
    assert code == 0, err
    assert json.loads((tmp_path / "soup.json").read_text())["metrics"]["acc1"] == pytest.approx(best)


def test_cli_greedy_soup_refuses_what_it_cannot_do(tmp_path, capsys, three):
    def error(*args) -> str:  # the message, unwrapped from the terminal's error box
        code, _, err = run_cli(capsys, "merge", *three, *args)
        assert code == 2
        return " ".join(line.strip("│ ") for line in err.splitlines())

    assert "scores the soups on held-out data: give --data" in error("--greedy", "--out", tmp_path / "a")
    assert "leave out --alpha and --weights" in error("--greedy", "--alpha", "0.5", "--data", "shapes:seen",
                                                      "--out", tmp_path / "b")
    assert "add --greedy" in error("--data", "shapes:seen", "--out", tmp_path / "c")
    assert "add --greedy" in error("--max-samples", "100", "--out", tmp_path / "c")
    message = error("--greedy", "--data", "shapes:seen", "--metric", "acc9", "--out", tmp_path / "d")
    assert "'acc9' is not one of" in message and "acc1" in message
    assert not any((tmp_path / n).exists() for n in "abcd")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    calls = []
    with pytest.raises(FileExistsError, match="not empty"):  # before any model is scored
        merge_greedy(three, tmp_path / "full", lambda state: calls.append(1) or 0.0)
    assert calls == [] and (tmp_path / "full" / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- learned soup
def test_a_learned_soup_starts_uniform_lowers_the_held_out_loss_and_is_its_alphas_mix(three):
    from clipforge.merge import held_out_labelled, learned_soup

    images, labels, names, templates = held_out_labelled(three[0], "shapes:seen")
    assert images.dtype == torch.uint8 and len(images) == len(labels) and len(names) > labels.max()
    states = [_weights(p) for p in three]
    uniform, _, record = learned_soup(three, images, labels, names, templates, steps=0)
    mean = merge_weights(three)[0]
    assert all(torch.allclose(uniform[k], mean[k], atol=1e-6) for k in mean)  # no step: the uniform soup
    assert [m["alpha"] for m in record["models"]] == pytest.approx([1 / 3] * 3)
    assert record["learned"] == record["uniform"]
    soup, _, record = learned_soup(three, images, labels, names, templates, steps=20, lr=0.2, batch_size=64)
    assert record["learned"]["loss"] < record["uniform"]["loss"]  # fitted on this held-out loss
    assert record["temperature"] != 1.0  # fitted beside the weights (the paper's), not part of the soup
    fixed = learned_soup(three, images, labels, names, templates, steps=20, lr=0.2, batch_size=64,
                         fit_temperature=False)[2]
    assert fixed["temperature"] is None and fixed["learned"]["loss"] < fixed["uniform"]["loss"]
    alphas = [m["alpha"] for m in record["models"]]
    assert sum(alphas) == pytest.approx(1.0) and max(alphas) > 0.34
    for key, t in soup.items():  # the written soup is the recorded mix of the models
        if t.is_floating_point():
            assert torch.allclose(t, sum(a * s[key] for a, s in zip(alphas, states)), atol=1e-5), key
    # each model alone is scored as the soup with all its weight on that model
    one, _, alone = learned_soup(three[:2], images, labels, names, templates, steps=0)
    assert [m["acc1_alone"] for m in alone["models"]] == [m["acc1_alone"] for m in record["models"][:2]]


@pytest.mark.parametrize("per", ["tensor", "layer"])
def test_a_learned_soup_by_tensor_or_layer_mixes_each_on_its_own(three, per):
    from clipforge.merge import held_out_labelled, learned_soup, mixing_group

    images, labels, names, templates = held_out_labelled(three[0], "shapes:seen")
    states = [_weights(p) for p in three[:2]]
    soup, _, record = learned_soup(three[:2], images, labels, names, templates, steps=15, lr=0.3, per=per)
    assert record["per"] == per and record["learned"]["loss"] < record["uniform"]["loss"]
    groups = {mixing_group(k) for k in states[0]} if per == "layer" else set(states[0])
    assert record["groups"] == len(groups) and 1 < len(groups) <= len(states[0])
    assert mixing_group("visual.blocks.3.attn.qkv.weight") == "visual.blocks.3"
    assert mixing_group("visual.ln_post.weight") == "visual.ln_post" and mixing_group("logit_scale") == "logit_scale"
    # per tensor, the soup lies on the segment between the two models, at its own point
    points = []
    for key, t in soup.items():
        a, b = states[0][key], states[1][key]
        if t.is_floating_point() and not torch.equal(a, b):
            d = (b - a).flatten()
            points.append(float(((t - a).flatten() @ d) / (d @ d)))
            assert torch.allclose(t, a + points[-1] * (b - a), atol=1e-5), key
    assert len(set(round(p, 4) for p in points)) > 1 and all(-1e-4 <= p <= 1 + 1e-4 for p in points)
    if per == "layer":  # the tensors of one block share their point
        by_block = {}
        for key, point in zip([k for k in soup if soup[k].is_floating_point()
                               and not torch.equal(states[0][k], states[1][k])], points):
            by_block.setdefault(mixing_group(key), set()).add(round(point, 3))
        assert all(len(v) == 1 for v in by_block.values())


def test_cli_learned_soup_records_its_fit_and_its_accuracy_is_clipforge_evals(tmp_path, capsys, three):
    code, _, err = run_cli(capsys, "merge", *three, "--learned", "--data", "shapes:seen", "--steps", "5",
                           "--out", tmp_path / "soup")
    assert code == 0, err
    assert "learned soup of 3 models" in err and "alone" in err
    source = json.loads((tmp_path / "soup" / "config.json").read_text())["source"]
    record = source["learned_soup"]
    assert record["steps"] == 5 and record["data"] == "shapes:seen" and len(record["models"]) == 3
    assert [m["weight"] for m in source["merge"]] == [m["alpha"] for m in record["models"]]
    code, _, err = run_cli(capsys, "eval", tmp_path / "soup", "--task", "zeroshot", "--data", "shapes:seen",
                           "--out", tmp_path / "soup.json")
    assert code == 0, err
    evaluated = json.loads((tmp_path / "soup.json").read_text())
    images = evaluated["data"]["images"]  # the recorded held-out accuracy is clipforge eval's (to one image)
    assert evaluated["metrics"]["acc1"] == pytest.approx(record["learned"]["acc1"], abs=1.01 / images)


def test_cli_learned_soup_refuses_what_it_cannot_do(tmp_path, capsys, three):
    def error(*args) -> str:
        code, _, err = run_cli(capsys, "merge", *three, *args)
        assert code == 2
        return " ".join(line.strip("│ ") for line in err.splitlines())

    assert "fits the soup on held-out data: give --data" in error("--learned", "--out", tmp_path / "a")
    assert "leave out --greedy, --alpha and --weights" in error("--learned", "--greedy", "--data", "shapes:seen",
                                                                "--out", tmp_path / "b")
    assert "leave out --task" in error("--learned", "--task", "retrieval", "--data", "shapes:binding",
                                       "--out", tmp_path / "c")
    assert "add --learned" in error("--steps", "5", "--out", tmp_path / "d")
    assert "not both" in error("--learned", "--by-layer", "--by-tensor", "--data", "shapes:seen", "--out", tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_learned_soup_reads_labelled_images_on_disk_as_clipforge_eval_does(three, tmp_path):
    from clipforge.eval.evaluate import read_templates
    from clipforge.merge import held_out_labelled
    from test_eval_tasks import image_folder

    root = image_folder(tmp_path / "held", classes=3, per_class=2)
    images, labels, names, templates = held_out_labelled(three[0], f"imagefolder:{root}")
    size = clipforge.load(three[0])[0].cfg.image_size
    assert images.shape == (6, 3, size, size) and images.dtype == torch.uint8
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2] and names == sorted(names) and len(names) == 3
    assert templates == read_templates("photo")  # no templates file in the folder: eval's default set
    assert len(held_out_labelled(three[0], f"imagefolder:{root}", max_samples=4)[1]) == 4
