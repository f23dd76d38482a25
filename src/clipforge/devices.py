"""The one check of a device argument: --device of every verb that runs a model, and train.device.

A mistyped or absent device would otherwise surface as a torch traceback from deep inside
``model.to(device)`` (\"Found no NVIDIA driver\", \"Expected one of cpu, cuda, ...\").
"""

from __future__ import annotations

import torch

from clipforge.config import RecipeError


class DeviceError(RecipeError):
    """A device that cannot be used here (a RecipeError, so the CLI prints it as a user error)."""


def pick_device(want: str | torch.device | None, option: str = "--device") -> torch.device:
    """``want`` ("cpu", "cuda", "cuda:1"; None or "auto": cuda if there is one, else cpu), checked
    against this machine before anything is loaded."""
    if want is None or want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(want)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{option} {want!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"{option} {want!r}: clipforge runs on cpu or cuda; use {option} cpu or {option} cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{option} {want}: no CUDA device is visible on this machine; use {option} cpu "
                          f"(or leave {option.rstrip(' =')} out)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"{option} {want}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device
