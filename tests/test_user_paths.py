"""What a user meets on ordinary paths: the saved recipe reads back exactly, --resume takes the run's
own recipe, zero-shot says when prompts are cut, --help shows what it says, docs and file modes."""

from __future__ import annotations

import os
import re
import stat
import sys
import warnings
from importlib import metadata
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clipforge.config import available_recipes, load_recipe, recipe_to_toml, validate_recipe
from tiny_checkpoint import TINY_MODEL_TOML, run_cli as cli_in_process

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- A: recipe.toml round trip
def _round_trip(recipe):
    return validate_recipe(tomllib.loads(recipe_to_toml(recipe)))


@pytest.mark.parametrize("name", sorted(available_recipes()))
def test_shipped_recipes_round_trip_exactly(name):
    r = load_recipe(name)
    assert _round_trip(r) == r


def test_none_where_the_default_is_not_none_round_trips():
    # grad_clip=None (off) used to be left out of recipe.toml and read back as 1.0: clipping back on
    r = load_recipe("tiny-shapes", ["optim.grad_clip=none"])
    back = _round_trip(r)
    assert back.optim.grad_clip is None
    assert back == r
    # Nones whose default is None, next to set values, in sections, lists and tables
    r = load_recipe("tiny-shapes-siglip", [
        "optim.grad_clip=null", "train.threads=2", "train.max_minutes=none",
        'optim.groups=[{match = "text.*", lr_scale = 0.5}]', 'model.init_from={path = "runs/x"}',
    ])
    assert r.optim.groups[0].weight_decay is None and r.model.init_from.include is None
    assert _round_trip(r) == r
    r = load_recipe("tiny-shapes", ["model.logit_bias_init=none", "data.samples_per_epoch=none"])
    assert _round_trip(r) == r


def test_recipe_files_read_none_text_like_set(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('base = "tiny-shapes"\n[optim]\ngrad_clip = "none"\n[train]\nthreads = "NULL"\n'
                    '[data]\nsizes_file = "none"\n')
    r = load_recipe(str(path))
    assert r.optim.grad_clip is None and r.train.threads is None
    assert r.data.sizes_file == "none"  # a field that takes text keeps the text (it could be a file name)


# ----------------------------------------------------------------------------- B: --resume takes the run's recipe
TINY = """
base = "tiny-shapes"
description = "test recipe"
""" + TINY_MODEL_TOML + """[data]
batch_size = 8
num_workers = 0
[data.tokenizer]
vocab_size = 128
corpus_size = 300
[train]
steps = 10
[schedule]
warmup_steps = 1
[eval]
at_end = false
every_steps = 1000
[logging]
tensorboard = false
progress = false
"""


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code, out, err = cli_in_process(capsys, *args)
    return code, out, " ".join(err.split())


@pytest.fixture
def started_run(tmp_path, capsys):
    """A 2-step run started with --set values that differ from its recipe file."""
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", recipe, "--run-dir", run, "--set", "train.steps=2",
                           "--set", "optim.grad_clip=none", "--set", "optim.lr=1e-3")
    assert code == 0, err
    return recipe, run


def test_resume_without_recipe_uses_the_runs_own_recipe(started_run, capsys):
    _, run = started_run
    code, _, err = run_cli(capsys, "train", "--run-dir", run, "--resume", "latest",
                           "--set", "train.steps=3", "--set", "optim.lr=5e-4")
    assert code == 0, err
    assert "resuming" in err and "train.steps: 2 -> 3" in err and "optim.lr: 0.001 -> 0.0005" in err
    assert "resuming with recipe changes" not in err  # the trainer's one-line copy of the same list
    resumed = load_recipe(str(run / "recipe.toml"))
    assert resumed.train.steps == 3 and resumed.optim.lr == 5e-4
    assert resumed.optim.grad_clip is None  # the first run's --set, kept without repeating it


def test_resume_with_the_recipe_file_keeps_the_runs_values_and_says_so(started_run, capsys):
    recipe, run = started_run
    code, _, err = run_cli(capsys, "train", recipe, "--run-dir", run, "--resume", "latest",
                           "--set", "train.steps=3")
    assert code == 0, err
    assert "train.steps: 2 -> 3" in err
    # the file says grad_clip 1.0 and lr 2e-3; the run keeps its own and the warning names them
    assert re.search(r"warning: .*tiny\.toml differs from .*recipe\.toml at .*optim\.grad_clip", err), err
    resumed = load_recipe(str(run / "recipe.toml"))
    assert resumed.optim.grad_clip is None and resumed.optim.lr == 1e-3


def test_resume_with_another_recipe_is_refused(started_run, capsys):
    _, run = started_run
    code, _, err = run_cli(capsys, "train", "tiny-shapes", "--run-dir", run, "--resume", "latest")
    assert code == 2
    assert "error:" in err and "is a run of recipe 'tiny'" in err and "not 'tiny-shapes'" in err, err


def test_resume_the_checkpoint_cannot_take_is_refused_before_recipe_toml_changes(started_run, capsys):
    _, run = started_run
    before = (run / "recipe.toml").read_text()
    code, _, err = run_cli(capsys, "train", "--run-dir", run, "--resume", "latest", "--set", "model.text_layers=2")
    assert code == 2 and "cannot resume" in err and "model.text_layers" in err, err
    assert (run / "recipe.toml").read_text() == before  # a plain --resume still continues the run


def test_train_without_recipe_needs_resume_and_run_dir(tmp_path):
    from clipforge.cli import app

    result = CliRunner().invoke(app, ["train", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--resume" in result.output


# ----------------------------------------------------------------------------- C: cut zero-shot prompts
def _tiny_model_and_tokenizer(context_length: int = 8):
    from clipforge.config import ModelConfig
    from clipforge.models.clip import CLIP
    from clipforge.models.tokenizer import BPETokenizer

    torch.manual_seed(0)
    cfg = ModelConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, vocab_size=128,
                      context_length=context_length, text_width=32, text_layers=1, text_heads=2, embed_dim=16)
    tok = BPETokenizer.train(["a photo of a red circle", "a blue square on the left", "a cat"] * 20, 128,
                             context_length)
    return CLIP(cfg).eval(), tok


def test_tokenizer_says_which_texts_it_cuts_without_changing_output():
    _, tok = _tiny_model_and_tokenizer(context_length=8)
    texts = ["a cat", "a photo of a red circle on the left of a blue square", "a red circle"]
    ids, mask = tok(texts)
    cut = tok.truncated(texts)
    assert cut == [False, True, False]
    assert tok.truncated("a cat") == [False]
    # the cut text fills the context; the others come back whole
    assert mask[1].sum() == 8 and tok.decode(ids[0]) == "a cat" and tok.decode(ids[2]) == "a red circle"
    again_ids, again_mask = tok(texts)
    assert torch.equal(ids, again_ids) and torch.equal(mask, again_mask)


def test_zero_shot_warns_with_the_number_of_cut_prompts():
    from clipforge.eval.zeroshot import zero_shot_classifier

    model, tok = _tiny_model_and_tokenizer(context_length=8)
    templates = ["a {}", "a photo of a {} on the left of a blue square"]
    with pytest.warns(UserWarning, match=r"3 of 6 zero-shot prompts are longer than the model's context "
                                         r"\(8 tokens\) and were cut"):
        classifier = zero_shot_classifier(model, tok, ["cat", "red circle", "square"], templates)
    assert classifier.shape == (3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prompts that fit: no warning
        zero_shot_classifier(model, tok, ["cat"], ["a {}"])


# ----------------------------------------------------------------------------- D: --help and --version
def _help(*command: str) -> str:
    from clipforge.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


COMMANDS = [(), ("recipes",), ("train",), ("demo",), ("bench",), ("report",), ("eval",), ("embed",), ("index",),
            ("serve",), ("export",), ("import",), ("data",), ("data", "shard"), ("data", "inspect")]


def test_help_keeps_bracketed_text():
    assert "Where checkpoints and logs go [default: runs/<recipe>]." in _help("train")
    assert "[default: cuda if available]" in _help("eval")
    assert '([[teachers]] kind = "cache")' in _help("embed")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "clipforge")
def test_help_has_no_bool_placeholder_on_flags(command):
    assert "<bool>" not in _help(*command)


def test_help_lists_choices_and_they_are_the_librarys():
    from clipforge import cli
    from clipforge.eval.evaluate import SIMILARITIES, TASKS
    from clipforge.export import EXPORT_KINDS
    from clipforge.index.dense import INDEX_KINDS
    from clipforge.index.embed import DTYPES, KINDS

    assert cli.TASK_CHOICES == TASKS and cli.SIMILARITY_CHOICES == SIMILARITIES
    assert cli.INDEX_KIND_CHOICES == INDEX_KINDS + ("lexical",) and cli.EXPORT_CHOICES == EXPORT_KINDS
    assert cli.EMBEDDING_CHOICES == KINDS and cli.DTYPE_CHOICES == DTYPES
    assert "--task [zeroshot|retrieval|linear-probe]" in _help("eval")
    assert "--similarity [pooled|late-interaction]" in _help("eval")
    assert "--kind [flat|ivf|hnsw|lexical]" in _help("index")
    assert "--to [hf|onnx|openclip]" in _help("export")


def test_warnings_keep_bracketed_text(capsys):
    from clipforge import cli

    cli._show_warning("optim.betas: [0.9, 0.98] -> [0.9, 0.95]; groups [b]", UserWarning, "x.py", 1)
    assert "optim.betas: [0.9, 0.98] -> [0.9, 0.95]; groups [b]" in " ".join(capsys.readouterr().err.split())


def test_version():
    from clipforge.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"clipforge {metadata.version('clipforge')}"
    assert "--version" in _help()


# ----------------------------------------------------------------------------- E: docs and file modes
def test_docs_no_longer_say_the_trainer_cannot_read_files():
    evaluation = " ".join((ROOT / "docs" / "evaluation.md").read_text().split())
    data = " ".join((ROOT / "docs" / "data.md").read_text().split())
    assert "not supported by the trainer" not in evaluation and "once the trainer can read" not in evaluation
    assert "arrive with the data issue" not in data


def test_docs_python_snippets_using_np_import_numpy():
    for doc in sorted((ROOT / "docs").glob("**/*.md")):
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S):
            if re.search(r"\bnp\.", block):
                assert "import numpy as np" in block, f"{doc.name}: a snippet uses np without importing it"


def test_weights_are_written_with_the_mode_of_the_other_files(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_checkpoint import make_tiny_checkpoint

    from clipforge.train import checkpoint as ckpt

    old = os.umask(0o022)
    try:
        step = make_tiny_checkpoint(tmp_path / "a")
        model, tok = _tiny_model_and_tokenizer()
        recipe = load_recipe("tiny-shapes", ["model.vocab_size=128", "model.context_length=8", "model.vision_width=32",
                                             "model.vision_layers=1", "model.vision_heads=2", "model.text_width=32",
                                             "model.text_layers=1", "model.embed_dim=16",
                                             "data.tokenizer.vocab_size=128"])
        with_method = ckpt.save_checkpoint(tmp_path / "b", 1, model, recipe, tok, train_state=None, keep_last=1,
                                           method_state={"ema.w": torch.zeros(3)})
    finally:
        os.umask(old)
    for directory, names in ((step, ["model.safetensors"]), (with_method, ["model.safetensors", "method.safetensors"])):
        for name in names:
            assert stat.S_IMODE((directory / name).stat().st_mode) == 0o644, name
            assert stat.S_IMODE((directory / "config.json").stat().st_mode) == 0o644


# ----------------------------------------------------------------------------- data.train that is not there
def test_train_refuses_a_missing_data_path_with_where_it_looked_and_the_recipes_note(capsys, tmp_path, monkeypatch):
    """A shipped CIFAR recipe run from a folder without cifar10/train: refused before anything starts (no
    run dir), saying where the relative path was looked for and what the recipe says to pass."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_in_process(capsys, "train", "clip-rocket-cifar", "--run-dir", tmp_path / "run")
    err = " ".join(err.split())  # rich wraps long lines
    assert code == 2 and "Traceback" not in err
    assert "data.train: image folder not found: cifar10/train" in err
    assert f"working directory {tmp_path}" in err and "--set data.train=imagefolder:PATH" in err
    assert "pass --set data.train=imagefolder:PATH/cifar10/train" in err  # the recipe's description
    assert not (tmp_path / "run").exists()
    # a mixture: each source is checked; an absolute path says no more than that it is not there
    (tmp_path / "here").mkdir()
    missing = tmp_path / "pairs.jsonl"
    code, _, err = cli_in_process(capsys, "train", "tiny-shapes", "--run-dir", tmp_path / "run",
                                  "--set", f"data.train=imagefolder:{tmp_path / 'here'} + jsonl:{missing}")
    err = " ".join(err.split())
    assert code == 2 and f"data.train: jsonl file not found: {missing}." in err and "working directory" not in err


def test_a_missing_teacher_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    """tinyclip-shapes as shipped names runs/big, which a user trains first."""
    code, _, err = cli_in_process(capsys, "train", "tinyclip-shapes", "--run-dir", tmp_path / "s",
                                  "--set", f"teachers.0.path={tmp_path / 'nope'}")
    assert code == 2 and "Traceback" not in err
    assert "teachers 'teacher'" in err and "does not exist" in err and "checkpoints/latest" in err


def test_what_is_not_a_checkpoint_is_named_for_what_it_is(tmp_path):
    from clipforge.eval.evaluate import checkpoint_dir
    from clipforge.train.checkpoint import CheckpointError, find_resume_checkpoint

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.toml").write_text('base = "tiny-shapes"\n')  # started, killed before a save
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "empty").mkdir()
    cases = {tmp_path / "run": "run directory without a checkpoint yet", tmp_path / "nope": "checkpoint not found",
             tmp_path / "notes.txt": "is a file, not a checkpoint", tmp_path / "empty": "neither a checkpoint"}
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            checkpoint_dir(path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        find_resume_checkpoint(tmp_path / "run", str(tmp_path / "run" / "checkpoints" / "step_0000999"))


def test_a_new_run_over_one_that_saved_no_checkpoint_says_it_starts_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # killed before its first save
    recipe = tmp_path / "tiny.toml"
    recipe.write_text('base = "tiny-shapes"\n' + TINY_MODEL_TOML)
    code, _, err = cli_in_process(capsys, "train", recipe, "--run-dir", run, "--set", "train.steps=1",
                                  "--set", "eval.at_end=false", "--set", "data.num_workers=0",
                                  "--set", "logging.tensorboard=false")
    assert code == 0, err
    assert "saved no checkpoint" in err and "starts over" in err


# ----------------------------------------------------------------------------- --device: one check for every verb
@pytest.fixture(scope="module")
def device_ckpt(tmp_path_factory):
    from tiny_checkpoint import make_caption_jsonl, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("device")
    return make_tiny_checkpoint(root / "ckpt"), make_caption_jsonl(root / "data", n=4)


@pytest.mark.parametrize("verb", ["eval", "embed", "dedup", "greedy"])
@pytest.mark.parametrize("device, says", [("tpu", "--device 'tpu': not a device; use cpu, cuda or cuda:N"),
                                          ("cuda", "--device cuda: no CUDA device is visible on this machine")])
def test_a_device_this_machine_lacks_is_refused_before_the_model_loads(capsys, tmp_path, monkeypatch, device_ckpt,
                                                                      verb, device, says):
    """eval, embed, data dedup and merge --greedy share train's kind of check (no torch traceback)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, on any machine
    ckpt, table = device_ckpt
    args = {"eval": ["eval", ckpt, "--task", "retrieval", "--data", f"jsonl:{table}"],
            "embed": ["embed", ckpt, "--data", f"jsonl:{table}", "--out", tmp_path / "emb"],
            "dedup": ["data", "dedup", f"jsonl:{table}", "--model", ckpt, "--out", tmp_path / "k.parquet"],
            "greedy": ["merge", ckpt, ckpt, "--greedy", "--task", "retrieval", "--data", f"jsonl:{table}",
                       "--out", tmp_path / "soup"]}[verb]
    code, out, err = cli_in_process(capsys, *args, "--device", device)
    err = " ".join(err.split())
    assert code == 2 and "Traceback" not in out + err and says in err, out + err
    assert not (tmp_path / "emb").exists()  # embed refuses before making its output directory
