"""The objective: a weighted sum of small loss terms.

A term is an ``nn.Module`` with a ``name``, a ``weight`` and
``forward(outputs, batch) -> (loss, metrics)``. ``outputs`` is the training step's dict
("image_embeds", "text_embeds", "logit_scale", maybe "logit_bias", the extras the term
``needs``, teacher outputs under a prefix such as "ema/image_embeds"); ``batch`` is the data
loader's dict. Each term keeps its maths in plain functions of tensors so the distributed
versions can reuse them on gathered or ring-exchanged features.

A term describes itself:

- ``Config``: its recipe section, a ``TermConfig`` subclass. The recipe schema is built from the
  registry, so a new term needs no edit to ``clipforge.config``;
- ``needs``: the model extras it reads (the step asks the model for exactly these);
- ``scope``: how it sees the batch under data parallelism — "local" (this rank's samples only),
  "gathered" (all-gathered features; the local shard keeps its gradient) or "ring" (blocks passed
  around the ranks). The term implements its scope when a process group is active; a test checks
  the distributed value and gradients against one process on the whole batch;
- parameters and buffers of its own (trained, checkpointed, DDP-reduced with the model), and
  ``after_optimizer_step(step)`` for state that changes once per optimiser step, identically on
  every rank.

New terms register with one line, ``@register_term``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

# values: floats or 0-d tensors; tensors stay on the device until the trainer reads them (at logging steps)
Metrics = dict[str, float | Tensor]

# How a term sees the batch under data parallelism (used by the distributed trainer):
#   "local"    - only this rank's samples (e.g. per-sample regularisers)
#   "gathered" - features all-gathered across ranks, local shard keeps its gradient (softmax losses)
#   "ring"     - features passed around the ranks block by block (sigmoid losses)
FeatureScope = Literal["local", "gathered", "ring"]


class TermConfig(BaseModel):
    """A term's recipe section: ``name`` picks the term, every other field is an init argument."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str
    weight: float = Field(1.0, ge=0.0, allow_inf_nan=False)


class Term(nn.Module):
    """One weighted loss term. Subclasses set ``name``, ``Config``, ``needs``, ``scope`` and implement ``forward``."""

    name: ClassVar[str]
    Config: ClassVar[type[TermConfig]] = TermConfig
    needs: ClassVar[frozenset[str]] = frozenset()  # model extras this term reads from the outputs
    scope: ClassVar[FeatureScope] = "local"

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

    def after_optimizer_step(self, step: int) -> None:
        """Called once after every optimiser step (``step`` = steps done), on every rank alike."""

    def discard_step(self) -> None:
        """Called instead of ``after_optimizer_step`` when the step was skipped (a NaN/inf loss or
        gradient): forget what this step's passes collected for the after-step update."""

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


TERMS: dict[str, type[Term]] = {}


def register_term(cls: type[Term]) -> type[Term]:
    """Class decorator: make a term buildable from recipes by its ``name`` (its ``Config`` is its schema)."""
    previous = TERMS.get(cls.name)
    if previous is not None and previous.__qualname__ != cls.__qualname__:
        raise ValueError(f"objective term name '{cls.name}' is already registered by {previous.__name__}")
    if cls.Config.model_fields["name"].default not in (None, cls.name) and cls.Config is not TermConfig:
        raise ValueError(f"{cls.__name__}.Config.name defaults to {cls.Config.model_fields['name'].default!r}, "
                         f"not the term's name {cls.name!r}")
    TERMS[cls.name] = cls  # re-registering the same class (a module imported twice) replaces it
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

    @property
    def needs(self) -> frozenset[str]:
        """The model extras any term reads."""
        return frozenset().union(*(term.needs for term in self.terms))

    def after_optimizer_step(self, step: int) -> None:
        for term in self.terms:
            term.after_optimizer_step(step)

    def discard_step(self) -> None:
        for term in self.terms:
            term.discard_step()

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
            metrics[f"{key}/loss"] = loss.detach()
            metrics.update({f"{key}/{name}": value for name, value in term_metrics.items()})
        assert total is not None  # guaranteed by the weight check in __init__
        total = total + self._zero_anchor()
        metrics["loss"] = total.detach()
        return total, metrics

    def _zero_anchor(self) -> Tensor | float:
        """0 x (the terms' own trainable parameters): every one of them is in every step's graph, with a
        zero gradient when its term did not use it (weight 0, or a step where the term skips). DDP then
        reduces the same parameters every step, and one process and N processes agree exactly."""
        params = [p for term in self.terms for p in term.parameters() if p.requires_grad]
        if not params or not torch.is_grad_enabled():
            return 0.0
        return 0.0 * sum(p.sum() for p in params)


def build_term(cfg: Any) -> Term:
    """A term from its recipe section (a ``TermConfig``, or a dict with ``name``)."""
    if isinstance(cfg, dict):
        cfg = term_config_class(cfg.get("name", "")).model_validate(cfg)
    term_config_class(cfg.name)  # an unknown name: a clear error with the registered names
    cls = TERMS[cfg.name]
    return cls.from_config(cfg)


def term_config_class(name: str) -> type[TermConfig]:
    """The config class of the registered term ``name``."""
    cls = TERMS.get(name)
    if cls is None:
        import difflib

        close = difflib.get_close_matches(name, list(TERMS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"unknown objective term '{name}'.{hint} Registered terms: {', '.join(sorted(TERMS))} "
            "(a term defined outside clipforge is registered by listing its module in the recipe's `imports`)"
        )
    return cls.Config


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
