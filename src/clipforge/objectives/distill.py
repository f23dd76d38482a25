"""TinyCLIP's affinity mimicking (Wu et al., ICCV 2023): the student matches the teacher's
image->text and text->image affinities, not its features.

    A_s(I->T) = t_s * X_s Y_s^T        A_t(I->T) = t_t * X_t Y_t^T        (and T->I transposed roles)
    loss = 1/2 [ CE(A_s(I->T), softmax_row(A_t(I->T))) + CE(A_s(T->I), softmax_row(A_t(T->I))) ]

a row-wise soft-label cross-entropy, i.e. KL(teacher || student) plus the teacher's (constant)
entropy. Student and teacher each use their own logit scale: the student's is the model's, the
teacher's comes with its outputs (``<teacher>/logit_scale``) or is fixed by ``teacher_logit_scale``.
The student's embedding space stays free: there is no feature-level loss. Mix with the hard CLIP
loss as two terms: ``[{name="affinity_distill", weight=a}, {name="clip", weight=1-a}]``.

Across ranks (scope ``gathered``, TinyCLIP's ``local_loss``): each rank's rows (its local images
and texts) are scored against the gathered keys of every rank, the student's keys keeping their
gradient, the teacher's without; the rank's loss is the mean over its rows, so the mean over
ranks is the global loss (tests/test_method_distributed.py checks 2 ranks == 1 process).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from clipforge.objectives.base import Metrics, Term, TermConfig, register_term, require_output, upcast_low_precision


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean over rows of -sum_j softmax(teacher)_j * log softmax(student)_j."""
    target = F.softmax(upcast_low_precision(teacher_logits), dim=1)
    return -(target * F.log_softmax(upcast_low_precision(student_logits), dim=1)).sum(dim=1).mean()


def affinity_distill_loss(student_i2t: Tensor, student_t2i: Tensor, teacher_i2t: Tensor, teacher_t2i: Tensor) -> Tensor:
    """TinyCLIP's affinity mimicking on given logits: the mean of the two directions' soft cross-entropies."""
    return 0.5 * (soft_cross_entropy(student_i2t, teacher_i2t) + soft_cross_entropy(student_t2i, teacher_t2i))


class AffinityDistillConfig(TermConfig):
    name: str = "affinity_distill"
    teacher: str = Field("teacher", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # the [[teachers]] entry to mimic
    # the teacher's temperature t_t; None: its own (its outputs' logit_scale, or a cache's logit_scale.json)
    teacher_logit_scale: float | None = Field(None, gt=0.0, allow_inf_nan=False)

    def check_recipe(self, recipe) -> None:
        names = [t.name for t in recipe.teachers]
        if self.teacher not in names:
            raise ValueError(f"objective term 'affinity_distill' mimics teacher '{self.teacher}', but the recipe's "
                             f"teachers are {names or 'none'}: add [[teachers]] name = \"{self.teacher}\" (kind "
                             "checkpoint, cache or ema) or set the term's teacher")


@register_term
class AffinityDistill(Term):
    """TinyCLIP affinity mimicking against a teacher's embeddings (a ``[[teachers]]`` entry)."""

    name = "affinity_distill"
    Config = AffinityDistillConfig
    scope = "gathered"

    def __init__(self, weight: float = 1.0, teacher: str = "teacher", teacher_logit_scale: float | None = None):
        super().__init__(weight)
        self.teacher = teacher
        self.teacher_logit_scale = teacher_logit_scale
        wanted = {"image_embeds", "text_embeds"} | ({"logit_scale"} if teacher_logit_scale is None else set())
        self.needs = frozenset(f"{teacher}/{k}" for k in wanted)  # the step runs that teacher for these

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        hint = f"add a [[teachers]] entry named '{self.teacher}' (kind checkpoint, cache or ema)"
        images, texts = outputs["image_embeds"], outputs["text_embeds"]
        student_scale = require_output(outputs, "logit_scale", self.name)
        t_images = require_output(outputs, f"{self.teacher}/image_embeds", self.name, hint)
        t_texts = require_output(outputs, f"{self.teacher}/text_embeds", self.name, hint)
        if self.teacher_logit_scale is not None:
            teacher_scale = torch.tensor(self.teacher_logit_scale, device=images.device)
        else:
            teacher_scale = require_output(outputs, f"{self.teacher}/logit_scale", self.name,
                                           "or set teacher_logit_scale in the term")
        all_images, all_texts, all_t_images, all_t_texts = images, texts, t_images, t_texts
        from clipforge.objectives.distributed import active_world_size, gather_no_grad, gather_with_grad

        if active_world_size() > 1:  # local rows against every rank's keys
            all_images, all_texts = gather_with_grad(images), gather_with_grad(texts)
            all_t_images, all_t_texts = gather_no_grad(t_images), gather_no_grad(t_texts)
        student_i2t = student_scale * images @ all_texts.T
        student_t2i = student_scale * texts @ all_images.T
        with torch.no_grad():
            teacher_i2t = teacher_scale * t_images.to(images.dtype) @ all_t_texts.to(images.dtype).T
            teacher_t2i = teacher_scale * t_texts.to(images.dtype) @ all_t_images.to(images.dtype).T
        loss = affinity_distill_loss(student_i2t, student_t2i, teacher_i2t, teacher_t2i)
        with torch.no_grad():  # how often the student's top match is the teacher's
            agree = 0.5 * ((student_i2t.argmax(1) == teacher_i2t.argmax(1)).float().mean()
                           + (student_t2i.argmax(1) == teacher_t2i.argmax(1)).float().mean())
        # 0-d tensors, not floats: no host sync per micro-batch (the trainer reads metrics when it logs)
        return loss, {"top1_agreement": agree, "teacher_logit_scale": torch.as_tensor(teacher_scale).detach()}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, teacher={self.teacher!r}, teacher_logit_scale={self.teacher_logit_scale}"
