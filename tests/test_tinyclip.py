"""TinyCLIP affinity mimicking (methods.md section 4): values, gradients, symmetry, teacher scales,
and a run from the CLI with a checkpoint teacher. 2 ranks == 1 process: tests/test_method_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge.config import RecipeError, load_recipe
from clipforge.objectives.distill import AffinityDistill, affinity_distill_loss, soft_cross_entropy


def _embeds(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def _row_entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(dim=1)
    return -(p * p.log()).sum(dim=1).mean()


def test_student_equal_to_teacher_gives_the_teacher_entropy_and_zero_kl():
    images, texts = _embeds(6)
    t = torch.tensor(20.0)
    outputs = {"image_embeds": images, "text_embeds": texts, "logit_scale": t,
               "teacher/image_embeds": images, "teacher/text_embeds": texts, "teacher/logit_scale": t}
    loss, metrics = AffinityDistill()(outputs, {})
    logits = t * images @ texts.T
    entropy = 0.5 * (_row_entropy(logits) + _row_entropy(logits.T))
    torch.testing.assert_close(loss, entropy)
    kl = loss - entropy  # the KL variant: cross-entropy minus the teacher's entropy
    assert abs(kl.item()) < 1e-6
    assert metrics["top1_agreement"] == 1.0


def test_gradient_wrt_student_logits_is_softmax_student_minus_softmax_teacher():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 5, generator=g, requires_grad=True)
    t = torch.randn(5, 5, generator=g)
    soft_cross_entropy(s, t).backward()
    torch.testing.assert_close(s.grad, (s.detach().softmax(1) - t.softmax(1)) / 5)


def test_matches_kl_plus_teacher_entropy_in_both_directions():
    g = torch.Generator().manual_seed(2)
    s_i2t, s_t2i, t_i2t, t_t2i = (torch.randn(4, 7, generator=g) for _ in range(4))
    ref = 0.0
    for s, t in ((s_i2t, t_i2t), (s_t2i, t_t2i)):
        kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
        ref = ref + 0.5 * (kl + _row_entropy(t))
    torch.testing.assert_close(affinity_distill_loss(s_i2t, s_t2i, t_i2t, t_t2i), ref)


def test_symmetric_in_the_image_and_text_roles_with_row_softmax_on_both():
    images, texts = _embeds(5, seed=3)
    t_images, t_texts = _embeds(5, seed=4)
    def loss(a, b, ta, tb):
        return AffinityDistill()({"image_embeds": a, "text_embeds": b, "logit_scale": torch.tensor(10.0),
                                  "teacher/image_embeds": ta, "teacher/text_embeds": tb,
                                  "teacher/logit_scale": torch.tensor(30.0)}, {})[0]
    torch.testing.assert_close(loss(images, texts, t_images, t_texts), loss(texts, images, t_texts, t_images))


def test_each_model_uses_its_own_logit_scale():
    images, texts = _embeds(6, seed=5)
    t_images, t_texts = _embeds(6, seed=6)
    base = {"image_embeds": images, "text_embeds": texts, "logit_scale": torch.tensor(10.0),
            "teacher/image_embeds": t_images, "teacher/text_embeds": t_texts, "teacher/logit_scale": torch.tensor(50.0)}
    own, _ = AffinityDistill()(base, {})
    fixed, metrics = AffinityDistill(teacher_logit_scale=50.0)({k: v for k, v in base.items()
                                                                if k != "teacher/logit_scale"}, {})
    torch.testing.assert_close(own, fixed)
    assert metrics["teacher_logit_scale"] == 50.0
    s, t = 10.0 * images @ texts.T, 50.0 * t_images @ t_texts.T
    torch.testing.assert_close(own, affinity_distill_loss(s, s.T, t, t.T))
    other, _ = AffinityDistill()({**base, "teacher/logit_scale": torch.tensor(10.0)}, {})
    assert not torch.allclose(own, other)
    assert AffinityDistill(teacher_logit_scale=50.0).needs == {"teacher/image_embeds", "teacher/text_embeds"}


def test_missing_teacher_outputs_name_the_fix():
    images, texts = _embeds(3)
    with pytest.raises(ValueError, match="add a \\[\\[teachers\\]\\] entry named 'big'"):
        AffinityDistill(teacher="big")({"image_embeds": images, "text_embeds": texts,
                                        "logit_scale": torch.tensor(1.0)}, {})


def test_recipe_without_the_named_teacher_is_refused_up_front():
    with pytest.raises((RecipeError, ValueError), match="big"):
        from clipforge.train.trainer import build_step

        recipe = load_recipe("tiny-shapes", ["objective.terms=[{name=\"affinity_distill\", teacher=\"big\"}]"])
        build_step(recipe, torch.device("cpu"), log=False)


@pytest.mark.slow
def test_distill_from_a_checkpoint_teacher_trains_from_the_cli(tmp_path):
    """A teacher trained first, then a smaller student distilled from it with the shipped recipe."""
    import json
    import subprocess
    import sys

    small = ["--set", "train.steps=3", "--set", "eval.at_end=false", "--set", "eval.every_steps=none",
             "--set", "train.checkpoint_every_steps=none", "--set", "logging.tensorboard=false",
             "--set", "data.batch_size=16"]
    teacher = subprocess.run([sys.executable, "-m", "clipforge", "train", "tiny-shapes", "--run-dir",
                              str(tmp_path / "big"), *small], capture_output=True, text=True, timeout=600)
    assert teacher.returncode == 0, teacher.stderr
    student = subprocess.run([sys.executable, "-m", "clipforge", "train", "tinyclip-shapes", "--run-dir",
                              str(tmp_path / "tiny"), "--set", f"teachers.0.path={tmp_path / 'big'}", *small],
                             capture_output=True, text=True, timeout=600)
    assert student.returncode == 0, student.stderr
    lines = [json.loads(l) for l in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert "affinity_distill/loss" in lines[-1] and lines[-1]["affinity_distill/loss"] > 0
