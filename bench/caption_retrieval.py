"""Text -> image retrieval on the shapes eval splits with short and with long queries; prints JSON.

    python bench/caption_retrieval.py RUN_DIR [RUN_DIR ...]

For each run (its ``checkpoints/latest``) and each split (``seen``: trained colour-shape pairs,
``unseen``: held-out pairs, i.e. unseen compositions), the split's single-object images are the gallery:

- short queries: each image's raw (templated) caption; a hit when the top image shows the same
  colour-shape pair (``short_class@1``) -- a short caption names little more than that;
- long queries: each image's long caption (one fact a sentence: shape, colour, size, position,
  background), cut to the model's context; ``long_class@1`` as above, and ``long_exact@1/@5``: the
  query's own image in the top 1 / 5 (size, position and background single it out among its class).

The eval images use the run's ``data.shapes`` (textured backgrounds too), seeded by ``holdout_seed``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import clipforge
from clipforge.config import load_recipe
from clipforge.data.captions import shapes_caption_lists
from clipforge.data.synthetic import ShapesDataset


@torch.no_grad()
def evaluate(run: Path) -> dict:
    model, _, tokenizer = clipforge.load(run / "checkpoints" / "latest")
    recipe = load_recipe(str(run / "recipe.toml"))
    out = {}
    for split in ("seen", "unseen"):
        ds = ShapesDataset(recipe.data.shapes, recipe.model.image_size, recipe.data.shapes.holdout_seed, split)
        indices = list(range(len(ds)))
        pixels, facts, labels = ds.render_scenes(indices)
        lists, _, _ = shapes_caption_lists(facts, indices, ds.seed, split, "raw+long", 0.0)
        images = torch.cat([model.encode_image(pixels[i:i + 256]) for i in range(0, len(indices), 256)])
        for name, col in (("short", 0), ("long", 1)):
            queries = [texts[col] for texts in lists]
            ids, mask = tokenizer(queries)
            texts = torch.cat([model.encode_text(ids[i:i + 256], mask[i:i + 256]) for i in range(0, len(ids), 256)])
            top = (texts @ images.T).topk(5, dim=1).indices
            out[f"{split}/{name}_class@1"] = float((labels[top[:, 0]] == labels).float().mean())
            if name == "long":
                own = torch.arange(len(indices))[:, None]
                out[f"{split}/long_exact@1"] = float((top[:, :1] == own).any(1).float().mean())
                out[f"{split}/long_exact@5"] = float((top == own).any(1).float().mean())
    return {k: round(v, 4) for k, v in out.items()}


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(json.dumps({str(r): evaluate(Path(r)) for r in sys.argv[1:]}, indent=1))
