"""Split an image folder per class by sorted file name into train / val (symlinks, nothing copied).

    python examples/cifar_holdout_split.py CIFAR/train OUT --holdout 500

The last ``--holdout`` files of each class (sorted by name) go to OUT/val/<class>, the others to
OUT/train/<class>. The ProtoCLIP and SLIP CIFAR-10 experiments (docs/methods/) use this split:
45,000 training and 5,000 held-out images of ../shared/data/cifar10-train.tar.gz.
"""

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--holdout", type=int, default=500)
    args = parser.parse_args()
    counts = {"train": 0, "val": 0}
    for class_dir in sorted(p for p in args.source.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.iterdir() if p.is_file())
        if len(files) <= args.holdout:
            raise SystemExit(f"{class_dir} has {len(files)} files, not more than --holdout {args.holdout}")
        for split, part in (("train", files[:-args.holdout]), ("val", files[-args.holdout:])):
            target = args.out / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for f in part:
                link = target / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
            counts[split] += len(part)
    print(f"{counts['train']} train, {counts['val']} held out, in {args.out}")


if __name__ == "__main__":
    main()
