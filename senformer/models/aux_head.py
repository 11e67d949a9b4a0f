"""Auxiliary FCN head on C4 (mmseg FCNHead, num_convs=1, concat_input=False), used in training only."""
from __future__ import annotations

import torch.nn as nn


class FCNHead(nn.Module):
    """3x3 conv (no bias) + BN + ReLU, dropout 0.1, 1x1 conv to the classes."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.conv(x)))
