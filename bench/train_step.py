"""The model step of clipforge vs OpenCLIP on the tiny benchmark ViT (a thin caller of ``clipforge bench``).

The architecture below (64 px, patch 8, width 192, 6 layers; text width 128, 4 layers, context 32,
vocabulary 49,408), fp32, batch 128, on the shared CIFAR-10 captions when present (prepared by
``bench/trainer_e2e.py``), else the built-in shapes. Both sides run the same architecture, batch,
optimiser (fused AdamW) and clipping, interleaved A B, B A, ...; prints the JSON of ``clipforge bench``.

    .venv/bin/python bench/train_step.py                       # 8 rounds of 3 steps
    .venv/bin/python bench/train_step.py --compile --profile   # compiled, with a per-op breakdown
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipforge.bench import format_table, run_bench

SHAPES = dict(image_size=64, patch_size=8, vision_width=192, vision_layers=6, vision_heads=3, mlp_ratio=4.0,
              context_length=32, text_width=128, text_layers=4, text_heads=2, vocab_size=49408, embed_dim=128)
CIFAR = Path(__file__).resolve().parent / "out" / "cifar-5120.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    overrides = [f"model.{k}={v}" for k, v in SHAPES.items()] + [
        "data.tokenizer.vocab_size=49408", "data.num_workers=1", "optim.grad_clip=1.0"]
    if CIFAR.is_file():
        overrides.append(f"data.train=jsonl:{CIFAR}")
    result = run_bench("tiny-shapes", overrides, device="cpu", precision="fp32", compile=args.compile,
                       batch=args.batch, steps=args.steps, rounds=args.rounds, against="openclip",
                       loader_batches=5, profile=args.profile)
    print(format_table(result), flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
