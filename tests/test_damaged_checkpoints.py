"""Damaged checkpoints (issue: a new user's crashes): a truncated train_state.pt or model.safetensors
in the newest checkpoint makes ``--resume latest`` fall back to the previous complete one, and a
train_state.pt that holds pickled objects is refused with a clear message (never executed)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from clipforge.train import checkpoint as ckpt
from clipforge.train.trainer import Trainer

from test_train import cli, read_losses, small_recipe


def train_then_damage(tmp_path: Path, damage) -> Path:
    run = tmp_path / "run"
    Trainer(small_recipe(tmp_path, "train.checkpoint_every_steps=4", steps=8), run).fit()
    newest = run / "checkpoints" / ckpt.step_dir_name(8)
    damage(newest)
    return run


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", [ckpt.TRAIN_STATE, ckpt.WEIGHTS])
def test_resume_latest_falls_back_from_a_truncated_checkpoint(tmp_path, name):
    run = train_then_damage(tmp_path, lambda d: truncate(d / name))
    with pytest.warns(UserWarning, match=r"ignoring damaged checkpoint step_0000008 .*falling back to step_0000004"):
        found = ckpt.find_resume_checkpoint(run, "latest")
    assert found.name == ckpt.step_dir_name(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = Trainer(small_recipe(tmp_path, "train.checkpoint_every_steps=4", steps=10), run,
                         resume="latest").fit()
    assert result.step == 10 and sorted(read_losses(run)) == list(range(1, 11))


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_in_train_state_is_refused_with_a_clear_message(tmp_path):
    def plant(d: Path) -> None:
        state = torch.load(d / ckpt.TRAIN_STATE, weights_only=True)
        state["extra"] = Payload()
        torch.save(state, d / ckpt.TRAIN_STATE)

    run = train_then_damage(tmp_path, plant)
    out = subprocess.run(cli("train", str(tmp_path / "tiny.toml"), "--run-dir", str(run), "--resume", "latest"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "not tensors or plain containers" in out.stderr and "Traceback" not in out.stderr
    assert "this must never run" not in out.stdout + out.stderr
