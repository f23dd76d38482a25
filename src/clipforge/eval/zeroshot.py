"""Zero-shot classification (methods.md §1).

The class embedding is normalise(mean_k normalise(g(template_k(class)))): each filled template is
embedded and L2-normalised, the K embeddings are averaged, and the mean is normalised again.
Prediction is argmax over classes of image · class embedding (the logit scale cannot change it).
"""

from __future__ import annotations

import re
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

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
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    _warn_if_cut(tokenizer, prompts)
    embeds = embed_captions(model, tokenizer, prompts, batch_size=batch_size)
    per_prompt = F.normalize(embeds, dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


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
