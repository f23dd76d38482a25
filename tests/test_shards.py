"""Shard writer and inspector, faults in shards (skipped and counted), the trainer on shards, CIFAR-10 end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from clipforge.config import DataConfig, load_recipe
from clipforge.data.pipeline import build_source_train_loader
from clipforge.data.shards import inspect_shards, write_shards
from clipforge.data.sources import DataError

from datafiles import FAULTS, write_faulty_shards, write_folder, write_good_shards, write_jsonl
from tiny_checkpoint import TINY_MODEL_TOML

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR = SHARED_DATA / "cifar10-train.tar.gz"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipforge", *args]


# ----------------------------------------------------------------------------- writer
def test_writer_makes_shards_sizes_and_stats(tmp_path):
    table = write_jsonl(tmp_path / "in", 23)
    (tmp_path / "in" / "images" / "img0004.jpg").write_bytes(b"")  # unreadable inputs are skipped, counted
    (tmp_path / "in" / "images" / "img0009.jpg").unlink()
    stats = write_shards(f"jsonl:{table}", tmp_path / "out", samples_per_shard=5)
    out = tmp_path / "out"
    assert stats["samples"] == 21 and stats["shards"] == 5 and stats["skipped"] == {"empty_image": 1, "missing_image": 1}
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"00000.tar": 5, "00001.tar": 5, "00002.tar": 5, "00003.tar": 5, "00004.tar": 1}
    assert json.loads((out / "stats.json").read_text())["captions"]["histogram"] == {"1-2": 21}
    # img2dataset layout, readable by the webdataset library itself
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
    assert sorted(names[:3]) == ["000000000.jpg", "000000000.json", "000000000.txt"]
    import webdataset as wds

    samples = list(wds.WebDataset(str(out / "{00000..00004}.tar"), shardshuffle=False))
    assert len(samples) == 21 and all(s["txt"].decode().startswith("picture ") for s in samples)
    assert sorted(json.loads(s["json"])["caption"] for s in samples) == sorted(
        f"picture {i}" for i in range(23) if i not in (4, 9))


def test_writer_shuffles_an_image_folder_and_refuses_a_used_directory(tmp_path):
    folder = write_folder(tmp_path / "f", classes=("a", "b"), per_class=10)
    write_shards(f"imagefolder:{folder}", tmp_path / "out", samples_per_shard=10, caption_template="a {} thing")
    import webdataset as wds

    first = [s["txt"].decode() for s in wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False)]
    assert set(first) == {"a a thing", "a b thing"}  # not one class per shard
    with pytest.raises(DataError, match="already holds .tar shards"):
        write_shards(f"imagefolder:{folder}", tmp_path / "out")


def test_inspector_reports_counts_captions_and_a_grid(tmp_path):
    write_shards(f"jsonl:{write_jsonl(tmp_path / 'in', 12)}", tmp_path / "s", samples_per_shard=5)
    report = inspect_shards(tmp_path / "s", tmp_path / "report", grid=6)
    assert (report["shards"], report["samples"], report["readable"], report["skipped"]) == (3, 12, 12, {})
    assert report["captions"]["mean_words"] == 2.0
    from PIL import Image

    with Image.open(report["grid"]) as grid:
        assert grid.size[0] > 200
    assert json.loads(Path(report["report"]).read_text())["samples"] == 12


# ----------------------------------------------------------------------------- faults
@pytest.fixture()
def faulty(tmp_path) -> tuple[Path, dict[str, int]]:
    folder = tmp_path / "faulty"
    return folder, write_faulty_shards(folder)


def test_inspector_finds_every_fault(faulty):
    folder, expected = faulty
    report = inspect_shards(folder)
    assert report["skipped"] == expected
    assert report["readable"] == 100 - sum(expected.values())
    assert {Path(s).name for s in report["bad_shards"]} == {"00000.tar", "00003.tar", "00004.tar"}


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_skips_and_counts_every_fault(faulty, workers):
    folder, expected = faulty
    good = 100 - sum(expected.values())  # 66
    cfg = DataConfig(train=f"wds:{folder}/{{00000..00004}}.tar", batch_size=2, num_workers=workers,
                     max_skip_fraction=0.5, shuffle_buffer=10)
    loader = build_source_train_loader(cfg, 16, None)
    seen = []
    while len(seen) < 2 * good:  # until every stream is well into its second epoch
        seen += next(loader)["indices"].tolist()
    counts = Counter(seen)
    assert len(counts) == good  # the broken samples never reach a batch
    metrics = loader.metrics()
    for reason in FAULTS:
        got = metrics[f"data/skipped/{reason}"]
        assert expected[reason] <= got <= 2 * expected[reason], (reason, got)
    assert 0.2 < metrics["data/skipped_fraction"] < 0.5


def test_run_stops_with_a_clear_message_past_the_skip_threshold(faulty):
    folder, _ = faulty
    cfg = DataConfig(train=f"wds:{folder}/{{00000..00004}}.tar", batch_size=4, num_workers=0, max_skip_fraction=0.1)
    loader = build_source_train_loader(cfg, 16, None)
    with pytest.raises(DataError) as e:
        for _ in range(100):
            next(loader)
    message = str(e.value)
    assert "data.max_skip_fraction=0.1" in message and "missing_shard" in message and "clipforge data inspect" in message


def test_worker_stops_when_a_stream_has_nothing_readable(tmp_path):
    folder = write_good_shards(tmp_path / "s", shards=2, per_shard=10)
    for shard in folder.glob("*.tar"):
        shard.unlink()  # every shard gone: no batch could ever be made
    cfg = DataConfig(train=f"wds:{folder}/{{00000..00001}}.tar", batch_size=4, num_workers=2, max_skip_fraction=0.5)
    with pytest.raises(DataError, match=r"20 of 20|10 of 10"):
        next(build_source_train_loader(cfg, 16, None))


# ----------------------------------------------------------------------------- command line
def test_cli_shard_and_inspect(tmp_path):
    table = write_jsonl(tmp_path / "in", 9)
    out = subprocess.run(cli("data", "shard", f"jsonl:{table}", "--out", str(tmp_path / "s"), "--samples-per-shard", "4"),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "wrote 9 samples in 3 shards" in out.stderr and "{00000..00002}.tar" in out.stderr
    out = subprocess.run(cli("data", "inspect", str(tmp_path / "s"), "--out", str(tmp_path / "r")),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["readable"] == 9 and (tmp_path / "r" / "samples.png").is_file()
    out = subprocess.run(cli("data", "shard", f"csv:{tmp_path / 'missing.csv'}", "--out", str(tmp_path / "x")),
                         capture_output=True, text=True)
    assert out.returncode == 2 and "csv file not found" in out.stderr and "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- trainer on shards
TINY = """
base = "tiny-shapes"
""" + TINY_MODEL_TOML + """[data]
batch_size = 8
num_workers = 2
max_skip_fraction = 0.5
shuffle_buffer = 16
[data.tokenizer]
vocab_size = 300
corpus_size = 200
[schedule]
kind = "constant"
warmup_steps = 0
[train]
threads = 1
checkpoint_every_steps = 4
[eval]
at_end = false
[logging]
tensorboard = false
progress = false
"""


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def test_trainer_resumes_shards_exactly_and_logs_skips(tmp_path, faulty):
    from clipforge.train import checkpoint as ckpt
    from clipforge.train.trainer import Trainer

    folder, _ = faulty
    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(TINY)
    spec = f"data.train=wds:{folder}/{{00000..00004}}.tar"
    full = Trainer(load_recipe(str(recipe_file), [spec, "train.steps=12"]), tmp_path / "full").fit()
    Trainer(load_recipe(str(recipe_file), [spec, "train.steps=6"]), tmp_path / "cut").fit()
    with pytest.warns(UserWarning, match="train.steps"):
        Trainer(load_recipe(str(recipe_file), [spec, "train.steps=12"]), tmp_path / "cut", resume="latest").fit()
    assert full.step == 12
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")  # same batches, same order, same crops
    state = ckpt.load_train_state(tmp_path / "cut" / "checkpoints" / "latest")
    assert state["data_state_per_rank"][0]["kind"] == "sources"
    last = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["data/skipped/missing_shard"] > 0 and "data/skipped_fraction" in last
    config = json.loads((tmp_path / "full" / "checkpoints" / "latest" / "config.json").read_text())
    assert config["preprocess"]["train"]["crop"] == "random-resized" and config["preprocess"]["crop"] == "center"


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_run_on_files_draws_the_same_patch_dropout(tmp_path, workers):
    """Building the loader on resume must not draw from the global torch RNG that the checkpoint restored:
    FLIP's patch dropout (drawn from it on the CPU) then masks the same patches as the uninterrupted run."""
    from tiny_checkpoint import make_caption_jsonl

    from clipforge.train.trainer import Trainer

    table = make_caption_jsonl(tmp_path / "data", n=40)
    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(TINY)
    sets = [f"data.train=jsonl:{table}", f"data.num_workers={workers}", "model.patch_dropout=0.5",
            "train.checkpoint_every_steps=3"]
    Trainer(load_recipe(str(recipe_file), [*sets, "train.steps=6"]), tmp_path / "full").fit()
    Trainer(load_recipe(str(recipe_file), [*sets, "train.steps=3"]), tmp_path / "cut").fit()
    with pytest.warns(UserWarning, match="train.steps"):
        Trainer(load_recipe(str(recipe_file), [*sets, "train.steps=6"]), tmp_path / "cut", resume="latest").fit()
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert len(full) == 6 and cut == full


# ----------------------------------------------------------------------------- CIFAR-10, end to end
def extract_cifar_subset(dest: Path, train_per_class: int, holdout_per_class: int) -> tuple[Path, Path]:
    """Stream the first images of each class out of the tar.gz into train/ and holdout/ image folders."""
    taken: Counter = Counter()
    want = train_per_class + holdout_per_class
    with tarfile.open(CIFAR, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4 or taken[parts[2]] >= want:
                continue
            split = "train" if taken[parts[2]] < train_per_class else "holdout"
            target = dest / split / parts[2] / parts[3]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            taken[parts[2]] += 1
            if len(taken) == 10 and all(v >= want for v in taken.values()):
                break
    return dest / "train", dest / "holdout"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR.is_file(), reason=f"CIFAR-10 not found at {CIFAR} (shared data is not part of the repo)")
def test_cifar10_shard_train_and_zero_shot(tmp_path):
    from clipforge.eval.evaluate import evaluate
    from clipforge.train.trainer import Trainer

    train_dir, holdout_dir = extract_cifar_subset(tmp_path / "cifar", train_per_class=100, holdout_per_class=20)
    out = subprocess.run(cli("data", "shard", f"imagefolder:{train_dir}", "--out", str(tmp_path / "shards"),
                             "--samples-per-shard", "100"), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "shards" / "sizes.json").read_text())["00009.tar"] == 100
    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text(TINY)
    recipe = load_recipe(str(recipe_file), [
        f"data.train=wds:{tmp_path}/shards/{{00000..00009}}.tar", "train.steps=200", "data.batch_size=32",
        "optim.lr=2e-3", "model.vision_layers=2", "data.augment.hflip=true", "train.checkpoint_every_steps=1000",
    ])
    Trainer(recipe, tmp_path / "run").fit()
    losses = _losses(tmp_path / "run")
    assert sum(list(losses.values())[-10:]) < sum(list(losses.values())[:10])
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n")  # the caption template the shards were written with
    result = evaluate(str(tmp_path / "run" / "checkpoints" / "latest"), "zeroshot", f"imagefolder:{holdout_dir}",
                      templates=str(templates), plots=False)
    assert result["data"]["images"] == 200 and result["data"]["classes"] == 10
    assert result["metrics"]["acc1"] > 0.2  # chance is 0.1 on 10 classes


@pytest.mark.parametrize("args, says", [
    (["shard", "foo:bar"], "source 'foo:bar': unknown source kind 'foo:'"),
    (["inspect", "jsonl:pairs.jsonl"], "data inspect reads WebDataset shards (a directory of .tar files or "
                                       "'wds:PATTERN'), not jsonl:pairs.jsonl; run `clipforge data shard jsonl:pairs.jsonl"),
    (["inspect", "imagefolder:photos"], "run `clipforge data shard imagefolder:photos --out DIR`"),
    (["inspect", "foo:bar"], "shards not found: foo:bar"),
    (["inspect", "nonexist_dir/"], "shards not found: nonexist_dir/; pass a directory of .tar shards"),
    (["inspect", "shards", "--grid", "-1"], "--grid is the number of samples shown in samples.png, >= 0"),
])
def test_cli_data_refuses_what_it_cannot_read_and_writes_no_report(tmp_path, capsys, monkeypatch, args, says):
    from tiny_checkpoint import run_cli

    monkeypatch.chdir(tmp_path)
    write_good_shards(tmp_path / "shards", 1, 2)
    code, out, err = run_cli(capsys, "data", *args, "--out", tmp_path / "o")
    err = " ".join(err.split())
    assert code == 2 and "Traceback" not in out + err and says in err, out + err
    assert not (tmp_path / "o").exists()


def test_cli_shard_names_its_caption_key_option(tmp_path, capsys):
    """A table whose caption column has another name: the error names --caption-key (data shard cannot set
    data.caption_key), and --caption-key reads it."""
    from tiny_checkpoint import run_cli

    table = write_jsonl(tmp_path / "in", 3)
    table.write_text(table.read_text().replace('"text"', '"desc"'))
    code, out, err = run_cli(capsys, "data", "shard", f"jsonl:{table}", "--out", tmp_path / "s")
    err = " ".join(err.split())
    assert code == 2 and "found image, desc); name another with --caption-key" in err, out + err
    assert "data.caption_key" not in err and "data.label_key" not in err
    code, out, err = run_cli(capsys, "data", "shard", f"jsonl:{table}", "--out", tmp_path / "s", "--caption-key", "desc")
    assert code == 0 and "wrote 3 samples" in " ".join(err.split()), out + err
