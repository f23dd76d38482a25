"""Evaluation on your own data: [[eval.tasks]] during training (val/<task>/<name>/<metric> in
metrics.jsonl, TensorBoard and the report), CLIP_benchmark's dataset conventions, several models in
one `clipforge eval`, `clipforge eval merge`, and running CLIP_benchmark itself on a checkpoint."""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.config import RecipeError, load_recipe
from clipforge.eval.evaluate import EvalError, evaluate, model_slug

sys.path.insert(0, str(Path(__file__).parent))
from tiny_checkpoint import TINY_MODEL_TOML, make_tiny_checkpoint, run_cli as cli_in_process  # noqa: E402

COLOURS = {"red_thing": (220, 30, 30), "green_thing": (30, 180, 60), "blue_thing": (30, 60, 220),
           "yellow_thing": (230, 210, 40), "purple_thing": (140, 40, 170), "black_thing": (10, 10, 10)}


# ----------------------------------------------------------------------------- data written on the fly
def png(path: Path, rgb, seed: int) -> Path:
    """A tiny noisy PNG of one colour."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 25, (20, 24, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def image_folder(root: Path, classes: int = 3, per_class: int = 3) -> Path:
    for c, (name, rgb) in enumerate(list(COLOURS.items())[:classes]):
        for i in range(per_class):
            png(root / name / f"{i}.png", rgb, 100 * c + i)
    return root


def caption_jsonl(root: Path, n: int = 6) -> Path:
    """n images with a caption each (the first image has a second one)."""
    names = list(COLOURS)
    lines = []
    for i in range(n):
        name = names[i % len(names)]
        png(root / "img" / f"{i}.png", COLOURS[name], 1000 + i)
        text = f"a {name.replace('_', ' ')}" if i else ["a red thing", "something red"]
        lines.append(json.dumps({"image": f"img/{i}.png", "text": text}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code, out, err = cli_in_process(capsys, *args)
    return code, out, " ".join(err.split())


# ----------------------------------------------------------------------------- item 8: [[eval.tasks]]
RECIPE = """
base = "tiny-shapes"
""" + TINY_MODEL_TOML + """[data]
batch_size = 8
num_workers = 0
[data.shapes]
eval_samples_per_class = 1
[data.tokenizer]
corpus_size = 300
[train]
steps = 6
checkpoint_every_steps = 100
threads = 1
[schedule]
warmup_steps = 2
[eval]
every_steps = 3
at_end = true
batch_size = 16
[[eval.tasks]]
task = "zeroshot"
data = "imagefolder:{val}"
templates = "photo"
[[eval.tasks]]
task = "retrieval"
data = "jsonl:{pairs}"
max_samples = 4
[[eval.tasks]]
task = "val_loss"
data = "jsonl:{pairs}"
[logging]
tensorboard = {tensorboard}
progress = false
"""


def write_recipe(tmp_path: Path, tensorboard: bool = False, **paths) -> Path:
    val = paths.get("val") or image_folder(tmp_path / "val")
    pairs = paths.get("pairs") or caption_jsonl(tmp_path / "pairs")
    path = tmp_path / "tasks.toml"
    path.write_text(RECIPE.format(val=val, pairs=pairs, tensorboard=str(tensorboard).lower()))
    return path


VAL_KEYS = {"val/zeroshot/val/acc1", "val/zeroshot/val/acc5", "val/zeroshot/val/mean_per_class_recall",
            *(f"val/retrieval/pairs/{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)),
            "val/val_loss/pairs/clip_loss"}


@pytest.mark.slow
def test_training_logs_the_eval_tasks_at_the_eval_steps(tmp_path):
    """A tiny run with [[eval.tasks]] on an image folder and a jsonl: the val/ metrics reach
    metrics.jsonl at steps 3 (every_steps) and 6 (at_end), TensorBoard and the HTML report."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from clipforge.cli import _default_eval_hooks
    from clipforge.eval.report import write_report
    from clipforge.train.trainer import Trainer

    recipe = load_recipe(str(write_recipe(tmp_path, tensorboard=True)))
    run = tmp_path / "run"
    Trainer(recipe, run, eval_hooks=_default_eval_hooks(recipe)).fit()

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if any(k.startswith("val/") for k in r)]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert VAL_KEYS <= set(r), VAL_KEYS - set(r)
        assert "zeroshot/unseen/acc1" in r  # the built-in shapes evaluation still runs next to them
        assert all(0.0 <= r[k] <= 1.0 for k in VAL_KEYS if "loss" not in k)
        assert r["val/val_loss/pairs/clip_loss"] > 0
    assert not any(k.startswith("val/") for r in records if "loss" in r for k in r)  # not on training lines

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert VAL_KEYS <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/zeroshot/val/acc1")] == [3, 6]

    page = write_report(run).read_text()
    assert "Validation on your data" in page and "val/val_loss/pairs/clip_loss" in page


def test_eval_tasks_read_their_data_up_front(tmp_path):
    """The hooks read each task's data when built (before training): max_samples bounds it, with
    the same subset every time."""
    from clipforge.eval.hooks import eval_task_hooks

    recipe = load_recipe(str(write_recipe(tmp_path)), ["eval.max_samples=5"])
    hooks = eval_task_hooks(recipe)
    assert [h.__name__.split(" ")[0] for h in hooks] == ["eval.tasks[0]", "eval.tasks[1]", "eval.tasks[2]"]
    assert len(hooks[0].data.paths) == 5  # eval.max_samples over 9 images
    assert len(hooks[1].data.paths) == 4  # the task's own max_samples wins
    assert len(hooks[2].data.paths) == 5
    assert hooks[1].data.paths == eval_task_hooks(recipe)[1].data.paths
    assert hooks[0].data.classnames == ["blue thing", "green thing", "red thing"]  # all classes stay


def test_a_task_can_score_by_late_interaction_as_clipforge_eval_does(ckpt, tmp_path, monkeypatch):
    """similarity = "late-interaction" on a zeroshot and a retrieval entry: the hook scores token-wise
    and logs what `clipforge eval --similarity late-interaction` gives on the same data."""
    import clipforge
    from clipforge.eval import evaluate as E
    from clipforge.eval import zeroshot as Z
    from clipforge.eval.hooks import eval_task_hooks

    calls = []
    for module, name in ((Z, "late_interaction_zero_shot_logits"), (E, "run_late_interaction_retrieval")):
        def spy(*args, _real=getattr(module, name), _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, spy)
    recipe = load_recipe(str(write_recipe(tmp_path)), ["eval.tasks.0.similarity=late-interaction",
                                                       "eval.tasks.1.similarity=late-interaction"])
    hooks = eval_task_hooks(recipe)
    model, _, tokenizer = clipforge.load(ckpt)
    got = {**hooks[0](model, tokenizer, 3), **hooks[1](model, tokenizer, 3)}
    assert calls == ["late_interaction_zero_shot_logits", "run_late_interaction_retrieval"]
    zeroshot = evaluate(ckpt, "zeroshot", recipe.eval.tasks[0].data, templates="photo", batch_size=16,
                        similarity="late-interaction", plots=False)
    retrieval = evaluate(ckpt, "retrieval", recipe.eval.tasks[1].data, max_samples=4, batch_size=16,
                         similarity="late-interaction")
    assert {k: got[f"val/zeroshot/val/{k}"] for k in zeroshot["metrics"]} == zeroshot["metrics"]
    assert {k: got[f"val/retrieval/pairs/{k}"] for k in retrieval["metrics"]} == retrieval["metrics"]


@pytest.mark.parametrize("override, message", [
    ("eval.tasks.2.similarity=late-interaction", "eval.tasks[2]: similarity = 'late-interaction' applies to zeroshot"),
    ("eval.tasks.0.task=segmentation", "eval.tasks.0.task': Input should be 'zeroshot', 'retrieval' or 'val_loss'"),
    ("eval.tasks.0.data=val", "eval.tasks[0].data = 'val': write KIND:PATH"),
    ("eval.tasks.0.data=parquet:val", "eval.tasks[0].data = 'parquet:val': write KIND:PATH"),
    ("eval.tasks.1.data=imagefolder:val", "eval.tasks[1]: task 'retrieval' needs captions"),
    ("eval.tasks.2.templates=photo", "eval.tasks[2]: classnames and templates apply to task 'zeroshot' only"),
    ("eval.tasks.2.task=retrieval", "eval.tasks[1] and eval.tasks[2] both log val/retrieval/pairs/"),
    ("eval.tasks.0.name=my val", "eval.tasks[0].name = 'my val'"),
    ("eval.tasks.0.max_samples=0", "eval.tasks.0.max_samples"),
])
def test_a_bad_task_list_is_refused_naming_the_key(tmp_path, override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(str(write_recipe(tmp_path)), [override])
    assert message in " ".join(str(e.value).split())


@pytest.mark.parametrize("override, message", [
    ("eval.tasks.1.data=jsonl:{tmp}/missing.jsonl", "eval.tasks[1].data = 'jsonl:{tmp}/missing.jsonl': "),
    ("eval.tasks.0.templates={tmp}/none.txt", "eval.tasks[0].templates = '{tmp}/none.txt': no such file"),
    ("eval.tasks.0.classnames={tmp}/names.txt", "eval.tasks[0] (zeroshot on imagefolder:"),
])
def test_train_refuses_missing_task_data_before_training(capsys, tmp_path, override, message):
    (tmp_path / "names.txt").write_text("just one\n")  # 3 class folders: a count mismatch
    recipe = write_recipe(tmp_path)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", recipe, "--run-dir", run, "--set", override.format(tmp=tmp_path))
    assert code == 2 and "error:" in err and message.format(tmp=tmp_path) in err, err
    assert "Traceback" not in err
    assert not (run / "metrics.jsonl").exists()  # refused before the trainer started


def test_val_loss_is_the_clip_loss_of_first_caption_pairs_in_training_batches(ckpt, tmp_path):
    import clipforge
    from clipforge.data.sources import read_caption_data
    from clipforge.eval.embedding import embed_captions, embed_images
    from clipforge.eval.evaluate import score_val_loss
    from clipforge.objectives.contrastive import clip_loss

    model, preprocess, tokenizer = clipforge.load(ckpt)
    data = read_caption_data(f"jsonl:{caption_jsonl(tmp_path)}")
    got = score_val_loss(model, preprocess, tokenizer, data, 4, batch_size=3, workers=0, max_bad_fraction=0.0,
                         progress=False)
    from clipforge.data.sources import load_image

    images = embed_images(model, torch.stack([preprocess(load_image(p)) for p in data.paths]))
    firsts = [data.captions[data.text_to_image.index(i)] for i in range(len(data.paths))]
    texts = embed_captions(model, tokenizer, firsts)
    scale = model.logit_scale.exp()
    want = (clip_loss(images[:4], texts[:4], scale) * 4 + clip_loss(images[4:], texts[4:], scale) * 2) / 6
    assert got["metrics"]["clip_loss"] == pytest.approx(want.item(), rel=1e-5)
    assert got["data"]["pairs"] == 6 and "siglip_loss" not in got["metrics"]


# ----------------------------------------------------------------------------- item 13: CLIP_benchmark conventions
def test_dataset_folder_classnames_and_templates_are_used(ckpt, tmp_path):
    """classnames.txt and zeroshot_classification_templates.txt ({c}, CLIP_benchmark's) in the image
    folder, or in the folder above a split folder, are used unless options say otherwise."""
    root = image_folder(tmp_path / "data" / "test")
    (tmp_path / "data" / "classnames.txt").write_text("crimson\nemerald\nnavy\n")  # the dataset root: above the split
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}\n")
    result = evaluate(ckpt, "zeroshot", f"imagefolder:{root}", plots=False)
    assert result["classnames"] == ["crimson", "emerald", "navy"] and result["num_templates"] == 2
    assert result["options"]["classnames"] == str(tmp_path / "data" / "classnames.txt")
    assert result["options"]["templates"] == str(root / "zeroshot_classification_templates.txt")
    (root / "classnames.txt").write_text("red\ngreen\nblue\n")  # the folder's own file comes first
    assert evaluate(ckpt, "zeroshot", f"imagefolder:{root}", plots=False)["classnames"] == ["red", "green", "blue"]
    given = evaluate(ckpt, "zeroshot", f"imagefolder:{root}", templates="name", plots=False)
    assert given["num_templates"] == 1 and given["options"]["templates"] == "name"
    (root / "zeroshot_classification_templates.txt").write_text("no class here\n")
    with pytest.raises(EvalError, match=r"needs '\{\}' \(or '\{c\}'\)"):
        evaluate(ckpt, "zeroshot", f"imagefolder:{root}", plots=False)


def test_max_samples_is_a_seeded_subset(ckpt, tmp_path):
    root = image_folder(tmp_path / "val", classes=3, per_class=4)
    a = evaluate(ckpt, "zeroshot", f"imagefolder:{root}", max_samples=5, plots=False)
    b = evaluate(ckpt, "zeroshot", f"imagefolder:{root}", max_samples=5, plots=False)
    assert a["data"]["files"] == 5 and a["metrics"] == b["metrics"] and a["options"]["max_samples"] == 5
    retrieval = evaluate(ckpt, "retrieval", f"jsonl:{caption_jsonl(tmp_path / 'pairs')}", max_samples=3)
    assert retrieval["data"]["images"] == 3
    with pytest.raises(EvalError, match="applies to zeroshot and retrieval"):
        evaluate(ckpt, "linear-probe", f"imagefolder:{root}", train_data=f"imagefolder:{root}", max_samples=3)


def test_several_models_in_one_call_then_merged(capsys, tmp_path):
    """`clipforge eval A B --out DIR` writes one result per model; `clipforge eval merge` makes one
    CSV of those and of a CLIP_benchmark result file."""
    a = make_tiny_checkpoint(tmp_path / "runs" / "a", seed=1)
    b = make_tiny_checkpoint(tmp_path / "runs" / "b", seed=2)
    root = image_folder(tmp_path / "val")
    out = tmp_path / "results"
    code, _, err = run_cli(capsys, "eval", a, b, "--task", "zeroshot", "--data", f"imagefolder:{root}",
                           "--out", out, "--no-plots", "--workers", "0")
    assert code == 0, err
    files = sorted(out.glob("*.json"))
    assert len(files) == 2
    results = [json.loads(f.read_text()) for f in files]
    assert {r["model"] for r in results} == {str(a), str(b)}

    code, _, err = run_cli(capsys, "eval", a, b, "--task", "zeroshot", "--data", f"imagefolder:{root}",
                           "--out", tmp_path / "one.json")
    assert code == 2 and "with 2 models, --out is a directory" in err

    # a CLIP_benchmark result (its `eval` writes this layout) merges too
    (out / "cifar10_openai.json").write_text(json.dumps({
        "dataset": "cifar10", "model": "ViT-B-32-quickgelu", "pretrained": "openai",
        "task": "zeroshot_classification", "metrics": {"acc1": 0.9, "acc5": 0.99, "mean_per_class_recall": 0.9},
        "language": "en"}))
    table = tmp_path / "table.csv"
    code, _, err = run_cli(capsys, "eval", "merge", out, "--out", table)
    assert code == 0, err
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 3
    assert list(rows[0])[:4] == ["model", "pretrained", "dataset", "task"]
    by_model = {r["model"]: r for r in rows}
    assert by_model["ViT-B-32-quickgelu"]["acc1"] == "0.9"
    for r in results:
        assert float(by_model[r["model"]]["acc1"]) == r["metrics"]["acc1"]

    (tmp_path / "other.json").write_text("{}")
    code, _, err = run_cli(capsys, "eval", "merge", tmp_path / "other.json")
    assert code == 2 and "not an evaluation result" in err


# ----------------------------------------------------------------------------- item 13: CLIP_benchmark itself
def _clip_benchmark_or_skip(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"CLIP_benchmark is not usable here ({e}); pip install 'clipforge[clip-benchmark]'")


def test_clip_benchmark_scores_a_checkpoint_as_clipforge_eval_does(ckpt, tmp_path):
    """CLIP_benchmark's own zero-shot code on a local image folder (torchvision's ImageFolder, as its
    ImageNet variants are read), with the checkpoint loaded through the clipforge model type: the
    same classifier, image features and metrics as `clipforge eval`."""
    _clip_benchmark_or_skip("clip_benchmark.models")
    zsc = _clip_benchmark_or_skip("clip_benchmark.metrics.zeroshot_classification")
    from torchvision.datasets import ImageFolder

    import clipforge
    from clip_benchmark.models import load_clip
    from clipforge.eval.clip_benchmark import register
    from clipforge.eval.zeroshot import zero_shot_classifier

    root = image_folder(tmp_path / "val", classes=6, per_class=3)  # >= 5 classes: CLIP_benchmark reports acc5
    names = [n.replace("_", " ") for n in sorted(COLOURS)]
    templates = ["a photo of a {c}.", "a {c}"]
    register()
    model, transform, tokenizer = load_clip("clipforge", "clipforge", str(ckpt), None, "cpu")
    loader = torch.utils.data.DataLoader(ImageFolder(str(root), transform=transform), batch_size=4)
    theirs = zsc.zero_shot_classifier(model, tokenizer, names, templates, "cpu", amp=False)
    base_model, _, base_tokenizer = clipforge.load(ckpt)
    ours = zero_shot_classifier(base_model, base_tokenizer, names, [t.replace("{c}", "{}") for t in templates])
    torch.testing.assert_close(theirs.T, ours, rtol=1e-5, atol=1e-6)
    metrics = zsc.evaluate(model, loader, tokenizer, names, templates, "cpu", amp=False)

    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    result = evaluate(ckpt, "zeroshot", f"imagefolder:{root}", plots=False, device="cpu")
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert metrics[key] == pytest.approx(result["metrics"][key], abs=1e-9), key


def test_clip_benchmark_command_line_runs_offline_on_local_data(ckpt, tmp_path, capsys):
    """`python -m clipforge.eval.clip_benchmark eval --pretrained CKPT ...` on a dataset in CLIP_benchmark's
    local WebDataset layout (its way to add a dataset), nothing downloaded: the result JSON matches
    `clipforge eval` on the same images, and `clipforge eval merge` reads both."""
    _clip_benchmark_or_skip("clip_benchmark.cli")
    _clip_benchmark_or_skip("webdataset")
    root = image_folder(tmp_path / "val", classes=6, per_class=2)
    names = [n.replace("_", " ") for n in sorted(COLOURS)]
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}\n")
    wds = tmp_path / "wds"
    (wds / "test").mkdir(parents=True)
    with tarfile.open(wds / "test" / "0.tar", "w") as tar:
        for label, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
            for image in sorted(folder.glob("*.png")):
                for suffix, content in (("png", image.read_bytes()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{folder.name}_{image.stem}.{suffix}")
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
    (wds / "test" / "nshards.txt").write_text("1\n")
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        (wds / name).write_text((root / name).read_text())

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "cb"
    proc = subprocess.run([sys.executable, "-m", "clipforge.eval.clip_benchmark", "eval", "--dataset", "wds/mine",
                           "--dataset_root", str(wds), "--pretrained", str(ckpt), "--no_amp", "--num_workers", "0",
                           "--batch_size", "4", "--quiet", "--output", f"{out}/{{dataset}}_{{pretrained}}.json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(out.glob("*.json"))
    assert [f.name for f in files] == [f"mine_{model_slug(ckpt)}.json"]  # the path's slashes made safe
    theirs = json.loads(files[0].read_text())
    assert theirs["model"] == "clipforge" and theirs["pretrained"] == str(ckpt)

    ours = evaluate(ckpt, "zeroshot", f"imagefolder:{root}", plots=False, device="cpu",
                    out=out / "clipforge.json")
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert theirs["metrics"][key] == pytest.approx(ours["metrics"][key], abs=1e-9), key
    code, table, err = run_cli(capsys, "eval", "merge", out)
    assert code == 0, err
    rows = list(csv.DictReader(table.splitlines()))
    assert sorted(r["task"] for r in rows) == ["zeroshot", "zeroshot_classification"]
