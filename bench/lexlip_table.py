"""The table of bench/lexlip_experiment.sh (docs/methods/lexlip.md, "Phase 1: the lexicon bottleneck"): per arm
and seed, and the mean over seeds,

- lexical precision@10 (text -> image, SciPy posting lists over the shapes eval images; bench/lexical.py) and
  the same model's dense head's, average non-zeros per image / text vector;
- word precision: of an eval image's (or its caption's) m largest lexical weights (m = the number of words
  of its class name, e.g. "red circle" -> 2), the share that are those words. This is what the bottleneck
  is for: the lexicon weights have to carry the caption's words. Seen and unseen colour-shape pairs apart;
- the trainer's zero-shot top-1 of the dense head (seen / unseen), the last logged LexMLM losses and the
  median training img/s.

    python bench/lexlip_table.py RUNS_DIR [--json OUT]

Word precision loads each checkpoint and embeds the eval images (about half a minute per model on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from statistics import mean, median

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import clipforge  # noqa: E402

ARMS = ("lexlip", "bottleneck", "lexlip640", "moco-b", "moco-l", "moco-b-ft", "moco-l-ft")


@torch.no_grad()
def word_precision(ckpt: Path, per_class: int = 50) -> dict[str, dict[str, float]]:
    """Per side ("image", "text") and split: of each eval sample's m largest lexical weights (m = the number of
    words of its class name), the share that are those words (the text side reads the sample's caption)."""
    from clipforge.config import ShapesConfig
    from clipforge.data.synthetic import ShapesDataset, class_names

    model, _, tokenizer = clipforge.load(ckpt)
    words = []
    for name in class_names():  # the class name's word ids, without the start / end tokens
        ids, mask = tokenizer([name])
        words.append(set(ids[0][1: int(mask[0].sum()) - 1].tolist()))
    out = {"image": {}, "text": {}}
    for split in ("seen", "unseen"):
        ds = ShapesDataset(ShapesConfig(eval_samples_per_class=per_class), model.cfg.image_size, seed=0, split=split)
        pixels, captions, labels = ds.render_batch(range(len(ds)))
        hits = {"image": [], "text": []}
        for start in range(0, len(pixels), 256):
            chunk = slice(start, start + 256)
            ids, mask = tokenizer(list(captions[chunk]))
            weights = {"image": model(pixels[chunk], None, need={"image_lexical"})["image_lexical"],
                       "text": model(None, ids, mask, need={"text_lexical"})["text_lexical"]}
            for side, rows in weights.items():
                for row, label in zip(rows, labels[chunk].tolist()):
                    target = words[label]
                    hits[side].append(len(target & set(row.topk(len(target)).indices.tolist())) / len(target))
        for side in out:
            out[side][split] = round(mean(hits[side]), 4)
    return out


def metrics(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "zeroshot/seen/acc1" in r]
    train = [r for r in rows if "img_per_s" in r]
    out = {"zeroshot_seen": evals[-1]["zeroshot/seen/acc1"], "zeroshot_unseen": evals[-1]["zeroshot/unseen/acc1"],
           "img_per_s_median": round(median(r["img_per_s"] for r in train[5:]), 1)}
    for key in ("lexmlm/i2t", "lexmlm/t2t", "lexmlm/self", "lexical/loss"):
        values = [r[key] for r in train if key in r]
        if values:
            out[key] = round(mean(values[-20:]), 3)  # the last 20 logged steps
    return out


def collect(runs: Path) -> dict:
    found = {}
    for run in sorted(runs.iterdir()):
        m = re.fullmatch(r"(.+)-s(\d+)", run.name)
        if not (m and m[1] in ARMS and (run / "lexical.json").is_file()):
            continue
        bench = json.loads((run / "lexical.json").read_text())["shapes"]
        found[f"{m[1]}-s{m[2]}"] = {
            "arm": m[1], "seed": int(m[2]),
            "lexical_p@10": bench["lexical-scipy"]["precision@10"],
            "dense_head_p@10": bench["lexlip-model-dense-flat"]["precision@10"],
            "nonzeros": bench["avg_nonzeros"], "lexical_index_bytes": bench["lexical-scipy"]["index_bytes"],
            "word_precision": word_precision(run / "checkpoints" / "latest"), **metrics(run)}
    return found


def table(found: dict) -> list[str]:
    lines = ["| arm | seed | lexical P@10 | dense head P@10 | non-zeros img / txt | word precision, images seen / "
             "unseen | word precision, captions seen / unseen | zero-shot seen / unseen | LexMLM i2t / t2t / self | "
             "img/s |", "| --- " * 10 + "|"]

    def row(arm, seed, r):
        mlm = " / ".join(f"{r[k]:.2f}" for k in ("lexmlm/i2t", "lexmlm/t2t", "lexmlm/self")) if "lexmlm/i2t" in r else "-"
        return (f"| {arm} | {seed} | {r['lexical_p@10']:.3f} | {r['dense_head_p@10']:.3f} | "
                f"{r['nonzeros']['images']:.1f} / {r['nonzeros']['texts']:.1f} | "
                f"{r['word_precision']['image']['seen']:.3f} / {r['word_precision']['image']['unseen']:.3f} | "
                f"{r['word_precision']['text']['seen']:.3f} / {r['word_precision']['text']['unseen']:.3f} | "
                f"{r['zeroshot_seen']:.3f} / {r['zeroshot_unseen']:.3f} | {mlm} | {r['img_per_s_median']:.0f} |")
    for arm in ARMS:
        rows = [r for r in found.values() if r["arm"] == arm]
        for r in sorted(rows, key=lambda r: r["seed"]):
            lines.append(row(arm, r["seed"], r))
        if rows:
            avg = {k: mean(r[k] for r in rows) for k in ("lexical_p@10", "dense_head_p@10", "zeroshot_seen",
                                                         "zeroshot_unseen", "img_per_s_median")}
            avg["nonzeros"] = {s: mean(r["nonzeros"][s] for r in rows) for s in ("images", "texts")}
            avg["word_precision"] = {side: {s: mean(r["word_precision"][side][s] for r in rows) for s in ("seen", "unseen")}
                                     for side in ("image", "text")}
            for k in ("lexmlm/i2t", "lexmlm/t2t", "lexmlm/self"):
                if all(k in r for r in rows):
                    avg[k] = mean(r[k] for r in rows)
            lines.append(row(f"**{arm}**", "mean", avg))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", type=Path)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    found = collect(args.runs)
    if not found:
        sys.exit(f"no finished <arm>-s<seed> runs with lexical.json in {args.runs}: run bench/lexlip_experiment.sh")
    print("\n".join(table(found)))
    if args.json:
        args.json.write_text(json.dumps(found, indent=2) + "\n")


if __name__ == "__main__":
    main()
