"""TinyCLIP automatic inheritance as a method (methods/tinyclip_prune.py): the gated model, pruning
to an ordinary checkpoint with equal outputs, the sparsity target, and exact resume."""

from __future__ import annotations

import pytest
import torch

from clipforge.config import load_recipe
from clipforge.methods.tinyclip_prune import masked_layer_norm, pruned_model, tower_gates
from clipforge.train import checkpoint as ckpt
from clipforge.train.trainer import build_step
from tiny_checkpoint import TINY_RUN_TOML, perturb_biases_, run_cli, train_straight_and_resumed

MODEL = ["model.image_size=32", "model.patch_size=8", "model.vision_width=32", "model.vision_heads=8",
         "model.vision_layers=4", "model.text_width=32", "model.text_heads=8", "model.text_layers=3",
         "model.embed_dim=16", "model.context_length=12", "model.vocab_size=64", "data.tokenizer.vocab_size=64"]


def _step(seed: int = 0):
    recipe = load_recipe("tiny-shapes", MODEL + ["method.name=tinyclip_prune", "method.granularity=groups"])
    torch.manual_seed(seed)
    step = build_step(recipe, torch.device("cpu"), log=False)
    perturb_biases_(step.model)  # non-trivial biases and LayerNorms, so a folding mistake shows
    return step


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    ids = torch.randint(1, 64, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return images, ids, mask


def test_masked_layer_norm_over_the_kept_dims_is_a_layer_norm_of_those_dims():
    ln = torch.nn.LayerNorm(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5), ln.bias.uniform_(-0.5, 0.5)
    keep = torch.tensor([1, 0, 1, 1, 0, 1])
    x = torch.randn(2, 6) * keep
    small = torch.nn.LayerNorm(4)
    small.load_state_dict({"weight": ln.weight[keep.bool()], "bias": ln.bias[keep.bool()]})
    out = masked_layer_norm(x, ln, keep)
    torch.testing.assert_close(out[:, keep.bool()], small(x[:, keep.bool()]))
    assert (out[:, ~keep.bool()] == 0).all()


def test_masked_layer_norm_with_every_dim_closed_gives_zeros_not_nan():
    ln = torch.nn.LayerNorm(6)
    x = torch.randn(2, 3, 6, requires_grad=True)
    out = masked_layer_norm(x, ln, torch.zeros(6, dtype=torch.bool))
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(x.grad).all()


def test_pruned_model_is_smaller_and_computes_what_the_gated_model_computes():
    step = _step()
    with torch.no_grad():  # deterministic gates: closed (-5), open (5) and in between (0: z = 0.5)
        # (as many closed as expected: round(sum P(z > 0)) open, here 5/8, 3/4, 5/8, 2/3)
        step.gates["visual_width"].log_alpha.copy_(torch.tensor([5.0, -5, 0, 5, -5, 5, 0.5, -5]))
        step.gates["visual_layers"].log_alpha.copy_(torch.tensor([5.0, -5, 0.3, 5]))
        step.gates["text_width"].log_alpha.copy_(torch.tensor([-5.0, 5, 5, 0, -5, -5, 5, 1]))
        step.gates["text_layers"].log_alpha.copy_(torch.tensor([0.2, 5, -5]))
    step.eval()
    z = step.gate_values()
    assert z["visual_width"][1] == 0 and z["visual_width"][0] > 0.99 and 0 < z["visual_width"][2] < 0.9
    small = pruned_model(step.model, step.tower_gates(z)).eval()
    c = small.cfg
    assert (c.vision_width, c.vision_heads, c.vision_layers) == (20, 5, 3)  # 5 of 8 groups of 4 dims, 3 of 4 blocks
    assert (c.text_width, c.text_heads, c.text_layers) == (20, 5, 2)
    assert small.num_params() < step.model.num_params()
    with torch.no_grad():
        gated, pruned = step.model(*_inputs()), small(*_inputs())
    for key in ("image_embeds", "text_embeds"):
        torch.testing.assert_close(pruned[key], gated[key], rtol=0, atol=1e-5)
    # the gates do act: the gated model differs from the ungated one
    with torch.no_grad():
        for g in step.gates.values():
            g.log_alpha.fill_(5.0)
        open_all = step.model(*_inputs())
    assert not torch.allclose(open_all["image_embeds"], gated["image_embeds"], atol=1e-3)


def test_the_lagrangian_drives_the_pruned_size_to_the_target():
    step = _step(seed=3)
    with torch.no_grad():  # break the symmetry between gates (the task loss does, in training)
        for g in step.gates.values():
            g.log_alpha.add_(torch.randn_like(g.log_alpha))
    params = [*step.gates.parameters(), *step.lagrangian.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    target = 0.5
    for _ in range(400):
        opt.zero_grad()
        step.lagrangian(step.expected_sparsity(), target).backward()
        opt.step()
    assert abs(float(step.expected_sparsity().detach()) - target) < 0.05
    step.eval()
    small = pruned_model(step.model, step.tower_gates())

    def block_params(m):
        return sum(p.numel() for n, p in m.named_parameters() if ".blocks." in n and p.ndim == 2)
    realised = 1 - block_params(small) / block_params(step.model)
    assert abs(realised - target) < 0.1, realised


def test_gates_and_multipliers_train_at_tinyclips_constant_lr_without_weight_decay():
    """TinyCLIP's L0 optimiser: gates at lr 0.02, multipliers at |lr| 0.02, no weight decay, unscheduled; a
    recipe's own optim.groups entry for them wins."""
    from clipforge.train.params import build_param_groups, set_group_lrs

    step = _step()
    groups = {g["name"]: g for g in build_param_groups(step, load_recipe("tiny-shapes", MODEL).optim)}
    gates, lagrangian = groups["method default gates.* (no decay)"], groups["method default lagrangian.* (no decay)"]
    assert {id(p) for p in gates["params"]} == {id(p) for p in step.gates.parameters()}
    assert {id(p) for p in lagrangian["params"]} == {id(p) for p in step.lagrangian.parameters()}
    optimizer = torch.optim.AdamW(list(groups.values()), lr=1e-3)
    set_group_lrs(optimizer, 5e-4)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["method default gates.* (no decay)"] == lrs["method default lagrangian.* (no decay)"] == 0.02
    assert lrs["default"] == 5e-4
    recipe = load_recipe("tiny-shapes", MODEL + ["method.name=tinyclip_prune", "method.gate_lr=0.1"])
    torch.manual_seed(0)
    step = build_step(recipe, torch.device("cpu"), log=False)
    assert {g["name"]: g["fixed_lr"] for g in build_param_groups(step, recipe.optim)}[
        "method default gates.* (no decay)"] == 0.1


PRUNE_TOML = """
base = "tiny-shapes"
name = "tiny-prune"
[model]
image_size = 32
patch_size = 8
vision_width = 32
vision_heads = 4
vision_layers = 2
text_width = 32
text_heads = 4
text_layers = 2
embed_dim = 16
context_length = 16
[method]
name = "tinyclip_prune"
granularity = "groups"
target_sparsity = 0.4
warmup_steps = 2
""" + TINY_RUN_TOML


def test_trains_from_a_recipe_resumes_exactly_and_prunes_to_an_ordinary_checkpoint(tmp_path, capsys):
    import shutil

    from clipforge.api import load
    from clipforge.methods.tinyclip_prune import prune_checkpoint

    (tmp_path / "r.toml").write_text(PRUNE_TOML)
    a, b = train_straight_and_resumed(capsys, tmp_path / "r.toml", tmp_path)
    assert a["step"] == b["step"] == 4
    for key in ("loss", "prune/expected_sparsity", "prune/lambda_1"):
        assert a[key] == b[key], key
    # warmed up; lambda rose (ascent) at its own lr 0.02, not the model's 5e-4 schedule
    assert a["prune/target"] == 0.4 and a["prune/lambda_1"] > 0.01
    shutil.rmtree(tmp_path / "half")
    out = prune_checkpoint(tmp_path / "full" / "checkpoints" / "latest", tmp_path / "pruned")
    model, _, tokenizer = load(out)  # an ordinary checkpoint
    ids, mask = tokenizer(["a red circle"])
    assert model.encode_text(ids, mask).shape == (1, 16)
    # the same from the CLI, on the run directory, to the target size
    code, out_text, err = run_cli(capsys, "prune", tmp_path / "full", tmp_path / "cli", "--size", "target")
    assert code == 0, err
    source = ckpt.read_config(tmp_path / "cli")["source"]
    assert source["prune_size"] == "target" and source["realised_sparsity"] >= 0.4
    printed = out_text + err
    assert f"block-weight sparsity {source['realised_sparsity']}" in printed and "vision " in printed
    code, _, err = run_cli(capsys, "prune", tmp_path / "full", tmp_path / "cli2", "--size", "exact")
    assert code == 2 and "use expected or target" in err
    code, _, err = run_cli(capsys, "prune", tmp_path / "pruned", tmp_path / "cli3")  # not a tinyclip_prune run
    assert code == 2 and "tinyclip_prune" in err and not (tmp_path / "cli3").exists()
    from safetensors.torch import save_file

    save_file({"queue": torch.zeros(2)}, str(tmp_path / "pruned" / "method.safetensors"))  # another method's state
    code, _, err = run_cli(capsys, "prune", tmp_path / "pruned", tmp_path / "cli3")
    assert code == 2 and "not a tinyclip_prune checkpoint" in err and not (tmp_path / "cli3").exists()
    code, _, err = run_cli(capsys, "prune", tmp_path / "full", tmp_path / "cli")  # never over a checkpoint
    assert code == 2 and "cli" in err


def test_resuming_with_other_optimizer_groups_than_the_checkpoints_is_refused_clearly(tmp_path, capsys, monkeypatch):
    """A checkpoint written before the method's default groups existed: a clipforge error naming both layouts,
    not torch's bare "different number of parameter groups"."""
    from clipforge.methods.tinyclip_prune import TinyclipPruneStep

    (tmp_path / "r.toml").write_text(PRUNE_TOML)
    with monkeypatch.context() as m:
        m.setattr(TinyclipPruneStep, "default_param_groups", lambda self: [])
        code, _, err = run_cli(capsys, "train", tmp_path / "r.toml", "--run-dir", tmp_path / "old", "--set",
                               "train.steps=2")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--run-dir", tmp_path / "old", "--resume", "latest", "--set",
                           "train.steps=4")
    assert code == 2
    assert "optimizer state has 2 parameter groups (default, default (no decay)) but this run makes 4" in err
    assert "method's own default groups" in err



# ----------------------------------------------------------------------------- granularity = "cofi"
def _cofi_step(extra: list[str] | None = None, seed: int = 0):
    recipe = load_recipe("tiny-shapes", MODEL + ["method.name=tinyclip_prune", "method.granularity=cofi",
                                                 *(extra or [])])
    torch.manual_seed(seed)
    step = build_step(recipe, torch.device("cpu"), log=False)
    perturb_biases_(step.model)
    return step


def _set_cofi_gates(step, seed: int) -> None:
    """Random deterministic gates: a mix of closed (-6), open (6) and soft (0.5) values in every set."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in step.gates.values():
            choice = torch.randint(0, 3, gate.log_alpha.shape, generator=g)
            gate.log_alpha.copy_(torch.tensor([-6.0, 6.0, 0.5])[choice])


def _block_weights(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".blocks." in n and p.ndim == 2)


def test_cofi_gates_heads_units_and_hidden_dims_per_layer_and_sublayers_apart():
    step = _cofi_step()
    sizes = {k: g.log_alpha.numel() for k, g in step.gates.items()}
    # vision 4 layers x 8 heads, 4 x 128 units, 32 dims; text 3 layers
    assert sizes == {"visual_hidden": 32, "visual_heads": 32, "visual_units": 512, "visual_mha": 4, "visual_ffn": 4,
                     "text_hidden": 32, "text_heads": 24, "text_units": 384, "text_mha": 3, "text_ffn": 3}
    with torch.no_grad():  # +-12: P(z > 0) within 1e-4 of 1 / 0, so CoFi's count of closed gates is exact
        for gate in step.gates.values():
            gate.log_alpha.fill_(12.0)
        step.gates["visual_mha"].log_alpha[1] = -12.0  # layer 1: no attention
        step.gates["visual_ffn"].log_alpha[2] = -12.0  # layer 2: no MLP
        step.gates["text_mha"].log_alpha[0] = step.gates["text_ffn"].log_alpha[0] = -12.0  # text layer 0: gone
        step.gates["visual_heads"].log_alpha[[0, 9, 10, 31]] = -12.0  # heads 0 of layer 0, 1-2 of layer 1, 7 of 3
        step.gates["visual_units"].log_alpha[130:200] = -12.0  # 70 units of layer 1
        step.gates["visual_hidden"].log_alpha[[3, 17]] = -12.0
    step.eval()
    small = pruned_model(step.model, step.tower_gates()).eval()
    c = small.cfg
    assert c.vision_width == 30 and c.vision_head_dim == 4
    assert c.vision_layer_heads == [7, 0, 8, 7] and c.vision_layer_mlp == [128, 58, 0, 128]
    assert c.text_layers == 2 and c.text_layer_heads is None and c.text_width == 32  # uniform again: plain
    with torch.no_grad():
        gated, pruned = step.model(*_inputs()), small(*_inputs())
    for key in ("image_embeds", "text_embeds"):
        torch.testing.assert_close(pruned[key], gated[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_cofi_pruned_model_computes_the_gated_model_and_prunes_again(seed):
    """Random gates: the pruned model equals the gated one; a second cofi stage on that per-layer model
    (as `clipforge distill --granularity cofi` does) gates and prunes it again, still equal."""
    step = _cofi_step(seed=seed)
    _set_cofi_gates(step, seed)
    step.eval()
    small = pruned_model(step.model, step.tower_gates()).eval()
    with torch.no_grad():
        gated, pruned = step.model(*_inputs()), small(*_inputs())
    for key in ("image_embeds", "text_embeds"):
        torch.testing.assert_close(pruned[key], gated[key], rtol=0, atol=1e-5)
    assert not small.cfg.uniform_layers() and _block_weights(small) < _block_weights(step.model)

    recipe = load_recipe("tiny-shapes", ["method.name=tinyclip_prune", "method.granularity=cofi",
                                         "data.tokenizer.vocab_size=64"])
    recipe = recipe.model_copy(update={"model": small.cfg})
    again = build_step(recipe, torch.device("cpu"), log=False)
    again.model.load_state_dict(small.state_dict())
    _set_cofi_gates(again, seed + 10)
    again.eval()
    smaller = pruned_model(again.model, again.tower_gates()).eval()
    with torch.no_grad():
        gated, pruned = again.model(*_inputs()), smaller(*_inputs())
    for key in ("image_embeds", "text_embeds"):
        torch.testing.assert_close(pruned[key], gated[key], rtol=0, atol=1e-5)


def test_cofi_expected_sparsity_is_the_share_of_block_weights_pruned_when_gates_are_decided():
    step = _cofi_step(seed=2)
    _set_cofi_gates(step, 5)
    with torch.no_grad():  # P(z > 0) of -6 / 6 is ~0 / ~1; soft gates 0.5 -> open
        for gate in step.gates.values():
            gate.log_alpha.copy_(torch.where(gate.log_alpha > 0, 12.0, -12.0))
    step.eval()
    small = pruned_model(step.model, step.tower_gates())
    realised = 1 - _block_weights(small) / _block_weights(step.model)
    sparsity = float(step.expected_sparsity().detach())
    assert abs(sparsity - realised) < 1e-3, (sparsity, realised)


def test_cofi_lagrangian_drives_the_pruned_size_to_the_target():
    step = _cofi_step(seed=3)
    with torch.no_grad():
        for g in step.gates.values():
            g.log_alpha.add_(torch.randn_like(g.log_alpha))
    opt = torch.optim.Adam([*step.gates.parameters(), *step.lagrangian.parameters()], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        step.lagrangian(step.expected_sparsity(), 0.5).backward()
        opt.step()
    assert abs(float(step.expected_sparsity().detach()) - 0.5) < 0.05
    step.eval()
    realised = 1 - _block_weights(pruned_model(step.model, step.tower_gates())) / _block_weights(step.model)
    assert abs(realised - 0.5) < 0.1, realised


def test_groups_granularity_on_a_per_layer_model_is_refused_with_the_fix():
    shaped = ["model.vision_head_dim=4", "model.vision_layer_heads=[8, 2, 8, 8]"]
    with pytest.raises(ValueError, match="set method.granularity = 'cofi'"):
        load_recipe("tiny-shapes", MODEL + shaped + ["method.name=tinyclip_prune", "method.granularity=groups"])
    load_recipe("tiny-shapes", MODEL + shaped + ["method.name=tinyclip_prune", "method.granularity=cofi"])


def test_a_cofi_run_trains_resumes_and_prunes_to_a_per_layer_checkpoint(tmp_path, capsys):
    from clipforge.api import load
    from clipforge.methods.tinyclip_prune import prune_checkpoint

    (tmp_path / "r.toml").write_text(PRUNE_TOML.replace('granularity = "groups"', 'granularity = "cofi"'))
    a, b = train_straight_and_resumed(capsys, tmp_path / "r.toml", tmp_path)
    for key in ("loss", "prune/expected_sparsity", "prune/lambda_1"):
        assert a[key] == b[key], key
    with torch.no_grad():  # decide the gates so that the pruned model differs from the teacher shape
        from safetensors.torch import load_file, save_file
        path = tmp_path / "full" / "checkpoints" / "latest" / "method.safetensors"
        state = load_file(str(path))
        state["gates.visual_heads.log_alpha"][:3] = -6.0  # three heads of layer 0
        state["gates.visual_ffn.log_alpha"][1] = -6.0  # layer 1's MLP
        save_file(state, str(path))
    out = prune_checkpoint(tmp_path / "full" / "checkpoints" / "latest", tmp_path / "pruned")
    model, _, tokenizer = load(out)
    assert model.cfg.vision_layer_heads[0] == 1 and model.cfg.vision_layer_mlp[1] == 0
    ids, mask = tokenizer(["a red circle"])
    assert model.encode_text(ids, mask).shape == (1, 16)
    # the run's default size is CoFi's ("expected"): 4 steps leave the gates far from the 0.4 target
    source = ckpt.read_config(out)["source"]
    assert source["prune_size"] == "expected" and source["realised_sparsity"] < 0.4
    # size="target" prunes on to the run's target_sparsity; what it records is what the checkpoint holds
    out = prune_checkpoint(tmp_path / "full" / "checkpoints" / "latest", tmp_path / "to_target", size="target")
    source = ckpt.read_config(out)["source"]
    assert source["prune_size"] == "target" and source["realised_sparsity"] >= 0.4
    teacher, _, _ = load(tmp_path / "full" / "checkpoints" / "latest")
    assert abs(1 - _block_weights(load(out)[0]) / _block_weights(teacher) - source["realised_sparsity"]) < 1e-3
    with pytest.raises(ValueError, match="'expected' or 'target'"):
        prune_checkpoint(tmp_path / "full" / "checkpoints" / "latest", tmp_path / "x", size="exact")


@pytest.mark.parametrize("granularity", ["cofi", "groups"])
def test_pruning_to_the_target_closes_the_least_likely_open_gates_until_the_sparsity_is_reached(granularity):
    from clipforge.methods.tinyclip_prune import close_to_target, realised_sparsity

    step = _cofi_step(seed=5) if granularity == "cofi" else _step(seed=5)
    with torch.no_grad():
        for g in step.gates.values():
            g.log_alpha.add_(2 * torch.randn_like(g.log_alpha))
    cfg, values = step.model.cfg, step.gate_values()
    probs = {k: g.prob_nonzero().detach() for k, g in step.gates.items()}
    start = realised_sparsity(cfg, values)
    target = min(start + 0.2, 0.9)
    fitted = close_to_target(cfg, values, probs, target)
    assert realised_sparsity(cfg, fitted) >= target
    newly = [(k, i) for k in values for i in range(len(values[k])) if values[k][i] > 0 and fitted[k][i] == 0]
    still = [(k, i) for k in values for i in range(len(values[k])) if fitted[k][i] > 0]
    assert newly
    for k in values:  # CoFi's closed gates stay closed, open ones keep their value, one per set stays open
        assert torch.all(fitted[k][values[k] == 0] == 0)
        assert torch.equal(fitted[k][fitted[k] > 0], values[k][fitted[k] > 0])
        assert int((fitted[k] > 0).sum()) >= 1
    # least likely open first: every newly closed gate was at most as likely open as any gate left open
    # (except a set's last open gate, which is never closed)
    last = {k for k in fitted if int((fitted[k] > 0).sum()) == 1}
    assert max(float(probs[k][i]) for k, i in newly) <= min(float(probs[k][i]) for k, i in still if k not in last)
    # no more than needed: the last gate closed, reopened, leaves the sparsity below the target
    k, i = max(newly, key=lambda ki: float(probs[ki[0]][ki[1]]))
    reopened = {n: v.clone() for n, v in fitted.items()}
    reopened[k][i] = values[k][i]
    assert realised_sparsity(cfg, reopened) < target
    # the pruned model holds exactly the realised share of block weights
    step.eval()
    small = pruned_model(step.model, {t: tower_gates(cfg, fitted, t) for t in ("visual", "text")})
    assert abs(1 - _block_weights(small) / _block_weights(step.model) - realised_sparsity(cfg, fitted)) < 1e-3
    # a target already reached changes nothing
    assert all(torch.equal(close_to_target(cfg, values, probs, start)[k], values[k]) for k in values)


def test_resuming_a_groups_run_under_the_cofi_default_names_the_setting(tmp_path, capsys):
    """Runs written before granularity existed have no method.granularity in their recipe: resuming one now
    (default cofi) must say which setting brings its gates back, not only that the state differs."""
    (tmp_path / "r.toml").write_text(PRUNE_TOML)
    code, _, err = run_cli(capsys, "train", tmp_path / "r.toml", "--run-dir", tmp_path / "old", "--set",
                           "train.steps=2")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--run-dir", tmp_path / "old", "--resume", "latest", "--set",
                           "train.steps=4", "--set", "method.granularity=cofi")
    assert code == 2 and "resume with --set method.granularity=groups" in err, err
