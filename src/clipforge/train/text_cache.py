"""A frozen text tower's features on disk: each unique caption runs through the tower once.

LiT and FLAME keep the text encoder locked, so its pooled feature of a caption never changes. The
training step (``clipforge.methods.lit``) looks every caption of a batch up here, encodes only the
misses (rows of the batch's own ``input_ids``, so the data-loader workers need not know about the
cache: they only pass the raw ``captions`` along) and stores them. Reused across epochs and, from
disk, across resumes and runs with the same tower.

Layout (one directory per tower identity, so a different encoder, pooling or context length can
never read another's features)::

    <cache_dir>/<identity[:16]>/
      manifest.json                    identity, feature width, what the tower is
      r0-000000.npy + r0-000000.keys   a shard: K x W float32 rows and their K keys, one per line
      r0-000001.npy + ...              written by rank 0; rank r writes r<r>-*

A key is the blake2b hash of the normalised text (Unicode NFC, whitespace collapsed), plus the
facet prompt for FLAME's facet rows. Shards are written atomically (temporary name, then rename;
the ``.keys`` file last), read memory-mapped, and never changed, so ranks and concurrent runs can
share a directory; a rank sees other ranks' new shards when it next opens the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import torch

SHARD_ROWS = 4096  # pending rows written as one shard once this many have piled up


def normalise_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_key(text: str, facet: str = "") -> str:
    data = normalise_text(text) + ("\x1f" + facet if facet else "")
    return hashlib.blake2b(data.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class TextFeatureCache:
    """key -> float32 feature row; ``lookup`` / ``store`` / ``flush``. ``directory=None``: memory only."""

    def __init__(self, directory: str | Path | None, identity: str, width: int, describe: dict | None = None,
                 rank: int = 0):
        self.identity, self.width, self.rank = identity, width, rank
        self.rows: dict[str, np.ndarray] = {}  # key -> row (a view into a memory-mapped shard, or pending)
        self.pending: dict[str, np.ndarray] = {}
        self.hits = self.misses = 0
        self.directory = None
        if directory is not None:
            self.directory = Path(directory) / identity[:16]
            self._open(describe or {})

    def _open(self, describe: dict) -> None:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        manifest = d / "manifest.json"
        if manifest.is_file():
            saved = json.loads(manifest.read_text())
            if saved.get("identity") != self.identity or saved.get("width") != self.width:
                raise ValueError(f"{d} holds features of another text tower (manifest identity "
                                 f"{str(saved.get('identity'))[:16]}..., width {saved.get('width')}); remove it "
                                 "or point method.cache_dir elsewhere")
        else:
            tmp = d / f".manifest-{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"identity": self.identity, "width": self.width, **describe}, indent=2))
            os.replace(tmp, manifest)
        for keys_file in sorted(d.glob("r*-*.keys")):  # .keys is written last: its shard is complete
            keys = keys_file.read_text().split()
            array = np.load(keys_file.with_suffix(".npy"), mmap_mode="r")
            if array.shape != (len(keys), self.width):
                raise ValueError(f"{keys_file.with_suffix('.npy')}: shape {array.shape} does not match its "
                                 f"{len(keys)} keys x width {self.width}; the cache is damaged, remove {d}")
            for i, key in enumerate(keys):
                self.rows.setdefault(key, array[i])
        self._next_shard = 1 + max((int(p.stem.split("-")[1]) for p in d.glob(f"r{self.rank}-*.keys")), default=-1)

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, keys: list[str]) -> tuple[list[int], list[int]]:
        """(indices of keys found, indices of keys missing)."""
        found = [i for i, k in enumerate(keys) if k in self.rows]
        missing = [i for i, k in enumerate(keys) if k not in self.rows]
        self.hits += len(found)
        self.misses += len(missing)
        return found, missing

    def get(self, keys: list[str]) -> torch.Tensor:
        """len(keys) x W float32 (every key must be present)."""
        return torch.from_numpy(np.stack([self.rows[k] for k in keys]))

    def store(self, keys: list[str], features: torch.Tensor) -> None:
        rows = features.detach().float().cpu().numpy()
        for key, row in zip(keys, rows):
            if key not in self.rows:
                self.rows[key] = self.pending[key] = row.copy()
        if len(self.pending) >= SHARD_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows as one shard (atomically); nothing to do in memory-only mode."""
        if self.directory is None or not self.pending:
            self.pending.clear()
            return
        name = f"r{self.rank}-{self._next_shard:06d}"
        keys = list(self.pending)
        array = np.stack([self.pending[k] for k in keys]).astype(np.float32)
        tmp = self.directory / f".{name}.{os.getpid()}.tmp.npy"
        np.save(tmp, array)
        os.replace(tmp, self.directory / f"{name}.npy")
        tmp_keys = self.directory / f".{name}.{os.getpid()}.keys.tmp"
        tmp_keys.write_text("\n".join(keys) + "\n")
        os.replace(tmp_keys, self.directory / f"{name}.keys")  # last: the shard now counts
        self._next_shard += 1
        self.pending.clear()
