"""BarLIP at the end of a run: the global pair's per-dimension image-text correlation and the Barlow Twins
loss's two parts, on one training batch (train-mode BatchNorm, as in training).

    python bench/barlip_correlation.py runs/slip/barlip-s0 [more runs ...]

Prints per run: mean C_kk, the diagonal part scale * sum (C_kk - 1)^2, the off-diagonal part
scale * lambda * sum_{k != l} C_kl^2, and how many distinct captions the batch holds
(docs/methods/noncontrastive-lip.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from clipforge.config import load_recipe
from clipforge.data.pipeline import build_source_train_loader
from clipforge.methods.noncontrastive_lip import barlow_twins_loss
from clipforge.models.tokenizer import tokenizer_for_recipe
from clipforge.train.trainer import build_step


def main(runs: list[str]) -> None:
    for run in runs:
        recipe = load_recipe(f"{run}/recipe.toml")
        ckpt = Path(run) / "checkpoints" / "latest"
        torch.manual_seed(0)
        step = build_step(recipe, torch.device("cpu"), resume_from=ckpt, log=False)
        step.load_state_dict(load_file(ckpt / "method.safetensors"), strict=False)  # the heads
        step.train()
        batch = next(build_source_train_loader(recipe.data, recipe.model.image_size, tokenizer_for_recipe(recipe)))
        with torch.no_grad():
            heads = step(batch)["heads"]
        image, text = heads["image"][0], heads["text"][0]  # the global pair
        cfg = step.cfg
        c = image.T @ text / image.shape[0]
        diagonal = torch.diagonal(c)
        on = cfg.loss_scale * (diagonal - 1).pow(2).sum()
        total = barlow_twins_loss(image, text, cfg.redundancy_weight, cfg.loss_scale)
        print(f"{run}: mean C_kk {diagonal.mean():.3f}  diagonal part {on:.2f}  off-diagonal part {total - on:.2f}  "
              f"distinct captions {len(set(batch['captions']))} of {len(batch['captions'])}")


if __name__ == "__main__":
    main(sys.argv[1:])
