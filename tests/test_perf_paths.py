"""Speed paths give the plain path's numbers: the text tower on the batch's longest caption only,
and ``train.compile`` (torch.compile of the model)."""

from __future__ import annotations

import pytest
import torch

from clipforge.config import load_recipe
from clipforge.data.loader import trim_text_padding
from clipforge.models.clip import CLIP
from clipforge.train.trainer import StepRunner, build_optimizer, build_step, seed_everything, snapshot_metrics

SMALL = ["model.image_size=16", "model.patch_size=8", "model.vision_width=32", "model.vision_layers=1",
         "model.vision_heads=2", "model.text_width=32", "model.text_layers=2", "model.text_heads=2",
         "model.embed_dim=16", "model.context_length=32", "data.batch_size=8", "data.num_workers=0"]


def _batch(recipe, n: int = 8) -> dict:
    from clipforge.bench import first_batch
    from clipforge.models.tokenizer import train_tokenizer_for

    return first_batch(recipe, train_tokenizer_for(recipe.data, recipe.model.context_length))


def test_trim_cuts_to_the_longest_caption_rounded_up():
    mask = torch.zeros(3, 32, dtype=torch.long)
    mask[0, :5], mask[1, :11], mask[2, :3] = 1, 1, 1
    batch = {"input_ids": torch.arange(96).view(3, 32) * mask, "attention_mask": mask, "captions": ["a", "b", "c"]}
    out = trim_text_padding(batch)
    assert out["input_ids"].shape == (3, 16) and out["attention_mask"].shape == (3, 16)
    assert torch.equal(out["input_ids"], batch["input_ids"][:, :16])
    assert out["attention_mask"].sum() == mask.sum()  # no real token is cut
    assert trim_text_padding({**batch, "attention_mask": torch.ones(3, 32, dtype=torch.long)})["input_ids"].shape[1] == 32


def test_trimmed_text_gives_the_same_embeddings():
    recipe = load_recipe("tiny-shapes", SMALL)
    torch.manual_seed(0)
    model = CLIP(recipe.model).eval()
    batch = _batch(recipe)
    trimmed = trim_text_padding(batch)
    assert trimmed["input_ids"].shape[1] < batch["input_ids"].shape[1]
    with torch.no_grad():
        full = model(None, batch["input_ids"], batch["attention_mask"])["text_embeds"]
        short = model(None, trimmed["input_ids"], trimmed["attention_mask"])["text_embeds"]
    # the same maths on fewer rows: equal up to the GEMM's blocking (bitwise on this CPU in practice)
    torch.testing.assert_close(short, full, rtol=0, atol=1e-6)


def _losses(recipe, trim: bool, steps: int = 3) -> list[float]:
    seed_everything(recipe.train.seed)
    step_module = build_step(recipe, torch.device("cpu"), log=False).train()
    runner = StepRunner(step_module, build_optimizer(step_module, recipe), recipe, torch.device("cpu"))
    runner.trim_text = trim
    batch = _batch(recipe)
    losses = []
    for done in range(1, steps + 1):
        runner.set_lr(done - 1)
        loss, _, _ = runner.forward_backward([runner.to_device(batch)])
        runner.apply(done)
        losses.append(float(loss))
    return losses


def test_training_with_trimmed_text_follows_the_full_context_run():
    recipe = load_recipe("tiny-shapes", SMALL)
    full, trimmed = _losses(recipe, trim=False), _losses(recipe, trim=True)
    assert trimmed == [__import__("pytest").approx(v, rel=1e-5, abs=1e-6) for v in full]


def test_terms_reading_text_tokens_get_the_full_context():
    recipe = load_recipe("filip-shapes", SMALL)
    step_module = build_step(recipe, torch.device("cpu"), log=False)
    runner = StepRunner(step_module, build_optimizer(step_module, recipe), recipe, torch.device("cpu"))
    assert not runner.trim_text  # FILIP gathers per-token text features across ranks: shapes must agree


def test_compiled_model_matches_eager():
    recipe = load_recipe("tiny-shapes", SMALL)
    batch = trim_text_padding(_batch(recipe))
    results = []
    for compiled in (False, True):
        seed_everything(0)
        model = CLIP(recipe.model).train()
        if compiled:
            model.compile()
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        loss = (out["image_embeds"] @ out["text_embeds"].T * out["logit_scale"]).logsumexp(1).mean()
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), out["image_embeds"].detach(), grads))
    (eager_loss, eager_emb, eager_grads), (comp_loss, comp_emb, comp_grads) = results
    # inductor fuses and reorders float ops: equal within float32 rounding, not bitwise
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comp_emb, eager_emb, rtol=1e-4, atol=1e-5)
    assert comp_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(comp_grads[name], eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_train_compile_option_reaches_the_model():
    recipe = load_recipe("tiny-shapes", [*SMALL, "train.compile=true"])
    step_module = build_step(recipe, torch.device("cpu"), log=False)
    assert step_module.model._compiled_call_impl is not None  # nn.Module.compile(): keys unchanged
    assert all(not k.startswith("_orig_mod") for k in step_module.model.state_dict())


def test_train_compile_mode_reaches_torch_compile(monkeypatch):
    seen = []
    original = torch.compile

    def recording_compile(*args, **kwargs):
        seen.append(kwargs.get("mode"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    build_step(load_recipe("tiny-shapes", [*SMALL, "train.compile=true"]), torch.device("cpu"), log=False)
    build_step(load_recipe("tiny-shapes", [*SMALL, "train.compile=true", "train.compile_mode=max-autotune-no-cudagraphs"]),
               torch.device("cpu"), log=False)
    assert seen == ["default", "max-autotune-no-cudagraphs"]
    with pytest.raises(ValueError, match="compile_mode"):
        load_recipe("tiny-shapes", [*SMALL, "train.compile=true", "train.compile_mode=fastest"])
    with pytest.raises(ValueError, match="also set train.compile=true"):  # would be silently ignored
        load_recipe("tiny-shapes", [*SMALL, "train.compile_mode=max-autotune"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
@pytest.mark.parametrize("name", ["tiny-shapes", "tiny-shapes-flip", "tiny-shapes-siglip"])
def test_sync_free_steps_never_wait_for_the_gpu(name):
    """The trainer's steady-state step (copy in, forward, backward, clip, AdamW or a device-side skip)
    makes no call that blocks the host on the GPU: CUDA's sync debug mode turns any such call into an error."""
    device = torch.device("cuda")
    recipe = load_recipe(name, SMALL + ["train.device=cuda"])
    seed_everything(0)
    step_module = build_step(recipe, device, log=False).train()
    runner = StepRunner(step_module, build_optimizer(step_module, recipe), recipe, device)
    assert runner.sync_free
    batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in _batch(recipe).items()}

    def one_step(done: int) -> torch.Tensor:
        runner.set_lr(done - 1)
        loss, metrics, grad_norm = runner.forward_backward([runner.to_device(batch)])
        snapshot_metrics(loss, metrics)  # what the loop keeps for its next read
        return runner.apply_unless_bad(loss, grad_norm, done)

    for done in (1, 2):  # first calls create handles and workspaces
        one_step(done)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flags = [one_step(done) for done in (3, 4, 5)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(sum(flags)) == 0.0  # and the steps were applied


# ----------------------------------------------------------------------------- train.bf16_residual
def _block_output_dtypes(model: CLIP) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    for block in [*model.visual.blocks, *model.text.blocks]:
        block.register_forward_hook(lambda _m, _i, out: seen.append(out[0].dtype))
    return seen


def _embeds_and_grads(recipe, batch, low_precision: bool, autocast: bool):
    seed_everything(0)
    model = CLIP(recipe.model).train()
    model.set_low_precision_residual(low_precision)
    dtypes = _block_output_dtypes(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        logits = out["image_embeds"].float() @ out["text_embeds"].float().T * out["logit_scale"]
    target = torch.arange(logits.shape[0])
    loss = torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return out["image_embeds"].float().detach(), out["text_embeds"].float().detach(), grads, set(dtypes)


def test_bf16_residual_keeps_the_stream_in_bf16_and_follows_the_float32_stream():
    recipe = load_recipe("tiny-shapes", SMALL)
    batch = trim_text_padding(_batch(recipe))
    ref_img, ref_txt, ref_grads, _ = _embeds_and_grads(recipe, batch, low_precision=False, autocast=False)
    amp_img, amp_txt, amp_grads, amp_dtypes = _embeds_and_grads(recipe, batch, low_precision=False, autocast=True)
    low_img, low_txt, low_grads, low_dtypes = _embeds_and_grads(recipe, batch, low_precision=True, autocast=True)
    assert amp_dtypes == {torch.float32}  # autocast alone: the residual adds promote to float32
    assert low_dtypes == {torch.bfloat16}
    # both autocast runs are within bf16 rounding of the float32 model; the bf16 stream adds a
    # little more rounding, not a different function
    for low, amp, ref in ((low_img, amp_img, ref_img), (low_txt, amp_txt, ref_txt)):
        assert (low - ref).abs().max() < 0.02 and (amp - ref).abs().max() < 0.02
    for grads in (amp_grads, low_grads):
        assert torch.isfinite(grads).all()
        assert torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0) > 0.99


def test_bf16_residual_changes_nothing_without_autocast():
    recipe = load_recipe("tiny-shapes", SMALL)
    batch = trim_text_padding(_batch(recipe))
    plain = _embeds_and_grads(recipe, batch, low_precision=False, autocast=False)
    flagged = _embeds_and_grads(recipe, batch, low_precision=True, autocast=False)
    for a, b in zip(plain[:3], flagged[:3]):
        assert torch.equal(a, b)
    assert flagged[3] == {torch.float32}


def test_train_bf16_residual_reaches_both_towers_and_trains():
    recipe = load_recipe("tiny-shapes", [*SMALL, "train.precision=bf16", "train.bf16_residual=true"])
    step_module = build_step(recipe, torch.device("cpu"), log=False).train()
    assert step_module.model.visual.low_precision_residual and step_module.model.text.low_precision_residual
    off = load_recipe("tiny-shapes", [*SMALL, "train.precision=bf16"])
    low, amp = _losses(recipe, trim=True), _losses(off, trim=True)
    assert all(torch.isfinite(torch.tensor(low)))
    assert low == [pytest.approx(v, rel=0.02) for v in amp]  # the same run up to bf16 rounding
    with pytest.raises(ValueError, match="only applies under bf16 autocast"):  # it would be silently ignored
        load_recipe("tiny-shapes", [*SMALL, "train.precision=fp32", "train.bf16_residual=true"])
