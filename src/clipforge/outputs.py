"""Output directories the CLI writes (indexes, caches, imported checkpoints): never over existing work."""

from __future__ import annotations

from pathlib import Path


def new_output_dir(out: str | Path) -> Path:
    """``out`` as a Path; refused when it already holds files (a rerun must not mix old and new output)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out directory")
    return out
