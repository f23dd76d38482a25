"""What train.fused_mlp (models/fused_mlp.py: GELU in the epilogues of two Triton GEMMs) buys on
one transformer block of ViT-B/16, forward and backward, against the same block with the plain MLP,
both compiled as the trainer compiles them (inductor's default mode), with the bf16 residual stream
of the recorded GPU configuration. Also checks, on the device, that the fused block computes what
the plain one does (bf16: relative error of the output and every gradient).

    python bench/fused_mlp.py --out fused_mlp.json       # GPU: 768 x 197 tokens, width 768, bf16
    TRITON_INTERPRET=1 python bench/fused_mlp.py --device cpu --batch 2 --tokens 9 --width 32 --heads 2 --iters 1 --rounds 1

Sides run interleaved (A B A B), ``--rounds`` times; medians. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from clipforge.bench import ms_per_call, print_json
from clipforge.models.vit import Block



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="eager blocks (the fused ops are the same)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    plain = Block(args.width, args.heads, 4 * args.width).to(device)
    fused = copy.deepcopy(plain)
    fused.mlp.fused = True
    x = torch.randn(args.batch, args.tokens, args.width, device=device, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn_like(x)
    sides = {"plain": plain, "fused": fused}
    runners = {name: block if args.no_compile else torch.compile(block) for name, block in sides.items()}

    def step(name: str):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out, _ = runners[name](x)
        out.backward(upstream)
        return out

    result = {"bench": "fused_mlp block", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "shape": [args.batch, args.tokens, args.width],
              "compile": not args.no_compile, "first_step_s": {}}
    # the first step compiles (and times the fused kernels' tile configurations); its output and
    # gradients are the equality check
    checked = {}
    for name, block in sides.items():
        x.grad = None
        block.zero_grad()
        start = time.perf_counter()
        out = step(name)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["first_step_s"][name] = round(time.perf_counter() - start, 1)
        checked[name] = [out.detach().float(), x.grad.float()] + [p.grad.float() for p in block.parameters()]
    names = ["output", "input grad"] + [n + " grad" for n, _ in plain.named_parameters()]
    result["max_relative_error"] = {
        n: round(float((f - p).abs().max() / p.abs().max()), 5) for n, f, p in zip(names, checked["fused"], checked["plain"])}

    per_round = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name in sides:  # A B A B
            per_round[name].append(ms_per_call(lambda: step(name), device, args.iters))
    flops = 2 * args.batch * args.tokens * args.width**2 * 12 * 3  # the block's GEMMs, forward + backward
    for name, times in per_round.items():
        ms = statistics.median(times)
        result[name] = {"ms_per_fwd_bwd": round(ms, 3), "min": round(min(times), 3), "max": round(max(times), 3),
                        "gemm_tflops_per_s": round(flops / ms / 1e9, 1)}
    result["speedup_fused_over_plain"] = round(result["plain"]["ms_per_fwd_bwd"] / result["fused"]["ms_per_fwd_bwd"], 3)
    from clipforge.models import fused_mlp

    result["tile_configs"] = {str(k): v for k, v in fused_mlp._chosen.items()}
    print_json(result, args.out)


if __name__ == "__main__":
    main()
