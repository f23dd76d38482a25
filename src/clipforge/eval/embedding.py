"""The one embedding loop: batches -> ``model.encode_image`` / ``encode_text`` -> float32 rows.

Every evaluation (the trainer's hooks, distributed evaluation, ``clipforge eval``, the report,
``clipforge embed``) embeds through these functions, so batching, ``no_grad``, dtype and device
handling are the same everywhere:

- ``embed_images(model, images)``: a uint8 N×3×H×W tensor (cut into chunks) or any iterable of
  batches (a DataLoader, a generator of decoded images). An empty batch is skipped: callers that
  decode files yield only the images that decoded (see ``clipforge.eval.datasets.DecodedImages``).
- ``embed_texts(model, input_ids, attention_mask)`` and ``embed_captions(model, tokenizer, texts)``.
- ``tokens=True`` gives FILIP's per-token embeddings (N×P×E images, N×L×E texts) instead.
- ``embed_batches(model, batch_of, n_items, batch_size, rank=r, world_size=W)``: batch dicts
  (images + captions of the same items), optionally sharded between ranks; ``put_in_order`` puts
  the ranks' rows back in item order.

Rows are float32 and stay on the model's device unless ``out_device`` says otherwise ("cpu"
moves each batch off the accelerator as soon as it is embedded, so large sets fit).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def chunk_ranges(n_items: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """The chunks ``[s, s + batch_size)`` of items 0..n-1 that ``rank`` embeds: chunks rank, rank + W, ...

    Whole chunks of the single-process order keep each row bitwise equal to the single-process
    one (the same batch content and shape run the same kernels).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    chunks = [range(s, min(s + batch_size, n_items)) for s in range(0, n_items, batch_size)]
    return chunks[rank::world_size]


def num_rounds(n_items: int, batch_size: int, world_size: int = 1) -> int:
    """Forward passes every rank runs: the chunk count of the busiest rank."""
    return -(-len(chunk_ranges(n_items, batch_size)) // world_size)


def caption_batches(tokenizer, texts: Sequence[str], batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``(input_ids, attention_mask)`` of each chunk of ``texts``, tokenized chunk by chunk."""
    for start in range(0, len(texts), batch_size):
        yield tokenizer(list(texts[start : start + batch_size]))


def _encoder(model, kind: str, tokens: bool) -> Callable[..., Tensor]:
    name = f"encode_{kind}_tokens" if tokens else f"encode_{kind}"
    encode = getattr(model, name, None)
    if encode is None:
        raise TypeError(f"{type(model).__name__} has no {name}(); "
                        + ("late-interaction scoring needs a model with per-token embeddings (clipforge's CLIP)"
                           if tokens else "pass a CLIP-style model"))
    return encode


def _encoded(encode: Callable[..., Tensor], batches: Iterable[tuple[Tensor, ...]], device, out_device,
             non_blocking: bool) -> Iterator[Tensor]:
    for inputs in batches:
        if len(inputs[0]) == 0:  # every sample of the batch was skipped (undecodable images)
            continue
        # no_grad around the call only: a generator must not leave grad mode off for its consumer
        with torch.no_grad():
            rows = encode(*(x.to(device, non_blocking=non_blocking) for x in inputs)).float()
        yield rows if out_device is None else rows.to(out_device)


def iter_image_embeddings(model, batches: Iterable[Tensor], *, tokens: bool = False, device=None,
                          out_device=None, non_blocking: bool = False) -> Iterator[Tensor]:
    """float32 embeddings of each non-empty batch of uint8 images, as the batches come."""
    device = device or model_device(model)
    yield from _encoded(_encoder(model, "image", tokens), ((b,) for b in batches), device, out_device, non_blocking)


def iter_text_embeddings(model, batches: Iterable[tuple[Tensor, Tensor]], *, tokens: bool = False, device=None,
                         out_device=None) -> Iterator[Tensor]:
    """float32 embeddings of each batch of ``(input_ids, attention_mask)``."""
    device = device or model_device(model)
    yield from _encoded(_encoder(model, "text", tokens), batches, device, out_device, False)


def _batches_of(x: Tensor | Iterable[Tensor], batch_size: int) -> Iterable[Tensor]:
    if isinstance(x, Tensor):
        return (x[s : s + batch_size] for s in range(0, len(x), batch_size))
    return x


def _cat(rows: list[Tensor], model, out_device) -> Tensor:
    if rows:
        return torch.cat(rows)
    # nothing to embed (or nothing decoded): an empty (0, E) block keeps callers' shapes simple
    return torch.zeros(0, model.cfg.embed_dim, device=out_device or model_device(model))


def embed_images(model, images: Tensor | Iterable[Tensor], *, batch_size: int = 256, tokens: bool = False,
                 device=None, out_device=None, non_blocking: bool = False) -> Tensor:
    """Unit-norm float32 image embeddings N×E (per-patch N×P×E with ``tokens=True``).

    ``images``: a uint8 N×3×H×W tensor, embedded ``batch_size`` at a time, or an iterable of
    batches (embedded as they come; empty batches are skipped).
    """
    batches = _batches_of(images, batch_size)
    return _cat(list(iter_image_embeddings(model, batches, tokens=tokens, device=device, out_device=out_device,
                                           non_blocking=non_blocking)), model, out_device)


def embed_texts(model, input_ids: Tensor, attention_mask: Tensor | None = None, *, batch_size: int = 256,
                tokens: bool = False, device=None, out_device=None) -> Tensor:
    """Unit-norm float32 text embeddings N×E (per-token N×L×E with ``tokens=True``)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batches = zip(_batches_of(input_ids, batch_size), _batches_of(attention_mask, batch_size))
    return _cat(list(iter_text_embeddings(model, batches, tokens=tokens, device=device, out_device=out_device)),
                model, out_device)


def embed_captions(model, tokenizer, texts: Sequence[str], *, batch_size: int = 256, device=None,
                   out_device=None, advance: Callable[[int], None] | None = None) -> Tensor:
    """Tokenize and embed ``texts`` ``batch_size`` at a time: unit-norm float32 N×E.

    ``advance(n)`` is called after each chunk (a progress bar).
    """
    rows = []
    for batch in iter_text_embeddings(model, caption_batches(tokenizer, texts, batch_size), device=device,
                                      out_device=out_device):
        rows.append(batch)
        if advance is not None:
            advance(len(batch))
    return _cat(rows, model, out_device)


def embed_batches(
    model,
    batch_of: Callable[[list[int]], dict],
    n_items: int,
    batch_size: int,
    *,
    images: bool = True,
    texts: bool = True,
    keep: Sequence[str] = (),
    rank: int = 0,
    world_size: int = 1,
    device=None,
    out_device=None,
) -> dict[str, Tensor]:
    """Embed items 0..n-1 through batch dicts: ``batch_of(indices)`` gives ``images`` and/or
    ``input_ids`` + ``attention_mask`` (and the ``keep`` keys, e.g. ``labels``) of those items.

    Returns ``{"images": N×E, "texts": N×E, <keep keys>, "index": item position of each row}``.
    With ``world_size > 1`` this rank embeds chunks rank, rank + W, ... (``chunk_ranges``) and runs
    as many forward passes as the busiest rank: once out of chunks it embeds its last chunk (or
    item 0) again and drops the rows, because FSDP needs every rank in every forward.
    """
    device = device or model_device(model)
    mine = chunk_ranges(n_items, batch_size, rank, world_size)
    rounds = num_rounds(n_items, batch_size, world_size)
    names = (["images"] if images else []) + (["texts"] if texts else []) + list(keep) + ["index"]
    rows: dict[str, list[Tensor]] = {name: [] for name in names}
    for i in range(rounds):
        idx = list(mine[i] if i < len(mine) else mine[-1] if mine else range(0, 1))
        batch = batch_of(idx)
        got = {"index": torch.tensor(idx, dtype=torch.long)}
        if images:
            got["images"] = embed_images(model, batch["images"], batch_size=len(idx), device=device)
        if texts:
            got["texts"] = embed_texts(model, batch["input_ids"], batch["attention_mask"], batch_size=len(idx),
                                       device=device)
        for key in keep:
            got[key] = batch[key]
        padding = i >= len(mine)
        for name in names:  # a padding round keeps no rows, only their shape (a rank may hold no chunk)
            rows[name].append(got[name][:0] if padding else got[name])
    target = out_device or device
    if not rounds:
        return {name: torch.zeros(0, model.cfg.embed_dim, device=target) if name in ("images", "texts")
                else torch.zeros(0, dtype=torch.long, device=target) for name in names}
    return {name: torch.cat(parts).to(target) for name, parts in rows.items()}


def put_in_order(parts: Sequence[Tensor], indices: Sequence[Tensor], n_items: int) -> Tensor:
    """Rows embedded by several ranks -> one tensor in item order.

    ``indices[r]`` holds the item position of each row of ``parts[r]``; -1 marks a padding row.
    """
    first = parts[0]
    out = first.new_empty(n_items, *first.shape[1:])
    for part, index in zip(parts, indices):
        index = index.to(part.device)
        keep = index >= 0
        out[index[keep]] = part[keep]
    return out
