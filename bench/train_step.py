"""Training throughput of clipforge's CLIP vs OpenCLIP on the same architecture, batch and machine.

A train step = forward + symmetric CLIP loss + backward + AdamW step (+ logit-scale clamp).
Both models are built from the same shapes with random weights (no download), run in one process,
interleaved (A B, B A, A B, ...) so that load from other processes hits both sides alike.
Prints one JSON object: medians and spread of img/s per side, and the ratio ours / openclip.

    .venv/bin/python bench/train_step.py                 # defaults below (fp32, batch 128)
    .venv/bin/python bench/train_step.py --rounds 10 --steps 3
    .venv/bin/python bench/train_step.py --profile       # plus a torch.profiler breakdown per side
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from clipforge.config import ModelConfig
from clipforge.models.clip import CLIP

# The benchmark architecture (small enough for a 2-core CPU).
SHAPES = dict(
    image_size=64, patch_size=8, vision_width=192, vision_layers=6, vision_heads=3, mlp_ratio=4.0,
    context_length=32, text_width=128, text_layers=4, text_heads=2, vocab_size=49408, embed_dim=128,
)


def our_clip_loss():
    """The objectives module's CLIP loss when it exists, else a plain symmetric cross-entropy."""
    try:
        from clipforge.objectives import clip_loss  # type: ignore[attr-defined]

        return clip_loss, "clipforge.objectives.clip_loss"
    except ImportError:
        pass
    try:
        from clipforge.objectives.clip import clip_loss  # type: ignore[no-redef]

        return clip_loss, "clipforge.objectives.clip.clip_loss"
    except ImportError:
        pass

    def plain_clip_loss(image_embeds, text_embeds, logit_scale):
        logits = logit_scale * image_embeds @ text_embeds.t()  # N×N, row i = image i vs all texts
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))

    return plain_clip_loss, "plain symmetric cross-entropy (bench-local)"


def make_adamw(params, lr: float, kind: str) -> torch.optim.AdamW:
    """The same AdamW for both sides: foreach (default) or the fused kernel."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.2, **{kind: True})


def build_ours(cfg: ModelConfig, lr: float, optimizer: str = "foreach"):
    model = CLIP(cfg).train()
    opt = make_adamw(model.parameters(), lr, optimizer)
    loss_fn, loss_name = our_clip_loss()

    def step(batch):
        out = model(batch["images_uint8"], batch["input_ids"], batch["attention_mask"])
        loss = loss_fn(out["image_embeds"], out["text_embeds"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.clamp_logit_scale_()
        return loss

    return model, step, loss_name


def build_openclip(cfg: ModelConfig, lr: float, optimizer: str = "foreach"):
    import open_clip
    from open_clip.loss import ClipLoss

    vision_cfg = dict(
        image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width, layers=cfg.vision_layers,
        head_width=cfg.vision_width // cfg.vision_heads, mlp_ratio=cfg.mlp_ratio,
    )
    text_cfg = dict(
        context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
        heads=cfg.text_heads, layers=cfg.text_layers, mlp_ratio=cfg.mlp_ratio,
    )
    model = open_clip.model.CLIP(cfg.embed_dim, vision_cfg, text_cfg).train()
    opt = make_adamw(model.parameters(), lr, optimizer)
    loss_fn = ClipLoss()

    def step(batch):
        image_features, text_features, logit_scale = model(batch["images_float"], batch["openclip_ids"])
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss

    return model, step, open_clip.__version__


def make_batch(cfg: ModelConfig, batch_size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g)
    mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    lengths = torch.randint(4, cfg.context_length + 1, (batch_size,), generator=g)
    positions = torch.arange(cfg.context_length)
    attention_mask = (positions < lengths[:, None]).long()  # right padding
    input_ids = torch.randint(1, cfg.vocab_size - 1, (batch_size, cfg.context_length), generator=g) * attention_mask
    # OpenCLIP pools at argmax(token id): put the highest id at the end-of-text position
    openclip_ids = input_ids.clone()
    openclip_ids[torch.arange(batch_size), lengths - 1] = cfg.vocab_size - 1
    return {
        "images_uint8": images,  # ours normalises inside the model (as in training)
        "images_float": (images.float() / 255 - mean) / std,  # OpenCLIP gets normalised floats
        "input_ids": openclip_ids,
        "attention_mask": attention_mask,
        "openclip_ids": openclip_ids,
    }


def train_flops_per_step(step, batch) -> float:
    """FLOPs of one train step counted by torch's FlopCounterMode (matmuls, convs, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    return float(counter.get_total_flops())


def time_steps(step, batch, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    return time.perf_counter() - start


def summarise(values: list[float]) -> dict:
    median, low, high = statistics.median(values), min(values), max(values)
    return {
        "median": round(median, 2),
        "min": round(low, 2),
        "max": round(high, 2),
        "spread_pct": round(100 * (high - low) / median, 1),  # (max - min) / median
        "rounds": [round(v, 2) for v in values],  # in measurement order
    }


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


def profile_breakdown(step, batch, steps: int = 2) -> dict:
    """Self CPU time per op category, in ms per step and % of the step (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(batch)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per side (interleaved)")
    parser.add_argument("--steps", type=int, default=3, help="train steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown per side")
    parser.add_argument("--optimizer", choices=["foreach", "fused"], default="foreach", help="AdamW kernel, both sides")
    parser.add_argument("--no-openclip", action="store_true", help="time only our model")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPES)
    batch = make_batch(cfg, args.batch)
    lr = 1e-4

    ours_model, ours_step, loss_name = build_ours(cfg, lr, args.optimizer)
    sides = {"clipforge": ours_step}
    result: dict = {
        "bench": "train_step",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "dtype": "fp32",
        "optimizer": f"torch.optim.AdamW({args.optimizer}=True)",
        "batch": args.batch,
        "shapes": SHAPES,
        "our_loss": loss_name,
        "params": {"clipforge": ours_model.num_params()},
    }
    if not args.no_openclip:
        oc_model, oc_step, oc_version = build_openclip(cfg, lr, args.optimizer)
        sides["openclip"] = oc_step
        result["openclip_version"] = oc_version
        result["params"]["openclip"] = sum(p.numel() for p in oc_model.parameters())

    for name, step in sides.items():
        for _ in range(args.warmup):
            step(batch)
    flops = train_flops_per_step(ours_step, batch)

    img_per_s: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:  # A B, B A, ... cancels slow drifts
            seconds = time_steps(sides[name], batch, args.steps)
            img_per_s[name].append(args.batch * args.steps / seconds)

    result["img_per_s"] = {name: summarise(v) for name, v in img_per_s.items()}
    ours_median = statistics.median(img_per_s["clipforge"])
    result["train_gflop_per_step"] = round(flops / 1e9, 1)
    result["achieved_gflop_per_s"] = {
        name: round(statistics.median(v) / args.batch * flops / 1e9, 1) for name, v in img_per_s.items()
    }
    if "openclip" in sides:
        # Headline: the median over rounds of ours / openclip measured back to back in that round.
        # Load from other processes changes between rounds far more than within one, so adjacent
        # pairs are compared; the ratio of the two overall medians is reported alongside.
        per_round = [a / b for a, b in zip(img_per_s["clipforge"], img_per_s["openclip"])]
        result["ratio_ours_over_openclip"] = round(statistics.median(per_round), 3)
        result["ratio_per_round"] = summarise(per_round)
        result["ratio_of_medians"] = round(ours_median / statistics.median(img_per_s["openclip"]), 3)
    if args.profile:
        result["profile"] = {name: profile_breakdown(step, batch) for name, step in sides.items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
