"""Data-parallel training-step throughput: DDP or FSDP2, plain or GradCache accumulation.

Runs under torchrun (one process per GPU, NCCL; or gloo on CPU). A step = the trainer's step
without data loading: random uint8 images and token ids already on the device, forward, the
recipe's objective (gathered CLIP / ring SigLIP across ranks), backward, grad clip, AdamW.
Rank 0 prints one JSON object: step time (median over timed steps, the slowest rank's),
global and per-GPU img/s, peak memory per GPU.

    torchrun --standalone --nproc-per-node 8 bench/ddp_step.py --recipe clip-vit-b32 \\
        --set model.patch_size=16 --batch 256 --steps 20            # ViT-B/16, 256 per GPU
    torchrun --standalone --nproc-per-node 8 bench/ddp_step.py --recipe clip-vit-b32 \\
        --set model.patch_size=16 --batch 128 --accum 4 --accum-mode gradcache
    torchrun --standalone --nproc-per-node 2 bench/ddp_step.py --recipe tiny-shapes --batch 32   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="clip-vit-b32")
    p.add_argument("--set", action="append", default=[], dest="overrides", help="recipe override key=value")
    p.add_argument("--batch", type=int, default=None, help="per-GPU micro-batch [default: the recipe's]")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--accum-mode", choices=["plain", "gradcache"], default="plain")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()

    from clipforge.config import load_recipe
    from clipforge.train import distributed as D
    from clipforge.train.gradcache import gradcache_accumulation, plain_accumulation
    from clipforge.train.trainer import build_optimizer, build_step, resolve_device, resolve_precision, seed_everything

    overrides = list(args.overrides)
    if args.batch:
        overrides.append(f"data.batch_size={args.batch}")
    r = load_recipe(args.recipe, overrides)
    device = resolve_device(r)
    ctx = D.init_distributed(device.type, r.train.dist_backend, r.train.dist_timeout_minutes)
    device = D.device_for(ctx, device)
    seed_everything(r.train.seed)
    plain = build_step(r, device, log=ctx.is_main)  # the trainer's own step module (model, objective, teachers)
    model = D.wrap_model(plain, ctx, device, args.fsdp)
    optimizer = build_optimizer(model, r)
    dtype = resolve_precision(r, device)
    b, m = r.data.batch_size, r.model

    def random_micro_batch() -> dict:
        lengths = torch.randint(2, m.context_length + 1, (b,), device=device)
        return {
            "images": torch.randint(0, 256, (b, 3, m.image_size, m.image_size), dtype=torch.uint8, device=device),
            "input_ids": torch.randint(1, min(m.vocab_size, 1000), (b, m.context_length), device=device),
            "attention_mask": (torch.arange(m.context_length, device=device)[None] < lengths[:, None]).long(),
        }

    batches = [random_micro_batch() for _ in range(args.accum)]
    forward = model  # the step's passes, through the DDP/FSDP wrapper
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731

    def step() -> float:
        if args.accum_mode == "gradcache":
            loss, _ = gradcache_accumulation(model, plain.compute_loss, batches, forward, autocast, device)
        else:
            loss, _ = plain_accumulation(model, plain.compute_loss, batches, forward, autocast)
        D.average_replicated_grads(model, ctx, args.fsdp)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        plain.after_optimizer_step(1)
        return loss

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        D.barrier(ctx)
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    if ctx.enabled:  # the step is as slow as the slowest rank
        t = torch.tensor([median], device=device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        median = float(t)
    samples = b * args.accum * ctx.world_size
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if ctx.is_main:
        print(json.dumps({
            "recipe": args.recipe, "overrides": overrides, "world_size": ctx.world_size,
            "backend": ctx.backend, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "precision": str(dtype).removeprefix("torch."), "wrapper": "fsdp" if args.fsdp else ("ddp" if ctx.enabled else "none"),
            "micro_batch_per_gpu": b, "accum": args.accum, "accum_mode": args.accum_mode, "global_batch": samples,
            "step_s_median": median, "img_per_s": samples / median, "img_per_s_per_gpu": samples / median / ctx.world_size,
            "peak_mem_gib_per_gpu": peak, "torch": torch.__version__,
        }))
    D.shutdown(ctx)


if __name__ == "__main__":
    main()
