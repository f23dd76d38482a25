"""A self-contained HTML report of a run: curves, zero-shot over training, confusion matrix, and a
grid of text -> image retrieval examples with thumbnails. Everything is inlined (base64 PNG), so
the file can be mailed or opened from anywhere.

    clipforge report runs/t1        # (re)builds runs/t1/report.html
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import torch

PALETTE = {"seen": "#1f77b4", "unseen": "#d62728"}


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training step records, evaluation records) from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a clipforge run directory?")
    train, evals = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        (train if "loss" in rec else evals).append(rec)
    return train, evals


def _figure_to_data_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _png_data_uri(image_hwc: np.ndarray, scale: int = 2) -> str:
    from PIL import Image

    img = Image.fromarray(image_hwc)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plot_curves(train: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for ax, key, title in zip(axes, ("loss", "lr", "logit_scale"),
                              ("training loss", "learning rate", "logit scale t = 1/temperature")):
        ax.plot(steps, [r.get(key, float("nan")) for r in train], lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _figure_to_data_uri(fig)


def plot_zeroshot(evals: list[dict]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in evals if "zeroshot/unseen/acc1" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for split, colour in PALETTE.items():
        ax.plot([r["step"] for r in rows], [100 * r[f"zeroshot/{split}/acc1"] for r in rows],
                marker="o", color=colour, label=f"{split} compositions")
    ax.set_ylim(0, 100)
    ax.set_xlabel("step")
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_title("zero-shot accuracy over training")
    ax.grid(alpha=0.3)
    ax.legend()
    return _figure_to_data_uri(fig)


def plot_confusion(pred: torch.Tensor, labels: torch.Tensor, names: list[str], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = sorted(set(labels.tolist()))
    matrix = np.zeros((len(present), len(names)))
    for p, l in zip(pred.tolist(), labels.tolist()):
        matrix[present.index(l), p] += 1
    matrix /= np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(12, 0.22 * len(present) + 2))
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(present)), [names[i] for i in present], fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return _figure_to_data_uri(fig)


@torch.no_grad()
def retrieval_examples(model, tokenizer, recipe, queries_per_split: int = 4, k: int = 6) -> list[dict]:
    """Text -> image search over the seen+unseen eval images for a few class prompts."""
    from clipforge.data.loader import build_eval_set
    from clipforge.data.synthetic import class_names
    from clipforge.eval.embedding import embed_captions, embed_images
    from clipforge.eval.zeroshot import fill_template

    names = class_names()
    images, labels = [], []
    for split in ("seen", "unseen"):
        ds = build_eval_set(recipe.data, recipe.model.image_size, split)
        batch_images, _, batch_labels = ds.render_batch(range(len(ds)))
        images.append(batch_images)
        labels.append(batch_labels)
    images, labels = torch.cat(images), torch.cat(labels)
    img_emb = embed_images(model, images, batch_size=256)
    rows = []
    for split in ("unseen", "seen"):
        ds = build_eval_set(recipe.data, recipe.model.image_size, split)
        classes = sorted(ds.classes)
        for label in classes[:: max(1, len(classes) // queries_per_split)][:queries_per_split]:
            query = fill_template("a {}", names[label])
            scores = (img_emb @ embed_captions(model, tokenizer, [query]).T).squeeze(1)
            top = scores.topk(k).indices.cpu()
            rows.append({
                "query": query,
                "split": split,
                "hits": [
                    {"uri": _png_data_uri(images[i].permute(1, 2, 0).numpy()),
                     "correct": bool(labels[i] == label), "score": float(scores[i])}
                    for i in top.tolist()
                ],
            })
    return rows


def _summary_table(result: dict) -> str:
    rows = []
    for split in ("seen", "unseen"):
        cells = [result.get(f"zeroshot/{split}/{m}") for m in ("acc1", "acc5", "mean_per_class_recall")]
        cells += [result.get(f"retrieval/{split}/{m}") for m in ("image_retrieval_recall@1", "text_retrieval_recall@1")]
        rows.append(f"<tr><th>{split}</th>" + "".join(
            f"<td>{100 * c:.1f}</td>" if c is not None else "<td>-</td>" for c in cells) + "</tr>")
    return ("<table><tr><th>compositions</th><th>zero-shot top-1</th><th>top-5</th><th>mean per-class recall</th>"
            "<th>text→image R@1</th><th>image→text R@1</th></tr>" + "".join(rows) + "</table>")


def write_report(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Build ``<run_dir>/report.html`` from metrics.jsonl and the latest checkpoint."""
    from clipforge.api import load
    from clipforge.config import Recipe
    from clipforge.data.synthetic import class_names
    from clipforge.eval.hooks import evaluate_shapes
    from clipforge.train.checkpoint import read_config

    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    checkpoint = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "latest"
    recipe = Recipe.model_validate(read_config(checkpoint)["recipe"])
    model, _, tokenizer = load(checkpoint)
    sections = [f"<h2>Training</h2><img src='{plot_curves(train)}'>"] if train else []
    zs_plot = plot_zeroshot(evals)
    if zs_plot:
        sections.append(f"<h2>Zero-shot on seen vs unseen compositions</h2><img src='{zs_plot}'>")
    if recipe.data.train == "shapes":
        result = evaluate_shapes(model, tokenizer, recipe, with_predictions=True)
        names = class_names()
        sections.insert(0, "<h2>Final evaluation (%)</h2>" + _summary_table(result))
        for split in ("unseen", "seen"):
            pred, labels = result[f"predictions/{split}"]
            sections.append(f"<h2>Confusion matrix: {split} compositions</h2><img src='"
                            + plot_confusion(pred, labels, names, f"{split} compositions (rows: true class)") + "'>")
        grid = []
        for row in retrieval_examples(model, tokenizer, recipe):
            thumbs = "".join(
                f"<figure class='{'ok' if h['correct'] else 'bad'}'><img src='{h['uri']}'>"
                f"<figcaption>{h['score']:.2f}</figcaption></figure>" for h in row["hits"])
            grid.append(f"<div class='row'><div class='q'>“{html.escape(row['query'])}”"
                        f"<span>{row['split']}</span></div>{thumbs}</div>")
        sections.append("<h2>Text → image retrieval (green: right class)</h2>" + "".join(grid))
    page = _PAGE.format(title=html.escape(f"clipforge report: {run_dir.name}"),
                        subtitle=html.escape(f"recipe {recipe.name} · {len(train)} logged steps · checkpoint {checkpoint.resolve().name}"),
                        body="\n".join(sections))
    out = run_dir / "report.html"
    out.write_text(page)
    return out


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
h1 {{ margin-bottom: 0; }} .sub {{ color: #666; margin-top: .3em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
img {{ max-width: 100%; }}
.row {{ display: flex; align-items: center; gap: 6px; margin: 4px 0; }}
.q {{ width: 220px; font-weight: 600; }} .q span {{ display: block; font-weight: 400; color: #888; font-size: 12px; }}
figure {{ margin: 0; padding: 2px; border: 3px solid; text-align: center; font-size: 11px; }}
figure.ok {{ border-color: #2ca02c; }} figure.bad {{ border-color: #d62728; }}
figure img {{ width: 96px; height: 96px; image-rendering: pixelated; display: block; }}
</style></head>
<body><h1>{title}</h1><p class="sub">{subtitle}</p>
{body}
</body></html>
"""
