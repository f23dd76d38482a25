"""NMTune vs the L-BFGS linear probe on the same frozen features, at several NMTune epoch counts (JSON).

    python bench/nmtune_epochs.py CKPT TRAIN_FOLDER TEST_FOLDER --epochs 30 100 300 [--seed 0]

The features are embedded once; ``linear_probe`` is `clipforge eval --task linear-probe` and
``nmtune_probe`` with epochs=30 is `--nmtune`; other epoch counts show whether NMTune is undertrained.
"""

from __future__ import annotations

import argparse
import json

import torch

from clipforge.api import load
from clipforge.data.sources import read_classification_data
from clipforge.eval.datasets import embed_image_files
from clipforge.eval.evaluate import checkpoint_dir
from clipforge.eval.linear_probe import linear_probe
from clipforge.eval.nmtune import nmtune_probe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("train")
    parser.add_argument("test")
    parser.add_argument("--epochs", type=int, nargs="+", default=[30, 100, 300])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, preprocess, _ = load(checkpoint_dir(args.ckpt), device="cpu")
    train, test = read_classification_data(f"imagefolder:{args.train}"), read_classification_data(f"imagefolder:{args.test}")
    x = embed_image_files(model, train.paths, preprocess, progress=False).embeds
    t = embed_image_files(model, test.paths, preprocess, progress=False).embeds
    y, ty = torch.tensor(train.labels), torch.tensor(test.labels)
    c = len(train.classnames)
    out = {"ckpt": args.ckpt, "lbfgs_acc1": linear_probe(x, y, t, ty, c, seed=args.seed)["metrics"]["acc1"]}
    for e in args.epochs:
        r = nmtune_probe(x, y, t, ty, c, epochs=e, seed=args.seed)
        out[f"nmtune_{e}ep_acc1"] = r["metrics"]["acc1"]
        out[f"nmtune_{e}ep_final_ce"] = round(r["last_batch_terms"]["ce"], 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
