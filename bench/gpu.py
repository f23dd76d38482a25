"""The GPU benchmark, ready for the first GPU: ViT-B/32 and ViT-B/16 at 224 px, bf16 autocast,
clipforge's trainer step against OpenCLIP on the same config in the same run, compile off/on,
and FLIP with 50 % patch dropout. Each case runs ``clipforge bench`` in its own process (a
failure or out-of-memory ends that case only) and its JSON is written as soon as it finishes.

    bash bench/gpu.sh                       # on a GPU machine; JSON into $OUT (or bench-out/)
    bash bench/gpu.sh --device cpu --tiny   # the same script on a CPU with tiny models (a smoke test)

Prints one JSON object: a summary line per case, and the paths of the full per-case JSON files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# (case, recipe, extra --set overrides, compile, batches to try, largest first)
CASES = [
    ("vit-b32", "clip-vit-b32", [], False, [1024, 512]),
    ("vit-b16", "clip-vit-b16", [], False, [512, 384, 256]),
    ("vit-b16-flip50", "clip-vit-b16", ["model.patch_dropout=0.5"], False, [512, 384, 256]),
    ("vit-b16-compile", "clip-vit-b16", [], True, [512, 384, 256]),
    ("vit-b16-flip50-compile", "clip-vit-b16", ["model.patch_dropout=0.5"], True, [512, 384, 256]),
    # the host reads every step's loss and gradient norm (what every step did before the sync-free step)
    ("vit-b16-compile-synced", "clip-vit-b16", ["train.sync_every_step=true"], True, [512, 384, 256]),
    ("vit-b16-compile-b768", "clip-vit-b16", [], True, [768]),
    # inductor benchmarks GEMM templates and fusions (epilogue fusion into the GEMMs); long compile
    ("vit-b16-compile-autotune", "clip-vit-b16", ["train.compile_mode=max-autotune-no-cudagraphs"], True, [512]),
    # the residual stream (and LayerNorm outputs) in bf16: half the bytes for the memory-bound kernels
    ("vit-b16-bf16res", "clip-vit-b16", ["train.bf16_residual=true"], False, [512, 384, 256]),
    ("vit-b16-compile-bf16res-b768", "clip-vit-b16", ["train.bf16_residual=true"], True, [768, 512]),
    # a larger batch: the per-step fixed costs (AdamW over 150 M parameters, launches) over more samples
    ("vit-b16-compile-bf16res-b1024", "clip-vit-b16", ["train.bf16_residual=true"], True, [1024]),
    ("vit-b16-flip50-compile-bf16res-b768", "clip-vit-b16", ["model.patch_dropout=0.5", "train.bf16_residual=true"],
     True, [768, 512]),
    # the fastest settings so far plus GEMM templates that may fuse GELU / bias into the GEMMs (give it
    # --case-timeout 400: autotuning every GEMM shape takes minutes)
    ("vit-b16-compile-autotune-bf16res-b768", "clip-vit-b16",
     ["train.bf16_residual=true", "train.compile_mode=max-autotune-no-cudagraphs"], True, [768]),
    # the fastest settings so far plus the MLPs' GELU in two Triton GEMMs' epilogues (models/fused_mlp.py)
    ("vit-b16-compile-bf16res-fusedmlp-b768", "clip-vit-b16", ["train.bf16_residual=true", "train.fused_mlp=true"],
     True, [768]),
]

TINY = ["model.image_size=32", "model.patch_size=8", "model.vision_width=64", "model.vision_layers=2",
        "model.vision_heads=2", "model.text_width=64", "model.text_layers=2", "model.text_heads=2",
        "model.vocab_size=512", "data.tokenizer.vocab_size=512", "model.context_length=16", "model.embed_dim=32",
        "data.num_workers=1"]


def run_case(args, name: str, recipe: str, overrides: list[str], compile: bool, batch: int, out_dir: Path,
             timeout: float) -> dict:
    out = out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".json")
    cmd = [sys.executable, "-m", "clipforge", "bench", recipe, "--device", args.device, "--precision", args.precision,
           "--batch", str(batch), "--steps", str(args.steps), "--rounds", str(args.rounds), "--warmup", str(args.warmup),
           "--loader-batches", str(args.loader_batches), "--out", str(out),
           "--compile" if compile else "--no-compile"]
    if not args.no_openclip and (args.openclip_cases == "all" or name in args.openclip_cases.split(",")):
        cmd += ["--against", "openclip"]
    if args.profile:
        cmd += ["--profile"]
    for o in overrides + (TINY if args.tiny else []):
        cmd += ["--set", o]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    seconds = round(time.perf_counter() - started, 1)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-1500:]
        oom = "OutOfMemoryError" in tail or "out of memory" in tail
        return {"case": name, "batch": batch, "ok": False, "oom": oom, "seconds": seconds, "error_tail": tail}
    result = json.loads(out.read_text())
    sides = result["sides"]
    summary = {"case": name, "batch": batch, "ok": True, "seconds": seconds, "json": str(out),
               "device": result["device"], "peak_memory_gb": result["peak_memory_gb"]}
    for side, v in sides.items():
        summary[side] = {"img_per_s": v["img_per_s"]["median"], "spread_pct": v["img_per_s"]["spread_pct"],
                         "mfu": v["mfu"], "gflops_per_sample": v["gflops_per_sample"], "warmup_s": v["warmup_s"]}
    if "ratio_ours_over_openclip" in result:
        summary["ratio_ours_over_openclip"] = result["ratio_ours_over_openclip"]
    if "loader" in result:
        summary["loader_img_per_s"] = result["loader"]["img_per_s"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches (CPU smoke test)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loader-batches", type=int, default=4)
    parser.add_argument("--case-timeout", type=float, default=240.0)
    parser.add_argument("--cases", default=",".join(c[0] for c in CASES[:4]),
                        help="comma-separated, run in this order; CASE+key=value adds an override to a case, "
                             "e.g. vit-b16-compile-bf16res-b768+train.attention_backend=flash")
    parser.add_argument("--also-cases", default="", help="appended to --cases (e.g. a case chosen by a script)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for all cases: a case is not started after it, and is cut at it")
    parser.add_argument("--no-openclip", action="store_true")
    parser.add_argument("--openclip-cases", default="all", help="comma-separated cases run against OpenCLIP too")
    parser.add_argument("--profile", action="store_true", help="add a kernel-time breakdown per side")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench-out")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.rounds, args.warmup, args.loader_batches = 1, 2, 1, 1
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_name = {c[0]: c for c in CASES}
    if args.also_cases:
        args.cases = f"{args.cases},{args.also_cases}"
    unknown = [n.split("+")[0] for n in args.cases.split(",") if n.split("+")[0] not in by_name]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(by_name)}")
    started = time.perf_counter()
    summaries = []
    for name in args.cases.split(","):
        base, *extra = name.split("+")  # CASE+key=value: the case with more overrides
        _, recipe, overrides, compile, batches = by_name[base]
        overrides = overrides + extra
        for batch in ([8] if args.tiny else batches):  # the largest batch that fits
            timeout = args.case_timeout
            if args.deadline is not None:  # what is left of the budget bounds this case
                timeout = min(timeout, args.deadline - (time.perf_counter() - started))
                if timeout < 20:
                    summaries.append({"case": name, "batch": batch, "ok": False, "oom": False,
                                      "error_tail": "not started: --deadline reached"})
                    break
            try:
                summary = run_case(args, name, recipe, overrides, compile, batch, out_dir, timeout)
            except subprocess.TimeoutExpired:
                summary = {"case": name, "batch": batch, "ok": False, "oom": False,
                           "error_tail": f"timed out after {round(timeout)} s"}
            summaries.append(summary)
            print(json.dumps(summary), flush=True)  # partial results survive a later failure
            (out_dir / "summary.json").write_text(json.dumps(summaries, indent=1))
            if not summary.get("oom"):
                break
    final = {"bench": "gpu", "cases": summaries}
    synced = next((s for s in summaries if s["case"] == "vit-b16-compile-synced" and s["ok"]), None)
    free = next((s for s in summaries if s["case"] == "vit-b16-compile" and s["ok"]), None)
    if synced and free and synced["batch"] == free["batch"]:  # what not reading every step on the host buys
        final["sync_free_speedup"] = round(free["clipforge"]["img_per_s"] / synced["clipforge"]["img_per_s"], 3)
    for flip in (s for s in summaries if s["case"].startswith("vit-b16-flip50") and s["ok"]):
        # FLIP's speed-up over the same case without patch dropout, at the same batch
        suffix = flip["case"].removeprefix("vit-b16-flip50")
        base = next((s for s in summaries if s["case"] == f"vit-b16{suffix}" and s["ok"]), None)
        if base and flip["batch"] == base["batch"]:
            final[f"flip50{suffix}_speedup"] = round(flip["clipforge"]["img_per_s"] / base["clipforge"]["img_per_s"], 3)
    for fused in (s for s in summaries if "-fusedmlp" in s["case"] and s["ok"]):
        # train.fused_mlp's speed-up over the same case with the plain MLP, at the same batch
        base = next((s for s in summaries if s["case"] == fused["case"].replace("-fusedmlp", "") and s["ok"]), None)
        if base and fused["batch"] == base["batch"]:
            final["fused_mlp_speedup"] = round(fused["clipforge"]["img_per_s"] / base["clipforge"]["img_per_s"], 3)
    for extended in (s for s in summaries if "+" in s["case"] and s["ok"]):
        # CASE+key=value over CASE itself, at the same batch
        base = next((s for s in summaries if s["case"] == extended["case"].split("+")[0] and s["ok"]), None)
        if base and extended["batch"] == base["batch"]:
            final.setdefault("speedup_over_base_case", {})[extended["case"]] = round(
                extended["clipforge"]["img_per_s"] / base["clipforge"]["img_per_s"], 3)
    (out_dir / "summary.json").write_text(json.dumps(final, indent=1))
    print(json.dumps(final))


if __name__ == "__main__":
    main()
