"""`clipforge distill`: TinyCLIP's multi-stage progressive compression of a trained model.

    clipforge distill runs/big --student width=0.5,layers=0.5 --stages 3 --run-dir runs/tiny

Stage k of S trains a student k/S of the way from the teacher's shape to ``--student``'s
(width 100% -> 83% -> 67% -> 50%, layers likewise; models.inherit.student_config rounds to whole
heads). Each stage's student inherits its weights from the stage before (the first from the
teacher) by manual inheritance (``model.init_from = {path, inherit = "manual"}``) and is distilled
from the **original** teacher with ``affinity_distill`` (plus the CLIP loss with ``--clip-weight``).

Every stage is an ordinary run directory (``RUN_DIR/stage_1``, ...) trained by the ordinary
trainer, so its checkpoints load, evaluate and export like any other. The stage recipe is the
teacher's own recipe (its data, optimiser, schedule, evaluation; or ``--recipe``) with the model,
teachers and objective replaced and ``--set`` applied on top; each run's ``recipe.toml`` holds it
and ``clipforge train --run-dir RUN_DIR/stage_k --resume latest`` continues it alone.

``RUN_DIR/distill.json`` records the plan. Running the same command again resumes: finished stages
(a checkpoint at their last step) are skipped, an interrupted one continues from its latest
checkpoint exactly as ``--resume latest`` does, later ones start. A different plan in the same
RUN_DIR is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from clipforge.config import Recipe, RecipeError, apply_override, parse_override, validate_recipe
from clipforge.models.inherit import parse_student_spec, student_config

PLAN_FILE = "distill.json"
TEACHER = "teacher"  # the [[teachers]] entry of every stage


def _teacher_dir(path: str | Path) -> Path:
    from clipforge.eval.evaluate import checkpoint_dir
    from clipforge.train import checkpoint as ckpt

    found = checkpoint_dir(path)
    if not (found / ckpt.CONFIG).is_file() or not (found / ckpt.WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} is not a clipforge checkpoint or run directory (no {ckpt.CONFIG} and "
                                f"{ckpt.WEIGHTS}); pass e.g. runs/big or runs/big/checkpoints/latest")
    return found.resolve()  # a fixed step directory: 'latest' may move on while the stages run


def _base_recipe(teacher_config: dict[str, Any], recipe: str | None) -> dict[str, Any]:
    """The recipe the stages start from: ``--recipe``, else the one the teacher was trained with."""
    if recipe is not None:
        from clipforge.config import load_recipe

        return load_recipe(recipe).model_dump(mode="json")
    if not teacher_config.get("recipe"):
        raise RecipeError("the teacher checkpoint has no training recipe (an imported model?), so there is no data "
                          "section to distil on; pass one with --recipe (e.g. --recipe tinyclip-shapes)")
    return json.loads(json.dumps(teacher_config["recipe"]))


def stage_recipe(base: dict[str, Any], model: dict[str, Any], teacher: Path, init_from: Path, stage: int,
                 stages: int, clip_weight: float, overrides: list[str], inherit: str = "manual",
                 method: dict[str, Any] | None = None, steps: int | None = None) -> Recipe:
    """One stage's recipe: ``base`` with this stage's model (inheriting from ``init_from``), the
    original teacher, affinity distillation (+ CLIP), then ``overrides`` (and ``steps``, if given)."""
    raw = json.loads(json.dumps(base))
    raw["name"] = f"{base.get('name', 'model')}-distill-{stage}of{stages}" + ("-masks" if method else "")
    raw["description"] = f"clipforge distill stage {stage} of {stages} from {teacher}"
    raw["model"] = {**model, "init_from": {"path": str(init_from), "inherit": inherit}}
    raw["teachers"] = [{"name": TEACHER, "kind": "checkpoint", "path": str(teacher)}]
    terms = [{"name": "affinity_distill", "teacher": TEACHER, "weight": 1.0 - clip_weight}]
    if clip_weight > 0:
        terms.append({"name": "clip", "weight": clip_weight})
    raw["objective"] = {**raw.get("objective", {}), "terms": terms}
    raw["method"] = method or {"name": "clip"}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
    if steps is not None:
        raw.setdefault("train", {})["steps"] = steps
    return validate_recipe(raw, f"clipforge distill stage {stage}")


def plan(teacher: str | Path, student: str, stages: int, recipe: str | None = None, clip_weight: float = 0.0,
         overrides: list[str] | None = None, prune_steps: int | None = None,
         granularity: str | None = None, prune_size: str | None = None) -> dict[str, Any]:
    """The stages as data (what distill.json holds): teacher, spec, and each stage's model config
    (manual inheritance) or each stage's sparsity target (automatic: ``sparsity=...`` in ``student``)."""
    from clipforge.train import checkpoint as ckpt

    if stages < 1:
        raise RecipeError(f"--stages must be >= 1, got {stages}")
    if not 0.0 <= clip_weight < 1.0:
        raise RecipeError(f"--clip-weight is the CLIP term's share, in [0, 1); got {clip_weight}")
    teacher_dir = _teacher_dir(teacher)
    config = ckpt.read_config(teacher_dir)
    teacher_model = ckpt.model_config_from(config)
    spec = parse_student_spec(student)
    common = {"teacher": str(teacher_dir), "student": student, "stages": stages, "clip_weight": clip_weight,
              "recipe": recipe, "overrides": list(overrides or []), "base": _base_recipe(config, recipe)}
    if "sparsity" in spec:
        if len(spec) > 1 or not prune_steps:
            raise RecipeError("--student sparsity=S (automatic inheritance) takes no other key and needs "
                              "--prune-steps N (the steps that learn which heads and layers to keep)")
        # kept share after stage k: 1 - S k / n; each stage removes its share of what the last one kept
        kept = [1 - spec["sparsity"] * k / stages for k in range(stages + 1)]
        targets = [round(1 - kept[k] / kept[k - 1], 6) for k in range(1, stages + 1)]
        granularity, prune_size = granularity or "cofi", prune_size or "expected"
        if granularity not in ("groups", "cofi"):
            raise RecipeError(f"--granularity is 'groups' or 'cofi', got {granularity!r}")
        if prune_size not in ("expected", "target"):
            raise RecipeError(f"--prune-size is 'expected' or 'target', got {prune_size!r}")
        return {**common, "models": None, "sparsity_targets": targets, "prune_steps": prune_steps,
                "granularity": granularity, "prune_size": prune_size}
    if prune_steps or granularity is not None or prune_size is not None:
        raise RecipeError("--prune-steps, --granularity and --prune-size are for automatic inheritance: "
                          "give --student sparsity=S")
    models = [student_config(teacher_model, spec, k / stages).model_dump(mode="json") for k in range(1, stages + 1)]
    return {**common, "models": models}


def _check_same_plan(run_dir: Path, new: dict[str, Any]) -> None:
    path = run_dir / PLAN_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    if old.get("models") is None:  # automatic plans written before --granularity existed pruned in groups
        old.setdefault("granularity", "groups")
        old.setdefault("prune_size", "expected")  # ... and before --prune-size, by CoFi's expected count
    for key in ("teacher", "student", "stages", "clip_weight", "recipe", "models", "prune_steps", "granularity",
                "prune_size"):
        if old.get(key) != new.get(key):
            raise RecipeError(f"{run_dir} holds a distillation with {key} = {old.get(key)!r}, not {new.get(key)!r} "
                              f"({path}); rerun the same command to resume it, or choose a new --run-dir")


def _finished(run_dir: Path, steps: int) -> bool:
    from clipforge.train import checkpoint as ckpt

    done = ckpt.complete_checkpoints(run_dir / "checkpoints")
    return bool(done) and done[-1].name >= ckpt.step_dir_name(steps)


def _train(r: Recipe, where: Path, label: str, eval_hooks, log) -> bool:
    """Train ``r`` in ``where``, or resume it there, or skip it when finished; True when finished."""
    from clipforge.train import checkpoint as ckpt
    from clipforge.train.trainer import Trainer

    if _finished(where, r.train.steps):
        log(f"{label}: done already ({where})")
        return True
    resume = "latest" if ckpt.complete_checkpoints(where / "checkpoints") else None
    log(f"{label}: {'resuming' if resume else 'training'} in {where}, from {r.model.init_from.path}")
    result = Trainer(r, where, resume=resume, eval_hooks=eval_hooks(r) if eval_hooks else None).fit()
    if result.stopped_by != "done":
        log(f"{label} stopped ({result.stopped_by}) at step {result.step}; rerun the same command to continue")
    return result.stopped_by == "done"


def model_shape(model: dict[str, Any]) -> str:
    """A model config's tower sizes in one line (per-layer heads and MLP widths where they differ)."""
    def tower(prefix: str) -> str:
        heads, units = model.get(f"{prefix}_layer_heads"), model.get(f"{prefix}_layer_mlp")
        if heads is None and units is None:
            return f"{model[prefix + '_width']}x{model[prefix + '_layers']} ({model[prefix + '_heads']} heads)"
        return f"{model[prefix + '_width']} wide, heads per layer {heads}, MLP units per layer {units}"
    return f"vision {tower('vision')}, text {tower('text')}"


def _auto_stage(the_plan: dict[str, Any], k: int, previous: Path, where: Path, eval_hooks, log) -> Path | None:
    """Automatic inheritance for stage k: learn L0 gates on the previous model for prune_steps
    (method tinyclip_prune, distilling meanwhile), then prune; returns the pruned checkpoint."""
    from clipforge.methods.tinyclip_prune import prune_checkpoint
    from clipforge.train import checkpoint as ckpt

    pruned = where / "pruned"
    if (pruned / ckpt.CONFIG).is_file():
        return pruned
    stages, steps = the_plan["stages"], the_plan["prune_steps"]
    model = ckpt.model_config_from(ckpt.read_config(_teacher_dir(previous))).model_dump(mode="json")
    method = {"name": "tinyclip_prune", "target_sparsity": the_plan["sparsity_targets"][k - 1],
              "warmup_steps": steps // 3,  # TinyCLIP: warm-up 1000 of prune_step 3000
              "granularity": the_plan.get("granularity", "groups"),
              "prune_size": the_plan.get("prune_size", "expected")}
    r = stage_recipe(the_plan["base"], model, Path(the_plan["teacher"]), previous, k, stages,
                     the_plan["clip_weight"], the_plan["overrides"], inherit="none", method=method, steps=steps)
    if not _train(r, where / "masks", f"stage {k}/{stages}: learning gates (sparsity {method['target_sparsity']:.2f})",
                  eval_hooks, log):
        return None
    prune_checkpoint(where / "masks" / "checkpoints" / "latest", pruned, size=method["prune_size"])
    return pruned


def run(teacher: str | Path, student: str, stages: int, run_dir: str | Path, recipe: str | None = None,
        clip_weight: float = 0.0, overrides: list[str] | None = None,
        eval_hooks: Callable[[Recipe], list] | None = None, log: Callable[[str], None] = print,
        prune_steps: int | None = None, granularity: str | None = None, prune_size: str | None = None) -> list[Path]:
    """Train (or resume) every stage in order; returns the run directories of the finished stages."""
    from clipforge.train import checkpoint as ckpt

    run_dir = Path(run_dir)
    the_plan = plan(teacher, student, stages, recipe, clip_weight, overrides, prune_steps, granularity, prune_size)
    # the first stage's recipe, built now: a bad --set is refused before distill.json is written
    first_model = the_plan["models"][0] if the_plan["models"] else ckpt.read_config(the_plan["teacher"])["model"]
    stage_recipe(the_plan["base"], first_model, Path(the_plan["teacher"]), Path(the_plan["teacher"]), 1, stages,
                 clip_weight, the_plan["overrides"])
    _check_same_plan(run_dir, the_plan)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / PLAN_FILE).write_text(json.dumps(the_plan, indent=2))
    teacher_dir, previous = Path(the_plan["teacher"]), Path(the_plan["teacher"])
    stage_dirs = []
    for k in range(1, stages + 1):
        where = run_dir / f"stage_{k}"
        inherit = "manual"
        if the_plan["models"] is None:  # automatic: the shape is learnt, then pruned out
            previous = _auto_stage(the_plan, k, previous, where, eval_hooks, log)
            if previous is None:
                return stage_dirs
            pruned = ckpt.read_config(previous)
            model, inherit = pruned["model"], "none"
            realised = (pruned.get("source") or {}).get("realised_sparsity")
            label = f"stage {k}/{stages}: {model_shape(model)}" + ("" if realised is None else
                                                             f" (block-weight sparsity {realised:.3f})")
        else:
            model = the_plan["models"][k - 1]
            label = f"stage {k}/{stages}: {model_shape(model)}"
        r = stage_recipe(the_plan["base"], model, teacher_dir, previous, k, stages, clip_weight,
                         the_plan["overrides"], inherit=inherit)
        if not _train(r, where, label, eval_hooks, log):
            return stage_dirs
        stage_dirs.append(where)
        previous = where / "checkpoints" / "latest"
    return stage_dirs
