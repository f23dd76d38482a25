"""``clipforge.evaluate``: zero-shot classification, retrieval and linear probe on a user's data.

One call = one task on one dataset; the returned dict is what ``--out`` writes as JSON::

    {"task": "zeroshot", "dataset": "imagefolder:val", "model": "runs/x/checkpoints/latest",
     "metrics": {"acc1": ..., "acc5": ..., "mean_per_class_recall": ...},   # CLIP_benchmark names
     "options": {...resolved options...}, "data": {counts, skipped files}, ...}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from clipforge import __version__
from clipforge.data.sources import (
    DataError,
    parse_data_spec,
    read_caption_data,
    read_classification_data,
)
from clipforge.eval.datasets import (
    decoded_images,
    embed_image_files,
    embed_text_list,
    progress_bar,
    require_some_images,
)

TASKS = ("zeroshot", "retrieval", "linear-probe")
SIMILARITIES = ("pooled", "late-interaction")  # how retrieval scores an image-caption pair
SHAPES_SPLITS = ("binding",)  # built-in evaluation data: shapes:<split>, rendered, nothing on disk
RETRIEVAL_KS = (1, 5, 10)
MAX_LISTED_BAD = 20  # skipped files named in the JSON; the count is always complete


class EvalError(ValueError):
    """An evaluation request that cannot run as given; the message says what to change."""


def normalise_task(task: str) -> str:
    """Accept the obvious spellings ("zero-shot", "linear_probe") for the canonical names."""
    t = task.strip().lower().replace("_", "-")
    t = {"zero-shot": "zeroshot", "linearprobe": "linear-probe", "probe": "linear-probe"}.get(t, t)
    if t not in TASKS:
        raise EvalError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    return t


def evaluate(
    model_or_ckpt,
    task: str,
    data: str,
    *,
    train_data: str | None = None,
    classnames: str | Path | None = None,
    templates: str = "photo",
    fewshot_k: int | None = None,
    val_fraction: float = 0.2,
    out: str | Path | None = None,
    plots: bool = True,
    batch_size: int = 64,
    workers: int = 0,
    device: str | None = None,
    seed: int = 0,
    max_bad_fraction: float = 0.05,
    similarity: str = "pooled",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint (path) or a loaded ``(model, preprocess, tokenizer)`` on ``data``.

    ``task``: "zeroshot" (``data`` = imagefolder:/jsonl:/csv: with labels), "retrieval"
    (jsonl:/csv: with captions, or the built-in shapes:binding split) or "linear-probe"
    (``train_data`` and ``data`` with labels). ``similarity`` ranks retrieval by pooled
    embeddings ("pooled") or FILIP's token-wise "late-interaction". Writes ``out`` (JSON) and,
    for classification, a confusion-matrix PNG next to it unless ``plots=False``. Returns the
    same dict as the JSON file.
    """
    task = normalise_task(task)
    _check_options(task, train_data, fewshot_k, val_fraction, batch_size, workers, max_bad_fraction, similarity)
    shapes_split = parse_shapes_spec(data, task)
    spec = None if shapes_split else parse_data_spec(data)
    train_spec = parse_data_spec(train_data) if train_data else None
    model, preprocess, tokenizer, model_name = resolve_model(model_or_ckpt, device)
    if similarity == "late-interaction" and not hasattr(model, "encode_image_tokens"):
        raise EvalError(f"--similarity late-interaction needs per-token embeddings, which {type(model).__name__} "
                        "does not give (no encode_image_tokens); use --similarity pooled")
    common = dict(batch_size=batch_size, workers=workers, max_bad_fraction=max_bad_fraction, progress=progress)

    if shapes_split:
        from clipforge.eval.binding import evaluate_binding

        result = evaluate_binding(model, tokenizer, checkpoint_shapes_config(model_or_ckpt), model.cfg.image_size,
                                  similarity=similarity, batch_size=batch_size, progress=progress)
    elif task == "zeroshot":
        result = run_zeroshot(model, preprocess, tokenizer, spec, classnames, templates, **common)
    elif task == "retrieval":
        result = run_retrieval(model, preprocess, tokenizer, spec, similarity=similarity, **common)
    else:
        result = run_linear_probe(model, preprocess, train_spec, spec, classnames, fewshot_k, val_fraction,
                                  seed, **common)

    confusion = result.pop("_confusion", None)
    output = {
        "task": task,
        "dataset": data,
        "model": model_name,
        "metrics": result.pop("metrics"),
        **result,
        "options": _without_none({
            "train_data": train_data, "classnames": str(classnames) if classnames else None,
            "templates": templates if task == "zeroshot" else None, "fewshot_k": fewshot_k,
            "val_fraction": val_fraction if task == "linear-probe" else None, "seed": seed,
            "batch_size": batch_size, "workers": workers, "device": str(next(model.parameters()).device),
            "max_bad_fraction": max_bad_fraction,
            "similarity": similarity if task == "retrieval" else None,
        }),
        "clipforge_version": __version__,
    }
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if plots and confusion is not None:
            png = out.with_name(out.stem + "_confusion.png")
            plot_confusion_matrix(*confusion, png, title=f"{task}: {data}")
            output["plots"] = {"confusion_matrix": str(png)}
        out.write_text(json.dumps(output, indent=2) + "\n")
    return output


def _without_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _check_options(task, train_data, fewshot_k, val_fraction, batch_size, workers, max_bad_fraction,
                   similarity="pooled") -> None:
    if task == "linear-probe" and not train_data:
        raise EvalError("--task linear-probe needs training images: pass --train-data imagefolder:DIR (or jsonl:/csv:)")
    if task != "linear-probe" and (train_data or fewshot_k):
        raise EvalError(f"--train-data and --fewshot-k only apply to --task linear-probe (got --task {task})")
    if fewshot_k is not None and fewshot_k < 1:
        raise EvalError(f"--fewshot-k must be >= 1 (got {fewshot_k})")
    if not 0.0 < val_fraction < 1.0:
        raise EvalError(f"val_fraction must be between 0 and 1 (got {val_fraction})")
    if batch_size < 1 or workers < 0:
        raise EvalError(f"--batch-size must be >= 1 and --workers >= 0 (got {batch_size}, {workers})")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise EvalError(f"--max-bad-fraction must be between 0 and 1 (got {max_bad_fraction})")
    if similarity not in SIMILARITIES:
        raise EvalError(f"unknown --similarity '{similarity}'; choose one of {', '.join(SIMILARITIES)}")
    if similarity != "pooled" and task != "retrieval":
        raise EvalError(f"--similarity {similarity} ranks images against captions, so it applies to --task retrieval "
                        f"only (got --task {task}); leave it out or pass --similarity pooled")


def parse_shapes_spec(data: str, task: str) -> str | None:
    """The split of a built-in ``shapes:<split>`` spec (None for data on disk)."""
    kind, _, split = data.partition(":")
    if kind != "shapes":
        return None
    if split not in SHAPES_SPLITS:
        raise EvalError(f"unknown built-in split '{data}'; the built-in evaluation data is "
                        f"{', '.join(f'shapes:{s}' for s in SHAPES_SPLITS)}")
    if task != "retrieval":
        raise EvalError(f"{data} is scored as retrieval (captions against distractors); use --task retrieval "
                        f"(got --task {task})")
    return split


# ----------------------------------------------------------------------------- the model
def resolve_model(model_or_ckpt, device: str | None):
    """A checkpoint path (or a run dir: its checkpoints/latest) or a loaded triple -> (model, pre, tok, name)."""
    if isinstance(model_or_ckpt, (tuple, list)):
        model, preprocess, tokenizer = model_or_ckpt
        if device:
            model.to(device)
        return model.eval(), preprocess, tokenizer, type(model).__name__
    from clipforge.api import load

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, preprocess, tokenizer = load(checkpoint_dir(model_or_ckpt), device=device)
    return model, preprocess, tokenizer, str(model_or_ckpt)


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory as given, or a run directory's (or its checkpoints/ folder's) latest one."""
    path = Path(path)
    if not (path / "config.json").exists():
        # a run directory or its checkpoints/ folder: take the newest complete checkpoint
        for latest in (path / "checkpoints" / "latest", path / "latest"):
            if latest.exists():
                return latest
    return path


def checkpoint_shapes_config(model_or_ckpt):
    """The ``data.shapes`` section of the checkpoint's recipe (holdout seed, eval size); defaults
    for a loaded model or a checkpoint without a recipe (an import)."""
    from clipforge.config import ShapesConfig
    from clipforge.train.checkpoint import read_config

    if isinstance(model_or_ckpt, (tuple, list)):
        return ShapesConfig()
    recipe = read_config(checkpoint_dir(model_or_ckpt)).get("recipe") or {}
    return ShapesConfig.model_validate(recipe.get("data", {}).get("shapes", {}))


# ----------------------------------------------------------------------------- tasks
def run_zeroshot(model, preprocess, tokenizer, spec, classnames, templates, **common) -> dict:
    from clipforge.eval.templates import resolve_templates
    from clipforge.eval.zeroshot import classification_metrics, zero_shot_classifier

    data = read_classification_data(spec, Path(classnames) if classnames else None)
    if classnames is None and data.classnames == data.class_ids and all(n.isdigit() for n in data.classnames):
        raise EvalError(f"{spec}: the classes are only numbers ({', '.join(data.classnames[:3])}, ...), so zero-shot "
                        "has nothing to put in its prompts; pass --classnames names.txt (one name per line, "
                        "in class order)")
    try:
        prompt_templates = resolve_templates(templates)
    except ValueError as e:
        raise EvalError(str(e)) from None
    images = embed_image_files(model, data.paths, preprocess, label="images", **common)
    labels = torch.tensor(data.labels)[images.ok]
    classifier = zero_shot_classifier(model, tokenizer, data.classnames, prompt_templates).float().cpu()
    logits = images.embeds @ classifier.T
    return {
        "metrics": classification_metrics(logits, labels, len(data.classnames)),
        "data": _data_summary(len(data.paths), images, num_classes=len(data.classnames)),
        "classnames": data.classnames,
        "num_templates": len(prompt_templates),
        "_confusion": (confusion_matrix(logits.argmax(1), labels, len(data.classnames)), data.classnames),
    }


def run_retrieval(model, preprocess, tokenizer, spec, similarity: str = "pooled", **common) -> dict:
    from clipforge.eval.retrieval import retrieval_metrics

    data = read_caption_data(spec)
    if similarity == "late-interaction":
        return run_late_interaction_retrieval(model, preprocess, tokenizer, data, **common)
    images = embed_image_files(model, data.paths, preprocess, label="images", **common)
    # drop the captions of skipped images, renumbering the images that remain
    new_index = torch.cumsum(images.ok.long(), 0) - 1
    owners = torch.tensor(data.text_to_image)
    keep = images.ok[owners]
    captions = [c for c, k in zip(data.captions, keep.tolist()) if k]
    texts = embed_text_list(model, tokenizer, captions, progress=common["progress"])
    metrics = retrieval_metrics(images.embeds, texts, new_index[owners[keep]], ks=RETRIEVAL_KS)
    return {
        "metrics": metrics,
        "data": {**_data_summary(len(data.paths), images), "captions": len(captions)},
    }


def run_late_interaction_retrieval(model, preprocess, tokenizer, data, *, batch_size, workers, max_bad_fraction,
                                   progress) -> dict:
    """Retrieval ranked by FILIP's late interaction; images are streamed (see eval/late_interaction.py)."""
    from clipforge.eval.late_interaction import embed_text_tokens, late_interaction_topk
    from clipforge.eval.retrieval import recall_from_topk

    kmax = max(RETRIEVAL_KS)
    decoded = decoded_images(model, data.paths, preprocess, batch_size=batch_size, workers=workers,
                             max_bad_fraction=max_bad_fraction)
    with progress_bar(len(data.captions), "embedding caption tokens", progress) as advance:
        texts = embed_text_tokens(model, tokenizer, data.captions, advance=advance)

    def ranks(texts):
        with progress_bar(len(data.paths), "scoring images (late interaction)", progress) as advance:
            decoded.advance = advance
            return late_interaction_topk(model, decoded, texts, kmax)

    i2t, t2i = ranks(texts)
    require_some_images(decoded)
    owners = torch.tensor(data.text_to_image)
    keep = decoded.ok[owners]
    if not keep.all():
        # the captions of skipped images are dropped (as with pooled scores), so the images'
        # rankings of captions are redone without them: one more pass over the images
        i2t, _ = ranks(texts.select(keep))
        t2i = t2i[keep]
    new_index = torch.cumsum(decoded.ok.long(), 0) - 1  # image positions among the readable ones
    return {
        "metrics": recall_from_topk(t2i, i2t, new_index[owners[keep]], RETRIEVAL_KS),
        "data": {**_data_summary(len(data.paths), decoded), "captions": int(keep.sum())},
    }


def run_linear_probe(model, preprocess, train_spec, test_spec, classnames, fewshot_k, val_fraction, seed,
                     **common) -> dict:
    from clipforge.eval.linear_probe import linear_probe, require_sklearn

    require_sklearn()  # before spending minutes on embeddings
    names_file = Path(classnames) if classnames else None
    train = read_classification_data(train_spec, names_file)
    test = read_classification_data(test_spec, names_file)
    test_labels = _align_labels(train.class_ids, test.class_ids, test.labels, train_spec, test_spec)
    train_images = embed_image_files(model, train.paths, preprocess, label="train images", **common)
    test_images = embed_image_files(model, test.paths, preprocess, label="test images", **common)
    train_y = torch.tensor(train.labels)[train_images.ok]
    test_y = torch.tensor(test_labels)[test_images.ok]
    try:
        probe = linear_probe(train_images.embeds, train_y, test_images.embeds, test_y, len(train.classnames),
                             fewshot_k=fewshot_k, val_fraction=val_fraction, seed=seed)
    except ValueError as e:
        raise EvalError(str(e)) from None
    predictions = probe.pop("predictions")
    return {
        "metrics": probe.pop("metrics"),
        "linear_probe": probe,
        "data": {"train": _data_summary(len(train.paths), train_images, num_classes=len(train.classnames)),
                 "test": _data_summary(len(test.paths), test_images)},
        "classnames": train.classnames,
        "_confusion": (confusion_matrix(predictions, test_y, len(train.classnames)), train.classnames),
    }


def _align_labels(train_ids: list[str], test_ids: list[str], test_labels: list[int], train_spec, test_spec) -> list[int]:
    """Test labels as indices into the training classes (the test set may lack some classes)."""
    index = {c: i for i, c in enumerate(train_ids)}
    unknown = [c for c in test_ids if c not in index]
    if unknown:
        raise DataError(f"{test_spec} has classes that {train_spec} lacks: {', '.join(unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''}; the probe can only predict training classes")
    return [index[test_ids[label]] for label in test_labels]


def _data_summary(total: int, images, num_classes: int | None = None) -> dict:
    summary = {"files": total, "images": int(images.ok.sum()), "skipped": len(images.bad),
               "skipped_files": [{"path": p, "reason": r} for p, r in images.bad[:MAX_LISTED_BAD]]}
    if num_classes is not None:
        summary["classes"] = num_classes
    return summary


# ----------------------------------------------------------------------------- confusion matrix
def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts; row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def plot_confusion_matrix(counts: torch.Tensor, classnames: Sequence[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix as a PNG; names on the axes up to 50 classes, numbers up to 15."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    n = len(classnames)
    rates = (counts.double() / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
    size = min(20.0, max(5.0, 0.35 * n + 2.5))
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 50:
        ax.set_xticks(range(n), labels=classnames, rotation=90, fontsize=8)
        ax.set_yticks(range(n), labels=classnames, fontsize=8)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- terminal table
def result_table(result: dict):
    """A rich Table of the metrics (percentages) plus the chosen C for a linear probe."""
    from rich.table import Table

    table = Table(title=f"clipforge eval: {result['task']}", caption=f"{result['dataset']}\n{result['model']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(key, f"{100 * value:.2f}%")
    if "binding" in result:
        chance = result["binding"]["chance"]
        table.add_row("chance: binding_acc / per kind", f"{100 * chance['binding_acc']:.2f}% / 50.00%")
    if "linear_probe" in result:
        probe = result["linear_probe"]
        table.add_row("C (chosen on validation)", f"{probe['C']:.4g}")
        table.add_row("train / val / test samples",
                      f"{probe['train_samples']} / {probe['val_samples']} / {probe['test_samples']}")
    data = result["data"]
    for split, summary in ([("", data)] if "images" in data else data.items()):
        prefix = f"{split} " if split else ""
        table.add_row(f"{prefix}images evaluated", str(summary["images"]))
        if summary["skipped"]:
            table.add_row(f"{prefix}images skipped (unreadable)", str(summary["skipped"]))
    return table
