"""train.attention_backend: the one fused attention kernel allowed (models/vit.py attention_kernels).

On a CPU PyTorch has two SDPA kernels, its flash kernel for CPU and the unfused maths: the tests
check that the option selects the kernel that runs (the profiler's op names), eager and compiled,
that the kernels give the same embeddings and gradients, and that it reaches the trainer's model.
"""

from __future__ import annotations

import pytest
import torch

from clipforge.config import RecipeError, load_recipe
from clipforge.models.clip import CLIP
from clipforge.models.vit import attention_kernels
from clipforge.train.trainer import build_step
from test_perf_paths import SMALL, _batch, _losses

CPU_KERNEL_OPS = {"math": "aten::_scaled_dot_product_attention_math",
                  "flash": "aten::_scaled_dot_product_flash_attention_for_cpu"}


def _model(backend: str) -> CLIP:
    torch.manual_seed(0)
    model = CLIP(load_recipe("tiny-shapes", SMALL).model)
    model.set_attention_backend(backend)
    return model


def _embeds_grads_and_ops(model: CLIP, batch: dict, compiled: bool = False):
    run = torch.compile(model, backend="aot_eager") if compiled else model
    model.zero_grad()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = run(batch["images"], batch["input_ids"], batch["attention_mask"])
        # fixed random weights (a sum of squares of unit vectors would have no gradient)
        weights = torch.randn(out["image_embeds"].shape, generator=torch.Generator().manual_seed(1))
        (out["image_embeds"] * weights + out["text_embeds"] * weights.flip(0)).sum().backward()
    ops = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["image_embeds"].detach(), out["text_embeds"].detach(), grads, ops


@pytest.mark.parametrize("compiled", [False, True])
def test_the_named_kernel_runs_and_gives_the_same_attention(compiled):
    batch = _batch(load_recipe("tiny-shapes", SMALL))
    results = {name: _embeds_grads_and_ops(_model(name), batch, compiled) for name in CPU_KERNEL_OPS}
    for name, op in CPU_KERNEL_OPS.items():
        other = next(o for n, o in CPU_KERNEL_OPS.items() if n != name)
        assert op in results[name][3] and other not in results[name][3], (name, results[name][3])
    (img_m, txt_m, grads_m, _), (img_f, txt_f, grads_f, _) = results["math"], results["flash"]
    torch.testing.assert_close(img_f, img_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(txt_f, txt_m, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_m.keys() and len(grads_m) > 10
    for n in grads_m:  # float32 summation order: 1e-5 of the tensor's largest entry
        assert (grads_f[n] - grads_m[n]).abs().max() <= 1e-5 * grads_m[n].abs().max(), n


def test_a_kernel_that_cannot_run_the_call_takes_the_maths():
    # the CUDA-only kernels on a CPU, like flash given a mask on a GPU: the unfused maths, same numbers
    batch = _batch(load_recipe("tiny-shapes", SMALL))
    maths = _embeds_grads_and_ops(_model("math"), batch)
    for name in ("cudnn", "efficient"):
        got = _embeds_grads_and_ops(_model(name), batch)
        assert got[3] == maths[3]
        torch.testing.assert_close(got[0], maths[0], rtol=0, atol=0)


def test_the_option_reaches_the_trainers_model_and_trains():
    recipe = load_recipe("tiny-shapes", [*SMALL, "train.attention_backend=math"])
    model = build_step(recipe, torch.device("cpu"), log=False).model
    kernels = [m.kernels for m in model.modules() if hasattr(m, "kernels")]
    assert len(kernels) == 3 and all(k == attention_kernels("math") for k in kernels)  # 1 vision + 2 text blocks
    math_losses = _losses(recipe, trim=True)
    flash_losses = _losses(load_recipe("tiny-shapes", [*SMALL, "train.attention_backend=flash"]), trim=True)
    assert flash_losses == [pytest.approx(v, rel=1e-5) for v in math_losses]


def test_unknown_backends_are_refused():
    with pytest.raises(RecipeError, match="train.attention_backend.*flash3"):
        load_recipe("tiny-shapes", [*SMALL, "train.attention_backend=flash3"])
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        attention_kernels("xformers")
    assert attention_kernels("auto") is None
    backend = torch.nn.attention.SDPBackend
    assert attention_kernels("flash") == [backend.FLASH_ATTENTION, backend.MATH]
    assert attention_kernels("math") == [backend.MATH]


CUDA_KERNEL_OPS = {"cudnn": "aten::_scaled_dot_product_cudnn_attention",
                   "flash": "aten::_scaled_dot_product_flash_attention",
                   "efficient": "aten::_scaled_dot_product_efficient_attention"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
@pytest.mark.parametrize("name", list(CUDA_KERNEL_OPS))
def test_each_cuda_kernel_runs_when_named_and_follows_the_maths(name):
    """On a GPU (an H100 has all three), bf16 autocast, ViT-B/16's head size (64): the named kernel
    ran, and the embeddings follow the maths' within bf16 rounding."""
    recipe = load_recipe("tiny-shapes", [*SMALL, "model.vision_width=128", "model.text_width=128"])
    batch = {k: v.cuda() for k, v in _batch(recipe).items()}
    embeds = {}
    for backend in ("math", name):
        torch.manual_seed(0)
        model = CLIP(recipe.model).cuda()
        model.set_attention_backend(backend)
        with torch.profiler.profile() as prof, torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        ops = {e.key for e in prof.key_averages()}
        embeds[backend] = out["image_embeds"].float()
    assert CUDA_KERNEL_OPS[name] in ops, sorted(op for op in ops if "attention" in op)
    torch.testing.assert_close(embeds[name], embeds["math"], rtol=0.02, atol=0.02)
