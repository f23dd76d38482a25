"""LiT / FLAME training step img/s with and without the text-feature cache.

    python bench/lit_text_cache.py [--rounds 5] [--steps 3] [--batch 64] [--threads 2] [--out result.json]

Each side is the trainer's own optimiser step (``StepRunner``: the step module, loss, fused AdamW,
after-step hook) on the same model as ``lit-minilm-emoji`` (ViT 4 x 192 at 32 px, locked
all-MiniLM-L6-v2, embed 128) over a fixed set of shapes batches (captions from the built-in data,
so no files are needed). The cached sides are timed in steady state: their cache is filled by a
first pass over the same batches (what every epoch after the first sees). Sides are interleaved
(A B C D A B C D ...) so machine noise hits them alike; medians of seconds per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from clipforge.bench import print_json
from clipforge.config import load_recipe
from clipforge.data.loader import build_train_loader
from clipforge.models.tokenizer import tokenizer_for_recipe
from clipforge.train.trainer import StepRunner, build_optimizer, build_step, seed_everything

MODEL = ["model.image_size=32", "model.patch_size=8", "model.vision_width=192", "model.vision_layers=4",
         "model.vision_heads=3", "model.embed_dim=128", "model.context_length=32"]
FLAME = ["method.name=flame", "model.text_projection=mlp", "model.logit_bias_init=-10",
         "model.logit_scale_init=2.302585", 'objective.terms=[{name = "multi_sigmoid"}]']
SIDES = {
    "lit_cached": ["method.cache=true"],
    "lit_live": ["method.cache=false"],
    "flame_cached": FLAME + ["method.cache=true"],
    "flame_live": FLAME + ["method.cache=false"],
}


class Side:
    def __init__(self, overrides: list[str], batches: list[dict]):
        recipe = load_recipe("lit-minilm-shapes", MODEL + overrides)
        seed_everything(0)
        self.step = build_step(recipe, torch.device("cpu"), log=False)
        self.step.attach_run(None, 0, tokenizer_for_recipe(recipe))  # cache in memory: no disk in the timing
        self.runner = StepRunner(self.step, build_optimizer(self.step, recipe), recipe, torch.device("cpu"))
        self.batches, self.i = batches, 0
        self.step.train()

    def one(self) -> float:
        start = time.perf_counter()
        batch = self.runner.to_device(self.batches[self.i % len(self.batches)])
        self.runner.forward_backward([batch])
        self.runner.apply(self.i + 1)
        self.i += 1
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe = load_recipe("lit-minilm-shapes", MODEL + [f"data.batch_size={args.batch}", "data.num_workers=0"])
    loader = build_train_loader(recipe.data, recipe.model.image_size, tokenizer_for_recipe(recipe))
    batches = [next(loader) for _ in range(args.batches)]
    sides = {name: Side(overrides, batches) for name, overrides in SIDES.items()}
    for side in sides.values():  # warm-up; fills the caches with every batch's captions
        for _ in range(args.batches):
            side.one()
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            samples[name] += [side.one() for _ in range(args.steps)]
    medians = {name: statistics.median(v) for name, v in samples.items()}
    result = {
        "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps,
        "device": "cpu", "model": "ViT 4x192 @ 32 px + locked all-MiniLM-L6-v2 (FLAME: 3 facets, MLP adapter)",
        "seconds_per_step": {k: round(v, 4) for k, v in medians.items()},
        "spread": {k: [round(min(v), 4), round(max(v), 4)] for k, v in samples.items()},
        "img_per_s": {k: round(args.batch / v, 1) for k, v in medians.items()},
        "cache_speedup": {"lit": round(medians["lit_live"] / medians["lit_cached"], 2),
                          "flame": round(medians["flame_live"] / medians["flame_cached"], 2)},
        "cache_hits": {k: s.step.cache.hits for k, s in sides.items() if s.step.cache is not None},
    }
    print_json(result, args.out, indent=2)


if __name__ == "__main__":
    main()
