"""LiT and FLAME: a locked pretrained text tower, its features cached, a trainable image tower.

LiT (Zhai et al. 2022) locks one pretrained tower and trains the other contrastively. Here the
locked tower is the text side (``model.text_tower = "hf"``, e.g. all-MiniLM-L6-v2; locked but for
``model.text_unlocked_layers``) and the ViT and the text projection are trained; locking the image
tower instead is one recipe group (``[[optim.groups]] match = "visual.*"  freeze = true``).

A locked tower maps a caption to the same feature every time, so ``method.cache = true`` runs it
once per unique caption (``clipforge.train.text_cache``): the step looks the batch's raw
``captions`` up, encodes only the misses from the batch's own ``input_ids``, and feeds the pooled
features to the model's projection. With the cache the step's numbers equal the uncached step's
up to float rounding of the tower's batched matmuls (tested), and they are bitwise stable across
resume (the cached bits are what training saw).

FLAME (Cao et al. 2025, methods.md 8a), as far as an encoder allows: ``method.facets`` lists
facet prompts; every caption is encoded with all of them in ONE pass with a facet-decoupled
attention mask (``HFTextTower.forward_facets``), giving M = 1 + K text embeddings per image
(the caption, then one per facet), all cached; the ``multi_sigmoid`` term makes each image positive
with its M texts. ``method.name = "flame"`` is LiT with a default facet list.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from clipforge.config import MethodConfig, Recipe
from clipforge.methods import register_method
from clipforge.train.step import Outputs, TrainStep
from clipforge.train.text_cache import TextFeatureCache, text_key

# PromptEOL-style facet prompts adapted to an encoder: no "in one word:" generation cue (an encoder
# does not generate); each facet asks the caption about one aspect, and its tokens see the caption
FLAME_FACETS = [
    "this image description means, in one word, the main object:",
    "this image description means, in one word, the colour and pattern:",
    "this image description means, in one word, the emotion or mood:",
]


class LitConfig(MethodConfig):
    name: str = "lit"
    cache: bool = True  # run the locked text tower once per unique caption (needs a fully locked hf tower)
    cache_dir: str | None = None  # default: <run dir>/text_cache; memory only outside a training run
    facets: list[str] = Field(default_factory=list)  # FLAME: facet prompts, encoded with each caption in one pass

    def check_recipe(self, recipe: Recipe) -> None:
        m = recipe.model
        if (self.cache or self.facets) and m.text_tower != "hf":
            raise ValueError(f"method '{self.name}' with cache or facets needs a pretrained text tower: set "
                             "model.text_tower = 'hf' and model.text_pretrained (or method.cache = false)")
        if self.cache and m.text_unlocked_layers:
            raise ValueError(f"method.cache = true needs a locked text tower, but model.text_unlocked_layers = "
                             f"{m.text_unlocked_layers} trains its last layers (features change every step); "
                             "set method.cache = false or model.text_unlocked_layers = 0")
        if any(not f.strip() for f in self.facets):
            raise ValueError("method.facets: every facet prompt must be non-empty text")
        if self.facets and not any(t.name == "multi_sigmoid" for t in recipe.objective.terms):
            raise ValueError("method.facets gives each image 1 + K texts; the objective needs the multi-positive "
                             "term: [[objective.terms]] name = \"multi_sigmoid\" (and model.logit_bias_init = -10)")
        if recipe.train.accum_mode == "gradcache" and (self.cache or self.facets):
            raise ValueError(f"method '{self.name}' with cache or facets: use train.accum_mode = 'plain'")


class FlameConfig(LitConfig):
    name: str = "flame"
    facets: list[str] = Field(default_factory=lambda: list(FLAME_FACETS), min_length=1)


@register_method
class LitStep(TrainStep):
    """The plain step with the locked text tower's features from a cache (and FLAME's facets)."""

    name = "lit"
    Config = LitConfig
    supports_gradcache = False

    def __init__(self, recipe: Recipe, model: nn.Module, objective, teachers: dict[str, nn.Module]):
        super().__init__(recipe, model, objective, teachers)
        cfg: LitConfig = recipe.method
        self.use_cache, self.cache_dir, self.facets = cfg.cache, cfg.cache_dir, list(cfg.facets)
        self.pretrained = recipe.model.text_pretrained
        self.context_length = recipe.model.context_length
        if self.use_cache and not model.text.fully_frozen:
            raise ValueError("method.cache = true, but the text tower has trainable parameters; set method.cache = "
                             "false or lock the tower (model.text_unlocked_layers = 0)")
        if self.use_cache and any(k.startswith("text_") for k in self.needs):
            raise ValueError(f"the objective needs per-token text features ({sorted(self.needs)}), which a "
                             "feature cache does not keep; set method.cache = false")
        self.cache: TextFeatureCache | None = None
        self.facet_ids: list[list[int]] | None = None

    # ------------------------------------------------------------------ set-up
    def attach_run(self, run_dir: Path | None, rank: int = 0, tokenizer=None) -> None:
        """Open the cache (``method.cache_dir``, else ``<run_dir>/text_cache``) and tokenize the facets."""
        if tokenizer is not None and self.facets:
            self.facet_ids = [tokenizer.encode_piece(f) for f in self.facets]
        if not self.use_cache:
            return
        from clipforge.models.hf_text import tower_identity

        text = self.model.text
        directory = self.cache_dir or (Path(run_dir) / "text_cache" if run_dir is not None else None)
        identity = tower_identity(text.source, text.pooling, self.context_length, extra="|".join(self.facets))
        describe = {"pretrained": text.source.get("pretrained"), "pooling": text.pooling,
                    "context_length": self.context_length, "facets": self.facets}
        self.cache = TextFeatureCache(directory, identity, text.width, describe, rank)

    def _facet_ids(self) -> list[list[int]]:
        if self.facet_ids is None:  # outside the trainer: the pretrained encoder's own tokenizer
            from clipforge.models.tokenizer import HFTokenizer

            tok = HFTokenizer.from_pretrained(self.pretrained, self.context_length)
            self.facet_ids = [tok.encode_piece(f) for f in self.facets]
        return self.facet_ids

    # ------------------------------------------------------------------ text features
    @property
    def texts_per_caption(self) -> int:
        return 1 + len(self.facets)

    def encode_texts(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The tower's pooled features, (T*M)×W, caption-major (caption, then its facets)."""
        if not self.facets:
            return self.model.text(input_ids, attention_mask)["pooled"]
        features = self.model.text.forward_facets(input_ids, attention_mask, self._facet_ids())  # T×M×W
        return features.flatten(0, 1)

    def text_keys(self, captions: list[str]) -> list[str]:
        return [text_key(c, f) for c in captions for f in ["", *self.facets]]

    def cached_text_features(self, batch: dict[str, Any]) -> Tensor:
        """Features of the batch's captions from the cache; the misses are encoded (no gradient) and stored."""
        if self.cache is None:
            warnings.warn("method.cache = true but no cache was opened (attach_run); using one in memory")
            self.attach_run(None)
        captions = batch["captions"]
        keys = self.text_keys(captions)
        m = self.texts_per_caption
        _, missing = self.cache.lookup(keys)
        # captions with any row missing, each distinct caption once: encode all their rows
        todo = sorted({keys[i - i % m]: i // m for i in reversed(missing)}.values())
        if todo:
            rows = torch.tensor(todo, device=batch["input_ids"].device)
            # float32 whatever the run's autocast: the cache (shared through method.cache_dir) then holds the
            # same features for an fp32 and a bf16 run
            device_type = batch["input_ids"].device.type
            with torch.no_grad(), torch.autocast(device_type, enabled=False):
                features = self.encode_texts(batch["input_ids"][rows], batch["attention_mask"][rows]).float()
            self.cache.store([keys[c * m + j] for c in todo for j in range(m)], features)
        return self.cache.get(keys).to(batch["input_ids"].device)

    # ------------------------------------------------------------------ the step
    def encode(self, batch: dict[str, Any]) -> Outputs:
        if not self.use_cache and not self.facets:
            return super().encode(batch)
        model_needs = frozenset(k for k in self.needs if "/" not in k)
        outputs = self.teacher_outputs(batch, self.needs)
        if self.use_cache and "captions" in batch:  # the keys; a batch without raw captions runs the tower
            features = self.cached_text_features(batch)
        else:
            features = self.encode_texts(batch["input_ids"], batch["attention_mask"])
        keep = self.keep_indices(batch["images"])
        outputs.update(self.model(batch["images"], None, need=model_needs, keep_indices=keep,
                                  text_features=features))
        if self.facets:  # text row r belongs to the image of caption r // M
            owner = batch.get("text_owner")
            if owner is None:
                owner = torch.arange(batch["input_ids"].shape[0], device=features.device)
            outputs["text_owner"] = owner.repeat_interleave(self.texts_per_caption)
        return outputs

    def before_checkpoint(self) -> None:
        if self.cache is not None:  # every rank's features seen so far become durable with the checkpoint
            self.cache.flush()


@register_method
class FlameStep(LitStep):
    """LiT with FLAME's facet prompts (a default list) and the multi-positive sigmoid objective."""

    name = "flame"
    Config = FlameConfig
