"""SenFormer transformer learner: class embeddings decoded against one pyramid level's pixel tokens.

Structure follows the official SenFormer head (pre-norm decoder block: cross-attention from the
class embeddings to the pixel tokens, self-attention among classes, MLP), with the cross-attention
routed through ``senformer.ops.class_cross_attention`` and the final dot product through
``senformer.ops.mask_logits``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops

WEIGHT_SHARING = ("repeated", "none", "decoder", "cls")


class CrossAttention(nn.Module):
    """Class queries (q: d->d) over pixel tokens (kv: d->2d), output projection d->d."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, tokens: torch.Tensor):
        """(B,L,d) tokens -> k, v of shape (B,H,L,D)."""
        b, l, c = tokens.shape
        kv = self.kv(tokens).reshape(b, l, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def forward(self, queries: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, c = queries.shape
        q = self.to_q(queries).reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        out = ops.class_cross_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SelfAttention(nn.Module):
    """timm-style multi-head self-attention among the N class embeddings (qkv: d->3d, proj d->d)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DecoderBlock(nn.Module):
    """Pre-norm (default) or post-norm decoder block; pixel tokens enter as precomputed k/v so that a
    block applied several times to the same tokens can reuse them."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, post_norm: bool = False):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.attn = SelfAttention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, cls: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(cls + self.cross_attn(cls, k, v))
            x = self.norm2(x + self.attn(x))
            return self.norm3(x + self.mlp(x))
        x = cls + self.cross_attn(self.norm1(cls), k, v)
        x = x + self.attn(self.norm2(x))
        return x + self.mlp(self.norm3(x))


class Decoder(nn.Module):
    """``num_blocks`` applications of ``len(blocks)`` blocks: one block repeated (``repeated``) or
    ``num_blocks`` distinct blocks; plus the LayerNorms on pixel tokens and on the final class embeddings."""

    def __init__(self, dim: int, num_heads: int, num_blocks: int, repeated: bool, mlp_ratio: float = 4.0,
                 post_norm: bool = False):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"Decoder: num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.repeated = repeated
        count = 1 if repeated else num_blocks
        self.blocks = nn.ModuleList(DecoderBlock(dim, num_heads, mlp_ratio, post_norm) for _ in range(count))
        self.norm_features = nn.LayerNorm(dim)
        self.norm_embs = nn.LayerNorm(dim)

    def forward(self, cls: torch.Tensor, tokens: torch.Tensor, cache_kv: bool = True) -> torch.Tensor:
        """cls (B,N,d), tokens (B,L,d) already normalised -> decoded class embeddings (B,N,d), normalised."""
        cached = None
        for i in range(self.num_blocks):
            block = self.blocks[0] if self.repeated else self.blocks[i]
            if cached is not None:
                k, v = cached
            else:
                k, v = block.cross_attn.keys_values(tokens)
                # the same block sees the same tokens at every repetition: K/V are identical, compute once
                if cache_kv and self.repeated:
                    cached = (k, v)
            cls = block(cls, k, v)
        return self.norm_embs(cls)


class TransformerLearner(nn.Module):
    """One learner: its class embeddings ``cls_emb`` (N, d) and a (possibly shared) ``decoder``.

    ``forward(feature)`` maps a (B,d,h,w) pyramid level to (B,N,h,w) logits."""

    def __init__(self, decoder: Decoder, cls_emb: nn.Parameter, cache_kv: bool = True):
        super().__init__()
        self.decoder = decoder
        self.cls_emb = cls_emb
        self.cache_kv = cache_kv

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feature.shape
        if c != self.cls_emb.shape[1]:
            raise ValueError(f"TransformerLearner: feature has {c} channels, the learner's dim is {self.cls_emb.shape[1]}")
        tokens = self.decoder.norm_features(feature.flatten(2).transpose(1, 2))
        cls = self.cls_emb.unsqueeze(0).expand(b, -1, -1)
        cls = self.decoder(cls, tokens, self.cache_kv)
        return ops.mask_logits(tokens, cls.to(tokens.dtype), (h, w))


def new_cls_emb(num_classes: int, dim: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(num_classes, dim) * 0.02)


def build_learners(num_learners: int, num_classes: int, dim: int, num_heads: int, num_blocks: int = 6,
                   weight_sharing: str = "repeated", mlp_ratio: float = 4.0, post_norm: bool = False,
                   cache_kv: bool = True, repeat_block: Optional[bool] = None) -> nn.ModuleList:
    """Learners under one of the paper's weight-sharing policies (section 3.4):

    - ``repeated``: each learner has one block applied ``num_blocks`` times (intra-learner sharing);
    - ``none``: each learner has ``num_blocks`` distinct blocks;
    - ``decoder``: one decoder (a repeated block by default) shared by all learners, own class embeddings;
    - ``cls``: one set of class embeddings shared by all learners, each with ``num_blocks`` distinct blocks.
    ``repeat_block`` overrides whether a decoder is one repeated block (True) or ``num_blocks`` distinct
    blocks (False); by default only ``repeated`` repeats, so ``decoder`` is the paper's Table 2 "decoder
    shared" row (one 6-block decoder shared by all learners, 68M parameters with R50) and
    ``decoder`` + ``repeat_block=True`` shares a single repeated block (K/V caching applies).
    Shared modules/parameters are the same Python objects, so ``parameters()`` counts them once."""
    if weight_sharing not in WEIGHT_SHARING:
        raise ValueError(f"weight_sharing must be one of {WEIGHT_SHARING}, got {weight_sharing!r}")
    # The paper's "decoder shared" row (Table 2, 68M with R50) is a decoder of distinct blocks shared by
    # all learners; only "repeated" reuses one block by default.
    repeated = weight_sharing == "repeated" if repeat_block is None else bool(repeat_block)
    shared_decoder = Decoder(dim, num_heads, num_blocks, repeated, mlp_ratio, post_norm) if weight_sharing == "decoder" else None
    shared_cls = new_cls_emb(num_classes, dim) if weight_sharing == "cls" else None
    learners = []
    for _ in range(num_learners):
        decoder = shared_decoder or Decoder(dim, num_heads, num_blocks, repeated, mlp_ratio, post_norm)
        cls_emb = shared_cls if shared_cls is not None else new_cls_emb(num_classes, dim)
        learners.append(TransformerLearner(decoder, cls_emb, cache_kv))
    return nn.ModuleList(learners)


def init_transformer_weights(module: nn.Module):
    """Official SenFormer/timm init: trunc-normal(0.02) linears with zero bias, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def set_cache_kv(learners: Sequence[TransformerLearner], cache_kv: bool):
    for learner in learners:
        learner.cache_kv = bool(cache_kv)
