"""Step time of the method recipes relative to plain CLIP on the same model, batch and machine.

    python bench/method_step.py [--rounds 5] [--steps 3] [--batch 64] [--threads 2] [--only alip,slip]

Each recipe's training step (``clipforge.demo.StepTimer``: the trainer's step module, loss,
optimiser and after-step hook) is timed in interleaved rounds (A B C A B C ...); the JSON gives
the median seconds per step of each and the ratio to plain CLIP. Every side runs the same
64 px ViT (tiny-shapes at 64 px, patch 8, as ``aclip-shapes`` and ``filip-shapes``).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from clipforge.config import load_recipe
from clipforge.demo import StepTimer

AT_64 = ["model.image_size=64", "model.patch_size=8"]
SIDES = {
    "clip": ("tiny-shapes", AT_64),
    "flip_random_50": ("tiny-shapes", AT_64 + ["model.patch_dropout=0.5"]),
    "clip_attentive_50": ("tiny-shapes", AT_64 + ["model.patch_dropout=0.5", "model.token_selection=attentive"]),
    "aclip": ("aclip-shapes", []),
    "aclip_random_50": ("aclip-shapes", ["model.token_selection=random"]),
    "filip": ("filip-shapes", []),
    # issue 11 (caption- and view-centric methods), on the same 64 px ViT
    "dreamlip": ("dreamlip-shapes", AT_64),
    "alip": ("alip-shapes", AT_64),
    "slip": ("slip-cifar", AT_64 + ["data.train=shapes"]),
    "clip_strong_eda_ls": ("tiny-shapes", AT_64 + ["data.augment.policy=strong", "data.text_augment=eda",
                                                   "objective.terms.0.label_smoothing=0.1"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", default=None, help="comma-separated sides (clip is always timed): e.g. alip,slip")
    args = parser.parse_args()
    sides = SIDES if args.only is None else {k: v for k, v in SIDES.items() if k == "clip" or k in args.only.split(",")}
    common = [f"data.batch_size={args.batch}", f"train.threads={args.threads}", "data.tokenizer.corpus_size=2000"]
    timers = {name: StepTimer(load_recipe(recipe, overrides + common)) for name, (recipe, overrides) in sides.items()}
    for timer in timers.values():
        timer.seconds(2)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, timer in timers.items():  # interleaved: machine noise hits every side alike
            samples[name] += timer.seconds(args.steps)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    print(json.dumps({
        "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps,
        "seconds_per_step": {k: round(v, 4) for k, v in medians.items()},
        "spread": {k: [round(min(v), 4), round(max(v), 4)] for k, v in samples.items()},
        "relative_to_clip": {k: round(v / medians["clip"], 3) for k, v in medians.items()},
        "img_per_s": {k: round(args.batch / v, 1) for k, v in medians.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
