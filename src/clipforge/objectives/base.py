"""The objective: a weighted sum of small loss terms.

A term is an ``nn.Module`` with a ``name``, a ``weight`` and
``forward(outputs, batch) -> (loss, metrics)``. ``outputs`` is the model's dict
("image_embeds", "text_embeds", "logit_scale", maybe "logit_bias", extras on request);
``batch`` is the data loader's dict. Each term keeps its maths in plain functions of
tensors (embeddings, scale, bias) so the distributed versions can reuse them on
gathered or ring-exchanged features.

New terms register with one line, ``@register_term``, and get a config class in
``clipforge.config`` whose ``name`` literal matches the term's ``name``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

Metrics = dict[str, float]

# How a term sees the batch under data parallelism (used by the distributed trainer):
#   "local"    - only this rank's samples (e.g. per-sample regularisers)
#   "gathered" - features all-gathered across ranks, local shard keeps its gradient (softmax losses)
#   "ring"     - features passed around the ranks block by block (sigmoid losses)
FeatureScope = Literal["local", "gathered", "ring"]


class Term(nn.Module):
    """One weighted loss term. Subclasses set ``name`` and ``features`` and implement ``forward``."""

    name: ClassVar[str]
    features: ClassVar[FeatureScope] = "local"

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)

    @classmethod
    def from_config(cls, cfg: Any) -> "Term":
        """Build from the term's recipe section; every config field but ``name`` is an init argument."""
        return cls(**cfg.model_dump(exclude={"name"}))

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        """Return (scalar loss, metrics without the term's prefix and without "loss")."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


TERMS: dict[str, type[Term]] = {}


def register_term(cls: type[Term]) -> type[Term]:
    """Class decorator: make a term buildable from recipes by its ``name``."""
    if cls.name in TERMS and TERMS[cls.name] is not cls:
        raise ValueError(f"objective term name '{cls.name}' is already registered by {TERMS[cls.name].__name__}")
    TERMS[cls.name] = cls
    return cls


class Objective(nn.Module):
    """Sum of weighted terms.

    ``forward`` returns (total, metrics) with total = sum_i weight_i * loss_i and metrics
    "loss" (the total), "<term>/loss" and "<term>/<metric>" for every term. A term with
    weight 0 is still computed for its metrics, but under ``torch.no_grad`` so it adds no
    backward cost and no gradient.
    """

    def __init__(self, terms: list[Term]):
        super().__init__()
        if not terms:
            raise ValueError("the objective needs at least one term")
        if all(term.weight == 0 for term in terms):
            raise ValueError("every objective term has weight 0; give at least one term a weight > 0")
        self.terms = nn.ModuleList(terms)
        self.keys = _unique_keys([term.name for term in terms])

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, Metrics]:
        total: Tensor | None = None
        metrics: Metrics = {}
        for key, term in zip(self.keys, self.terms):
            if term.weight == 0:
                with torch.no_grad():  # logged only
                    loss, term_metrics = term(outputs, batch)
            else:
                loss, term_metrics = term(outputs, batch)
                total = term.weight * loss if total is None else total + term.weight * loss
            metrics[f"{key}/loss"] = float(loss.detach())
            metrics.update({f"{key}/{name}": value for name, value in term_metrics.items()})
        assert total is not None  # guaranteed by the weight check in __init__
        metrics["loss"] = float(total.detach())
        return total, metrics


def build_term(cfg: Any) -> Term:
    """A term from its recipe section (anything with ``name``, ``weight`` and ``model_dump``)."""
    cls = TERMS.get(cfg.name)
    if cls is None:
        raise ValueError(
            f"unknown objective term '{cfg.name}'; registered terms: {', '.join(sorted(TERMS))}"
        )
    return cls.from_config(cfg)


def build_objective(cfg: Any) -> Objective:
    """The objective described by a recipe's ``[objective]`` section (``ObjectiveConfig``)."""
    return Objective([build_term(term_cfg) for term_cfg in cfg.terms])


def upcast_low_precision(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32: losses reduce over B^2 logits, which low precision cannot sum well."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def require_output(outputs: dict[str, Tensor], key: str, term: str, hint: str = "") -> Tensor:
    """outputs[key], or an error naming the term that needs it and what to change."""
    value = outputs.get(key)
    if value is None:
        raise ValueError(f"objective term '{term}' needs model output '{key}', which is missing. {hint}".rstrip())
    return value


def _unique_keys(names: list[str]) -> list[str]:
    """Metric prefixes: the term name, with _2, _3, ... for repeated names."""
    keys, seen = [], {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return keys
