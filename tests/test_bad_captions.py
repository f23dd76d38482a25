"""Captions that are not valid UTF-8 (raw bytes in a JSONL/CSV file, or lone-surrogate JSON escapes)
are skipped and counted like any other bad sample, in training and in `data shard`; they never
crash a run, including rows the tokenizer's corpus did not see."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from datafiles import write_csv, write_images, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def jsonl_with_bad_captions(root: Path) -> Path:
    table = write_jsonl(root, 40)
    extra = write_images(root / "images", 2, start=40)
    with open(table, "ab") as f:
        # a raw invalid byte sequence, and a JSON escape of a lone surrogate; both late in the file,
        # past the rows the tokenizer is trained on
        f.write(b'{"image": "images/' + extra[0].name.encode() + b'", "text": "bad \xff\xfe bytes"}\n')
        f.write(json.dumps({"image": f"images/{extra[1].name}", "text": "lone \ud800 surrogate"}).encode() + b"\n")
    return table


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipforge", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_training_skips_and_counts_non_utf8_captions(tmp_path):
    table = jsonl_with_bad_captions(tmp_path / "data")
    out = run("train", "tiny-shapes", "--run-dir", str(tmp_path / "run"), "--set", f"data.train=jsonl:{table}",
              "--set", "data.batch_size=14", "--set", "data.num_workers=0", "--set", "train.steps=6",
              "--set", "data.tokenizer.corpus_size=100", "--set", "data.max_skip_fraction=0.1",
              "--set", "eval.at_end=false", "--set", "eval.every_steps=none", "--set", "logging.progress=false",
              "--set", "model.vision_width=32", "--set", "model.vision_heads=2", "--set", "model.text_width=32")
    assert out.returncode == 0, out.stderr[-2000:]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["data/skipped/non_utf8_caption"] >= 2  # both bad rows, once per epoch read (84 samples > 1 epoch)


def test_data_shard_skips_non_utf8_captions(tmp_path):
    table = jsonl_with_bad_captions(tmp_path / "data")
    out = run("data", "shard", f"jsonl:{table}", "--out", str(tmp_path / "shards"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    stats = json.loads((tmp_path / "shards" / "stats.json").read_text())
    assert stats["samples"] == 40 and stats["skipped"].get("non_utf8_caption") == 2, stats


def test_a_csv_with_an_undecodable_row_still_reads(tmp_path):
    table = write_csv(tmp_path / "data", 10)
    with open(table, "ab") as f:
        f.write(b"images/img0000.jpg,caf\xe9 in latin-1\n")
    out = run("data", "shard", f"csv:{table}", "--out", str(tmp_path / "shards"))
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads((tmp_path / "shards" / "stats.json").read_text())
    assert stats["samples"] == 10 and stats["skipped"].get("non_utf8_caption") == 1, stats
