"""clipforge merge: WiSE-FT interpolation and model soups (clipforge/merge.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import clipforge
from clipforge.merge import MergeError, merge, merge_weights
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
