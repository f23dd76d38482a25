"""Exact resume covers the method layer: a SIGKILL during an A-CLIP run (EMA teacher, heads, views'
RNG) and during a 2-process FILIP run, then ``--resume latest``, gives per-step losses bitwise equal
to the uninterrupted run (CPU, fp32, one thread)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_distributed import E2E_RECIPE, last_logged_step, read_losses

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(base: str, steps: int, extra: str) -> str:
    """The 2-process end-to-end recipe of test_distributed on another base (16 px, patch 4: a 4 x 4 grid)."""
    return (E2E_RECIPE.replace('base = "tiny-shapes"', f'base = "{base}"').replace("patch_size = 8", "patch_size = 4")
            .format(steps=steps) + extra)


ACLIP_EXTRA = """
[method]
simclr_hidden = 32
simclr_out = 16
byol_hidden = 32
byol_out = 16
"""


def train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipforge", "train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def kill_at_step(args: list[str], run_dir: Path, step: int, timeout: float = 180) -> None:
    """Start training in its own process group and SIGKILL the whole group once ``step`` is logged."""
    proc = subprocess.Popen([sys.executable, "-m", "clipforge", "train", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + timeout
    while last_logged_step(run_dir) < step:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.communicate()[1][-3000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise TimeoutError(f"step {step} not reached")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def check_kill_and_resume(tmp_path: Path, base: str, extra: str, steps: int, kill_step: int, *launch: str) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(tiny_recipe(base, steps, extra))
    full, cut = tmp_path / "full", tmp_path / "cut"
    out = train([str(recipe), "--run-dir", str(full), *launch])
    assert out.returncode == 0, out.stderr[-3000:]
    kill_at_step([str(recipe), "--run-dir", str(cut), *launch], cut, kill_step)
    assert last_logged_step(cut) < steps
    out = train([str(recipe), "--run-dir", str(cut), "--resume", "latest", *launch])
    assert out.returncode == 0, out.stderr[-3000:]
    expected, got = read_losses(full), read_losses(cut)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == expected  # bitwise: JSON floats round-trip exactly


@pytest.mark.slow
def test_aclip_sigkill_then_resume_is_exact(tmp_path):
    check_kill_and_resume(tmp_path, "aclip-shapes", ACLIP_EXTRA, 20, 10)


@pytest.mark.slow
def test_filip_two_processes_sigkill_then_resume_is_exact(tmp_path):
    check_kill_and_resume(tmp_path, "filip-shapes", "", 14, 7, "--nproc", "2")
