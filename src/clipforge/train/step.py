"""The training step: one module that owns the model, the objective, the teachers and any heads.

The trainer never learns a method's name. It wraps this module (DDP / FSDP), and every optimiser
step it calls, for each micro-batch,

    outputs = step(batch)                          # encode: teacher passes, token selection, student passes
    loss, metrics = step.compute_loss(outputs, batch)

then backpropagates, clips, steps the optimiser and calls ``step.after_optimizer_step(done)``
(logit-scale clamp, EMA updates, term state). Everything the step owns is checkpointed: the
model in ``model.safetensors`` (what ``clipforge.load`` and export read), the rest (EMA weights,
heads, term parameters and buffers) in ``method.safetensors``.

``TrainStep`` is the plain step — CLIP, SigLIP, FLIP (random token selection), attentive token
selection, FILIP and any mix of terms — and changes no number of the plain recipes. A method that
needs more (several views, extra heads, self-supervised terms: ``clipforge.methods.aclip``)
subclasses it, overriding ``encode`` / ``compute_loss`` / ``after_optimizer_step``, and registers
itself with ``@register_method`` next to its own ``Config``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.config import MethodConfig, Recipe
from clipforge.models.vit import random_keep_indices
from clipforge.objectives.base import Metrics, Objective

Outputs = dict[str, Any]


# ----------------------------------------------------------------------------- token selection
def attention_keep_scores(cls_attention: list[Tensor]) -> Tensor:
    """A-CLIP's keep score: class-token attention to each patch, averaged over heads and layers -> N x P."""
    return torch.stack([layer.float().mean(dim=1) for layer in cls_attention]).mean(dim=0)


def attentive_keep_indices(scores: Tensor, grid: int, drop_ratio: float, block: int = 1) -> Tensor:
    """The patches of the top-scored ``block`` x ``block`` blocks -> N x K indices (raster order).

    Blocks are scored by their mean patch score (A-CLIP pools 14x14 to 7x7). As many blocks are kept
    as give FLIP's token count ``int(P * (1 - r))`` (rounded to whole blocks, at least one), so
    attentive and random selection run at equal compute. Ties go to the lower block index
    (stable sort), so fixed scores give a fixed mask.
    """
    n, p = scores.shape
    if p != grid * grid or grid % block:
        raise ValueError(f"scores for {p} patches do not fit a {grid}x{grid} grid of {block}x{block} blocks")
    side = grid // block
    block_scores = F.avg_pool2d(scores.view(n, 1, grid, grid), block).view(n, side * side)
    keep_blocks = max(1, round(int(p * (1.0 - drop_ratio)) / (block * block)))
    top = torch.sort(block_scores, dim=1, descending=True, stable=True).indices[:, :keep_blocks]  # N x k
    # block (bi, bj) -> its block x block patches (bi*block + di, bj*block + dj)
    bi, bj = top // side, top % side
    offsets = torch.arange(block, device=scores.device)
    rows = bi[:, :, None, None] * block + offsets[None, None, :, None]
    cols = bj[:, :, None, None] * block + offsets[None, None, None, :]
    patches = (rows * grid + cols).reshape(n, -1)
    return patches.sort(dim=1).values


# ----------------------------------------------------------------------------- the plain step
class TrainStep(nn.Module):
    """Model + objective + teachers; the default step of every recipe (``method.name = "clip"``)."""

    name: ClassVar[str] = "clip"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    supports_gradcache: ClassVar[bool] = True  # outputs are per-sample embeddings the loss reads
    hook_only_clamps: ClassVar[bool] = False  # a subclass whose after_optimizer_step only clamps more scales

    def __init__(self, recipe: Recipe, model: nn.Module, objective: Objective, teachers: dict[str, nn.Module]):
        super().__init__()
        self.model = model
        self.objective = objective
        self.teachers = nn.ModuleDict(teachers)
        self.total_steps = recipe.train.steps
        self.token_selection = recipe.model.token_selection
        self.drop_ratio = recipe.model.patch_dropout
        self.attentive_block = recipe.model.attentive_block
        self.needs = objective.needs

    @classmethod
    def from_recipe(cls, recipe: Recipe, model: nn.Module, objective: Objective,
                    teachers: dict[str, nn.Module]) -> "TrainStep":
        return cls(recipe, model, objective, teachers)

    # ------------------------------------------------------------------ teachers
    def teacher_outputs(self, batch: dict[str, Any], needs: frozenset[str]) -> Outputs:
        """Run each teacher whose outputs are needed ("<teacher>/<key>"), under no_grad; prefixed keys."""
        out: Outputs = {}
        for name, teacher in self.teachers.items():
            wanted = frozenset(k.split("/", 1)[1] for k in needs if k.startswith(name + "/"))
            if wanted:
                with torch.no_grad():
                    out.update({f"{name}/{k}": v for k, v in teacher(batch, wanted).items()})
        return out

    def scoring_teacher(self) -> nn.Module | None:
        """The first ema teacher: A-CLIP scores patches with the momentum model."""
        return next((t for t in self.teachers.values() if getattr(t, "kind", None) == "ema"), None)

    # ------------------------------------------------------------------ token selection
    def keep_indices(self, images: Tensor, scores: Tensor | None = None) -> Tensor | None:
        """Which patches the online image tower sees: None lets the ViT draw FLIP's random subset
        (or keep everything in eval mode / at r = 0); attentive selection needs class-token scores."""
        if not self.training or self.drop_ratio == 0 or self.token_selection == "random":
            return None
        if scores is None:
            scores = self.patch_scores(images)
        return attentive_keep_indices(scores, self.model.visual.grid, self.drop_ratio, self.attentive_block)

    @torch.no_grad()
    def patch_scores(self, images: Tensor) -> Tensor:
        """Class-token attention of the ema teacher (or of the online weights, without gradient) -> N x P."""
        teacher = self.scoring_teacher()
        scorer = teacher.module if teacher is not None else self.model
        was_training = scorer.training
        scorer.eval()  # every patch, no random dropout
        try:
            vision = scorer.visual(scorer.normalize_images(images), return_cls_attention=True)
        finally:
            scorer.train(was_training)
        return attention_keep_scores(vision["cls_attention"])

    # ------------------------------------------------------------------ the step
    def forward(self, batch: dict[str, Any]) -> Outputs:
        """Encode a batch: teacher passes, token selection, then the model with the extras the terms need."""
        return self.encode(batch)

    def encode(self, batch: dict[str, Any]) -> Outputs:
        model_needs = frozenset(k for k in self.needs if "/" not in k)
        outputs = self.teacher_outputs(batch, self.needs)
        keep = self.keep_indices(batch["images"])
        outputs.update(self.model(batch["images"], batch["input_ids"], batch["attention_mask"],
                                  need=model_needs, keep_indices=keep))
        return outputs

    def compute_loss(self, outputs: Outputs, batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        return self.objective(outputs, batch)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Once per optimiser step on every rank (``step`` = steps done): clamp t, update teachers and terms."""
        self.model.clamp_logit_scale_()
        for teacher in self.teachers.values():
            update = getattr(teacher, "update", None)
            if update is not None:
                update(self.model, step, self.total_steps)
        self.objective.after_optimizer_step(step)

    def discard_step(self) -> None:
        """Instead of ``after_optimizer_step`` for a skipped step (NaN/inf): the terms (and methods
        with per-step state) drop what its passes collected; teachers and the scale stay as they were."""
        self.objective.discard_step()

    def after_step_keeps_no_state(self) -> bool:
        """Whether ``after_optimizer_step`` does nothing beyond clamping the logit scale, so a step whose
        update was suppressed on the device (NaN/inf, fused AdamW's ``found_inf``) can still run it and
        change nothing. EMA teachers, terms with state and methods' own hooks need the host's decision."""
        from clipforge.objectives.base import Term

        terms = getattr(self.objective, "terms", ())
        return ((type(self).after_optimizer_step is TrainStep.after_optimizer_step or self.hook_only_clamps)
                and not any(getattr(t, "update", None) is not None for t in self.teachers.values())
                and all(type(t).after_optimizer_step is Term.after_optimizer_step for t in terms))

    # ------------------------------------------------------------------ state
    def before_checkpoint(self) -> None:
        """On every rank, before a checkpoint is written: make durable what lives outside the state dict
        (LiT's text-feature cache writes each rank's pending rows)."""

    def method_state_dict(self, full: dict[str, Tensor]) -> dict[str, Tensor]:
        """Everything but the model's own weights (those go to model.safetensors)."""
        return {k: v for k, v in full.items() if not k.startswith("model.")}

    def state_mismatch_hint(self, missing: set[str], unexpected: set[str]) -> str:
        """What to do when a checkpoint's method state has other keys than this step's (a method's own
        advice, e.g. a setting whose default changed); empty for none."""
        return ""


def cosine_momentum(step: int, total: int, start: float, end: float) -> float:
    """BYOL / A-CLIP momentum: ``start`` at step 0 rising to ``end`` at the last step along a half cosine."""
    progress = min(1.0, step / max(1, total))
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2
