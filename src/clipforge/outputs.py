"""Outputs the CLI writes (indexes, caches, imported checkpoints, result files): never over existing work
or its own inputs, and checked before the work starts."""

from __future__ import annotations

from pathlib import Path


def new_output_dir(out: str | Path) -> Path:
    """``out`` as a Path; refused when it already holds files (a rerun must not mix old and new output)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, and --out here names a directory to create; choose a new --out "
                              "directory")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out directory")
    return out


def output_file(out: str | Path, inputs: list[str | Path] = ()) -> Path:
    """``out`` as a Path for a result file, checked before any work: not a directory, its folder creatable,
    and none of the ``inputs`` it would overwrite."""
    out = Path(out)
    if out.is_dir():
        raise FileExistsError(f"{out} is a directory, and --out here names a file (e.g. {out / 'result.json'}); "
                              "choose a file name")
    if any(Path(i).exists() and Path(i).resolve() == out.resolve() for i in inputs):
        raise FileExistsError(f"--out {out} is also one of the inputs and would overwrite it; choose another name")
    if out.parent.exists() and not out.parent.is_dir():
        raise FileExistsError(f"--out {out}: {out.parent} is a file, not a directory")
    return out


def read_json_object(path: Path, error: type[Exception], remedy: str, what: str) -> dict:
    """A JSON file written by clipforge (an index's info, an embedding manifest), refused with ``error``
    and ``remedy`` when it is unreadable, not JSON, or not an object."""
    import json

    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise error(f"{path} is damaged ({type(e).__name__}: {str(e)[:120]}); {remedy}") from None
    if not isinstance(value, dict):
        raise error(f"{path} is not {what}; {remedy}")
    return value


def load_array_no_pickle(path: Path, error: type[Exception], remedy: str, what: str):
    """``np.load`` that never unpickles (a pickle can run code when loaded); damage raises ``error``."""
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise error(f"{path} is missing; {remedy}") from None
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise error(f"{path} holds pickled Python objects, not {what}; clipforge never loads pickles "
                        f"(loading one can run code), so the file is unsafe or was not written by clipforge; "
                        f"{remedy}") from None
        raise error(f"{path} is damaged or truncated ({str(e)[:160]}); {remedy}") from None
    except (OSError, EOFError) as e:
        raise error(f"{path} is damaged or truncated ({type(e).__name__}); {remedy}") from None
