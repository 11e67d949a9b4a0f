"""Learned merging of the learners' predictions (paper section 3.2): attention modules of Tao et al.
fed with the learners' logits. Averaging/product/vote have no parameters and live in senformer.ops.

Both modules work on the learners' logits resized to the finest learner's grid and return merged
logits there; the merged prediction is their softmax. In training the ensemble term of the loss is
plain torch cross-entropy on these merged logits at full resolution (the fused ensemble loss op
implements only the averaging merge)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..ops import reference

PARAMETER_FREE = ("mean", "product", "vote")
LEARNED = ("hierarchical", "explicit")
MERGES = PARAMETER_FREE + LEARNED


class AttentionModule(nn.Sequential):
    """(3x3 conv, BN, ReLU) x2, 1x1 conv, sigmoid -> ``out_maps`` attention maps in [0, 1]."""

    def __init__(self, in_channels: int, channels: int = 256, out_maps: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, out_maps, 1), nn.Sigmoid())


class HierarchicalMerge(nn.Module):
    """M-1 modules, each predicting the relative attention a_i between learner i and the merge of the
    coarser ones: m_M = U_M; m_i = a_i * U_i + (1 - a_i) * m_{i+1}, a_i = module_i([U_i, U_{i+1}])."""

    def __init__(self, num_learners: int, num_classes: int, channels: int = 256):
        super().__init__()
        if num_learners < 2:
            raise ValueError("hierarchical merge needs at least 2 learners")
        self.attention = nn.ModuleList(AttentionModule(2 * num_classes, channels) for _ in range(num_learners - 1))

    def forward(self, logits: Sequence[torch.Tensor], align_corners: bool = False) -> torch.Tensor:
        u = [reference.resize(x, logits[0].shape[-2:], align_corners) for x in logits]
        merged = u[-1]
        for i in range(len(u) - 2, -1, -1):
            a = self.attention[i](torch.cat([u[i], u[i + 1]], dim=1))
            merged = a * u[i] + (1 - a) * merged
        return merged


class ExplicitMerge(nn.Module):
    """One module per learner predicting a dense (absolute) attention mask: m = sum_i a_i * U_i."""

    def __init__(self, num_learners: int, num_classes: int, channels: int = 256):
        super().__init__()
        self.attention = nn.ModuleList(AttentionModule(num_classes, channels) for _ in range(num_learners))

    def forward(self, logits: Sequence[torch.Tensor], align_corners: bool = False) -> torch.Tensor:
        u = [reference.resize(x, logits[0].shape[-2:], align_corners) for x in logits]
        return sum(m(x) * x for m, x in zip(self.attention, u))


def build_merge(merge: str, num_learners: int, num_classes: int, channels: int = 256):
    """The learned merge module for ``merge`` (None for the parameter-free merges)."""
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    if merge == "hierarchical":
        return HierarchicalMerge(num_learners, num_classes, channels)
    if merge == "explicit":
        return ExplicitMerge(num_learners, num_classes, channels)
    return None
