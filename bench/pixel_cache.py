"""A model-free "teacher cache" of a source: each image as its 8 x 8 RGB thumbnail, mean-centred,
unit norm (a near-duplicate baseline for ``clipforge data dedup --model CACHE``; prints JSON).

    python bench/pixel_cache.py jsonl:pairs.jsonl OUT_DIR [--side 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch.nn.functional as F

from clipforge.config import DataConfig
from clipforge.data.pipeline import decode_raw, source_samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out", type=Path)
    parser.add_argument("--side", type=int, default=8)
    args = parser.parse_args()
    keys, rows = [], []
    for raw in source_samples(DataConfig(train=args.data)):
        out = decode_raw(raw, 32, None, None)
        if isinstance(out, str):
            continue
        thumb = F.adaptive_avg_pool2d(out[0].float()[None], args.side)[0].flatten().numpy()
        rows.append(thumb - thumb.mean())
        keys.append(raw.key)
    x = np.stack(rows).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "image_embeds.npy", x)
    (args.out / "keys.json").write_text(json.dumps(keys))
    (args.out / "manifest.json").write_text(json.dumps({"data": args.data, "samples": len(keys),
                                                        "embedding": f"{args.side}x{args.side} RGB thumbnail"}))
    print(json.dumps({"samples": len(keys), "dim": int(x.shape[1])}))


if __name__ == "__main__":
    main()
