"""mask_logits: pixel tokens x class embeddings, written straight into (B,N,h,w) (DESIGN.md, op 2)."""
from __future__ import annotations

import torch

from . import _checks, reference
from ._dispatch import resolve

_triton_impl = None  # set by the Triton wrapper once kernels/mask_logits.py exists


def mask_logits(features, cls, hw):
    """features (B,L,C), cls (B,N,C), hw=(h,w) with h*w == L -> logits (B,N,h,w)."""
    h, w = _checks.check_mask_logits(features, cls, hw)
    backend = resolve("mask_logits", features, has_triton=_triton_impl is not None)
    if backend == "triton":
        return _triton_impl(features, cls, h, w)
    if backend in ("cpu", "cuda"):
        return torch.ops.senformer.mask_logits(features, cls, h, w)
    return reference.mask_logits(features, cls, (h, w))
