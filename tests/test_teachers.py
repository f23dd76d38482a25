"""Teachers: a frozen checkpoint with its own tokenizer and image size, and a teacher cache written by
`clipforge embed --teacher-cache` and looked up by the training loader's sample keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipforge.config import DataConfig, TeacherConfig
from clipforge.train.teachers import CacheTeacher, CheckpointTeacher, TeacherError

from tiny_checkpoint import make_caption_jsonl, make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_checkpoint_teacher_uses_its_own_tokenizer_and_image_size(tmp_path):
    import clipforge

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    teacher = CheckpointTeacher(TeacherConfig(name="big", kind="checkpoint", path=str(ckpt)), torch.device("cpu"))
    model, _, tokenizer = clipforge.load(ckpt)
    size = model.cfg.image_size
    images = torch.randint(0, 256, (3, 3, 2 * size, 2 * size), dtype=torch.uint8)  # the student's size differs
    captions = ["a red circle", "a blue square", "a photo of a dog"]
    batch = {"images": images, "input_ids": torch.zeros(3, 4, dtype=torch.long), "captions": captions}
    out = teacher(batch, frozenset({"image_embeds", "text_embeds", "logit_scale"}))
    ids, mask = tokenizer(captions)
    assert torch.allclose(out["text_embeds"], model.encode_text(ids, mask), atol=1e-6)
    resized = F.interpolate(images.float() / 255, size=(size, size), mode="bicubic", antialias=True,
                            align_corners=False).clamp(0, 1)
    want = model.encode_image((resized - model.image_mean) / model.image_std)
    assert torch.allclose(out["image_embeds"], want, atol=1e-5)
    assert not any(True for _ in teacher.parameters())  # never in the optimiser, never saved
    with pytest.raises(TeacherError, match="re-tokenizes the raw captions"):
        teacher({"images": images}, frozenset({"text_embeds"}))


def test_checkpoint_teacher_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(TeacherError, match="does not exist"):
        CheckpointTeacher(TeacherConfig(name="big", kind="checkpoint", path=str(tmp_path / "nope")),
                          torch.device("cpu"))


def test_teacher_cache_written_by_embed_is_found_by_the_loaders_keys(tmp_path):
    from clipforge.data.loader import build_train_loader
    from clipforge.models.tokenizer import load_tokenizer
    from clipforge.train import checkpoint as ckpt_io

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    table = make_caption_jsonl(tmp_path / "data", n=10, broken=1)
    cache = tmp_path / "cache"
    out = subprocess.run([sys.executable, "-m", "clipforge", "embed", str(ckpt), "--data", f"jsonl:{table}",
                          "--out", str(cache), "--teacher-cache", "--batch-size", "4", "--device", "cpu"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "9 samples (1 unreadable skipped)" in " ".join((out.stdout + out.stderr).split())
    teacher = CacheTeacher(TeacherConfig(name="cache", kind="cache", path=str(cache)))
    tokenizer = load_tokenizer(ckpt_io.read_config(ckpt)["tokenizer"], ckpt)
    data = DataConfig(train=f"jsonl:{table}", batch_size=4, num_workers=0)
    batch = next(build_train_loader(data, 16, tokenizer))
    got = teacher(batch, frozenset({"image_embeds", "text_embeds", "logit_scale"}))
    rows = [teacher.row_of[k] for k in batch["keys"]]
    assert torch.equal(got["image_embeds"], torch.from_numpy(np.load(cache / "image_embeds.npy")[rows]))
    assert got["text_embeds"].shape == (4, 16) and torch.allclose(got["text_embeds"].norm(dim=1), torch.ones(4))
    # the cached text embedding is the model's embedding of the sample's first caption
    import clipforge

    model, _, tok = clipforge.load(ckpt)
    lines = table.read_text().splitlines()
    first = [json.loads(lines[int(k.rsplit(":", 1)[1]) - 1])["caption"][0] for k in batch["keys"]]
    ids, mask = tok(first)
    assert torch.allclose(got["text_embeds"], model.encode_text(ids, mask), atol=1e-3)  # stored as float32
    with pytest.raises(TeacherError, match="no entry for 1 sample"):
        teacher({**batch, "keys": ["nope"] + batch["keys"][1:]}, frozenset({"image_embeds"}))


def test_a_cache_directory_without_keys_is_refused(tmp_path):
    with pytest.raises(TeacherError, match="--teacher-cache"):
        CacheTeacher(TeacherConfig(name="cache", kind="cache", path=str(tmp_path)))


def _teacher_run(run: Path, step: int, seed: int) -> Path:
    """A teacher run's checkpoint at ``step`` (random tiny weights from ``seed``); ``latest`` moves to it."""
    from clipforge.config import DataConfig, ModelConfig, Recipe, TokenizerConfig
    from clipforge.models.clip import CLIP
    from clipforge.models.tokenizer import BPETokenizer
    from clipforge.train.checkpoint import save_checkpoint
    from tiny_checkpoint import CAPTIONS, TINY_MODEL

    torch.manual_seed(seed)
    recipe = Recipe(name="teacher", model=ModelConfig(**TINY_MODEL), data=DataConfig(tokenizer=TokenizerConfig(vocab_size=200)))
    tokenizer = BPETokenizer.train(CAPTIONS * 4, 200, recipe.model.context_length)
    return save_checkpoint(run / "checkpoints", step, CLIP(recipe.model), recipe, tokenizer, train_state=None,
                           keep_last=3)


def test_a_resumed_student_keeps_the_teacher_checkpoint_it_started_from(tmp_path):
    """A teacher named by its run directory moves on while that run trains: the student pins the step
    directory it started from, and a resume after the teacher's ``latest`` moved distils from the same
    weights (losses equal the uninterrupted run's). A pinned checkpoint that is gone is said plainly."""
    import json

    from clipforge.config import load_recipe
    from clipforge.train.trainer import Trainer
    from tiny_checkpoint import TINY_MODEL_TOML, TINY_RUN_TOML

    first = _teacher_run(tmp_path / "big", 1, seed=0)
    recipe_file = tmp_path / "student.toml"
    recipe_file.write_text('base = "tiny-shapes"\n' + TINY_MODEL_TOML + TINY_RUN_TOML + f"""
[[teachers]]
name = "big"
kind = "checkpoint"
path = "{tmp_path / 'big'}"
""")
    sets = ['objective.terms=[{name="affinity_distill", teacher="big"}]', "train.checkpoint_every_steps=2"]

    def losses(run: Path) -> dict[int, float]:
        rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    Trainer(load_recipe(str(recipe_file), sets), tmp_path / "full").fit()
    Trainer(load_recipe(str(recipe_file), [*sets, "train.steps=2"]), tmp_path / "cut").fit()
    assert str(first.resolve()) in (tmp_path / "cut" / "recipe.toml").read_text()  # pinned, not the run dir
    _teacher_run(tmp_path / "big", 2, seed=1)  # the teacher run moves on
    with pytest.warns(UserWarning, match="this run keeps .*step_0000001, the checkpoint it started from"):
        Trainer(load_recipe(str(recipe_file), sets), tmp_path / "cut", resume="latest").fit()
    assert losses(tmp_path / "cut") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 4

    # the pinned checkpoint pruned away: the resume goes on with the newer one and says so
    Trainer(load_recipe(str(recipe_file), [*sets, "train.steps=2"]), tmp_path / "gone").fit()
    import shutil

    shutil.rmtree(tmp_path / "big" / "checkpoints" / "step_0000002")
    _teacher_run(tmp_path / "big", 3, seed=2)
    with pytest.warns(UserWarning, match="step_0000002, the checkpoint this run started from, is gone"):
        Trainer(load_recipe(str(recipe_file), sets), tmp_path / "gone", resume="latest").fit()
