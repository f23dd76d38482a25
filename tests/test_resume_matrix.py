"""Exact resume across the recipes whose state no kill test covered: a run stopped at step 2 and
resumed to step 4 logs the same losses, bit for bit, as the run that never stopped (CPU, fp32, one
thread, in-process). What each case carries beyond the model's weights:

- SigLIP: the learned bias next to the temperature;
- GradCache: the random draws of each micro-batch replayed in its second pass (FLIP patch dropout);
- BarLIP / SiamLIP / SwALIP: their heads, BatchNorm statistics and prototypes; views and EDA captions;
- a weighted mixture of two sources on disk, resampled, with patch dropout (per-source cursors, the
  global RNG that building the loader must not touch);
- ProtoCLIP with an external (checkpoint) teacher: the prototypes built from its features.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipforge.config import load_recipe
from clipforge.train.trainer import Trainer

from test_slip import TINY
from tiny_checkpoint import make_caption_jsonl, make_tiny_checkpoint

QUIET = ["train.threads=1", "train.checkpoint_every_steps=2", "schedule.kind=constant", "schedule.warmup_steps=0",
         "eval.at_end=false", "eval.every_steps=none", "logging.tensorboard=false", "logging.progress=false",
         "logging.every_steps=1", "data.batch_size=8", "data.num_workers=0", "model.vocab_size=128"]
ROCKET = ["method.projector_hidden=32", "data.eda.synonyms=none"]

CASES = {
    "siglip": ("tiny-shapes-siglip", []),
    "gradcache-patch-dropout": ("tiny-shapes", ["train.accum_steps=2", "train.accum_mode=gradcache",
                                                "model.patch_dropout=0.5"]),
    "barlip": ("barlip-cifar", [*ROCKET, "method.head_hidden=24", "method.head_out=12"]),
    "siamlip": ("siamlip-cifar", [*ROCKET, "method.head_hidden=24", "method.head_out=12"]),
    "swalip": ("swalip-cifar", ROCKET),
}


def losses(run: Path) -> dict[int, float]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def stop_and_resume(tmp_path: Path, name: str, sets: list[str]) -> None:
    Trainer(load_recipe(name, [*sets, "train.steps=4"]), tmp_path / "full").fit()
    Trainer(load_recipe(name, [*sets, "train.steps=2"]), tmp_path / "cut").fit()
    with pytest.warns(UserWarning, match="train.steps"):
        Trainer(load_recipe(name, [*sets, "train.steps=4"]), tmp_path / "cut", resume="latest").fit()
    full = losses(tmp_path / "full")
    assert len(full) == 4 and losses(tmp_path / "cut") == full


@pytest.mark.parametrize("case", sorted(CASES))
def test_stop_and_resume_is_exact(tmp_path, case):
    recipe, extra = CASES[case]
    stop_and_resume(tmp_path, recipe, [*TINY, *QUIET, *extra])


def test_a_weighted_mixture_on_disk_resumes_exactly(tmp_path):
    a = make_caption_jsonl(tmp_path / "a", n=24)
    b = make_caption_jsonl(tmp_path / "b", n=16)
    mixture = f"0.7*jsonl:{a} + 0.3*jsonl:{b}"
    stop_and_resume(tmp_path, "tiny-shapes", [*TINY, *QUIET, f"data.train={mixture}", "data.mode=resampled",
                                              "model.patch_dropout=0.5"])


def test_protoclip_with_an_external_teacher_resumes_exactly(tmp_path):
    teacher = make_tiny_checkpoint(tmp_path / "teacher", image_size=16)
    sets = [*TINY, *QUIET, "method.episode_steps=3", "method.clusters=4", "method.head_hidden=32",
            "method.head_out=16", "method.warmup_episodes=0", "method.external_pca=8", "method.external_teacher=ext",
            f'teachers=[{{name="ext", kind="checkpoint", path="{teacher}"}}]']  # the resume lands mid-episode
    stop_and_resume(tmp_path, "protoclip-shapes", sets)
