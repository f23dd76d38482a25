"""End-to-end trainer tests: exact resume after SIGKILL, SIGTERM checkpoint, NaN handling, load API."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.config import load_recipe
from clipforge.train import checkpoint as ckpt
from clipforge.train.trainer import Trainer, TrainingError, param_groups

TINY = """
base = "tiny-shapes"
description = "test recipe"
[model]
image_size = 32
patch_size = 8
vision_width = 32
vision_layers = 2
vision_heads = 2
patch_dropout = 0.25
text_width = 32
text_layers = 2
text_heads = 2
embed_dim = 32
context_length = 16
[data]
batch_size = 16
num_workers = 0
[data.tokenizer]
corpus_size = 500
[train]
steps = {steps}
checkpoint_every_steps = 10
threads = 1
[schedule]
warmup_steps = 5
[eval]
at_end = false
[logging]
tensorboard = false
progress = false
"""


def write_recipe(tmp_path: Path, steps: int = 60) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(steps=steps))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipforge", *args]


def read_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, "training ended before it could be interrupted"
        if metrics.exists():
            lines = [l for l in metrics.read_text().splitlines() if l.strip()]
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    recipe = write_recipe(tmp_path)
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(cli("train", str(recipe), "--run-dir", str(full)), check=True, capture_output=True)

    proc = subprocess.Popen(cli("train", str(recipe), "--run-dir", str(cut)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(cut, 15, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(read_losses(cut))
    assert killed_at < 60
    # a save interrupted by the kill leaves a temp dir behind; resume must ignore it
    (cut / "checkpoints" / ".tmp-step_0000099-1").mkdir()
    out = subprocess.run(cli("train", str(recipe), "--run-dir", str(cut), "--resume", "latest"),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "half-written" in out.stderr

    expected, got = read_losses(full), read_losses(cut)
    assert sorted(got) == list(range(1, 61))
    assert got == expected  # bitwise: JSON floats round-trip exactly


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    recipe = write_recipe(tmp_path, steps=100000)
    run = tmp_path / "run"
    proc = subprocess.Popen(cli("train", str(recipe), "--run-dir", str(run)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by signal" in err and "--resume latest" in err
    latest = (run / "checkpoints" / "latest").resolve()
    state = ckpt.load_train_state(latest)
    assert state["step"] >= 3 and latest.name == ckpt.step_dir_name(state["step"])


@pytest.mark.slow
@pytest.mark.parametrize("source", ["shapes", "jsonl"])
def test_sigterm_to_the_process_group_with_loader_workers_still_saves(tmp_path, source):
    """timeout, scancel and job limits signal the whole group: the loader's workers must outlive it
    until the trainer has taken its step and saved (they died first, and the run ended in an error)."""
    import os

    from tiny_checkpoint import make_caption_jsonl

    recipe = write_recipe(tmp_path, steps=100000)
    data = [] if source == "shapes" else ["--set", f"data.train=jsonl:{make_caption_jsonl(tmp_path / 'd', n=48)}"]
    run = tmp_path / "run"
    proc = subprocess.Popen(cli("train", str(recipe), "--run-dir", str(run), "--set", "data.num_workers=2", *data),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_step(run, 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by signal" in err and "Traceback" not in err
    state = ckpt.load_train_state((run / "checkpoints" / "latest").resolve())
    assert state["step"] >= 3


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    recipe = write_recipe(tmp_path)
    out = subprocess.run(cli("train", str(recipe), "--run-dir", str(tmp_path / "empty"), "--resume", "latest"),
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "no complete checkpoint" in out.stderr and "Traceback" not in out.stderr


def small_recipe(tmp_path, *overrides: str, steps: int = 6):
    return load_recipe(str(write_recipe(tmp_path, steps)), list(overrides))


def test_checkpoint_contents_pruning_and_offline_load(tmp_path):
    r = small_recipe(tmp_path, "train.checkpoint_every_steps=2", "train.keep_last=2", steps=7)
    result = Trainer(r, tmp_path / "run").fit()
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(ckpt_dir)] == ["step_0000006", "step_0000007"]
    latest = (ckpt_dir / "latest").resolve()
    assert latest.name == "step_0000007" and result.last_checkpoint == latest
    config = json.loads((latest / "config.json").read_text())
    assert {"model", "preprocess", "tokenizer", "recipe"} <= set(config)
    assert config["recipe"]["optim"]["lr"] == r.optim.lr
    state = torch.load(latest / "train_state.pt", weights_only=True)
    assert state["step"] == 7 and state["samples_seen"] == 7 * 16
    assert (tmp_path / "run" / "recipe.toml").is_file()

    # the run's recipe is not needed to load
    (tmp_path / "run" / "recipe.toml").unlink()
    model, preprocess, tokenizer = clipforge.load(ckpt_dir / "latest")
    from PIL import Image

    image = preprocess(Image.new("RGBA", (50, 40), (255, 0, 0, 128)))
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    ids, mask = tokenizer(["a red circle", "a blue square"])
    with torch.no_grad():
        img_emb = model.encode_image(image[None])
        txt_emb = model.encode_text(ids, mask)
    assert torch.allclose(img_emb.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert txt_emb.shape == (2, 32)
    # loaded weights equal the trained ones
    from safetensors.torch import load_file

    saved = load_file(str(latest / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_refuses_to_overwrite_a_run_with_checkpoints(tmp_path):
    r = small_recipe(tmp_path, steps=2)
    Trainer(r, tmp_path / "run").fit()
    with pytest.raises(TrainingError, match="--resume latest"):
        Trainer(r, tmp_path / "run").fit()


@pytest.mark.parametrize("sync", ["false", "true"])  # skipped on the device / decided on the host
def test_nan_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch, sync):
    from clipforge import objectives

    real_forward = objectives.Objective.forward

    def nan_forward(self, outputs, batch):
        loss, metrics = real_forward(self, outputs, batch)
        return loss * float("nan"), metrics

    monkeypatch.setattr(objectives.Objective, "forward", nan_forward)
    r = small_recipe(tmp_path, "train.max_bad_steps=2", f"train.sync_every_step={sync}", steps=10)
    with pytest.raises(TrainingError, match="NaN/inf") as e:
        Trainer(r, tmp_path / "run").fit()
    assert "max_bad_steps=2" in str(e.value)


@pytest.mark.parametrize("sync", ["false", "true"])
def test_nan_step_leaves_weights_unchanged(tmp_path, monkeypatch, sync):
    from clipforge import objectives

    real_forward = objectives.Objective.forward
    monkeypatch.setattr(objectives.Objective, "forward",
                        lambda self, o, b: (lambda l, m: (l * float("nan"), m))(*real_forward(self, o, b)))
    r = small_recipe(tmp_path, "train.max_bad_steps=5", "train.seed=3", f"train.sync_every_step={sync}", steps=3)
    result = Trainer(r, tmp_path / "run").fit()
    assert result.step == 3
    from clipforge.models.clip import CLIP
    from clipforge.train.trainer import seed_everything

    seed_everything(3)
    fresh = CLIP(r.model)
    trained, _, _ = clipforge.load(result.last_checkpoint)
    for (k, a), b in zip(fresh.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), k
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["bad_steps"] == 3


def test_a_skipped_step_tells_the_step_module_to_discard_what_it_collected(tmp_path, monkeypatch):
    from clipforge.train.step import TrainStep

    _nan_at_steps(monkeypatch, {2})
    calls = []
    real_discard = TrainStep.discard_step
    monkeypatch.setattr(TrainStep, "discard_step", lambda self: (calls.append(1), real_discard(self)))
    r = small_recipe(tmp_path, "train.max_bad_steps=2", "train.sync_every_step=true", steps=3)
    assert Trainer(r, tmp_path / "run").fit().step == 3
    assert len(calls) == 1  # step 2 only


def _nan_at_steps(monkeypatch, bad: set[int]) -> None:
    """The objective returns a NaN loss on the given (1-based) calls."""
    from clipforge import objectives

    real_forward, calls = objectives.Objective.forward, [0]

    def forward(self, outputs, batch):
        loss, metrics = real_forward(self, outputs, batch)
        calls[0] += 1
        return (loss * float("nan") if calls[0] in bad else loss), metrics

    monkeypatch.setattr(objectives.Objective, "forward", forward)


def _run_record(run_dir: Path) -> tuple[list[dict], dict, dict]:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("img_per_s", None)  # wall time
    latest = run_dir / "checkpoints" / "latest"
    state = torch.load(latest / "train_state.pt", weights_only=True)
    weights = clipforge.load(latest)[0].state_dict()
    return lines, state, weights


SIGLIP = ["objective.terms.0.name=siglip", "model.logit_bias_init=-10.0", "model.logit_scale_init=2.302585"]


# SigLIP: its logit_bias metric is a view of a parameter, which the optimiser updates in place
@pytest.mark.parametrize("term,bad_steps", [("clip", set()), ("clip", {2, 5}), ("siglip", {3})])
def test_sync_free_steps_equal_steps_read_every_step(tmp_path, monkeypatch, term, bad_steps):
    """Nothing read on the host between logging steps, bad steps skipped on the device: the same
    metrics, weights, optimizer state (moments and step counts) and bad-step count as reading every step."""
    runs = {}
    for sync in ("false", "true"):
        monkeypatch.undo()
        _nan_at_steps(monkeypatch, bad_steps)
        extra = SIGLIP if term == "siglip" else []
        r = small_recipe(tmp_path, f"train.sync_every_step={sync}", "train.seed=5", *extra, steps=12)
        Trainer(r, tmp_path / sync).fit()
        runs[sync] = _run_record(tmp_path / sync)
    (lines_a, state_a, weights_a), (lines_b, state_b, weights_b) = runs["false"], runs["true"]
    assert [l["step"] for l in lines_a] == list(range(1, 13))  # every step logged, read in stretches of 10
    assert lines_a == lines_b
    assert lines_a[-1]["bad_steps"] == state_a["bad_steps"] == len(bad_steps)
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k
    steps_counted = {float(v["step"]) for v in state_a["optimizer"]["state"].values()}
    assert steps_counted == {12.0 - len(bad_steps)}  # a skipped step does not advance AdamW's bias correction
    for i, st in state_a["optimizer"]["state"].items():
        for key, value in st.items():
            assert torch.equal(value, state_b["optimizer"]["state"][i][key]), (i, key)


def test_sync_free_only_where_a_skipped_step_changes_nothing(tmp_path):
    from clipforge.train import distributed as D
    from clipforge.train.trainer import StepRunner, build_optimizer, build_step

    def runner(*overrides, ctx=D.SINGLE_PROCESS, recipe="tiny-shapes"):
        r = load_recipe(recipe, ["model.vision_layers=1", "model.text_layers=1", *overrides])
        step = build_step(r, torch.device("cpu"), log=False)
        return StepRunner(step, build_optimizer(step, r), r, torch.device("cpu"), ctx)

    assert runner().sync_free
    assert not runner("train.sync_every_step=true").sync_free
    assert runner(ctx=D.DistContext(rank=0, world_size=2)).sync_free  # the ranks agree every few steps
    assert not runner("train.fsdp=true", ctx=D.DistContext(rank=0, world_size=2)).sync_free
    # an EMA teacher moves on every step the hook runs: the host must decide
    assert not runner(recipe="aclip-shapes").sync_free


def test_logit_scale_never_exceeds_100_and_no_decay_groups(tmp_path):
    r = small_recipe(tmp_path, f"model.logit_scale_init={math.log(99.9)}", "optim.lr=0.5",
                     "optim.grad_clip=none", "schedule.warmup_steps=0", steps=3)
    result = Trainer(r, tmp_path / "run").fit()
    model, _, _ = clipforge.load(result.last_checkpoint)
    assert model.logit_scale.exp().item() <= 100.0 + 1e-4

    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    decay = {names[id(p)] for p in groups[0]["params"]}
    assert "logit_scale" in no_decay
    assert all(model.get_parameter(n).ndim >= 2 for n in decay)
    assert any(n.endswith("bias") for n in no_decay) and not any(n.endswith("bias") for n in decay)


def test_accumulation_counts_samples(tmp_path):
    r = small_recipe(tmp_path, "train.accum_steps=2", steps=2)
    Trainer(r, tmp_path / "run").fit()
    state = ckpt.load_train_state(tmp_path / "run" / "checkpoints" / "latest")
    assert state["samples_seen"] == 2 * 2 * 16


def test_bf16_autocast_trains_and_reports_finite_loss(tmp_path):
    r = small_recipe(tmp_path, "train.precision=bf16", steps=2)
    result = Trainer(r, tmp_path / "run").fit()
    assert result.step == 2 and math.isfinite(result.metrics["loss"])


def test_precision_auto_is_fp32_on_cpu():
    from clipforge.train.trainer import resolve_precision

    r = load_recipe("tiny-shapes")
    assert resolve_precision(r, torch.device("cpu")) == torch.float32
