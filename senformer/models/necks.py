"""Necks turning the backbone's C2..C5 into P2..P5 of one width: FPNT (default), FPN, none.

FPNT follows the official SenFormer neck: 1x1 laterals, top-down nearest upsampling + add, then one
(non-shifted) Swin window block per level, as mmseg's ``SwinBlockSequence(depth=1)`` computes it:
the normalised map is zero-padded to window multiples and the padded tokens take part in attention.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

NECKS = ("fpnt", "fpn", "none")


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows with a relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"WindowAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
        # a buffer, not a parameter: it is a pure function of the window size
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window_size - 1) + rel[..., 1], persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (num_windows*B, w*w, C)."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        # SDPA wants the additive mask in the query's dtype (bf16 under autocast even when x is fp32)
        bias = bias.reshape(n, n, self.num_heads).permute(2, 0, 1).unsqueeze(0).to(qkv.dtype)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinWindowBlock(nn.Module):
    """One Swin block without shift: x + W-MSA(LN(x)); x + MLP(LN(x)), on a (B,C,H,W) map."""

    def __init__(self, dim: int, num_heads: int = 8, window_size: int = 7, mlp_ratio: float = 4.0):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ws = self.window_size
        x = x.permute(0, 2, 3, 1)
        y = self.norm1(x)
        ph, pw = (-h) % ws, (-w) % ws
        y = F.pad(y, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        y = y.reshape(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        y = self.attn(y)
        y = y.reshape(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        x = x + y[:, :h, :w]
        x = x + self.mlp(self.norm2(x))
        return x.permute(0, 3, 1, 2).contiguous()


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int):
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PyramidNeck(nn.Module):
    """Laterals (1x1 conv with bias, as mmseg's ConvModule without norm) + top-down nearest add, then a
    per-level output module: Swin window block (``fpnt``), 3x3 conv (``fpn``, paper eq. 7) or nothing
    (``none``: laterals only, no top-down path)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 512, kind: str = "fpnt",
                 num_heads: int = 8, window_size: int = 7, mlp_ratio: float = 4.0):
        super().__init__()
        if kind not in NECKS:
            raise ValueError(f"neck must be one of {NECKS}, got {kind!r}")
        self.kind = kind
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        if kind == "fpnt":
            self.fpn_outs = nn.ModuleList(SwinWindowBlock(out_channels, num_heads, window_size, mlp_ratio)
                                          for _ in in_channels)
        elif kind == "fpn":
            self.fpn_outs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        else:
            self.fpn_outs = None
        self._init_weights()

    def _init_weights(self):
        # the official FPNT init: xavier-uniform convolutions, trunc-normal(0.02) linears, zero biases
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, inputs: Sequence[torch.Tensor]):
        if len(inputs) != len(self.lateral_convs):
            raise ValueError(f"neck: expected {len(self.lateral_convs)} feature maps, got {len(inputs)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        if self.fpn_outs is None:
            return laterals
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        return [m(x) for m, x in zip(self.fpn_outs, laterals)]


def build_neck(kind: str, in_channels: Sequence[int], out_channels: int, num_heads: int = 8, window_size: int = 7):
    return PyramidNeck(in_channels, out_channels, kind, num_heads, window_size)
