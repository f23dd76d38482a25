"""``clipforge bench``: how fast the trainer's own step runs a recipe on this machine.

What is timed is ``clipforge.train.trainer.StepRunner``, the object ``clipforge train`` steps
with: the recipe's step module (model, objective, teachers), its accumulation mode and
precision, gradient clipping, fused AdamW and the after-step hook. The batch is the recipe's
real first training batch, kept on the host and copied to the device every step (as in
training). Reported, as one JSON object:

- ``img_per_s``: median and spread over timed rounds (a round = ``steps`` optimiser steps,
  one device synchronisation at its end);
- ``flops_per_sample``: counted by ``torch.utils.flop_counter.FlopCounterMode`` on one eager
  training pass (matmuls, convolutions, attention), divided by the global batch;
- ``achieved_tflops`` and ``mfu``: against the device's peak for the precision — a table of
  dense peaks for known GPUs, or a matmul ceiling measured in the same run on CPUs (no table
  fits a shared CPU);
- ``peak_memory_gb``: CUDA peak allocated, or the process's peak RSS on CPU;
- ``loader``: img/s of the recipe's data loader alone (start-up reported apart);
- with ``against="openclip"``: the same architecture and batch in OpenCLIP (when installed),
  timed in interleaved rounds (A B, B A, ...) with per-round ratios, so that load from other
  processes hits both sides alike.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from clipforge.config import Recipe

# Dense (no sparsity) peak TFLOP/s per precision; the first name contained in the device name wins.
GPU_PEAKS_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5 / HBM3
    ("B200", {"bf16": 2250.0, "tf32": 1100.0, "fp32": 80.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
]


class BenchError(ValueError):
    """The benchmark cannot run as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------- small measurements
def summarise(values: list[float]) -> dict[str, Any]:
    median = statistics.median(values)
    return {
        "median": round(median, 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "spread_pct": round(100 * (max(values) - min(values)) / median, 1) if median else 0.0,
        "rounds": [round(v, 3) for v in values],  # in measurement order
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ms_per_call(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Wall-clock milliseconds per call of ``fn``, over ``calls`` calls (the device's queue drained
    before and after): the bench/ scripts' unit of timing."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3 / calls


def print_json(result: dict[str, Any], out: str | None, indent: int | None = None) -> None:
    """A bench script's result: printed as JSON, and written to ``out`` too when given."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def precision_name(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.bfloat16:
        return "bf16"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """Best TFLOP/s of a square matmul of ``dtype`` on ``device`` (the achievable ceiling here)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats + 1):  # the first call warms up
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def peak_tflops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it comes from) for MFU; CPUs get a matmul measured now."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAKS_TFLOPS:
            if key in name:
                return peaks[precision], f"table: {key} dense {precision}"
        return None, f"no peak known for {name!r}: MFU left out (achieved TFLOP/s is reported)"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measured_matmul_tflops(device, dtype), f"measured: best 1024x1024 {precision} matmul on this CPU"


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _cpu_attention_formulas() -> dict:
    """FlopCounterMode counts the CUDA attention kernels but not the CPU flash kernel: count it the
    same way (2 bmm forward; 5 in backward, the scores being recomputed)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}

    def forward(query, key, value, *args, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def count_flops(run: Callable[[], Any]) -> float:
    """FLOPs of ``run()`` as torch's FlopCounterMode counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
    with counter:
        run()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- the two sides
@dataclass
class Side:
    """One thing timed: ``step()`` runs one optimiser step (asynchronously on CUDA)."""

    name: str
    step: Callable[[], Any]
    samples_per_step: int
    flops_per_step: float
    params: int


def load_bench_recipe(recipe: str | Recipe, overrides: list[str], *, device: str | None, precision: str | None,
                      compile: bool | None, batch: int | None) -> Recipe:
    from clipforge.config import load_recipe

    extra = list(overrides)
    if device is not None:
        extra.append(f"train.device={device}")
    if precision is not None:
        extra.append(f"train.precision={precision}")
    if compile is not None:
        extra.append(f"train.compile={str(compile).lower()}")
    if batch is not None:
        extra.append(f"data.batch_size={batch}")
    if isinstance(recipe, Recipe):
        from clipforge.config import apply_override, parse_override, validate_recipe

        raw = recipe.model_dump(mode="json")
        for text in extra:
            apply_override(raw, *parse_override(text))
        return validate_recipe(raw)
    return load_recipe(recipe, extra)


def first_batch(recipe: Recipe, tokenizer) -> dict[str, Any]:
    """The recipe's first training batch (host memory), from its real data source."""
    from clipforge.data.loader import build_train_loader

    loader = build_train_loader(recipe.data.model_copy(update={"num_workers": 0}), recipe.model.image_size,
                                tokenizer)
    return next(loader)


def clipforge_side(recipe: Recipe, device: torch.device, count: bool = True) -> tuple[Side, Any]:
    """The trainer's step for ``recipe`` on ``device`` (single process); ``count``: count its FLOPs."""
    from clipforge.models.tokenizer import tokenizer_for_recipe
    from clipforge.train.distributed import sum_over_ranks
    from clipforge.train.trainer import StepRunner, seed_everything, snapshot_metrics

    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    seed_everything(recipe.train.seed)
    tokenizer = tokenizer_for_recipe(recipe)
    host_batch = first_batch(recipe, tokenizer)
    if device.type == "cuda":
        host_batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in host_batch.items()}
    micro = recipe.train.accum_steps

    flops = 0.0
    if count:
        # one training pass counted on an eager copy (FlopCounterMode does not see into compiled graphs),
        # without activation checkpointing: MFU counts the model's FLOPs, not their recomputation
        eager = recipe.model_copy(update={"train": recipe.train.model_copy(
            update={"compile": False, "grad_checkpointing": False})})
        counting = StepRunner(*_step_and_optimizer(eager, device), eager, device)
        flops = count_flops(lambda: counting.forward_backward([counting.to_device(host_batch)] * micro))
        del counting
        seed_everything(recipe.train.seed)
    step_module, optimizer = _step_and_optimizer(recipe, device)
    runner = StepRunner(step_module, optimizer, recipe, device)
    done = [0]

    def step() -> None:  # what one iteration of the training loop does, logging apart
        runner.set_lr(done[0])
        loss, metrics, grad_norm = runner.forward_backward([runner.to_device(host_batch) for _ in range(micro)])
        done[0] += 1
        if runner.sync_free:  # applied or skipped on the device, nothing read on the host
            snapshot_metrics(loss, metrics)  # what the loop keeps for its next read (every 10 steps)
            runner.apply_unless_bad(loss, grad_norm, done[0])
        else:  # the loop reads the step's numbers on the host before deciding
            sum_over_ranks([loss, grad_norm, *metrics.values()], runner.ctx, device)
            runner.apply(done[0])

    params = sum(p.numel() for p in step_module.model.parameters())
    side = Side("clipforge", step, recipe.data.batch_size * micro, flops, params)
    return side, host_batch


def _step_and_optimizer(recipe: Recipe, device: torch.device):
    from clipforge.train.params import freeze_parameters
    from clipforge.train.trainer import build_optimizer, build_step

    step_module = build_step(recipe, device, log=False).train()
    freeze_parameters(step_module, recipe.optim.groups)
    return step_module, build_optimizer(step_module, recipe)


def openclip_side(recipe: Recipe, device: torch.device, host_batch: dict[str, Any]) -> Side:
    """The same architecture, batch, optimiser and precision in OpenCLIP (its model and loss)."""
    from clipforge.export import openclip_vision_cfg

    try:
        import open_clip
        from open_clip.loss import ClipLoss, SigLipLoss
    except ImportError:
        raise BenchError("--against openclip needs OpenCLIP: pip install 'clipforge[bench]' (open_clip_torch)") from None
    m, r = recipe.model, recipe
    terms = [t.name for t in r.objective.terms]
    if r.method.name != "clip" or r.teachers or terms not in (["clip"], ["siglip"]) or r.train.accum_mode != "plain":
        raise BenchError(
            "--against openclip compares plain CLIP / SigLIP steps; this recipe has "
            f"method={r.method.name!r}, terms={terms}, teachers={len(r.teachers)}, accum_mode={r.train.accum_mode!r}"
        )
    if not m.uniform_layers():
        raise BenchError("--against openclip: OpenCLIP has one head count and MLP width per tower; this model's "
                         "layers differ (model.*_layer_heads / *_layer_mlp / *_head_dim)")
    if m.token_selection != "random":
        raise BenchError("--against openclip: OpenCLIP has no attentive token selection; use token_selection=random")
    vision_cfg = openclip_vision_cfg(m)  # what `clipforge export --to openclip` writes (ViT, ResNet or timm)
    if m.image_tower == "vit":
        vision_cfg["pool_type"] = "tok" if m.vision_pool == "cls" else "avg"
    text_cfg = dict(context_length=m.context_length, vocab_size=m.vocab_size, width=m.text_width, heads=m.text_heads,
                    layers=m.text_layers, mlp_ratio=m.mlp_ratio)
    sigmoid = terms == ["siglip"]
    torch.manual_seed(r.train.seed)
    model = open_clip.model.CLIP(m.embed_dim, vision_cfg, text_cfg,
                                 init_logit_bias=m.logit_bias_init if sigmoid else None,
                                 output_dict=True).to(device).train()
    model.set_grad_checkpointing(r.train.grad_checkpointing)  # OpenCLIP's --grad-checkpointing
    if r.train.compile:
        model.compile(mode=r.train.compile_mode)
    loss_fn = SigLipLoss() if sigmoid else ClipLoss()
    o = r.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                  fused=True)
    dtype = torch.bfloat16 if r.train.precision == "bf16" or (
        r.train.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()) else torch.float32
    mean = torch.tensor(m.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(m.image_std, device=device).view(1, 3, 1, 1)
    # OpenCLIP pools text at argmax(token id): give the end-of-text position the highest id, full context
    ids = torch.zeros(host_batch["input_ids"].shape[0], m.context_length, dtype=torch.long)
    ids[:, : host_batch["input_ids"].shape[1]] = host_batch["input_ids"]
    eot = host_batch["attention_mask"].sum(1).clamp(min=1) - 1
    ids[torch.arange(ids.shape[0]), eot] = m.vocab_size - 1
    images_host = host_batch["images"]
    if device.type == "cuda":
        ids, images_host = ids.pin_memory(), images_host.pin_memory()

    # train.attention_backend applies to OpenCLIP's attention too (nn.MultiheadAttention calls SDPA)
    from torch.nn.attention import sdpa_kernel

    from clipforge.models.vit import attention_kernels

    kernels = attention_kernels(r.train.attention_backend)

    def train_pass():
        images = images_host.to(device, non_blocking=True)
        images = (images.float() / 255 - mean) / std  # OpenCLIP's loaders hand over normalised floats
        with (torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
              sdpa_kernel(kernels) if kernels else contextlib.nullcontext()):
            out = model(images, ids.to(device, non_blocking=True))
            if sigmoid:
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
            else:
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        return loss

    def step():
        train_pass()
        if o.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(m.logit_scale_max))

    flops = 0.0
    if not r.train.compile:
        flops = count_flops(train_pass)
        optimizer.zero_grad(set_to_none=True)
    params = sum(p.numel() for p in model.parameters())
    return Side(f"openclip {open_clip.__version__}", step, images_host.shape[0], flops, params)


# ----------------------------------------------------------------------------- where the time goes
# profiler op name -> category; the first matching rule wins (ancestors are checked first for
# "optimizer" and "embedding backward", so their elementwise ops are not counted as model ops)
CATEGORY_RULES = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")),
    ("attention (SDPA)", ("aten::_scaled_dot_product", "aten::_flash_attention")),
    ("softmax / loss", ("aten::_softmax", "aten::_log_softmax", "aten::nll_loss", "aten::cross_entropy")),
    ("layernorm", ("aten::native_layer_norm",)),
    ("gelu", ("aten::gelu",)),
    ("patch-embed conv", ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution")),
    ("copies (copy_/clone/cat/stack)", ("aten::copy_", "aten::clone", "aten::cat", "aten::stack", "aten::contiguous")),
    ("reductions (bias grads, sums)", ("aten::sum", "aten::mean")),
    ("zero fills", ("aten::fill_", "aten::zero_", "aten::zeros")),
    ("elementwise (add/mul/div/...)", ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::exp", "aten::neg")),
]


def categorise(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "optimizer (AdamW)"
        if parent.name == "aten::embedding_dense_backward" or parent.name == "aten::embedding_backward":
            return "embedding backward (49k vocab)"
        parent = parent.cpu_parent
    if event.name in ("aten::embedding_dense_backward", "aten::embedding_backward"):
        return "embedding backward (49k vocab)"
    for category, prefixes in CATEGORY_RULES:
        if event.name.startswith(prefixes):
            return category
    return "other"


def profile_breakdown(step: Callable[[], Any], steps: int = 2) -> dict:
    """Self CPU time per op category, in ms per step and % of the step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        key = categorise(event)
        totals[key] = totals.get(key, 0.0) + event.self_cpu_time_total / 1e3 / steps
    whole = sum(totals.values())
    return {
        "step_ms_under_profiler": round(whole, 1),
        "categories": {
            k: {"ms": round(v, 1), "pct": round(100 * v / whole, 1)}
            for k, v in sorted(totals.items(), key=lambda kv: -kv[1])
        },
    }


# CUDA kernel name -> category; the first matching rule wins
KERNEL_RULES = [
    ("attention (flash / fused SDPA)", ("flash", "fmha", "attention", "sdpa")),
    ("matmul (GEMM)", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_")),
    ("optimizer (fused AdamW)", ("adam",)),
    ("compiled fused kernels (triton)", ("triton",)),
    ("layernorm", ("layer_norm", "layernorm")),
    ("gelu", ("gelu",)),
    ("softmax / cross-entropy", ("softmax", "nll_loss", "cross_entropy")),
    ("reductions", ("reduce",)),
    ("copies / casts", ("copy", "cast", "convert", "cat", "memcpy")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def cuda_kernel_breakdown(step: Callable[[], Any], device: torch.device, steps: int = 3) -> dict:
    """GPU time per kernel category in ms per step, and how busy the GPU was (kernel time / wall)."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    totals: dict[str, float] = {}
    top: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name.lower()
        key = next((cat for cat, words in KERNEL_RULES if any(w in name for w in words)), "other")
        ms = event.device_time_total / 1e3 / steps
        totals[key] = totals.get(key, 0.0) + ms
        top[event.name[:90]] = top.get(event.name[:90], 0.0) + ms
    busy = sum(totals.values())
    return {
        "wall_ms_per_step_under_profiler": round(wall_ms, 1),
        "gpu_kernel_ms_per_step": round(busy, 1),
        "gpu_busy_pct": round(100 * busy / wall_ms, 1),
        "categories": {k: {"ms": round(v, 2), "pct": round(100 * v / busy, 1)}
                       for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": {k: round(v, 2) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]},
    }


# ----------------------------------------------------------------------------- timing
def time_rounds(sides: list[Side], device: torch.device, rounds: int, steps: int) -> dict[str, list[float]]:
    """img/s per round per side, interleaved A B, B A, ... (one device sync per round)."""
    per_side: dict[str, list[float]] = {s.name: [] for s in sides}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                side.step()
            synchronize(device)
            per_side[side.name].append(side.samples_per_step * steps / (time.perf_counter() - start))
    return per_side


def loader_throughput(recipe: Recipe, batches: int) -> dict[str, float]:
    """img/s of the recipe's own data loader alone (workers as in the recipe)."""
    from clipforge.data.loader import build_train_loader
    from clipforge.models.tokenizer import tokenizer_for_recipe

    tokenizer = tokenizer_for_recipe(recipe)
    start = time.perf_counter()
    loader = build_train_loader(recipe.data, recipe.model.image_size, tokenizer)
    next(loader)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - start
    del loader
    return {"img_per_s": round(recipe.data.batch_size * batches / seconds, 1), "startup_s": round(startup, 2),
            "batches": batches, "workers": recipe.data.num_workers}


def run_bench(recipe: str | Recipe, overrides: list[str] | None = None, *, device: str | None = None,
              precision: str | None = None, compile: bool | None = None, batch: int | None = None,
              steps: int = 5, rounds: int = 5, warmup: int = 3, against: str | None = None,
              loader_batches: int = 10, profile: bool = False) -> dict[str, Any]:
    """Benchmark ``recipe`` (a name, path or Recipe); returns the JSON-ready result."""
    from clipforge.train.trainer import resolve_device, resolve_precision

    r = load_bench_recipe(recipe, overrides or [], device=device, precision=precision, compile=compile, batch=batch)
    if r.train.accum_mode == "gradcache" and against:
        raise BenchError("--against openclip compares plain steps; drop train.accum_mode=gradcache")
    dev = resolve_device(r)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the trainer's fp32 on CUDA (see docs/performance.md)
        torch.backends.cudnn.allow_tf32 = True
    dtype = resolve_precision(r, dev)
    prec = precision_name(dtype, dev)
    result: dict[str, Any] = {
        "bench": "clipforge bench", "recipe": r.name, "device": _device_name(dev), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "precision": prec, "compile": r.train.compile,
        "compile_mode": r.train.compile_mode, "bf16_residual": r.train.bf16_residual,
        "fused_mlp": r.train.fused_mlp, "grad_checkpointing": r.train.grad_checkpointing,
        "attention_backend": r.train.attention_backend,
        "global_batch": r.data.batch_size * r.train.accum_steps, "accum_mode": r.train.accum_mode,
        "patch_dropout": r.model.patch_dropout, "steps_per_round": steps, "rounds": rounds,
    }
    ours, host_batch = clipforge_side(r, dev)
    sides = [ours]
    if against == "openclip":
        sides.append(openclip_side(r, dev, host_batch))
    elif against is not None:
        raise BenchError(f"--against {against!r}: only 'openclip' is supported")
    compile_s = {}
    for side in sides:  # warm-up (and compilation) per side, before any timing
        synchronize(dev)
        start = time.perf_counter()
        for _ in range(warmup):
            side.step()
        synchronize(dev)
        compile_s[side.name] = round(time.perf_counter() - start, 2)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    per_side = time_rounds(sides, dev, rounds, steps)
    peak, peak_source = peak_tflops(dev, prec)
    result["peak_tflops"] = peak and round(peak, 2)
    result["peak_source"] = peak_source
    result["sides"] = {}
    for side in sides:
        median = statistics.median(per_side[side.name])
        flops_per_sample = side.flops_per_step / side.samples_per_step if side.flops_per_step else None
        achieved = median * flops_per_sample / 1e12 if flops_per_sample else None
        result["sides"][side.name] = {
            "img_per_s": summarise(per_side[side.name]),
            "params": side.params,
            "gflops_per_sample": flops_per_sample and round(flops_per_sample / 1e9, 3),
            "achieved_tflops": achieved and round(achieved, 3),
            "mfu": round(achieved / peak, 4) if achieved and peak else None,
            "warmup_s": compile_s[side.name],
        }
    result["peak_memory_gb"] = round(peak_memory_gb(dev), 3)
    result["peak_memory_note"] = ("CUDA peak allocated over the timed rounds, both sides" if dev.type == "cuda"
                                  else "peak RSS of this process (both sides, data included)")
    if len(sides) == 2:
        a, b = (per_side[s.name] for s in sides)
        per_round = [x / y for x, y in zip(a, b)]
        result["ratio_ours_over_openclip"] = round(statistics.median(per_round), 3)
        result["ratio_per_round"] = summarise(per_round)
        if sides[1].flops_per_step == 0 and ours.flops_per_step:
            result["note"] = "OpenCLIP FLOPs are not counted under compile; compare img/s"
        # options OpenCLIP has no counterpart for: say the ratio includes them
        only_ours = [f"train.{k}" for k in ("bf16_residual", "fused_mlp") if getattr(r.train, k)]
        if only_ours:
            result["ratio_note"] = (f"{' and '.join(only_ours)} apply to clipforge only (OpenCLIP keeps a float32 "
                                    "residual stream under autocast and runs its MLPs unfused)")
    if profile:  # CPU: self time per op category; CUDA: kernel time per category and GPU busy share
        result["profile"] = {}
        for side in sides:
            try:
                result["profile"][side.name] = (cuda_kernel_breakdown(side.step, dev) if dev.type == "cuda"
                                                else profile_breakdown(side.step))
            except Exception as e:  # the profiler varies between torch builds: keep the timings
                result["profile"][side.name] = {"error": f"{type(e).__name__}: {e}"}
    if loader_batches:
        result["loader"] = loader_throughput(r, loader_batches)
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(result: dict[str, Any]) -> str:
    """A few human lines for the terminal (the JSON has everything)."""
    lines = [f"{result['recipe']} on {result['device']}: {result['precision']}, global batch {result['global_batch']}, "
             f"compile={result['compile']}" + (", bf16 residual" if result.get("bf16_residual") else "")
             + (", fused MLP" if result.get("fused_mlp") else "")
             + (", grad checkpointing" if result.get("grad_checkpointing") else "")
             + (f", attention {result['attention_backend']}" if result.get("attention_backend", "auto") != "auto" else "")]
    for name, side in result["sides"].items():
        ips = side["img_per_s"]
        mfu = f"{100 * side['mfu']:.1f}%" if side["mfu"] is not None else "-"
        gf = f"{side['gflops_per_sample']:.2f}" if side["gflops_per_sample"] else "-"
        lines.append(f"  {name:<16} {ips['median']:>10.1f} img/s  (min {ips['min']:.1f}, max {ips['max']:.1f})  "
                     f"{gf} GFLOP/sample  MFU {mfu}")
    if "ratio_ours_over_openclip" in result:
        lines.append(f"  ratio clipforge / OpenCLIP: {result['ratio_ours_over_openclip']:.3f} (median of per-round ratios)")
        if "ratio_note" in result:
            lines.append(f"  ({result['ratio_note']})")
    lines.append(f"  peak memory {result['peak_memory_gb']:.2f} GB; peak {result['peak_tflops']} TFLOP/s "
                 f"({result['peak_source']})")
    if "loader" in result:
        lines.append(f"  data loader alone: {result['loader']['img_per_s']:.1f} img/s "
                     f"({result['loader']['workers']} workers, start-up {result['loader']['startup_s']} s)")
    return "\n".join(lines)
