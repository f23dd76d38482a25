"""Embedding a user's images and texts for evaluation: workers decode, the model embeds in batches.

Unreadable images are skipped and counted; when more than ``max_bad_fraction`` of the images are
bad the evaluation stops with a message naming some of them (a few broken files in a big folder
should not stop an evaluation, a wrong folder full of non-images should).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from clipforge.data.sources import DECODE_ERRORS, DataError, load_image


class ImageFileDataset(Dataset):
    """Item i -> (uint8 3xSxS tensor, ok, error text); a bad file gives zeros and ok=False."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable, image_size: int) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.preprocess(load_image(self.paths[i], self.image_size)), True, ""
        except DECODE_ERRORS as e:
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), False, _reason(e, self.paths[i])


def _reason(e: BaseException, path) -> str:
    # Pillow repeats the path in its message; the path is reported next to the reason anyway
    message = str(e).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
    return f"{type(e).__name__}: {message}".splitlines()[0][:160]


@dataclass
class ImageEmbeddings:
    embeds: torch.Tensor  # (num_ok, D), unit norm, float32 on CPU
    ok: torch.Tensor  # (num_files,) bool: which files were decoded (rows of ``embeds`` in order)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of skipped files


def check_bad_fraction(bad: list[tuple[str, str]], total: int, max_bad_fraction: float) -> None:
    if total and len(bad) > max_bad_fraction * total:
        examples = "; ".join(f"{p} ({why})" for p, why in bad[:3])
        raise DataError(
            f"{len(bad)} of {total} images could not be read (more than max_bad_fraction="
            f"{max_bad_fraction:g}); for example: {examples}. Fix or remove them, or raise --max-bad-fraction"
        )


@torch.no_grad()
def embed_images(
    model,
    paths: Sequence[Path],
    preprocess: Callable,
    *,
    batch_size: int = 64,
    workers: int = 0,
    max_bad_fraction: float = 0.05,
    progress: bool = True,
    label: str = "images",
) -> ImageEmbeddings:
    device = next(model.parameters()).device
    image_size = getattr(preprocess, "image_size", None) or model_image_size(model)
    loader = DataLoader(
        ImageFileDataset(paths, preprocess, image_size),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    embeds, oks, bad = [], [], []
    start = 0
    with progress_bar(len(paths), f"embedding {label}", progress) as advance:
        for images, ok, reasons in loader:
            for j in (~ok).nonzero().flatten().tolist():
                bad.append((str(paths[start + j]), reasons[j]))
            # stop early once the threshold is certain to be passed (bad counts only grow)
            check_bad_fraction(bad, len(paths), max_bad_fraction)
            if ok.any():
                embeds.append(model.encode_image(images[ok].to(device, non_blocking=True)).float().cpu())
            oks.append(ok)
            start += len(ok)
            advance(len(ok))
    if not embeds:
        raise DataError(f"none of the {len(paths)} images could be read")
    return ImageEmbeddings(torch.cat(embeds), torch.cat(oks), bad)


def model_image_size(model) -> int:
    return model.cfg.image_size


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """(N, D) unit-norm text embeddings, float32 on CPU."""
    device = next(model.parameters()).device
    out = []
    with progress_bar(len(texts), "embedding texts", progress) as advance:
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            ids, mask = tokenizer(chunk)
            out.append(model.encode_text(ids.to(device), mask.to(device)).float().cpu())
            advance(len(chunk))
    return torch.cat(out)


@contextmanager
def progress_bar(total: int, description: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (gone when done); ``enabled=False`` gives a no-op."""
    if not enabled:
        yield lambda n: None
        return
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
