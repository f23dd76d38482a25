"""Training methods: each is one module in this package with a step class and its ``Config``.

The recipe's ``[method]`` section picks one by ``name`` (default ``clip``: the plain step of
``clipforge.train.step``, which also runs SigLIP, FLIP, attentive selection and FILIP through its
terms). Every module in this package is imported on first use, so a new method is one new file
here (or a module listed in the recipe's ``imports``) with ``@register_method`` on its step class.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from clipforge.config import MethodConfig
from clipforge.train.step import TrainStep

METHODS: dict[str, type[TrainStep]] = {"clip": TrainStep}


def register_method(cls: type[TrainStep]) -> type[TrainStep]:
    """Class decorator: make a step class selectable with ``method.name = cls.name``."""
    previous = METHODS.get(cls.name)
    if previous is not None and previous.__qualname__ != cls.__qualname__:
        raise ValueError(f"method name '{cls.name}' is already registered by {previous.__name__}")
    if not issubclass(cls.Config, MethodConfig):
        raise TypeError(f"{cls.__name__}.Config must subclass clipforge.config.MethodConfig")
    METHODS[cls.name] = cls
    return cls


def _import_shipped_methods() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def method_class(name: str) -> type[TrainStep]:
    cls = METHODS.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown method '{name}'.{hint} Registered methods: {', '.join(sorted(METHODS))} "
                         "(a method defined outside clipforge is registered by listing its module in `imports`)")
    return cls


def method_config_class(name: str) -> type[MethodConfig]:
    return method_class(name).Config


_import_shipped_methods()
