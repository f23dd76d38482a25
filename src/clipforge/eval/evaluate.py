"""``clipforge.evaluate``: zero-shot classification, retrieval and linear probe on a user's data.

One call = one task on one dataset; the returned dict is what ``--out`` writes as JSON::

    {"task": "zeroshot", "dataset": "imagefolder:val", "model": "runs/x/checkpoints/latest",
     "metrics": {"acc1": ..., "acc5": ..., "mean_per_class_recall": ...},   # CLIP_benchmark names
     "options": {...resolved options...}, "data": {counts, skipped files}, ...}
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from clipforge import __version__
from clipforge.devices import pick_device
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
SIMILARITIES = ("pooled", "late-interaction")  # how zero-shot and retrieval score an image against a text
# built-in evaluation data, shapes:<split> -> the task it is scored as; rendered from the checkpoint's
# recipe (its hold-out), nothing on disk. seen / unseen are the trainer's own end-of-run zero-shot splits.
SHAPES_SPLITS = {"binding": "retrieval", "seen": "zeroshot", "unseen": "zeroshot"}
RETRIEVAL_KS = (1, 5, 10)
MAX_LISTED_BAD = 20  # skipped files named in the JSON; the count is always complete
# a dataset folder's own class names and prompts, named as CLIP_benchmark names them
CLASSNAMES_FILES = ("classnames.txt",)
TEMPLATES_FILES = ("zeroshot_classification_templates.txt", "templates.txt")
DEFAULT_TEMPLATES = "photo"


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
    templates: str | None = None,
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
    max_samples: int | None = None,
    per_class: bool = False,
    nmtune: bool = False,
    shapes=None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (path) or a loaded ``(model, preprocess, tokenizer)`` on ``data``.

    ``task``: "zeroshot" (``data`` = imagefolder:/jsonl:/csv: with labels, or the built-in
    shapes:seen / shapes:unseen splits), "retrieval" (jsonl:/csv: with captions, or the built-in
    shapes:binding split) or "linear-probe" (``train_data`` and ``data`` with labels).
    ``similarity`` scores zero-shot and retrieval by pooled embeddings ("pooled") or FILIP's
    token-wise "late-interaction". Writes ``out`` (JSON) and,
    for classification, a confusion-matrix PNG next to it unless ``plots=False``. Returns the
    same dict as the JSON file.

    Zero-shot without ``classnames`` / ``templates`` uses the dataset folder's ``classnames.txt`` /
    ``zeroshot_classification_templates.txt`` (or ``templates.txt``) when there are such files
    (CLIP_benchmark's names), else the folder names and the ``photo`` set. ``max_samples`` evaluates
    a seeded random subset of at most that many images (zeroshot and retrieval). ``per_class``
    adds ``per_class``: {class name: {"accuracy", "count"}} (zeroshot and linear-probe).
    ``shapes`` (a ShapesConfig) sets the built-in shapes splits for a loaded model; a checkpoint's
    own recipe says them otherwise.
    """
    task = normalise_task(task)
    if nmtune and task != "linear-probe":
        raise EvalError(f"--nmtune tunes a probe on frozen features: it applies to --task linear-probe, not {task}")
    if per_class and task == "retrieval":
        raise EvalError(f"--per-class applies to classification (zeroshot, linear-probe), not {task} on {data}")
    _check_options(task, train_data, fewshot_k, val_fraction, batch_size, workers, max_bad_fraction, similarity)
    device = pick_device(device) if device else None  # checked before any data or model is read
    if max_samples is not None and (max_samples < 1 or task == "linear-probe"):
        raise EvalError(f"--max-samples takes a count >= 1 and applies to zeroshot and retrieval "
                        f"(got {max_samples} with --task {task})")
    shapes_split = parse_shapes_spec(data, task)
    if shapes_split and max_samples is not None:
        raise EvalError(f"--max-samples applies to data on disk; {data} is rendered at a fixed size")
    if shapes_split and classnames:
        raise EvalError(f"{data} has its own classes (every colour-shape pair); leave out --classnames")
    spec = None if shapes_split else parse_data_spec(data)
    train_spec = parse_data_spec(train_data) if train_data else None
    model, preprocess, tokenizer, model_name = resolve_model(model_or_ckpt, device)
    if similarity == "late-interaction" and not hasattr(model, "encode_image_tokens"):
        raise EvalError(f"--similarity late-interaction needs per-token embeddings, which {type(model).__name__} "
                        "does not give (no encode_image_tokens); use --similarity pooled")
    if similarity == "late-interaction" and getattr(getattr(model, "cfg", None), "image_tower", "vit") != "vit":
        raise EvalError(f"--similarity late-interaction scores the ViT's patch tokens; this model's image tower "
                        f"(model.image_tower = '{model.cfg.image_tower}') has none: use --similarity pooled")
    common = dict(batch_size=batch_size, workers=workers, max_bad_fraction=max_bad_fraction, progress=progress)
    if shapes_split:
        shapes = shapes or checkpoint_shapes_config(model_or_ckpt)

    if shapes_split == "binding":
        from clipforge.eval.binding import evaluate_binding

        result = evaluate_binding(model, tokenizer, shapes, model.cfg.image_size,
                                  similarity=similarity, batch_size=batch_size, progress=progress)
    elif shapes_split:
        result = run_shapes_zeroshot(model, tokenizer, shapes, shapes_split,
                                     templates, similarity=similarity, batch_size=batch_size)
    elif task == "zeroshot":
        result = run_zeroshot(model, preprocess, tokenizer, spec, classnames, templates, max_samples=max_samples,
                              seed=seed, similarity=similarity, **common)
    elif task == "retrieval":
        result = run_retrieval(model, preprocess, tokenizer, spec, similarity=similarity, max_samples=max_samples,
                               seed=seed, **common)
    else:
        result = run_linear_probe(model, preprocess, train_spec, spec, classnames, fewshot_k, val_fraction,
                                  seed, nmtune=nmtune, **common)

    confusion = result.pop("_confusion", None)
    found = result.pop("_options", {})  # what zero-shot used: the given or the dataset folder's files
    output = {
        "task": task,
        "dataset": data,
        "model": model_name,
        "metrics": result.pop("metrics"),
        **result,
        "options": _without_none({
            "train_data": train_data, "classnames": str(classnames) if classnames else found.get("classnames"),
            "templates": found.get("templates"), "fewshot_k": fewshot_k, "max_samples": max_samples,
            "val_fraction": val_fraction if task == "linear-probe" else None, "seed": seed,
            "batch_size": batch_size, "workers": workers, "device": str(next(model.parameters()).device),
            "max_bad_fraction": max_bad_fraction,
            "similarity": similarity if task != "linear-probe" else None,
            "nmtune": True if nmtune else None,
        }),
        "clipforge_version": __version__,
    }
    if per_class and confusion is not None:
        output["per_class"] = per_class_accuracy(*confusion)
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
    if similarity != "pooled" and task == "linear-probe":
        raise EvalError(f"--similarity {similarity} scores images against texts (zeroshot, retrieval); a linear probe "
                        "reads pooled image features only: leave it out or pass --similarity pooled")


def parse_shapes_spec(data: str, task: str) -> str | None:
    """The split of a built-in ``shapes:<split>`` spec (None for data on disk)."""
    kind, _, split = data.partition(":")
    if kind != "shapes":
        return None
    if split not in SHAPES_SPLITS:
        raise EvalError(f"unknown built-in split '{data}'; the built-in evaluation data is "
                        f"{', '.join(f'shapes:{s} (--task {t})' for s, t in SHAPES_SPLITS.items())}")
    if task != SHAPES_SPLITS[split]:
        what = "captions against distractors" if split == "binding" else "every colour-shape class, zero-shot"
        raise EvalError(f"{data} is scored as {SHAPES_SPLITS[split]} ({what}); use --task {SHAPES_SPLITS[split]} "
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

    model, preprocess, tokenizer = load(checkpoint_dir(model_or_ckpt), device=pick_device(device))
    return model, preprocess, tokenizer, str(model_or_ckpt)


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory as given, or a run directory's (or its checkpoints/ folder's) latest one.

    The one notion of "model" of every verb that takes one (eval, embed, export, serve --ckpt): a
    checkpoint's model.safetensors stands for its directory too.
    """
    path = Path(path)
    if path.is_file():
        if path.name in ("model.safetensors", "config.json"):
            return path.parent
        from clipforge.train.checkpoint import CheckpointError

        raise CheckpointError(f"{path} is a file, not a checkpoint; pass the checkpoint directory (the one holding "
                              "model.safetensors and config.json) or the run directory")
    if not (path / "config.json").exists():
        # a run directory or its checkpoints/ folder: take the newest complete checkpoint
        for latest in (path / "checkpoints" / "latest", path / "latest"):
            if latest.exists():
                return latest
        from clipforge.train.checkpoint import CheckpointError

        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if (path / "checkpoints").is_dir() or (path / "recipe.toml").is_file():
            raise CheckpointError(f"{path} is a run directory without a checkpoint yet (no checkpoints/latest); "
                                  "train it further or pass a checkpoint directory")
        if path.is_dir():
            raise CheckpointError(f"{path} is neither a checkpoint (no config.json) nor a run directory (no "
                                  "checkpoints/latest); pass e.g. runs/t1 or runs/t1/checkpoints/step_0000100")
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
def run_zeroshot(model, preprocess, tokenizer, spec, classnames, templates, max_samples: int | None = None,
                 seed: int = 0, similarity: str = "pooled", **common) -> dict:
    data, names_file = read_zeroshot_data(spec, classnames)
    prompt_templates, templates_from = zeroshot_templates(templates, spec)
    result = score_zeroshot(model, preprocess, tokenizer, subset_classification(data, max_samples, seed),
                            prompt_templates, similarity=similarity, **common)
    result["_options"] = {"classnames": str(names_file) if names_file else None, "templates": templates_from}
    return result


def read_zeroshot_data(spec, classnames: str | Path | None):
    """(the labelled images, the class names file used): ``classnames``, else the dataset folder's own."""
    names_file = Path(classnames) if classnames else dataset_file(spec, CLASSNAMES_FILES)
    data = read_classification_data(spec, names_file)
    if names_file is None and data.classnames == data.class_ids and all(n.isdigit() for n in data.classnames):
        raise EvalError(f"{spec}: the classes are only numbers ({', '.join(data.classnames[:3])}, ...), so zero-shot "
                        "has nothing to put in its prompts; pass --classnames names.txt (one name per line, "
                        f"in class order) or put a {CLASSNAMES_FILES[0]} in the dataset folder")
    return data, names_file


def zeroshot_templates(templates: str | None, spec) -> tuple[list[str], str]:
    """(the prompt templates, where they came from): ``templates`` (a shipped set or a file), else the
    dataset folder's templates file, else the ``photo`` set."""
    if templates is None:
        found = dataset_file(spec, TEMPLATES_FILES)
        templates = str(found) if found else DEFAULT_TEMPLATES
    return read_templates(templates), templates


def read_templates(templates: str) -> list[str]:
    """A shipped set or a file of one template per line; a file may write the class name as
    CLIP_benchmark does, ``{c}``, instead of ``{}``."""
    from clipforge.eval.templates import TEMPLATE_SETS, resolve_templates

    path = Path(templates)
    if templates not in TEMPLATE_SETS and path.is_file():
        lines = [line.strip().replace("{c}", "{}") for line in path.read_text(encoding="utf-8").splitlines()]
        lines = [line for line in lines if line]
        bad = [t for t in lines if "{}" not in t]
        if not lines or bad:
            raise EvalError(f"templates file {templates}: every line needs '{{}}' (or '{{c}}') for the class name; "
                            f"bad: {bad[:3]}")
        return lines
    try:
        return resolve_templates(templates)
    except ValueError as e:  # FileNotFoundError is an OSError: the CLI reports it as it is
        raise EvalError(str(e)) from None


def dataset_file(spec, names: Sequence[str]) -> Path | None:
    """The first of ``names`` in the dataset folder: the image folder itself, then the folder above it
    (a dataset root holding split folders, as CLIP_benchmark lays them out), or a table's folder."""
    folders = [spec.path, spec.path.parent] if spec.kind == "imagefolder" else [spec.path.parent]
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def subset_indices(n: int, max_samples: int | None, seed: int = 0) -> list[int] | None:
    """A seeded random subset of 0..n-1 in order (None: keep all); the same for the same n and seed."""
    if max_samples is None or n <= max_samples:
        return None
    return sorted(random.Random(seed).sample(range(n), max_samples))


def subset_classification(data, max_samples: int | None, seed: int = 0):
    """At most ``max_samples`` of the images (all classes stay in the classifier)."""
    keep = subset_indices(len(data.paths), max_samples, seed)
    if keep is None:
        return data
    return dataclasses.replace(data, paths=[data.paths[i] for i in keep], labels=[data.labels[i] for i in keep])


def subset_captions(data, max_samples: int | None, seed: int = 0):
    """At most ``max_samples`` of the images, with all their captions."""
    keep = subset_indices(len(data.paths), max_samples, seed)
    if keep is None:
        return data
    new = {old: i for i, old in enumerate(keep)}
    pairs = [(c, new[o]) for c, o in zip(data.captions, data.text_to_image) if o in new]
    return dataclasses.replace(data, paths=[data.paths[i] for i in keep], captions=[c for c, _ in pairs],
                               text_to_image=[o for _, o in pairs])


def score_zeroshot(model, preprocess, tokenizer, data, prompt_templates: Sequence[str], similarity: str = "pooled",
                   **common) -> dict:
    """Zero-shot classification of read data (``ClassificationData``): the loop `clipforge eval` and
    the trainer's ``[[eval.tasks]]`` share."""
    from clipforge.eval.zeroshot import late_interaction_zero_shot_logits, zero_shot_classifier

    if similarity == "late-interaction":
        images = decoded_images(model, data.paths, preprocess, batch_size=common["batch_size"],
                                workers=common["workers"], max_bad_fraction=common["max_bad_fraction"])
        with progress_bar(len(data.paths), "scoring images (late interaction)", common["progress"]) as advance:
            images.advance = advance
            logits = late_interaction_zero_shot_logits(model, tokenizer, images, data.classnames, prompt_templates)
        require_some_images(images)
    else:
        images = embed_image_files(model, data.paths, preprocess, label="images", **common)
        classifier = zero_shot_classifier(model, tokenizer, data.classnames, prompt_templates).float().cpu()
        logits = images.embeds @ classifier.T
    labels = torch.tensor(data.labels)[images.ok]
    return {**classification_result(logits, labels, data.classnames, len(prompt_templates)),
            "data": _data_summary(len(data.paths), images, num_classes=len(data.classnames))}


def classification_result(logits: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str],
                          num_templates: int) -> dict:
    from clipforge.eval.zeroshot import classification_metrics

    return {
        "metrics": classification_metrics(logits, labels, len(classnames)),
        "classnames": list(classnames),
        "num_templates": num_templates,
        "_confusion": (confusion_matrix(logits.argmax(1), labels, len(classnames)), list(classnames)),
    }


def run_shapes_zeroshot(model, tokenizer, shapes_cfg, split: str, templates: str | None, *,
                        similarity: str = "pooled", batch_size: int = 64) -> dict:
    """Zero-shot on the built-in ``seen`` / ``unseen`` split of a shapes-trained checkpoint: the images,
    classes (all colour-shape pairs) and prompts (the ``shapes`` set) of the trainer's own evaluation,
    so ``--similarity pooled`` gives its ``zeroshot/<split>/...`` numbers."""
    from clipforge.data.synthetic import ShapesDataset, class_names
    from clipforge.eval.embedding import chunk_ranges, embed_images
    from clipforge.eval.hooks import late_interaction_split_logits
    from clipforge.eval.zeroshot import zero_shot_classifier

    dataset = ShapesDataset(shapes_cfg, model.cfg.image_size, seed=shapes_cfg.holdout_seed, split=split)
    n = len(dataset)
    names = class_names()
    prompt_templates = read_templates(templates or "shapes")
    if similarity == "late-interaction":  # the trainer's own zeroshot-li scoring
        logits = late_interaction_split_logits(model, tokenizer, dataset, batch_size, names, prompt_templates).cpu()
    else:
        classifier = zero_shot_classifier(model, tokenizer, names, prompt_templates).float().cpu()
        images = dataset.render_chunks(chunk_ranges(n, batch_size))
        logits = embed_images(model, images, out_device="cpu") @ classifier.T
    labels = torch.tensor([dataset.label_of(i) for i in range(n)])
    return {**classification_result(logits, labels, names, len(prompt_templates)),
            "data": {"images": n, "skipped": 0, "skipped_files": [], "classes": len(names)},
            "shapes": {"split": split, "seed": shapes_cfg.holdout_seed, "image_size": model.cfg.image_size},
            "_options": {"templates": templates or "shapes"}}


def run_retrieval(model, preprocess, tokenizer, spec, similarity: str = "pooled", max_samples: int | None = None,
                  seed: int = 0, **common) -> dict:
    data = subset_captions(read_caption_data(spec), max_samples, seed)
    return score_retrieval(model, preprocess, tokenizer, data, similarity=similarity, **common)


def score_retrieval(model, preprocess, tokenizer, data, similarity: str = "pooled", **common) -> dict:
    """Retrieval on read data (``CaptionData``); shared with the trainer's ``[[eval.tasks]]``."""
    from clipforge.eval.retrieval import retrieval_metrics

    if similarity == "late-interaction":
        return run_late_interaction_retrieval(model, preprocess, tokenizer, data, **common)
    images, captions, owners = _embed_pairs(model, preprocess, data, **common)
    texts = embed_text_list(model, tokenizer, captions, progress=common["progress"])
    metrics = retrieval_metrics(images.embeds, texts, owners, ks=RETRIEVAL_KS)
    return {
        "metrics": metrics,
        "data": {**_data_summary(len(data.paths), images), "captions": len(captions)},
    }


def _embed_pairs(model, preprocess, data, **common):
    """(image embeddings, the captions of the readable images, the embedding row each caption belongs to)."""
    images = embed_image_files(model, data.paths, preprocess, label="images", **common)
    # drop the captions of skipped images, renumbering the images that remain
    new_index = torch.cumsum(images.ok.long(), 0) - 1
    owners = torch.tensor(data.text_to_image)
    keep = images.ok[owners]
    captions = [c for c, k in zip(data.captions, keep.tolist()) if k]
    return images, captions, new_index[owners[keep]]


def score_val_loss(model, preprocess, tokenizer, data, pairs_per_batch: int, **common) -> dict:
    """The contrastive loss on held-out pairs (``CaptionData``), as training computes it on a batch:
    consecutive batches of ``pairs_per_batch`` image-caption pairs, the mean weighted by batch size.

    Each image is paired with its first caption: a second caption of the same image in a batch would
    count as a negative. ``clip_loss`` is CLIP's symmetric InfoNCE at the model's logit scale;
    ``siglip_loss`` (models with a logit bias) the sigmoid loss per image, as SigLIP trains.
    """
    from clipforge.objectives.contrastive import clip_loss
    from clipforge.objectives.sigmoid import siglip_loss

    images, captions, owners = _embed_pairs(model, preprocess, data, **common)
    first_caption: dict[int, int] = {}
    for j, row in enumerate(owners.tolist()):
        first_caption.setdefault(row, j)
    texts = embed_text_list(model, tokenizer, [captions[first_caption[i]] for i in range(len(images.embeds))],
                            progress=common["progress"])
    scale = model.logit_scale.detach().exp().float().cpu()
    bias = getattr(model, "logit_bias", None)
    bias = None if bias is None else bias.detach().float().cpu()
    sums = {"clip_loss": 0.0, **({"siglip_loss": 0.0} if bias is not None else {})}
    n = len(texts)
    for start in range(0, n, pairs_per_batch):
        x, y = images.embeds[start:start + pairs_per_batch], texts[start:start + pairs_per_batch]
        sums["clip_loss"] += clip_loss(x, y, scale).item() * len(x)
        if bias is not None:
            sums["siglip_loss"] += siglip_loss(x, y, scale, bias).item() * len(x)
    return {
        "metrics": {k: v / max(n, 1) for k, v in sums.items()},
        "data": {**_data_summary(len(data.paths), images), "pairs": n},
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
                     nmtune: bool = False, **common) -> dict:
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
        if nmtune:  # feature-space tuning with its regularisers instead of the L-BFGS probe (eval/nmtune.py)
            from clipforge.eval.nmtune import nmtune_probe

            probe = nmtune_probe(train_images.embeds, train_y, test_images.embeds, test_y, len(train.classnames),
                                 fewshot_k=fewshot_k, seed=seed)
        else:
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
def per_class_accuracy(counts: torch.Tensor, classnames: Sequence[str]) -> dict[str, dict]:
    """{class name: {"accuracy": top-1 recall of the class, "count": its test images}} from a confusion
    matrix (rows: true class); classes without test images are left out."""
    totals = counts.sum(dim=1)
    return {name: {"accuracy": float(counts[c, c] / totals[c]), "count": int(totals[c])}
            for c, name in enumerate(classnames) if totals[c] > 0}



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

    scored = result.get("options", {}).get("similarity")
    title = f"clipforge eval: {result['task']}" + (f" ({scored})" if scored and scored != "pooled" else "")
    table = Table(title=title, caption=f"{result['dataset']}\n{result['model']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(key, f"{100 * value:.2f}%")
    if "binding" in result:
        chance = result["binding"]["chance"]
        table.add_row("chance: binding_acc / per kind", f"{100 * chance['binding_acc']:.2f}% / 50.00%")
    if "linear_probe" in result:
        probe = result["linear_probe"]
        if probe.get("method") == "nmtune":  # no C sweep and no validation split
            table.add_row("NMTune (epochs, final alpha)", f"{probe['epochs']}, {probe['alpha']:.3g}")
            table.add_row("train / test samples", f"{probe['train_samples']} / {probe['test_samples']}")
        else:
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


# ----------------------------------------------------------------------------- several models, merged tables
def model_slug(model: str | Path) -> str:
    """A file-name-safe name for a checkpoint argument: ``runs/a/checkpoints/latest`` -> ``runs_a_checkpoints_latest``
    (for result file names)."""
    text = str(model).strip().strip("/")
    while text.startswith("./"):
        text = text[2:]
    return re.sub(r"[^\w.-]+", "_", text).strip("_.") or "model"


def result_paths(out: str | Path | None, models: Sequence[str], task: str, data: str) -> list[Path | None]:
    """Where each model's result JSON goes: ``out`` itself for one model; for several (or when ``out`` is
    a directory, or ends with a slash), ``out/<model>.json``; or a pattern with ``{model}`` (also
    ``{task}``, ``{dataset}``), as CLIP_benchmark's ``--output``."""
    if out is None:
        return [None] * len(models)
    out = str(out)
    if "{" in out:
        try:
            paths = [Path(out.format(model=model_slug(m), task=task, dataset=model_slug(data))) for m in models]
        except (KeyError, IndexError, ValueError) as e:
            raise EvalError(f"--out {out}: a pattern may use {{model}}, {{task}} and {{dataset}} only ({e})") from None
    elif len(models) == 1 and not (out.endswith(("/", "\\")) or Path(out).is_dir()):
        paths = [Path(out)]
    else:
        if out.endswith(".json") or Path(out).is_file():
            raise EvalError(f"--out {out}: with {len(models)} models, --out is a directory (results/) or a pattern "
                            "with {model} (results/{model}_zeroshot.json), so each model gets its own file")
        paths = [Path(out) / f"{model_slug(m)}.json" for m in models]
    if len(set(paths)) != len(paths):
        raise EvalError(f"--out {out}: two models would write the same file ({', '.join(map(str, paths))}); "
                        "use {model} in the pattern, or models whose paths differ")
    from clipforge.outputs import output_file

    try:
        return [output_file(p) for p in paths]
    except FileExistsError as e:
        raise EvalError(str(e)) from None


def merge_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per result JSON (``clipforge eval`` or CLIP_benchmark's ``eval``): model, pretrained,
    dataset, task, the metrics and the file, as CLIP_benchmark's ``build`` makes them. A directory
    stands for the .json files in it."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise EvalError(f"result file not found: {p}")
    if not files:
        raise EvalError(f"no .json result files in {', '.join(map(str, paths))}")
    rows = []
    for f in files:
        try:
            result = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise EvalError(f"{f}: not a JSON result file ({e})") from None
        if not isinstance(result, dict) or not isinstance(result.get("metrics"), dict):
            raise EvalError(f"{f}: not an evaluation result (it has no 'metrics' object)")
        rows.append({"model": result.get("model", ""), "pretrained": result.get("pretrained", ""),
                     "dataset": result.get("dataset", ""), "task": result.get("task", ""),
                     **{k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))},
                     "file": str(f)})
    return rows


def merged_columns(rows: list[dict[str, Any]]) -> list[str]:
    """model, [pretrained], dataset, task, every metric in first-seen order, file."""
    metrics = [k for row in rows for k in row if k not in ("model", "pretrained", "dataset", "task", "file")]
    head = ["model"] + (["pretrained"] if any(r["pretrained"] for r in rows) else []) + ["dataset", "task"]
    return head + list(dict.fromkeys(metrics)) + ["file"]


def write_merged_csv(rows: list[dict[str, Any]], out) -> None:
    """The merged rows as CSV to ``out`` (a path or an open text file); a missing metric is an empty cell."""
    import csv

    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=merged_columns(rows), restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    if hasattr(out, "write"):
        write(out)
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        write(f)


def merged_table(rows: list[dict[str, Any]]):
    """A rich Table of merged results (metric values as stored: fractions)."""
    from rich.table import Table

    columns = [c for c in merged_columns(rows) if c != "file"]
    table = Table(title=f"clipforge eval merge: {len(rows)} results")
    for c in columns:
        table.add_column(c, justify="right" if c not in ("model", "pretrained", "dataset", "task") else "left")
    for row in rows:
        table.add_row(*(f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns))
    return table
