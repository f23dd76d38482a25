"""The evaluation the trainer runs every ``eval.every_steps`` steps and at the end: the built-in one
on the training data, and the recipe's ``[[eval.tasks]]`` on data on disk (``eval_task_hooks``).

For ``shapes``: zero-shot top-1/top-5 over ALL colour-shape classes, separately on images of seen
compositions and of unseen (held-out) compositions, plus class-level caption retrieval on each split;
with ``eval.late_interaction`` also the zero-shot by FILIP's token-wise scores (``zeroshot-li/...``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch

from clipforge.config import Recipe
from clipforge.eval.embedding import chunk_ranges, embed_batches
from clipforge.eval.retrieval import streaming_topk
from clipforge.eval.templates import TEMPLATE_SETS
from clipforge.eval.zeroshot import classification_metrics, late_interaction_zero_shot_logits, zero_shot_classifier

LATE_INTERACTION_KEY = "zeroshot-li"  # zeroshot-li/<split>/<metric>: FILIP's zero-shot, beside the pooled one


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


def late_interaction_split_logits(model, tokenizer, dataset, batch_size: int, classnames, templates) -> torch.Tensor:
    """FILIP's zero-shot logits of a shapes eval split (eval/zeroshot.py), ``batch_size`` images at a time."""
    images = dataset.render_chunks(chunk_ranges(len(dataset), batch_size))
    return late_interaction_zero_shot_logits(model, tokenizer, images, classnames, templates)


@torch.no_grad()
def evaluate_shapes(model, tokenizer, recipe: Recipe, with_predictions: bool = False, *,
                    embed: Callable = embed_split, score_tokens: Callable = late_interaction_split_logits) -> dict:
    """The built-in shapes evaluation. ``embed`` and ``score_tokens`` (same signatures as the defaults,
    one process) are what the distributed evaluation replaces with versions that split the images
    between ranks and gather them (``clipforge.train.distributed.sharded_shapes_eval``)."""
    from clipforge.data.loader import build_eval_set
    from clipforge.data.synthetic import class_names

    names = class_names()
    classifier = zero_shot_classifier(model, tokenizer, names, TEMPLATE_SETS["shapes"])
    out: dict = {}
    for split in ("seen", "unseen"):
        dataset = build_eval_set(recipe.data, recipe.model.image_size, split)
        img, txt, labels = embed(model, tokenizer, dataset, recipe.eval.batch_size)
        logits = img @ classifier.T
        for k, v in classification_metrics(logits, labels, len(names)).items():
            out[f"zeroshot/{split}/{k}"] = v
        for k, v in class_retrieval_metrics(img, txt, labels, ks=(1, 5)).items():
            out[f"retrieval/{split}/{k}"] = v
        if recipe.eval.late_interaction:
            li = score_tokens(model, tokenizer, dataset, recipe.eval.batch_size, names, TEMPLATE_SETS["shapes"])
            out.update(late_interaction_metrics(li, labels.to(li.device), split, len(names)))
        if with_predictions:
            out[f"predictions/{split}"] = (logits.argmax(1).cpu(), labels.cpu())
    return out


def late_interaction_metrics(logits: torch.Tensor, labels: torch.Tensor, split: str, num_classes: int) -> dict:
    metrics = classification_metrics(logits, labels, num_classes)
    return {f"{LATE_INTERACTION_KEY}/{split}/{k}": v for k, v in metrics.items()}


def default_eval_hooks(recipe: Recipe, world_size: int = 1) -> list[Callable]:
    """The built-in shapes evaluation (when training on shapes; split between ranks when
    ``world_size`` > 1), then one hook per ``[[eval.tasks]]`` entry (see ``eval_task_hooks``)."""
    hooks: list[Callable] = []
    if recipe.data.train == "shapes" and world_size > 1:
        from clipforge.train.distributed import sharded_shapes_eval

        hooks.append(sharded_shapes_eval(recipe))
    elif recipe.data.train == "shapes":
        def shapes_hook(model, tokenizer, step):
            return evaluate_shapes(model, tokenizer, recipe)

        hooks.append(shapes_hook)
    return hooks + eval_task_hooks(recipe)


# ----------------------------------------------------------------------------- [[eval.tasks]]
def eval_task_hooks(recipe: Recipe) -> list[Callable]:
    """One hook per ``[[eval.tasks]]`` entry, logging ``val/<task>/<name>/<metric>``.

    Each task's data is read here (the file list, labels, captions, class names and templates), so
    a missing path or a bad file stops the run before training starts, with a RecipeError naming
    the entry; the images are decoded and embedded at each evaluation, through the same functions
    as ``clipforge eval`` (``clipforge.eval.evaluate.score_*``). The hooks run on rank 0.
    """
    return [_task_hook(recipe, i) for i in range(len(recipe.eval.tasks))]


# the subset drawn for max_samples: fixed, so every evaluation and every run of a recipe sees the same images
SUBSET_SEED = 0


def _shared(err: Exception) -> Exception:
    err.every_rank = True  # under torchrun every rank reads the same data and fails alike: rank 0 says it
    return err


def _task_hook(recipe: Recipe, index: int) -> Callable:
    from clipforge.config import RecipeError
    from clipforge.data.sources import DataError, parse_data_spec, read_caption_data
    from clipforge.data.transforms import EvalPreprocess
    from clipforge.eval import evaluate as E

    cfg = recipe.eval.tasks[index]
    key = f"eval.tasks[{index}]"
    max_samples = cfg.max_samples or recipe.eval.max_samples
    spec = parse_data_spec(cfg.data)  # the recipe checked the kind already
    if spec.kind != "wds" and not spec.path.exists():  # wds: brace patterns are checked when the shards are read
        raise _shared(RecipeError(f"{key}.data = {cfg.data!r}: {spec.path} not found (a relative path is "
                                  f"relative to the directory clipforge runs in, {Path.cwd()})"))
    for field in ("classnames", "templates"):
        value = getattr(cfg, field)
        if value and (field == "classnames" or value not in TEMPLATE_SETS) and not Path(value).is_file():
            shipped = "" if field == "classnames" else f" and not a shipped set ({', '.join(TEMPLATE_SETS)})"
            raise _shared(RecipeError(f"{key}.{field} = {value!r}: no such file{shipped}"))
    try:
        if cfg.task == "zeroshot":
            data, _ = E.read_zeroshot_data(spec, cfg.classnames)
            templates, _ = E.zeroshot_templates(cfg.templates, spec)
            data = E.subset_classification(data, max_samples, SUBSET_SEED)
        else:
            data = E.subset_captions(read_caption_data(spec), max_samples, SUBSET_SEED)
    except (DataError, E.EvalError) as e:
        raise _shared(RecipeError(f"{key} ({cfg.task} on {cfg.data}): {e}")) from None

    prefix = f"val/{cfg.task}/{cfg.dataset_name()}/"
    common = dict(batch_size=recipe.eval.batch_size, workers=recipe.data.num_workers,
                  max_bad_fraction=recipe.data.max_skip_fraction, progress=False)

    def task_hook(model, tokenizer, step):
        preprocess = EvalPreprocess(model.cfg.image_size)
        try:
            if cfg.task == "zeroshot":
                result = E.score_zeroshot(model, preprocess, tokenizer, data, templates, similarity=cfg.similarity,
                                          **common)
            elif cfg.task == "retrieval":
                result = E.score_retrieval(model, preprocess, tokenizer, data, similarity=cfg.similarity, **common)
            else:  # val_loss, in batches of the training batch size
                result = E.score_val_loss(model, preprocess, tokenizer, data, recipe.data.batch_size, **common)
        except DataError as e:
            # the images were listed before training but could not be read now: losing this evaluation
            # is better than losing the run
            warnings.warn(f"{key} ({cfg.task} on {cfg.data}) skipped at step {step}: {e}")
            return {}
        return {prefix + k: v for k, v in result["metrics"].items()}

    task_hook.__name__ = f"{key} ({cfg.task} on {cfg.data})"
    task_hook.data = data  # what it evaluates (after max_samples)
    return task_hook
