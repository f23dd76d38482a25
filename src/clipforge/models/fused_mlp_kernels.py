"""The Triton kernel of models/fused_mlp.py (its docstring says what it fuses and why).

Imported only when the first fused MLP runs: Triton reads TRITON_INTERPRET (its CPU interpreter,
used by the tests) when these functions are decorated, i.e. when this module is imported.
"""

import triton
import triton.language as tl


@triton.jit
def act_fn(h, ACT: tl.constexpr):
    if ACT == 0:  # GELU, erf form (torch's default)
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    else:  # quick GELU: h sigmoid(1.702 h)
        return h * tl.sigmoid(1.702 * h)


@triton.jit
def act_grad_fn(h, ACT: tl.constexpr):
    if ACT == 0:  # Φ(h) + h φ(h)
        return 0.5 * (1.0 + tl.erf(h * 0.7071067811865476)) + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    else:
        s = tl.sigmoid(1.702 * h)
        return s + 1.702 * h * s * (1.0 - s)


@triton.jit
def gemm_act_kernel(a, b, out, pre, bias, colsum, M, N, K,
                    s_am, s_ak, s_bk, s_bn,
                    BACKWARD: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    """out = epilogue(A @ B); A is M×K, B is K×N (any strides), out and pre contiguous M×N.
    Forward: pre = A@B + bias, out = act(pre). Backward: out = (A@B) * act'(pre), and this
    tile's column sums of out into colsum[tile row]. UPCAST (the interpreter only) multiplies in float32."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row tiles walk the columns together: their A and B tiles stay in L2
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows and columns past the edge read valid memory (modulo) and are never stored; row offsets
    # in int64 (M × N passes 2³¹ at a few thousand images of 197 tokens)
    a_ptrs = a + (rm % M).to(tl.int64)[:, None] * s_am + rk[None, :] * s_ak
    b_ptrs = b + rk[:, None] * s_bk + (rn % N)[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a_tile = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b_tile = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if UPCAST:  # Triton's CPU interpreter multiplies bf16 tiles wrongly (3.8): float32 there
            a_tile = a_tile.to(tl.float32)
            b_tile = b_tile.to(tl.float32)
        acc = tl.dot(a_tile, b_tile, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    offsets = rm.to(tl.int64)[:, None] * N + rn[None, :]
    if BACKWARD:
        h = tl.load(pre + offsets, mask=inside, other=0.0).to(tl.float32)
        grad = tl.where(inside, acc * act_grad_fn(h, ACT), 0.0)
        tl.store(out + offsets, grad.to(out.dtype.element_ty), mask=inside)
        tl.store(colsum + pid_m * N + rn, tl.sum(grad, axis=0), mask=rn < N)
    else:
        h = acc + tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(pre + offsets, h.to(pre.dtype.element_ty), mask=inside)
        tl.store(out + offsets, act_fn(h, ACT).to(out.dtype.element_ty), mask=inside)
