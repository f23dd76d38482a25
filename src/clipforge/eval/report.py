"""A self-contained HTML report of a run: what ran where (hardware, wall time, throughput), the
recipe, training curves (loss, lr, logit scale, grad norm, in-batch accuracy, img/s), zero-shot over
training, confusion matrices, and text -> image retrieval examples (successes and failures) with
thumbnails. Everything is inlined (base64 PNG), so the file can be mailed or opened from anywhere.
When the run logs to TensorBoard, the figures are added there too (IMAGES tab).

    clipforge report runs/t1        # (re)builds runs/t1/report.html
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

PALETTE = {"seen": "#1f77b4", "unseen": "#d62728"}
ACCURACY_SUFFIXES = ("i2t_acc", "t2i_acc", "pair_acc")  # in-batch accuracies the objectives log


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training step records, evaluation records) from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a clipforge run directory?")
    from clipforge.train.logs import read_metric_records

    train, evals = [], []
    for rec in read_metric_records(path):
        (train if "loss" in rec else evals).append(rec)
    return train, evals


def read_run_info(run_dir: Path) -> list[dict]:
    """The sessions in run_info.json (one per process start); [] for runs written before it existed."""
    try:
        return json.loads((run_dir / "run_info.json").read_text()).get("sessions", [])
    except (OSError, ValueError, AttributeError):
        return []


def _checkpoint_state(checkpoint: Path) -> dict:
    """step and elapsed_s of a checkpoint (memory-mapped: the optimizer state is not read)."""
    try:
        state = torch.load(checkpoint / "train_state.pt", map_location="cpu", weights_only=True, mmap=True)
        return {"step": int(state["step"]), "elapsed_s": float(state.get("elapsed_s", float("nan")))}
    except Exception:  # a report should not fail on this: fall back to the directory name
        name = checkpoint.resolve().name
        step = int(name.split("_")[-1]) if name.split("_")[-1].isdigit() else None
        return {"step": step, "elapsed_s": float("nan")}


class _Figures:
    """Figures in page order: a data URI for the HTML now, the figure for TensorBoard later."""

    def __init__(self) -> None:
        self.items: list[tuple[str, object]] = []

    def add(self, tag: str, fig) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        self.items.append((tag, fig))
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def to_tensorboard(self, logdir: Path, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(logdir))
        try:
            for tag, fig in self.items:
                writer.add_figure(tag, fig, step, close=False)
        finally:
            writer.close()

    def close(self) -> None:
        import matplotlib.pyplot as plt

        for _, fig in self.items:
            plt.close(fig)
        self.items = []


def _png_data_uri(image_hwc: np.ndarray, scale: int = 2) -> str:
    from PIL import Image

    img = Image.fromarray(image_hwc)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short_number(x: float, _pos=None) -> str:
    """Step ticks that stay short (250k, 1.2M) so neighbouring labels never run into each other."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:g}"


def _step_axis(ax, steps: list[int]) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    distinct = sorted(set(steps))
    if len(distinct) <= 5:  # a short or stopped run: tick the logged steps themselves (never "2.88")
        ax.set_xticks(distinct)
        if len(distinct) == 1:
            ax.set_xlim(distinct[0] - 1, distinct[0] + 1)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(_short_number))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _smoothed(values: list[float], window: int) -> np.ndarray:
    """Running mean (NaNs ignored) to read a trend through per-step noise."""
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    kernel = np.ones(window)
    num = np.convolve(np.where(ok, v, 0.0), kernel, mode="same")
    den = np.convolve(ok.astype(float), kernel, mode="same")
    return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)


def _plot_series(ax, steps, values, label=None, smooth: bool = True) -> None:
    """Per-step values; noisy ones (``smooth``) get a running mean on top, in the same colour, when
    there are many points; few points get markers (a single logged step has no line to draw)."""
    if smooth and len(values) > 50:
        (raw,) = ax.plot(steps, values, lw=0.8, alpha=0.3)
        ax.plot(steps, _smoothed(values, max(5, len(values) // 50)), lw=1.4, color=raw.get_color(), label=label)
    else:
        ax.plot(steps, values, lw=1.2, label=label, marker="o" if len(values) <= 20 else None, ms=3)


def plot_curves(train: list[dict], grad_clip: float | None = None):
    """Loss, lr, logit scale, gradient norm, in-batch accuracy and throughput against the step."""
    plt = _pyplot()
    steps = [r["step"] for r in train]

    def col(key):
        return [r.get(key, float("nan")) for r in train]

    fig, axes = plt.subplots(2, 3, figsize=(10.5, 5.8), layout="constrained")
    (loss_ax, lr_ax, t_ax), (g_ax, acc_ax, ips_ax) = axes
    _plot_series(loss_ax, steps, col("loss"), "total")
    terms = sorted({k for r in train for k in r if k.endswith("/loss")})
    if len(terms) > 1:  # several objective terms: each one's share
        for key in terms:
            _plot_series(loss_ax, steps, col(key), key.removesuffix("/loss"))
        loss_ax.legend(fontsize=8)
    loss_ax.set_title("training loss")
    _plot_series(lr_ax, steps, col("lr"), smooth=False)
    lr_ax.set_title("learning rate")
    _plot_series(t_ax, steps, col("logit_scale"), smooth=False)
    t_ax.set_title("logit scale t = 1/temperature")
    _plot_series(g_ax, steps, col("grad_norm"))
    if grad_clip is not None:
        g_ax.axhline(grad_clip, color="#d62728", ls="--", lw=1, label=f"clip at {grad_clip:g}")
        g_ax.legend(fontsize=8)
    norms = [v for v in col("grad_norm") if math.isfinite(v)]
    if norms and min(norms) > 0 and max(norms) / min(norms) > 30:  # spans decades: log scale, plain labels
        from matplotlib.ticker import FuncFormatter, NullFormatter

        g_ax.set_yscale("log")
        g_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        g_ax.yaxis.set_minor_formatter(NullFormatter())
    g_ax.set_title("gradient norm (before clipping)")
    acc_keys = sorted({k for r in train for k in r if k.endswith(ACCURACY_SUFFIXES)})
    for key in acc_keys:
        _plot_series(acc_ax, steps, [100 * v for v in col(key)], key)
    if acc_keys:
        acc_ax.set_ylim(0, 100)
        acc_ax.legend(fontsize=8)
    else:
        acc_ax.text(0.5, 0.5, "not logged by this objective", ha="center", va="center", transform=acc_ax.transAxes)
    acc_ax.set_title("in-batch accuracy (%)")
    _plot_series(ips_ax, steps, col("img_per_s"))
    ips_ax.set_ylim(bottom=0)
    ips_ax.set_title("throughput (images/s, all ranks)")
    for ax in axes.flat:
        _step_axis(ax, steps)
        if ax.get_yscale() != "log":  # 2e-4 as "2" with "1e-4" on top, never an offset like "+1.4e1"
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    return fig


def plot_zeroshot(evals: list[dict], final: dict | None = None):
    """Zero-shot top-1 over training; ``final`` = {"step", "seen", "unseen"} marks the report's own evaluation."""
    plt = _pyplot()
    rows = [r for r in evals if "zeroshot/unseen/acc1" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.4), layout="constrained")
    for split, colour in PALETTE.items():
        ax.plot([r["step"] for r in rows], [100 * r[f"zeroshot/{split}/acc1"] for r in rows],
                marker="o", color=colour, label=f"{split} compositions")
        token_rows = [r for r in rows if f"zeroshot-li/{split}/acc1" in r]  # eval.late_interaction (FILIP)
        if token_rows:
            ax.plot([r["step"] for r in token_rows], [100 * r[f"zeroshot-li/{split}/acc1"] for r in token_rows],
                    marker="s", ls="--", color=colour, label=f"{split}, late interaction")
        if final is not None and final["step"] != rows[-1]["step"]:
            ax.plot([final["step"]], [100 * final[split]], marker="*", ms=13, color=colour, ls="none")
    if final is not None and final["step"] != rows[-1]["step"]:
        ax.plot([], [], marker="*", ms=11, color="#555", ls="none", label="final evaluation (checkpoint)")
    ax.set_ylim(0, 100)
    ax.set_ylabel("zero-shot top-1 (%)")
    ax.set_title("zero-shot accuracy over training")
    _step_axis(ax, [r["step"] for r in rows] + ([final["step"]] if final else []))
    ax.legend(fontsize=8)
    return fig


def plot_confusion(pred: torch.Tensor, labels: torch.Tensor, names: list[str], title: str):
    """Rows: the true classes present in the split; columns: every class. Cells are sized so that
    tick labels (one per class, at most ~9 pt) never overlap; a colour bar gives the scale."""
    plt = _pyplot()
    present = sorted(set(labels.tolist()))
    matrix = np.zeros((len(present), len(names)))
    for p, l in zip(pred.tolist(), labels.tolist()):
        matrix[present.index(l), p] += 1
    matrix /= np.maximum(matrix.sum(1, keepdims=True), 1)
    cell = min(0.22, max(0.1, 7.8 / len(names)))  # inches per class: the plot stays ~8 in wide
    font = min(9.0, 0.75 * 72 * cell)  # a label's height is ~font/72 in, so 0.75 leaves a gap between labels
    every = max(1, math.ceil(5.0 / font)) if font < 5 else 1  # too many classes: label every n-th
    font = max(font, 5.0)
    longest = max(len(n) for n in names)
    label_in = 0.55 * font / 72 * longest  # room the rotated column labels and the row labels take
    fig, ax = plt.subplots(figsize=(len(names) * cell + label_in + 1.6, len(present) * cell + label_in + 0.9),
                           layout="constrained")
    im = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(0, len(present), every), [names[i] for i in present][::every], fontsize=font)
    ax.set_xticks(range(0, len(names), every), names[::every], rotation=90, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    # a thin bar (~0.15 in) whatever the height; the label is short enough for a 10-row matrix
    bar = fig.colorbar(im, ax=ax, pad=0.01, aspect=max(8.0, len(present) * cell / 0.15))
    bar.set_label("share of row")
    bar.ax.tick_params(labelsize=8)
    return fig


@torch.no_grad()
def retrieval_examples(model, tokenizer, recipe, per_kind: int = 2, k: int = 6) -> list[dict]:
    """Text -> image search ("a <class>") over the seen+unseen eval images. For each split, the
    ``per_kind`` queries with the most right images in their top ``k`` ("best") and the ``per_kind``
    with the fewest ("worst", only queries with a wrong image): a grid of successes alone hides what
    the model gets wrong."""
    from clipforge.data.loader import build_eval_set
    from clipforge.data.synthetic import class_names
    from clipforge.eval.embedding import embed_captions, embed_images
    from clipforge.eval.zeroshot import fill_template

    names = class_names()
    images, labels, splits = [], [], {}
    for split in ("seen", "unseen"):
        ds = build_eval_set(recipe.data, recipe.model.image_size, split)
        batch_images, _, batch_labels = ds.render_batch(range(len(ds)))
        images.append(batch_images)
        labels.append(batch_labels)
        splits[split] = sorted(ds.classes)
    images, labels = torch.cat(images), torch.cat(labels).cpu()
    img_emb = embed_images(model, images, batch_size=256)
    rows = []
    for split in ("unseen", "seen"):
        classes = splits[split]
        queries = [fill_template("a {}", names[c]) for c in classes]
        scores = (img_emb @ embed_captions(model, tokenizer, queries).T).cpu()  # images x queries
        ranked = []
        for j, label in enumerate(classes):
            s = scores[:, j]
            top = s.topk(k).indices
            right = int((labels[top] == label).sum())
            # rank of the best-scoring right image: how far off a failure is
            first_right = int((s > s[labels == label].max()).sum()) + 1 if (labels == label).any() else None
            ranked.append((right, j, label, top, first_right))
        ranked.sort(key=lambda t: (-t[0], t[4] or 10**9, t[1]))  # most right first, then best first-right rank
        chosen = [("best", t) for t in ranked[:per_kind]]
        failures = [t for t in ranked[per_kind:][::-1] if t[0] < k][:per_kind]
        chosen += [("worst", t) for t in failures]
        for kind, (right, j, label, top, first_right) in chosen:
            rows.append({
                "query": queries[j], "split": split, "kind": kind, "right": right, "k": k,
                "first_right": first_right,
                "hits": [{"uri": _png_data_uri(images[i].permute(1, 2, 0).numpy()),
                          "correct": bool(labels[i] == label), "score": float(scores[i, j]),
                          "label": names[int(labels[i])]} for i in top.tolist()],
            })
        if not failures:
            rows.append({"query": None, "split": split, "kind": "worst", "k": k})
    return rows


def _summary_table(result: dict) -> str:
    rows = []
    scorings = [("zeroshot", "")] + ([("zeroshot-li", ", late interaction")] if "zeroshot-li/seen/acc1" in result else [])
    for key, label in scorings:
        for split in ("seen", "unseen"):
            cells = [result.get(f"{key}/{split}/{m}") for m in ("acc1", "acc5", "mean_per_class_recall")]
            cells += [result.get(f"retrieval/{split}/{m}") if key == "zeroshot" else None
                      for m in ("image_retrieval_recall@1", "text_retrieval_recall@1")]
            rows.append(f"<tr><th>{split}{label}</th>" + "".join(
                f"<td>{100 * c:.1f}</td>" if c is not None else "<td>-</td>" for c in cells) + "</tr>")
    return ("<table><tr><th>compositions</th><th>zero-shot top-1</th><th>top-5</th><th>mean per-class recall</th>"
            "<th>text→image R@1</th><th>image→text R@1</th></tr>" + "".join(rows) + "</table>")


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1)}"


def _hms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "not recorded"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _run_table(recipe, train: list[dict], sessions: list[dict], ckpt: dict) -> str:
    """What ran, where, how long and how fast."""
    e = html.escape
    rows = [("recipe", f"{e(recipe.name)}" + (f" — {e(recipe.description)}" if recipe.description else ""))]
    step = ckpt.get("step")
    rows.append(("steps", f"{step:,} of {recipe.train.steps:,}" if step is not None else "unknown"))
    rows.append(("training wall time", f"{_hms(ckpt.get('elapsed_s'))} (up to the checkpoint, across resumes)"))
    last = sessions[-1] if sessions else None
    if last:
        procs = last.get("world_size", 1)
        rows.append(("hardware", e(f"{last.get('device')}: {last.get('hardware')} × {procs} process"
                                   f"{'es' * (procs != 1)} · precision {last.get('precision')} · "
                                   f"torch {last.get('torch')} · Python {last.get('python')}")))
        rows.append(("parameters", f"{last['params_trainable']:,} trainable / {last['params_total']:,} total "
                                   f"({last['params_model']:,} in the CLIP model)"))
        size = f", {last['data_size']:,} samples per epoch" if last.get("data_size") else ""
        rows.append(("global batch", f"{last['global_batch']:,} ({last['batch_per_process']:,} per process × "
                                     f"{procs} × {last['accum_steps']} accumulation)"))
        rows.append(("data", e(f"{last['data']}{size}")))
        for n, s in enumerate(sessions, 1):
            end = (f"ended {s.get('stopped_by')} at step {s.get('end_step')}, wall {_hms(s.get('wall_s'))}"
                   if s.get("ended") else "no end recorded (killed?)")
            rows.append((f"session {n}", e(f"{s.get('started')}: from step {s.get('start_step')}, {end}")))
    else:
        rows.append(("hardware", "not recorded (run_info.json is missing: the run predates it)"))
        rows.append(("data", e(recipe.data.train)))
    ips = [r["img_per_s"] for r in train if math.isfinite(r.get("img_per_s", float("nan")))]
    if ips:
        rows.append(("throughput", f"median {np.median(ips):,.0f} images/s over {_plural(len(ips), 'logged step')} "
                                   f"(last {ips[-1]:,.0f}); {train[-1].get('samples_seen', 0):,} samples seen"))
    return "<table class='kv'>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flatten(v, f"{prefix}.{k}" if prefix else k)]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [kv for i, v in enumerate(value) for kv in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix, value)]


def _recipe_tables(recipe) -> str:
    """Every hyper-parameter of the resolved recipe, one small table per section."""
    dump = recipe.model_dump(mode="json")
    sections = [k for k, v in dump.items() if isinstance(v, dict) or k == "teachers"]
    groups = [("recipe", [(k, v) for k, v in dump.items() if k not in sections])]
    groups += [(k, _flatten(dump[k], k)) for k in sections]
    tables = []
    for name, items in groups:
        if not items:
            continue
        rows = "".join(f"<tr><th>{html.escape(k.removeprefix(name + '.'))}</th>"
                       f"<td><code>{html.escape(json.dumps(v))}</code></td></tr>" for k, v in items)
        tables.append(f"<table class='hp'><caption>{html.escape(name)}</caption>{rows}</table>")
    return "<div class='hp-grid'>" + "".join(tables) + "</div>"


def _step_notes(train: list[dict], evals: list[dict], step: int | None, recipe) -> list[str]:
    """Say so when the final evaluation (of the checkpoint) is not at the curves' last step."""
    notes = []
    if step is None:
        return notes
    if train and step > train[-1]["step"]:
        notes.append(f"The final evaluation is of the checkpoint at step {step:,}; the training curves end at step "
                     f"{train[-1]['step']:,} (metrics are logged every logging.every_steps = "
                     f"{recipe.logging.every_steps} steps and the run stopped in between).")
    elif train and step < train[-1]["step"]:
        notes.append(f"The final evaluation is of an earlier checkpoint (step {step:,}) than the end of the training "
                     f"curves (step {train[-1]['step']:,}).")
    zs = [r["step"] for r in evals if "zeroshot/unseen/acc1" in r]
    if zs and step > zs[-1]:
        notes.append(f"The zero-shot curve's last point is at step {zs[-1]:,}; the final evaluation at step {step:,} "
                     "is drawn as a star.")
    return notes


def write_report(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Build ``<run_dir>/report.html`` from metrics.jsonl, run_info.json and the latest checkpoint."""
    from clipforge.api import load
    from clipforge.config import Recipe
    from clipforge.data.synthetic import class_names
    from clipforge.eval.hooks import evaluate_shapes
    from clipforge.train.checkpoint import read_config

    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    checkpoint = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "latest"
    recipe = Recipe.model_validate(read_config(checkpoint)["recipe"])
    ckpt = _checkpoint_state(checkpoint)
    model, _, tokenizer = load(checkpoint)
    figures = _Figures()
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in _step_notes(train, evals, ckpt["step"], recipe))
    sections = ["<h2>Run</h2>" + _run_table(recipe, train, read_run_info(run_dir), ckpt)]
    result = None
    try:
        if recipe.data.train == "shapes":
            result = evaluate_shapes(model, tokenizer, recipe, with_predictions=True)
            sections.append(f"<h2>Final evaluation (%), checkpoint at step {ckpt['step']:,}</h2>" + notes
                            + _summary_table(result))
        elif notes:
            sections.append(notes)
        if train:
            uri = figures.add("report/training", plot_curves(train, recipe.optim.grad_clip))
            sections.append(f"<h2>Training</h2><img src='{uri}' alt='training curves'>")
        final = None
        if result is not None and ckpt["step"] is not None:
            final = {"step": ckpt["step"], **{s: result[f"zeroshot/{s}/acc1"] for s in PALETTE}}
        zs_fig = plot_zeroshot(evals, final)
        if zs_fig is not None:
            uri = figures.add("report/zeroshot", zs_fig)
            sections.append(f"<h2>Zero-shot on seen vs unseen compositions</h2><img src='{uri}' alt='zero-shot'>")
        validation = validation_section(evals, figures.add)  # the recipe's [[eval.tasks]] (val/... metrics)
        if validation:
            sections.append(validation)
        if result is not None:
            names = class_names()
            for split in ("unseen", "seen"):
                pred, labels = result[f"predictions/{split}"]
                uri = figures.add(f"report/confusion_{split}",
                                  plot_confusion(pred, labels, names, f"{split} compositions (rows: true class)"))
                sections.append(f"<h2>Confusion matrix: {split} compositions</h2><img src='{uri}' alt='confusion'>")
            sections.append("<h2>Text → image retrieval: successes and failures</h2>"
                            "<p class='sub'>Green border ✓: an image of the queried class; red ✗: another class "
                            "(its name below). For each split, the two best queries (most right images in the top 6) "
                            "and the two worst (shaded).</p>"
                            + _retrieval_grid(retrieval_examples(model, tokenizer, recipe)))
        sections.append("<h2>Recipe</h2>" + _recipe_tables(recipe))
        if recipe.logging.tensorboard and ckpt["step"] is not None:
            figures.to_tensorboard(run_dir / "tb", ckpt["step"])
    finally:
        figures.close()
    page = _PAGE.format(title=html.escape(f"clipforge report: {run_dir.name}"),
                        subtitle=html.escape(f"recipe {recipe.name} · {_plural(len(train), 'logged step')} · "
                                             f"checkpoint {checkpoint.resolve().name}"),
                        body="\n".join(sections))
    out = run_dir / "report.html"
    out.write_text(page)
    return out


def _retrieval_grid(rows: list[dict]) -> str:
    grid = []
    for row in rows:
        label = f"{row['split']} · {row['kind']} query"
        if row["query"] is None:
            grid.append(f"<div class='row worst'><div class='q'>no failures<span>{label}</span></div>"
                        f"<div class='empty'>every {row['split']} query's top {row['k']} are all the right class"
                        "</div></div>")
            continue
        detail = f"{row['right']}/{row['k']} right"
        if row["kind"] == "worst" and row["first_right"] and row["first_right"] > row["k"]:
            detail += f", first right image at rank {row['first_right']}"
        thumbs = "".join(
            f"<figure class='{'ok' if h['correct'] else 'bad'}'><img src='{h['uri']}' alt='{html.escape(h['label'])}'>"
            f"<figcaption>{'✓' if h['correct'] else '✗ ' + html.escape(h['label'])}<br>{h['score']:.2f}"
            "</figcaption>"
            "</figure>" for h in row["hits"])
        grid.append(f"<div class='row {row['kind']}'><div class='q'>“{html.escape(row['query'])}”"
                    f"<span>{label} · {detail}</span></div>{thumbs}</div>")
    return "".join(grid)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }}
h1 {{ margin-bottom: 0; }} .sub {{ color: #666; margin-top: .3em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
table.kv th, table.kv td, table.hp th, table.hp td {{ text-align: left; vertical-align: top; }}
table.kv th {{ white-space: nowrap; background: #f6f6f6; }}
.note {{ background: #fff6d6; border-left: 4px solid #e0b000; padding: 6px 10px; }}
.hp-grid {{ columns: 3 330px; column-gap: 16px; }}
table.hp {{ break-inside: avoid; width: 100%; margin: 0 0 12px; font-size: 12px; table-layout: fixed; }}
table.hp caption {{ text-align: left; font-weight: 600; padding: 2px 0; }}
table.hp th {{ font-weight: 400; color: #444; width: 50%; overflow-wrap: anywhere; }}
table.hp td {{ overflow-wrap: anywhere; }}
img {{ max-width: 100%; }}
.row {{ display: flex; align-items: center; gap: 6px; margin: 4px 0; }}
.row.worst {{ background: #fdf1f1; }}
.q {{ width: 220px; flex: none; font-weight: 600; }}
.q span {{ display: block; font-weight: 400; color: #888; font-size: 12px; }}
.empty {{ color: #666; }}
figure {{ margin: 0; padding: 2px; border: 3px solid; text-align: center; font-size: 11px; width: 96px; flex: none; }}
figure.ok {{ border-color: #2ca02c; }} figure.bad {{ border-color: #d62728; }}
figure img {{ width: 96px; height: 96px; image-rendering: pixelated; display: block; }}
figcaption {{ overflow-wrap: anywhere; line-height: 1.25; }}
</style></head>
<body><h1>{title}</h1><p class="sub">{subtitle}</p>
{body}
</body></html>
"""


def validation_section(evals: list[dict], add_figure) -> str | None:
    """The recipe's ``[[eval.tasks]]`` (metrics ``val/<task>/<name>/<metric>``): a table of the last
    evaluation's values and one plot per task and dataset over training; None when the run has none.
    ``add_figure(tag, fig)`` returns the figure's data URI (``_Figures.add``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(k for r in evals for k in r if k.startswith("val/")))
    if not keys:
        return None
    last = {k: (r["step"], r[k]) for r in evals for k in keys if k in r}  # the latest record of each key wins
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{v:.4g}</td><td>{s:,}</td></tr>" for k, (s, v) in last.items())
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.rsplit("/", 1)[0], []).append(k)  # val/<task>/<name>
    fig, axes = plt.subplots(1, len(groups), figsize=(4.3 * len(groups), 3.2), squeeze=False, layout="constrained")
    for ax, (group, members) in zip(axes[0], groups.items()):
        for k in members:
            points = [(r["step"], r[k]) for r in evals if k in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=k.rsplit("/", 1)[1])
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    uri = add_figure("report/validation", fig)
    return ("<h2>Validation on your data ([[eval.tasks]])</h2><table class='kv'><tr><th>metric</th><th>last value</th>"
            f"<th>step</th></tr>{rows}</table><img src='{uri}' alt='validation metrics over training'>")
