"""CLIP's ResNet image tower (Radford et al. 2021, sec. 2.4: "ModifiedResNet"; RN50, RN101, RN50x4, ...).

    images N×3×S×S -> stem: three 3×3 convolutions (the first with stride 2) and 2×2 average pooling
                   -> four stages of bottleneck blocks, widths w, 2w, 4w, 8w (x4 at each block's output),
                      the last three halving the resolution by average pooling before their 1×1
                      convolutions (anti-aliased downsampling, instead of strided convolutions)
                   -> attention pooling: the mean of the (S/32)² features is the one query, every
                      position (and the mean) a key and a value, with learned positional embeddings
                   -> pooled N×32w: the attention's heads, concatenated

CLIP's attention pool ends in an output projection (``c_proj``, with a bias) into the joint space:
here that projection is the model's ``image_projection`` (CLIP builds it with a bias for this tower),
so "pooled" means the same for both towers: the feature just before the projection.

Parameter names are OpenAI's / OpenCLIP's (``layer1.0.conv1``, ``downsample.0``, ``attnpool.q_proj``),
so importing OpenCLIP's ResNet CLIPs renames nothing inside the tower (models/convert.py).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.models.vit import refuse_patch_outputs

STAGE_STRIDES = (1, 2, 2, 2)
EXPANSION = 4  # a bottleneck's output has 4x its inner width
DOWNSAMPLING = 32  # stem (2 x 2) and three stride-2 stages: S -> S / 32


def pooled_width(width: int) -> int:
    """Channels of the last stage, i.e. of the attention pool: 8w inner x 4 = 32w (2048 for RN50)."""
    return width * 8 * EXPANSION


class Bottleneck(nn.Module):
    """1×1 -> 3×3 -> (average pooling when strided) -> 1×1 x4, BatchNorm after each convolution,
    plus a shortcut that pools and projects when the shape changes."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.downsample = None
        if stride > 1 or inplanes != planes * EXPANSION:
            # keys "-1", "0", "1": OpenAI's names, so the weights are downsample.0.* and downsample.1.*
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * EXPANSION, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * EXPANSION)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return F.relu(out + shortcut)


class AttentionPool(nn.Module):
    """N×C×H×W -> N×C: one query (the mean feature) attends over the mean and every position.

    The output projection is CLIP.image_projection (see the module docstring)."""

    def __init__(self, grid: int, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"the attention pool's width {width} must be divisible by its {heads} heads")
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) / width**0.5)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # N×HW×C
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)

        def split(t: torch.Tensor) -> torch.Tensor:  # N×L×C -> N×heads×L×(C/heads)
            return t.unflatten(-1, (self.heads, c // self.heads)).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x[:, :1])), split(self.k_proj(x)), split(self.v_proj(x)))
        return out.reshape(n, c)  # N×heads×1×D -> N×C


class ModifiedResNet(nn.Module):
    """Normalised images N×3×S×S -> pooled feature N×32w (``{"pooled": ...}``, as the ViT returns)."""

    def __init__(self, image_size: int, layers: list[int], width: int, heads: int):
        super().__init__()
        if image_size % DOWNSAMPLING:
            raise ValueError(f"the ResNet tower needs model.image_size divisible by {DOWNSAMPLING}, got {image_size}")
        half = width // 2
        self.conv1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, (blocks, stride) in enumerate(zip(layers, STAGE_STRIDES)):
            planes = width * 2**i
            stage = [Bottleneck(inplanes, planes, stride)] + [Bottleneck(planes * EXPANSION, planes)
                                                               for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes * EXPANSION
        self.attnpool = AttentionPool(image_size // DOWNSAMPLING, inplanes, heads)
        self.width = inplanes
        self.grad_checkpointing = False  # refused for this tower (CLIP.set_grad_checkpointing says why)
        self.low_precision_residual = False  # train.bf16_residual concerns transformer residual streams only
        self.init_weights_()

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def init_weights_(self) -> None:
        """CLIP's: the attention projections ~ N(0, 1/C); every block's last BatchNorm scale at 0, so each
        block starts as its shortcut."""
        std = self.width**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in self.stages:
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def forward(
        self,
        images: torch.Tensor,
        keep_indices: torch.Tensor | None = None,
        return_tokens: bool = False,
        return_cls_attention: bool = False,
    ) -> dict[str, torch.Tensor]:
        refuse_patch_outputs("resnet", keep_indices, return_tokens, return_cls_attention)
        x = images
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = self.avgpool(x)
        for stage in self.stages:
            x = stage(x)
        return {"pooled": self.attnpool(x)}
