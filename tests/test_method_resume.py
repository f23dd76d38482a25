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

from test_distributed import last_logged_step, read_losses

REPO = Path(__file__).resolve().parents[1]

TINY = """
base = "{base}"
[model]
image_size = 16
patch_size = 4
vision_width = 32
vision_layers = 1
vision_heads = 2
text_width = 32
text_layers = 1
text_heads = 2
embed_dim = 32
context_length = 16
[data]
batch_size = 8
num_workers = 0
[data.tokenizer]
corpus_size = 300
[train]
steps = {steps}
checkpoint_every_steps = 4
threads = 1
dist_timeout_minutes = 0.5
[schedule]
warmup_steps = 3
[eval]
at_end = false
[logging]
tensorboard = false
progress = false
{extra}
"""

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
    recipe.write_text(TINY.format(base=base, steps=steps, extra=extra))
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
