"""Argument checks shared by every backend, so a bad call fails the same way whichever runs it.
None of these syncs with the device except ``check_labels`` (reference path only)."""
from __future__ import annotations

from typing import Sequence

import torch

MERGES = ("mean", "product", "vote")


def as_size(x):
    """``int(x)``, except that a symbolic size (torch.export / torch.compile with dynamic shapes) stays
    symbolic: ``int()`` on it would bake the traced example's size into the graph."""
    return x if isinstance(x, torch.SymInt) else int(x)


def check_attention(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"class_cross_attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"class_cross_attention: {name} must be 4-D (B, H, len, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"class_cross_attention: {name} must be floating point, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"class_cross_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"class_cross_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, H and D")
    if k.shape[2] == 0:
        raise ValueError("class_cross_attention: k and v need at least one key (L >= 1)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"class_cross_attention: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"class_cross_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")


def check_mask_logits(features, cls, hw):
    if features.dim() != 3 or cls.dim() != 3:
        raise ValueError(f"mask_logits: features must be (B, L, C) and cls (B, N, C); got "
                         f"{tuple(features.shape)} and {tuple(cls.shape)}")
    h, w = (as_size(x) for x in hw)
    if features.shape[0] != cls.shape[0] or features.shape[2] != cls.shape[2]:
        raise ValueError(f"mask_logits: features {tuple(features.shape)} and cls {tuple(cls.shape)} must agree on B and C")
    if h * w != features.shape[1]:
        raise ValueError(f"mask_logits: hw={h}x{w} does not match the {features.shape[1]} tokens of features")
    if features.dtype != cls.dtype or features.device != cls.device:
        raise TypeError(f"mask_logits: features ({features.dtype}, {features.device}) and cls "
                        f"({cls.dtype}, {cls.device}) must share dtype and device")
    return h, w


def check_maps(op: str, logits: Sequence[torch.Tensor]):
    if isinstance(logits, torch.Tensor) or len(logits) == 0:
        raise TypeError(f"{op}: logits must be a non-empty list of (B, N, h, w) tensors, finest first")
    first = logits[0]
    for i, x in enumerate(logits):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{op}: logits[{i}] must be a 4-D tensor (B, N, h, w), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{op}: logits[{i}] must be floating point, got {x.dtype}")
        if x.shape[:2] != first.shape[:2]:
            raise ValueError(f"{op}: logits[{i}] has (B, N) = {tuple(x.shape[:2])}, logits[0] has {tuple(first.shape[:2])}")
        if x.device != first.device or x.dtype != first.dtype:
            raise TypeError(f"{op}: logits[{i}] is {x.dtype} on {x.device}, logits[0] is {first.dtype} on {first.device}")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"{op}: logits[{i}] has an empty spatial size {tuple(x.shape[2:])}")


def check_target(op: str, logits, target):
    if not isinstance(target, torch.Tensor) or target.dim() != 3:
        raise ValueError(f"{op}: target must be a (B, H, W) integer tensor, got "
                         f"{tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}")
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"{op}: target must hold integer class labels, got {target.dtype}")
    if target.shape[0] != logits[0].shape[0]:
        raise ValueError(f"{op}: target batch {target.shape[0]} != logits batch {logits[0].shape[0]}")
    if target.device != logits[0].device:
        raise ValueError(f"{op}: target on {target.device}, logits on {logits[0].device}")


def check_labels(op: str, target: torch.Tensor, num_classes: int, ignore_index: int):
    """Host-side label range check (syncs): the reference path's version of the fast kernels' device check."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad].reshape(-1)[0])
        raise ValueError(f"{op}: target contains label {value}, outside [0, {num_classes}) and not "
                         f"ignore_index={ignore_index}")


def check_size(op: str, size):
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: size must be (H, W), got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{op}: size must be positive, got {size!r}")
    return h, w


def check_merge(op: str, merge: str):
    if merge not in MERGES:
        raise ValueError(f"{op}: merge must be one of {MERGES}, got {merge!r}")
