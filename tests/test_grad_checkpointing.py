"""train.grad_checkpointing: every transformer block recomputes its activations in backward
(models/vit.py run_block). Checked: the same embeddings and gradients as without (with FLIP's
patch dropout, A-CLIP's class-token attention, CLIP 🚀's text dropout, the pooled last block and
under torch.compile), the same training run through the trainer (also with tinyclip_prune's gate
hooks), and far fewer bytes kept for backward."""

from __future__ import annotations

import pytest
import torch

from clipforge.config import load_recipe
from clipforge.models.clip import CLIP
from clipforge.train.trainer import build_step, seed_everything

from test_perf_paths import SMALL, _batch, _losses

DEEPER = [*SMALL, "model.vision_layers=3", "model.text_layers=3"]


def _pass(recipe, checkpointed: bool, *, need=frozenset(), text_dropout: float = 0.0, compiled: bool = False):
    """Embeddings (+ the asked extras) and every parameter's gradient of one contrastive pass."""
    seed_everything(0)
    model = CLIP(recipe.model).train()
    model.set_grad_checkpointing(checkpointed)
    batch = _batch(recipe)
    run = torch.compile(model, backend="aot_eager") if compiled else model
    seed_everything(1)  # the same patch-dropout draw in both runs
    out = run(batch["images"], batch["input_ids"], batch["attention_mask"], need=need)
    logits = out["image_embeds"] @ out["text_embeds"].T * out["logit_scale"]
    if text_dropout:  # CLIP 🚀's local-mode text dropout: random, outside the checkpointed blocks
        seed_everything(2)
        extra = model.text(batch["input_ids"], batch["attention_mask"], dropout=text_dropout)["pooled"]
        logits = logits + extra.sum()
    target = torch.arange(logits.shape[0])
    loss = torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
    if "cls_attention" in out:
        loss = loss + sum(a.square().sum() for a in out["cls_attention"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["image_embeds"].detach(), out["text_embeds"].detach(), grads


def _assert_same(a, b, exact: bool = True):
    for x, y in zip(a[:2], b[:2]):
        assert torch.equal(x, y) if exact else torch.allclose(x, y, atol=1e-6)
    assert a[2].keys() == b[2].keys() and len(a[2]) > 10
    for name in a[2]:
        same = torch.equal(a[2][name], b[2][name]) if exact else torch.allclose(a[2][name], b[2][name], atol=1e-6)
        assert same, name


def test_checkpointed_blocks_give_the_same_embeddings_and_gradients():
    recipe = load_recipe("tiny-shapes", DEEPER)
    _assert_same(_pass(recipe, True), _pass(recipe, False))  # recomputation is the same arithmetic


@pytest.mark.parametrize("case", ["flip", "cls_attention", "text_dropout"])
def test_checkpointing_with_dropped_patches_attention_maps_and_text_dropout(case):
    overrides = [*DEEPER, "model.patch_dropout=0.5"] if case == "flip" else DEEPER
    recipe = load_recipe("tiny-shapes", overrides)
    kwargs = {"need": frozenset({"cls_attention"})} if case == "cls_attention" else {}
    if case == "text_dropout":
        kwargs["text_dropout"] = 0.3
    _assert_same(_pass(recipe, True, **kwargs), _pass(recipe, False, **kwargs))


def test_checkpointing_under_torch_compile():
    recipe = load_recipe("tiny-shapes", DEEPER)
    _assert_same(_pass(recipe, True, compiled=True), _pass(recipe, False), exact=False)


def _saved_bytes(recipe, checkpointed: bool) -> int:
    """Bytes autograd keeps for backward through one forward (what checkpointing exists to cut)."""
    seed_everything(0)
    model = CLIP(recipe.model).train()
    model.set_grad_checkpointing(checkpointed)
    batch = _batch(recipe)
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    assert out["image_embeds"].requires_grad
    return sum(kept)


def test_checkpointing_keeps_a_fraction_of_the_activations():
    recipe = load_recipe("tiny-shapes", [*DEEPER, "model.vision_layers=6", "model.text_layers=6"])
    full, checkpointed = _saved_bytes(recipe, False), _saved_bytes(recipe, True)
    assert checkpointed < 0.35 * full  # one input per block, not its LayerNorms, attention and MLP


@pytest.mark.parametrize("method", ["clip", "tinyclip_prune"])  # tinyclip_prune: gates hooked into every block
def test_train_grad_checkpointing_trains_the_same_run(method):
    overrides = [*DEEPER, f"method.name={method}"]
    on = load_recipe("tiny-shapes", [*overrides, "train.grad_checkpointing=true"])
    step_module = build_step(on, torch.device("cpu"), log=False)
    assert step_module.model.visual.grad_checkpointing and step_module.model.text.grad_checkpointing
    assert _losses(on, trim=True) == _losses(load_recipe("tiny-shapes", overrides), trim=True)


def test_a_hugging_face_text_tower_checkpoints_through_its_own_switch():
    pytest.importorskip("transformers")
    recipe = load_recipe("lit-minilm-shapes", ["data.batch_size=4", "data.num_workers=0", "method.cache=false",
                                               "model.text_unlocked_layers=2", "train.grad_checkpointing=true"])
    step_module = build_step(recipe, torch.device("cpu"), log=False).train()
    model = step_module.model
    assert model.text.hf.is_activation_checkpointing and model.visual.grad_checkpointing
    batch = _batch(recipe)

    def text_grads(on: bool) -> list[torch.Tensor]:
        model.set_grad_checkpointing(on)
        model.zero_grad()
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        (out["image_embeds"] @ out["text_embeds"].T).sum().backward()
        return [p.grad for p in model.text.parameters() if p.grad is not None]

    checkpointed, plain = text_grads(True), text_grads(False)
    assert not model.text.hf.is_activation_checkpointing
    assert len(plain) > 0 and all(torch.equal(a, b) for a, b in zip(checkpointed, plain))
