"""Parameters as data: weight-decay exemptions, recipe parameter groups, freezing, warm starts,
and which recipe changes a resumed run can take.

Everything here is a plain function of an ``nn.Module`` and the recipe; the trainer calls them in
this order::

    warnings = check_resume_compatible(saved_config["recipe"], recipe)  # resume: before building anything
    report = load_init_from(clip_model, recipe.model.init_from)  # fresh runs only; print(report.summary())
    freeze_parameters(step, recipe.optim.groups)   # before the DDP/FSDP wrap: they see trainable params only
    groups = build_param_groups(step, recipe.optim)  # torch param groups with "lr_scale" and "name"
    optimizer = torch.optim.AdamW(groups, lr=..., betas=..., eps=...)
    apply_group_settings(optimizer, groups, recipe.optim)  # resume: after optimizer.load_state_dict
    set_group_lrs(optimizer, lr)                   # every step: lr * lr_scale per group

Parameter names are the model's own (``visual.blocks.0.attn.qkv.weight``, ``text.token_embed.weight``,
``logit_scale``); a DDP or ``torch.compile`` wrapper is looked through. Given the trainer's step
module (``clipforge.train.step.TrainStep``, which holds the model as ``.model``), the model's
parameters keep those names and the rest keep their path in the step (``objective.terms.1.*``).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from clipforge.config import InitFromConfig, OptimConfig, ParamGroupConfig, Recipe, RecipeError

# model keys that may change on resume: they change how the network is trained, not its parameters
RESUMABLE_MODEL_KEYS = frozenset({"patch_dropout", "token_selection", "attentive_block", "init_from"})

# suffixes of files read as a bare (OpenCLIP or clipforge-named) state dict
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class InitFromError(RecipeError):
    """``model.init_from`` cannot be applied; the message names the path or key and what to do."""


class ResumeError(RecipeError):
    """The recipe changed in a way the checkpoint cannot resume under; the message names the key and why."""


# ----------------------------------------------------------------------------- weight decay
def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Names of the parameters trained without weight decay.

    The default rule: rank < 2 (biases, norm gains, class/position vectors of rank 1, the logit
    scale/bias) and names containing ``logit_``. On top, any submodule may define
    ``no_weight_decay()`` returning names relative to itself: a parameter name, or a submodule name
    exempting everything under it.
    """
    module = _unwrap(module)
    params = dict(_named_parameters(module))
    canonical = {id(p): name for name, p in params.items()}  # a tied parameter is optimised under its first name
    every_name = dict(_named_parameters(module, remove_duplicate=False))
    names = {name for name, p in params.items() if p.ndim < 2 or "logit_" in name}
    for prefix, sub in module.named_modules():
        declare = getattr(sub, "no_weight_decay", None)
        if not callable(declare):
            continue
        prefix = _recipe_name(module, prefix)
        for rel in declare():
            full = f"{prefix}.{rel}" if prefix else str(rel)
            if full in every_name:
                names.add(canonical[id(every_name[full])])
            else:
                # names that are neither a parameter nor a submodule are ignored: timm's towers list
                # tokens their variant may not have (e.g. 'dist_token')
                names.update(canonical[id(p)] for n, p in every_name.items() if n.startswith(full + "."))
    return names


# ----------------------------------------------------------------------------- groups
def freeze_parameters(module: nn.Module, groups_cfg: list[ParamGroupConfig]) -> list[str]:
    """Set ``requires_grad = False`` on the parameters whose first matching group has ``freeze = true``.

    Returns the frozen names. Call it before wrapping the model in DDP/FSDP: they only register
    parameters that require gradients at wrap time.
    """
    module = _unwrap(module)
    groups_cfg = list(groups_cfg)
    assignment = _assign_groups(module, groups_cfg)
    frozen = []
    for name, p in _named_parameters(module):
        index = assignment[name]
        if index is not None and groups_cfg[index].freeze:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def build_param_groups(module: nn.Module, optim_cfg: OptimConfig) -> list[dict[str, Any]]:
    """Torch optimizer param groups from ``optim.groups``, each with ``lr_scale`` and a readable ``name``.

    Every recipe group (in order), then the parameters no group matched ("default"), is split into
    a decay part and a no-decay part (``no_weight_decay_names``, weight decay 0 always); empty parts
    are left out. Frozen groups are frozen here too (see ``freeze_parameters``) and appear in no
    group, as do parameters that something else froze. With no ``optim.groups`` the layout is
    ``[decay, no decay]``, as before groups existed, so older optimizer states still load.

    The layout depends only on the model, the patterns and the freeze flags, never on the lr_scale
    or weight_decay values, so those may change on resume.
    """
    module = _unwrap(module)
    groups_cfg = list(optim_cfg.groups)
    freeze_parameters(module, groups_cfg)
    # a method's own defaults for its own parameters (e.g. TinyCLIP's gates) come after the recipe's
    # groups, so a recipe group that matches the same parameters wins
    method_groups = list(getattr(module, "default_param_groups", lambda: [])())
    recipe_count, groups_cfg = len(groups_cfg), groups_cfg + method_groups
    assignment = _assign_groups(module, groups_cfg, optional_from=recipe_count)
    no_decay = no_weight_decay_names(module)
    depths = layer_decay_scales(module, optim_cfg)  # name -> ((tower, depth), lr scale), when on
    top = ("", 0)  # everything after the towers' blocks: the full lr
    buckets: dict[tuple[int | None, bool, tuple[str, int]], list[nn.Parameter]] = {}
    for name, p in _named_parameters(module):
        if p.requires_grad:
            buckets.setdefault((assignment[name], name in no_decay, depths.get(name, (top, 1.0))[0]), []).append(p)
    # with layer decay each group splits further by (tower, depth): the layout depends on the model
    # and on whether layer decay is on, never on its value, which may change on resume
    levels = [top, *sorted({key[2] for key in buckets} - {top})]
    level_scale = {level: scale for level, scale in depths.values()} | {top: 1.0}

    out = []
    for index in [*range(len(groups_cfg)), None]:
        if index is None:
            label, lr_scale, fixed_lr, weight_decay = "default", 1.0, None, optim_cfg.weight_decay
        else:
            g = groups_cfg[index]
            where = f"optim.groups[{index}]" if index < recipe_count else "method default"
            label = f"{where} {_match_text(g.match)}"
            lr_scale, fixed_lr = g.lr_scale, g.lr
            weight_decay = optim_cfg.weight_decay if g.weight_decay is None else g.weight_decay
        for exempt in (False, True):
            for level in levels:
                params = buckets.get((index, exempt, level))
                if params:
                    name = f"{label} (no decay)" if exempt else label
                    if level != top:
                        name += f" [{level[0]} depth {level[1]}]"
                    out.append({
                        "params": params,
                        "weight_decay": 0.0 if exempt else weight_decay,
                        "lr_scale": lr_scale * level_scale[level],
                        "fixed_lr": fixed_lr,
                        "name": name,
                    })
    if not out:
        raise RecipeError(
            "no parameter is left to train: optim.groups freezes every parameter (or they were frozen "
            "already); set freeze = false on at least one group"
        )
    return out


def layer_decay_scales(module: nn.Module, optim_cfg: OptimConfig) -> dict[str, tuple[tuple[str, int], float]]:
    """``optim.layer_decay``: parameter name -> ((tower, depth), lr scale) (empty when off).

    BEiT's rule per tower of L blocks: embeddings (before the first block, depth 0) d^(L+1), block i
    (depth i + 1) d^(L-i), and what follows the last block 1 (not listed). Towers are recognised by
    their block lists: ``visual.blocks.<i>``, ``text.blocks.<i>`` and a Hugging Face tower's
    ``text.hf.encoder.layer.<i>``; the embeddings are the tower's parameters before its first block."""
    if optim_cfg.layer_decay is None:
        return {}
    decays = {"visual": optim_cfg.layer_decay,
              "text": optim_cfg.layer_decay if optim_cfg.layer_decay_text is None else optim_cfg.layer_decay_text}
    block_of = re.compile(r"^(visual|text)\.(?:blocks|hf\.encoder\.layer)\.(\d+)\.")
    named = [name for name, _ in _named_parameters(module)]
    block_index = {n: (m.group(1), int(m.group(2))) for n in named if (m := block_of.match(n))}
    layers = {tower: 1 + max((i for t, i in block_index.values() if t == tower), default=-1) for tower in decays}
    scales: dict[str, tuple[tuple[str, int], float]] = {}
    seen_block = dict.fromkeys(decays, False)
    for name in named:  # parameters in module order: a tower's embeddings come before its blocks
        tower = name.split(".", 1)[0]
        if tower not in decays or layers[tower] == 0:
            continue
        if name in block_index:
            seen_block[tower] = True
            block = block_index[name][1]
            scales[name] = ((tower, block + 1), decays[tower] ** (layers[tower] - block))
        elif not seen_block[tower]:
            scales[name] = ((tower, 0), decays[tower] ** (layers[tower] + 1))
    return scales


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr for this step, times each group's ``lr_scale`` (or the group's constant lr)."""
    for group in optimizer.param_groups:
        fixed = group.get("fixed_lr")
        group["lr"] = fixed if fixed is not None else lr * group.get("lr_scale", 1.0)


def check_saved_group_layout(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Before ``optimizer.load_state_dict(saved)``: the saved state must have the run's number of groups."""
    names = [g.get("name", "?") for g in saved.get("param_groups", [])]
    if names and len(names) != len(optimizer.param_groups):
        now = [g.get("name", "?") for g in optimizer.param_groups]
        raise ResumeError(f"its optimizer state has {len(names)} parameter groups ({', '.join(names)}) but this run "
                          f"makes {len(now)} ({', '.join(now)}): optim.groups, or the method's own default groups "
                          "(e.g. tinyclip_prune's since 2026-11-27), or optim.layer_decay on / off changed. Resume "
                          "with the code and recipe that wrote it, or start the run again (model.init_from keeps the "
                          "weights)")


def apply_group_settings(
    optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], optim_cfg: OptimConfig
) -> None:
    """Put the recipe's settings back after ``optimizer.load_state_dict``.

    Torch restores every group's hyperparameters from the saved state, so a resumed run would
    silently keep the old weight decay, lr_scale, betas and eps; ``check_resume_compatible`` has
    already refused any change to which parameters are in which group.
    """
    if len(optimizer.param_groups) != len(groups):
        raise ResumeError(
            f"the optimizer has {len(optimizer.param_groups)} parameter groups but the recipe makes {len(groups)}; "
            "optim.groups (match/freeze) must stay as they were when the checkpoint was written"
        )
    for live, fresh in zip(optimizer.param_groups, groups):
        if len(live["params"]) != len(fresh["params"]):
            raise ResumeError(
                f"parameter group {fresh['name']!r} holds {len(fresh['params'])} parameters but the checkpoint's "
                f"group {live.get('name', '?')!r} held {len(live['params'])}; "
                "keep optim.groups and the model as they were"
            )
        live["weight_decay"] = fresh["weight_decay"]
        live["lr_scale"] = fresh["lr_scale"]
        live["fixed_lr"] = fresh["fixed_lr"]
        live["name"] = fresh["name"]
        live["betas"] = tuple(optim_cfg.betas)
        live["eps"] = optim_cfg.eps


def _assign_groups(module: nn.Module, groups_cfg: list[ParamGroupConfig],
                   optional_from: int | None = None) -> dict[str, int | None]:
    """Parameter name -> index of the first group whose match fits it (None: no group).

    A pattern matching no parameter, or a group left empty because earlier groups took all its
    parameters, is an error: either is a typo or a mistake in the order. Groups from
    ``optional_from`` on (a method's defaults) may match nothing.
    """
    names = [name for name, _ in _named_parameters(module)]
    assignment: dict[str, int | None] = dict.fromkeys(names)
    for index, g in enumerate(groups_cfg):
        optional = optional_from is not None and index >= optional_from
        matched_any = False
        for pattern in _patterns(g.match):
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not hits and not optional:
                raise RecipeError(_no_match_message(f"optim.groups[{index}].match", pattern, names))
            for n in hits:
                if assignment[n] is None:
                    assignment[n] = index
                    matched_any = True
        if not matched_any and not optional:
            raise RecipeError(
                f"optim.groups[{index}] ({_match_text(g.match)}) gets no parameter: every parameter it matches "
                "is taken by an earlier group (the first matching group wins); move it before them or narrow them"
            )
    return assignment


def _patterns(match: str | list[str]) -> list[str]:
    return [match] if isinstance(match, str) else list(match)


def _match_text(match: str | list[str]) -> str:
    return "|".join(_patterns(match))


def _no_match_message(where: str, pattern: str, names: list[str], what: str = "parameter") -> str:
    hint = ""
    if not any(c in pattern for c in "*?[") and any(n.startswith(pattern) for n in names):
        hint = f" Did you mean '{pattern.rstrip('.')}.*'? (a pattern must match the whole name)"
    else:
        close = difflib.get_close_matches(pattern, names, n=1, cutoff=0.6)
        if close:
            hint = f" Closest name: '{close[0]}'."
    return (
        f"{where} {pattern!r} matches no {what}.{hint} Patterns are fnmatch globs over full names, "
        f"e.g. {', '.join(_example_names(names))}"
    )


def _example_names(names: list[str], limit: int = 6) -> list[str]:
    """A few names that show the naming: the first of each top-level part, then the next ones."""
    picked, seen = [], set()
    for n in names:
        top = n.split(".", 1)[0]
        if top not in seen:
            seen.add(top)
            picked.append(n)
    for n in names:
        if len(picked) >= limit:
            break
        if n not in picked:
            picked.append(n)
    return picked[:limit]


def _named_parameters(module: nn.Module, remove_duplicate: bool = True) -> list[tuple[str, nn.Parameter]]:
    """``named_parameters`` with the names recipes use (see ``_recipe_name``)."""
    named = [(_recipe_name(module, n), p) for n, p in module.named_parameters(remove_duplicate=remove_duplicate)]
    names = [n for n, _ in named]
    if remove_duplicate and len(set(names)) != len(names):
        clash = next(n for i, n in enumerate(names) if n in names[:i])
        raise RecipeError(f"two parameters of the training step are both called {clash!r} in recipes (one in the "
                          "model, one beside it); rename the one outside the model")
    return named


def _recipe_name(root: nn.Module, name: str) -> str:
    """A training step holds the model as ``.model``: recipes name the model's parameters as the model does."""
    if _is_step(root):
        if name == "model":
            return ""
        if name.startswith("model."):
            return name[len("model."):]
    return name


def _is_step(module: nn.Module) -> bool:
    from clipforge.train.step import TrainStep

    return isinstance(module, TrainStep)


def _unwrap(module: nn.Module) -> nn.Module:
    """The module under DDP or torch.compile, whose names the recipe's patterns are written against."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):  # torch.compile
            module = module._orig_mod
        else:
            return module


# ----------------------------------------------------------------------------- warm start
@dataclass
class InitReport:
    """What ``load_init_from`` did: names are the model's (after ``map``)."""

    source: str  # the file or checkpoint read
    kind: str  # "clipforge checkpoint" | "OpenCLIP state dict" | "state dict"
    loaded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    left_at_init: list[str] = field(default_factory=list)  # model tensors not loaded
    loaded_values: int = 0

    def summary(self) -> str:
        total = len(self.loaded) + len(self.left_at_init)
        lines = [
            f"init_from {self.source} ({self.kind}): loaded {len(self.loaded)} of {total} model tensors "
            f"({self.loaded_values / 1e6:.2f}M values)"
        ]
        if self.skipped:
            by_reason: dict[str, list[str]] = {}
            for name, reason in self.skipped:
                kind, _, detail = reason.partition(": ")
                kind = kind.split(" (")[0]
                by_reason.setdefault(kind, []).append(f"{name} {detail}" if detail else name)
            parts = [f"{len(v)} {k}: {_compact(v)}" for k, v in by_reason.items()]
            lines.append(f"  skipped {len(self.skipped)}: " + "; ".join(parts))
        if self.left_at_init:
            lines.append(f"  left at init {len(self.left_at_init)}: {_compact(self.left_at_init)}")
        return "\n".join(lines)


def load_init_from(model: nn.Module, cfg: str | InitFromConfig | dict[str, Any]) -> InitReport:
    """Copy weights from a checkpoint into ``model`` (in place), partially if asked; return what happened.

    ``cfg.path``: a clipforge checkpoint directory (``model.safetensors`` + ``config.json``; a
    ``checkpoints/latest`` link works), a run directory (its ``checkpoints/latest``), or an OpenCLIP
    ``.safetensors``/``.pt`` state dict (renamed with ``models.convert``; with ``cfg.config`` the
    OpenCLIP JSON config is checked first, refusing architectures clipforge cannot reproduce).
    Keys are renamed by ``cfg.map`` (longest matching prefix, old -> new), then filtered by
    ``cfg.include`` / ``cfg.exclude`` globs. Nothing is unpickled.
    """
    if isinstance(cfg, str):
        cfg = InitFromConfig(path=cfg)
    elif isinstance(cfg, dict):
        try:
            cfg = InitFromConfig.model_validate(cfg)
        except ValidationError as e:
            raise InitFromError(f"model.init_from: {e}") from None
    model = _unwrap(model)
    if _is_step(model):
        model = model.model
    source, kind, state = _read_init_state(cfg, getattr(model, "cfg", None))
    if cfg.inherit == "manual":
        state, kind = _inherit(source, kind, state, model)
    target = model.state_dict()

    renamed = _apply_map(state, cfg.map, source)
    names = list(renamed)
    for where, patterns in (("include", cfg.include or []), ("exclude", cfg.exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise InitFromError(_no_match_message(f"model.init_from.{where}", pattern, names, "key")
                                    + f" (keys of {source}, after map)")

    report = InitReport(source=source, kind=kind)
    selected: dict[str, torch.Tensor] = {}
    mismatched = []
    for name, (old, tensor) in renamed.items():
        origin = f" (from {old})" if old != name else ""
        if cfg.include is not None and not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
            report.skipped.append((name, "excluded (matches no include pattern)"))
        elif any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
            report.skipped.append((name, "excluded (matches exclude)"))
        elif name not in target:
            report.skipped.append((name, f"not in model{origin}"))
        elif tuple(tensor.shape) != tuple(target[name].shape):
            shapes = f"checkpoint {tuple(tensor.shape)} vs model {tuple(target[name].shape)}"
            mismatched.append(f"{name}{origin}: {shapes}")
            report.skipped.append((name, f"shape mismatch: {shapes}"))
        else:
            selected[name] = tensor
    if mismatched and cfg.strict_shapes:
        more = f" (and {len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        raise InitFromError(
            f"model.init_from: shapes differ between {source} and the model: {'; '.join(mismatched[:5])}{more}. "
            "Exclude these keys (model.init_from.exclude), or set model.init_from.strict_shapes = false "
            "to skip every mismatched tensor and report it"
        )
    if not selected:
        raise InitFromError(
            f"model.init_from: nothing to load from {source} ({_count_reasons(report.skipped)}). "
            f"Its keys look like {', '.join(_example_names(names))}; the model's like "
            f"{', '.join(_example_names(list(target)))}. Check model.init_from.map/include/exclude"
        )

    _, unexpected = model.load_state_dict(selected, strict=False)
    assert not unexpected, unexpected  # every selected key is in the model's state dict
    report.loaded = [n for n in target if n in selected]
    report.left_at_init = [n for n in target if n not in selected]
    report.loaded_values = sum(t.numel() for t in selected.values())
    return report


def _inherit(source: str, kind: str, state: dict[str, torch.Tensor], model: nn.Module):
    """TinyCLIP manual inheritance: the teacher's state cut to the model's shape (models.inherit)."""
    from clipforge.models.inherit import InheritError, inherit_state_dict
    from clipforge.train import checkpoint as ckpt

    if kind != "clipforge checkpoint":
        raise InitFromError(f"model.init_from.inherit = 'manual' needs a clipforge checkpoint (its config.json "
                            f"says the teacher's shape); {source} is a {kind}: import it first "
                            "(clipforge import openclip ... --out DIR)")
    teacher = ckpt.model_config_from(ckpt.read_config(Path(source)))
    try:
        state, maps = inherit_state_dict(state, teacher, model.cfg)
    except InheritError as e:
        raise InitFromError(f"model.init_from (inherit = 'manual' from {source}): {e}") from None
    return state, f"clipforge checkpoint, inherited: vision layers {maps['visual']}, text layers {maps['text']}"


TOKEN_EMBEDDING = "text.token_embed.weight"


def init_from_tokenizer(report: InitReport, context_length: int):
    """The tokenizer that goes with ``model.init_from``'s weights, or None.

    Token ids index the text tower's embedding rows, so once those rows come from a checkpoint the
    run must tokenize as that checkpoint did: a clipforge checkpoint's own tokenizer, CLIP's BPE for
    OpenCLIP weights. None when the token embedding was not loaded (the run trains its own)."""
    if TOKEN_EMBEDDING not in report.loaded:
        return None
    from clipforge.models.tokenizer import ClipBPETokenizer, load_tokenizer
    from clipforge.train import checkpoint as ckpt

    if report.kind.startswith("clipforge checkpoint"):
        spec = ckpt.read_config(Path(report.source))["tokenizer"]
        return load_tokenizer({**spec, "context_length": context_length}, report.source)
    if report.kind == "OpenCLIP state dict":
        return ClipBPETokenizer.from_vocab_file(None, context_length)
    raise InitFromError(
        f"model.init_from: {report.source} is a plain state dict that includes {TOKEN_EMBEDDING}, but no "
        "tokenizer goes with it. Import it as a checkpoint first (clipforge import openclip ... --out DIR) or "
        f"exclude the text tower's embedding (model.init_from.exclude = [\"{TOKEN_EMBEDDING}\"])"
    )


def _read_init_state(cfg: InitFromConfig, model_cfg=None) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(source shown in reports, kind, state dict with clipforge names)."""
    from safetensors.torch import load_file

    from clipforge.models import convert
    from clipforge.train import checkpoint as ckpt

    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise InitFromError(
            f"model.init_from: {cfg.path} does not exist. Pass a clipforge checkpoint directory, a run "
            "directory (its checkpoints/latest is used), or an OpenCLIP .safetensors/.pt file"
        )
    if path.is_file() and path.name == ckpt.WEIGHTS and (path.parent / ckpt.CONFIG).is_file():
        path = path.parent
    if path.is_dir():
        checkpoint = _checkpoint_dir(path, cfg.path)
        _check_config_json(checkpoint / ckpt.CONFIG)
        return str(checkpoint), "clipforge checkpoint", load_file(str(checkpoint / ckpt.WEIGHTS))
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise InitFromError(
            f"model.init_from: {cfg.path} is a file but not a state dict (expected {', '.join(STATE_DICT_SUFFIXES)}); "
            "pass a clipforge checkpoint directory or an OpenCLIP weights file"
        )
    try:
        if cfg.config is not None:  # refuse what our towers cannot compute (layer scale, ...)
            theirs = convert.openclip_config_to_ours(*convert.read_openclip_config(cfg.config))
            ours = getattr(model_cfg, "activation", theirs.activation)
            if theirs.activation != ours:  # loads fine, computes something else
                raise convert.ConversionError(
                    f"{cfg.config} uses the activation {theirs.activation} but model.activation = {ours!r}; "
                    f"set model.activation = \"{theirs.activation}\"")
        state = convert.read_openclip_weights(path)  # safetensors, or torch.load(weights_only=True)
    except (convert.ConversionError, FileNotFoundError) as e:
        raise InitFromError(f"model.init_from: {e}") from None
    if _looks_like_openclip(state):
        return str(path), "OpenCLIP state dict", convert.openclip_state_dict_to_ours(state)
    return str(path), "state dict", state


def _checkpoint_dir(path: Path, given: str) -> Path:
    """A checkpoint directory itself, or a run directory's ``checkpoints/latest``."""
    from clipforge.train import checkpoint as ckpt

    has = {name: (path / name).is_file() for name in (ckpt.WEIGHTS, ckpt.CONFIG)}
    if all(has.values()):
        return path.resolve()
    if any(has.values()):
        missing = next(name for name, ok in has.items() if not ok)
        raise InitFromError(f"model.init_from: {given} is not a complete checkpoint: {missing} is missing")
    runs = path / "checkpoints"
    if runs.is_dir():
        latest = runs / "latest"
        if latest.exists() and all((latest / name).is_file() for name in has):
            return latest.resolve()
        found = sorted(d.name for d in runs.glob("step_*") if d.is_dir())
        raise InitFromError(
            f"model.init_from: {given} is a run directory without a usable checkpoints/latest"
            + (f"; pass one of its checkpoints, e.g. {runs / found[-1]}" if found else " (it has no checkpoints yet)")
        )
    listing = sorted(p.name for p in path.iterdir())[:6]
    raise InitFromError(
        f"model.init_from: {given} is a directory but not a clipforge checkpoint (no {ckpt.WEIGHTS} + {ckpt.CONFIG}) "
        f"nor a run directory (no checkpoints/); it holds {listing or 'nothing'}"
    )


def _check_config_json(path: Path) -> None:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InitFromError(f"model.init_from: {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != "clipforge-checkpoint":
        raise InitFromError(f"model.init_from: {path} is not a clipforge checkpoint config (no format = "
                            "'clipforge-checkpoint'); for OpenCLIP weights pass the weights file itself")


def _looks_like_openclip(state: dict[str, torch.Tensor]) -> bool:
    """OpenCLIP names its towers' parts differently (resblocks, conv1, visual.proj, token_embedding)."""
    markers = ("visual.proj", "text_projection", "token_embedding.weight", "positional_embedding",
               "visual.conv1.weight")
    return any(k in markers or ".resblocks." in k or k.startswith("transformer.resblocks.") for k in state)


def _apply_map(
    state: dict[str, torch.Tensor], mapping: dict[str, str], source: str
) -> dict[str, tuple[str, torch.Tensor]]:
    """new name -> (original name, tensor); each key is renamed by its longest matching prefix."""
    prefixes = sorted(mapping, key=len, reverse=True)
    for old in prefixes:
        if not any(k.startswith(old) for k in state):
            raise InitFromError(
                f"model.init_from.map: no key of {source} starts with {old!r}; its keys look like "
                f"{', '.join(_example_names(list(state)))}"
            )
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        old = next((p for p in prefixes if key.startswith(p)), None)
        name = key if old is None else mapping[old] + key[len(old):]
        if name in out:
            raise InitFromError(
                f"model.init_from.map: {out[name][0]!r} and {key!r} both become {name!r}; "
                "exclude one or change the map"
            )
        out[name] = (key, tensor)
    return out


def _count_reasons(skipped: list[tuple[str, str]]) -> str:
    counts: dict[str, int] = {}
    for _, reason in skipped:
        key = reason.split(":")[0].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "it holds no tensors"


def _compact(names: list[str], limit: int = 8) -> str:
    """Up to ``limit`` names; longer lists are grouped by their first part ("text.* (20)")."""
    if len(names) <= limit:
        return ", ".join(names)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(n.split(".", 1)[0] + (".*" if "." in n else ""), []).append(n)
    parts = [members[0] if len(members) == 1 else f"{top} ({len(members)})" for top, members in groups.items()]
    return ", ".join(parts[:limit]) + (f", ... ({len(parts) - limit} more)" if len(parts) > limit else "")


# ----------------------------------------------------------------------------- resume
def check_resume_compatible(saved_recipe: dict[str, Any] | None, recipe: Recipe) -> list[str]:
    """Compare the checkpoint's recipe with the recipe a run resumes under.

    Raises ResumeError naming every change the checkpoint cannot take: the model section (except
    RESUMABLE_MODEL_KEYS), the number of ``optim.groups`` and their ``match``/``freeze`` (the
    optimizer state is stored per group, in order), objective terms that own parameters or buffers
    (their state is saved by position), ``method.name`` and the set of EMA teachers. Returns one
    warning line per other change (lr, schedule, steps, logging, eval, data, group lr_scale /
    weight_decay, term weights, ...), which the resumed run applies.
    """
    if saved_recipe is None:
        raise ResumeError("the checkpoint has no recipe (an imported model?); warm-start from it with "
                          "model.init_from instead of resuming")
    now = recipe.model_dump(mode="json")
    saved = _with_defaults(saved_recipe, _defaults_of(recipe))
    errors: list[str] = []
    warnings: list[str] = []

    special = {"optim.groups", "objective.terms", "teachers", "name", "description"}
    now_flat, saved_flat = _flatten(now), _flatten(saved)
    for key in sorted(set(now_flat) | set(saved_flat)):
        if key in special or key not in now_flat:  # a key this version no longer has cannot be set
            continue
        old, new = saved_flat.get(key), now_flat[key]
        if old == new:
            continue
        parts = key.split(".")
        change = f"{key} changed ({_show(old)} -> {_show(new)})"
        if parts[0] == "model" and parts[1] not in RESUMABLE_MODEL_KEYS:
            errors.append(
                f"{change}: the model section describes the network the checkpoint's weights belong to; only "
                f"{', '.join(f'model.{k}' for k in sorted(RESUMABLE_MODEL_KEYS))} may change on resume"
            )
        elif key == "method.name":
            errors.append(f"{change}: the training step owns the model and any extra heads, so another method "
                          "lays out the saved state differently")
        elif key == "train.steps" and now["schedule"]["kind"] != "constant":
            warnings.append(f"{key}: {_show(old)} -> {_show(new)} (the {now['schedule']['kind']} schedule, and an EMA "
                            "teacher's cosine momentum, are functions of train.steps: they now follow the new "
                            "length from this step on, so the lr jumps where a decay had begun)")
        else:
            warnings.append(f"{key}: {_show(old)} -> {_show(new)}")

    _compare_groups(saved.get("optim", {}).get("groups", []), now["optim"]["groups"], errors, warnings)
    _compare_terms(saved.get("objective", {}).get("terms", []), now["objective"]["terms"], errors, warnings)
    _compare_teachers(saved.get("teachers", []), now.get("teachers", []), errors, warnings)
    if errors:
        raise ResumeError(
            "cannot resume under this recipe:\n  " + "\n  ".join(errors)
            + "\nKeep the checkpoint's values, or start a new run that warm-starts from it with "
            "model.init_from = \"<checkpoint dir>\" (weights only, fresh optimizer)"
        )
    return warnings


def _compare_groups(saved: list[dict], now: list[dict], errors: list[str], warnings: list[str]) -> None:
    saved = [ParamGroupConfig.model_validate(g).model_dump(mode="json") for g in saved]
    now = [ParamGroupConfig.model_validate(g).model_dump(mode="json") for g in now]
    why = "the optimizer state is stored per parameter group, in order, so it would land on other parameters"
    if len(saved) != len(now):
        errors.append(f"optim.groups changed from {len(saved)} to {len(now)} groups: {why}")
        return
    for i, (old, new) in enumerate(zip(saved, now)):
        if old["match"] != new["match"]:
            errors.append(f"optim.groups[{i}].match changed ({_show(old['match'])} -> {_show(new['match'])}): {why}")
        if old["freeze"] != new["freeze"]:
            errors.append(f"optim.groups[{i}].freeze changed ({_show(old['freeze'])} -> {_show(new['freeze'])}): "
                          "frozen parameters have no optimizer state, so the saved state no longer lines up")
        for key in ("lr_scale", "lr", "weight_decay"):
            if old[key] != new[key]:
                warnings.append(f"optim.groups[{i}].{key}: {_show(old[key])} -> {_show(new[key])}")


def _compare_terms(saved: list[dict], now: list[dict], errors: list[str], warnings: list[str]) -> None:
    def stateful(terms: list[dict]) -> list[tuple[int, dict]]:
        # position matters: a term's state is saved under its index in the objective
        return [(i, {k: v for k, v in t.items() if k != "weight"}) for i, t in enumerate(terms) if _term_has_state(t)]

    old_state, new_state = stateful(saved), stateful(now)
    if old_state != new_state:
        names = sorted({t["name"] for _, t in old_state + new_state})
        errors.append(
            f"objective.terms changed ({_show([t.get('name') for t in saved])} -> "
            f"{_show([t.get('name') for t in now])}) "
            f"around term(s) {', '.join(names)} that own parameters or buffers: their saved state is keyed by the "
            "term's position and settings; only their weight may change on resume"
        )
    elif saved != now:
        warnings.append(f"objective.terms: {_show(saved)} -> {_show(now)}")


def _term_has_state(term: dict) -> bool:
    from clipforge.objectives import build_term

    try:
        return len(build_term(dict(term)).state_dict()) > 0
    except Exception:  # noqa: BLE001 - a term that no longer builds: assume it has state, to be safe
        return True


def _compare_teachers(saved: list[dict], now: list[dict], errors: list[str], warnings: list[str]) -> None:
    def ema(teachers: list[dict]) -> list[str]:
        return sorted(t.get("name", "") for t in teachers if t.get("kind") == "ema")

    if ema(saved) != ema(now):
        errors.append(f"EMA teachers changed ({_show(ema(saved))} -> {_show(ema(now))}): an EMA copy is trained "
                      "state saved in the checkpoint; adding or removing one cannot resume exactly")
    elif saved != now:
        warnings.append(f"teachers: {_show(saved)} -> {_show(now)}")


def _defaults_of(recipe: Recipe) -> dict[str, Any]:
    """Schema defaults, for keys older checkpoints do not have."""
    try:
        return type(recipe)().model_dump(mode="json")
    except Exception:  # noqa: BLE001 - a schema without a valid default: missing keys count as unchanged
        return {}


def _with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for k, v in saved.items():
        out[k] = _with_defaults(v, out[k]) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
