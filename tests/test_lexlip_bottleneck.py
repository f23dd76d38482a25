"""LexLIP phase 1 (methods/lexlip.py, method ``lexlip_bottleneck``): BERT masking of captions, the
bag-of-words bottleneck b = softmax(max-pooled logits) . sg(E), the weak bidirectional decoder that rebuilds
a masked caption from b, the three MLM losses, and the method end to end from the CLI."""

from __future__ import annotations

import pytest
import torch

from clipforge.config import load_recipe
from clipforge.methods.lexlip import WeakDecoder, bert_mask, bottleneck, mlm_loss
from clipforge.models.lexical import max_pooled_logits
from clipforge.train.trainer import build_step
from tiny_checkpoint import TINY_MODEL_TOML, TINY_RUN_TOML, train_straight_and_resumed

SMALL = ["model.image_size=32", "model.patch_size=8", "model.vision_width=32", "model.vision_heads=2",
         "model.vision_layers=2", "model.text_width=32", "model.text_heads=2", "model.text_layers=2",
         "model.embed_dim=16", "model.context_length=12", "model.vocab_size=64", "data.tokenizer.vocab_size=64"]


def _captions(n: int = 4000, length: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (n, length), generator=g)
    real = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < real[:, None]).long()
    return ids * mask, mask


def test_bert_masking_selects_real_inner_tokens_at_the_rate_and_splits_80_10_10():
    torch.manual_seed(0)
    ids, mask = _captions()
    out_ids, to_mask, labels = bert_mask(ids, mask, 0.3, 64)
    selected = labels != -100
    last = mask.sum(1) - 1
    rows = torch.arange(len(ids))
    assert not selected[:, 0].any() and not selected[rows, last].any()  # start and end-of-text never
    assert not (selected & ~mask.bool()).any()  # padding never
    inner = mask.bool().clone()
    inner[:, 0] = False
    inner[rows, last] = False
    assert abs(selected.sum() / inner.sum() - 0.3) < 0.01
    assert torch.equal(labels[selected], ids[selected])
    assert (to_mask <= selected).all() and torch.equal(out_ids[~selected], ids[~selected])
    changed = selected & ~to_mask & (out_ids != ids)  # random replacements (a few land on the same id)
    n = selected.sum().item()
    assert abs(to_mask.sum().item() / n - 0.8) < 0.02
    assert abs(changed.sum().item() / n - 0.1 * 60 / 64) < 0.02  # 10 % random, of which 1/64 keep the id


def test_bottleneck_is_the_softmax_of_the_max_logits_over_real_tokens_times_the_embeddings_without_their_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    embeddings = torch.randn(64, 8, requires_grad=True)
    b = bottleneck(max_pooled_logits(logits, mask), embeddings)
    for i in range(3):
        real = logits[i, : int(mask[i].sum())]
        expected = real.max(0).values.softmax(-1) @ embeddings
        torch.testing.assert_close(b[i], expected)
    padded = logits.detach().clone()
    padded[0, 3:] = 1e4  # huge logits at padding change nothing
    torch.testing.assert_close(bottleneck(max_pooled_logits(padded, mask), embeddings), b.detach())
    b.sum().backward()
    assert embeddings.grad is None and logits.grad.abs().sum() > 0  # the paper's gradient cut


def test_the_weak_decoder_puts_b_first_ignores_padding_sees_both_ways_and_uses_the_given_vocabulary():
    torch.manual_seed(0)
    decoder = WeakDecoder(16, 2, 2, dropout=0.0).eval()
    vocab = torch.nn.Linear(16, 64)
    x, b = torch.randn(2, 6, 16), torch.randn(2, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    out = decoder(x, b, mask, vocab)
    assert out.shape == (2, 6, 64)
    other_first = x.clone()
    other_first[:, 0] = 5.0  # the first token's embedding is replaced by b: it does not matter
    torch.testing.assert_close(decoder(other_first, b, mask, vocab), out)
    other_pad = x.clone()
    other_pad[0, 4:] = 7.0  # padding is masked out of attention
    torch.testing.assert_close(decoder(other_pad, b, mask, vocab)[0, :4], out[0, :4])
    later = x.clone()
    later[:, 3] += 1.0  # bidirectional: position 1 sees position 3
    assert not torch.allclose(decoder(later, b, mask, vocab)[:, 1], out[:, 1])
    assert not torch.allclose(decoder(x, b + 1.0, mask, vocab), out)  # it reads b
    out.sum().backward()
    assert vocab.weight.grad is not None


def test_mlm_loss_is_the_mean_ce_over_selected_positions_and_zero_without_any():
    logits = torch.randn(2, 3, 10)
    labels = torch.tensor([[-100, 4, -100], [7, -100, -100]])
    expected = (torch.nn.functional.cross_entropy(logits[0, 1][None], torch.tensor([4]))
                + torch.nn.functional.cross_entropy(logits[1, 0][None], torch.tensor([7]))) / 2
    torch.testing.assert_close(mlm_loss(logits, labels), expected)
    assert mlm_loss(logits, torch.full((2, 3), -100)) == 0


def _step(extra: list[str] | None = None):
    recipe = load_recipe("lexlip-bottleneck-shapes", SMALL + (extra or []))
    torch.manual_seed(0)
    return build_step(recipe, torch.device("cpu"), log=False)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids, mask = _captions(6, 12, seed=1)
    return {"images": torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g),
            "input_ids": ids, "attention_mask": mask}


def test_token_embeds_in_place_of_the_ids_embeddings_change_nothing():
    step = _step()
    ids, mask = _captions(3, 12, seed=2)
    text = step.model.text
    a = text(ids, mask, return_tokens=True)
    b = text(ids, mask, return_tokens=True, token_embeds=text.token_embed(ids))
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["pooled"], b["pooled"])


def test_each_lexmlm_loss_trains_what_it_should():
    """i2t reaches the image tower and its lexical head through b; t2t and self_t the text tower; the decoder's
    vocabulary projection is the text lexical head's own (its gradient comes from the decoder too)."""
    batch = _batch()
    for key, reaches, not_reaches in (
        ("lexmlm/i2t", ["model.visual.blocks.0.attn.qkv.weight", "model.image_lexical.decoder.weight",
                        "decoder.transform.0.weight", "model.text_lexical.decoder.weight"],
         ["model.text.blocks.0.attn.qkv.weight"]),
        ("lexmlm/t2t", ["model.text.blocks.0.attn.qkv.weight", "decoder.transform.0.weight", "mask_embedding"],
         ["model.visual.blocks.0.attn.qkv.weight", "model.image_lexical.decoder.weight"]),
        ("lexmlm/self", ["model.text.blocks.0.attn.qkv.weight", "model.text_lexical.decoder.weight"],
         ["decoder.transform.0.weight", "model.visual.blocks.0.attn.qkv.weight"]),
    ):
        step = _step(["method.decoder_dropout=0.0"])
        step.train()
        torch.manual_seed(3)
        outputs = step.encode(batch)
        _, metrics = step.compute_loss(outputs, batch)
        labels = outputs["lexmlm/encoder_labels" if key == "lexmlm/self" else "lexmlm/decoder_labels"]
        loss = mlm_loss(outputs[key + "_logits"], labels)
        torch.testing.assert_close(loss.detach(), metrics[key])
        loss.backward()
        grads = dict(step.named_parameters())
        for name in reaches:
            assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, (key, name)
        for name in not_reaches:
            assert grads[name].grad is None or grads[name].grad.abs().sum() == 0, (key, name)


def test_in_eval_the_step_is_the_objective_alone():
    step = _step()
    step.eval()
    with torch.no_grad():
        outputs = step.encode(_batch())
        loss, metrics = step.compute_loss(outputs, _batch())
    assert not any(k.startswith("lexmlm/") for k in metrics)


@pytest.mark.parametrize("change, message", [
    (["model.lexical_head=false", "objective.terms=[{name=\"clip\"}]"], "set model.lexical_head = true"),
    (["train.accum_mode=gradcache", "train.accum_steps=2"], "gradcache"),
])
def test_recipes_it_cannot_train_are_refused_with_the_fix(change, message):
    with pytest.raises(ValueError, match=message):
        load_recipe("lexlip-bottleneck-shapes", SMALL + change)


TOML = 'base = "lexlip-bottleneck-shapes"\n' + TINY_MODEL_TOML + TINY_RUN_TOML


def test_trains_from_the_cli_and_resumes_exactly(tmp_path, capsys):
    (tmp_path / "r.toml").write_text(TOML)
    a, b = train_straight_and_resumed(capsys, tmp_path / "r.toml", tmp_path)
    assert a["step"] == b["step"] == 4
    for key in ("loss", "lexmlm/i2t", "lexmlm/t2t", "lexmlm/self", "lexical/loss"):
        assert a[key] == b[key], key
    assert 0 < a["lexmlm/i2t"] < 20
