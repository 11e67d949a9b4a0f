"""Segmentor: backbone -> neck -> head (learners) [+ auxiliary FCN head in training], with the
self-ensemble merge, the training loss, and whole-image / sliding-window prediction."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .. import ops
from ..ops import _checks, reference
from .merging import LEARNED, MERGES, PARAMETER_FREE, build_merge
from .protocol import check_protocol, official_probs, official_scores, slide


def _pair(name: str, value) -> tuple:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"predict: {name} must be a positive int or (h, w) pair, got {value}")
    return value


class Segmentor(nn.Module):
    """``forward(images)``: training mode -> list of learner logits (finest first); eval mode -> merged
    class probabilities (B,N,H/4,W/4). ``loss(images, target)`` -> dict of losses.
    ``predict(images, ...)`` -> (B,H,W) int64 labels.

    ``neck`` is None for models whose head reads the backbone directly (UperNet, SenUperNet)."""

    def __init__(self, backbone: nn.Module, neck: Optional[nn.Module], head: nn.Module, num_classes: int,
                 aux_head: Optional[nn.Module] = None, aux_weight: float = 0.4, aux_index: int = 2,
                 merge: str = "mean", merge_channels: int = 256, align_corners: bool = False,
                 avg_non_ignore: bool = False):
        super().__init__()
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.aux_head = aux_head
        self.num_classes = num_classes
        self.aux_weight = aux_weight
        # The official recipe computes the aux head's and single-output heads' losses with mmseg 0.20's
        # CrossEntropyLoss, whose mean runs over all pixels (ignored ones as zeros); the SenFormer
        # head's own ensemble/learner losses average over valid pixels regardless.
        self.avg_non_ignore = bool(avg_non_ignore)
        self.aux_index = aux_index
        self.align_corners = align_corners
        self.merge = merge
        if merge in LEARNED and head.num_outputs < 2:
            raise ValueError(f"merge={merge!r} needs several learners, this head has {head.num_outputs}")
        self.merger = build_merge(merge, head.num_outputs, num_classes, merge_channels)

    # -- forward passes ---------------------------------------------------------------------------
    def _features(self, images: torch.Tensor):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        feats = self.backbone(images)
        pyramid = self.neck(feats) if self.neck is not None else feats
        return feats, pyramid

    def learner_logits(self, images: torch.Tensor):
        """Every learner's logits (B,N,h_i,w_i), finest first, at its level's native resolution."""
        return self.head(self._features(images)[1])

    def forward(self, images: torch.Tensor):
        feats, pyramid = self._features(images)
        logits = self.head(pyramid)
        if self.training:
            return logits
        probs = self.merged_scores(logits)
        return reference.resize(probs, pyramid[0].shape[-2:], self.align_corners)

    # -- merging ----------------------------------------------------------------------------------
    def merged_scores(self, logits: Sequence[torch.Tensor], merge: Optional[str] = None) -> torch.Tensor:
        """Merged class probabilities on the finest learner's grid (B,N,h_1,w_1)."""
        merge = self.merge if merge is None else merge
        if merge in PARAMETER_FREE:
            return reference.merged_scores(list(logits), merge, self.align_corners)
        return torch.softmax(self._learned_logits(logits, merge), dim=1)

    def _learned_logits(self, logits, merge):
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        if self.merger is None or merge != self.merge:
            raise ValueError(f"merge={merge!r} needs the learned attention modules; this model was built with "
                             f"merge={self.merge!r}")
        if len(logits) != self.head.num_outputs:
            raise ValueError(f"merge={merge!r} needs all {self.head.num_outputs} learners, got {len(logits)}")
        return self.merger(list(logits), self.align_corners)

    @staticmethod
    def _indices(learners, count):
        """``learners`` validated and sorted (finest first), or None for all."""
        if learners is None:
            return None
        idx = [int(i) for i in learners]
        if not idx or any(i < 0 or i >= count for i in idx) or len(set(idx)) != len(idx):
            raise ValueError(f"learners must be distinct indices in [0, {count}), got {list(learners)}")
        return sorted(idx)

    def _select(self, logits, learners):
        idx = self._indices(learners, len(logits))
        return list(logits) if idx is None else [logits[i] for i in idx]

    # -- training loss ----------------------------------------------------------------------------
    def loss(self, images: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> dict:
        """``loss = loss_ensemble + loss_learners + aux_weight * loss_aux`` (DESIGN.md).

        Averaging-style merges (mean/product/vote merge only at inference) train with the fused
        ``ops.ensemble_cross_entropy``; learned merges put the ensemble CE on the attention-merged
        logits (plain torch, full resolution). Single-prediction heads (UperNet, fusion baseline) have
        only ``loss_ensemble`` = plain CE; ``loss_learners`` is then 0. Those single-output and auxiliary
        losses divide by the valid pixels with ``avg_non_ignore`` and by all pixels without (official)."""
        feats, pyramid = self._features(images)
        logits = self.head(pyramid)
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        size = target.shape[-2:]
        zero = logits[0].new_zeros((), dtype=reference.acc_dtype(logits[0].dtype))
        if len(logits) == 1:
            _checks.check_target("loss", logits, target)
            _checks.check_labels("loss", target, logits[0].shape[1], ignore_index)
            z = reference.resize(logits[0].to(zero.dtype), size, self.align_corners)
            loss_ensemble = reference.masked_cross_entropy(z, target, ignore_index, self.avg_non_ignore)
            loss_learners = zero
        elif self.merger is not None:
            _, loss_learners = ops.ensemble_cross_entropy(logits, target, ignore_index, self.align_corners)
            merged = self.merger([x.to(zero.dtype) for x in logits], self.align_corners)
            loss_ensemble = reference.masked_cross_entropy(reference.resize(merged, size, self.align_corners),
                                                           target, ignore_index)
        else:
            loss_ensemble, loss_learners = ops.ensemble_cross_entropy(logits, target, ignore_index, self.align_corners)
        loss_aux = zero
        if self.aux_head is not None:
            aux = self.aux_head(feats[self.aux_index])
            aux = reference.resize(aux.to(zero.dtype), size, self.align_corners)
            loss_aux = reference.masked_cross_entropy(aux, target, ignore_index, self.avg_non_ignore)
        total = loss_ensemble + loss_learners + self.aux_weight * loss_aux
        return {"loss": total, "loss_ensemble": loss_ensemble, "loss_learners": loss_learners, "loss_aux": loss_aux}

    # -- inference --------------------------------------------------------------------------------
    def head_scores(self, logits: Sequence[torch.Tensor], merge: Optional[str] = None,
                    learners: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Unnormalised class scores (B,N,h_1,w_1) as the official decode head returns them at test time
        (``protocol.official_scores``: SenFormer's sum of softmaxes, a single-output head's logits); a learned
        merge gives its merged logits. ``learners``: a subset of learner indices (parameter-free merges)."""
        merge = self.merge if merge is None else merge
        if merge in PARAMETER_FREE:
            idx = self._indices(learners, len(logits))
            idx = None if idx is not None and len(idx) == len(logits) else idx  # every learner: the whole head
            return official_scores(list(logits), merge, idx, self.align_corners,
                                   single_output=self.head.num_outputs == 1)
        if learners is not None:
            raise ValueError(f"learners= selects a subset for the parameter-free merges {PARAMETER_FREE}, "
                             f"not merge={merge!r}")
        return self._learned_logits(logits, merge)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, size=None, mode: str = "whole", crop=(512, 512), stride=(341, 341),
                merge: Optional[str] = None, learners: Optional[Sequence[int]] = None,
                protocol: str = "official") -> torch.Tensor:
        """(B,H,W) int64 labels at ``size`` (default: the images' size). ``learners`` restricts the
        ensemble to a subset of learner indices (paper Table 1). The model is run in eval mode.

        ``protocol`` (see ``senformer.models.protocol``): "official" = mmseg 0.20's arithmetic (scores
        resized to the input's size, then to ``size``, then softmax; sliding windows not padded);
        "fast" = the merged probabilities resized once by the fused ``ops.ensemble_predict``."""
        check_protocol(protocol)
        merge = self.merge if merge is None else merge
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        if learners is not None and merge in LEARNED:
            raise ValueError(f"learners= selects a subset for the parameter-free merges {PARAMETER_FREE}, "
                             f"not merge={merge!r}")
        if mode not in ("whole", "slide"):
            raise ValueError(f"predict: mode must be 'whole' or 'slide', got {mode!r}")
        size = tuple(images.shape[-2:]) if size is None else _pair("size", size)
        was_training = self.training
        self.eval()
        try:
            if protocol == "official":
                if mode == "whole":
                    scores = reference.resize(self.head_scores(self.learner_logits(images), merge, learners),
                                              images.shape[-2:], self.align_corners)
                else:
                    scores = self._slide_scores(images, _pair("crop", crop), _pair("stride", stride), merge,
                                                learners, protocol)
                return official_probs(scores, size, self.align_corners).argmax(dim=1)
            if mode == "whole":
                logits = self._select(self.learner_logits(images), learners)
                if merge in PARAMETER_FREE:
                    return ops.ensemble_predict(logits, size, merge, self.align_corners)
                probs = self.merged_scores(logits, merge)
            else:
                probs = self._slide_scores(images, _pair("crop", crop), _pair("stride", stride), merge, learners,
                                           protocol)
            return reference.resize(probs, size, self.align_corners).argmax(dim=1)
        finally:
            self.train(was_training)

    def _slide_scores(self, images, crop, stride, merge, learners, protocol="fast"):
        """mmseg-style sliding window, each window's map resized to the window and averaged over the
        windows covering a pixel. fast: merged probabilities, windows zero-padded to the crop; official:
        the head's scores, an image smaller than the crop decoded as it is (mmseg's slide_inference)."""
        if protocol == "official":
            def decode(tile):
                scores = self.head_scores(self.learner_logits(tile), merge, learners)
                return [reference.resize(scores, tile.shape[-2:], self.align_corners)]
        else:
            def decode(tile):
                logits = self._select(self.learner_logits(tile), learners)
                return [reference.resize(self.merged_scores(logits, merge), tile.shape[-2:], self.align_corners)]
        return slide(images, crop, stride, decode, pad=protocol == "fast")[0]
