"""Weight-space ensembles of checkpoints of one network: WiSE-FT and model soups.

    clipforge merge zeroshot/ finetuned/ --alpha 0.5 --out wise/    # WiSE-FT: (1 - α) θ_zero-shot + α θ_fine-tuned
    clipforge merge a/ b/ c/ --out soup/                            # a uniform soup: the mean of the weights
    clipforge merge a/ b/ --weights 0.7,0.3 --out mix/              # any convex combination
    clipforge merge a/ b/ c/ --greedy --data imagefolder:heldout/ --out soup/   # a greedy soup
    clipforge merge a/ b/ c/ --learned --data imagefolder:heldout/ --out soup/  # a learned soup

WiSE-FT (Wortsman et al., CVPR 2022) interpolates a zero-shot model and its fine-tuned version in
weight space: on the fine-tuning distribution it keeps most of the fine-tuned accuracy, under
distribution shift it is often better than both ends. Model soups (Wortsman et al., ICML 2022)
average models fine-tuned from one start; their greedy soup adds the models in order of held-out
accuracy, each only if the soup's held-out accuracy does not drop; their learned soup fits the mixing
weights themselves by gradient descent on the held-out loss. All need the models to be one
network with one tokenizer (the same ``model`` config, training-only keys aside); every
floating-point tensor of the state dict is averaged (the logit scale too), anything else must be
equal. The result is an ordinary model-only checkpoint: ``clipforge eval``, ``export``, ``embed``
and ``clipforge.load`` take it, and its ``config.json`` says which checkpoints and weights made it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clipforge.devices import pick_device
from clipforge.eval.evaluate import checkpoint_dir
from clipforge.train import checkpoint as ckpt

# model keys that only change training (patch dropout, ...), never the network: the ones a resume
# may change too (docs/training.md, "What may change on resume")
TRAINING_ONLY = ("patch_dropout", "token_selection", "attentive_block", "init_from")


class MergeError(ValueError):
    """Checkpoints that cannot be merged; the message says which and why."""


def merge_weights(paths: list[str | Path], weights: list[float] | None = None) -> tuple[dict, dict, list[float]]:
    """(merged state dict, the first checkpoint's config, the weights used) for ``paths``.

    ``weights`` (default: uniform) must be as many as the paths, each >= 0, summing to 1."""
    dirs = [checkpoint_dir(p) for p in paths]
    if len(dirs) < 2:
        raise MergeError("merge needs two or more checkpoints (for WiSE-FT: the zero-shot one, then the fine-tuned one)")
    weights = [1.0 / len(dirs)] * len(dirs) if weights is None else list(weights)
    if len(weights) != len(dirs):
        raise MergeError(f"{len(weights)} weights for {len(dirs)} checkpoints: give one weight per checkpoint")
    if any(w < 0 for w in weights) or not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise MergeError(f"weights {weights} must be >= 0 and sum to 1 (a convex combination: outside it the "
                         "interpolation leaves the segment between the models)")
    config = _one_network(dirs)
    states = [load_file(str(d / ckpt.WEIGHTS)) for d in dirs]
    return _average(dirs, states, weights), config, weights


def merge(paths: list[str | Path], out: str | Path, weights: list[float] | None = None) -> Path:
    """Write the weight-space average of ``paths`` to the new checkpoint directory ``out``."""
    state, config, weights = merge_weights(paths, weights)
    source = {"merge": [{"checkpoint": str(checkpoint_dir(p).resolve()), "weight": w} for p, w in zip(paths, weights)]}
    return write_merged(state, config, checkpoint_dir(paths[0]), out, source)


def greedy_soup(paths: list[str | Path], score: Callable[[dict[str, torch.Tensor]], float],
                log: Callable[[str], None] = lambda line: None) -> tuple[dict, dict, list[Path], list[dict]]:
    """Model soups' greedy recipe: (the soup's state dict, the first checkpoint's config, the
    checkpoints kept, what was scored).

    ``score`` maps a state dict to held-out accuracy (higher is better). Each model is scored alone;
    in that order, best first, a model joins when the uniform average of the soup and it scores at
    least as well as the soup without it (Wortsman et al. 2022, GreedySoup). Memory: the soup as a
    float64 sum, the best model, and the one candidate being scored."""
    dirs = [checkpoint_dir(p) for p in paths]
    if len(dirs) < 2:
        raise MergeError("a greedy soup needs two or more checkpoints to choose from")
    config = _one_network(dirs)
    first = load_file(str(dirs[0] / ckpt.WEIGHTS))
    scores = []
    for d in dirs:
        state = first if d == dirs[0] else load_file(str(d / ckpt.WEIGHTS))
        _check_same_tensors(dirs[0], first, d, state)
        scores.append(score(state))
        log(f"{d}: {scores[-1]:.4f} alone")
    del first, state
    order = sorted(range(len(dirs)), key=lambda i: -scores[i])  # stable: ties keep the given order
    best = load_file(str(dirs[order[0]] / ckpt.WEIGHTS))
    total = {k: t.double() for k, t in best.items() if t.is_floating_point()}
    kept, soup_score = [dirs[order[0]]], scores[order[0]]
    record = [{"checkpoint": str(kept[0].resolve()), "alone": soup_score, "soup": soup_score, "kept": True}]
    for i in order[1:]:
        state = load_file(str(dirs[i] / ckpt.WEIGHTS))
        with_it = score(_mean_with(total, len(kept), state))
        joins = with_it >= soup_score
        record.append({"checkpoint": str(dirs[i].resolve()), "alone": scores[i], "soup": with_it, "kept": joins})
        log(f"{dirs[i]}: soup of {len(kept) + 1} {with_it:.4f} vs {soup_score:.4f} -> {'kept' if joins else 'left out'}")
        if joins:
            kept.append(dirs[i])
            soup_score = with_it
            for k in total:
                total[k] += state[k].double()
    soup = {k: (total[k] / len(kept)).to(t.dtype) if k in total else t for k, t in best.items()}
    return soup, config, kept, record


def _mean_with(total: dict[str, torch.Tensor], count: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The uniform average of ``count`` models (their float64 ``total``) and ``state``."""
    return {k: ((total[k] + t.double()) / (count + 1)).to(t.dtype) if k in total else t for k, t in state.items()}


def merge_greedy(paths: list[str | Path], out: str | Path, score: Callable[[dict[str, torch.Tensor]], float],
                 log: Callable[[str], None] = lambda line: None) -> tuple[Path, list[dict]]:
    """greedy_soup written to ``out``; its record is kept in the checkpoint's config.json."""
    from clipforge.outputs import new_output_dir

    new_output_dir(out)  # refused before the scoring, not after it
    state, config, kept, record = greedy_soup(paths, score, log)
    source = {"merge": [{"checkpoint": str(d.resolve()), "weight": 1.0 / len(kept)} for d in kept],
              "greedy_soup": record}
    return write_merged(state, config, checkpoint_dir(paths[0]), out, source), record


def held_out_scorer(first: str | Path, task: str, data: str, metric: str | None = None, *,
                    device: str | None = None, **eval_options) -> tuple[Callable[[dict[str, torch.Tensor]], float], str]:
    """(score(state dict) -> ``metric`` of ``clipforge eval --task task --data data``, the metric's name)
    for greedy_soup: the first checkpoint's network, tokenizer and preprocessing, its recipe's
    shapes settings, another state loaded for each call. ``metric`` defaults to acc1 (zero-shot,
    linear probe) or image_retrieval_recall@1 (retrieval)."""
    from clipforge.api import load
    from clipforge.eval.evaluate import checkpoint_shapes_config, evaluate, normalise_task

    task = normalise_task(task)
    metric = metric or ("image_retrieval_recall@1" if task == "retrieval" else "acc1")
    model, preprocess, tokenizer = load(checkpoint_dir(first), device=pick_device(device))
    shapes = checkpoint_shapes_config(first)

    def score(state: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(state, strict=True)
        result = evaluate((model, preprocess, tokenizer), task, data, plots=False, shapes=shapes, **eval_options)
        if metric not in result["metrics"]:
            raise MergeError(f"--metric {metric!r} is not one of what --task {task} reports: "
                             f"{', '.join(sorted(result['metrics']))}")
        return float(result["metrics"][metric])

    return score, metric


# ----------------------------------------------------------------------------- learned soup
def mixing_group(key: str) -> str:
    """The layer a state-dict tensor belongs to, for a by-layer learned soup: its transformer block
    (``visual.blocks.3``), else its module (``visual.ln_post``, ``visual`` for the position embedding)."""
    parts = key.split(".")
    if "blocks" in parts[:-1]:
        return ".".join(parts[:parts.index("blocks") + 2])
    return ".".join(parts[:-1]) or key


def held_out_labelled(first: str | Path, data: str, max_samples: int | None = None, seed: int = 0,
                      ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """(uint8 N x 3 x H x W images, labels, class names, prompt templates) of zero-shot data as
    ``clipforge eval --task zeroshot --data data`` reads it for the checkpoint ``first``: a built-in
    ``shapes:seen`` / ``shapes:unseen`` split, or labelled images on disk (the dataset's own class
    names and templates file, else the ``photo`` templates)."""
    from PIL import Image

    from clipforge.api import load
    from clipforge.data.sources import parse_data_spec
    from clipforge.eval.evaluate import (checkpoint_shapes_config, parse_shapes_spec, read_templates,
                                         read_zeroshot_data, subset_classification, zeroshot_templates)

    split = parse_shapes_spec(data, "zeroshot")
    if split:
        from clipforge.data.synthetic import ShapesDataset, class_names

        shapes = checkpoint_shapes_config(first)
        size = ckpt.model_config_from(ckpt.read_config(checkpoint_dir(first))).image_size
        dataset = ShapesDataset(shapes, size, seed=shapes.holdout_seed, split=split)
        images = dataset.render_batch(list(range(len(dataset))))[0]
        labels = torch.tensor([dataset.label_of(i) for i in range(len(dataset))])
        return images, labels, class_names(), read_templates("shapes")
    spec = parse_data_spec(data)
    found, _ = read_zeroshot_data(spec, None)
    found = subset_classification(found, max_samples, seed)
    _, preprocess, _ = load(checkpoint_dir(first))
    images = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in found.paths])
    return images, torch.tensor(found.labels), list(found.classnames), zeroshot_templates(None, spec)[0]


def learned_soup(paths: list[str | Path], images: torch.Tensor, labels: torch.Tensor, classnames: list[str],
                 templates: list[str], *, steps: int = 100, lr: float = 0.05, per: str = "model",
                 fit_temperature: bool = True,
                 batch_size: int = 256, seed: int = 0, device: str = "cpu",
                 log: Callable[[str], None] = lambda line: None) -> tuple[dict, dict, dict]:
    """Model soups' learned soup: mixing weights fitted by gradient descent on held-out zero-shot
    cross-entropy; returns (the soup's state dict, the first checkpoint's config, the record).

    The soup is sum_i alpha_i theta_i with alpha = softmax(w) (a convex combination, uniform at the
    start): ``per`` = "model", one alpha per model; "layer" (the paper's "by layer"), one per model for
    every transformer block and every other module (``mixing_group``); "tensor", one for every tensor. The loss is zero-shot classification cross-entropy of the soup on the held-out
    images (class embeddings = the mean of the normalised prompt embeddings, normalised, recomputed through
    the soup every step), ``batch_size`` images a step; Adam at ``lr``. The logits are the soup's logit scale
    times a temperature fitted beside the weights (``fit_temperature``; the paper's, so that the weights
    need not calibrate the loss; it is not part of the soup), or times 1.
    Every model is in memory (float32). The record holds each model's held-out accuracy alone, the
    uniform and the learned soup's, and the alphas."""
    from torch.func import functional_call

    from clipforge.eval.zeroshot import filled_prompts
    from clipforge.models.clip import CLIP
    from clipforge.models.tokenizer import load_tokenizer

    dirs = [checkpoint_dir(p) for p in paths]
    if len(dirs) < 2:
        raise MergeError("a learned soup needs two or more checkpoints to mix")
    if per not in ("model", "layer", "tensor"):
        raise MergeError(f"a learned soup mixes per model, layer or tensor, got {per!r}")
    if steps < 0 or lr <= 0:
        raise MergeError(f"a learned soup takes steps >= 0 and lr > 0, got {steps} and {lr}")
    device = pick_device(device)
    config = _one_network(dirs)
    states = [load_file(str(d / ckpt.WEIGHTS)) for d in dirs]
    for d, state in zip(dirs[1:], states[1:]):
        _check_same_tensors(dirs[0], states[0], d, state)
    model = CLIP(ckpt.model_config_from(config)).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    keys = [k for k, t in states[0].items() if t.is_floating_point()]
    stacked = {k: torch.stack([s[k].float() for s in states]).to(device) for k in keys}  # models x shape
    fixed = {k: t.to(device) for k, t in states[0].items() if k not in stacked}
    tokenizer = load_tokenizer(config["tokenizer"], dirs[0])
    ids, mask = (t.to(device) for t in tokenizer(filled_prompts(tokenizer, classnames, templates)))
    images, labels = images.to(device), labels.to(device)
    n, k = len(labels), len(dirs)

    groups = {"model": [""] * len(keys), "tensor": keys, "layer": [mixing_group(key) for key in keys]}[per]
    names = list(dict.fromkeys(groups))  # one row of mixing weights per group, in the state dict's order
    row = [names.index(g) for g in groups]

    def soup(alpha: torch.Tensor) -> dict[str, torch.Tensor]:  # alpha: groups x k (or 1 x k: one model's)
        return {**fixed, **{key: torch.tensordot(alpha[row[i] if len(alpha) > 1 else 0], stacked[key], dims=1)
                            for i, key in enumerate(keys)}}

    log_t = torch.zeros((), device=device, requires_grad=fit_temperature)  # the fitted temperature, log

    def class_embeddings(params: dict) -> torch.Tensor:  # every prompt through the soup's text tower
        text = functional_call(model, params, (None, ids, mask))["text_embeds"]
        return F.normalize(text.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)

    def loss_and_hits(params: dict, classes: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(model, params, (images[rows], None, None))
        logits = log_t.exp() * out["logit_scale"] * out["image_embeds"] @ classes.T
        return F.cross_entropy(logits, labels[rows], reduction="sum"), (logits.argmax(1) == labels[rows]).sum()

    @torch.no_grad()
    def held_out(alpha: torch.Tensor) -> tuple[float, float]:
        params, loss, hits = soup(alpha), 0.0, 0
        classes = class_embeddings(params)  # once for every image chunk
        for start in range(0, n, batch_size):
            part = loss_and_hits(params, classes, torch.arange(start, min(start + batch_size, n), device=device))
            loss, hits = loss + float(part[0]), hits + int(part[1])
        return loss / n, hits / n

    alone = [held_out(torch.eye(k, device=device)[i:i + 1])[1] for i in range(k)]
    for d, acc in zip(dirs, alone):
        log(f"{d}: {acc:.4f} alone")
    w = torch.zeros(len(names), k, device=device, requires_grad=True)
    uniform_loss, uniform_acc = held_out(torch.softmax(w.detach(), dim=-1))
    log(f"uniform soup: loss {uniform_loss:.4f}, acc1 {uniform_acc:.4f}")
    optimizer = torch.optim.Adam([w, log_t] if fit_temperature else [w], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        rows = torch.randperm(n, generator=g)[:batch_size].to(device)
        params = soup(torch.softmax(w, dim=-1))
        loss, _ = loss_and_hits(params, class_embeddings(params), rows)
        optimizer.zero_grad()
        (loss / len(rows)).backward()
        optimizer.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            log(f"step {step}/{steps}: held-out batch loss {float(loss.detach()) / len(rows):.4f}")
    alpha = torch.softmax(w.detach(), dim=-1)
    loss, acc = held_out(alpha)
    log(f"learned soup: loss {loss:.4f}, acc1 {acc:.4f}; alphas {[round(a, 4) for a in alpha.mean(0).tolist()]}"
        + (f"; temperature {float(log_t.exp()):.3f}" if fit_temperature else ""))
    merged = {key: t for key, t in states[0].items() if key not in stacked}
    for i, key in enumerate(keys):  # the final mix in float64, stored in the checkpoint's dtype
        a = alpha[row[i]].double().cpu()
        merged[key] = sum(a[j] * states[j][key].double() for j in range(k)).to(states[0][key].dtype)
    record = {"models": [{"checkpoint": str(d.resolve()), "acc1_alone": acc_i, "alpha": float(a)}
                         for d, acc_i, a in zip(dirs, alone, alpha.mean(0).tolist())],
              "uniform": {"loss": uniform_loss, "acc1": uniform_acc}, "learned": {"loss": loss, "acc1": acc},
              "temperature": float(log_t.exp()) if fit_temperature else None,
              "steps": steps, "lr": lr, "per": per, "groups": len(names), "batch_size": batch_size, "seed": seed,
              "held_out_images": n}
    return merged, config, record


def merge_learned(paths: list[str | Path], out: str | Path, data: str, *, max_samples: int | None = None,
                  log: Callable[[str], None] = lambda line: None, **options) -> tuple[Path, dict]:
    """learned_soup on ``data`` (zero-shot, read as clipforge eval reads it) written to ``out``; its record
    and alphas are kept in the checkpoint's config.json."""
    from clipforge.outputs import new_output_dir

    new_output_dir(out)  # refused before the fitting, not after it
    images, labels, classnames, templates = held_out_labelled(paths[0], data, max_samples)
    state, config, record = learned_soup(paths, images, labels, classnames, templates, log=log, **options)
    record["data"] = data
    source = {"merge": [{"checkpoint": m["checkpoint"], "weight": m["alpha"]} for m in record["models"]],
              "learned_soup": record}
    return write_merged(state, config, checkpoint_dir(paths[0]), out, source), record


def write_merged(state: dict[str, torch.Tensor], config: dict, first: Path, out: str | Path, source: dict) -> Path:
    """A model-only checkpoint of ``state`` (the network and tokenizer of ``first``) in ``out``."""
    from clipforge.models.clip import CLIP
    from clipforge.models.convert import write_model_checkpoint
    from clipforge.models.tokenizer import load_tokenizer

    model_cfg = ckpt.model_config_from(config)
    model = CLIP(model_cfg)
    model.load_state_dict(state, strict=True)
    tokenizer = load_tokenizer(config["tokenizer"], first)
    return write_model_checkpoint(out, model, tokenizer, ckpt.checkpoint_config(model_cfg, tokenizer, source=source))


def _one_network(dirs: list[Path]) -> dict:
    """The first checkpoint's config, once every checkpoint is the same network and tokenizer."""
    configs = [ckpt.read_config(d) for d in dirs]
    for d, config in zip(dirs[1:], configs[1:]):
        _check_same_network(dirs[0], configs[0], d, config)
    return configs[0]


def _check_same_network(first: Path, a: dict, other: Path, b: dict) -> None:
    model_a = {k: v for k, v in a["model"].items() if k not in TRAINING_ONLY}
    model_b = {k: v for k, v in b["model"].items() if k not in TRAINING_ONLY}
    differ = sorted(k for k in model_a.keys() | model_b.keys() if model_a.get(k) != model_b.get(k))
    if differ:
        shown = ", ".join(f"model.{k}: {model_a.get(k)!r} vs {model_b.get(k)!r}" for k in differ[:4])
        raise MergeError(f"{first} and {other} are different networks ({shown}); weight averaging needs one "
                         "architecture, e.g. a fine-tuned model and the checkpoint it started from")
    if a["tokenizer"] != b["tokenizer"] or _tokenizer_bytes(first) != _tokenizer_bytes(other):
        raise MergeError(f"{first} and {other} have different tokenizers: the merged text tower would read "
                         "token ids one of them never saw. Merge models that share a tokenizer (fine-tuning keeps it)")


def _tokenizer_bytes(directory: Path) -> bytes | None:
    from clipforge.models.tokenizer import TOKENIZER_FILE

    path = directory / TOKENIZER_FILE
    return path.read_bytes() if path.is_file() else None


def _average(dirs: list[Path], states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    for d, state in zip(dirs[1:], states[1:]):
        _check_same_tensors(dirs[0], states[0], d, state)
    merged = {}
    for key, first in states[0].items():
        if first.is_floating_point():  # averaged in float64, stored in the checkpoint's dtype
            merged[key] = sum(w * state[key].double() for w, state in zip(weights, states)).to(first.dtype)
        else:  # equal in every checkpoint (checked)
            merged[key] = first
    return merged


def _check_same_tensors(first: Path, a: dict[str, torch.Tensor], other: Path, b: dict[str, torch.Tensor]) -> None:
    """The same tensor names and shapes, and equal non-float tensors (which cannot be averaged)."""
    if a.keys() != b.keys():
        missing = sorted(a.keys() - b.keys())[:3] or sorted(b.keys() - a.keys())[:3]
        raise MergeError(f"{other} holds other tensors than {first} ({missing}...): not the same network")
    for key, t in a.items():
        if b[key].shape != t.shape:
            raise MergeError(f"{key}: shapes {[tuple(t.shape), tuple(b[key].shape)]} differ between the checkpoints")
        # BatchNorm's step counter (ResNet tower) is unused with a momentum set: the first model's is kept
        if not t.is_floating_point() and not torch.equal(b[key], t) and not key.endswith(".num_batches_tracked"):
            raise MergeError(f"{key} is not floating point and differs between the checkpoints: it cannot be averaged")
