"""SenFormer head: one transformer learner per used pyramid level (or several, Table 12)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .learner import build_learners, init_transformer_weights, set_cache_kv

LEVELS = (2, 3, 4, 5)


def check_levels(levels: Sequence[int]) -> tuple:
    levels = tuple(int(x) for x in levels)
    if not levels or any(x not in LEVELS for x in levels) or len(set(levels)) != len(levels):
        raise ValueError(f"levels must be distinct pyramid levels among {LEVELS}, got {levels}")
    return tuple(sorted(levels))


class SenFormerHead(nn.Module):
    """``forward(pyramid)`` with pyramid = [P2, P3, P4, P5] returns the learners' logits, finest first,
    each at its level's native resolution. ``learner_levels[i]`` is the level learner i reads."""

    def __init__(self, num_classes: int, dim: int = 512, num_heads: int = 8, num_blocks: int = 6,
                 weight_sharing: str = "repeated", levels: Sequence[int] = LEVELS, learners_per_level: int = 1,
                 post_norm: bool = False, cache_kv: bool = True, mlp_ratio: float = 4.0,
                 repeat_block: Optional[bool] = None):
        super().__init__()
        if learners_per_level < 1:
            raise ValueError(f"learners_per_level must be >= 1, got {learners_per_level}")
        self.levels = check_levels(levels)
        self.learner_levels = [lvl for lvl in self.levels for _ in range(learners_per_level)]
        self.num_classes = num_classes
        self.weight_sharing = weight_sharing
        self.learners = build_learners(len(self.learner_levels), num_classes, dim, num_heads, num_blocks,
                                       weight_sharing, mlp_ratio, post_norm, cache_kv, repeat_block)
        init_transformer_weights(self.learners)

    @property
    def num_outputs(self) -> int:
        return len(self.learners)

    @property
    def cache_kv(self) -> bool:
        return all(learner.cache_kv for learner in self.learners)

    @cache_kv.setter
    def cache_kv(self, value: bool):
        set_cache_kv(self.learners, value)

    def forward(self, pyramid: Sequence[torch.Tensor]):
        return [learner(pyramid[lvl - 2]) for learner, lvl in zip(self.learners, self.learner_levels)]
