"""Which fused attention kernel is fastest on a CLIP model's shapes (train.attention_backend), and
what the QKV layout costs: forward + backward of ``F.scaled_dot_product_attention`` for each SDPA
kernel PyTorch has (and the maths compiled, as a compiled model runs it), on ViT-B/16's attention (197 tokens, 12 heads of 64) and on 192 tokens (how
much of the time is the tiles' padding past 192), and on the text tower's causal attention.

Two layouts per kernel: ``packed``, q, k and v as views of one N×T×3W projection output, as the
model has them (their gradients are stacked back into one N×T×3W tensor in backward: a copy), and
``separate``, three contiguous N×H×T×D tensors (no stacking). Each variant also reports which
kernel ran (the profiler's op names) and its error against the float32 maths.

    python bench/attention_backends.py --out attention.json     # GPU: batch 768, bf16
    python bench/attention_backends.py --device cpu --batch 2 --iters 1 --rounds 1   # a smoke test
    python bench/attention_backends.py --suggest attention.json   # a gpu.py case with the fastest kernel, or ""

Variants run interleaved (A B C ... A B C), ``--rounds`` times; medians. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from clipforge.bench import ms_per_call, print_json
from clipforge.models.vit import attention_kernels, sdpa

# (name, tokens, width, heads, causal)
SHAPES = [("vit-b16", 197, 768, 12, False), ("vit-b16-t192", 192, 768, 12, False), ("text-t77", 77, 512, 8, True)]
# (label, train.attention_backend, compiled): the maths also through torch.compile, as a compiled model
# runs it (inductor fuses its scaling and softmax around two batched GEMMs)
VARIANTS = [("auto", "auto", False), ("cudnn", "cudnn", False), ("flash", "flash", False),
            ("efficient", "efficient", False), ("math", "math", False), ("math+compile", "math", True)]


def make_inputs(batch: int, tokens: int, width: int, heads: int, layout: str, device, dtype, seed: int = 0):
    """The leaf tensors (their gradients are what backward produces) and a function giving q, k, v."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(batch, tokens, 3 * width, generator=g).to(device, dtype)
    head_dim = width // heads
    if layout == "packed":  # the model's layout: views of one projection output
        leaf = qkv.requires_grad_()
        return [leaf], lambda: leaf.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    leaves = [t.view(batch, tokens, heads, head_dim).transpose(1, 2).contiguous().requires_grad_()
              for t in qkv.chunk(3, dim=-1)]
    return leaves, lambda: leaves


def attention(backend: str, causal: bool, compiled: bool):
    """q, k, v -> the model's attention (models/vit.py sdpa) with ``backend``'s kernels."""
    kernels = attention_kernels(backend)

    def attend(q, k, v):
        return sdpa(q, k, v, kernels, is_causal=causal)

    return torch.compile(attend) if compiled else attend


def fwd_bwd(get_qkv, attend, upstream: torch.Tensor) -> torch.Tensor:
    out = attend(*get_qkv())
    out.backward(upstream)
    return out


def kernel_ops(run) -> list[str]:
    """The attention ops that ran (aten names; a compiled variant's batched GEMMs and Triton kernels),
    so a variant says which kernel it measured."""
    with torch.profiler.profile() as prof:
        run()
    return sorted({e.key for e in prof.key_averages() if any(w in e.key for w in ("attention", "bmm", "triton_"))
                   and not e.key.startswith(("aten::scaled_dot", "autograd::"))})



def suggested_case(result: dict, case: str, shape: str = "vit-b16", margin: float = 0.03) -> str:
    """``case+train.attention_backend=X`` when kernel X ran the model's (packed) attention at least
    ``margin`` faster than PyTorch's own choice did, else "" (bench/gpu_run.sh times it end to end)."""
    variants = result["shapes"][shape]["variants"]
    auto = variants["auto/packed"]
    timed = {k.split("/")[0]: v for k, v in variants.items() if k.endswith("/packed") and "ms_fwd_bwd" in v}
    best = min(timed, key=lambda k: timed[k]["ms_fwd_bwd"])
    if best == "auto" or timed[best]["kernels"] == auto["kernels"]:
        return ""
    backend = best.split("+")[0]  # math+compile: the maths, as the compiled case runs it
    return f"{case}+train.attention_backend={backend}" if timed[best]["ms_fwd_bwd"] < (1 - margin) * auto["ms_fwd_bwd"] else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=768)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--suggest", metavar="JSON", help="only print suggested_case() for this earlier result")
    parser.add_argument("--case", default="vit-b16-compile-bf16res-b768", help="the bench/gpu.py case --suggest extends")
    args = parser.parse_args()
    if args.suggest:
        with open(args.suggest) as f:
            print(suggested_case(json.load(f), args.case))
        return
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shapes = {s[0]: s for s in SHAPES}
    result = {"bench": "attention backends", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "batch": args.batch, "dtype": args.dtype, "shapes": {}}

    runs, per_round = {}, {}
    for name in args.shapes.split(","):
        _, tokens, width, heads, causal = shapes[name]
        upstream = torch.randn(args.batch, heads, tokens, width // heads, generator=torch.Generator().manual_seed(1))
        # the reference: float32 maths, packed layout (the same numbers as every variant's inputs)
        ref_leaves, ref_qkv = make_inputs(args.batch, tokens, width, heads, "packed", device, torch.float32)
        ref_out = fwd_bwd(ref_qkv, attention("math", causal, False), upstream.to(device)).detach()
        ref_grad = ref_leaves[0].grad
        ref_leaves[0].grad = None
        fwd_flops = 4 * args.batch * heads * tokens**2 * (width // heads)  # QK^T and PV, dense count
        result["shapes"][name] = {"tokens": tokens, "width": width, "heads": heads, "causal": causal,
                                  "fwd_bwd_tflop": round(3 * fwd_flops / 1e12, 3), "variants": {}}
        for label, backend, compiled in VARIANTS:
            for layout in ("packed", "separate"):
                if compiled and (layout != "packed" or name == "vit-b16-t192"):  # compiling takes time: the model's case
                    continue
                key = (name, label, layout)
                leaves, get_qkv = make_inputs(args.batch, tokens, width, heads, layout, device, dtype)
                up = upstream.to(device, dtype)
                attend = attention(backend, causal, compiled)
                record = result["shapes"][name]["variants"][f"{label}/{layout}"] = {}
                try:
                    out = fwd_bwd(get_qkv, attend, up)
                except RuntimeError as e:  # a kernel this device or dtype does not have
                    record["error"] = str(e).splitlines()[0][:300]
                    continue
                grad = (leaves[0].grad if layout == "packed" else
                        torch.stack([t.grad.transpose(1, 2) for t in leaves], dim=2).flatten(2))
                record["max_relative_error"] = {
                    "output": round(float((out.detach().float() - ref_out).abs().max() / ref_out.abs().max()), 5),
                    "qkv_grad": round(float((grad.float() - ref_grad).abs().max() / ref_grad.abs().max()), 5)}
                for t in leaves:
                    t.grad = None
                record["kernels"] = kernel_ops(lambda: fwd_bwd(get_qkv, attend, up))
                runs[key] = (lambda g=get_qkv, a=attend, u=up, ls=leaves:
                             (fwd_bwd(g, a, u), [setattr(t, "grad", None) for t in ls]))
                per_round[key] = []
                record["fwd_bwd_tflop"] = result["shapes"][name]["fwd_bwd_tflop"]
    for _ in range(args.rounds):
        for key, run in runs.items():  # interleaved
            per_round[key].append(ms_per_call(run, device, args.iters))
    for (name, label, layout), times in per_round.items():
        record = result["shapes"][name]["variants"][f"{label}/{layout}"]
        ms = statistics.median(times)
        record.update(ms_fwd_bwd=round(ms, 3), min=round(min(times), 3), max=round(max(times), 3),
                      tflops_per_s=round(record.pop("fwd_bwd_tflop") / ms * 1e3, 1))
    for name, shape in result["shapes"].items():  # the fastest kernel per layout
        timed = {k: v["ms_fwd_bwd"] for k, v in shape["variants"].items() if "ms_fwd_bwd" in v}
        shape["fastest"] = {layout: min((k for k in timed if k.endswith(layout)), key=timed.get, default=None)
                            for layout in ("packed", "separate")}
    print_json(result, args.out)


if __name__ == "__main__":
    main()
