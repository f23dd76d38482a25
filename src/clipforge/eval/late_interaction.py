"""Retrieval ranked by FILIP's token-wise late interaction instead of pooled embeddings.

Image i has P patch-token embeddings, caption j its real (non-padding) token embeddings, all
projected and unit-norm (``model.encode_image_tokens`` / ``encode_text_tokens``). FILIP's two
scores (``clipforge.objectives.filip.late_interaction_scores``):

    s^I_ij = mean over patches of the best word     -> ranks captions for an image (image -> text)
    s^T_ij = mean over words of the best patch      -> ranks images for a caption (text -> image)

Memory (float32; N images, T captions, E embedding width, P patches, L' longest caption of a
chunk in tokens, B = --batch-size): the caption tokens are embedded once and kept, T x L' x E x 4
bytes (padding past the longest caption of each chunk is cut off); the image tokens are never
kept: each batch of B images is embedded (B x P x E x 4 bytes), scored against every caption and
dropped. Scoring a batch holds about 3 x B x 64 x P x L' x 4 bytes of token-pair similarities
(64 captions at a time) plus its 2 x B x T scores. Only the top-k indices stay (N x k + T x k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from clipforge.eval.embedding import caption_batches, iter_image_embeddings, iter_text_embeddings, model_device
from clipforge.eval.retrieval import empty_topk, merge_topk

PAIR_CHUNK = 64  # captions per block of token-pair similarities


@dataclass
class TextTokens:
    """Caption token embeddings in chunks; each chunk is cut to its longest caption."""

    tokens: list[Tensor]  # per chunk: c x L' x E, float32 on the model's device
    masks: list[Tensor]  # per chunk: c x L', True = a real token

    def __len__(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tokens)

    def select(self, keep: Tensor) -> "TextTokens":
        """Only the captions where ``keep`` (bool, one per caption) is True, in order."""
        tokens, masks, start = [], [], 0
        for t, m in zip(self.tokens, self.masks):
            k = keep[start : start + len(t)].to(t.device)
            start += len(t)
            if k.any():
                tokens.append(t[k])
                masks.append(m[k])
        return TextTokens(tokens, masks)


def embed_text_tokens(model, tokenizer, texts: Sequence[str], *, batch_size: int = 256,
                      advance: Callable[[int], None] | None = None) -> TextTokens:
    """Per-token caption embeddings, ``batch_size`` captions a chunk."""
    batches = list(caption_batches(tokenizer, texts, batch_size))
    tokens, masks = [], []
    for (_, mask), embeds in zip(batches, iter_text_embeddings(model, batches, tokens=True)):
        mask = mask.to(embeds.device).bool()
        length = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
        # positions past every caption of the chunk are padding: masked out of the scores anyway
        tokens.append(embeds[:, :length].contiguous())
        masks.append(mask[:, :length].contiguous())
        if advance is not None:
            advance(len(mask))
    return TextTokens(tokens, masks)


def score_image_batches(model, images: Iterable[Tensor], texts: TextTokens, *, chunk: int = PAIR_CHUNK
                        ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """For each (non-empty) batch of uint8 images: its tokens (B x P x E) and ``(s^I, s^T)``, each B x T."""
    from clipforge.objectives.filip import late_interaction_scores

    for image_tokens in iter_image_embeddings(model, images, tokens=True):
        parts = [late_interaction_scores(image_tokens, t, m, chunk=chunk) for t, m in zip(texts.tokens, texts.masks)]
        yield image_tokens, torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def own_caption_scores(image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor) -> Tensor:
    """s^I of each of B images against only its own m captions (rows i*m .. i*m + m - 1 of the
    B*m captions' tokens): B x m. One image at a time, so a batch never scores B x B*m pairs."""
    from clipforge.objectives.filip import late_interaction_scores

    m = len(text_tokens) // len(image_tokens)
    return torch.cat([late_interaction_scores(image_tokens[i : i + 1], text_tokens[i * m : (i + 1) * m],
                                              text_mask[i * m : (i + 1) * m], sides="image")[0]
                      for i in range(len(image_tokens))])


def late_interaction_topk(model, images: Iterable[Tensor], texts: TextTokens, k: int, *, chunk: int = PAIR_CHUNK
                          ) -> tuple[Tensor, Tensor]:
    """Ranked indices, best first: ``(i2t, t2i)`` = (images x k captions by s^I, captions x k images by s^T).

    Images are streamed: an image batch's rows are complete at once, the captions' top-k images
    are merged batch by batch. Image indices count the images as ``images`` yields them.
    """
    device = model_device(model)
    i2t: list[Tensor] = []
    best = empty_topk(len(texts), device=device)
    seen = 0
    for _, s_image, s_text in score_image_batches(model, images, texts, chunk=chunk):
        i2t.append(s_image.topk(min(k, s_image.shape[1]), dim=1).indices.cpu())
        best = merge_topk(best, s_text.T, seen, k)
        seen += len(s_image)
    i2t_all = torch.cat(i2t) if i2t else torch.zeros(0, min(k, len(texts)), dtype=torch.long)
    return i2t_all, best[1].cpu()
