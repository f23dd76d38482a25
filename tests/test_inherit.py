"""TinyCLIP weight inheritance (methods.md section 4): manual (layers at a stride, leading
heads/width slices) through model.init_from, and the student shapes of `clipforge distill`."""

from __future__ import annotations

import pytest
import torch

from clipforge.config import ModelConfig
from clipforge.models.clip import CLIP
from clipforge.models.inherit import (
    InheritError,
    inherit_state_dict,
    layer_map,
    parse_student_spec,
    student_config,
)
from clipforge.train.params import InitFromError, load_init_from
from tiny_checkpoint import TINY_MODEL_TOML, TINY_RUN_TOML, run_cli

TEACHER = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=6, vision_heads=4,
               vocab_size=64, context_length=12, text_width=48, text_layers=4, text_heads=3, embed_dim=16)


def _teacher() -> CLIP:
    torch.manual_seed(0)
    model = CLIP(ModelConfig(**TEACHER))
    with torch.no_grad():  # non-trivial biases and LayerNorms, so a slicing mistake shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    ids = torch.randint(1, 64, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return images, ids, mask


def test_layer_map_is_arange_times_the_stride():
    for lt, ls in [(6, 3), (6, 4), (12, 5), (4, 4), (7, 1)]:
        assert layer_map(lt, ls) == (torch.arange(ls) * (lt // ls)).tolist()
    with pytest.raises(InheritError, match="1..4 layers"):
        layer_map(4, 5)


def test_a_student_with_the_teachers_shape_inherits_it_exactly():
    teacher = _teacher()
    state, maps = inherit_state_dict(teacher.state_dict(), teacher.cfg, teacher.cfg)
    assert maps == {"visual": list(range(6)), "text": list(range(4))}
    student = CLIP(teacher.cfg).eval()
    student.load_state_dict(state, strict=True)
    for k, v in teacher.state_dict().items():
        assert torch.equal(state[k], v), k
    with torch.no_grad():
        a, b = teacher(*_inputs()), student(*_inputs())
    assert torch.equal(a["image_embeds"], b["image_embeds"]) and torch.equal(a["text_embeds"], b["text_embeds"])


def test_qkv_keeps_the_first_heads_and_input_dims_at_the_layer_stride():
    teacher = _teacher()
    # vision: 64 wide, 4 heads of 16 -> 32 wide, 2 heads of 16 (head_dim kept); text: 48/3 heads -> 32/2 heads
    cfg = ModelConfig(**{**TEACHER, "vision_width": 32, "vision_heads": 2, "vision_layers": 3,
                         "text_width": 32, "text_heads": 2, "text_layers": 2})
    state, maps = inherit_state_dict(teacher.state_dict(), teacher.cfg, cfg)
    sd = teacher.state_dict()
    assert maps["visual"] == [0, 2, 4] and maps["text"] == [0, 2]
    for j, i in enumerate(maps["visual"]):
        qkv = sd[f"visual.blocks.{i}.attn.qkv.weight"]
        expected = qkv.view(3, 4, 16, 64)[:, :2, :, :32].reshape(3 * 32, 32)
        assert torch.equal(state[f"visual.blocks.{j}.attn.qkv.weight"], expected)
        bias = sd[f"visual.blocks.{i}.attn.qkv.bias"].view(3, 4, 16)[:, :2].reshape(-1)
        assert torch.equal(state[f"visual.blocks.{j}.attn.qkv.bias"], bias)
        assert torch.equal(state[f"visual.blocks.{j}.attn.proj.weight"], sd[f"visual.blocks.{i}.attn.proj.weight"][:32, :32])
        assert torch.equal(state[f"visual.blocks.{j}.mlp.fc.weight"], sd[f"visual.blocks.{i}.mlp.fc.weight"][:128, :32])
        assert torch.equal(state[f"visual.blocks.{j}.ln_1.weight"], sd[f"visual.blocks.{i}.ln_1.weight"][:32])
    # text: 16-dim heads -> 16-dim heads: the qkv rule again, at stride 2
    qkv = sd["text.blocks.2.attn.qkv.weight"]
    assert torch.equal(state["text.blocks.1.attn.qkv.weight"], qkv.view(3, 3, 16, 48)[:, :2, :, :32].reshape(96, 32))
    # embeddings, positions, projections: leading slices; the joint space is kept
    assert torch.equal(state["visual.pos_embed"], sd["visual.pos_embed"][:, :32])
    assert torch.equal(state["text.token_embed.weight"], sd["text.token_embed.weight"][:, :32])
    assert torch.equal(state["image_projection.weight"], sd["image_projection.weight"][:, :32])
    assert torch.equal(state["logit_scale"], sd["logit_scale"])
    CLIP(cfg).load_state_dict(state, strict=True)


def test_a_narrower_head_keeps_the_leading_dims_of_each_kept_head():
    teacher = _teacher()
    cfg = ModelConfig(**{**TEACHER, "vision_width": 32, "vision_heads": 4})  # head_dim 16 -> 8
    state, _ = inherit_state_dict(teacher.state_dict(), teacher.cfg, cfg)
    qkv = teacher.state_dict()["visual.blocks.1.attn.qkv.weight"]
    assert torch.equal(state["visual.blocks.1.attn.qkv.weight"], qkv.view(3, 4, 16, 64)[:, :, :8, :32].reshape(96, 32))
    proj = teacher.state_dict()["visual.blocks.1.attn.proj.weight"]
    assert torch.equal(state["visual.blocks.1.attn.proj.weight"], proj.view(64, 4, 16)[:32, :, :8].reshape(32, 32))


def test_a_student_that_is_no_slice_of_the_teacher_is_refused_by_key():
    teacher = _teacher()
    for change, message in [({"vision_layers": 8}, "vision_layers = 8 is larger"), ({"patch_size": 16}, "model.patch_size"),
                            ({"text_width": 64, "text_heads": 2}, "text_width = 64 is larger"),
                            ({"vision_width": 64, "vision_heads": 2}, "head_dim 32")]:
        with pytest.raises(InheritError, match=message):
            inherit_state_dict(teacher.state_dict(), teacher.cfg, ModelConfig(**{**TEACHER, **change}))


def test_init_from_with_inherit_manual_warm_starts_a_smaller_model(tmp_path):
    from tiny_checkpoint import make_tiny_checkpoint

    big = make_tiny_checkpoint(tmp_path / "big", vision_layers=4, vision_width=64, vision_heads=4)
    cfg = ModelConfig(**{**dict(image_size=32, patch_size=8, vocab_size=256, context_length=16, embed_dim=16,
                                text_width=32, text_layers=1, text_heads=2),
                         "vision_width": 32, "vision_layers": 2, "vision_heads": 2})
    student = CLIP(cfg)
    report = load_init_from(student, {"path": str(big), "inherit": "manual"})
    assert not report.left_at_init and "vision layers [0, 2]" in report.kind
    from safetensors.torch import load_file

    sd = load_file(str(big / "model.safetensors"))
    assert torch.equal(student.state_dict()["visual.blocks.1.mlp.fc.bias"], sd["visual.blocks.2.mlp.fc.bias"][:128])
    # without inherit the shapes clash, and the error says so
    with pytest.raises(InitFromError, match="shapes differ"):
        load_init_from(CLIP(cfg), {"path": str(big)})
    with pytest.raises(InitFromError, match="larger than the teacher"):
        load_init_from(CLIP(ModelConfig(**{**cfg.model_dump(), "text_width": 64})), {"path": str(big), "inherit": "manual"})


def test_student_spec_and_progressive_stage_shapes():
    assert parse_student_spec("width=0.5, layers=0.5") == {"width": 0.5, "layers": 0.5}
    for bad, message in [("width", "KEY=VALUE"), ("depth=0.5", "KEY=VALUE"), ("width=2", r"in \(0, 1\]"),
                         ("vision_layers=1.5", "whole number"), ("width=half", "not a number"), ("", "empty")]:
        with pytest.raises(InheritError, match=message):
            parse_student_spec(bad)
    teacher = ModelConfig(**{**TEACHER, "vision_width": 192, "vision_heads": 3, "text_width": 128, "text_heads": 2,
                             "text_layers": 2})
    spec = parse_student_spec("width=0.5,layers=0.5")
    stages = [student_config(teacher, spec, k / 3) for k in (1, 2, 3)]
    # vision 192 = 3 x 64 -> 96 is no multiple of 64: three heads throughout, head_dim shrinks (53, 43, 32)
    assert [(s.vision_width, s.vision_heads, s.vision_layers) for s in stages] == [(159, 3, 5), (129, 3, 4), (96, 3, 3)]
    # text 128 = 2 x 64 -> 64 is: head_dim 64 throughout, whole heads dropped
    assert [(s.text_width, s.text_heads, s.text_layers) for s in stages] == [(128, 2, 2), (64, 1, 1), (64, 1, 1)]
    for a, b in zip([teacher, *stages], stages):  # each stage can inherit from the one before
        inherit_state_dict(CLIP(a).state_dict(), a, b)


# ----------------------------------------------------------------------------- clipforge distill
TEACHER_TOML = """
base = "tiny-shapes"
name = "tiny-teacher"
""" + TINY_MODEL_TOML.replace("vision_layers = 1", "vision_layers = 4").replace("text_layers = 1", "text_layers = 2") + \
    TINY_RUN_TOML.replace("steps = 4", "steps = 2")


def _losses(run_dir) -> dict[int, float]:
    import json

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def test_distill_cli_runs_the_stages_and_resumes_an_interrupted_one(tmp_path, capsys):
    import json
    import os
    import shutil

    from clipforge.api import load

    (tmp_path / "teacher.toml").write_text(TEACHER_TOML)
    code, _, err = run_cli(capsys, "train", tmp_path / "teacher.toml", "--run-dir", tmp_path / "big")
    assert code == 0, err
    args = ["distill", tmp_path / "big", "--student", "width=0.5,layers=0.5", "--stages", "2",
            "--run-dir", tmp_path / "tiny", "--set", "train.steps=4", "--set", "train.checkpoint_every_steps=2",
            "--clip-weight", "0.25"]
    # a bad --set is refused before the plan is written, so the corrected command is not taken for a resume
    code, _, err = run_cli(capsys, *args, "--set", "train.stepz=1")
    assert code == 2 and "train.stepz" in err and not (tmp_path / "tiny" / "distill.json").exists()
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "stage 2/2" in err and "done: the student is" in err
    plan = json.loads((tmp_path / "tiny" / "distill.json").read_text())
    assert [(m["vision_width"], m["vision_layers"]) for m in plan["models"]] == [(32, 3), (16, 2)]  # whole 16-dim heads
    model, _, _ = load(tmp_path / "tiny" / "stage_2" / "checkpoints" / "latest")  # an ordinary checkpoint
    assert (model.cfg.vision_width, model.cfg.vision_layers, model.cfg.text_layers) == (16, 2, 1)
    stage2 = tmp_path / "tiny" / "stage_2"
    recipe = (stage2 / "recipe.toml").read_text()
    assert 'inherit = "manual"' in recipe and "stage_1" in recipe and "affinity_distill" in recipe
    full = _losses(stage2)
    assert "affinity_distill/loss" in (stage2 / "metrics.jsonl").read_text()

    # a kill after step 2 of stage 2: its last checkpoint is gone, 'latest' points at step 2
    ckpts = stage2 / "checkpoints"
    shutil.rmtree(ckpts / "step_0000004")
    os.remove(ckpts / "latest")
    os.symlink("step_0000002", ckpts / "latest")
    stage1_before = sorted(p.name for p in (tmp_path / "tiny" / "stage_1" / "checkpoints").iterdir())
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "stage 1/2" in err and "done already" in err and "resuming" in err
    assert sorted(p.name for p in (tmp_path / "tiny" / "stage_1" / "checkpoints").iterdir()) == stage1_before
    assert "step_0000002 at step 2" in out + err  # the trainer's banner: stage 2 went on from its step 2
    assert _losses(stage2)[4] == full[4]  # ... along the same trajectory (the log is rewritten from step 3)
    # another plan in the same run dir is refused, by key
    code, _, err = run_cli(capsys, *[a if a != "width=0.5,layers=0.5" else "width=0.25" for a in args])
    assert code == 2 and "student" in err and "new --run-dir" in err


@pytest.mark.parametrize("granularity", ["groups", "cofi"])
def test_distill_cli_automatic_inheritance_learns_gates_prunes_and_distils(tmp_path, capsys, granularity):
    import json

    from clipforge.api import load

    (tmp_path / "teacher.toml").write_text(TEACHER_TOML)
    code, _, err = run_cli(capsys, "train", tmp_path / "teacher.toml", "--run-dir", tmp_path / "big")
    assert code == 0, err
    args = ["distill", tmp_path / "big", "--student", "sparsity=0.5", "--prune-steps", "3", "--stages", "2",
            "--run-dir", tmp_path / "auto", "--set", "train.steps=2", "--granularity", granularity]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    plan = json.loads((tmp_path / "auto" / "distill.json").read_text())
    assert plan["sparsity_targets"] == [0.25, 0.333333]  # kept 100% -> 75% -> 50%
    assert plan["granularity"] == granularity
    assert f'granularity = "{granularity}"' in (tmp_path / "auto" / "stage_2" / "masks" / "recipe.toml").read_text()
    for k in (1, 2):
        stage = tmp_path / "auto" / f"stage_{k}"
        masks = [json.loads(line) for line in (stage / "masks" / "metrics.jsonl").read_text().splitlines()]
        assert masks[-1]["step"] == 3 and "prune/expected_sparsity" in masks[-1]
        assert (stage / "pruned" / "config.json").is_file()
    model, _, _ = load(tmp_path / "auto" / "stage_2" / "checkpoints" / "latest")  # ordinary, not larger
    assert model.cfg.vision_width <= 32 and model.cfg.vision_layers <= 4
    assert model.cfg.uniform_layers() == (granularity == "groups")  # cofi: per-layer heads and MLP widths
    before = (tmp_path / "auto" / "stage_1" / "masks" / "metrics.jsonl").read_text()
    code, _, err = run_cli(capsys, *args)  # again: everything is done already (pruned stages are kept)
    assert code == 0 and err.count("done already") == 2 and "training" not in err, err
    assert (tmp_path / "auto" / "stage_1" / "masks" / "metrics.jsonl").read_text() == before
    code, _, err = run_cli(capsys, "distill", tmp_path / "big", "--student", "sparsity=0.5,width=0.5", "--run-dir",
                           tmp_path / "x", "--prune-steps", "3")
    assert code == 2 and "takes no other key" in err
    code, _, err = run_cli(capsys, "distill", tmp_path / "big", "--student", "width=0.5", "--run-dir",
                           tmp_path / "y", "--granularity", "cofi")
    assert code == 2 and "--granularity and --prune-size are for automatic inheritance" in err
    code, _, err = run_cli(capsys, "distill", tmp_path / "big", "--student", "sparsity=0.5", "--run-dir",
                           tmp_path / "z", "--prune-steps", "3", "--prune-size", "exact")
    assert code == 2 and "--prune-size is 'expected' or 'target'" in err
