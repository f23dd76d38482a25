"""The image tower: a plain Vision Transformer (ViT), as in CLIP.

Read top to bottom: the transformer pieces (attention, MLP, block) that the text tower reuses,
FLIP's random token selection, then the ViT itself.

Shapes: N = batch, P = patches per image, K = kept patches (P unless patches are dropped),
T = tokens seen by the transformer (K, plus 1 with a class token), W = width, H = heads, D = W / H.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from clipforge.models.fused_mlp import fused_mlp


# ----------------------------------------------------------------------------- transformer pieces
# train.attention_backend: the one fused attention kernel allowed, with the unfused maths for a call
# it cannot run (e.g. flash with a mask, or a CUDA kernel on a CPU). None: PyTorch's choice
ATTENTION_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attention_kernels(name: str | None) -> list[SDPBackend] | None:
    """The SDPA backends allowed: ``name``'s and the maths; None ("auto") for all of them."""
    if name is None or name == "auto":
        return None
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: use auto or one of {', '.join(ATTENTION_BACKENDS)}")
    return list(dict.fromkeys([ATTENTION_BACKENDS[name], SDPBackend.MATH]))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernels: list[SDPBackend] | None,
         **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, restricted to ``kernels`` (attention_kernels) when given."""
    if kernels is None:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel(kernels):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection.

    The fast path is ``F.scaled_dot_product_attention``. The explicit path (softmax written out)
    is only taken when a caller asks for the attention weights, e.g. A-CLIP's class-token attention.
    With ``query`` (one position per sample, N) only those rows are computed: keys and values
    still come from every token, the query, the attention and the output projection from one.
    """

    def __init__(self, width: int, heads: int, head_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim or width // heads
        inner = heads * self.head_dim  # = width unless head_dim is set apart (a pruned model's heads)
        self.qkv = nn.Linear(width, 3 * inner)
        self.proj = nn.Linear(inner, width)
        self.kernels: list[SDPBackend] | None = None  # train.attention_backend (attention_kernels)

    def forward(
        self, x: torch.Tensor, is_causal: bool = False, return_weights: bool = False,
        query: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query is not None:
            return self._one_query_per_sample(x, query, is_causal), None
        n, t, _ = x.shape
        w = self.heads * self.head_dim
        # N×T×3(H·D) -> 3 × N×H×T×D (views, no copy)
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if return_weights:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # N×H×T×T
            if is_causal:
                future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = weights @ v
        else:
            weights = None
            out = sdpa(q, k, v, self.kernels, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(n, t, w)  # N×H×T×D -> N×T×(H·D)
        return self.proj(out), weights

    def _one_query_per_sample(self, x: torch.Tensor, query: torch.Tensor, is_causal: bool) -> torch.Tensor:
        """N×T×W tokens, N query positions -> N×W: the attention output at those positions only."""
        n, t, _ = x.shape
        w = self.heads * self.head_dim
        weight, bias = self.qkv.weight, self.qkv.bias  # rows: [query | key | value]
        q = F.linear(token_at(x, query), weight[:w], bias[:w]).view(n, self.heads, 1, self.head_dim)
        k, v = F.linear(x, weight[w:], bias[w:]).view(n, t, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # causal: the query at position p sees keys 0..p (N×1×1×T, broadcast over heads)
        visible = (torch.arange(t, device=x.device) <= query[:, None]).view(n, 1, 1, t) if is_causal else None
        out = sdpa(q, k, v, self.kernels, attn_mask=visible)  # N×H×1×D
        return self.proj(out.reshape(n, w))


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose output has its input's dtype (the same weights and state-dict keys).

    For a float32 input it is ``nn.LayerNorm``. Under autocast ``layer_norm`` computes in float32
    and returns float32; with a bf16 residual stream (``to_residual_dtype``) the output goes back
    to bf16, which the next matmul reads anyway: half the bytes written."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).to(x.dtype)


def to_residual_dtype(x: torch.Tensor, low_precision: bool) -> torch.Tensor:
    """The tokens entering a tower's blocks. With ``low_precision`` under autocast they are cast to
    autocast's dtype (bf16), so the residual stream, its gradient and every norm, activation and
    residual add between the matmuls move half the bytes (weights and optimizer stay float32).
    Without autocast, or without ``low_precision``, nothing changes."""
    device = x.device.type
    if low_precision and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def token_at(x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """N×T×W, N positions -> N×W: each sample's token at its position."""
    return x[torch.arange(x.shape[0], device=x.device), position]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.fused = False  # train.fused_mlp: the activation inside two Triton GEMMs (models/fused_mlp.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fused_mlp(x, self.fc, self.proj, self.activation_name)
        return self.proj(self.activation(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    A pruned model's block may lack either sublayer (0 heads or 0 MLP units; TinyCLIP/CoFi remove
    whole MHA and FFN layers): ``attn`` / ``mlp`` and their LayerNorms are then None."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, activation: str = "gelu", head_dim: int | None = None):
        super().__init__()
        self.ln_1 = LayerNorm(width) if heads else None
        self.attn = Attention(width, heads, head_dim) if heads else None
        self.ln_2 = LayerNorm(width) if mlp_hidden else None
        self.mlp = MLP(width, mlp_hidden, activation) if mlp_hidden else None

    def forward(
        self, x: torch.Tensor, is_causal: bool = False, return_weights: bool = False,
        query: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """N×T×W -> N×T×W; with ``query`` (N positions) -> N×W, the block's output at those
        positions only (a tower's last block when only its pooled token is read)."""
        weights = None
        if self.attn is None:
            x = x if query is None else token_at(x, query)
        else:
            attn_out, weights = self.attn(self.ln_1(x), is_causal=is_causal, return_weights=return_weights, query=query)
            x = (x if query is None else token_at(x, query)) + attn_out
        if self.mlp is not None:
            x = x + self.mlp(self.ln_2(x))
        return x, weights


def build_blocks(width: int, shapes: list[tuple[int, int]], activation: str, head_dim: int | None) -> nn.ModuleList:
    """A tower's blocks from each layer's (heads, MLP units) (ModelConfig.block_shapes)."""
    return nn.ModuleList([Block(width, heads, units, activation, head_dim) for heads, units in shapes])


def run_block(block: Block, x: torch.Tensor, checkpointed: bool, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``block(x, **kwargs)``; with ``checkpointed`` (train.grad_checkpointing) and gradients on, the
    block keeps only its input for backward and recomputes its activations there (torch's
    non-reentrant checkpoint): a tower's activation memory falls from all its blocks' intermediates
    to one tensor per block, for about one more forward pass of compute."""
    if checkpointed and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kwargs)
    return block(x, **kwargs)


def init_blocks_(blocks: nn.ModuleList, width: int) -> None:
    """CLIP/OpenCLIP initialisation: residual-branch outputs shrink with depth (GPT-2 style)."""
    layers = len(blocks)
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in blocks:
        if block.attn is not None:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
        if block.mlp is not None:
            nn.init.normal_(block.mlp.fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.proj.weight, std=proj_std)
        for linear in (block.attn.qkv, block.attn.proj) if block.attn is not None else ():
            nn.init.zeros_(linear.bias)
        for linear in (block.mlp.fc, block.mlp.proj) if block.mlp is not None else ():
            nn.init.zeros_(linear.bias)


# ----------------------------------------------------------------------------- token selection
def random_keep_indices(
    batch: int,
    num_patches: int,
    drop_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """FLIP: a different random subset of patches per sample -> N×K LongTensor, K = int(P·(1-r)).

    Noise + argsort gives a uniform random subset; the kept indices are sorted so that tokens stay
    in raster order (order does not matter to attention, it only makes outputs easier to read).
    """
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1), got {drop_ratio}")
    num_keep = max(1, int(num_patches * (1.0 - drop_ratio)))
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=gen_device)
    keep = noise.argsort(dim=1)[:, :num_keep].sort(dim=1).values
    return keep.to(device) if device is not None else keep


# ----------------------------------------------------------------------------- the tower
def refuse_patch_outputs(tower: str, keep_indices: torch.Tensor | None, return_tokens: bool,
                         return_cls_attention: bool) -> None:
    """For the other image towers (model.image_tower = ``tower``), which take the ViT's forward arguments so
    a caller need not know the tower: patch-level outputs exist in the ViT only."""
    if keep_indices is not None or return_tokens or return_cls_attention:
        asked = "kept patches" if keep_indices is not None else "patch tokens" if return_tokens else "attention maps"
        raise ValueError(f"{asked} exist in clipforge's own ViT image tower only; this model's is "
                         f"model.image_tower = '{tower}': use model.image_tower = 'vit' for what needs them")


class VisionTransformer(nn.Module):
    """Normalised images N×3×S×S -> pooled feature N×W (plus tokens / attention maps on request)."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        pool: str = "cls",
        patch_dropout: float = 0.0,
        activation: str = "gelu",
        block_shapes: list[tuple[int, int]] | None = None,
        head_dim: int | None = None,
    ):
        """``block_shapes``: each layer's (heads, MLP units), for a pruned model (ModelConfig.block_shapes);
        None: ``layers`` layers of ``heads`` heads and int(width x mlp_ratio) units."""
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        self.patch_dropout = patch_dropout
        self.grid = image_size // patch_size
        self.num_patches = self.grid**2
        # a conv with stride = kernel = patch size is a linear map of each flattened patch
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_token = nn.Parameter(torch.zeros(width)) if pool == "cls" else None
        num_positions = self.num_patches + (1 if pool == "cls" else 0)
        self.pos_embed = nn.Parameter(torch.zeros(num_positions, width))  # class token first, if any
        self.ln_pre = LayerNorm(width)  # as in CLIP; keeps OpenCLIP weights convertible
        shapes = block_shapes or [(heads, int(width * mlp_ratio))] * layers
        self.blocks = build_blocks(width, shapes, activation, head_dim)
        self.ln_post = LayerNorm(width)
        self.low_precision_residual = False  # train.bf16_residual: see to_residual_dtype
        self.grad_checkpointing = False  # train.grad_checkpointing: see run_block
        self.init_weights_()

    def init_weights_(self) -> None:
        width = self.pos_embed.shape[1]
        scale = width**-0.5  # CLIP's ViT init for class and positional embeddings
        if self.class_token is not None:
            nn.init.normal_(self.class_token, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)
        init_blocks_(self.blocks, width)

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×S×S -> N×P×W, patches in raster order: the stride = kernel convolution written as one
        matmul of the flattened patches (channel, row, column: the conv weight's layout) with the
        conv's weight. Same maths; as a GEMM it runs on cuBLAS, where cuDNN chose a slow kernel for
        this conv on an H100 (6 ms of a 215 ms ViT-B/16 step). Pixels past the last whole patch
        are ignored, as the convolution does."""
        n, c, h, w = images.shape
        p = self.patch_embed.kernel_size[0]
        gh, gw = h // p, w // p
        patches = images[:, :, : gh * p, : gw * p].reshape(n, c, gh, p, gw, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * p * p)  # N×P×(3·p·p)
        return F.linear(patches, self.patch_embed.weight.flatten(1))

    def forward(
        self,
        images: torch.Tensor,
        keep_indices: torch.Tensor | None = None,
        return_tokens: bool = False,
        return_cls_attention: bool = False,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Returns {"pooled": N×W} and, when asked, "tokens" (N×K×W, after the final LayerNorm),
        "cls_attention" (per layer N×H×K: class token -> kept patches) and "kept_indices" (N×K).

        Patches are dropped when ``keep_indices`` is given, or at random (FLIP) in training mode
        with ``patch_dropout > 0``. Eval mode never drops at random.
        """
        if return_cls_attention and self.class_token is None:
            raise ValueError("cls_attention needs a class token: set model.vision_pool = 'cls'")
        if return_cls_attention and any(block.attn is None for block in self.blocks):
            raise ValueError("cls_attention needs attention in every layer; this pruned model has layers without")
        x = self.embed_patches(images)  # N×P×W
        n, p, w = x.shape
        has_cls = self.class_token is not None
        # positions are added BEFORE selection, so kept tokens carry their original embedding
        x = x + self.pos_embed[int(has_cls):]
        if keep_indices is None and self.training and self.patch_dropout > 0:
            keep_indices = random_keep_indices(n, p, self.patch_dropout, device=x.device)
        if keep_indices is not None:
            x = x.gather(1, keep_indices.unsqueeze(-1).expand(-1, -1, w))  # N×K×W
        if has_cls:
            cls = (self.class_token + self.pos_embed[0]).expand(n, 1, w)
            x = torch.cat([cls, x], dim=1)  # N×(1+K)×W
        x = self.ln_pre(to_residual_dtype(x, self.low_precision_residual))

        # Only the class token is read after the last block: unless the tokens are asked for, that
        # block computes its query, attention output and MLP for the class token alone.
        class_only = has_cls and not return_tokens and not return_cls_attention and len(self.blocks) > 0
        last_query = torch.zeros(n, dtype=torch.long, device=x.device) if class_only else None  # position 0
        cls_attention = []
        for i, block in enumerate(self.blocks):
            query = last_query if i == len(self.blocks) - 1 else None
            x, weights = run_block(block, x, self.grad_checkpointing, return_weights=return_cls_attention, query=query)
            if return_cls_attention:
                cls_attention.append(weights[:, :, 0, 1:])  # N×H×K: class-token row, patch columns

        x = self.ln_post(x)
        if class_only:
            pooled, tokens = x, None  # N×W: the class token
        elif has_cls:
            pooled, tokens = x[:, 0], x[:, 1:]
        else:
            pooled, tokens = x.mean(dim=1), x

        out: dict[str, torch.Tensor | list[torch.Tensor]] = {"pooled": pooled}
        if return_tokens:
            out["tokens"] = tokens
        if return_cls_attention:
            out["cls_attention"] = cls_attention
        if keep_indices is not None:
            out["kept_indices"] = keep_indices
        return out
