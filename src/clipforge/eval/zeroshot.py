"""Zero-shot classification (methods.md §1), with pooled embeddings or FILIP's late interaction.

Pooled: the class embedding is normalise(mean_k normalise(g(template_k(class)))): each filled
template is embedded and L2-normalised, the K embeddings are averaged, and the mean is normalised
again. Prediction is argmax over classes of image · class embedding (the logit scale cannot change it).

Late interaction (FILIP, methods.md §6): classifying an image ranks texts for it, so the score is
s^I (the mean over the image's patches of each patch's best-matching prompt token), and the prompt
ensemble averages the K prompts' scores: a token-wise score has no single class vector to average.
"""

from __future__ import annotations

import re
import warnings
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from clipforge.eval.embedding import embed_captions


def fill_template(template: str, classname: str) -> str:
    """``template.format(classname)``, turning "a {}" into "an {}" before a vowel ("an orange star")."""
    if classname[:1].lower() in "aeiou":
        template = re.sub(r"\b([Aa]) \{\}", r"\1n {}", template)
    return template.format(classname)


@torch.no_grad()
def zero_shot_classifier(
    model, tokenizer, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """(num_classes, embed_dim) matrix of unit-norm class embeddings."""
    prompts = filled_prompts(tokenizer, classnames, templates)
    embeds = embed_captions(model, tokenizer, prompts, batch_size=batch_size)
    per_prompt = F.normalize(embeds, dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def filled_prompts(tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class-major (class c's prompts are consecutive)."""
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    _warn_if_cut(tokenizer, prompts)
    return prompts


@torch.no_grad()
def late_interaction_zero_shot_logits(model, tokenizer, images: Iterable[Tensor], classnames: Sequence[str],
                                      templates: Sequence[str]) -> Tensor:
    """(num_images, num_classes) float32 on CPU: per class, the mean over its prompts of s^I.

    ``images``: batches of uint8 images (streamed; only one batch's patch tokens exist at a time).
    """
    from clipforge.eval.late_interaction import embed_text_tokens, score_image_batches

    prompts = embed_text_tokens(model, tokenizer, filled_prompts(tokenizer, classnames, templates))
    rows = [s_image.view(len(s_image), len(classnames), len(templates)).mean(dim=2).cpu()
            for _, s_image, _ in score_image_batches(model, images, prompts)]
    return torch.cat(rows) if rows else torch.zeros(0, len(classnames))


def _warn_if_cut(tokenizer, prompts: list[str]) -> None:
    """Warn (once per call: once per dataset's classifier) when prompts do not fit the text context: the
    tokenizer cuts them silently, and a cut that drops the class name makes classes indistinguishable."""
    truncated = getattr(tokenizer, "truncated", None)  # clipforge's tokenizers; others are not checked
    if truncated is None or not prompts:
        return
    cut = [p for p, was_cut in zip(prompts, truncated(prompts)) if was_cut]
    if cut:
        context = getattr(tokenizer, "context_length", "?")
        warnings.warn(
            f"{len(cut)} of {len(prompts)} zero-shot prompts are longer than the model's context ({context} "
            f"tokens) and were cut, e.g. {cut[0]!r}; shorter templates or class names keep the whole prompt",
            stacklevel=2)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """top-1, top-5 and mean per-class recall (CLIP_benchmark key names)."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    correct1 = topk[:, 0] == labels
    correct5 = (topk == labels[:, None]).any(dim=1)
    recalls = [correct1[labels == c].sum().item() / (labels == c).sum().item() for c in range(num_classes) if (labels == c).any()]
    return {
        "acc1": correct1.sum().item() / len(labels),
        "acc5": correct5.sum().item() / len(labels),
        "mean_per_class_recall": sum(recalls) / max(1, len(recalls)),
    }
