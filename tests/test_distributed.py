"""Distributed training: 2 gloo processes on a split batch == 1 process on the whole batch.

- losses (clip all-gather, siglip ring) and every parameter gradient under DDP, plain and GradCache
  accumulation, and FSDP2, against one process on the concatenated batch (fp32, 1e-6 relative);
- GradCache in one process: k micro-batches of b == one batch of k*b;
- rank sharding of the data stream, launch environments (torchrun, SLURM), sharded evaluation;
- end to end: `clipforge train --nproc 2`, SIGTERM to one rank (coordinated checkpoint), SIGKILL to
  one rank (the other exits with a clear message), resume; the SLURM sbatch example with a fake srun.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import clipforge
from clipforge.config import ModelConfig, load_recipe
from clipforge.models.clip import CLIP
from clipforge.objectives import build_objective
from clipforge.objectives.contrastive import clip_loss
from clipforge.objectives.sigmoid import siglip_loss
from clipforge.train import distributed as D
from clipforge.train.gradcache import gradcache_accumulation, plain_accumulation

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
TOL = 1e-6  # relative, fp32


# ----------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, results, world: int = WORLD) -> None:
    """Run ``worker(rank, port, results)`` in WORLD processes. Rank 0 writes ``results`` after the last
    collective; a rank that dies after that, in gloo's teardown ("terminate called without an active
    exception" when its peer has already exited), has finished its part, so the run counts. A crash before
    the results exist is retried once on a fresh port and then raised."""
    for attempt in range(2):
        try:
            torch.multiprocessing.spawn(worker, args=(free_port(), str(results)), nprocs=world, join=True)
            return
        except torch.multiprocessing.ProcessExitedException:
            if Path(results).exists():
                return
            if attempt:
                raise


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def tiny_model_config(siglip: bool) -> ModelConfig:
    extra = {"logit_scale_init": 2.302585, "logit_bias_init": -10.0} if siglip else {}
    return ModelConfig(image_size=16, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2,
                       vocab_size=64, context_length=8, text_width=16, text_layers=1, text_heads=2,
                       embed_dim=16, **extra)


def random_batch(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n,), generator=g)
    return {
        "images": torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g),
        "input_ids": torch.randint(1, 64, (n, 8), generator=g),
        "attention_mask": (torch.arange(8)[None, :] < lengths[:, None]).long(),
    }


def rows(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


def objective_for(term: str):
    from clipforge.config import ObjectiveConfig

    return build_objective(ObjectiveConfig.model_validate({"terms": [{"name": term}]}))


def forward_fn(model):
    return lambda b: model(b["images"], b["input_ids"], b["attention_mask"])


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def single_process_grads(term: str, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one process on the whole batch (the reference)."""
    torch.manual_seed(0)
    model = CLIP(tiny_model_config(term == "siglip"))
    loss, _ = objective_for(term)(forward_fn(model)(batch), batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- 2 gloo ranks vs 1 process
# One spawn runs every 2-rank check (starting processes costs seconds); the references are
# computed here, in the parent, where no process group exists.
CASES = [  # (term, wrapper, accum_mode, micro-batches per rank)
    ("clip", "ddp", "plain", 1),
    ("siglip", "ddp", "plain", 1),
    ("clip", "ddp", "gradcache", 2),
    ("siglip", "ddp", "gradcache", 2),
    ("clip", "fsdp", "plain", 1),
    # train.grad_checkpointing under both wrappers (blocks recomputed in backward, the same gradients)
    ("clip", "ddp+checkpointing", "gradcache", 2),
    ("clip", "fsdp+checkpointing", "plain", 1),
]
PER_RANK_BATCH = 4


def unit_embeddings(seed: int, n: int = 12, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    normalize = torch.nn.functional.normalize
    return normalize(torch.randn(n, dim, generator=g), dim=-1), normalize(torch.randn(n, dim, generator=g), dim=-1)


def loss_function_reference(name: str) -> dict:
    images, texts = unit_embeddings(1)
    x, y = images.clone().requires_grad_(), texts.clone().requires_grad_()
    scale = torch.tensor(7.0 if name == "clip" else 10.0, requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True)
    loss = clip_loss(x, y, scale) if name == "clip" else siglip_loss(x, y, scale, bias)
    loss.backward()
    return {"loss": loss.item(), "x": x.grad, "y": y.grad, "scale": scale.grad,
            "bias": bias.grad if bias.grad is not None else torch.zeros(())}


def _loss_function_checks(rank: int, world: int = WORLD) -> dict:
    from clipforge.objectives.distributed import distributed_clip_loss, ring_siglip_loss

    images, texts = unit_embeddings(1)
    b = images.shape[0] // world
    out = {}
    for name in ("clip", "siglip"):
        scale = torch.tensor(7.0 if name == "clip" else 10.0, requires_grad=True)
        bias = torch.tensor(-3.0, requires_grad=True)
        x = images[rank * b:(rank + 1) * b].clone().requires_grad_()
        y = texts[rank * b:(rank + 1) * b].clone().requires_grad_()
        if name == "clip":
            loss, _ = distributed_clip_loss(x, y, scale)
        else:
            loss, _ = ring_siglip_loss(x, y, scale, bias)
        loss.backward()
        # DDP's convention: average losses and gradients over ranks. Embedding gradients already
        # hold the sum over every rank that used them, so their mean is that sum / W.
        grads = {"x": x.grad / world, "y": y.grad / world}
        for key in ("x", "y"):  # every rank's rows (rank 0 reports them all)
            parts = [torch.zeros_like(grads[key]) for _ in range(world)]
            dist.all_gather(parts, grads[key].contiguous())
            grads[f"{key}_all_ranks"] = torch.cat(parts)
        for key, g in (("scale", scale.grad), ("bias", bias.grad if bias.grad is not None else torch.zeros(()))):
            g = g.clone()
            dist.all_reduce(g)
            grads[key] = g / world
        out[name] = {"loss": D.sum_over_ranks([loss.item()], D.current_context(), torch.device("cpu"))[0] / world,
                     **grads}
    return out


def _three_rank_worker(rank: int, port: int, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
                            timeout=datetime.timedelta(seconds=60))
    report = _loss_function_checks(rank, world=3)
    if rank == 0:
        torch.save(report, results)
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_three_ranks_give_every_rows_gradient_of_the_global_batch(tmp_path, name):
    """With 3 ranks the ring's two directions differ (with 2, passing left is passing right): every rank's
    embedding gradients, the scale and bias gradients and the loss equal the one-process global batch."""
    results = tmp_path / "three.pt"
    spawn_ranks(_three_rank_worker, results, world=3)
    got = torch.load(results, weights_only=True)[name]
    want = loss_function_reference(name)
    assert abs(got["loss"] - want["loss"]) <= TOL * abs(want["loss"])
    for key in ("x", "y"):
        assert relative_error(got[f"{key}_all_ranks"], want[key]) <= TOL, key
    for key in ("scale", "bias") if name == "siglip" else ("scale",):
        assert relative_error(got[key], want[key]) <= TOL, key


def _model_checks(rank: int) -> dict:
    ctx, b = D.current_context(), PER_RANK_BATCH
    out = {}
    for term, wrapper, mode, k in CASES:
        global_batch = random_batch(WORLD * k * b, seed=5)
        torch.manual_seed(0)
        fsdp = wrapper.startswith("fsdp")
        core = CLIP(tiny_model_config(term == "siglip"))
        core.set_grad_checkpointing(wrapper.endswith("+checkpointing"))
        model = D.wrap_model(core, ctx, torch.device("cpu"), fsdp)
        objective = objective_for(term)
        # the loader's layout: rank r's j-th micro-batch = global rows j*b*W + r*b ... + b
        micro = [rows(global_batch, j * b * WORLD + rank * b, j * b * WORLD + (rank + 1) * b) for j in range(k)]
        if mode == "gradcache":
            loss, _ = gradcache_accumulation(model, objective, micro, forward_fn(model), no_autocast, torch.device("cpu"))
        else:
            loss, _ = plain_accumulation(model, objective, micro, forward_fn(model), no_autocast)
        D.average_replicated_grads(model, ctx, fsdp)
        grads = {}
        for name, p in D.unwrap(model).named_parameters():
            grads[name] = (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
        out[f"{term}/{wrapper}/{mode}"] = {
            "loss": D.sum_over_ranks([loss], ctx, torch.device("cpu"))[0] / WORLD, "grads": grads}
    return out


def eval_recipe():
    return load_recipe("tiny-shapes", ["data.tokenizer.corpus_size=300", "eval.batch_size=100", "eval.late_interaction=true",
                                       "model.vision_layers=1", "model.vision_width=32",
                                       "model.vision_heads=2", "model.text_width=32"])


def _eval_checks(rank: int) -> dict:
    from clipforge.models.tokenizer import train_tokenizer_for

    recipe = eval_recipe()
    tokenizer = train_tokenizer_for(recipe.data, recipe.model.context_length)
    torch.manual_seed(0)
    model = CLIP(recipe.model).eval()
    return D.sharded_shapes_eval(recipe)(model, tokenizer, 0)


def _two_rank_worker(rank: int, port: int, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    report = {"losses": _loss_function_checks(rank), "models": _model_checks(rank), "eval": _eval_checks(rank)}
    if rank == 0:
        torch.save(report, results)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_report(tmp_path_factory) -> dict:
    results = tmp_path_factory.mktemp("two_ranks") / "report.pt"
    spawn_ranks(_two_rank_worker, results)
    return torch.load(results, weights_only=True)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_gathered_clip_and_ring_siglip_equal_the_global_batch_loss(two_rank_report, name):
    want = loss_function_reference(name)
    got = two_rank_report["losses"][name]
    assert abs(got["loss"] - want["loss"]) <= TOL * abs(want["loss"]), (got["loss"], want["loss"])
    b = want["x"].shape[0] // WORLD
    # rank 0 reported: its rows of the embedding gradients, and the rank-averaged scale/bias gradients
    for key in ("x", "y"):
        assert relative_error(got[key], want[key][:b]) <= TOL, key
    for key in ("scale", "bias") if name == "siglip" else ("scale",):
        assert relative_error(got[key], want[key]) <= TOL, key


@pytest.mark.parametrize("case", CASES, ids=lambda c: "/".join(map(str, c[:3])))
def test_two_ranks_give_the_gradients_of_the_concatenated_batch(two_rank_report, case):
    term, wrapper, mode, k = case
    want_loss, want = single_process_grads(term, random_batch(WORLD * k * PER_RANK_BATCH, seed=5))
    got = two_rank_report["models"][f"{term}/{wrapper}/{mode}"]
    assert abs(got["loss"] - want_loss) <= TOL * abs(want_loss), (got["loss"], want_loss)
    assert set(got["grads"]) == set(want) and len(want) > 10  # every parameter is compared
    errors = {name: relative_error(got["grads"][name], want[name]) for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, (worst, errors[worst])


def test_sharded_evaluation_equals_single_process(two_rank_report):
    from clipforge.eval.hooks import evaluate_shapes
    from clipforge.models.tokenizer import train_tokenizer_for

    recipe = eval_recipe()
    tokenizer = train_tokenizer_for(recipe.data, recipe.model.context_length)
    torch.manual_seed(0)
    model = CLIP(recipe.model).eval()
    single = evaluate_shapes(model, tokenizer, recipe)
    assert len(single) >= 10 and {"zeroshot-li/seen/acc1", "zeroshot-li/unseen/acc5"} <= set(single)
    assert two_rank_report["eval"] == single  # the same batches embed bitwise alike on either rank


# ----------------------------------------------------------------------------- rank 0's logs fail to start
def _failing_logs_worker(rank: int, port: int, results: str) -> None:
    """A 2-rank run launched without torchrun (nothing tears the group down when rank 0 fails, as
    under srun) in which rank 0's logs cannot start (a tracker that cannot log in)."""
    from clipforge.train import trainer as T

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank == 0:
        class FailingLog:
            def __init__(self, *args, **kwargs):
                raise RuntimeError("wandb: could not log in (no API key)")

        T.MetricsLog = FailingLog
    recipe = load_recipe("tiny-shapes", ["data.tokenizer.corpus_size=300", "model.vision_layers=1",
                                         "model.vision_width=32", "model.vision_heads=2", "model.text_width=32",
                                         "data.batch_size=8", "data.num_workers=0", "train.steps=2",
                                         "eval.at_end=false", "train.dist_timeout_minutes=1"])
    try:
        T.Trainer(recipe, Path(results).parent / "run").fit()
        outcome = "finished"
    except Exception as e:  # noqa: BLE001 - the test reads what each rank saw
        outcome = f"{type(e).__name__}: {e}"
    Path(results).with_name(f"rank{rank}.txt").write_text(outcome)
    if rank == 0:
        Path(results).write_text("done")


def test_when_rank_0_cannot_start_its_logs_every_rank_stops_with_a_message(tmp_path):
    spawn_ranks(_failing_logs_worker, tmp_path / "results.txt")
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD))
    assert rank0 == "RuntimeError: wandb: could not log in (no API key)"
    # not "lost contact with the other ranks" a dist_timeout_minutes later, nor a hang
    assert rank1.startswith("TrainingError: rank 1: rank 0 could not start its logs"), rank1
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


# ----------------------------------------------------------------------------- GradCache in one process
@pytest.mark.parametrize("term", ["clip", "siglip"])
def test_gradcache_micro_batches_equal_one_big_batch(term):
    batch = random_batch(12, seed=3)
    want_loss, want = single_process_grads(term, batch)
    torch.manual_seed(0)
    model = CLIP(tiny_model_config(term == "siglip"))
    micro = [rows(batch, i, i + 4) for i in range(0, 12, 4)]
    loss, _ = gradcache_accumulation(model, objective_for(term), micro, forward_fn(model), no_autocast,
                                     torch.device("cpu"))
    assert abs(loss - want_loss) <= TOL * abs(want_loss)
    for name, p in model.named_parameters():
        assert relative_error(p.grad, want[name]) <= TOL, name

    # plain accumulation is a different (smaller-batch) objective: the comparisons above can fail
    model.zero_grad()
    plain_accumulation(model, objective_for(term), micro, forward_fn(model), no_autocast)
    assert max(relative_error(p.grad, want[name]) for name, p in model.named_parameters()) > 1e-3


def test_gradcache_replays_the_same_patch_dropout():
    """With random patch dropout, the replay must see the patches the cached embeddings saw."""
    cfg = tiny_model_config(False).model_copy(update={"patch_dropout": 0.5, "image_size": 32})
    batch = random_batch(8, seed=4)
    batch["images"] = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    micro = [rows(batch, 0, 4), rows(batch, 4, 8)]
    objective = objective_for("clip")

    torch.manual_seed(0)
    model = CLIP(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(11)
    outs = [forward_fn(model)(m) for m in micro]  # the draws GradCache's first pass makes, with autograd
    after = torch.get_rng_state()
    merged = {"image_embeds": torch.cat([o["image_embeds"] for o in outs]),
              "text_embeds": torch.cat([o["text_embeds"] for o in outs]), "logit_scale": outs[0]["logit_scale"]}
    objective(merged, batch)[0].backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.load_state_dict(state)
    model.zero_grad()
    torch.manual_seed(11)
    gradcache_accumulation(model, objective, micro, forward_fn(model), no_autocast, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), after)  # the RNG stream moves as in one plain pass
    for name, p in model.named_parameters():
        assert relative_error(p.grad, want[name]) <= TOL, name


def test_gradcache_refuses_list_outputs():
    from clipforge.train.gradcache import split_outputs

    with pytest.raises(ValueError, match="accum_mode='plain'"):
        split_outputs({"image_embeds": torch.zeros(2, 3), "cls_attention": [torch.zeros(1)]})


# ----------------------------------------------------------------------------- data sharding, launch env
def test_rank_batches_tile_the_single_process_stream():
    from clipforge.data.loader import build_train_loader

    recipe = load_recipe("tiny-shapes", ["data.batch_size=4", "data.num_workers=0"])
    one = build_train_loader(recipe.data.model_copy(update={"batch_size": 8}), 16, None, start_sample=24)
    ranks = [build_train_loader(recipe.data, 16, None, start_sample=24, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        want = next(one)
        got = [next(loader) for loader in ranks]
        assert torch.equal(torch.cat([g["indices"] for g in got]), want["indices"])
        assert torch.equal(torch.cat([g["images"] for g in got]), want["images"])
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        build_train_loader(recipe.data, 16, None, rank=2, world_size=2)


def test_launch_environment_torchrun_slurm_and_single():
    assert D.read_launch_env({}) == (0, 0, 1, "none")
    assert D.read_launch_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}) == (3, 1, 8, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "16", "SLURM_NTASKS": "16"}
    assert D.read_launch_env(slurm) == (5, 1, 16, "slurm")
    # torchrun inside srun: torchrun's variables win
    assert D.read_launch_env({**slurm, "RANK": "2", "WORLD_SIZE": "4"})[3] == "torchrun"
    # the batch script itself (no job step) is one process, whatever SLURM_NTASKS says
    assert D.read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}) == (0, 0, 1, "none")
    assert D.first_slurm_host("gpu[003-004,010],cpu1") == "gpu003"
    assert D.first_slurm_host("node7") == "node7"


def test_nproc_relaunches_through_torchrun_without_nproc():
    argv = ["train", "tiny-shapes", "--nproc", "2", "--set", "train.steps=3", "--nproc=4"]
    cmd = D.torchrun_command(2, D.strip_nproc(argv))
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in cmd
    assert cmd[cmd.index("-m", 3):] == ["-m", "clipforge", "train", "tiny-shapes", "--set", "train.steps=3"]


def test_peer_failures_are_told_apart_from_our_errors():
    from clipforge.train.trainer import TrainingError

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:46489. This is typically caused by a remote worker crashing.")
    assert D.peer_failure(gloo)
    assert D.short_reason(gloo) == "Connection closed by peer [127.0.0.1]:46489"
    assert not D.peer_failure(TrainingError("eval timed out"))
    assert not D.peer_failure(ValueError("bad shape"))


def test_sharded_rows_come_back_in_order():
    mine, rounds = D.shard_of(10, 3, D.DistContext(rank=1, world_size=2))
    assert [list(r) for r in mine] == [[3, 4, 5], [9]] and rounds == 2


# ----------------------------------------------------------------------------- end to end
E2E_RECIPE = """
base = "tiny-shapes"
[model]
image_size = 16
patch_size = 8
vision_width = 32
vision_layers = 1
vision_heads = 2
patch_dropout = 0.25
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
"""

FAKE_SRUN = """#!/bin/bash
# a stand-in for srun: SLURM_NTASKS local copies of the command, each with its task variables
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NUM_TASKS=$SLURM_NTASKS "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def read_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def last_logged_step(run_dir: Path) -> int:
    """The step of the last complete line of a running trainer's metrics.jsonl (0 before the first).
    The trainer may be in the middle of writing a line: only newline-terminated lines count."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    lines = text[:text.rfind("\n") + 1].splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def worker_with_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process that has RANK=rank."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def start_and_wait(args: list[str], run_dir: Path, step: int, timeout: float = 120) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "clipforge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + timeout
    while last_logged_step(run_dir) < step:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.communicate()[1][-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise TimeoutError(f"step {step} not reached")
        time.sleep(0.02)
    return proc


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_nproc2_sigterm_and_sigkill_of_one_rank_then_resume_matches_uninterrupted(tmp_path):
    steps = 24
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(E2E_RECIPE.format(steps=steps))

    # reference: the uninterrupted 2-process run, launched by the sbatch example through a fake srun
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    full = tmp_path / "full"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node[01-02]", "MASTER_PORT": str(free_port()), "RECIPE": str(recipe),
           "RUN_DIR": str(full), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "examples/slurm/train.sbatch")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done: 24 steps" in out.stderr
    expected = read_losses(full)
    assert sorted(expected) == list(range(1, steps + 1))

    cut = tmp_path / "cut"
    train = ["train", str(recipe), "--run-dir", str(cut), "--nproc", "2"]
    # 1. SIGTERM to rank 1 only: every rank stops at the same step, one checkpoint, exit 0
    proc = start_and_wait(train, cut, 5)
    os.kill(worker_with_rank(proc.pid, 1), signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    err = " ".join(err.split())
    assert "stopped by signal" in err and "--resume latest" in err
    latest = (cut / "checkpoints" / "latest").resolve()
    state = torch.load(latest / "train_state.pt", weights_only=True)
    stopped_at = state["step"]
    assert 5 <= stopped_at < steps and latest.name == f"step_{stopped_at:07d}"
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    assert state["samples_seen"] == stopped_at * 8 * 2  # a global cursor
    assert max(read_losses(cut)) == stopped_at

    # 2. resume, then SIGKILL rank 1: rank 0 must leave quickly with a clear message, not hang
    proc = start_and_wait(train + ["--resume", "latest"], cut, stopped_at + 6)
    os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)
    killed = time.time()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.time() - killed < 30
    err = " ".join(err.split())  # the console wraps long lines
    assert "rank 0: lost contact with the other ranks" in err and "--resume latest" in err

    # 3. resume to the end: every step's loss equals the uninterrupted run's
    out = subprocess.run([sys.executable, "-m", "clipforge", *train, "--resume", "latest"], cwd=REPO,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    got = read_losses(cut)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == expected  # bitwise: JSON floats round-trip exactly


def test_nproc_inside_a_distributed_launch_is_refused(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from clipforge.cli import app

    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    out = CliRunner().invoke(app, ["train", "tiny-shapes", "--nproc", "2", "--run-dir", str(tmp_path / "r")])
    assert out.exit_code != 0 and "drop --nproc" in " ".join(out.output.split())


@pytest.mark.slow
def test_nproc2_sync_free_equals_reading_every_step(tmp_path):
    """Under torchrun the sync-free step reads nothing between agreement steps (logging, checkpoints,
    every 10th step): the same metrics and weights as the ranks reading and agreeing every step."""
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(E2E_RECIPE.format(steps=12))
    records = {}
    for sync in ("false", "true"):
        run_dir = tmp_path / sync
        out = subprocess.run([sys.executable, "-m", "clipforge", "train", str(recipe), "--run-dir", str(run_dir),
                              "--nproc", "2", "--set", "logging.every_steps=5", "--set", f"train.sync_every_step={sync}"],
                             cwd=REPO, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
        for line in lines:
            line.pop("img_per_s")
        weights = clipforge.load(run_dir / "checkpoints" / "latest")[0].state_dict()
        records[sync] = (lines, weights)
    (lines, weights), (synced_lines, synced_weights) = records["false"], records["true"]
    assert [l["step"] for l in lines] == [5, 10, 12]
    assert lines == synced_lines
    for k in weights:
        assert torch.equal(weights[k], synced_weights[k]), k
