"""The shapes ``binding`` evaluation: are colours and shapes bound to the right object, and the relation read?

Each image of the split (``clipforge.data.synthetic``, split "binding", seeded by
``shapes.holdout_seed`` so every run is scored on the same images) shows two objects; its caption
competes with K distractors that use the same words bound differently
(``synthetic.DISTRACTOR_KINDS``). Metrics, as fractions with CLIP_benchmark-style flat keys:

- ``binding_acc``: images whose caption scores above all of its distractors (chance 1 / (1 + K));
- ``binding_acc_<kind>``: the caption against that one distractor (chance 1/2);
- ``image_retrieval_recall@1`` (text -> image over the split): captions whose best image shows
  the scene they describe;
- ``text_retrieval_recall@1`` (image -> text over the split's captions): images whose best caption
  describes them.

A tie counts as a random pick among the tied candidates (the caption tied with one distractor
scores 1/2), so a constant score gives exactly chance. "The same scene" compares layouts (which
object is left of / above which), so two images of one scene, or a synonym ("to the left of"),
are not counted as misses.
"""

from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import torch
from torch import Tensor

from clipforge.data.synthetic import DISTRACTOR_KINDS, PairScene, ShapesDataset

EXAMPLES = 3  # scenes written into the result, so a reader sees what was asked


def selection_accuracy(scores: Tensor) -> float:
    """Mean over rows of P(column 0 wins) when ties are broken at random; scores: N x (1 + K)."""
    own = torch.zeros_like(scores, dtype=torch.bool)
    own[:, 0] = True
    return tie_split_hits(scores, own)


def tie_split_hits(scores: Tensor, hit: Tensor) -> float:
    """Mean over rows of the fraction of the row's best-scoring candidates that are hits."""
    best = scores == scores.max(dim=1, keepdim=True).values
    return ((best & hit).sum(1).double() / best.sum(1).double()).mean().item()


def binding_metrics(selection: Tensor, i2t: Tensor, t2i: Tensor, kinds: Sequence[str],
                    layouts: Sequence[Hashable]) -> dict[str, float]:
    """Binding metrics from scores, however they were computed (pooled or late interaction).

    ``selection``: N x (1 + K), image i against its own caption (column 0) and one distractor per
    ``kinds``. ``i2t``: N images x N captions (caption j = image j's) ranking captions for an image;
    ``t2i``: N captions x N images ranking images for a caption. ``layouts[i]``: image i's scene.
    """
    n = len(layouts)
    if selection.shape != (n, 1 + len(kinds)):
        raise ValueError(f"selection scores must be {n} x {1 + len(kinds)} (own caption + one per kind), "
                         f"got {tuple(selection.shape)}")
    metrics = {"binding_acc": selection_accuracy(selection)}
    for j, kind in enumerate(kinds):
        metrics[f"binding_acc_{kind}"] = selection_accuracy(selection[:, [0, 1 + j]])
    same = _same_scene(layouts)
    metrics["image_retrieval_recall@1"] = tie_split_hits(t2i, same)
    metrics["text_retrieval_recall@1"] = tie_split_hits(i2t, same)
    return metrics


def binding_chance(kinds: Sequence[str], layouts: Sequence[Hashable]) -> dict[str, float]:
    """What a constant score gets on each metric."""
    chance = {"binding_acc": 1.0 / (1 + len(kinds)), **{f"binding_acc_{k}": 0.5 for k in kinds}}
    same = _same_scene(layouts).double()
    chance["image_retrieval_recall@1"] = chance["text_retrieval_recall@1"] = same.mean().item()
    return chance


def _same_scene(layouts: Sequence[Hashable]) -> Tensor:
    ids = {layout: i for i, layout in enumerate(dict.fromkeys(layouts))}
    scene = torch.tensor([ids[layout] for layout in layouts])
    return scene[:, None] == scene[None, :]


def binding_candidates(scenes: Sequence[PairScene], kinds: Sequence[str] = DISTRACTOR_KINDS) -> list[list[str]]:
    """Per image: its own caption, then one distractor caption per kind."""
    return [[s.caption()] + [s.distractors()[kind].caption() for kind in kinds] for s in scenes]


def pooled_binding_scores(model, tokenizer, images: Iterable[Tensor], candidates: list[list[str]],
                          progress: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(selection, i2t, t2i)`` from pooled embeddings (cosine similarity)."""
    from clipforge.eval.datasets import embed_text_list
    from clipforge.eval.embedding import embed_images

    image_embeds = embed_images(model, images, out_device="cpu")
    flat = [c for row in candidates for c in row]
    texts = embed_text_list(model, tokenizer, flat, progress=progress).view(len(candidates), len(candidates[0]), -1)
    selection = torch.einsum("ne,nce->nc", image_embeds, texts)
    i2t = image_embeds @ texts[:, 0].T
    return selection, i2t, i2t.T


def late_interaction_binding_scores(model, tokenizer, images: Iterable[Tensor], candidates: list[list[str]],
                                    progress: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(selection, i2t, t2i)`` from FILIP's late interaction: i2t and selection by s^I, t2i by s^T.

    Images are streamed; each batch's candidate captions are embedded with it (memory: one batch).
    """
    from clipforge.eval.datasets import progress_bar
    from clipforge.eval.late_interaction import embed_text_tokens, own_caption_scores, score_image_batches

    m = len(candidates[0])
    with progress_bar(len(candidates), "embedding caption tokens", progress) as advance:
        own = embed_text_tokens(model, tokenizer, [row[0] for row in candidates], advance=advance)
    selection, i2t, t2i = [], [], []
    start = 0
    for image_tokens, s_image, s_text in score_image_batches(model, images, own):
        b = len(image_tokens)
        batch_candidates = [c for row in candidates[start : start + b] for c in row]
        cand = embed_text_tokens(model, tokenizer, batch_candidates, batch_size=b * m)
        selection.append(own_caption_scores(image_tokens, cand.tokens[0], cand.masks[0]).cpu())
        i2t.append(s_image.cpu())
        t2i.append(s_text.cpu())
        start += b
    return torch.cat(selection), torch.cat(i2t), torch.cat(t2i).T


def evaluate_binding(model, tokenizer, shapes_cfg, image_size: int, *, similarity: str = "pooled",
                     batch_size: int = 64, progress: bool = False) -> dict:
    """Score the binding split: ``{"metrics", "data", "binding"}`` in ``clipforge.evaluate``'s layout."""
    from clipforge.eval.embedding import chunk_ranges

    dataset = ShapesDataset(shapes_cfg, image_size, seed=shapes_cfg.holdout_seed, split="binding")
    n = len(dataset)
    scenes = [dataset.binding_scene(i) for i in range(n)]
    candidates = binding_candidates(scenes)
    images = (dataset.render_batch(chunk)[0] for chunk in chunk_ranges(n, batch_size))
    score = late_interaction_binding_scores if similarity == "late-interaction" else pooled_binding_scores
    selection, i2t, t2i = score(model, tokenizer, images, candidates, progress)
    layouts = [s.layout() for s in scenes]
    return {
        "metrics": binding_metrics(selection, i2t, t2i, DISTRACTOR_KINDS, layouts),
        "data": {"images": n, "captions": n, "distractors": n * len(DISTRACTOR_KINDS), "skipped": 0,
                 "skipped_files": []},
        "binding": {
            "chance": binding_chance(DISTRACTOR_KINDS, layouts),
            "distractor_kinds": list(DISTRACTOR_KINDS),
            "seed": shapes_cfg.holdout_seed,
            "image_size": image_size,
            "examples": [dict(zip(["caption", *DISTRACTOR_KINDS], row))
                         for row in candidates[:: max(1, n // EXAMPLES)][:EXAMPLES]],
        },
    }
