"""CLIP: an image tower and a text tower projected into one embedding space.

    images (uint8 or normalised float) -> ViT, ResNet or timm -> pooled N×Wv -> image_projection -> L2 norm -> N×E
    input_ids (+ attention_mask)       -> text transformer -> pooled N×Wt -> text_projection -> L2 norm -> N×E

plus the learnable logit scale t = exp(logit_scale) (and SigLIP's logit bias). The objective turns
these into a loss. Methods that need more than embeddings ask for it by name with ``need``.

The state dict holds plain, unshared tensors, so ``CLIP(ModelConfig(**cfg)).load_state_dict(...)``
round-trips through safetensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import ModelConfig
from clipforge.models.fused_mlp import FusedMLPUnavailable, check_available
from clipforge.models.lexical import LexicalHead, keep_top_k, max_pooled_logits, weights_from_pooled
from clipforge.models.resnet import ModifiedResNet
from clipforge.models.text import TextTransformer
from clipforge.models.vit import MLP, Attention, VisionTransformer, attention_kernels

# extras a caller may ask forward() for
EXTRAS = frozenset({"image_pooled", "text_pooled", "image_tokens", "text_tokens", "image_token_embeds",
                    "text_token_embeds", "cls_attention", "kept_indices", "image_lexical", "text_lexical",
                    "image_lexical_logits", "text_lexical_logits"})
LEXICAL = frozenset({"image_lexical", "text_lexical", "image_lexical_logits", "text_lexical_logits"})


def build_image_tower(cfg: ModelConfig) -> nn.Module:
    """The ViT, CLIP's ResNet or a timm backbone (model.image_tower); each maps images to {"pooled": N×W, ...}."""
    if cfg.image_tower == "resnet":
        return ModifiedResNet(cfg.image_size, cfg.resnet_layers, cfg.vision_width, cfg.vision_heads)
    if cfg.image_tower == "timm":
        from clipforge.models.timm_tower import TimmTower

        return TimmTower(cfg.timm_model, cfg.timm_pool, cfg.timm_proj, cfg.embed_dim, cfg.timm_drop_path)
    return VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.vision_width,
        layers=cfg.vision_layers,
        heads=cfg.vision_heads,
        mlp_ratio=cfg.mlp_ratio,
        activation=cfg.activation,
        pool=cfg.vision_pool,
        patch_dropout=cfg.patch_dropout,
        block_shapes=cfg.block_shapes("vision"),
        head_dim=cfg.head_dim("vision"),
    )


class CLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = build_image_tower(cfg)
        if cfg.text_tower == "hf":  # a pretrained encoder (LiT, FLAME); its weights: load_pretrained or a checkpoint
            from clipforge.models.hf_text import HFTextTower

            self.text = HFTextTower(cfg.text_source, cfg.text_pooling, cfg.text_unlocked_layers)
            text_width = self.text.width
        else:
            self.text = TextTransformer(
                vocab_size=cfg.vocab_size,
                context_length=cfg.context_length,
                width=cfg.text_width,
                layers=cfg.text_layers,
                heads=cfg.text_heads,
                mlp_ratio=cfg.mlp_ratio,
                activation=cfg.activation,
                block_shapes=cfg.block_shapes("text"),
                head_dim=cfg.head_dim("text"),
            )
            text_width = cfg.text_width
        # both projections are built before either is initialised: the RNG draws (and so every seeded
        # model's initial weights) stay those of the plain CLIP
        # the ResNet's projection is its attention pool's output projection, which has a bias (models/resnet.py);
        # a timm trunk with timm_proj = "timm" projects with its own classifier, "none" not at all
        pooled_width = cfg.vision_pooled_width
        if cfg.image_tower == "timm" and cfg.timm_proj != "linear":
            self.image_projection = nn.Identity()
        else:
            bias = cfg.image_tower == "resnet" or (cfg.image_tower == "timm" and cfg.timm_proj_bias)
            self.image_projection = nn.Linear(pooled_width, cfg.embed_dim, bias=bias)
        if cfg.text_projection == "mlp":  # FLAME's adapter: 2-layer GELU MLP + norm
            self.text_projection = nn.Sequential(nn.Linear(text_width, text_width), nn.GELU(),
                                                 nn.Linear(text_width, cfg.embed_dim), nn.LayerNorm(cfg.embed_dim))
        else:
            self.text_projection = nn.Linear(text_width, cfg.embed_dim, bias=False)
        if isinstance(self.image_projection, nn.Linear):
            nn.init.normal_(self.image_projection.weight, std=pooled_width**-0.5)
            if self.image_projection.bias is not None:
                nn.init.zeros_(self.image_projection.bias)
        if cfg.text_projection == "linear":
            nn.init.normal_(self.text_projection.weight, std=text_width**-0.5)

        if cfg.lexical_head:  # LexLIP: per-token logits over the text vocabulary, max-pooled
            self.image_lexical = LexicalHead(cfg.vision_width, cfg.vocab_size)
            self.text_lexical = LexicalHead(cfg.text_width, cfg.vocab_size)

        # ln of the logit scale t; the trainer keeps t <= logit_scale_max via clamp_logit_scale_()
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        if cfg.logit_bias_init is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.logit_bias_init)))
        else:
            self.logit_bias = None

        # preprocessing constants come from the config, so they stay out of the state dict
        self.register_buffer("image_mean", torch.tensor(cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(cfg.image_std).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ helpers
    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp ln t to [0, ln logit_scale_max] in place; call after every optimiser step."""
        self.logit_scale.clamp_(0.0, math.log(self.cfg.logit_scale_max))

    def set_low_precision_residual(self, on: bool) -> None:
        """train.bf16_residual: under autocast, the towers' residual streams in autocast's dtype
        (models/vit.py to_residual_dtype). A Hugging Face text tower keeps its own dtypes."""
        self.visual.low_precision_residual = on
        if isinstance(self.text, TextTransformer):
            self.text.low_precision_residual = on

    def set_grad_checkpointing(self, on: bool) -> None:
        """train.grad_checkpointing: every transformer block of both towers recomputes its activations
        in backward (models/vit.py run_block); a Hugging Face text tower through its own switch."""
        if on and isinstance(self.visual, ModifiedResNet):
            # a recomputed forward would update the BatchNorm running statistics a second time
            raise ValueError("train.grad_checkpointing recomputes transformer blocks; the ResNet image tower "
                             "(model.image_tower = 'resnet') does not support it (its BatchNorm statistics would "
                             "be updated twice): leave it off, or lower data.batch_size and raise train.accum_steps")
        self.visual.grad_checkpointing = on
        if isinstance(self.text, TextTransformer):
            self.text.grad_checkpointing = on
        else:
            self.text.set_activation_checkpointing(on)

    def set_fused_mlp(self, on: bool) -> None:
        """train.fused_mlp: every transformer MLP of both towers (not a Hugging Face text tower's)
        through the fused Triton GEMMs of models/fused_mlp.py. Refused where the kernels cannot run,
        and where a method hooks the MLP's linear layers (the fused path does not call them)."""
        mlps = {name: m for name, m in self.named_modules() if isinstance(m, MLP)}
        if on:
            check_available(next(self.parameters()).device)
            hooked = [name for name, m in mlps.items()
                      if any(layer._forward_pre_hooks or layer._forward_hooks for layer in (m.fc, m.proj))]
            if hooked:
                raise FusedMLPUnavailable(
                    f"train.fused_mlp bypasses the MLP's linear layers, and this run hooks them ({hooked[0]}, "
                    f"{len(hooked)} MLPs; e.g. tinyclip_prune's masks): leave train.fused_mlp=false for this method")
        for m in mlps.values():
            m.fused = on

    def set_attention_backend(self, name: str) -> None:
        """train.attention_backend: the one fused attention kernel every transformer attention of both
        towers may use, the maths where it cannot ("auto": PyTorch's choice). A Hugging Face text
        tower keeps its own."""
        kernels = attention_kernels(name)
        for m in self.modules():
            if isinstance(m, Attention):
                m.kernels = kernels

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N×3×H×W in [0, 255] -> float, scaled to [0, 1], mean/std normalised.
        Float input is assumed to be normalised already and passes through unchanged."""
        if images.dtype != torch.uint8:
            return images
        x = images.to(self.image_mean.dtype).div_(255.0)
        return (x - self.image_mean) / self.image_std

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        """L2-normalised image embeddings N×E (random patch dropout applies in training mode);
        ``sparse=True``: the lexical weights N×|V|, top-k kept, as a sparse COO tensor."""
        if sparse:
            return self._sparse(self._image_outputs(images, frozenset({"image_lexical"}), None)["image_lexical"])
        pooled = self.visual(self.normalize_images(images))["pooled"]
        return F.normalize(self.image_projection(pooled), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    sparse: bool = False) -> torch.Tensor:
        """L2-normalised text embeddings N×E, read at the end-of-text token;
        ``sparse=True``: the lexical weights N×|V|, top-k kept, as a sparse COO tensor."""
        if sparse:
            return self._sparse(self.forward(None, input_ids, attention_mask, need={"text_lexical"})["text_lexical"])
        pooled = self.text(input_ids, attention_mask)["pooled"]
        return F.normalize(self.text_projection(pooled), dim=-1)

    def _sparse(self, weights: torch.Tensor) -> torch.Tensor:
        return keep_top_k(weights, self.cfg.lexical_top_k).to_sparse()

    def _check_lexical(self, need: frozenset[str]) -> None:
        if LEXICAL & need and not self.cfg.lexical_head:
            raise ValueError("lexical (sparse) outputs need a model with lexical heads: train with "
                             "model.lexical_head = true (e.g. the lexlip-shapes recipe)")

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Per-patch embeddings N×P×E (projected, L2-normalised per token): FILIP's image token set."""
        tokens = self.visual(self.normalize_images(images), return_tokens=True)["tokens"]
        return F.normalize(self.image_projection(tokens), dim=-1)

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token embeddings N×L×E (projected, L2-normalised); positions where attention_mask is 0 are padding."""
        tokens = self.text(input_ids, attention_mask, return_tokens=True)["tokens"]
        return F.normalize(self.text_projection(tokens), dim=-1)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        images: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        need: Iterable[str] = frozenset(),
        keep_indices: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Embeddings and logit scale; extras only when named in ``need``:

        - "image_pooled": N×Wv pooled image feature before the projection (A-CLIP's SSL heads read it)
        - "text_pooled":  N×Wt pooled text feature before the projection (BarLIP / SiamLIP heads read it)
        - "image_tokens": N×K×Wv patch tokens after the final LayerNorm, before projection
        - "text_tokens":  N×L×Wt token features after the final LayerNorm, before projection
        - "image_token_embeds" / "text_token_embeds": the tokens above projected into the joint space
          and L2-normalised per token (FILIP's late interaction)
        - "cls_attention": list (one per layer) of N×H×K attention from the class token to patches
          (computed with explicit softmax, slower; the default path uses fused SDPA)
        - "kept_indices": N×K indices of the patches the ViT saw (all patches when none dropped)
        - "image_lexical" / "text_lexical": LexLIP's lexical weights N×|V| >= 0 (lexical heads only);
          "image_lexical_logits" / "text_lexical_logits": the max-pooled logits they come from

        ``keep_indices`` (N×K) selects patches explicitly, e.g. A-CLIP's attentive masking.
        ``images`` or ``input_ids`` may be None to run one tower only (its outputs are then absent).
        ``text_features`` (T×Wt): pooled text features computed elsewhere (a frozen tower's cache,
        clipforge.train.text_cache); the text tower is skipped and only the projection runs.
        """
        need = frozenset(need)
        unknown = need - EXTRAS
        if unknown:
            raise ValueError(f"unknown extras {sorted(unknown)}; available: {sorted(EXTRAS)}")
        self._check_lexical(need)

        out: dict[str, torch.Tensor | list[torch.Tensor]] = {"logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if images is not None:
            out.update(self._image_outputs(images, need, keep_indices))
        if text_features is not None:
            out["text_embeds"] = F.normalize(self.text_projection(text_features), dim=-1)
            if "text_pooled" in need:
                out["text_pooled"] = text_features
        elif input_ids is not None:
            text = self.text(input_ids, attention_mask, return_tokens=bool(
                {"text_tokens", "text_token_embeds", "text_lexical", "text_lexical_logits"} & need))
            out["text_embeds"] = F.normalize(self.text_projection(text["pooled"]), dim=-1)
            if "text_pooled" in need:
                out["text_pooled"] = text["pooled"]
            if "text_tokens" in need:
                out["text_tokens"] = text["tokens"]
            if "text_token_embeds" in need:
                out["text_token_embeds"] = F.normalize(self.text_projection(text["tokens"]), dim=-1)
            if {"text_lexical", "text_lexical_logits"} & need:  # padding (after end-of-text): out of the max
                out.update(self._lexical("text", max_pooled_logits(self.text_lexical(text["tokens"]), attention_mask),
                                         need))
        return out

    @staticmethod
    def _lexical(side: str, pooled: torch.Tensor, need: frozenset[str]) -> dict[str, torch.Tensor]:
        """The lexical weights l = log(1 + ReLU(pooled)) and/or the max-pooled logits themselves (LexLIP's
        bottleneck takes their softmax), as asked."""
        out = {}
        if f"{side}_lexical" in need:
            out[f"{side}_lexical"] = weights_from_pooled(pooled)
        if f"{side}_lexical_logits" in need:
            out[f"{side}_lexical_logits"] = pooled
        return out

    def _image_outputs(self, images: torch.Tensor, need: frozenset[str], keep_indices: torch.Tensor | None) -> dict:
        vision = self.visual(
            self.normalize_images(images),
            keep_indices=keep_indices,
            return_tokens=bool({"image_tokens", "image_token_embeds", "image_lexical", "image_lexical_logits"} & need),
            return_cls_attention="cls_attention" in need,
        )
        out: dict[str, torch.Tensor | list[torch.Tensor]] = {
            "image_embeds": F.normalize(self.image_projection(vision["pooled"]), dim=-1)
        }
        if "image_pooled" in need:
            out["image_pooled"] = vision["pooled"]
        if "image_tokens" in need:
            out["image_tokens"] = vision["tokens"]
        if "image_token_embeds" in need:
            out["image_token_embeds"] = F.normalize(self.image_projection(vision["tokens"]), dim=-1)
        if {"image_lexical", "image_lexical_logits"} & need:  # the pooled token and every (kept) patch vote
            self._check_lexical(need)
            tokens = torch.cat([vision["pooled"][:, None], vision["tokens"]], dim=1)
            out.update(self._lexical("image", max_pooled_logits(self.image_lexical(tokens)), need))
        if "cls_attention" in need:
            out["cls_attention"] = vision["cls_attention"]
        if "kept_indices" in need:
            if not isinstance(self.visual, VisionTransformer):
                raise ValueError(f"kept_indices are the ViT's patches; model.image_tower = '{self.cfg.image_tower}' "
                                 "has none: use model.image_tower = 'vit' for this method")
            kept = vision.get("kept_indices")
            if kept is None:  # nothing dropped: every patch, in order
                kept = torch.arange(self.visual.num_patches, device=images.device).expand(images.shape[0], -1)
            out["kept_indices"] = kept
        return out
