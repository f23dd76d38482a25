"""Parameters as data: no-weight-decay declarations, recipe groups and freezing, warm starts, resume checks."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from clipforge.config import (
    ModelConfig,
    OptimConfig,
    ParamGroupConfig,
    Recipe,
    RecipeError,
    load_recipe,
    recipe_to_toml,
    validate_recipe,
)
from clipforge.models.clip import CLIP
from clipforge.train.params import (
    InitFromError,
    ResumeError,
    apply_group_settings,
    build_param_groups,
    check_resume_compatible,
    freeze_parameters,
    load_init_from,
    no_weight_decay_names,
    set_group_lrs,
)
from tiny_checkpoint import TINY_MODEL, make_tiny_checkpoint


def tiny_clip(seed: int = 0, **overrides) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(ModelConfig(**{**TINY_MODEL, **overrides}))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- no weight decay
class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.table = nn.Parameter(torch.zeros(3, 4))  # 2-D: decayed by the default rule
        self.gate = nn.Linear(4, 4)

    def no_weight_decay(self):
        return {"table", "gate", "dist_token"}  # a submodule, a parameter, and a name it does not have


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.tower = Tower()
        self.head = nn.Linear(4, 2)
        self.logit_scale_matrix = nn.Parameter(torch.zeros(2, 2))


def test_no_weight_decay_names_joins_the_default_rule_and_module_declarations_with_prefixes():
    names = no_weight_decay_names(Wrapper())
    assert names == {
        "tower.proj.bias", "tower.gate.bias", "head.bias",  # ndim < 2
        "logit_scale_matrix",  # "logit_" in the name
        "tower.table", "tower.gate.weight",  # declared by Tower, relative to itself
    }


def test_no_weight_decay_names_on_clip_are_todays_rule():
    model = tiny_clip()
    expected = {n for n, p in model.named_parameters() if p.ndim < 2 or "logit_" in n}
    assert no_weight_decay_names(model) == expected
    assert {"logit_scale", "visual.class_token", "text.ln_final.weight"} <= expected
    assert "visual.pos_embed" not in expected and "image_projection.weight" not in expected


# ----------------------------------------------------------------------------- groups
def test_without_groups_the_layout_is_decay_then_no_decay_in_parameter_order():
    model = tiny_clip()
    groups = build_param_groups(model, OptimConfig(weight_decay=0.1))
    assert [g["name"] for g in groups] == ["default", "default (no decay)"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0]
    ordered = [p for _, p in model.named_parameters()]
    no_decay = no_weight_decay_names(model)
    named = dict(model.named_parameters())
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in ordered if id(p) not in {id(named[n]) for n in no_decay}]
    assert {id(p) for p in groups[1]["params"]} == {id(named[n]) for n in no_decay}


def _clip_loss(model: CLIP, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    out = model(images, ids)
    logits = out["logit_scale"] * out["image_embeds"] @ out["text_embeds"].T
    labels = torch.arange(len(images))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_frozen_groups_stay_bitwise_unchanged_through_adamw_steps_and_lr_scale_reaches_the_groups():
    model = tiny_clip()
    optim = OptimConfig(weight_decay=0.2, groups=[
        ParamGroupConfig(match="text.*", freeze=True),
        ParamGroupConfig(match=["visual.blocks.*"], lr_scale=0.0),  # trained with lr 0: must not move either
        ParamGroupConfig(match="image_projection.*", lr_scale=0.5, weight_decay=0.05),
    ])
    before = snapshot(model)
    groups = build_param_groups(model, optim)
    optimizer = torch.optim.AdamW(groups, lr=1e-2, betas=optim.betas, eps=optim.eps)

    text_names = [n for n, _ in model.named_parameters() if n.startswith("text.")]
    assert text_names and all(not model.get_parameter(n).requires_grad for n in text_names)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(model.get_parameter(n)) in in_optimizer for n in text_names)

    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert set(by_name) == {
        "optim.groups[1] visual.blocks.*", "optim.groups[1] visual.blocks.* (no decay)",
        "optim.groups[2] image_projection.*",
        "default", "default (no decay)",
    }
    assert by_name["optim.groups[2] image_projection.*"]["weight_decay"] == 0.05
    assert by_name["default"]["weight_decay"] == 0.2
    no_decay_ids = {id(model.get_parameter(n)) for n in no_weight_decay_names(model)}
    for g in optimizer.param_groups:
        exempt = {id(p) in no_decay_ids for p in g["params"]}
        assert exempt == {g["name"].endswith("(no decay)")}
        if g["name"].endswith("(no decay)"):
            assert g["weight_decay"] == 0.0

    torch.manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    ids = torch.randint(1, 200, (4, 16))
    for _ in range(3):
        set_group_lrs(optimizer, 1e-2)
        optimizer.zero_grad(set_to_none=True)
        _clip_loss(model, images, ids).backward()
        optimizer.step()
    assert by_name["optim.groups[2] image_projection.*"]["lr"] == pytest.approx(5e-3)
    assert by_name["optim.groups[1] visual.blocks.*"]["lr"] == 0.0
    assert model.visual.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # it had a gradient, lr 0 kept it still

    after = snapshot(model)
    for name in before:
        unchanged = torch.equal(before[name], after[name])
        if name.startswith(("text.", "visual.blocks.")):
            assert unchanged, name
    assert not torch.equal(before["image_projection.weight"], after["image_projection.weight"])
    assert not torch.equal(before["visual.patch_embed.weight"], after["visual.patch_embed.weight"])
    assert not torch.equal(before["logit_scale"], after["logit_scale"])


def test_a_group_with_a_constant_lr_keeps_it_whatever_the_schedule_and_after_a_resume():
    model = tiny_clip()
    optim = OptimConfig(groups=[ParamGroupConfig(match="logit_scale", lr=0.02, weight_decay=0.0)])
    groups = build_param_groups(model, optim)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    for schedule_lr in (0.0, 1e-4, 5e-4):  # warm-up start, mid, peak
        set_group_lrs(optimizer, schedule_lr)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert lrs["optim.groups[0] logit_scale (no decay)"] == 0.02
        assert lrs["default"] == lrs["default (no decay)"] == schedule_lr
    # resume: the checkpoint's optimizer had lr 0.05 for the group; the recipe now says 0.02
    old = OptimConfig(groups=[ParamGroupConfig(match="logit_scale", lr=0.05, weight_decay=0.0)])
    saved = torch.optim.AdamW(build_param_groups(model, old), lr=1e-3).state_dict()
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    optimizer.load_state_dict(saved)
    assert [g["fixed_lr"] for g in optimizer.param_groups][0] == 0.05  # torch restored the saved settings
    apply_group_settings(optimizer, groups, optim)
    set_group_lrs(optimizer, 1e-4)
    assert [g["lr"] for g in optimizer.param_groups if "logit_scale" in g["name"]] == [0.02]
    with pytest.raises(RecipeError, match="sets both lr \\(constant\\) and lr_scale"):
        validate_recipe({"optim": {"groups": [{"match": "text.*", "lr": 0.1, "lr_scale": 0.5}]}})
    with pytest.raises(RecipeError, match="freeze = true, so its lr/lr_scale/weight_decay would never apply"):
        validate_recipe({"optim": {"groups": [{"match": "text.*", "freeze": True, "lr": 0.1}]}})


def test_a_methods_default_groups_apply_to_its_parameters_and_a_recipe_group_overrides_them():
    class Step(nn.Module):  # a training step whose method brings parameters and their own lr
        def __init__(self):
            super().__init__()
            self.model = tiny_clip()
            self.gates = nn.Linear(2, 2)

        def default_param_groups(self):
            return [ParamGroupConfig(match="gates.*", lr=0.02, weight_decay=0.0),
                    ParamGroupConfig(match="nothing.here.*", lr=0.5)]  # matches nothing: no error, no group

    step = Step()
    names = {g["name"]: g for g in build_param_groups(step, OptimConfig())}
    assert names["method default gates.*"]["fixed_lr"] == 0.02 and names["method default gates.*"]["weight_decay"] == 0.0
    assert [p for p in names["method default gates.*"]["params"]] == [step.gates.weight]
    assert not any("nothing" in n for n in names)
    overridden = {g["name"]: g for g in build_param_groups(
        step, OptimConfig(groups=[ParamGroupConfig(match="gates.*", lr_scale=0.5)]))}
    assert overridden["optim.groups[0] gates.*"]["lr_scale"] == 0.5 and overridden["optim.groups[0] gates.*"]["fixed_lr"] is None
    assert not any(n.startswith("method default") for n in overridden)


def test_apply_group_settings_puts_the_recipe_values_back_after_loading_an_optimizer_state():
    model = tiny_clip()
    old = OptimConfig(weight_decay=0.2, groups=[ParamGroupConfig(match="text.*", lr_scale=0.1)])
    saved = torch.optim.AdamW(build_param_groups(model, old), lr=1e-3).state_dict()
    new = OptimConfig(weight_decay=0.3, betas=(0.8, 0.9), eps=1e-8,
                      groups=[ParamGroupConfig(match="text.*", lr_scale=0.5, weight_decay=0.01)])
    groups = build_param_groups(model, new)
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=new.betas, eps=new.eps)
    optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["lr_scale"] == 0.1  # torch restored the saved settings
    apply_group_settings(optimizer, groups, new)
    assert [(g["lr_scale"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (0.5, 0.01), (0.5, 0.0), (1.0, 0.3), (1.0, 0.0)]
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-8 for g in optimizer.param_groups)
    with pytest.raises(ResumeError, match="the optimizer has 4 parameter groups but the recipe makes 2"):
        apply_group_settings(optimizer, build_param_groups(tiny_clip(), OptimConfig()), new)


def test_on_the_training_step_model_parameters_keep_the_model_names_and_the_rest_their_step_path():
    from clipforge.objectives import build_objective
    from clipforge.train.step import TrainStep

    r = recipe(optim={"groups": [{"match": "text.*", "freeze": True}]})
    model = tiny_clip()
    objective = build_objective(r.objective)
    objective.register_parameter("bank", nn.Parameter(torch.zeros(3, 4)))  # state beside the model
    step = TrainStep(r, model, objective, {})
    frozen = freeze_parameters(step, r.optim.groups)
    assert frozen and all(n.startswith("text.") for n in frozen)
    assert not model.text.token_embed.weight.requires_grad
    groups = build_param_groups(step, r.optim)
    ids = {id(p) for g in groups for p in g["params"]}
    assert id(objective.bank) in ids and id(model.logit_scale) in ids
    assert "logit_scale" in no_weight_decay_names(step) and "objective.bank" not in no_weight_decay_names(step)
    with pytest.raises(RecipeError, match=r"e.g. logit_scale, visual.class_token, text.pos_embed.*objective.bank"):
        build_param_groups(step, OptimConfig(groups=[ParamGroupConfig(match="model.text.*")]))


def test_first_matching_group_wins_and_freeze_parameters_reports_names():
    model = tiny_clip()
    groups_cfg = [ParamGroupConfig(match="text.blocks.0.*", lr_scale=0.5), ParamGroupConfig(match="text.*", freeze=True)]
    frozen = freeze_parameters(model, groups_cfg)
    assert frozen and all(n.startswith("text.") and not n.startswith("text.blocks.0.") for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("text.blocks.0."))
    groups = build_param_groups(model, OptimConfig(groups=groups_cfg))
    first = [g for g in groups if g["name"].startswith("optim.groups[0]")]
    assert first and all(g["lr_scale"] == 0.5 for g in first)


def test_group_patterns_that_match_nothing_are_errors_that_show_the_names():
    model = tiny_clip()
    with pytest.raises(RecipeError, match=r"optim.groups\[0\].match 'txt.\*' matches no parameter") as e:
        build_param_groups(model, OptimConfig(groups=[ParamGroupConfig(match="txt.*")]))
    assert "e.g. logit_scale, visual.class_token, text.pos_embed" in str(e.value)  # one name per top-level part
    with pytest.raises(RecipeError, match=r"Did you mean 'text.\*'"):
        freeze_parameters(model, [ParamGroupConfig(match="text", freeze=True)])
    with pytest.raises(RecipeError, match=r"optim.groups\[1\] \(text.blocks.\*\) gets no parameter.*earlier group"):
        build_param_groups(model, OptimConfig(groups=[ParamGroupConfig(match="text.*"),
                                                      ParamGroupConfig(match="text.blocks.*")]))
    with pytest.raises(RecipeError, match="freezes every parameter"):
        build_param_groups(tiny_clip(), OptimConfig(groups=[ParamGroupConfig(match="*", freeze=True)]))


def test_group_config_values_are_checked_with_the_key_in_the_message():
    with pytest.raises(RecipeError, match="freeze = true, so its lr/lr_scale/weight_decay would never apply"):
        validate_recipe({"optim": {"groups": [{"match": "text.*", "freeze": True, "lr_scale": 0.1}]}})
    with pytest.raises(RecipeError, match=r"optim.groups.0.lr_scale"):
        validate_recipe({"optim": {"groups": [{"match": "text.*", "lr_scale": -1}]}})
    with pytest.raises(RecipeError, match=r"unknown key 'optim.groups.0.lr_scal'"):
        validate_recipe({"optim": {"groups": [{"match": "text.*", "lr_scal": 0.1}]}})


def test_groups_and_init_from_table_read_from_toml_and_round_trip(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(
        'base = "tiny-shapes"\n'
        '[model.init_from]\npath = "runs/a"\ninclude = ["visual.*"]\nmap = {"old.prefix." = "visual."}\n'
        '[optim]\ngroups = [{match = "text.*", lr_scale = 0.1, weight_decay = 0.0}, {match = ["logit_*"], freeze = true}]\n'
    )
    recipe = load_recipe(str(path))
    assert recipe.model.init_from.map == {"old.prefix.": "visual."}
    assert recipe.optim.groups[0].weight_decay == 0.0 and recipe.optim.groups[1].freeze
    again = validate_recipe(tomllib.loads(recipe_to_toml(recipe)))  # dotted map keys survive the resolved TOML
    assert again == recipe
    assert load_recipe(str(path), ["model.init_from=ckpt/"]).model.init_from == "ckpt/"


# ----------------------------------------------------------------------------- warm start
@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    make_tiny_checkpoint(run / "checkpoints", seed=3)
    return run


def test_init_from_a_checkpoint_a_latest_link_or_a_run_dir_loads_every_tensor(ckpt_dir):
    saved = load_file(str(ckpt_dir / "checkpoints" / "latest" / "model.safetensors"))
    for path in (ckpt_dir, ckpt_dir / "checkpoints" / "latest", ckpt_dir / "checkpoints" / "step_0000001"):
        model = tiny_clip(seed=0)
        report = load_init_from(model, str(path))
        assert report.kind == "clipforge checkpoint" and report.source.endswith("step_0000001")
        assert report.left_at_init == [] and report.skipped == []
        assert sorted(report.loaded) == sorted(saved)
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
        assert "loaded" in report.summary() and "left at init" not in report.summary()


def test_init_from_include_exclude_map_load_partially_and_report(ckpt_dir, tmp_path):
    latest = ckpt_dir / "checkpoints" / "latest"
    saved = load_file(str(latest / "model.safetensors"))
    model = tiny_clip(seed=0)
    fresh = snapshot(model)
    report = load_init_from(model, {"path": str(latest), "include": ["visual.*"], "exclude": ["visual.ln_post.*"]})
    for name, value in model.state_dict().items():
        expected = saved[name] if name.startswith("visual.") and not name.startswith("visual.ln_post.") else fresh[name]
        assert torch.equal(value, expected), name
    assert all(n.startswith("visual.") for n in report.loaded)
    assert "visual.ln_post.weight" in report.left_at_init and "logit_scale" in report.left_at_init
    assert ("visual.ln_post.weight", "excluded (matches exclude)") in report.skipped
    assert ("text.token_embed.weight", "excluded (matches no include pattern)") in report.skipped
    text = report.summary()
    assert "skipped" in text and "excluded" in text and "left at init" in text and "text.* (" in text

    # an older naming, renamed by map; a key the model does not have is skipped and reported
    renamed = {("image_tower." + k[len("visual."):] if k.startswith("visual.") else k): v for k, v in saved.items()}
    renamed["extra.head.weight"] = torch.zeros(2, 2)
    save_file(renamed, str(tmp_path / "old.safetensors"))
    model = tiny_clip(seed=0)
    report = load_init_from(model, {"path": str(tmp_path / "old.safetensors"), "map": {"image_tower.": "visual."}})
    assert report.kind == "state dict" and report.left_at_init == []
    assert ("extra.head.weight", "not in model") in report.skipped
    assert torch.equal(model.visual.patch_embed.weight, saved["visual.patch_embed.weight"])


def test_init_from_shape_mismatch_names_the_key_and_both_shapes_or_skips_when_not_strict(tmp_path):
    other = make_tiny_checkpoint(tmp_path / "wide", embed_dim=8)
    with pytest.raises(InitFromError, match=r"image_projection.weight: checkpoint \(8, 32\) vs model \(16, 32\)"):
        load_init_from(tiny_clip(), str(other))
    model = tiny_clip()
    report = load_init_from(model, {"path": str(other), "strict_shapes": False})
    skipped = dict(report.skipped)
    assert skipped["text_projection.weight"] == "shape mismatch: checkpoint (8, 32) vs model (16, 32)"
    assert set(report.left_at_init) == {"image_projection.weight", "text_projection.weight"}
    assert "visual.patch_embed.weight" in report.loaded
    assert "shape mismatch" in report.summary()


def test_init_from_errors_say_what_is_wrong(ckpt_dir, tmp_path):
    model = tiny_clip()
    with pytest.raises(InitFromError, match=r"model.init_from: .*nope does not exist"):
        load_init_from(model, str(tmp_path / "nope"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    with pytest.raises(InitFromError, match=r"is a directory but not a clipforge checkpoint .*readme.txt"):
        load_init_from(model, str(tmp_path / "notes"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(InitFromError, match="not a complete checkpoint: model.safetensors is missing"):
        load_init_from(model, str(tmp_path / "half"))
    (tmp_path / "emptyrun" / "checkpoints").mkdir(parents=True)
    with pytest.raises(InitFromError, match="run directory without a usable checkpoints/latest"):
        load_init_from(model, str(tmp_path / "emptyrun"))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(InitFromError, match="is a file but not a state dict"):
        load_init_from(model, str(tmp_path / "w.txt"))
    with pytest.raises(InitFromError, match=r"model.init_from.include 'vision.\*' matches no key"):
        load_init_from(model, {"path": str(ckpt_dir), "include": ["vision.*"]})
    with pytest.raises(InitFromError, match=r"model.init_from.map: no key of .* starts with 'old.'"):
        load_init_from(model, {"path": str(ckpt_dir), "map": {"old.": "visual."}})
    with pytest.raises(InitFromError, match="nothing to load"):
        load_init_from(model, {"path": str(ckpt_dir), "include": ["visual.*"], "exclude": ["visual.*"]})


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.environ["CLIPFORGE_TEST_PICKLE_DIR"],))


def test_init_from_never_unpickles_code(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("CLIPFORGE_TEST_PICKLE_DIR", str(marker))
    torch.save({"visual.proj": torch.zeros(2, 2), "evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(InitFromError, match="weights-only"):
        load_init_from(tiny_clip(), str(tmp_path / "evil.pt"))
    assert not marker.exists()


OPENCLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 256, "width": 32, "heads": 2, "layers": 2},
}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_init_from_openclip_weights_converts_and_gives_the_same_image_embeddings(tmp_path, suffix):
    open_clip = pytest.importorskip("open_clip")
    from clipforge.models.convert import openclip_config_to_ours

    torch.manual_seed(0)
    theirs = open_clip.model.CLIP(OPENCLIP_TINY["embed_dim"], OPENCLIP_TINY["vision_cfg"], OPENCLIP_TINY["text_cfg"]).eval()
    state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    weights = tmp_path / f"open_clip_model{suffix}"
    save_file(state, str(weights)) if suffix == ".safetensors" else torch.save({"state_dict": state}, weights)
    config = tmp_path / "open_clip_config.json"
    config.write_text(json.dumps(OPENCLIP_TINY))

    ours = CLIP(openclip_config_to_ours(OPENCLIP_TINY)).eval()
    report = load_init_from(ours, {"path": str(weights), "config": str(config)})
    assert report.kind == "OpenCLIP state dict" and report.left_at_init == []
    images = torch.randn(2, 3, 32, 32)  # float input: already normalised, same for both
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), theirs.encode_image(images, normalize=True), atol=1e-5)

    config.write_text(json.dumps({**OPENCLIP_TINY, "quick_gelu": True}))
    with pytest.raises(InitFromError, match="model.init_from: .*activation quick_gelu.*model.activation = 'gelu'"):
        load_init_from(ours, {"path": str(weights), "config": str(config)})


# ----------------------------------------------------------------------------- resume
def recipe(**sections) -> Recipe:
    raw = {"model": dict(TINY_MODEL), "data": {"tokenizer": {"vocab_size": 200}},
           "optim": {"groups": [{"match": "text.*", "lr_scale": 0.1}, {"match": "logit_*", "freeze": True}]}}
    for key, value in sections.items():
        section, _, leaf = key.partition("__")
        if leaf:
            raw.setdefault(section, {})[leaf] = value
        else:
            raw[section] = value
    return validate_recipe(raw)


def test_resume_accepts_training_knobs_with_one_warning_each():
    saved = recipe().model_dump(mode="json")
    assert check_resume_compatible(saved, recipe()) == []
    changed = recipe(
        optim={"lr": 1e-3, "groups": [{"match": "text.*", "lr_scale": 0.5, "weight_decay": 0.0},
                                      {"match": "logit_*", "freeze": True}]},
        schedule__kind="constant", train__steps=50, logging__every_steps=5, eval__every_steps=7,
        data={"num_workers": 3, "tokenizer": {"vocab_size": 200}},
        model={**TINY_MODEL, "patch_dropout": 0.5, "init_from": "runs/x"},
    )
    warnings = check_resume_compatible(saved, changed)
    text = "\n".join(warnings)
    for key in ("optim.lr", "schedule.kind", "train.steps", "logging.every_steps", "eval.every_steps",
                "data.num_workers", "optim.groups[0].lr_scale: 0.1 -> 0.5", "optim.groups[0].weight_decay: null -> 0.0",
                "model.patch_dropout", "model.init_from"):
        assert key in text, key
    constant = recipe(optim={"groups": [{"match": "text.*", "lr": 0.02}, {"match": "logit_*", "freeze": True}]})
    again = recipe(optim={"groups": [{"match": "text.*", "lr": 0.05}, {"match": "logit_*", "freeze": True}]})
    assert check_resume_compatible(constant.model_dump(mode="json"), again) == ["optim.groups[0].lr: 0.02 -> 0.05"]
    # a longer run under a decaying schedule: the warning says the lr follows the new length
    longer = check_resume_compatible(saved, recipe(train__steps=saved["train"]["steps"] * 2))
    assert len(longer) == 1 and "the cosine schedule" in longer[0] and "lr jumps" in longer[0]
    assert "lr jumps" not in text  # a constant schedule does not move


def test_resume_refuses_architecture_and_optimizer_layout_changes_naming_key_and_reason():
    saved = recipe().model_dump(mode="json")
    with pytest.raises(ResumeError, match=r"model.vision_width changed \(32 -> 64\): the model section describes"):
        check_resume_compatible(saved, recipe(model={**TINY_MODEL, "vision_width": 64}))
    with pytest.raises(ResumeError, match=r"optim.groups changed from 2 to 1 groups: the optimizer state is stored per"):
        check_resume_compatible(saved, recipe(optim={"groups": [{"match": "text.*", "lr_scale": 0.1}]}))
    with pytest.raises(ResumeError, match=r"optim.groups\[1\].freeze changed \(true -> false\): frozen parameters"):
        check_resume_compatible(saved, recipe(optim={"groups": [{"match": "text.*", "lr_scale": 0.1},
                                                                {"match": "logit_*"}]}))
    with pytest.raises(ResumeError, match=r"optim.groups\[0\].match changed \('text.\*' -> 'text.blocks.\*'\): the optimizer state"):
        check_resume_compatible(saved, recipe(optim={"groups": [{"match": "text.blocks.*", "lr_scale": 0.1},
                                                                {"match": "logit_*", "freeze": True}]}))
    with pytest.raises(ResumeError, match="has no recipe"):
        check_resume_compatible(None, recipe())


def test_resume_from_a_checkpoint_older_than_groups_and_init_from_counts_missing_keys_as_defaults():
    now = recipe(optim={})
    saved = now.model_dump(mode="json")
    del saved["optim"]["groups"], saved["model"]["init_from"]
    assert check_resume_compatible(saved, now) == []


def test_resume_refuses_changes_to_objective_terms_that_own_parameters():
    from clipforge.objectives import Term, TermConfig, register_term

    class ScaleConfig(TermConfig):
        name: str = "test_params_scale"
        dim: int = 2

    @register_term
    class ScaleTerm(Term):  # a term with a parameter of its own (like a prototype bank)
        name = "test_params_scale"
        Config = ScaleConfig

        def __init__(self, weight: float = 1.0, dim: int = 2):
            super().__init__(weight)
            self.scale = nn.Parameter(torch.ones(dim))

    terms = [{"name": "clip"}, {"name": "test_params_scale", "weight": 0.5}]
    saved = recipe(objective={"terms": terms}).model_dump(mode="json")
    warnings = check_resume_compatible(saved, recipe(objective={"terms": [{"name": "clip", "label_smoothing": 0.1},
                                                                          {"name": "test_params_scale", "weight": 0.1}]}))
    assert any(w.startswith("objective.terms") for w in warnings)  # weights and stateless terms may change
    for changed in ([{"name": "clip"}], [{"name": "test_params_scale", "weight": 0.5}, {"name": "clip"}],
                    [{"name": "clip"}, {"name": "test_params_scale", "dim": 3}]):
        with pytest.raises(ResumeError, match=r"objective.terms changed .* test_params_scale that own parameters"):
            check_resume_compatible(saved, recipe(objective={"terms": changed}))


# ----------------------------------------------------------------------------- optim.layer_decay
def _scales(model: nn.Module, optim: OptimConfig) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr_scale"] for g in build_param_groups(model, optim) for p in g["params"]}


def test_layer_decay_scales_each_towers_blocks_by_depth_and_keeps_the_heads_at_full_lr():
    model = tiny_clip(vision_layers=3, text_layers=2)
    scales = _scales(model, OptimConfig(layer_decay=0.5, layer_decay_text=0.8))
    # image tower, L = 3: embeddings d^4, block i d^(3 - i)
    for name in ("visual.patch_embed.weight", "visual.class_token", "visual.pos_embed", "visual.ln_pre.weight"):
        assert scales[name] == pytest.approx(0.5**4), name
    for i in range(3):
        assert scales[f"visual.blocks.{i}.attn.qkv.weight"] == pytest.approx(0.5 ** (3 - i))
        assert scales[f"visual.blocks.{i}.ln_2.bias"] == pytest.approx(0.5 ** (3 - i))
    # text tower, L = 2, its own decay
    assert scales["text.token_embed.weight"] == scales["text.pos_embed"] == pytest.approx(0.8**3)
    assert [scales[f"text.blocks.{i}.mlp.fc.weight"] for i in range(2)] == pytest.approx([0.8**2, 0.8])
    for name in ("visual.ln_post.weight", "text.ln_final.bias", "image_projection.weight", "logit_scale"):
        assert scales[name] == 1.0, name
    # a recipe group's lr_scale multiplies; the schedule's lr reaches every group scaled
    scaled = _scales(model, OptimConfig(layer_decay=0.5, groups=[ParamGroupConfig(match="text.*", lr_scale=0.1)]))
    assert scaled["text.blocks.1.mlp.fc.weight"] == pytest.approx(0.05)
    assert scaled["visual.blocks.2.mlp.fc.weight"] == pytest.approx(0.5)
    optimizer = torch.optim.AdamW(build_param_groups(model, OptimConfig(layer_decay=0.5)), lr=1.0)
    set_group_lrs(optimizer, 1e-3)
    assert sorted({round(g["lr"] / 1e-3, 6) for g in optimizer.param_groups}) == [0.0625, 0.125, 0.25, 0.5, 1.0]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert _scales(model, OptimConfig()) == dict.fromkeys(scales, 1.0)  # off: every scale 1


def test_the_layer_decay_layout_does_not_depend_on_its_value_so_a_resume_may_change_it():
    model = tiny_clip(vision_layers=2, text_layers=2)
    layouts = [[(g["name"], len(g["params"])) for g in build_param_groups(model, OptimConfig(layer_decay=d,
                                                                                              layer_decay_text=t))]
               for d, t in ((0.5, None), (0.9, 0.9), (0.7, 0.3), (1.0, None))]
    assert all(layout == layouts[0] for layout in layouts)
    with pytest.raises(RecipeError, match="set optim.layer_decay too"):
        validate_recipe({"optim": {"layer_decay_text": 0.5}})


def test_layer_decay_from_the_cli_resumes_with_a_new_value_and_refuses_switching_it_off(tmp_path, capsys):
    from tiny_checkpoint import run_cli

    small = ["model.vision_layers=2", "model.text_layers=1", "data.tokenizer.corpus_size=300", "data.batch_size=8",
             "data.num_workers=0", "eval.at_end=false", "train.checkpoint_every_steps=2"]
    sets = [a for s in small for a in ("--set", s)]
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "tiny-shapes", "--run-dir", run, *sets, "--set", "train.steps=2",
                           "--set", "optim.layer_decay=0.7")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--run-dir", run, "--resume", "latest", "--set", "train.steps=4",
                           "--set", "optim.layer_decay=0.8")
    assert code == 0, err
    assert "optim.layer_decay" in err  # the change is applied, with the warning that lists it
    code, _, err = run_cli(capsys, "train", "--run-dir", run, "--resume", "latest", "--set", "train.steps=6",
                           "--set", "optim.layer_decay=null")
    assert code == 2
    assert "optim.layer_decay on / off changed" in err and "Traceback" not in err


def test_layer_decay_reaches_a_hugging_face_text_towers_encoder_layers():
    pytest.importorskip("transformers")
    from clipforge.train.trainer import build_step

    recipe = load_recipe("lit-minilm-shapes", ["model.text_unlocked_layers=2", "method.cache=false",
                                               "optim.layer_decay=0.9", "optim.layer_decay_text=0.5"])
    scales = _scales(build_step(recipe, torch.device("cpu"), log=False), recipe.optim)
    # MiniLM has 6 layers; the last two train: layer i gets 0.5^(6 - i)
    assert scales["model.text.hf.encoder.layer.4.attention.self.query.weight"] == pytest.approx(0.25)
    assert scales["model.text.hf.encoder.layer.5.output.dense.weight"] == pytest.approx(0.5)
    assert not any(".layer.3." in n or "embeddings" in n for n in scales)  # locked: in no group
    assert scales["model.visual.blocks.0.attn.qkv.weight"] == pytest.approx(0.9 ** recipe.model.vision_layers)
