"""train.fused_mlp: the MLP with its activation in two Triton GEMMs (models/fused_mlp.py).

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py
before triton is first imported): the same kernel code, tile by tile in numpy. What is checked: the
fused MLP equals the plain one (values and every gradient; float32 to summation order, bf16
autocast to bf16 rounding) on shapes whose rows, columns and reduction do not divide the tiles and
span several tiles (the bias gradient sums per-tile partials); through torch.compile; in a whole
model and in the trainer; the FLOP count is the plain MLP's; and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 (before triton's first import)
pytest.importorskip("triton", reason="train.fused_mlp needs Triton (PyTorch's CUDA wheels bring it)")

from clipforge.bench import count_flops  # noqa: E402
from clipforge.config import load_recipe  # noqa: E402
from clipforge.models.clip import CLIP  # noqa: E402
from clipforge.models.fused_mlp import FusedMLPUnavailable, check_available, fused_mlp  # noqa: E402
from clipforge.models.vit import MLP  # noqa: E402
from clipforge.train.trainer import StepRunner, build_optimizer, build_step, seed_everything  # noqa: E402

from test_perf_paths import SMALL, _batch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _mlp_pass(mlp: MLP, x: torch.Tensor, fused: bool, autocast: bool = False) -> list[torch.Tensor]:
    """Output and the gradients of x and of the four parameters, for a fixed upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    mlp.zero_grad()
    mlp.fused = fused
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        y = mlp(x)
    upstream = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)
    (y.float() * upstream).sum().backward()
    mlp.fused = False
    return [y.detach().float(), x.grad] + [p.grad.clone() for p in mlp.parameters()]


def _relative_errors(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [float((u - v).abs().max() / v.abs().max()) for u, v in zip(a, b)]


# 5 × 15 = 75 rows (three 32-row tiles, the last partial), 40 hidden units (two column tiles, one
# partial), width 24 (a 16-wide reduction step and a remainder of 8)
SHAPE = (5, 15, 24)


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_fused_mlp_equals_the_plain_mlp_in_float32(activation):
    torch.manual_seed(0)
    mlp = MLP(24, 40, activation).to(DEVICE)
    x = torch.randn(*SHAPE, device=DEVICE) * 2  # well into both tails of the activation
    fused, plain = _mlp_pass(mlp, x, fused=True), _mlp_pass(mlp, x, fused=False)
    assert max(_relative_errors(fused, plain)) < 1e-5  # summation order only
    assert fused[0].shape == plain[0].shape


def test_fused_mlp_under_bf16_autocast_is_within_bf16_rounding():
    torch.manual_seed(1)
    mlp = MLP(24, 40, "gelu").to(DEVICE)
    x = torch.randn(*SHAPE, device=DEVICE)
    fused, plain = _mlp_pass(mlp, x, fused=True, autocast=True), _mlp_pass(mlp, x, fused=False, autocast=True)
    reference = _mlp_pass(mlp, x, fused=False)  # float32
    for f, p, r in zip(_relative_errors(fused, reference), _relative_errors(plain, reference), fused):
        assert f < 0.03 and p < 0.03  # both a bf16 computation of the same function
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert mlp(x).dtype == torch.bfloat16
        mlp.fused = True
        assert mlp(x).dtype == torch.bfloat16  # what autocast's linear layers return
        mlp.fused = False


def test_fused_mlp_on_pooled_tokens_and_without_input_gradient():
    torch.manual_seed(2)
    mlp = MLP(24, 40, "gelu").to(DEVICE)
    x = torch.randn(6, 24, device=DEVICE)  # a tower's last block on its pooled token: N×W
    assert torch.allclose(fused_mlp(x, mlp.fc, mlp.proj, "gelu"), mlp(x), atol=1e-5)
    fused_mlp(x, mlp.fc, mlp.proj, "gelu").sum().backward()  # x needs no gradient: only the weights get one
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mlp.parameters())


def test_fused_mlp_through_torch_compile_equals_eager():
    torch.manual_seed(3)
    mlp = MLP(24, 40, "gelu").to(DEVICE)
    x = torch.randn(*SHAPE, device=DEVICE)
    eager = _mlp_pass(mlp, x, fused=True)
    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)  # the ops are opaque nodes in the graph
    mlp.fused = True
    xc = x.clone().requires_grad_(True)
    y = compiled(xc)
    mlp.zero_grad()
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    mlp.fused = False
    assert max(_relative_errors([y.detach(), xc.grad] + [p.grad for p in mlp.parameters()], eager)) < 1e-6


def _model_pass(recipe, fused: bool):
    seed_everything(0)
    model = CLIP(recipe.model).train()
    model.set_fused_mlp(fused)
    batch = _batch(recipe)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    logits = out["image_embeds"] @ out["text_embeds"].T * out["logit_scale"]
    target = torch.arange(logits.shape[0])
    loss = torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
    loss.backward()
    return out["image_embeds"].detach(), out["text_embeds"].detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.skipif(DEVICE == "cuda", reason="the tiny recipe runs on the CPU")
def test_a_whole_model_with_fused_mlps_equals_the_plain_model():
    recipe = load_recipe("tiny-shapes", SMALL)
    fused, plain = _model_pass(recipe, True), _model_pass(recipe, False)
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(DEVICE == "cuda", reason="the tiny recipe runs on the CPU")
def test_train_fused_mlp_reaches_every_mlp_trains_the_same_and_counts_the_same_flops():
    on = load_recipe("tiny-shapes", [*SMALL, "train.fused_mlp=true"])
    off = load_recipe("tiny-shapes", SMALL)
    step_module = build_step(on, torch.device("cpu"), log=False)
    mlps = [m for m in step_module.model.modules() if isinstance(m, MLP)]
    assert len(mlps) == 3 and all(m.fused for m in mlps)  # one vision block, two text blocks

    def losses_and_flops(recipe):
        seed_everything(recipe.train.seed)
        module = build_step(recipe, torch.device("cpu"), log=False).train()
        runner = StepRunner(module, build_optimizer(module, recipe), recipe, torch.device("cpu"))
        batch = runner.to_device(_batch(recipe))
        flops = count_flops(lambda: runner.forward_backward([batch]))
        module.zero_grad()
        losses = []
        for done in range(1, 4):
            runner.set_lr(done - 1)
            loss, _, _ = runner.forward_backward([batch])
            runner.apply(done)
            losses.append(float(loss))
        return losses, flops

    fused_losses, fused_flops = losses_and_flops(on)
    plain_losses, plain_flops = losses_and_flops(off)
    assert fused_losses == [pytest.approx(v, rel=1e-4) for v in plain_losses]
    assert fused_flops == plain_flops > 0


def test_fused_mlp_is_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(FusedMLPUnavailable, match="leave train.fused_mlp=false"):
        check_available(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = CLIP(load_recipe("tiny-shapes", SMALL).model)
    model.visual.blocks[0].mlp.proj.register_forward_pre_hook(lambda _m, args: args)  # as tinyclip_prune does
    with pytest.raises(FusedMLPUnavailable, match="hooks them"):
        model.set_fused_mlp(True)
    assert not any(m.fused for m in model.modules() if isinstance(m, MLP))  # nothing half-switched


def test_the_kernel_compiles_for_hopper_with_pipelined_tensor_core_loops(tmp_path):
    # the interpreter above never compiles the kernel: build it for an H100 (sm_90) with Triton's own
    # ptxas, as the JIT would for a ViT's shapes, in a process without TRITON_INTERPRET
    code = ("import json; from clipforge.models.fused_mlp import GPU_CONFIGS, compile_for_gpu; "
            "print(json.dumps(compile_for_gpu(90, configs=GPU_CONFIGS[:1])))")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    builds = json.loads(out.stdout)
    assert [b["backward"] for b in builds] == [False, True]
    for build in builds:
        assert build["pipelined"] and build["tensor_cores"], build  # cp.async stages feeding wgmma
        assert build["shared_bytes"] <= 227 * 1024  # an H100 block's shared memory


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU refusal")
def test_cli_refuses_fused_mlp_on_a_cpu_with_the_fix(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-m", "clipforge", "train", "tiny-shapes", "--set", "train.fused_mlp=true",
                          "--set", "train.steps=1", "--run-dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode != 0
    assert "leave train.fused_mlp=false on a CPU" in out.stderr
    assert "Traceback" not in out.stderr
