"""The built-in evaluation on the training data, run by the trainer every N steps and at the end.

For ``shapes``: zero-shot top-1/top-5 over ALL colour-shape classes, separately on images of seen
compositions and of unseen (held-out) compositions, plus class-level caption retrieval on each split.
"""

from __future__ import annotations

from typing import Callable

import torch

from clipforge.config import Recipe
from clipforge.eval.embedding import embed_batches
from clipforge.eval.retrieval import streaming_topk
from clipforge.eval.templates import TEMPLATE_SETS
from clipforge.eval.zeroshot import classification_metrics, zero_shot_classifier


def embed_split(model, tokenizer, dataset, batch_size: int):
    """Image embeddings, caption embeddings and labels of a finite eval split (on the model's device)."""
    from clipforge.data.loader import make_batch

    rows = embed_batches(model, lambda idx: make_batch(dataset, idx, tokenizer), len(dataset), batch_size,
                         keep=("labels",))
    return rows["images"], rows["texts"], rows["labels"]


def class_retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """Recall@k where a retrieved item counts if it shows / names the same colour-shape class.

    Eval captions repeat ("a red circle" describes many images), so exact-pair recall would
    punish the model for ties between identical texts; class-level recall does not.
    """
    kmax = max(ks)
    t2i = labels[streaming_topk(txt, img, kmax)] == labels[:, None]
    i2t = labels[streaming_topk(img, txt, kmax)] == labels[:, None]
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = t2i[:, :k].any(1).sum().item() / len(labels)
        out[f"text_retrieval_recall@{k}"] = i2t[:, :k].any(1).sum().item() / len(labels)
    return out


@torch.no_grad()
def evaluate_shapes(model, tokenizer, recipe: Recipe, with_predictions: bool = False) -> dict:
    from clipforge.data.loader import build_eval_set
    from clipforge.data.synthetic import class_names

    names = class_names()
    classifier = zero_shot_classifier(model, tokenizer, names, TEMPLATE_SETS["shapes"])
    out: dict = {}
    for split in ("seen", "unseen"):
        dataset = build_eval_set(recipe.data, recipe.model.image_size, split)
        img, txt, labels = embed_split(model, tokenizer, dataset, recipe.eval.batch_size)
        logits = img @ classifier.T
        for k, v in classification_metrics(logits, labels, len(names)).items():
            out[f"zeroshot/{split}/{k}"] = v
        for k, v in class_retrieval_metrics(img, txt, labels, ks=(1, 5)).items():
            out[f"retrieval/{split}/{k}"] = v
        if with_predictions:
            out[f"predictions/{split}"] = (logits.argmax(1).cpu(), labels.cpu())
    return out


def default_eval_hooks(recipe: Recipe) -> list[Callable]:
    if recipe.data.train != "shapes":
        return []

    def shapes_hook(model, tokenizer, step):
        return evaluate_shapes(model, tokenizer, recipe)

    return [shapes_hook]
