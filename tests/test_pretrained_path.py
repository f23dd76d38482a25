"""Start from pretrained weights, end to end: OpenCLIP weights -> `clipforge import openclip` ->
`model.init_from` -> fine-tune -> `clipforge eval`, and the tokenizer travels with the weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from clipforge.config import load_recipe  # noqa: E402
from clipforge.train import checkpoint as ckpt  # noqa: E402
from clipforge.train.trainer import Trainer  # noqa: E402

VISION = dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16)
TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
OURS = ["model.image_size=32", "model.patch_size=8", "model.vision_width=32", "model.vision_layers=1",
        "model.vision_heads=2", "model.text_width=32", "model.text_layers=1", "model.text_heads=2",
        "model.vocab_size=49408", "model.context_length=16", "model.embed_dim=16", "data.batch_size=16",
        "data.num_workers=0", "train.steps=2", "eval.at_end=false", "eval.every_steps=none",
        "logging.tensorboard=false", "logging.progress=false", "train.checkpoint_every_steps=none"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A randomly initialised OpenCLIP model saved as OpenCLIP users have it, imported with the CLI."""
    from safetensors.torch import save_file

    where = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(16, VISION, TEXT)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(where / "open_clip_model.safetensors"))
    (where / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"embed_dim": 16, "vision_cfg": VISION, "text_cfg": TEXT}}))
    proc = subprocess.run([sys.executable, "-m", "clipforge", "import", "openclip",
                           str(where / "open_clip_model.safetensors"), "--config", str(where / "open_clip_config.json"),
                           "--out", str(where / "ckpt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return where / "ckpt", model


def test_fine_tune_from_imported_weights_then_evaluate(imported, tmp_path, capsys):
    ckpt_dir, _ = imported
    recipe = load_recipe("tiny-shapes", [*OURS, f"model.init_from={ckpt_dir}"])
    result = Trainer(recipe, tmp_path / "ft").fit()
    assert result.step == 2
    printed = capsys.readouterr().out
    assert "loaded" in printed and "tokenizer: clip-bpe" in printed
    # the fine-tuned checkpoint tokenizes as the pretrained model did: CLIP's BPE ids, as open_clip.tokenize
    saved = ckpt.read_config(result.last_checkpoint)
    assert saved["tokenizer"]["kind"] == "clip-bpe"
    import clipforge

    _, _, tokenizer = clipforge.load(result.last_checkpoint)
    ids, _ = tokenizer(["a red circle"])
    assert torch.equal(ids[0], open_clip.tokenize(["a red circle"], context_length=16)[0])

    out = tmp_path / "zs.json"
    proc = subprocess.run([sys.executable, "-m", "clipforge", "eval", str(tmp_path / "ft"), "--task", "retrieval",
                           "--data", "shapes:binding", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())  # a result was written


def test_first_step_sees_the_pretrained_text_embeddings(imported, tmp_path):
    """Before any update, the fine-tuning model embeds a caption as OpenCLIP's model does."""
    ckpt_dir, oc_model = imported
    from clipforge.train.params import init_from_tokenizer, load_init_from
    from clipforge.models.clip import CLIP

    recipe = load_recipe("tiny-shapes", [*OURS, f"model.init_from={ckpt_dir}"])
    model = CLIP(recipe.model).eval()
    report = load_init_from(model, recipe.model.init_from)
    tokenizer = init_from_tokenizer(report, recipe.model.context_length)
    ids, mask = tokenizer(["a photo of a red circle"])
    with torch.no_grad():
        ours = model(None, ids, mask)["text_embeds"]
        theirs = oc_model.eval().encode_text(open_clip.tokenize(["a photo of a red circle"], context_length=16),
                                              normalize=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_vision_only_warm_start_keeps_the_runs_own_tokenizer(imported, tmp_path):
    ckpt_dir, _ = imported
    recipe = load_recipe("tiny-shapes", [*OURS, f"model.init_from.path={ckpt_dir}",
                                         'model.init_from.include=["visual.*"]'])
    result = Trainer(recipe, tmp_path / "v").fit()
    assert ckpt.read_config(result.last_checkpoint)["tokenizer"]["kind"] == "bpe"
