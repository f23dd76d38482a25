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
from clipforge.eval.embedding import embed_captions, embed_images, model_device


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


class DecodedImages:
    """Iterating yields the images of each batch of ``paths`` that decoded (uint8 B×3×S×S).

    Every pass decodes in ``workers`` DataLoader processes and records which files were read:
    ``ok`` (bool per file, complete after the pass) and ``bad`` ((path, reason) of each skipped
    file). With ``max_bad_fraction`` a pass stops as soon as more than that fraction of all the
    files is certain to be unreadable (bad counts only grow). ``advance(n)`` follows each batch.
    """

    def __init__(self, paths: Sequence[Path], preprocess: Callable, image_size: int, *, batch_size: int = 64,
                 workers: int = 0, pin_memory: bool = False, max_bad_fraction: float | None = None,
                 advance: Callable[[int], None] | None = None) -> None:
        self.paths = list(paths)
        self.dataset = ImageFileDataset(self.paths, preprocess, image_size)
        self.batch_size, self.workers, self.pin_memory = batch_size, workers, pin_memory
        self.max_bad_fraction = max_bad_fraction
        self.advance = advance
        self.ok = torch.zeros(0, dtype=torch.bool)
        self.bad: list[tuple[str, str]] = []

    def __iter__(self) -> Iterator[torch.Tensor]:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers,
                            pin_memory=self.pin_memory, persistent_workers=False)
        oks: list[torch.Tensor] = []
        self.bad = []
        start = 0
        for images, ok, reasons in loader:
            self.bad += [(str(self.paths[start + j]), reasons[j]) for j in (~ok).nonzero().flatten().tolist()]
            if self.max_bad_fraction is not None:
                check_bad_fraction(self.bad, len(self.paths), self.max_bad_fraction)
            oks.append(ok)
            start += len(ok)
            if self.advance is not None:
                self.advance(len(ok))
            yield images[ok]
        self.ok = torch.cat(oks) if oks else torch.zeros(0, dtype=torch.bool)


def embed_image_files(
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
    """Decode and embed image files; unreadable ones are skipped, counted and named."""
    decoded = decoded_images(model, paths, preprocess, batch_size=batch_size, workers=workers,
                             max_bad_fraction=max_bad_fraction)
    with progress_bar(len(paths), f"embedding {label}", progress) as advance:
        decoded.advance = advance
        embeds = embed_images(model, decoded, out_device="cpu", non_blocking=True)
    require_some_images(decoded)
    return ImageEmbeddings(embeds, decoded.ok, decoded.bad)


def decoded_images(model, paths: Sequence[Path], preprocess: Callable, *, batch_size: int, workers: int,
                   max_bad_fraction: float | None) -> DecodedImages:
    """``DecodedImages`` at the model's input size, pinned for a CUDA model."""
    image_size = getattr(preprocess, "image_size", None) or model_image_size(model)
    return DecodedImages(paths, preprocess, image_size, batch_size=batch_size, workers=workers,
                         pin_memory=model_device(model).type == "cuda", max_bad_fraction=max_bad_fraction)


def require_some_images(decoded: DecodedImages) -> None:
    if not decoded.ok.any():
        raise DataError(f"none of the {len(decoded.paths)} images could be read")


def model_image_size(model) -> int:
    return model.cfg.image_size


def embed_text_list(model, tokenizer, texts: Sequence[str], *, batch_size: int = 256,
                    progress: bool = True) -> torch.Tensor:
    """(N, D) unit-norm text embeddings, float32 on CPU, with a progress bar."""
    with progress_bar(len(texts), "embedding texts", progress) as advance:
        return embed_captions(model, tokenizer, texts, batch_size=batch_size, out_device="cpu", advance=advance)


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
