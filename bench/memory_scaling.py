"""Peak memory of one training step versus the global batch size, on CPU, for three ways to train it.

Each step is the trainer's own: ``clipforge.demo.StepTimer`` runs
``clipforge.train.trainer.StepRunner`` (the recipe's step module and objective, its accumulation
mode, gradient clipping, fused AdamW, the after-step hook) on the recipe's first batch of
``data.batch_size`` samples, repeated ``train.accum_steps`` times. Tiny-shapes model, fp32.

- ``plain``: CLIP loss, ``train.accum_steps=1``, the whole batch in one forward/backward;
- ``plain_checkpointed``: ``plain`` with ``train.grad_checkpointing=true`` (each transformer block
  keeps only its input for backward and recomputes the rest);
- ``gradcache``: CLIP loss, ``train.accum_mode="gradcache"``, micro-batches of ``--micro`` samples
  and ``accum_steps = batch / micro``;
- ``sigmoid_gradcache``: the SigLIP recipe (tiny-shapes-siglip) with the same GradCache
  micro-batches, the full N x N logits;
- ``gradcache_chunked`` / ``sigmoid_gradcache_chunked``: the same with the term's
  ``chunk_size = 1024``: the loss is computed block by block and recomputed in backward
  (``clipforge.objectives.chunked``), so no N x N tensor exists.
  ``siglip_loss_chunked`` (the ring's arithmetic in one process, which keeps every block) is
  measured on its own (``loss_only`` in the JSON).

Every (path, batch) runs in a fresh subprocess, so its peak RSS is its own. The child builds
the model and batch, hands freed memory back to the OS, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``) and runs ``--steps`` optimiser steps; it reports the absolute peak
(``ru_maxrss``) and the step's increment over the RSS after the build. This parent imports no
torch: a child's ``ru_maxrss`` starts from its parent's RSS at exec time.

Prints one JSON object.

    .venv/bin/python bench/memory_scaling.py                       # batches 64 .. 2048, ~5-10 min on 2 cores
    .venv/bin/python bench/memory_scaling.py --batches 64,256 --max-seconds 120
    .venv/bin/python bench/memory_scaling.py --quick               # tiny model, batches 32, 64 (for the test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

MIB = 2**20

PATHS = {
    "plain": {
        "recipe": "tiny-shapes",
        "gradcache": False,
        "description": "CLIP loss, accum_steps=1: the whole batch in one forward/backward",
    },
    "plain_checkpointed": {
        "recipe": "tiny-shapes",
        "gradcache": False,
        "overrides": ["train.grad_checkpointing=true"],
        "description": "CLIP loss, accum_steps=1, every transformer block recomputed in backward "
                       "(train.grad_checkpointing)",
    },
    "gradcache": {
        "recipe": "tiny-shapes",
        "gradcache": True,
        "description": "CLIP loss, accum_mode=gradcache, accum_steps = batch / micro",
    },
    "sigmoid_gradcache": {
        "recipe": "tiny-shapes-siglip",
        "gradcache": True,
        "description": "SigLIP loss (full N x N logits), accum_mode=gradcache, accum_steps = batch / micro",
    },
    "gradcache_chunked": {
        "recipe": "tiny-shapes",
        "gradcache": True,
        "overrides": ["objective.terms.0.chunk_size=1024"],
        "description": "CLIP loss computed 1024 rows at a time and recomputed in backward (never N x N), "
                       "accum_mode=gradcache",
    },
    "sigmoid_gradcache_chunked": {
        "recipe": "tiny-shapes-siglip",
        "gradcache": True,
        "overrides": ["objective.terms.0.chunk_size=1024"],
        "description": "SigLIP loss computed 1024 rows at a time, recomputed in backward, accum_mode=gradcache",
    },
}

# --quick: a one-layer model, a small tokenizer corpus and one thread (tiny ops gain nothing from
# two, and on a shared 2-core machine the second thread mostly waits), so a child takes ~4 s
QUICK_OVERRIDES = ["model.vision_layers=1", "model.text_layers=1", "data.tokenizer.corpus_size=500",
                   "train.threads=1"]


# ----------------------------------------------------------------------------- memory readings (child)
def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; elsewhere the peak so far, the best we have)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc), so the RSS after the build is what stays live,
    and the step's allocations show up as new resident pages instead of reusing freed ones."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark (Linux >= 4.0), so ``ru_maxrss`` measures the steps only
    and not a higher transient during the build (tokenizer training, rendering)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_train_step(path: str, batch_size: int, micro: int, steps: int, overrides: list[str]) -> dict:
    """Build the trainer's step for one (path, batch), run ``steps`` optimiser steps, report memory."""
    import torch

    from clipforge.config import load_recipe
    from clipforge.demo import StepTimer

    spec = PATHS[path]
    if spec["gradcache"]:
        micro = min(micro, batch_size)
        if batch_size % micro:
            raise ValueError(f"batch {batch_size} is not a multiple of the micro-batch {micro}")
        accum = batch_size // micro
        run_overrides = [f"data.batch_size={micro}", f"train.accum_steps={accum}", "train.accum_mode=gradcache"]
    else:
        micro, accum = batch_size, 1
        run_overrides = [f"data.batch_size={batch_size}"]
    run_overrides += spec.get("overrides", [])
    # the recipe a user would train with; StepTimer runs the trainer's StepRunner on it (the
    # recipe's accumulation mode, clipping, fused AdamW, after-step hook) on its first batch
    recipe = load_recipe(spec["recipe"], overrides + run_overrides)
    timer = StepTimer(recipe)

    release_freed_memory()
    build_peak = peak_rss_bytes()  # includes transients of the build
    after_build = current_rss_bytes()
    peak_was_reset = reset_peak_rss()
    seconds = timer.seconds(steps)
    peak = peak_rss_bytes()
    return {
        "batch": batch_size,
        "micro_batch": micro,
        "accum_steps": accum,
        "recipe_overrides": run_overrides,
        "peak_rss_mib": round(peak / MIB, 1),
        "step_increment_mib": round((peak - after_build) / MIB, 1),
        "rss_after_build_mib": round(after_build / MIB, 1),
        "build_peak_rss_mib": round(build_peak / MIB, 1),
        "peak_reset_after_build": peak_was_reset,
        "step_seconds": [round(s, 2) for s in seconds],
        "params": timer.side.params,
        "threads": torch.get_num_threads(),
        "model": model_shapes(recipe),
        "torch": torch.__version__,
    }


def child_sigmoid_loss(batch_size: int, micro: int, overrides: list[str]) -> dict:
    """The SigLIP loss alone, forward + backward on random unit embeddings: full, then chunked.

    Both in this one process: the peak mark is reset before each, and the first one's memory is
    freed and trimmed before the second starts."""
    import torch
    import torch.nn.functional as F

    from clipforge.config import load_recipe
    from clipforge.objectives.sigmoid import siglip_loss, siglip_loss_chunked

    recipe = load_recipe("tiny-shapes", overrides)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    model = model_shapes(recipe)
    chunks = max(1, batch_size // micro)  # one simulated shard per micro-batch
    out = {"batch": batch_size, "num_chunks": chunks, "model": model, "torch": torch.__version__}
    # warm up on a tiny batch: the first backward starts autograd's and OpenMP's threads, a one-off
    # cost that would otherwise land on whichever variant runs first
    tiny = torch.randn(4, model["embed_dim"], requires_grad=True)
    siglip_loss(tiny, tiny, torch.tensor(10.0), torch.tensor(-10.0)).backward()
    siglip_loss_chunked(tiny, tiny, torch.tensor(10.0), torch.tensor(-10.0), num_chunks=2).backward()
    del tiny
    for variant in ("full", "chunked"):
        g = torch.Generator().manual_seed(0)
        images = F.normalize(torch.randn(batch_size, model["embed_dim"], generator=g), dim=-1).requires_grad_()
        texts = F.normalize(torch.randn(batch_size, model["embed_dim"], generator=g), dim=-1).requires_grad_()
        scale = torch.tensor(10.0, requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        release_freed_memory()
        after_build = current_rss_bytes()
        out["peak_reset"] = reset_peak_rss()
        start = time.perf_counter()
        if variant == "chunked":
            loss = siglip_loss_chunked(images, texts, scale, bias, num_chunks=chunks)
        else:
            loss = siglip_loss(images, texts, scale, bias)
        loss.backward()
        seconds = time.perf_counter() - start
        out[variant] = {"increment_mib": round((peak_rss_bytes() - after_build) / MIB, 1), "seconds": round(seconds, 3)}
        del images, texts, scale, bias, loss
    return out


def model_shapes(recipe) -> dict:
    m = recipe.model
    keys = ("image_size", "patch_size", "vision_width", "vision_layers", "text_width", "text_layers",
            "context_length", "vocab_size", "embed_dim")
    return {k: getattr(m, k) for k in keys}


# ----------------------------------------------------------------------------- parent
def run_child(args: list[str], timeout: float) -> tuple[dict | None, str | None, float]:
    """(result, error, wall seconds) of one fresh ``python bench/memory_scaling.py --child ...``."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                              capture_output=True, text=True, timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:  # subprocess.run kills the child it started
        return None, f"timed out after {timeout:.0f} s", time.perf_counter() - start
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return None, f"exit code {proc.returncode}: " + " | ".join(tail), wall
    return json.loads(proc.stdout.strip().splitlines()[-1]), None, wall


def lift_run_info(result: dict, measured: dict) -> None:
    """Move what every child reports alike (model shape, torch version) to the top of the JSON."""
    for key in ("model", "torch"):
        value = measured.pop(key, None)
        if result.get(key) is None:
            result[key] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="64,128,256,512,1024,2048", help="global batch sizes, comma-separated")
    parser.add_argument("--micro", type=int, default=64, help="GradCache micro-batch (and samples per simulated shard)")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps per configuration")
    parser.add_argument("--max-seconds", type=float, default=540.0,
                        help="wall-clock budget for the whole run: a configuration whose estimated time "
                             "(the path's previous one, scaled by batch) does not fit is skipped, with the larger ones")
    parser.add_argument("--paths", default=",".join(PATHS), help="which paths to run, comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (train.threads); default torch's")
    parser.add_argument("--no-loss-only", action="store_true",
                        help="skip the SigLIP-loss-alone measurements (full and ring-chunked keep N x N logits: "
                             "~16 GiB at 32k)")
    parser.add_argument("--quick", action="store_true", help="tiny model, batches 32,64, micro 16 (for the test)")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--child-loss", type=int, metavar="BATCH", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one measurement, in this fresh process
        path, batch = args.child
        print(json.dumps(child_train_step(path, int(batch), args.micro, args.steps, args.overrides)))
        return
    if args.child_loss:
        print(json.dumps(child_sigmoid_loss(args.child_loss, args.micro, args.overrides)))
        return

    if args.quick:
        args.batches, args.micro = "32,64", 16
    batches = sorted(int(b) for b in args.batches.split(","))
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown path(s) {unknown}; choose from {list(PATHS)}")
    overrides = list(QUICK_OVERRIDES if args.quick else [])
    if args.threads:
        overrides = [o for o in overrides if not o.startswith("train.threads=")] + [f"train.threads={args.threads}"]
    override_args = ["--overrides", *overrides] if overrides else []

    started = time.perf_counter()
    deadline = started + args.max_seconds
    result: dict = {
        "bench": "memory_scaling",
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "dtype": "fp32",
        "quick": args.quick,
        "torch": None,  # filled in from the first child that ran (this process imports no torch)
        "model": None,
        "extra_overrides": overrides,
        "batches": batches,
        "micro_batch": args.micro,
        "steps_per_config": args.steps,
        "max_seconds": args.max_seconds,
        "measure": "each (path, batch) in a fresh process: build the trainer's step, optimiser and batch; "
                   "gc + malloc_trim; RSS after build; reset the peak mark (clear_refs); run the steps; "
                   "peak = ru_maxrss; step_increment = peak - RSS after build",
    }

    # 1. SigLIP loss alone, full vs chunked (a couple of seconds per child); first, so the budget keeps it
    loss_only = []
    for n in batches:
        if args.no_loss_only:
            loss_only.append({"batch": n, "error": "skipped: --no-loss-only"})
            continue
        if time.perf_counter() > deadline:
            loss_only.append({"batch": n, "error": "skipped: --max-seconds used up"})
            continue
        measured, error, _ = run_child(["--child-loss", str(n), "--micro", str(args.micro), *override_args],
                                       deadline - time.perf_counter())
        if measured is not None:
            lift_run_info(result, measured)
        loss_only.append(measured or {"batch": n, "error": error})
    result["sigmoid_chunked"] = {
        "note": "siglip_loss_chunked is the ring's arithmetic in one process (for checking the ring): it keeps "
                "every block for backward, so it saves no memory; loss_only measures it against the full loss on "
                "random embeddings (forward + backward of the loss alone, num_chunks = batch / micro). What a "
                "recipe selects to save memory is the term's chunk_size (paths *_chunked).",
        "loss_only": loss_only,
    }
    measured_loss = [m for m in loss_only if "full" in m]
    if measured_loss:
        m = measured_loss[-1]
        result["sigmoid_chunked"]["reading"] = (
            f"batch {m['batch']}, {m['num_chunks']} chunks: loss forward + backward took "
            f"{m['full']['increment_mib']} MiB full vs {m['chunked']['increment_mib']} MiB chunked "
            f"(one N x N fp32 matrix is {m['batch'] ** 2 * 4 / MIB:.1f} MiB)")

    # 2. the training steps, batch by batch across the paths, so a short budget trims the largest
    #    batches of every path rather than a whole path
    per_path: dict[str, dict] = {
        p: {"recipe": PATHS[p]["recipe"], "description": PATHS[p]["description"], "results": [], "skipped": []}
        for p in paths
    }
    stopped: dict[str, str] = {}  # path -> why its larger batches are skipped
    for n in batches:
        for p in paths:
            entry = per_path[p]
            if p in stopped:
                entry["skipped"].append({"batch": n, "reason": stopped[p]})
                continue
            remaining = deadline - time.perf_counter()
            done = entry["results"]
            if done:  # time grows about linearly with the batch: scale the previous configuration's time
                estimate = done[-1]["wall_s"] * n / done[-1]["batch"]
                if estimate > remaining:
                    stopped[p] = (f"batch {done[-1]['batch']} took {done[-1]['wall_s']:.0f} s; batch {n} would "
                                  f"take ~{estimate:.0f} s, more than the {max(remaining, 0):.0f} s left of --max-seconds")
                    entry["skipped"].append({"batch": n, "reason": stopped[p]})
                    continue
            child_args = ["--child", p, str(n), "--micro", str(args.micro), "--steps", str(args.steps), *override_args]
            measured, error, wall = run_child(child_args, remaining)
            if measured is None:
                stopped[p] = f"batch {n}: {error}"
                entry["skipped"].append({"batch": n, "reason": stopped[p]})
                continue
            lift_run_info(result, measured)
            measured["wall_s"] = round(wall, 1)
            done.append(measured)
    result["paths"] = per_path

    embed_dim = (result["model"] or {}).get("embed_dim", 0)
    result["analytic"] = {
        str(n): {
            "logits_nxn_bytes": n * n * 4,  # one fp32 N x N logits matrix
            "logits_nxn_mib": round(n * n * 4 / MIB, 2),
            # what GradCache keeps for all N samples: image + text embeddings and their cached gradients
            "embeddings_and_grads_mib": round(4 * n * embed_dim * 4 / MIB, 2),
        }
        for n in batches
    }
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
