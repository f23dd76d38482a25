"""A tiny, randomly initialised checkpoint directory for export / embed / serve tests (no training)."""

from __future__ import annotations

from pathlib import Path

import torch

from clipforge.config import DataConfig, ModelConfig, Recipe, TokenizerConfig
from clipforge.models.clip import CLIP
from clipforge.models.tokenizer import BPETokenizer
from clipforge.train.checkpoint import save_checkpoint

TINY_MODEL = dict(
    image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
    vocab_size=256, context_length=16, text_width=32, text_layers=2, text_heads=2, embed_dim=16,
)
# the [model] section of the tiny recipes that tests train from TOML (base = "tiny-shapes")
TINY_MODEL_TOML = """[model]
image_size = 32
patch_size = 8
vision_width = 32
vision_layers = 1
vision_heads = 2
text_width = 32
text_layers = 1
text_heads = 2
embed_dim = 32
context_length = 16
"""
# the rest of a tiny test recipe: 4 steps of batch 8 in-process, constant lr, no evaluation, quiet logs
TINY_RUN_TOML = """[data]
batch_size = 8
num_workers = 0
[data.tokenizer]
vocab_size = 300
corpus_size = 200
[schedule]
kind = "constant"
warmup_steps = 0
[train]
threads = 1
steps = 4
[eval]
at_end = false
every_steps = "none"
[logging]
tensorboard = false
progress = false
every_steps = 1
"""
CAPTIONS = [
    "a red circle", "a blue square", "a green triangle on the left", "two yellow stars",
    "a small purple heart", "an orange ring next to a black cross", "a photo of a dog", "a cat, sleeping!",
]


@torch.no_grad()
def perturb_biases_(model: torch.nn.Module) -> torch.nn.Module:
    """Make the biases and LayerNorms non-trivial (in place), so a mapping or folding mistake shows."""
    for name, p in model.named_parameters():
        if name.endswith("bias") or "ln" in name:
            p.add_(0.1 * torch.randn_like(p))
    return model


def make_tiny_checkpoint(directory: Path, seed: int = 0, **model_overrides) -> Path:
    """Save a random tiny CLIP + a BPE tokenizer trained on a few captions; returns the step dir."""
    torch.manual_seed(seed)
    recipe = Recipe(
        name="tiny-test",
        model=ModelConfig(**{**TINY_MODEL, **model_overrides}),
        data=DataConfig(tokenizer=TokenizerConfig(vocab_size=200)),
    )
    model = perturb_biases_(CLIP(recipe.model))
    tokenizer = BPETokenizer.train(CAPTIONS * 4, 200, recipe.model.context_length)
    return save_checkpoint(Path(directory), 1, model, recipe, tokenizer, train_state=None, keep_last=1)


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40),
           "purple": (140, 40, 170), "black": (10, 10, 10), "white": (245, 245, 245), "orange": (240, 140, 20)}


def make_caption_jsonl(directory: Path, n: int = 24, broken: int = 0) -> Path:
    """n small PNGs (a coloured square on a tinted background) and a pairs.jsonl with 1-2 captions each;
    the last ``broken`` image files are not images at all."""
    import json

    import numpy as np
    from PIL import Image

    directory = Path(directory)
    (directory / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    lines = []
    for i in range(n):
        colour = names[i % len(names)]
        pixels = np.full((40, 48, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        pixels[8:32, 10:34] = COLOURS[colour]
        path = directory / "img" / f"{i:03d}.png"
        if i >= n - broken:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(pixels).save(path)
        captions = [f"a {colour} square"] + ([f"image {i}, {colour}"] if i % 3 == 0 else [])
        lines.append(json.dumps({"image": f"img/{path.name}", "caption": captions}))
    table = directory / "pairs.jsonl"
    table.write_text("\n".join(lines) + "\n")
    return table


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``clipforge.cli.main`` in-process, as on the command line (user errors print and exit 2):
    (exit code, stdout, stderr). Restores argv, the warning printer and torch's thread count."""
    import sys
    import warnings

    from clipforge import cli

    old_argv, old_show, old_threads = sys.argv, warnings.showwarning, torch.get_num_threads()
    sys.argv = ["clipforge", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv, warnings.showwarning = old_argv, old_show
        torch.set_num_threads(old_threads)
    out = capsys.readouterr()
    return code, out.out, out.err


def last_logged_row(run: Path) -> dict:
    """The last training row (one with a loss) of a run's metrics.jsonl."""
    import json

    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return rows[-1]


def train_straight_and_resumed(capsys, recipe: Path, tmp_path: Path, steps: int = 4) -> tuple[dict, dict]:
    """Train ``recipe`` for ``steps`` in one go, and for half of them then resumed (``--resume latest``) to
    ``steps``: the last logged rows of both runs (run dirs ``full`` and ``half`` under ``tmp_path``)."""
    code, _, err = run_cli(capsys, "train", recipe, "--run-dir", tmp_path / "full", "--set", f"train.steps={steps}")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", recipe, "--run-dir", tmp_path / "half", "--set", f"train.steps={steps // 2}")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--run-dir", tmp_path / "half", "--resume", "latest", "--set",
                           f"train.steps={steps}")
    assert code == 0, err
    return last_logged_row(tmp_path / "full"), last_logged_row(tmp_path / "half")


def refused_before_embedding(capsys, tmp_path: Path, verb: str, args: list[str], says: str) -> None:
    """``clipforge data <verb> ARGS`` with a --model that names no checkpoint: an argument error (exit 2,
    ``says`` in the message, no traceback, no output) shows that nothing was loaded or embedded first."""
    code, stdout, stderr = run_cli(capsys, "data", verb, *args, "--model", tmp_path / "none",
                                   "--out", tmp_path / "k.parquet")
    err = " ".join(stderr.split())
    assert code == 2 and "Traceback" not in stdout + stderr and says in err, stdout + stderr
    assert not (tmp_path / "k.parquet").exists()
