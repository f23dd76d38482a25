"""What inductor's GEMM autotuning (max-autotune: Triton GEMM templates with the GELU / bias fused into
their epilogues) buys on one transformer block of ViT-B/16, forward and backward, against the default
compile (cuBLAS GEMMs, separate fused Triton kernels between them) and eager, and what it costs to
compile. One block compiles in a fraction of the whole model's autotuning time, so the answer fits a
short device call (the whole-model case did not finish in 330 s, docs/performance.md).

    python bench/block_autotune.py --out block.jsonl                # GPU: 768 x 197 tokens, width 768, bf16
    python bench/block_autotune.py --device cpu --batch 2 --tokens 16 --width 64 --heads 2 --iters 2   # smoke

Prints one JSON line per mode as it finishes, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from clipforge.models.vit import Block


def timed_ms(fn, device: torch.device, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def run_mode(mode: str, args, device: torch.device) -> dict:
    torch._dynamo.reset()  # each mode compiles from scratch
    torch.manual_seed(0)
    block = Block(args.width, args.heads, 4 * args.width).to(device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    # the bf16 residual stream (train.bf16_residual): the block's input and output are autocast's dtype
    x = torch.randn(args.batch, args.tokens, args.width, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    run = block if mode == "eager" else torch.compile(block, mode=mode)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out, _ = run(x)
        out.backward(grad)

    started = time.perf_counter()
    step()  # compiles forward and backward
    if device.type == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - started
    timed_ms(step, device, args.warmup)
    times = timed_ms(step, device, args.iters)
    return {"mode": mode, "first_step_s": round(compile_s, 1), "ms_per_fwd_bwd": round(statistics.median(times), 3),
            "spread_pct": round(100 * (max(times) - min(times)) / statistics.median(times), 1),
            # the same number of passes in every mode: their summed input gradients agree to rounding
            "summed_input_grad_norm": round(float(x.grad.float().norm()), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--batch", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", default="eager,default,max-autotune-no-cudagraphs")
    parser.add_argument("--out", default=None, help="also append each JSON line to this file (autotuning logs a lot)")
    args = parser.parse_args()
    device = torch.device(args.device)

    def emit(record: dict) -> None:  # partial results survive a later timeout
        print(json.dumps(record), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")

    results = []
    for mode in args.modes.split(","):
        result = run_mode(mode, args, device)
        results.append(result)
        emit(result)
    # forward + backward FLOPs of the block's matmuls and attention (2 per multiply-add, backward twice forward)
    n, t, w = args.batch, args.tokens, args.width
    flops = 3 * (2 * n * t * w * (3 * w + w + 8 * w) + 4 * n * t * t * w)
    summary = {"bench": "block_autotune", "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "shape": [n, t, w], "heads": args.heads, "flop_per_fwd_bwd": flops,
               "results": results}
    for r in results:
        r["tflops"] = round(flops / (r["ms_per_fwd_bwd"] / 1e3) / 1e12, 1)
    emit(summary)


if __name__ == "__main__":
    main()
