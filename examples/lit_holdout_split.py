"""Split the emoji set by concept for the LiT/FLAME experiment (docs/methods/lit-flame.md).

    python examples/lit_holdout_split.py ../shared/data/emoji-noto-dev/captions.jsonl runs/lit-exp/split --seed 0

Concepts are the emoji subcategories ("animal-mammal", "food-fruit", ...). A seeded shuffle of them
is walked until at least ``--heldout-fraction`` of the rows are held out: those subcategories are
never trained on. Writes (image paths made absolute, so the files can live anywhere):

    train.jsonl     every row of the other subcategories (the training data)
    heldout.jsonl   every row of the held-out subcategories (text->image retrieval on unseen concepts)
    seen.jsonl      a seeded sample of train.jsonl as large as heldout.jsonl (retrieval on training concepts,
                    same gallery size, so the two R@1 are comparable)
    split.json      the seed and the held-out subcategories
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captions", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-fraction", type=float, default=0.2)
    args = parser.parse_args()

    rows = [json.loads(line) for line in args.captions.read_text().splitlines() if line.strip()]
    for row in rows:
        row["image"] = str((args.captions.parent / row["image"]).resolve())
    concepts = sorted({r["subcategory"] for r in rows})
    rng = random.Random(args.seed)
    rng.shuffle(concepts)
    heldout: set[str] = set()
    for concept in concepts:
        if sum(r["subcategory"] in heldout for r in rows) >= args.heldout_fraction * len(rows):
            break
        heldout.add(concept)
    train = [r for r in rows if r["subcategory"] not in heldout]
    unseen = [r for r in rows if r["subcategory"] in heldout]
    seen = rng.sample(train, len(unseen))

    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("heldout", unseen), ("seen", seen)):
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (args.out / "split.json").write_text(json.dumps({"seed": args.seed, "heldout_subcategories": sorted(heldout),
                                                     "rows": {"train": len(train), "heldout": len(unseen),
                                                              "seen": len(seen)}}, indent=2))
    print(f"train {len(train)} rows, held out {len(unseen)} rows in {len(heldout)} subcategories: "
          f"{', '.join(sorted(heldout))}")


if __name__ == "__main__":
    main()
