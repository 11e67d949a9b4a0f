"""class_cross_attention: N class queries attend over L pixel tokens (DESIGN.md, op 1)."""
from __future__ import annotations

import torch

from . import _checks, reference
from ._dispatch import deterministic_requested, resolve

_triton_impl = None  # set by the Triton wrapper below once kernels/class_attention.py exists


def class_cross_attention(q, k, v, scale=None, deterministic=None):
    """softmax(q k^T * scale) v, q (B,H,N,D), k/v (B,H,L,D); same semantics as
    ``F.scaled_dot_product_attention(q, k, v)`` without a mask. ``deterministic`` (default:
    ``torch.are_deterministic_algorithms_enabled()``) picks a reduction-based backward over atomics."""
    _checks.check_attention(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = resolve("class_cross_attention", q, has_triton=_triton_impl is not None)
    if backend == "triton":
        return _triton_impl(q, k, v, scale, deterministic_requested(deterministic))
    if backend in ("cpu", "cuda"):
        return torch.ops.senformer.class_cross_attention(q, k, v, scale)
    return reference.class_cross_attention(q, k, v, scale)
