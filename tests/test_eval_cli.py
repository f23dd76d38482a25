"""User-facing evaluation: data readers, zero-shot / retrieval / linear probe, CLI errors, real data."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.config import Recipe
from clipforge.data.sources import (
    DataError,
    load_image,
    parse_data_spec,
    read_caption_data,
    read_classification_data,
)
from clipforge.eval.evaluate import EvalError, evaluate
from clipforge.eval.linear_probe import fewshot_indices, linear_probe, stratified_split, sweep_C
from clipforge.models.clip import CLIP
from clipforge.models.tokenizer import BPETokenizer
from clipforge.train.checkpoint import save_checkpoint
from tiny_checkpoint import run_cli

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EMOJI = SHARED_DATA / "emoji-noto-dev" / "captions.jsonl"
CIFAR_TAR = SHARED_DATA / "cifar10-train.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
COLOURS = {"blue_things": (20, 40, 230), "green_things": (30, 200, 40), "red_things": (230, 30, 30)}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A randomly initialised tiny CLIP saved as a real checkpoint directory."""
    torch.manual_seed(0)
    recipe = Recipe.model_validate({
        "name": "tiny-eval",
        "model": dict(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                      vocab_size=300, context_length=16, text_width=32, text_layers=1, text_heads=2, embed_dim=32),
        "data": {"tokenizer": {"vocab_size": 300}},
    })
    corpus = ["a photo of a red circle", "grinning face with big eyes", " ".join(CIFAR_CLASSES), "blue green things"]
    tokenizer = BPETokenizer.train(corpus, 300, 16)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), 0, CLIP(recipe.model), recipe, tokenizer, None, keep_last=1)


def noisy_colour_image(rgb, seed: int, size=(40, 36)) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def make_colour_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    for c, (name, rgb) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noisy_colour_image(rgb, seed * 1000 + c * 100 + i).save(root / name / f"{i:03d}.jpg")
    return root


# ----------------------------------------------------------------------------- spec strings and readers
def test_data_spec_prefixes():
    spec = parse_data_spec("imagefolder:some/dir")
    assert spec.kind == "imagefolder" and spec.path == Path("some/dir")
    with pytest.raises(DataError, match="unknown data spec prefix 'folder:'.*valid prefixes: imagefolder:, jsonl:, csv:"):
        parse_data_spec("folder:some/dir")
    with pytest.raises(DataError, match="no kind prefix.*e.g. jsonl:captions.jsonl"):
        parse_data_spec("captions.jsonl")
    # a caller (a future training source) can accept other kinds through the same parser
    assert parse_data_spec("wds:shards/{000..009}.tar", kinds=("wds",)).kind == "wds"


def test_image_folder_names_and_order(tmp_path):
    root = make_colour_folder(tmp_path / "val", per_class=2)
    (root / "red_things" / "notes.txt").write_text("not an image, ignored")
    data = read_classification_data(f"imagefolder:{root}")
    assert data.classnames == ["blue things", "green things", "red things"]
    assert data.labels == [0, 0, 1, 1, 2, 2]
    assert [p.parent.name for p in data.paths] == ["blue_things"] * 2 + ["green_things"] * 2 + ["red_things"] * 2
    names = tmp_path / "names.txt"
    names.write_text("sky\ngrass\n\nfire\n")
    assert read_classification_data(f"imagefolder:{root}", names).classnames == ["sky", "grass", "fire"]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found: .*nope"):
        read_classification_data(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class subfolders in .*one subfolder per class"):
        read_classification_data(f"imagefolder:{tmp_path / 'flat'}")
    root = make_colour_folder(tmp_path / "val", per_class=1)
    (root / "zebra").mkdir()
    with pytest.raises(DataError, match="class folder .*zebra has no images"):
        read_classification_data(f"imagefolder:{root}")
    (root / "zebra").rmdir()
    names = tmp_path / "names.txt"
    names.write_text("sky\ngrass\n")
    with pytest.raises(DataError, match=r"has 2 names but .* has 3 class folders.*\(blue_things, green_things, red_things\)"):
        read_classification_data(f"imagefolder:{root}", names)
    with pytest.raises(DataError, match="class names file not found"):
        read_classification_data(f"imagefolder:{root}", tmp_path / "missing.txt")


def test_labelled_jsonl_and_csv(tmp_path):
    (tmp_path / "img").mkdir()
    rows = [("img/a.png", "cat"), ("img/b.png", "dog"), ("img/c.png", "cat")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": p, "label": l}) + "\n" for p, l in rows))
    data = read_classification_data(f"jsonl:{tmp_path / 'd.jsonl'}")
    assert data.classnames == ["cat", "dog"] and data.labels == [0, 1, 0]
    assert data.paths[1] == tmp_path / "img" / "b.png"  # relative to the file, not the cwd
    (tmp_path / "d.csv").write_text("filepath,label\nimg/a.png,1\nimg/b.png,0\n")
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\n")
    data = read_classification_data(f"csv:{tmp_path / 'd.csv'}", names)
    assert data.labels == [1, 0] and data.classnames == ["cat", "dog", "bird"]
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "label": "x"}\n{"image": oops}\n')
    with pytest.raises(DataError, match="bad.jsonl, line 2: not valid JSON"):
        read_classification_data(f"jsonl:{tmp_path / 'bad.jsonl'}")
    with pytest.raises(DataError, match="jsonl file not found"):
        read_classification_data(f"jsonl:{tmp_path / 'none.jsonl'}")
    (tmp_path / "nolabel.csv").write_text("image,caption\na.png,a cat\n")
    with pytest.raises(DataError, match="classification needs a 'label' column.*found image, caption"):
        read_classification_data(f"csv:{tmp_path / 'nolabel.csv'}")


def test_captions_grouped_by_image(tmp_path):
    lines = [
        {"image": "a.png", "text": "a red thing"},
        {"image": "b.png", "text": ["a blue thing", "something blue"]},
        {"image": "a.png", "text": "red again"},
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    data = read_caption_data(f"jsonl:{tmp_path / 'c.jsonl'}")
    assert data.paths == [tmp_path / "a.png", tmp_path / "b.png"]
    assert data.captions == ["a red thing", "a blue thing", "something blue", "red again"]
    assert data.text_to_image == [0, 1, 1, 0]
    (tmp_path / "c.csv").write_text("image,caption\na.png,one\nb.png,two\na.png,three\n")
    assert read_caption_data(f"csv:{tmp_path / 'c.csv'}").text_to_image == [0, 1, 0]
    with pytest.raises(DataError, match="retrieval needs captions.*jsonl:FILE or csv:FILE"):
        read_caption_data(f"imagefolder:{tmp_path}")


def test_load_image_honours_exif_orientation_and_whitens_transparency(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a 40x20 sensor image is shown 20x40
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.putpixel((5, 5), (0, 0, 255, 255))
    rgba.save(tmp_path / "t.png")
    img = load_image(tmp_path / "t.png")
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((5, 5)) == (0, 0, 255)


# ----------------------------------------------------------------------------- linear probe protocol
def test_sweep_finds_the_best_C_to_an_eighth_of_a_decade():
    calls = []

    def score(C):
        calls.append(C)
        return -(np.log10(C) - 2.3) ** 2

    C, history = sweep_C(score)
    assert abs(np.log10(C) - 2.3) <= 1 / 16 + 1e-9
    assert len(calls) == len(set(calls)) == len(history) <= 13 + 2 * 3  # each C fitted once, capped
    assert min(calls) == pytest.approx(1e-6) and max(calls) == pytest.approx(1e6)
    # exact ties go to the smaller C (stronger regularisation) ...
    assert sweep_C(lambda C: 1.0)[0] == pytest.approx(1e-6)
    # ... but a tuple score breaks accuracy ties with its second entry (the probe's -log loss)
    assert sweep_C(lambda C: (1.0, -abs(np.log10(C) - 1)))[0] == pytest.approx(10.0)


def test_fewshot_and_validation_split_are_seeded_and_stratified():
    labels = np.repeat(np.arange(4), [30, 30, 30, 3])
    keep = fewshot_indices(labels, 5, seed=1)
    assert np.bincount(labels[keep]).tolist() == [5, 5, 5, 3]
    assert np.array_equal(keep, fewshot_indices(labels, 5, seed=1))
    assert not np.array_equal(keep, fewshot_indices(labels, 5, seed=2))
    train, val = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[val]).tolist() == [6, 6, 6, 1]
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    one_each = stratified_split(np.array([0, 1, 2]), 0.2, seed=0)
    assert len(one_each[1]) == 0  # a single sample per class always stays in training


def test_linear_probe_separates_separable_features_deterministically():
    g = np.random.default_rng(0)
    centres = g.normal(size=(3, 8)) * 3
    y_train, y_test = np.repeat(np.arange(3), 20), np.repeat(np.arange(3), 10)
    x_train = centres[y_train] + g.normal(size=(60, 8))
    x_test = centres[y_test] + g.normal(size=(30, 8))
    a = linear_probe(x_train, y_train, x_test, y_test, 3, seed=0)
    b = linear_probe(x_train, y_train, x_test, y_test, 3, seed=0)
    assert a["metrics"]["acc1"] == 1.0 and a["metrics"]["mean_per_class_recall"] == 1.0
    assert a["C"] == b["C"] and a["metrics"] == b["metrics"] and a["sweep"] == b["sweep"]
    assert (a["train_samples"], a["val_samples"]) == (48, 12)
    assert 1e-6 <= a["C"] <= 1e6 and len(a["sweep"]) <= 19
    # labels that carry no information: the probe cannot beat chance by much on test
    shuffled = linear_probe(x_train, g.permutation(y_train), x_test, y_test, 3, seed=0)
    assert shuffled["metrics"]["acc1"] < 0.8


def test_missing_sklearn_names_the_extra(monkeypatch, tiny_ckpt, tmp_path):
    root = make_colour_folder(tmp_path / "f", per_class=2)
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    with pytest.raises(ImportError, match=r"pip install 'clipforge\[eval\]'"):
        evaluate(tiny_ckpt, "linear-probe", f"imagefolder:{root}", train_data=f"imagefolder:{root}")


# ----------------------------------------------------------------------------- end to end on small folders
def test_zeroshot_equals_a_hand_computed_classifier(tiny_ckpt, tmp_path):
    root = make_colour_folder(tmp_path / "val", per_class=4)
    out = tmp_path / "res" / "zs.json"
    result = evaluate(tiny_ckpt, "zeroshot", f"imagefolder:{root}", templates="name", out=out, workers=2)

    model, preprocess, tokenizer = clipforge.load(tiny_ckpt)
    classes = ["blue things", "green things", "red things"]
    w = clipforge.zero_shot_classifier(model, tokenizer, classes, ["{}"])
    hits, per_class = 0, {}
    for label, folder in enumerate(sorted(p for p in root.iterdir())):
        for f in sorted(folder.iterdir()):
            with torch.no_grad():
                pred = (model.encode_image(preprocess(Image.open(f))[None]) @ w.T).argmax().item()
            hits += pred == label
            per_class.setdefault(label, []).append(pred == label)
    assert result["metrics"]["acc1"] == pytest.approx(hits / 12)
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx(np.mean([np.mean(v) for v in per_class.values()]))
    assert result["metrics"]["acc5"] == 1.0  # 3 classes: the true one is always in the top 5
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert {"task", "dataset", "model", "metrics", "options"} <= set(saved)
    assert saved["task"] == "zeroshot" and saved["model"] == str(tiny_ckpt)
    assert saved["options"]["templates"] == "name" and saved["data"]["images"] == 12
    png = Path(saved["plots"]["confusion_matrix"])
    assert png == tmp_path / "res" / "zs_confusion.png" and Image.open(png).size[0] > 100


def test_linear_probe_on_image_folders_with_fewshot(tiny_ckpt, tmp_path):
    train = make_colour_folder(tmp_path / "train", per_class=12, seed=1)
    test = make_colour_folder(tmp_path / "test", per_class=5, seed=2)
    result = evaluate(tiny_ckpt, "linear-probe", f"imagefolder:{test}", train_data=f"imagefolder:{train}",
                      fewshot_k=6, seed=3)
    # colours are trivially separable even for random features
    assert result["metrics"]["acc1"] == 1.0
    probe = result["linear_probe"]
    assert probe["train_samples"] + probe["val_samples"] == 18 and probe["test_samples"] == 15
    again = evaluate(tiny_ckpt, "linear-probe", f"imagefolder:{test}", train_data=f"imagefolder:{train}",
                     fewshot_k=6, seed=3)
    assert again["linear_probe"] == probe


def test_retrieval_skips_and_counts_unreadable_images(tiny_ckpt, tmp_path):
    lines = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        noisy_colour_image(rgb, i).save(tmp_path / f"{i}.png")
        lines += [{"image": f"{i}.png", "text": [f"{name} number {i}", "a colour"]}]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines.append({"image": "broken.png", "text": "lost"})
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))

    with pytest.raises(DataError, match=r"1 of 4 images could not be read.*broken.png"):
        evaluate(tiny_ckpt, "retrieval", f"jsonl:{tmp_path / 'c.jsonl'}")
    result = evaluate(tiny_ckpt, "retrieval", f"jsonl:{tmp_path / 'c.jsonl'}", max_bad_fraction=0.3)
    assert result["data"]["images"] == 3 and result["data"]["skipped"] == 1 and result["data"]["captions"] == 6
    assert result["data"]["skipped_files"][0]["path"].endswith("broken.png")
    m = result["metrics"]
    assert set(m) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert m["image_retrieval_recall@10"] == 1.0 and m["text_retrieval_recall@5"] == 1.0  # only 3 images
    assert 0 <= m["image_retrieval_recall@1"] <= 1


# ----------------------------------------------------------------------------- CLI and bad input
def test_cli_eval_writes_json_and_prints_a_table(capsys, tiny_ckpt, tmp_path):
    root = make_colour_folder(tmp_path / "val", per_class=2)
    code, out, err = run_cli(capsys, "eval", tiny_ckpt, "--task", "zeroshot", "--data", f"imagefolder:{root}",
                             "--out", tmp_path / "r.json", "--no-plots", "--workers", "0")
    assert code == 0, err
    assert "acc1" in out and "mean_per_class_recall" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["metrics"]["acc1"] >= 0 and "plots" not in saved
    assert not (tmp_path / "r_confusion.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--task", "segmentation", "--data", "imagefolder:{root}"],
     "unknown task 'segmentation'; choose one of zeroshot, retrieval, linear-probe"),
    (["--task", "zeroshot", "--data", "folder:{root}"], "valid prefixes: imagefolder:, jsonl:, csv:"),
    (["--task", "zeroshot", "--data", "imagefolder:{tmp}/missing"], "image folder not found"),
    (["--task", "linear-probe", "--data", "imagefolder:{root}"], "needs training images: pass --train-data"),
    (["--task", "zeroshot", "--data", "imagefolder:{root}", "--classnames", "{tmp}/names.txt"],
     "has 1 names but"),
    (["--task", "zeroshot", "--data", "imagefolder:{root}", "--templates", "nosuchset"], "not a shipped set"),
    (["--task", "linear-probe", "--data", "imagefolder:{root}", "--train-data", "imagefolder:{root}",
      "--fewshot-k", "0"], "--fewshot-k must be >= 1"),
])
def test_cli_bad_input_is_a_clear_error(capsys, tiny_ckpt, tmp_path, args, message):
    root = make_colour_folder(tmp_path / "val", per_class=1)
    (tmp_path / "names.txt").write_text("only one\n")
    args = [a.format(root=root, tmp=tmp_path) for a in args]
    code, out, err = run_cli(capsys, "eval", tiny_ckpt, *args)
    assert code == 2
    assert "error:" in err and message in " ".join(err.split()), err
    assert "Traceback" not in err


def test_cli_corrupt_images_past_the_threshold_stop_with_names(capsys, tiny_ckpt, tmp_path):
    root = make_colour_folder(tmp_path / "val", per_class=3)
    for i in range(2):
        (root / "red_things" / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    code, _, err = run_cli(capsys, "eval", tiny_ckpt, "--task", "zeroshot", "--data", f"imagefolder:{root}",
                           "--workers", "0", "--max-bad-fraction", "0.1")
    err = "".join(err.split())  # rich wraps long lines
    assert code == 2 and "2of11imagescouldnotberead" in err and "red_things/bad0.jpg(" in err
    code, _, err = run_cli(capsys, "eval", tiny_ckpt, "--task", "zeroshot", "--data", f"imagefolder:{root}",
                           "--workers", "0", "--max-bad-fraction", "0.2")
    assert code == 0 and "images skipped" in _, err


def test_checkpoint_without_weights_exits_2_without_traceback(tiny_ckpt, tmp_path):
    broken = tmp_path / "ckpt"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    root = make_colour_folder(tmp_path / "val", per_class=1)
    proc = subprocess.run([sys.executable, "-m", "clipforge", "eval", str(broken), "--task", "zeroshot",
                           "--data", f"imagefolder:{root}"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "model.safetensors is missing (the checkpoint has no weights)" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- real data (when present)
needs_emoji = pytest.mark.skipif(not EMOJI.is_file(), reason=f"real emoji data not found at {EMOJI}")
needs_cifar = pytest.mark.skipif(not CIFAR_TAR.is_file(), reason=f"real CIFAR-10 archive not found at {CIFAR_TAR}")


@needs_emoji
def test_emoji_retrieval_on_real_rgba_pngs(tiny_ckpt, tmp_path):
    rows = [json.loads(l) for l in EMOJI.read_text().splitlines()]
    first = EMOJI.parent / rows[0]["image"]
    with Image.open(first) as raw:
        assert raw.mode == "RGBA" and raw.getpixel((0, 0))[3] == 0  # the corner is transparent
    assert load_image(first).getpixel((0, 0)) == (255, 255, 255)
    _, preprocess, _ = clipforge.load(tiny_ckpt)
    assert torch.all(preprocess(load_image(first))[:, 0, 0] == 255)

    result = evaluate(tiny_ckpt, "retrieval", f"jsonl:{EMOJI}", out=tmp_path / "emoji.json", batch_size=256)
    assert result["data"] == {"files": len(rows), "images": len(rows), "skipped": 0, "skipped_files": [],
                              "captions": len(rows)}
    m = result["metrics"]
    for direction in ("image", "text"):
        r = [m[f"{direction}_retrieval_recall@{k}"] for k in (1, 5, 10)]
        assert 0 <= r[0] <= r[1] <= r[2] <= 1
    assert m["image_retrieval_recall@10"] < 0.2  # a random model is near chance (10 / 1500)


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory) -> tuple[Path, Path]:
    """20 training and 10 test images per class, streamed out of the archive (not all 50,000)."""
    root = tmp_path_factory.mktemp("cifar")
    wanted = {"train": 20, "test": 10}
    counts: dict[str, int] = {}
    with tarfile.open(CIFAR_TAR, "r|gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 4:
                continue
            cls = parts[2]
            n = counts.get(cls, 0)
            if n >= sum(wanted.values()):
                continue
            split = "train" if n < wanted["train"] else "test"
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            (root / split / cls / parts[3]).write_bytes(tar.extractfile(member).read())
            counts[cls] = n + 1
            if len(counts) == 10 and all(v == 30 for v in counts.values()):
                break
    return root / "train", root / "test"


@needs_cifar
def test_cifar_zeroshot_and_fewshot_linear_probe(tiny_ckpt, cifar_subset, tmp_path):
    train, test = cifar_subset
    zs = evaluate(tiny_ckpt, "zeroshot", f"imagefolder:{test}", templates="photo", out=tmp_path / "zs.json")
    assert zs["classnames"] == CIFAR_CLASSES and zs["data"]["images"] == 100
    assert all(0 <= v <= 1 for v in zs["metrics"].values())
    assert zs["metrics"]["acc1"] <= zs["metrics"]["acc5"]
    assert (tmp_path / "zs_confusion.png").is_file()

    lp = evaluate(tiny_ckpt, "linear-probe", f"imagefolder:{test}", train_data=f"imagefolder:{train}",
                  fewshot_k=8, out=tmp_path / "lp.json")
    probe = lp["linear_probe"]
    assert probe["train_samples"] + probe["val_samples"] == 80 and probe["test_samples"] == 100
    assert 1e-6 <= probe["C"] <= 1e6 and len(probe["sweep"]) <= 19
    assert {"C", "val_acc1", "val_log_loss"} == set(probe["sweep"][0])
    assert all(0 <= v <= 1 for v in lp["metrics"].values())
    assert json.loads((tmp_path / "lp.json").read_text())["metrics"] == lp["metrics"]


def test_api_option_errors_raise_eval_error(tiny_ckpt, tmp_path):
    root = make_colour_folder(tmp_path / "val", per_class=1)
    with pytest.raises(EvalError, match="only apply to --task linear-probe"):
        evaluate(tiny_ckpt, "zeroshot", f"imagefolder:{root}", fewshot_k=4)
    with pytest.raises(EvalError, match="--max-bad-fraction must be between 0 and 1"):
        evaluate(tiny_ckpt, "zero-shot", f"imagefolder:{root}", max_bad_fraction=2)
    (tmp_path / "ids.csv").write_text("image,label\nval/red_things/000.jpg,0\nval/blue_things/000.jpg,1\n")
    with pytest.raises(EvalError, match="classes are only numbers.*pass --classnames"):
        evaluate(tiny_ckpt, "zeroshot", f"csv:{tmp_path / 'ids.csv'}")


def test_out_paths_are_checked_before_the_work_and_never_overwrite_an_input(capsys, tiny_ckpt, tmp_path):
    from clipforge.outputs import new_output_dir

    root = make_colour_folder(tmp_path / "val", per_class=1)
    args = ["--task", "zeroshot", "--data", f"imagefolder:{root}", "--workers", "0", "--no-plots"]
    # one model, --out an existing directory: the result goes inside it
    (tmp_path / "res").mkdir()
    code, _, err = run_cli(capsys, "eval", tiny_ckpt, *args, "--out", tmp_path / "res")
    assert code == 0, err
    assert [p.suffix for p in (tmp_path / "res").iterdir()] == [".json"]
    # a missing second model stops before the first is evaluated
    code, _, err = run_cli(capsys, "eval", tiny_ckpt, tmp_path / "nope", *args, "--out", tmp_path / "two")
    assert code == 2 and "checkpoint not found" in err and "Traceback" not in err and not (tmp_path / "two").exists()
    # eval merge: --out is one of the inputs
    result = next((tmp_path / "res").glob("*.json"))
    before = result.read_text()
    code, _, err = run_cli(capsys, "eval", "merge", result, "--out", result)
    assert code == 2 and "is also one of the inputs" in err and result.read_text() == before
    # a directory verb given a file
    with pytest.raises(FileExistsError, match="is a file, and --out here names a directory"):
        new_output_dir(result)
    code, _, err = run_cli(capsys, "bench", "tiny-shapes", "--out", tmp_path / "res")
    assert code == 2 and "is a directory, and --out here names a file" in err and "Traceback" not in err
