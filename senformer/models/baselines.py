"""Baselines of the paper's Table 4: UperNet (features fusion), SenUperNet (UperNet's conv decoder
self-ensembled over the FPN levels) and FeaturesFusionBaseline (FPNT levels fused, one transformer learner).

UperNet follows mmseg's UPerHead: PPM (scales 1,2,3,6) on C5 + 3x3 bottleneck, 1x1 laterals on
C2..C4, top-down bilinear add, 3x3 fpn convs, all levels resized to P2, concatenated, 3x3 fusion
conv, dropout, 1x1 classifier. Every conv is conv(no bias)-BN-ReLU as mmseg's ConvModule with a norm."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import reference
from .learner import build_learners, init_transformer_weights
from .necks import ConvNormAct


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class PPM(nn.Module):
    def __init__(self, in_channels: int, channels: int, scales=(1, 2, 3, 6), align_corners: bool = False):
        super().__init__()
        self.align_corners = align_corners
        self.stages = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(in_channels, channels, 1))
                                    for s in scales)

    def forward(self, x):
        return [F.interpolate(stage(x), size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)
                for stage in self.stages]


class UperFPN(nn.Module):
    """The UperNet pyramid: [F2, F3, F4, F5] at ``channels`` from the backbone's C2..C5."""

    def __init__(self, in_channels: Sequence[int], channels: int = 512, pool_scales=(1, 2, 3, 6),
                 align_corners: bool = False):
        super().__init__()
        self.align_corners = align_corners
        self.psp_modules = PPM(in_channels[-1], channels, pool_scales, align_corners)
        self.bottleneck = ConvNormAct(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in in_channels[:-1])

    def forward(self, inputs: Sequence[torch.Tensor]):
        c5 = inputs[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        laterals.append(self.bottleneck(torch.cat([c5] + self.psp_modules(c5), dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + reference.resize(laterals[i], laterals[i - 1].shape[-2:], self.align_corners)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])]
        return outs + [laterals[-1]]


class UPerHead(nn.Module):
    """Features fusion: one prediction at P2's resolution (``forward`` returns a one-element list)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512, dropout: float = 0.1,
                 align_corners: bool = False):
        super().__init__()
        self.align_corners = align_corners
        self.fpn = UperFPN(in_channels, channels, align_corners=align_corners)
        self.fpn_bottleneck = ConvNormAct(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes)
        self.levels = (2,)

    num_outputs = 1

    def forward(self, inputs):
        outs = self.fpn(inputs)
        size = outs[0].shape[-2:]
        fused = torch.cat([outs[0]] + [reference.resize(x, size, self.align_corners) for x in outs[1:]], dim=1)
        return [self.conv_seg(self.dropout(self.fpn_bottleneck(fused)))]


class SenUperHead(nn.Module):
    """Self-ensemble UperNet: the UperNet pyramid, then per level a 3x3 conv-BN-ReLU, dropout and a
    1x1 classifier; one prediction per level, finest first, merged as SenFormer's learners."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512, dropout: float = 0.1,
                 levels=(2, 3, 4, 5), align_corners: bool = False):
        super().__init__()
        from .head import check_levels

        self.levels = check_levels(levels)
        self.fpn = UperFPN(in_channels, channels, align_corners=align_corners)
        self.learners = nn.ModuleList(
            nn.Sequential(ConvNormAct(channels, channels, 3), nn.Dropout2d(dropout), _classifier(channels, num_classes))
            for _ in self.levels)

    @property
    def num_outputs(self) -> int:
        return len(self.learners)

    def forward(self, inputs):
        outs = self.fpn(inputs)
        return [learner(outs[lvl - 2]) for learner, lvl in zip(self.learners, self.levels)]


class FusionBaselineHead(nn.Module):
    """FeaturesFusionBaseline (paper Fig. 3): P2..P5 resized to P2, concatenated, 3x3 conv-BN-ReLU back
    to ``dim``, then a single SenFormer transformer learner."""

    def __init__(self, num_classes: int, dim: int = 512, num_heads: int = 8, num_blocks: int = 6,
                 weight_sharing: str = "repeated", post_norm: bool = False, cache_kv: bool = True,
                 num_levels: int = 4, align_corners: bool = False):
        super().__init__()
        if weight_sharing not in ("repeated", "none"):
            raise ValueError(f"FusionBaselineHead has a single learner: weight_sharing must be 'repeated' or "
                             f"'none', got {weight_sharing!r}")
        self.align_corners = align_corners
        self.fuse = ConvNormAct(num_levels * dim, dim, 3)
        self.learners = build_learners(1, num_classes, dim, num_heads, num_blocks, weight_sharing,
                                       post_norm=post_norm, cache_kv=cache_kv)
        init_transformer_weights(self.learners)
        self.levels = (2,)

    num_outputs = 1

    def forward(self, pyramid):
        size = pyramid[0].shape[-2:]
        fused = torch.cat([pyramid[0]] + [reference.resize(x, size, self.align_corners) for x in pyramid[1:]], dim=1)
        return [self.learners[0](self.fuse(fused))]
