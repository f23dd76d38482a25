"""The text tower: a causal transformer pooled at the end-of-text token, as in CLIP.

Shapes: N = batch, L = sequence length (<= context length), W = width.

Captions are right-padded. With causal attention a real token only sees tokens before it, so it
never sees padding and no padding mask is needed; the pooled feature is read at the last real
token (end-of-text), position ``attention_mask.sum(1) - 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.vit import LayerNorm, build_blocks, init_blocks_, run_block, to_residual_dtype, token_at


class TextTransformer(nn.Module):
    """Token ids N×L -> pooled feature N×W (plus per-token features on request)."""

    def __init__(
        self, vocab_size: int, context_length: int, width: int, layers: int, heads: int, mlp_ratio: float = 4.0,
        activation: str = "gelu", block_shapes: list[tuple[int, int]] | None = None, head_dim: int | None = None,
    ):
        """``block_shapes`` / ``head_dim``: a pruned model's layers, as VisionTransformer's."""
        super().__init__()
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(context_length, width))
        shapes = block_shapes or [(heads, int(width * mlp_ratio))] * layers
        self.blocks = build_blocks(width, shapes, activation, head_dim)
        self.ln_final = LayerNorm(width)
        self.low_precision_residual = False  # train.bf16_residual: see to_residual_dtype
        self.grad_checkpointing = False  # train.grad_checkpointing: see run_block
        self.init_weights_()

    def init_weights_(self) -> None:
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        init_blocks_(self.blocks, self.pos_embed.shape[1])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_tokens: bool = False,
        dropout: float = 0.0,
        token_embeds: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Returns {"pooled": N×W} and, when asked, "tokens": N×L×W after the final LayerNorm
        (positions after end-of-text are padding and carry no meaning).

        ``dropout`` (training only): elementwise dropout on the residual stream entering every block,
        CLIP 🚀's "local mode" for its text views (the released code's ``--text-dropout-prob``).
        ``token_embeds`` (N×L×W): used in the place of the token embeddings of ``input_ids`` (e.g. LexLIP's
        masked captions with a [MASK] vector that is no vocabulary word)."""
        n, length = input_ids.shape
        if length > self.context_length:
            raise ValueError(
                f"input_ids has {length} tokens but the model's context length is {self.context_length}"
            )
        if attention_mask is None:
            eot = torch.full((n,), length - 1, device=input_ids.device)
        else:
            eot = (attention_mask.long().sum(dim=1) - 1).clamp(min=0)  # index of the last real token
        # Only the end-of-text token is read after the last block: unless the tokens are asked
        # for, that block computes its query, attention output and MLP at that position alone.
        eot_only = not return_tokens and len(self.blocks) > 0
        tokens = self.token_embed(input_ids) if token_embeds is None else token_embeds
        x = tokens + self.pos_embed[:length]  # N×L×W
        x = to_residual_dtype(x, self.low_precision_residual)
        drop = dropout if self.training else 0.0
        for i, block in enumerate(self.blocks):
            query = eot if eot_only and i == len(self.blocks) - 1 else None
            if drop > 0:
                x = F.dropout(x, drop, training=True)
            x, _ = run_block(block, x, self.grad_checkpointing, is_causal=True, query=query)
        x = self.ln_final(x)
        if eot_only:
            return {"pooled": x}  # N×W: the end-of-text token

        out = {"pooled": token_at(x, eot)}  # N×W
        if return_tokens:
            out["tokens"] = x
        return out
