"""A tiny stand-in with the Segmentor API (``loss``, ``forward``, ``learner_logits``, ``predict``,
``head.learners[i].cls_emb``), preset name ``toy``: lets the engine's tests and a smoke run go fast
and stay independent of the real model zoo. GroupNorm by default; ``norm="bn"`` for the SyncBN test."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import reference


class _Learner(nn.Module):
    def __init__(self, channels, dim, num_classes):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, 1)
        self.cls_emb = nn.Parameter(torch.randn(num_classes, dim) * 0.5)

    def forward(self, feat):
        return torch.einsum("bchw,nc->bnhw", self.proj(feat), self.cls_emb)


class _Head(nn.Module):
    def __init__(self, channels, dim, num_classes, num_learners):
        super().__init__()
        self.learners = nn.ModuleList(_Learner(c, dim, num_classes) for c in channels[:num_learners])


class ToySegmentor(nn.Module):
    def __init__(self, num_classes, width=8, dim=8, num_learners=2, norm="gn"):
        super().__init__()
        self.num_classes = num_classes
        chans = [width, 2 * width, 2 * width]
        if norm not in ("gn", "bn"):
            raise ValueError(f"norm must be 'gn' or 'bn', got {norm!r}")

        def norm_layer(c, groups):
            return nn.BatchNorm2d(c) if norm == "bn" else nn.GroupNorm(groups, c)

        # a bias right before a BatchNorm has an exactly-zero true gradient, which Adam would turn
        # into noise-driven steps; drop it there as ResNets do
        bias = norm != "bn"
        self.backbone = nn.ModuleList([
            nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=bias), norm_layer(width, 1), nn.GELU(),
                          nn.Conv2d(width, width, 3, 2, 1), nn.GELU()),
            nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1, bias=bias), norm_layer(2 * width, 2), nn.GELU()),
            nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, 2, 1), nn.GELU()),
        ])
        self.neck = nn.Identity()
        if not 1 <= num_learners <= len(chans):
            raise ValueError(f"num_learners must be in [1, {len(chans)}], got {num_learners}")
        self.head = _Head(chans[-num_learners:], dim, num_classes, num_learners)
        self.aux_head = nn.Conv2d(chans[1], num_classes, 1)

    def _features(self, x):
        feats = []
        for stage in self.backbone:
            x = stage(x)
            feats.append(x)
        return feats

    def _levels(self, feats):
        # the deepest stages feed the learners, so every parameter takes part in the loss (DDP needs it)
        return feats[len(feats) - len(self.head.learners):]

    def learner_logits(self, images):
        feats = self._levels(self._features(images))
        return [learner(f) for learner, f in zip(self.head.learners, feats)]

    def loss(self, images, target, ignore_index=255):
        feats = self._features(images)
        logits = [learner(f) for learner, f in zip(self.head.learners, self._levels(feats))]
        loss_ens, loss_learners = reference.ensemble_cross_entropy(logits, target, ignore_index)
        aux = reference.resize(self.aux_head(feats[1]), target.shape[-2:])
        loss_aux = F.cross_entropy(aux, target.long(), ignore_index=ignore_index) if (target != ignore_index).any() \
            else aux.sum() * 0
        total = loss_ens + loss_learners + 0.4 * loss_aux
        return {"loss": total, "loss_ensemble": loss_ens, "loss_learners": loss_learners, "loss_aux": loss_aux}

    def forward(self, images):
        return reference.merged_scores(self.learner_logits(images))

    @torch.no_grad()
    def predict(self, images, size=None, mode="whole", crop=None, stride=None, merge=None, learners=None):
        logits = self.learner_logits(images)
        if learners is not None:
            logits = [logits[i] for i in learners]
        size = images.shape[-2:] if size is None else size
        return reference.ensemble_predict(logits, size, merge or "mean")
