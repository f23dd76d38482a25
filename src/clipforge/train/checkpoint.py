"""Checkpoint directories: self-contained, atomic, loadable offline, never unpickling code.

Layout of one checkpoint (``<run>/checkpoints/step_000200/``)::

    model.safetensors   weights
    config.json         architecture, preprocessing, tokenizer spec, resolved recipe
    tokenizer.json      the tokenizer
    train_state.pt      optimizer, step, RNG states, data cursor, counters (training only)

A checkpoint is written into a hidden temporary directory and renamed into place, so a directory
named ``step_*`` is always complete. ``latest`` is a symlink to the newest one; the last K are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clipforge import __version__
from clipforge.config import ModelConfig, Recipe

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METHOD_WEIGHTS = "method.safetensors"  # the training step's state beyond the model (EMA teachers, heads, terms)
TOKENIZER = "tokenizer.json"
TRAIN_STATE = "train_state.pt"
REQUIRED = (WEIGHTS, CONFIG, TOKENIZER)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read; the message says what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_config(
    model_cfg: ModelConfig, tokenizer, recipe: Recipe | None = None, source: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``config.json``: architecture, preprocessing, tokenizer spec, and the recipe (None for
    model-only checkpoints such as imported weights, which say where they came from in ``source``)."""
    preprocess: dict[str, Any] = {
        "image_size": model_cfg.image_size,
        "resize": "shortest-side-bicubic",
        "crop": "center",
        "mean": list(model_cfg.image_mean),
        "std": list(model_cfg.image_std),
    }
    if recipe is not None:
        # what training did (random-resized-crop, flip, ...); the lines above are for inference
        preprocess["train"] = _train_preprocess(recipe)
    config = {
        "format": "clipforge-checkpoint",
        "clipforge_version": __version__,
        "model": model_cfg.model_dump(mode="json"),
        "preprocess": preprocess,
        "tokenizer": tokenizer.spec(),
        "recipe": recipe.model_dump(mode="json") if recipe is not None else None,
    }
    if source is not None:
        config["source"] = source
    return config


def _train_preprocess(recipe: Recipe) -> dict[str, Any]:
    if recipe.data.train == "shapes":
        return {"image_size": recipe.model.image_size, "source": "rendered at size (shapes)"}
    from clipforge.data.augment import describe_train_preprocess

    return describe_train_preprocess(recipe.data.augment, recipe.model.image_size)


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),  # the Mersenne Twister words + position
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
         state["numpy_has_gauss"], state["numpy_gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: torch.nn.Module,
    recipe: Recipe,
    tokenizer,
    train_state: dict[str, Any] | None,
    keep_last: int,
    method_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint atomically, point ``latest`` at it, prune old ones."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / step_dir_name(step)
    tmp = checkpoints_dir / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_model_files(tmp, model, checkpoint_config(recipe.model, tokenizer, recipe), tokenizer)
    if method_state:  # EMA teachers, heads, term parameters/buffers: everything of the step but the model
        save_file({k: v.detach().to("cpu").contiguous() for k, v in method_state.items()}, str(tmp / METHOD_WEIGHTS),
                  metadata={"format": "pt"})
        _same_mode_as(tmp / METHOD_WEIGHTS, tmp / CONFIG)
    if train_state is not None:
        torch.save(train_state, tmp / TRAIN_STATE)
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _point_latest(checkpoints_dir, final.name)
    _prune(checkpoints_dir, keep_last)
    return final


def write_model_files(directory: Path, model: torch.nn.Module, config: dict[str, Any], tokenizer) -> None:
    """The inference part of a checkpoint: weights, config.json, tokenizer.json."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    tokenizer.save(directory)
    _same_mode_as(directory / WEIGHTS, directory / CONFIG)


def _same_mode_as(path: Path, like: Path) -> None:
    """Give ``path`` the permissions of ``like``. safetensors writes its files 0600 whatever the umask,
    while everything else in a checkpoint gets the usual 0644, so others who can read the run could not
    load its weights."""
    os.chmod(path, stat.S_IMODE(like.stat().st_mode))


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _point_latest(checkpoints_dir: Path, name: str) -> None:
    link = checkpoints_dir / "latest"
    tmp_link = checkpoints_dir / f".latest-{os.getpid()}"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(name, tmp_link)
    os.replace(tmp_link, link)  # atomic swap of the symlink


def _prune(checkpoints_dir: Path, keep_last: int) -> None:
    complete = complete_checkpoints(checkpoints_dir)
    for old in complete[:-keep_last]:
        shutil.rmtree(old)


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete ``step_*`` directories, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for d in checkpoints_dir.glob("step_*"):
        if d.is_dir() and not d.is_symlink() and all((d / f).is_file() for f in REQUIRED + (TRAIN_STATE,)):
            found.append(d)
    return sorted(found, key=lambda p: p.name)


def damaged_files(ckpt: Path) -> str | None:
    """Why a complete-looking checkpoint cannot be read (a truncated or corrupt file), or None.

    Reads every file once without deserialising anything: ``train_state.pt`` is a zip archive whose
    members carry CRCs; safetensors files must hold their header's declared byte count.
    """
    import zipfile

    try:
        with zipfile.ZipFile(ckpt / TRAIN_STATE) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"{TRAIN_STATE}: member {bad} is corrupt"
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{TRAIN_STATE} is truncated or unreadable: {e}"
    for name in (WEIGHTS, METHOD_WEIGHTS):
        path = ckpt / name
        if path.is_file() and (problem := _safetensors_problem(path)):
            return f"{name}: {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "truncated (no header)"
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            return "truncated (header cut short)"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return "corrupt header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return "truncated (tensor data cut short)" if 8 + header_len + end > size else None


def find_resume_checkpoint(run_dir: Path, which: str) -> Path:
    """Resolve ``--resume latest`` (or a path) to a complete checkpoint directory.

    Leftovers of a killed save (hidden temp dirs, an incomplete step dir) are ignored with a warning
    in favour of the newest complete checkpoint.
    """
    if which != "latest":
        path = Path(which)
        if not path.exists():
            raise CheckpointError(f"--resume {which}: no such checkpoint directory. Pass --resume latest or a "
                                  "checkpoint directory written by `clipforge train`.")
        if not (path / TRAIN_STATE).is_file():
            raise CheckpointError(
                f"--resume {which}: not a training checkpoint (no {TRAIN_STATE} in it). "
                "Pass --resume latest or a checkpoint directory written by `clipforge train`."
            )
        return path
    ckpt_dir = run_dir / "checkpoints"
    for leftover in ckpt_dir.glob(".tmp-*") if ckpt_dir.is_dir() else []:
        warnings.warn(f"ignoring half-written checkpoint {leftover} (a save was interrupted); removing it")
        shutil.rmtree(leftover, ignore_errors=True)
    complete = complete_checkpoints(ckpt_dir)
    while complete and (damage := damaged_files(complete[-1])):
        # a disk filled up or a copy cut the file short: fall back to the previous checkpoint, keep the damaged one
        warnings.warn(f"ignoring damaged checkpoint {complete[-1].name} ({damage}); "
                      f"falling back to {complete[-2].name if len(complete) > 1 else 'nothing'}")
        complete = complete[:-1]
    if not complete:
        raise CheckpointError(
            f"--resume latest: no complete checkpoint in {ckpt_dir}. "
            "Start without --resume, or point --run-dir at the run you want to continue."
        )
    newest = complete[-1]
    link = ckpt_dir / "latest"
    if link.is_symlink() and link.resolve() != newest.resolve():
        warnings.warn(f"'latest' points at {os.readlink(link)}, which is incomplete; using {newest.name}")
    incomplete = [d for d in ckpt_dir.glob("step_*") if d.is_dir() and d.name > newest.name]
    for d in incomplete:
        warnings.warn(f"ignoring incomplete checkpoint {d} in favour of {newest.name}")
    return newest


def read_config(ckpt: Path) -> dict[str, Any]:
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise CheckpointError(f"checkpoint not found: {ckpt}")
    if ckpt.is_file() and ckpt.name == WEIGHTS:
        ckpt = ckpt.parent
    if not (ckpt / CONFIG).is_file():
        raise CheckpointError(f"{ckpt} is not a clipforge checkpoint: {CONFIG} is missing")
    if not (ckpt / WEIGHTS).is_file():
        raise CheckpointError(f"{ckpt}: {WEIGHTS} is missing (the checkpoint has no weights)")
    return json.loads((ckpt / CONFIG).read_text())


def load_model_weights(model: torch.nn.Module, ckpt: Path) -> None:
    state = load_file(str(Path(ckpt) / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: weights do not match the model architecture "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )


def load_method_state(step: torch.nn.Module, ckpt: Path) -> None:
    """Restore the training step's state beyond the model (method.safetensors) for an exact resume."""
    expected = {k for k in step.state_dict() if not k.startswith("model.")}
    path = Path(ckpt) / METHOD_WEIGHTS
    if not expected:
        return
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no {METHOD_WEIGHTS}, but this recipe's method/teachers/terms keep state "
                              f"({sorted(expected)[:3]}...); resume with the recipe the checkpoint was written with")
    state = load_file(str(path))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        hint = step.state_mismatch_hint(missing, unexpected) if hasattr(step, "state_mismatch_hint") else ""
        raise CheckpointError(f"{ckpt}: {METHOD_WEIGHTS} does not match this recipe's method state "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); "
                              + (hint or "the method, teachers and terms must stay as they were"))
    step.load_state_dict(state, strict=False)


def load_train_state(ckpt: Path) -> dict[str, Any]:
    """The training state, read without executing any pickled code; a clear error when the file
    holds something else than tensors and plain containers, or is damaged."""
    import pickle

    path = Path(ckpt) / TRAIN_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds objects that are not tensors or plain containers, so it was not loaded "
            f"({str(e).splitlines()[0][:160]}). clipforge never writes such files: it may have been tampered "
            "with. Do not load it with weights_only=False unless you trust where it came from; resume from "
            "an earlier checkpoint with --resume <checkpoint dir>."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is damaged ({str(e).splitlines()[0][:160]}); resume from an earlier "
                              "checkpoint with --resume <checkpoint dir>.") from None


def model_config_from(config: dict[str, Any]) -> ModelConfig:
    return ModelConfig.model_validate(config["model"])
