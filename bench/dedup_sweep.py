"""SemDeDup against planted duplicates: per eps, what is kept (prints JSON; docs/data-centric.md).

    python bench/dedup_sweep.py TEACHER_CACHE DUPS_JSON --eps 0.001 0.005 0.01 0.02 0.05 [--clusters K] [--seed 0]

DUPS_JSON lists the planted groups (original first, then its augmented copies), as written by
``bench/datacentric_data.py cifar-dups``; every key of the cache outside a group is a distinct image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from clipforge.data.dedup import read_teacher_cache, semdedup


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache", type=Path)
    parser.add_argument("dups", type=Path)
    parser.add_argument("--eps", type=float, nargs="+", default=[0.001, 0.005, 0.01, 0.02, 0.05])
    parser.add_argument("--clusters", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    emb = read_teacher_cache(args.cache)
    row = {k: i for i, k in enumerate(emb.keys)}
    groups = [[row[k] for k in g if k in row] for g in json.loads(args.dups.read_text())]
    in_group = {i for g in groups for i in g}
    singles = np.array([i for i in range(len(emb.keys)) if i not in in_group])
    out = []
    for eps in args.eps:
        r = semdedup(emb.images, eps, args.clusters, args.seed)
        kept_per_group = np.array([r.keep[g].sum() for g in groups])
        out.append({"eps": eps, "kept": r.stats["kept"], "kept_fraction": round(r.stats["kept_fraction"], 4),
                    "groups": len(groups), "groups_kept_exactly_one": int((kept_per_group == 1).sum()),
                    "groups_kept_none": int((kept_per_group == 0).sum()),
                    "groups_kept_several": int((kept_per_group > 1).sum()),
                    "distinct_images": len(singles), "distinct_images_removed": int((~r.keep[singles]).sum()),
                    "clusters": r.stats["clusters"], "dedup_seconds": r.stats["dedup_seconds"],
                    "kmeans_seconds": r.stats["kmeans_seconds"]})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
