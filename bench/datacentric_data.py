"""Data sets for the controlled experiments of docs/data-centric.md (prints a JSON summary).

    python bench/datacentric_data.py cifar-dups CIFAR_TRAIN_DIR OUT --per-class 300 --dup-fraction 0.5 --seed 0
        OUT/train.jsonl: per-class unique CIFAR-10 images plus augmented copies (small shifted crop,
        brightness jitter, JPEG re-encode) of a fraction of them, caption "a photo of a <class>.";
        OUT/test/<class>/: 100 other images per class (zero-shot eval); OUT/dups.json: the planted groups
    python bench/datacentric_data.py shapes-pairs OUT --samples 6000 --noise 0.3 --seed 0
        OUT/images/*.png rendered from the built-in shapes train split, OUT/train.jsonl with a fraction
        ``noise`` of the captions swapped between images (a derangement of that subset: each noisy
        caption belongs to another image); OUT/probe/{train,test}/<class>/ from the seen eval split
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance


def augmented_copy(image: Image.Image, rng: random.Random) -> Image.Image:
    """A near-duplicate: crop 1-3 px off random sides (resized back), brightness +-8%, JPEG q 75-95."""
    w, h = image.size
    left, top = rng.randint(0, 3), rng.randint(0, 3)
    right, bottom = w - rng.randint(0, 3), h - rng.randint(0, 3)
    copy = image.crop((left, top, right, bottom)).resize((w, h), Image.BILINEAR)
    copy = ImageEnhance.Brightness(copy).enhance(rng.uniform(0.92, 1.08))
    buf = io.BytesIO()
    copy.save(buf, format="JPEG", quality=rng.randint(75, 95))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def cifar_dups(src: Path, out: Path, per_class: int, dup_fraction: float, max_copies: int, seed: int) -> dict:
    rng = random.Random(seed)
    rows, groups = [], []
    (out / "images").mkdir(parents=True, exist_ok=True)
    for cls in sorted(d.name for d in src.iterdir() if d.is_dir()):
        files = sorted((src / cls).glob("*.jpg"))
        for i, f in enumerate(files[per_class:per_class + 100]):  # held out for zero-shot
            dest = out / "test" / cls / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
        for f in files[:per_class]:
            name = f"{cls}_{f.stem}"
            (out / "images" / f"{name}.jpg").write_bytes(f.read_bytes())
            members = [name]
            rows.append({"image": f"images/{name}.jpg", "text": f"a photo of a {cls}.", "id": name})
            if rng.random() < dup_fraction:
                image = Image.open(f).convert("RGB")
                for c in range(rng.randint(1, max_copies)):
                    copy_name = f"{name}_copy{c}"
                    augmented_copy(image, rng).save(out / "images" / f"{copy_name}.jpg", quality=95)
                    rows.append({"image": f"images/{copy_name}.jpg", "text": f"a photo of a {cls}.", "id": copy_name})
                    members.append(copy_name)
                groups.append(members)
    rng.shuffle(rows)
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "dups.json").write_text(json.dumps(groups))
    unique = len(rows) - sum(len(g) - 1 for g in groups)
    return {"rows": len(rows), "unique": unique, "groups": len(groups), "planted_copies": len(rows) - unique}


def shapes_pairs(out: Path, samples: int, noise: float, seed: int, image_size: int, probe_per_class: int) -> dict:
    from clipforge.config import ShapesConfig
    from clipforge.data.synthetic import ShapesDataset, class_names

    cfg = ShapesConfig(eval_samples_per_class=2 * probe_per_class)
    train = ShapesDataset(cfg, image_size, seed=seed, split="train")
    (out / "images").mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(samples):
        image, caption, _ = train.sample(i)
        Image.fromarray(image).save(out / "images" / f"{i:06d}.png")
        captions.append(caption)
    rng = np.random.default_rng([seed, 7])
    noisy = np.sort(rng.choice(samples, size=int(round(noise * samples)), replace=False))
    if len(noisy) > 1:  # rotate the chosen captions by one: a derangement, no noisy image keeps its caption
        captions_arr = np.array(captions, dtype=object)
        captions_arr[noisy] = captions_arr[np.roll(noisy, 1)]
        captions = captions_arr.tolist()
    (out / "train.jsonl").write_text("".join(json.dumps({"image": f"images/{i:06d}.png", "text": c}) + "\n"
                                             for i, c in enumerate(captions)))
    seen = ShapesDataset(cfg, image_size, seed=cfg.holdout_seed, split="seen")
    names = class_names()
    for index in range(len(seen)):
        image, _, label = seen.sample(index)
        part = "train" if index % (2 * probe_per_class) < probe_per_class else "test"
        dest = out / "probe" / part / names[label].replace(" ", "_") / f"{index:05d}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(dest)
    return {"samples": samples, "noisy_captions": int(len(noisy)), "probe_images": len(seen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cifar-dups")
    c.add_argument("src", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--per-class", type=int, default=300)
    c.add_argument("--dup-fraction", type=float, default=0.5)
    c.add_argument("--max-copies", type=int, default=3)
    c.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("shapes-pairs")
    s.add_argument("out", type=Path)
    s.add_argument("--samples", type=int, default=6000)
    s.add_argument("--noise", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--probe-per-class", type=int, default=20)
    args = parser.parse_args()
    if args.what == "cifar-dups":
        summary = cifar_dups(args.src, args.out, args.per_class, args.dup_fraction, args.max_copies, args.seed)
    else:
        summary = shapes_pairs(args.out, args.samples, args.noise, args.seed, args.image_size, args.probe_per_class)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
