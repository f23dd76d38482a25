"""Interop: OpenCLIP's CSV layout and named columns (issue item 7); one notion of "model" in every
verb that takes one, and failed commands that leave nothing in the way (item 10)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipforge
from clipforge.config import DataConfig, RecipeError, load_recipe
from clipforge.data.pipeline import build_source_train_loader
from clipforge.data.sources import DataError, read_caption_data, read_classification_data
from tiny_checkpoint import TINY_MODEL_TOML, make_caption_jsonl, run_cli as cli_in_process

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EMOJI = SHARED_DATA / "emoji-noto-dev" / "captions.jsonl"

TINY = """
base = "tiny-shapes"
name = "tiny-interop"
""" + TINY_MODEL_TOML + """[data]
batch_size = 4
num_workers = 0
shuffle_buffer = 16
[data.tokenizer]
vocab_size = 300
corpus_size = 200
[schedule]
kind = "constant"
warmup_steps = 0
[train]
threads = 1
steps = 2
checkpoint_every_steps = 2
[eval]
at_end = false
[logging]
tensorboard = false
progress = false
"""

COLOURS = [("red", (220, 30, 30)), ("green", (30, 180, 60)), ("blue", (30, 60, 220)), ("yellow", (230, 210, 40))]


def write_images(folder: Path, n: int) -> list[str]:
    """n small images, PNG and JPEG in turn (a coloured square on grey); names relative to folder.parent."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        pixels = np.full((36, 40, 3), 90 + 10 * i, dtype=np.uint8)
        pixels[6:30, 8:32] = COLOURS[i % len(COLOURS)][1]
        name = f"{i:03d}.{'png' if i % 2 == 0 else 'jpg'}"
        Image.fromarray(pixels).save(folder / name)
        names.append(f"{folder.name}/{name}")
    return names


def run_cli(capsys, *args) -> tuple[int, str]:
    """``clipforge.cli.main`` in-process (user errors print and exit 2, as on the command line): (code, output)."""
    code, out, err = cli_in_process(capsys, *args)
    return code, out + err


# ----------------------------------------------------------------------------- item 7: OpenCLIP's CSV
@pytest.fixture(scope="module")
def openclip_csv(tmp_path_factory) -> Path:
    """OpenCLIP's default layout: tab-separated, columns filepath and title (captions hold commas)."""
    root = tmp_path_factory.mktemp("openclip")
    names = write_images(root / "images", 8)
    lines = ["filepath\ttitle"] + [f"{n}\ta {COLOURS[i % 4][0]} square, number {i}" for i, n in enumerate(names)]
    table = root / "train.csv"
    table.write_text("\n".join(lines) + "\n")
    return table


def train_tiny(root: Path, data: str) -> Path:
    """A run directory ``root/t1`` trained for 2 steps on ``data`` (checkpoints/latest inside)."""
    from clipforge.train.trainer import Trainer

    root.mkdir(parents=True, exist_ok=True)
    (root / "tiny.toml").write_text(TINY)
    result = Trainer(load_recipe(str(root / "tiny.toml"), [f"data.train={data}"]), root / "t1").fit()
    assert result.step == 2
    return root / "t1"


def test_separator_is_sniffed_from_the_header_line():
    from clipforge.data.sources import sniff_separator

    assert sniff_separator("filepath\ttitle\n") == "\t"
    assert sniff_separator("image,caption\n") == ","
    assert sniff_separator("image;caption;label\n") == ";"
    assert sniff_separator("image|caption\n") == "|"
    assert sniff_separator('"path, with comma"\ttitle\n') == "\t"  # separators inside quotes do not count
    assert sniff_separator("image\n") == ","  # one column: nothing to split


def test_openclip_tab_separated_csv_loads_and_trains(openclip_csv, tmp_path):
    titles = [line.split("\t")[1] for line in openclip_csv.read_text().splitlines()[1:]]
    # the evaluation/embedding reader: tab split, `filepath` and OpenCLIP's `title` found by themselves
    data = read_caption_data(f"csv:{openclip_csv}")
    assert data.captions == titles and data.paths[0] == openclip_csv.parent / "images" / "000.png"

    # the training loader: one batch of real pixels with the titles as captions
    cfg = DataConfig(train=f"csv:{openclip_csv}", batch_size=4, num_workers=0)
    batch = next(build_source_train_loader(cfg, 32, None))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].float().std() > 1
    assert set(batch["captions"]) <= set(titles) and batch["labels"].tolist() == [-1] * 4

    # and the trainer takes two steps on it, with finite losses
    run = train_tiny(tmp_path, f"csv:{openclip_csv}")
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_recipe_names_the_columns_of_a_jsonl_and_the_labels(tmp_path):
    names = write_images(tmp_path / "pics", 6)
    rows = [{"img": n, "desc": f"a {COLOURS[i % 4][0]} square", "kind": COLOURS[i % 4][0]} for i, n in enumerate(names)]
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))

    recipe = load_recipe("tiny-shapes", [f"data.train=jsonl:{table}", "data.image_key=img", "data.caption_key=desc",
                                         "data.label_key=kind", "data.batch_size=6", "data.num_workers=0"])
    batch = next(build_source_train_loader(recipe.data, 32, None))
    classes = sorted({r["kind"] for r in rows})  # string labels: their index in sorted order
    by_key = {f"pairs.jsonl:{i + 1}": r for i, r in enumerate(rows)}
    assert sorted(batch["keys"]) == sorted(by_key)
    for key, caption, label in zip(batch["keys"], batch["captions"], batch["labels"].tolist()):
        assert caption == by_key[key]["desc"] and classes[label] == by_key[key]["kind"]

    # the readers evaluation uses take the same names
    labelled = read_classification_data(f"jsonl:{table}", image_key="img", label_key="kind")
    assert labelled.classnames == classes and labelled.paths[1] == tmp_path / names[1]


def test_recipe_separator_and_a_label_column_without_captions(tmp_path):
    names = write_images(tmp_path / "pics", 4)
    table = tmp_path / "labels.csv"  # a colon: not one of the sniffed separators, so the recipe names it
    table.write_text("path:cls\n" + "".join(f"{n}:{COLOURS[i % 2][0]}\n" for i, n in enumerate(names)))
    cfg = DataConfig(train=f"csv:{table}", csv_separator=":", label_key="cls", batch_size=4, num_workers=0,
                     caption_template="an image of {}")
    batch = next(build_source_train_loader(cfg, 32, None))
    # no caption column: the class name fills data.caption_template, as for an image folder
    assert sorted(batch["captions"]) == ["an image of green"] * 2 + ["an image of red"] * 2
    assert sorted(batch["labels"].tolist()) == [0, 0, 1, 1]

    # without the separator the header is one column, and the error says what to set
    with pytest.raises(DataError, match=r"found path:cls; if that is several columns, name the separator with "
                                        r"data.csv_separator"):
        build_source_train_loader(DataConfig(train=f"csv:{table}", num_workers=0), 32, None)
    # OpenCLIP's spelling of a tab works in a recipe; more than one character does not
    on_table = f"data.train=csv:{table}"
    assert load_recipe("tiny-shapes", [on_table, "data.csv_separator=\\t"]).data.csv_separator == "\t"
    assert load_recipe("tiny-shapes", [on_table, "data.csv_separator=tab"]).data.csv_separator == "\t"
    with pytest.raises(RecipeError, match="data.csv_separator must be one character"):
        load_recipe("tiny-shapes", [on_table, "data.csv_separator=;;"])
    # column names where data.train has no table would be ignored silently: refused instead
    with pytest.raises(RecipeError, match=r"data.label_key: only csv:/jsonl: tables have columns, and data.train "
                                          r"\('shapes'\) has none"):
        load_recipe("tiny-shapes", ["data.label_key=category"])


def test_a_missing_named_column_is_a_clear_error_listing_the_columns(openclip_csv, tmp_path):
    for option, value in (("image_key", "image"), ("caption_key", "caption"), ("label_key", "category")):
        cfg = DataConfig(train=f"csv:{openclip_csv}", num_workers=0, **{option: value})
        with pytest.raises(DataError, match=rf"no column '{value}' \(named by data.{option}\); "
                                            r"the columns are: filepath, title$"):
            build_source_train_loader(cfg, 32, None)
    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"file": "a.png", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r"no image path column; expected one of image, filepath, image_path, path "
                                        r"\(found file, caption\); a recipe names another with data.image_key"):
        build_source_train_loader(DataConfig(train=f"jsonl:{table}", num_workers=0), 32, None)


@pytest.mark.skipif(not EMOJI.is_file(), reason=f"shared emoji data not found at {EMOJI}")
def test_emoji_category_is_a_label_source():
    rows = [json.loads(line) for line in EMOJI.read_text().splitlines() if line.strip()]
    categories = sorted({r["category"] for r in rows})
    cfg = DataConfig(train=f"jsonl:{EMOJI}", label_key="category", batch_size=16, num_workers=0)
    batch = next(build_source_train_loader(cfg, 32, None))
    for key, caption, label in zip(batch["keys"], batch["captions"], batch["labels"].tolist()):
        row = rows[int(key.rsplit(":", 1)[1]) - 1]  # key: captions.jsonl:<line>
        assert caption == " ".join(row["text"].split()) and categories[label] == row["category"]
    # the evaluation reader takes the column too (zero-shot over categories from Python)
    data = read_classification_data(f"jsonl:{EMOJI}", label_key="category")
    assert data.classnames == categories and len(data.labels) == len(rows)


# ----------------------------------------------------------------------------- item 10: one notion of model
@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_caption_jsonl(tmp_path_factory.mktemp("pairs"), n=8)


@pytest.fixture(scope="module")
def tiny_run(pairs, tmp_path_factory) -> Path:
    """What `clipforge train ... --run-dir runs/t1` leaves: a run directory, not a checkpoint directory."""
    return train_tiny(tmp_path_factory.mktemp("run"), f"jsonl:{pairs}")


def test_every_verb_that_takes_a_model_takes_a_run_directory(tiny_run, pairs, tmp_path, capsys, monkeypatch):
    pytest.importorskip("pyarrow")
    pytest.importorskip("onnx")
    step_dir = (tiny_run / "checkpoints" / "latest").resolve()

    code, out = run_cli(capsys, "eval", tiny_run, "--task", "retrieval", "--data", f"jsonl:{pairs}", "--workers", 0,
                        "--device", "cpu")
    assert code == 0, out
    # the README's `clipforge embed runs/t1 ...`
    code, out = run_cli(capsys, "embed", tiny_run, "--data", f"jsonl:{pairs}", "--out", tmp_path / "emb",
                        "--workers", 0, "--device", "cpu")
    assert code == 0, out
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["complete"] and Path(manifest["checkpoint"]) == step_dir  # what serve loads by default
    code, out = run_cli(capsys, "embed", tiny_run, "--data", f"jsonl:{pairs}", "--out", tmp_path / "cache",
                        "--teacher-cache", "--device", "cpu")
    assert code == 0, out
    code, out = run_cli(capsys, "export", tiny_run, "--to", "onnx", tmp_path / "onnx")
    assert code == 0, out
    assert (tmp_path / "onnx" / "image_encoder.onnx").is_file() and (tmp_path / "onnx" / "tokenizer.json").is_file()

    served = {}
    monkeypatch.setattr("clipforge.index.server.run_server", lambda index, **kw: served.update(kw))
    code, out = run_cli(capsys, "serve", tmp_path / "idx", "--ckpt", tiny_run)
    assert code == 0, out
    assert Path(served["checkpoint"]).resolve() == step_dir
    clipforge.load(served["checkpoint"])  # a checkpoint the server can load


def test_a_failed_embed_leaves_nothing_that_blocks_the_corrected_command(tiny_run, pairs, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    not_a_model = tmp_path / "not_a_run"
    not_a_model.mkdir()
    out = tmp_path / "emb"
    code, text = run_cli(capsys, "embed", not_a_model, "--data", f"jsonl:{pairs}", "--out", out, "--workers", 0)
    assert code == 2 and "neither a checkpoint" in text
    assert not out.exists()  # the directory it made is gone
    code, text = run_cli(capsys, "embed", tiny_run, "--data", f"jsonl:{pairs}", "--out", out, "--workers", 0,
                         "--device", "cpu")
    assert code == 0, text

    # a run directory that has no checkpoint yet says so
    (tmp_path / "young_run" / "checkpoints").mkdir(parents=True)
    code, text = run_cli(capsys, "embed", tmp_path / "young_run", "--data", f"jsonl:{pairs}", "--out", out / "x")
    assert code == 2 and "is a run directory without a checkpoint yet" in text and not (out / "x").exists()

    # an empty directory made beforehand is kept, and still does not block the corrected command
    mine = tmp_path / "mine"
    mine.mkdir()
    code, text = run_cli(capsys, "embed", not_a_model, "--data", f"jsonl:{pairs}", "--out", mine, "--workers", 0)
    assert code == 2 and mine.is_dir()
    code, text = run_cli(capsys, "embed", tiny_run, "--data", f"jsonl:{pairs}", "--out", mine, "--workers", 0,
                         "--device", "cpu")
    assert code == 0, text
    assert json.loads((mine / "manifest.json").read_text())["complete"]


def test_a_failed_export_leaves_nothing_that_blocks_the_corrected_command(tiny_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx")
    import clipforge.export as export_module

    real = export_module._onnx_export

    def fail_after_the_first_file(module, args, path, *rest):
        real(module, args, path, *rest)
        raise RuntimeError("simulated crash half-way through the export")

    out = tmp_path / "exports" / "onnx"
    monkeypatch.setattr(export_module, "_onnx_export", fail_after_the_first_file)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_module.export(tiny_run, "onnx", out)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no partial output, no staging directory left
    monkeypatch.setattr(export_module, "_onnx_export", real)

    code, text = run_cli(capsys, "export", tmp_path / "nowhere", "--to", "onnx", out)
    assert code == 2 and "checkpoint not found" in text and not out.exists()
    code, text = run_cli(capsys, "export", tiny_run, "--to", "onnx", out)
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["image_encoder.onnx", "onnx_config.json", "text_encoder.onnx",
                                                     "tokenizer.json"]
    # a taken directory is still refused, and left as it was
    code, text = run_cli(capsys, "export", tiny_run, "--to", "onnx", out)
    assert code == 2 and "not empty" in text and len(list(out.iterdir())) == 4
