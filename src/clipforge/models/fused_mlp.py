"""The transformer MLP with its activation fused into two GEMMs (``train.fused_mlp``; GPU speed).

Unfused, a block's MLP moves its hidden tensor (N·T × 4W, the largest in the block) through memory
more often than its GEMMs need: the first GEMM writes h, an activation kernel reads h and writes
g = act(h); in backward the second layer's input-gradient GEMM writes dg, and the activation's
backward reads dg and h, writes dh, and the bias gradient reads dh once more. Here two Triton GEMMs
carry the activation in their epilogues:

    forward   h, g = x W1ᵀ + b1, act(x W1ᵀ + b1)          one kernel writes both (h is saved for backward)
    backward  dh = (dy W2) ⊙ act'(h),  db1 = Σ_rows dh    one kernel reads h, writes dh and per-tile column sums

Saved: two of three hidden-tensor transfers in the activation's forward (one), three of five in its
backward. The other four GEMMs (the second layer forward, both weight gradients, the input gradient)
are torch's (cuBLAS). The maths is ``MLP.forward``'s: the same erf GELU or quick GELU, in float32 in
the epilogue (on the GEMM's float32 accumulator, before rounding to the compute dtype; the unfused
path applies it to h already rounded, so in bf16 the two differ by rounding, in float32 by
summation order; tests/test_fused_mlp.py).

The kernels need Triton: on a CUDA GPU, or anywhere with ``TRITON_INTERPRET=1`` (Triton's
interpreter, numpy on the CPU: slow, for tests). Triton is imported only when a kernel first runs.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.utils.flop_counter
from torch import nn

# activation codes the kernels take (a constexpr): the names are vit.ACTIVATIONS'
ACT_CODES = {"gelu": 0, "quick_gelu": 1}


class FusedMLPUnavailable(RuntimeError):
    pass


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_available(device: torch.device) -> None:
    """Refuse clearly where the kernels cannot run (train.fused_mlp on a CPU, or no Triton)."""
    if device.type != "cuda" and not interpreting():
        raise FusedMLPUnavailable(
            f"train.fused_mlp runs Triton GPU kernels, and this run's device is {device.type}: leave "
            "train.fused_mlp=false on a CPU (the fused kernels only save GPU memory traffic); TRITON_INTERPRET=1 "
            "runs them in Triton's interpreter, for testing only")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise FusedMLPUnavailable(
            "train.fused_mlp needs Triton (`pip install triton`; PyTorch's CUDA wheels bring it): "
            f"{e}. Or leave train.fused_mlp=false") from e


# ----------------------------------------------------------------------------- kernels
@functools.cache
def _kernels():
    """Triton and the kernel, imported on first use (see fused_mlp_kernels.py)."""
    import triton

    from clipforge.models import fused_mlp_kernels

    return triton, fused_mlp_kernels.gemm_act_kernel


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): tile shapes that suit Hopper/Ampere
# bf16 GEMMs with a 768-1024-wide reduction; the fastest for a shape is picked by timing each once
GPU_CONFIGS = [
    (128, 256, 64, 8, 8, 3),
    (256, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 4, 4),
    (64, 256, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
]
INTERPRETER_CONFIG = (32, 32, 16, 4, 1, 1)  # the interpreter runs one tile at a time: small tiles, few
_chosen: dict[tuple, tuple] = {}


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision. It only matters for float32 operands: TF32 where torch's own matmuls
    use it (the trainer enables it on CUDA), else exact; for bf16 / fp16 Triton's default."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch(config: tuple, a, b, out, pre, bias, colsum, backward: bool, act: int) -> None:
    triton, kernel = _kernels()
    block_m, block_n, block_k, group_m, warps, stages = config
    m, k = a.shape
    n = b.shape[1]
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    kernel[grid](a, b, out, pre, bias, colsum, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                 BACKWARD=backward, ACT=act, PRECISION=_precision(a.dtype), UPCAST=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n,
                 BLOCK_K=block_k, GROUP_M=group_m, num_warps=warps, num_stages=stages)


def _config_for(a, b, pre, bias, backward: bool, act: int) -> tuple:
    """The fastest of GPU_CONFIGS for this shape class (timed once per process; M bucketed to a
    power of two so a text tower trimmed to each batch's longest caption does not retime)."""
    if interpreting():
        return INTERPRETER_CONFIG
    m, k = a.shape
    n = b.shape[1]
    key = (1 << max(m - 1, 1).bit_length(), n, k, a.dtype, backward, act, a.device.index)
    if key not in _chosen:
        triton, _ = _kernels()
        times, error = {}, None
        for config in GPU_CONFIGS:
            out, scratch_pre, colsum = _outputs(a, n, config[0], backward)
            pre_arg = pre if backward else scratch_pre
            try:
                times[config] = triton.testing.do_bench(
                    lambda c=config: _launch(c, a, b, out, pre_arg, bias, colsum, backward, act), warmup=5, rep=20)
            except Exception as e:  # noqa: BLE001 - e.g. a tile too large for this GPU's shared memory: skip it
                error = e
        if not times:
            raise FusedMLPUnavailable(f"train.fused_mlp: no Triton tile configuration ran on this GPU (the last "
                                      f"error: {type(error).__name__}: {error}); leave train.fused_mlp=false")
        _chosen[key] = min(times, key=times.get)
    return _chosen[key]


def _outputs(a: torch.Tensor, n: int, block_m: int, backward: bool):
    """The kernel's outputs: out (M×N), the pre-activation (forward only, else None) and the
    per-row-tile column sums (backward only; a 1×N placeholder in forward)."""
    m = a.shape[0]
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    pre = None if backward else torch.empty_like(out)
    colsum = torch.empty((m + block_m - 1) // block_m if backward else 1, n, dtype=torch.float32, device=a.device)
    return out, pre, colsum


def compile_for_gpu(arch: int = 90, act: str = "gelu", configs: list[tuple] = GPU_CONFIGS) -> list[dict]:
    """Compile the kernel ahead of time for CUDA compute capability ``arch`` (90: Hopper, 80: Ampere)
    with each tile of ``configs``, forward and backward, without a GPU (Triton's bundled ptxas), as the
    JIT specialises it for a ViT's shapes (aligned pointers, sizes divisible by 16, unit strides
    constant). Returns what each build uses: shared memory, and whether its loads are pipelined
    (cp.async) into tensor-core instructions (wgmma on Hopper, mma on Ampere). Not under
    TRITON_INTERPRET (there the kernel is not compiled)."""
    if interpreting():
        raise FusedMLPUnavailable("compile_for_gpu needs the compiled kernel: unset TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    triton, kernel = _kernels()
    names = kernel.arg_names
    pointers = {"a": "*bf16", "b": "*bf16", "out": "*bf16", "pre": "*bf16", "bias": "*bf16", "colsum": "*fp32"}
    builds = []
    for backward in (False, True):
        # A is K-contiguous; B is the first weight transposed (K-contiguous) forward, the second
        # weight (N-contiguous) backward
        unit = {"s_ak": 1, ("s_bn" if backward else "s_bk"): 1}
        for config in configs:
            block_m, block_n, block_k, group_m, warps, stages = config
            constants = {**unit, "BACKWARD": backward, "ACT": ACT_CODES[act], "PRECISION": "tf32", "UPCAST": False,
                         "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m}
            signature = {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in names}
            aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in constants}
            source = ASTSource(fn=kernel, signature=signature, attrs=aligned,
                               constexprs={(names.index(n),): v for n, v in constants.items()})
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": warps, "num_stages": stages})
            ptx = compiled.asm["ptx"]
            builds.append({"backward": backward, "config": config, "shared_bytes": compiled.metadata.shared,
                           "pipelined": "cp.async" in ptx,
                           "tensor_cores": ("wgmma.mma_async" if arch >= 90 else "mma.sync") in ptx})
    return builds


# ----------------------------------------------------------------------------- ops (opaque to torch.compile)
@torch.library.custom_op("clipforge::mlp_fc_act", mutates_args=())
def mlp_fc_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: M×W, weight: H×W, bias: H -> (h, act(h)), h = x weightᵀ + bias, both M×H."""
    b = weight.t()  # W×H view: no copy
    config = _config_for(x, b, None, bias, False, act)
    out, pre, colsum = _outputs(x, b.shape[1], config[0], False)
    _launch(config, x, b, out, pre, bias, colsum, False, act)
    return pre, out


@mlp_fc_act.register_fake
def _(x, weight, bias, act):
    h = x.new_empty(x.shape[0], weight.shape[0])
    return h, torch.empty_like(h)


@torch.library.custom_op("clipforge::mlp_act_grad", mutates_args=())
def mlp_act_grad(dy: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dy: M×W, weight (the second layer's): W×H, pre: M×H -> (dh, db), dh = (dy weight) ⊙ act'(pre),
    db = Σ_rows dh in float32."""
    config = _config_for(dy, weight, pre, pre, True, act)  # no bias in backward: any pointer
    out, _, colsum = _outputs(dy, weight.shape[1], config[0], True)
    _launch(config, dy, weight, out, pre, pre, colsum, True, act)
    return out, colsum.sum(0)


@mlp_act_grad.register_fake
def _(dy, weight, pre, act):
    return torch.empty_like(pre), pre.new_empty(pre.shape[1], dtype=torch.float32)


class _FusedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, act: int):
        h, g = mlp_fc_act(x, w1, b1, act)
        ctx.save_for_backward(x, w1, w2, h, g)
        ctx.act = act
        return torch.addmm(b2, g, w2.t())

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, h, g = ctx.saved_tensors
        dy = dy.to(g.dtype).contiguous()
        dh, db1 = mlp_act_grad(dy, w2, h, ctx.act)
        dx = dh @ w1 if ctx.needs_input_grad[0] else None
        return dx, dh.t() @ x, db1.to(w1.dtype), dy.t() @ g, dy.sum(0), None


def fused_mlp(x: torch.Tensor, fc: nn.Linear, proj: nn.Linear, activation: str) -> torch.Tensor:
    """``proj(act(fc(x)))`` for x of shape …×W through the fused kernels. Under autocast the operands
    are cast to autocast's dtype first, as autocast would for the two linear layers."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    with torch.autocast(device, enabled=False):
        y = _FusedMLP.apply(flat, fc.weight.to(dtype), fc.bias.to(dtype), proj.weight.to(dtype),
                            proj.bias.to(dtype), ACT_CODES[activation])
    return y.view(*lead, y.shape[-1])


# FLOPs as torch's FlopCounterMode counts a matmul (clipforge bench counts the step with it): the
# fused ops are the two GEMMs they replace, 2 M K N each
@torch.utils.flop_counter.register_flop_formula(torch.ops.clipforge.mlp_fc_act)
def _fc_act_flops(x_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * weight_shape[0]


@torch.utils.flop_counter.register_flop_formula(torch.ops.clipforge.mlp_act_grad)
def _act_grad_flops(dy_shape, weight_shape, *args, **kwargs) -> int:
    return 2 * dy_shape[0] * weight_shape[0] * weight_shape[1]
