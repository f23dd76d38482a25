"""What a run prints when stdout is not a terminal (SLURM, nohup, CI), the optional tracker adapters,
and the run report (run table, recipe, extra curves, confusion matrices, retrieval failures,
TensorBoard figures), with one headless-Chromium look at the report."""

import json
import os
import re
import signal
import sys
import types
from pathlib import Path

import pytest
import torch

from clipforge.eval.hooks import default_eval_hooks
from clipforge.train import logs as L
from clipforge.train.trainer import Trainer, TrainingError
from test_train import small_recipe

CHROMIUM = Path("/usr/bin/chromium")
LINE = re.compile(r"step (\d+)/(\d+) \(\d+%\)  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d+  [\d,]+ img/s  "
                  r"elapsed \d+:\d\d:\d\d  ETA (\d+:\d\d:\d\d|\?)")


@pytest.fixture
def no_terminal(monkeypatch):
    """stdout is pytest's capture (not a TTY); make sure no variable tells rich otherwise."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------- logs without a terminal
def test_not_a_terminal_prints_banner_progress_lines_and_final_eval(tmp_path, capsys, no_terminal):
    r = small_recipe(tmp_path, "logging.progress=true", "eval.at_end=true", steps=20)
    Trainer(r, tmp_path / "run", eval_hooks=default_eval_hooks(r)).fit()
    out = capsys.readouterr().out

    assert f"clipforge train: recipe {r.name} -> {tmp_path / 'run'}" in out
    assert re.search(r"device +cpu: .* · 1 process · precision fp32", out)
    assert re.search(r"parameters +[\d,]+ trainable / [\d,]+ total", out)
    assert "16 global = 16 per process × 1 process × 1 accumulation step" in out
    assert "data        shapes (synthetic, generated on the fly)" in out
    assert "steps       20, from scratch" in out
    # a line after the first step, at least every 10% of the run (2 steps) and at the last step
    steps = [int(m.group(1)) for m in LINE.finditer(out)]
    assert steps[0] == 1 and steps[-1] == 20
    assert all(0 < b - a <= 2 for a, b in zip(steps, steps[1:])), steps
    assert all(m.group(2) == "20" for m in LINE.finditer(out))
    assert "final evaluation at step 20:" in out
    assert re.search(r"zeroshot/unseen/acc1 +\d\.\d{4}", out)
    # run_info.json keeps the same facts for the report, with the session's end
    session = json.loads((tmp_path / "run" / "run_info.json").read_text())["sessions"][-1]
    assert session["global_batch"] == 16 and session["end_step"] == 20 and session["stopped_by"] == "done"
    assert session["params_trainable"] == session["params_total"] > 0 and session["wall_s"] > 0
    assert not L._live_display()  # why lines, not the bar: rich would draw nothing here until the end


def test_not_a_terminal_with_progress_off_still_prints_the_banner(tmp_path, capsys, no_terminal):
    r = small_recipe(tmp_path, "logging.progress=false", steps=3)
    Trainer(r, tmp_path / "run").fit()
    out = capsys.readouterr().out
    assert "clipforge train: recipe" in out and "parameters" in out
    assert not LINE.search(out)


def test_progress_lines_come_every_n_seconds(monkeypatch, capsys):
    """Long runs: the time rule (print_every_seconds) gives the lines, the 10% rule is a floor."""
    from clipforge.config import LoggingConfig

    clock = [1000.0]
    monkeypatch.setattr(L.time, "monotonic", lambda: clock[0])
    cfg = LoggingConfig(print_every_seconds=30, print_every_steps=1000)
    with L.TrainProgress(cfg, total=5000, start=100, enabled=True, live=False) as progress:
        for done in range(101, 121):
            clock[0] += 11.0  # 11 s a step
            progress.update(done, 2.5, 1e-3, 256, 0.5)
    steps = [int(m.group(1)) for m in LINE.finditer(capsys.readouterr().out)]
    # the first step of this process, then every 3rd step (33 s >= 30 s), then where it stopped
    assert steps == [101, 104, 107, 110, 113, 116, 119, 120]


def test_progress_line_contents(monkeypatch, capsys):
    from clipforge.config import LoggingConfig

    clock = [0.0]
    monkeypatch.setattr(L.time, "monotonic", lambda: clock[0])
    with L.TrainProgress(LoggingConfig(), total=100, start=0, enabled=True, live=False) as progress:
        clock[0] = 10.0
        progress.update(1, 3.14159, 2e-4, 512, 0.25)
    line = capsys.readouterr().out
    # img/s over step time (512 images in 0.25 s); ETA = 99 steps x 10 s of wall time per step so far
    assert "step 1/100 (1%)  loss 3.1416  lr 2.00e-04  2,048 img/s  elapsed 0:00:10  ETA 0:16:30" in line


def test_report_to_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, whatever this machine has
    r = small_recipe(tmp_path, 'logging.report_to=["wandb"]', steps=2)
    with pytest.raises(TrainingError, match=re.escape("pip install 'clipforge[wandb]'")):
        Trainer(r, tmp_path / "run").fit()
    assert not (tmp_path / "run").exists()  # refused before anything was written
    # the extra the message names exists
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert {"wandb", "trackio", "mlflow"} <= set(pyproject["project"]["optional-dependencies"])


def test_report_to_sends_recipe_and_metrics_to_the_tracker(tmp_path, monkeypatch):
    calls = {"log": [], "finished": 0}

    class FakeRun:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finished"] += 1

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, __spec__=None))
    r = small_recipe(tmp_path, 'logging.report_to=["wandb"]', "logging.project=clipforge-tests", steps=3)
    Trainer(r, tmp_path / "run").fit()
    assert calls["init"]["project"] == "clipforge-tests" and calls["init"]["name"] == "run"
    assert calls["init"]["config"]["optim"]["lr"] == r.optim.lr
    assert [s for s, _ in calls["log"]] == [1, 2, 3] and "loss" in calls["log"][0][1]
    assert calls["finished"] == 1
    assert L._mlflow_key("retrieval/seen/image_retrieval_recall@1") == "retrieval/seen/image_retrieval_recall_at_1"


# ----------------------------------------------------------------------------- the report
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped by SIGTERM at step 5 (sent from an evaluation hook at step 4), logging every 2
    steps: its curves and its zero-shot curve end at step 4, the checkpoint is at step 5."""
    tmp = tmp_path_factory.mktemp("report")
    r = small_recipe(tmp, "logging.every_steps=2", "logging.tensorboard=true", "eval.every_steps=4", steps=12)

    def stop_at_4(model, tokenizer, step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    result = Trainer(r, tmp / "run", eval_hooks=[*default_eval_hooks(r), stop_at_4]).fit()
    assert (result.stopped_by, result.step) == ("signal", 5)
    from clipforge.eval.report import write_report

    return tmp / "run", write_report(tmp / "run")


def test_report_has_run_recipe_notes_and_failures(stopped_run):
    run, report = stopped_run
    page = report.read_text()
    # run table: wall time, hardware, throughput, parameters
    for text in ("<h2>Run</h2>", "training wall time", "hardware", "cpu: ", "throughput", "images/s",
                 "trainable", "session 1", "ended signal at step 5"):
        assert text in page, text
    # the recipe, every section
    assert "<h2>Recipe</h2>" in page
    for section in ("model", "data", "optim", "schedule", "train", "eval", "logging", "objective"):
        assert f"<caption>{section}</caption>" in page, section
    assert "<th>every_steps</th><td><code>2</code>" in page
    # the final evaluation is later than both curves: said so
    assert "the training curves end at step 4" in page
    assert "curve&#x27;s last point is at step 4" in page  # html-escaped apostrophe
    # retrieval: the worst queries as well as the best, wrong hits named
    assert "best query" in page and "worst query" in page and "✗ " in page


def test_report_curves_have_grad_norm_accuracy_and_throughput(stopped_run):
    from clipforge.eval.report import plot_curves, read_metrics

    run, _ = stopped_run
    train, _ = read_metrics(run)
    fig = plot_curves(train * 2, grad_clip=1.0)  # the panels, not the values, are under test
    titles = [ax.get_title() for ax in fig.axes]
    assert any("gradient norm" in t for t in titles)
    assert any("in-batch accuracy" in t for t in titles)
    assert any("throughput" in t for t in titles)
    acc = next(ax for ax in fig.axes if "in-batch accuracy" in ax.get_title())
    assert {l.get_label() for l in acc.get_lines()} >= {"clip/i2t_acc", "clip/t2i_acc"}
    _assert_no_overlapping_ticks(fig)


def test_late_interaction_zero_shot_gets_its_own_curves_and_table_rows():
    """eval.late_interaction (FILIP) logs zeroshot-li/...: the report draws it beside the pooled curves
    and lists it in the final-evaluation table; runs without it look as before."""
    from clipforge.eval.report import _summary_table, plot_zeroshot

    pooled = [{"step": s, "zeroshot/seen/acc1": 0.5, "zeroshot/unseen/acc1": 0.25} for s in (10, 20)]
    both = [{**r, "zeroshot-li/seen/acc1": 0.6, "zeroshot-li/unseen/acc1": 0.3} for r in pooled]
    labels = [l.get_label() for l in plot_zeroshot(both).axes[0].get_lines()]
    assert labels == ["seen compositions", "seen, late interaction", "unseen compositions", "unseen, late interaction"]
    assert len(plot_zeroshot(pooled).axes[0].get_lines()) == 2
    table = _summary_table({**both[-1], "zeroshot-li/seen/acc5": 0.9})
    assert "<th>unseen, late interaction</th><td>30.0</td>" in table and "<td>90.0</td>" in table
    assert "late interaction" not in _summary_table(pooled[-1])


def test_confusion_matrix_has_a_colour_bar_and_readable_ticks():
    from clipforge.data.synthetic import class_names
    from clipforge.eval.report import plot_confusion

    names = class_names()
    labels = torch.arange(len(names)).repeat(3)
    pred = torch.randint(0, len(names), labels.shape, generator=torch.Generator().manual_seed(0))
    fig = plot_confusion(pred, labels, names, "all classes")
    assert len(fig.axes) == 2  # the matrix and its colour bar
    matrix = fig.axes[0]
    assert len(matrix.get_xticklabels()) == len(names) and len(matrix.get_yticklabels()) == len(names)
    assert min(t.get_fontsize() for t in matrix.get_xticklabels()) >= 6  # readable
    _assert_no_overlapping_ticks(fig)


def _assert_no_overlapping_ticks(fig) -> None:
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            boxes = [t.get_window_extent(renderer) for t in labels if t.get_text() and t.get_visible()]
            for a, b in zip(boxes, boxes[1:]):
                assert not a.overlaps(b), f"{ax.get_title()!r}: tick labels overlap"
    plt.close(fig)


def test_report_figures_and_recipe_go_to_tensorboard(stopped_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = stopped_run
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    images = set(events.Tags()["images"])
    assert {"report/training", "report/zeroshot", "report/confusion_unseen", "report/confusion_seen"} <= images
    assert events.Images("report/training")[-1].step == 5  # at the checkpoint's step
    texts = set(events.Tags()["tensors"])
    assert {"recipe/text_summary", "run/text_summary"} <= texts
    recipe_text = events.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "every_steps = 2" in recipe_text


@pytest.mark.browser
def test_report_in_headless_chromium(stopped_run, tmp_path):
    if not CHROMIUM.exists():
        reason = (f"BROWSER TEST NOT RUN: {CHROMIUM} is missing; install it with .ci/install-browser "
                  "(apt-get install chromium)")
        if os.environ.get("CI"):
            pytest.fail(reason)  # in CI a missing browser is a set-up bug, not a reason to pass
        pytest.skip(reason)
    sync_api = pytest.importorskip("playwright.sync_api")
    _, report = stopped_run
    shots = Path(os.environ.get("CLIPFORGE_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(report.resolve().as_uri())
            page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
            # nothing wider than the window, and no two boxes of a block overlap
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            # groups: each retrieval row's cells, the page's blocks, the recipe tables
            overlaps = page.evaluate("""() => {
                const hit = (a, b) => a.left < b.right - 1 && b.left < a.right - 1
                                   && a.top < b.bottom - 1 && b.top < a.bottom - 1;
                const all = s => [...document.querySelectorAll(s)];
                const groups = all('.row').map(r => [...r.children])
                    .concat([all('body > h2, body > img, body > table, body > p, body > .hp-grid')])
                    .concat([all('table.hp')]);
                const bad = [];
                for (const g of groups) {
                    const boxes = g.map(e => e.getBoundingClientRect());
                    for (let i = 0; i < boxes.length; i++)
                        for (let j = i + 1; j < boxes.length; j++)
                            if (hit(boxes[i], boxes[j]))
                                bad.push(g[i].outerHTML.slice(0, 60) + ' / ' + g[j].outerHTML.slice(0, 60));
                }
                return bad;
            }""")
            assert overlaps == []
            assert page.locator("table.hp").count() >= 8 and page.locator(".row.worst").count() >= 1
            assert page.locator("p.note").count() == 2
            page.screenshot(path=str(shots / "report.png"), full_page=True)
        finally:
            browser.close()
    assert (shots / "report.png").stat().st_size > 20000


class _DeviceLoss:
    """Stands for a 0-d CUDA tensor: each read on the host waits for the GPU, so it is counted."""

    def __init__(self) -> None:
        self.reads = 0

    def __float__(self) -> float:
        self.reads += 1
        return 1.5


@pytest.mark.parametrize("live", [False, True])
def test_progress_reads_the_loss_only_when_it_shows_it(monkeypatch, capsys, live):
    from clipforge.config import LoggingConfig

    clock = [0.0]
    monkeypatch.setattr(L.time, "monotonic", lambda: clock[0])
    loss = _DeviceLoss()
    cfg = LoggingConfig(print_every_seconds=2, print_every_steps=1000)
    with L.TrainProgress(cfg, total=100, start=0, enabled=True, live=live) as progress:
        for done in range(1, 101):
            clock[0] += 0.1  # 10 steps a second
            progress.update(done, loss, 1e-3, 64, 0.1)
    out = capsys.readouterr().out
    if live:  # the bar's text: at most twice a second (10 s of steps), and at the last step
        assert 2 <= loss.reads <= 21
    else:  # one read per printed line: step 1, every 2 s, the last step
        assert loss.reads == len(LINE.findall(out)) <= 12 and "loss 1.5000" in out


def test_a_half_written_last_line_neither_stops_a_resume_nor_the_report(tmp_path):
    """A crash or a full disk in the middle of a write leaves a cut line at the end of metrics.jsonl."""
    from clipforge.config import load_recipe
    from clipforge.eval.report import read_metrics
    from clipforge.train.trainer import Trainer
    from tiny_checkpoint import TINY_MODEL_TOML, TINY_RUN_TOML

    recipe_file = tmp_path / "tiny.toml"
    recipe_file.write_text('base = "tiny-shapes"\n' + TINY_MODEL_TOML + TINY_RUN_TOML)
    run = tmp_path / "run"
    Trainer(load_recipe(str(recipe_file), ["train.steps=2"]), run).fit()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.12')  # cut short
    with pytest.warns(UserWarning, match="skipped 1 damaged line"):
        train, _ = read_metrics(run)
    assert [r["step"] for r in train] == [1, 2]
    with pytest.warns(UserWarning, match="skipped 1 damaged line"):
        Trainer(load_recipe(str(recipe_file), ["train.steps=3"]), run, resume="latest").fit()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the cut line is gone, the resumed step follows
