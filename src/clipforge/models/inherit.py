"""TinyCLIP's manual weight inheritance: a smaller student initialised from a teacher's weights.

    depth: student layer j <- teacher layer j * floor(L_t / L_s)      (0, s, 2s, ... from the front)
    width: leading slices of every weight (embeddings, positions, LayerNorms, MLP, projections)
    heads: qkv viewed as (3, H, head_dim, W): the first H_s heads, their first head_dim_s dims,
           the first W_s input columns; attn.proj likewise on its input side

Head dim. Our attention's inner width equals the tower width (H x head_dim = W), so a narrower
student either keeps the teacher's head_dim with fewer heads (TinyCLIP's choice: every kept head
is the teacher's head, unchanged, and ``student[qkv] == teacher[qkv].view(3, H, hd, W)[:, :H_s, :, :W_s]``)
or keeps head_dim_s = W_s / H_s < head_dim and each kept head keeps its leading head_dim_s dims
(a partial q.k sum under a new 1/sqrt(head_dim_s) scale: an initialisation, not the teacher's
head). ``student_config`` picks the first whenever the student's final width is a multiple of the
teacher's head_dim, the second otherwise; an explicit config may do either.

A student with the teacher's shape inherits every tensor unchanged (identical outputs). The
joint-space width (embed_dim) may shrink too (leading rows of the projections), but students
normally keep it, so they start in the teacher's embedding space.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from clipforge.config import ModelConfig, RecipeError

TOWERS = {"visual": ("vision_width", "vision_layers", "vision_heads"),
          "text": ("text_width", "text_layers", "text_heads")}
# architecture keys a student must share with its teacher (they change what a weight means)
SAME = ("patch_size", "image_size", "vision_pool", "activation", "mlp_ratio")


class InheritError(RecipeError):
    """A student that cannot inherit from this teacher; the message names the key and the fix."""


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer index of each student layer: ``arange(L_s) * floor(L_t / L_s)``."""
    if not 1 <= student_layers <= teacher_layers:
        raise InheritError(f"a student needs 1..{teacher_layers} layers to inherit from a "
                           f"{teacher_layers}-layer tower, got {student_layers}")
    stride = teacher_layers // student_layers
    return [j * stride for j in range(student_layers)]


def refuse_other_image_towers(cfg: ModelConfig, who: str) -> None:
    if cfg.image_tower != "vit":
        raise InheritError(f"weight inheritance slices clipforge's transformer towers; the {who}'s image tower is "
                           f"model.image_tower = '{cfg.image_tower}'. Distil it into a ViT student with affinity "
                           "distillation alone instead (the tinyclip-shapes recipe with teachers.0.path = that run)")


def check_inheritable(teacher: ModelConfig, student: ModelConfig) -> None:
    """Refuse, by key, a student that is not a sub-network of the teacher."""
    for who, cfg in (("teacher", teacher), ("student", student)):
        refuse_other_image_towers(cfg, who)
        if not cfg.uniform_layers():
            raise InheritError(f"manual inheritance slices towers whose layers all have one shape; the {who}'s "
                               "layers differ (model.*_layer_heads / *_layer_mlp / *_head_dim, a CoFi-pruned model). "
                               "Prune it further with method tinyclip_prune (granularity = 'cofi') instead")
    for key in SAME:
        if getattr(student, key) != getattr(teacher, key):
            raise InheritError(f"model.{key} = {getattr(student, key)!r} but the teacher's is "
                               f"{getattr(teacher, key)!r}; an inheriting student keeps it")
    if (student.logit_bias_init is None) != (teacher.logit_bias_init is None):
        raise InheritError("the student and the teacher must both have a logit bias (SigLIP) or both not")
    for key in ("vocab_size", "context_length", "embed_dim", *TOWERS["visual"], *TOWERS["text"]):
        if getattr(student, key) > getattr(teacher, key):
            raise InheritError(f"model.{key} = {getattr(student, key)} is larger than the teacher's "
                               f"{getattr(teacher, key)}; inheritance only takes slices of the teacher")
    for tower, (width, _, heads) in TOWERS.items():
        hd_t = getattr(teacher, width) // getattr(teacher, heads)
        hd_s = getattr(student, width) // getattr(student, heads)
        if hd_s > hd_t:
            raise InheritError(f"{tower} head_dim {hd_s} (model.{width} / model.{heads}) is larger than the "
                               f"teacher's {hd_t}; use at least {getattr(student, width) // hd_t or 1} heads")


def _leading(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return t[tuple(slice(0, n) for n in shape)]


def _heads_slice(t: torch.Tensor, name: str, heads: tuple[int, int], head_dims: tuple[int, int],
                 shape: tuple[int, ...]) -> torch.Tensor:
    """qkv / attn.proj: keep the first heads, their first head dims (see the module docstring)."""
    (h_t, h_s), (hd_t, hd_s) = heads, head_dims
    if name.endswith("attn.qkv.weight"):  # 3W x W  ->  (3, H, hd, W)
        return t.view(3, h_t, hd_t, -1)[:, :h_s, :hd_s, :shape[1]].reshape(shape)
    if name.endswith("attn.qkv.bias"):  # 3W  ->  (3, H, hd)
        return t.view(3, h_t, hd_t)[:, :h_s, :hd_s].reshape(shape)
    # attn.proj.weight: W x W, input columns are (H, hd)
    return t.view(t.shape[0], h_t, hd_t)[:shape[0], :h_s, :hd_s].reshape(shape)


_BLOCK = re.compile(r"^(visual|text)\.blocks\.(\d+)\.(.+)$")


def inherit_state_dict(teacher_sd: dict[str, torch.Tensor], teacher: ModelConfig,
                       student: ModelConfig) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The student's state dict cut out of the teacher's, and the layer map of each tower."""
    from clipforge.models.clip import CLIP

    check_inheritable(teacher, student)
    maps = {tower: layer_map(getattr(teacher, layers), getattr(student, layers))
            for tower, (_, layers, _) in TOWERS.items()}
    with torch.device("meta"):  # shapes only
        shapes = {k: tuple(v.shape) for k, v in CLIP(student).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        match = _BLOCK.match(name)
        source = name if match is None else f"{match[1]}.blocks.{maps[match[1]][int(match[2])]}.{match[3]}"
        if source not in teacher_sd:
            raise InheritError(f"the teacher has no weight {source} (for the student's {name})")
        t = teacher_sd[source]
        if match is not None and match[3] in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight"):
            width, _, heads = TOWERS[match[1]]
            h = (getattr(teacher, heads), getattr(student, heads))
            hd = (getattr(teacher, width) // h[0], getattr(student, width) // h[1])
            t = _heads_slice(t, name, h, hd, shape)
        else:
            t = _leading(t, shape)
        out[name] = t.clone().contiguous()
    return out, maps


# ----------------------------------------------------------------------------- student shapes
def _round_width(width: float, goal: float, teacher_width: int, teacher_heads: int) -> tuple[int, int]:
    """(width, heads) of a student tower of about ``width`` on the way to ``goal``. When the goal is
    a multiple of the teacher's head_dim, every stage keeps head_dim and drops heads (TinyCLIP);
    otherwise every stage keeps the head count and head_dim shrinks. One rule for all stages, so
    each stage is a slice of the one before (heads and head_dim never grow)."""
    hd = teacher_width // teacher_heads
    if round(goal) % hd == 0:
        heads = max(1, round(width / hd))
        return heads * hd, heads
    return max(teacher_heads, round(width / teacher_heads) * teacher_heads), teacher_heads


def parse_student_spec(spec: str) -> dict[str, float]:
    """``"width=0.5,layers=0.5"`` -> {"width": 0.5, "layers": 0.5}; also any ModelConfig width /
    layers / heads key with an absolute value (``vision_layers=3``), or ``sparsity=0.5`` alone
    (automatic inheritance: the shape is learnt)."""
    allowed = {"width", "layers", "sparsity", *TOWERS["visual"], *TOWERS["text"]}
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in allowed:
            raise InheritError(f"--student {spec!r}: {part!r} is not KEY=VALUE with KEY one of "
                               f"{', '.join(sorted(allowed))} (e.g. width=0.5,layers=0.5)")
        try:
            number = float(value)
        except ValueError:
            raise InheritError(f"--student {spec!r}: {key} = {value!r} is not a number") from None
        if key in ("width", "layers") and not 0 < number <= 1:
            raise InheritError(f"--student {spec!r}: {key} is a fraction of the teacher's, in (0, 1]; got {number}")
        if key == "sparsity" and not 0 < number < 1:
            raise InheritError(f"--student {spec!r}: sparsity is the share of block weights to remove, in (0, 1)")
        if key not in ("width", "layers", "sparsity") and (number < 1 or number != int(number)):
            raise InheritError(f"--student {spec!r}: {key} is an absolute size, a whole number >= 1; got {value}")
        out[key] = number
    if not out:
        raise InheritError("--student is empty; give e.g. width=0.5,layers=0.5")
    return out


def student_config(teacher: ModelConfig, spec: dict[str, float], progress: float = 1.0) -> ModelConfig:
    """The teacher's config shrunk by ``spec``; ``progress`` in (0, 1] goes that fraction of the way
    (multi-stage compression: stage k of S uses k / S, e.g. width 100% -> 83% -> 67% -> 50%)."""
    refuse_other_image_towers(teacher, "teacher")
    if not teacher.uniform_layers():
        raise InheritError("--student width/layers fractions shrink towers whose layers all have one shape; this "
                           "teacher's layers differ (a CoFi-pruned model): use --student sparsity=S")
    changes: dict[str, Any] = {}
    for tower, (width_key, layers_key, heads_key) in TOWERS.items():
        t_width, t_layers, t_heads = (getattr(teacher, k) for k in (width_key, layers_key, heads_key))
        goal_width = spec.get(width_key, t_width * spec.get("width", 1.0))
        goal_layers = spec.get(layers_key, t_layers * spec.get("layers", 1.0))
        width, heads = _round_width(t_width - (t_width - goal_width) * progress, goal_width, t_width, t_heads)
        if heads_key in spec and progress >= 1.0:
            heads = int(spec[heads_key])
        changes[width_key], changes[heads_key] = width, heads
        changes[layers_key] = max(1, round(t_layers - (t_layers - goal_layers) * progress))
    fields = {**teacher.model_dump(), **changes, "init_from": None}
    try:
        return ModelConfig.model_validate(fields)
    except ValueError as e:
        raise InheritError(f"the student {changes} is not a valid model: {e}") from None
