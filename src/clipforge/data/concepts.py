"""Concept frequency vs zero-shot accuracy ("No Zero-Shot Without Exponential Data", Udandarao et al. 2024).

    clipforge data concepts jsonl:pairs.jsonl --concepts cifar10 --model ckpt/ --eval-data imagefolder:val/ --out concepts/

For each concept (a class name of a built-in list, of an image folder, or a line of a file):

- **text frequency**: captions that mention it. Words are lower-cased, non-letters stripped and
  lemmatised by a small rule set (``lemma``: plural -> singular, a few irregular nouns; no POS
  tagger, so a verb "runs" also becomes "run" -- honest but not spaCy). A multi-word concept is
  the *intersection* of its words' caption sets (bag of words, as the paper does).
- **image frequency**: images whose cosine to the concept's prompt embedding (the model's own,
  prompts "a photo of a {}.") passes a threshold. The paper tags with RAM++ at p > 0.7; here the
  threshold is *calibrated* on the data: the one cosine that best agrees (F1) with the text hits,
  with the text hits as weak labels. ``--image-threshold`` fixes it instead.
- **matched frequency**: |text hits ∩ image hits| (the paper's main measure, <= both).

Then it joins the frequencies with per-concept zero-shot accuracy (``--eval-data`` runs
``clipforge eval --per-class`` now, or ``--accuracy`` reads such a result), fits
accuracy = a + b * log10(frequency) over the concepts with frequency > 0 (zeros are left out and
counted), with Pearson r, r^2 and a bootstrap 95% interval of the slope, and writes
``concepts.json``, ``frequency_vs_accuracy.png`` and the long tail: ``longtail.txt`` (the rarest
concepts) and, with ``--eval-data``, ``longtail.jsonl`` (their eval images: an eval set of the
tail, as the paper's Let-It-Wag!).

The built-in ``shapes`` source is endless: ``--max-samples N`` counts its first N samples (the
ones a run of N samples saw), rendered with the checkpoint recipe's ``data.seed`` and
``data.shapes`` (e.g. ``pair_zipf_exponent``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from clipforge.data.sources import DataError

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BUILTIN_CONCEPTS = ("cifar10", "shapes")
IMAGE_MEASURES = ("image_frequency", "matched_frequency")  # need a model to tag the images
MEASURES = ("text_frequency", *IMAGE_MEASURES)
IRREGULAR = {"mice": "mouse", "geese": "goose", "men": "man", "women": "woman", "children": "child",
             "people": "person", "feet": "foot", "teeth": "tooth", "oxen": "ox", "knives": "knife",
             "wives": "wife", "lives": "life", "leaves": "leaf", "wolves": "wolf", "shelves": "shelf",
             "halves": "half", "calves": "calf", "loaves": "loaf", "thieves": "thief", "dice": "die"}
# words ending in s that are not plurals (else "bus" -> "bu", "glass" -> "glas")
NOT_PLURAL = {"bus", "gas", "lens", "series", "species", "news", "chess", "glasses", "this", "his", "is", "was",
              "has", "does", "yes", "us", "plus", "atlas", "iris", "cactus", "octopus", "virus", "canvas",
              "dress", "grass", "glass", "cross", "class", "bass", "boss", "moss", "princess", "mattress"}
# -oes plurals that drop "es" (the rest drop "s": shoes -> shoe, toes -> toe, canoes -> canoe)
OES_PLURALS = {"heroes", "potatoes", "tomatoes", "echoes", "vetoes", "torpedoes", "volcanoes", "mosquitoes",
               "buffaloes", "dominoes", "mangoes", "tornadoes", "embargoes", "cargoes", "noes"}
# -ies plurals of words ending in "ie" (the rest are -y words: berries -> berry)
IE_PLURALS = {"movies", "cookies", "pies", "ties", "lies", "dies", "calories", "zombies", "brownies", "smoothies",
              "selfies", "rookies", "goalies", "genies", "collies", "prairies", "hoodies", "budgies", "magpies",
              "eyries", "boogies", "veggies", "aunties", "birdies", "lassies", "bookies", "talkies", "walkies"}
# -ses plurals of words ending in "s" (the rest end in "se": horses -> horse, houses -> house)
SES_PLURALS = {"buses", "gases", "lenses", "atlases", "irises", "cactuses", "viruses", "canvases", "bonuses",
               "campuses", "circuses", "choruses", "walruses", "octopuses", "geniuses", "censuses", "plusses",
               "minuses", "statuses", "apparatuses", "prospectuses", "sinuses", "fetuses"}
# function words dropped from a multi-word concept ("cup of coffee" is hit by "a coffee cup"; the paper
# indexes nouns only)
STOP_WORDS = {"a", "an", "the", "of", "and", "or", "in", "on", "at", "to", "for", "with", "by", "from", "as",
              "its", "his", "her", "their", "this", "that"}
WORD = re.compile(r"[a-z]+")


# ----------------------------------------------------------------------------- words
def lemma(word: str) -> str:
    """A small, honest English plural rule set: dogs -> dog, boxes -> box, berries -> berry, mice -> mouse."""
    w = word.lower()
    if w in IRREGULAR:
        return IRREGULAR[w]
    if len(w) <= 3 or w in NOT_PLURAL or w.endswith(("ss", "us", "is")):
        return w
    if w in OES_PLURALS or w in SES_PLURALS:
        return w[:-2]
    if w.endswith("ies") and len(w) > 4 and w not in IE_PLURALS:
        return w[:-3] + "y"
    if w.endswith(("ches", "shes", "xes", "zes", "sses")):
        return w[:-2]
    if w.endswith("s"):
        return w[:-1]
    return w


def lemmas(text: str) -> list[str]:
    """Lower-cased letter runs of ``text``, lemmatised (non-letters split and are dropped)."""
    return [lemma(w) for w in WORD.findall(text.lower())]


def caption_index(captions: Iterable[str]) -> tuple[dict[str, np.ndarray], int]:
    """Inverted index lemma -> sorted caption ids, and the number of captions."""
    postings: dict[str, list[int]] = {}
    n = 0
    for i, caption in enumerate(captions):
        n = i + 1
        for w in set(lemmas(caption)):
            postings.setdefault(w, []).append(i)
    return {w: np.array(ids, dtype=np.int64) for w, ids in postings.items()}, n


def text_hits(concept: str, index: dict[str, np.ndarray]) -> np.ndarray:
    """Caption ids that mention every content word of the concept (intersection, not union; function
    words such as "of" are not required)."""
    words = [w for w in lemmas(concept) if w not in STOP_WORDS] or lemmas(concept)
    if not words:
        return np.zeros(0, dtype=np.int64)
    hits = index.get(words[0], np.zeros(0, dtype=np.int64))
    for w in words[1:]:
        hits = np.intersect1d(hits, index.get(w, np.zeros(0, dtype=np.int64)), assume_unique=True)
    return hits


# ----------------------------------------------------------------------------- concept lists
def load_concepts(spec: str) -> list[str]:
    """``cifar10`` / ``shapes`` (built in), an image folder (its class names) or a file (one per line)."""
    if spec == "cifar10":
        return list(CIFAR10)
    if spec == "shapes":
        from clipforge.data.synthetic import class_names

        return class_names()
    path = Path(spec.removeprefix("imagefolder:")).expanduser()
    if path.is_dir():
        from clipforge.data.sources import read_classnames, read_image_folder

        if (path / "classnames.txt").is_file():
            ids = sorted(d.name for d in path.iterdir() if d.is_dir())
            return read_classnames(path / "classnames.txt", ids, f"{path} has {len(ids)} class folders")
        return read_image_folder(path).classnames
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if names:
            return names
        raise DataError(f"--concepts file {path} is empty; write one concept per line")
    raise DataError(f"--concepts {spec!r}: not a built-in list ({', '.join(BUILTIN_CONCEPTS)}), a folder or a file")


# ----------------------------------------------------------------------------- image hits
def calibrate_threshold(scores: np.ndarray, weak: np.ndarray) -> tuple[float, float]:
    """(cosine threshold, its F1) that best reproduces the weak labels ``weak`` (N x C bool) by
    ``scores > t`` over all (image, concept) cells; falls back to the 99th percentile without positives."""
    s, y = scores.ravel(), weak.ravel()
    if not y.any():
        return float(np.quantile(s, 0.99)), 0.0
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(y[order])
    predicted = np.arange(1, len(s) + 1)
    f1 = 2 * tp / (predicted + y.sum())
    best = int(np.argmax(f1))
    below = s[order[best + 1]] if best + 1 < len(s) else s[order[best]] - 1e-6
    return float((s[order[best]] + below) / 2), float(f1[best])


def concept_embeddings(model, tokenizer, concepts: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",)):
    from clipforge.eval.zeroshot import zero_shot_classifier

    return zero_shot_classifier(model, tokenizer, list(concepts), list(templates)).float().cpu().numpy()


# ----------------------------------------------------------------------------- the fit
@dataclass
class Fit:
    slope: float
    intercept: float
    pearson_r: float
    r2: float
    slope_ci95: tuple[float, float]
    points: int
    zero_frequency_left_out: int


def log_linear_fit(freq: Sequence[float], acc: Sequence[float], bootstrap: int = 1000, seed: int = 0) -> Fit:
    """acc = intercept + slope * log10(freq) by least squares over freq > 0; bootstrap CI of the slope."""
    f, a = np.asarray(freq, dtype=np.float64), np.asarray(acc, dtype=np.float64)
    used = f > 0
    x, y = np.log10(f[used]), a[used]
    if len(x) < 3 or np.ptp(x) == 0:
        raise DataError(f"the fit needs at least 3 concepts with different, non-zero frequencies; got {len(x)}")
    slope, intercept = np.polyfit(x, y, 1)
    r = float(np.corrcoef(x, y)[0, 1]) if np.ptp(y) > 0 else 0.0
    rng = np.random.default_rng(seed)
    slopes = []
    for _ in range(bootstrap):
        pick = rng.integers(0, len(x), len(x))
        if np.ptp(x[pick]) > 0:
            slopes.append(np.polyfit(x[pick], y[pick], 1)[0])
    lo, hi = np.percentile(slopes, [2.5, 97.5]) if slopes else (float("nan"), float("nan"))
    return Fit(float(slope), float(intercept), r, r * r, (float(lo), float(hi)), int(len(x)), int((~used).sum()))


def plot_fit(rows: list[dict], fit: Fit, measure: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r[measure], r["accuracy"], r["concept"]) for r in rows if r.get("accuracy") is not None and r[measure] > 0]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14)
    for f, a, name in pts:
        ax.annotate(name, (f, a), fontsize=6, alpha=0.7)
    xs = np.logspace(np.log10(min(p[0] for p in pts)), np.log10(max(p[0] for p in pts)), 50)
    ax.plot(xs, fit.intercept + fit.slope * np.log10(xs), "r-",
            label=f"slope {fit.slope:.3f}/decade [{fit.slope_ci95[0]:.3f}, {fit.slope_ci95[1]:.3f}], r²={fit.r2:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel(f"{measure.replace('_', ' ')} (log scale)")
    ax.set_ylabel("zero-shot accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the command
def source_captions_and_images(data: str, model, max_samples: int | None, ckpt: Path | None, batch_size: int):
    """(captions, image embeddings N x E or None) of the pre-training source (first caption per sample)."""
    from clipforge.config import DataConfig

    if data == "shapes":
        return _shapes_captions_and_images(model, max_samples, ckpt, batch_size)
    from clipforge.data.pipeline import source_samples

    cfg = DataConfig(train=data)
    if model is None:
        captions = []
        for i, raw in enumerate(source_samples(cfg)):
            if max_samples is not None and i >= max_samples:
                break
            captions.append(sample_text(raw.caption))
        return captions, None
    from clipforge.train.teacher_cache import embed_source_samples

    model_, tokenizer = model
    keys, images, _, _ = embed_source_samples(model_, tokenizer, cfg, batch_size)
    caption_of = {raw.key: sample_text(raw.caption) for raw in source_samples(cfg)}
    captions = [caption_of[k] for k in keys]
    images = images.numpy()
    if max_samples is not None:
        captions, images = captions[:max_samples], images[:max_samples]
    return captions, images


def sample_text(caption) -> str:
    """All captions of a sample in one string (a sample mentions a concept when one of its captions does;
    a multi-word concept may then match across two captions of the same sample)."""
    from clipforge.data.pipeline import _caption_text

    values = caption if isinstance(caption, list) else [caption]
    texts = [_caption_text(v, None) for v in values]
    return " | ".join(t for t in texts if isinstance(t, str))


def _shapes_captions_and_images(model, max_samples: int | None, ckpt: Path | None, batch_size: int):
    from clipforge.config import DataConfig
    from clipforge.data.synthetic import ShapesDataset
    from clipforge.train.checkpoint import read_config

    if max_samples is None:
        raise DataError("the built-in shapes source is endless; pass --max-samples N (e.g. steps x batch size of "
                        "the run) to count the samples that run saw")
    recipe = (read_config(ckpt).get("recipe") or {}) if ckpt is not None else {}
    data_cfg = DataConfig.model_validate({k: v for k, v in recipe.get("data", {}).items()
                                          if k in ("seed", "shapes")})
    size = model[0].cfg.image_size if model is not None else 16
    ds = ShapesDataset(data_cfg.shapes, size, seed=data_cfg.seed, split="train")
    captions, rows = [], []
    for start in range(0, max_samples, 512):
        pixels, caps, _ = ds.render_batch(range(start, min(max_samples, start + 512)))
        captions += caps
        if model is not None:
            from clipforge.eval.embedding import embed_images

            rows.append(embed_images(model[0], pixels, batch_size=batch_size, out_device="cpu").numpy())
    return captions, (np.concatenate(rows) if rows else None)


def concept_frequencies(data: str, concepts_spec: str, out: str | Path, *, model: str | Path | None = None,
                        eval_data: str | None = None, accuracy: str | Path | None = None,
                        image_threshold: float | None = None, max_samples: int | None = None,
                        tail: float = 0.2, measure: str | None = None, batch_size: int = 256,
                        device: str | None = None, seed: int = 0) -> dict:
    """``clipforge data concepts``: counts, image tags, join with accuracy, fit, plot, long tail."""
    check_concept_options(data, model, accuracy, tail, measure)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    concepts = load_concepts(concepts_spec)
    loaded, ckpt = None, None
    if model is not None:
        from clipforge.api import load
        from clipforge.devices import pick_device
        from clipforge.eval.evaluate import checkpoint_dir

        ckpt = checkpoint_dir(model)
        net, _, tokenizer = load(ckpt, device=pick_device(device))
        loaded = (net, tokenizer)
    captions, images = source_captions_and_images(data, loaded, max_samples, ckpt, batch_size)
    index, n = caption_index(captions)
    hits = [text_hits(c, index) for c in concepts]
    weak = np.zeros((n, len(concepts)), dtype=bool)
    for j, h in enumerate(hits):
        weak[h, j] = True
    summary = {"data": data, "captions": n, "concepts": len(concepts), "model": str(ckpt) if ckpt else None}
    rows = [{"concept": c, "text_frequency": int(len(h))} for c, h in zip(concepts, hits)]
    if images is not None:
        scores = images @ concept_embeddings(loaded[0], loaded[1], concepts).T  # N x C cosines
        if image_threshold is None:
            image_threshold, f1 = calibrate_threshold(scores, weak)
            summary["image_threshold_calibration"] = {"f1_vs_text_hits": round(f1, 4)}
        tagged = scores > image_threshold
        summary["image_threshold"] = image_threshold
        for j, row in enumerate(rows):
            row["image_frequency"] = int(tagged[:, j].sum())
            row["matched_frequency"] = int((tagged[:, j] & weak[:, j]).sum())
        summary["misaligned_fraction"] = float(1 - (tagged & weak).sum() / max(1, weak.sum()))
    measure = measure or ("matched_frequency" if images is not None else "text_frequency")
    per_class = _per_class_accuracy(loaded, ckpt, eval_data, accuracy, out, batch_size, device)
    if per_class is not None:
        lower = {k.lower(): v for k, v in per_class.items()}
        for row in rows:
            row["accuracy"] = lower.get(row["concept"].lower(), {}).get("accuracy")
        joined = [r for r in rows if r["accuracy"] is not None]
        fit = log_linear_fit([r[measure] for r in joined], [r["accuracy"] for r in joined], seed=seed)
        summary["fit"] = {"measure": measure, "x": "log10(frequency)", **fit.__dict__}
        summary["fits_by_measure"] = {}  # the other frequency measures too, for comparison
        for other in ("text_frequency", "image_frequency", "matched_frequency"):
            if other in joined[0]:
                try:
                    summary["fits_by_measure"][other] = log_linear_fit(
                        [r[other] for r in joined], [r["accuracy"] for r in joined], seed=seed).__dict__
                except DataError as e:
                    summary["fits_by_measure"][other] = {"error": str(e)}
        summary["plot"] = str(plot_fit(joined, fit, measure, out / "frequency_vs_accuracy.png"))
    ranked = sorted(rows, key=lambda r: (r[measure], r["concept"]))
    rare = ranked[:max(1, round(tail * len(rows)))]
    (out / "longtail.txt").write_text("".join(r["concept"] + "\n" for r in rare))
    summary["longtail"] = [r["concept"] for r in rare]
    if eval_data:
        summary["longtail_eval"] = write_longtail_eval(eval_data, {r["concept"].lower() for r in rare},
                                                       out / "longtail.jsonl")
    result = {**summary, "measure": measure, "per_concept": rows}
    (out / "concepts.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def check_concept_options(data: str, model, accuracy, tail: float, measure: str | None) -> None:
    """Every argument that can be wrong, before captions are counted or images embedded."""
    from clipforge.data.dedup import check_source

    check_source(data)
    if measure is not None and measure not in MEASURES:
        raise DataError(f"--measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    if measure in IMAGE_MEASURES and model is None:
        raise DataError(f"--measure {measure} counts concepts in images: pass --model CKPT (or use text_frequency)")
    if not 0.0 < tail <= 1.0:
        raise DataError(f"--tail is the fraction of rarest concepts in the long-tail subset, in (0, 1]; got {tail}")
    if accuracy is not None and not Path(accuracy).is_file():
        raise DataError(f"--accuracy {accuracy}: file not found; pass a result of `clipforge eval --per-class "
                        "--out RESULT.json`, or --eval-data with --model to measure it now")


def _per_class_accuracy(loaded, ckpt, eval_data, accuracy, out: Path, batch_size: int, device) -> dict | None:
    if accuracy is not None:
        try:
            per_class = json.loads(Path(accuracy).read_text()).get("per_class")
        except (ValueError, AttributeError):  # not JSON, or JSON but not a result object
            per_class = None
        if not per_class:
            raise DataError(f"{accuracy} has no per_class results; write it with `clipforge eval ... --per-class`")
        return per_class
    if eval_data is None:
        return None
    if ckpt is None:
        raise DataError("--eval-data runs zero-shot with the model: pass --model too (or --accuracy RESULT.json)")
    from clipforge.eval.evaluate import evaluate

    result = evaluate(ckpt, "zeroshot", eval_data, batch_size=batch_size, device=device, per_class=True,
                      out=out / "zeroshot.json", plots=False)
    return result["per_class"]


def write_longtail_eval(eval_data: str, rare: set[str], path: Path) -> dict:
    """The eval images of the rarest concepts as a labelled JSONL (``clipforge eval --data jsonl:...``)."""
    from clipforge.data.sources import read_classification_data

    data = read_classification_data(eval_data)
    lines = [json.dumps({"image": str(Path(p).resolve()), "label": data.classnames[y]})
             for p, y in zip(data.paths, data.labels) if data.classnames[y].lower() in rare]
    path.write_text("".join(line + "\n" for line in lines))
    return {"path": str(path), "images": len(lines)}
