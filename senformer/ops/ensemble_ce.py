"""ensemble_cross_entropy: the SenFormer training loss fused with the learners' upsampling (DESIGN.md, op 3)."""
from __future__ import annotations

import torch

from . import _checks, reference
from ._dispatch import resolve

_triton_impl = None  # set by the Triton wrapper once kernels/ensemble_ce.py exists


def ensemble_cross_entropy(logits, target, ignore_index=255, align_corners=False, eps=1e-15):
    """Returns ``(loss_ensemble, loss_learners)`` (float32 scalars; float64 for float64 maps).

    logits: list of M learner maps (B,N,h_i,w_i), finest first; target (B,H,W) integer labels.
    Pixels equal to ``ignore_index`` are skipped; if all are, both losses are 0 with zero gradients.
    A label outside [0, N) that is not ``ignore_index`` raises ValueError."""
    op = "ensemble_cross_entropy"
    logits = list(logits)
    _checks.check_maps(op, logits)
    _checks.check_target(op, logits, target)
    backend = resolve(op, logits[0], has_triton=_triton_impl is not None)
    if backend == "triton":
        return _triton_impl(logits, target, int(ignore_index), bool(align_corners), float(eps))
    if backend in ("cpu", "cuda"):
        return torch.ops.senformer.ensemble_cross_entropy(logits, target, int(ignore_index), bool(align_corners), float(eps))
    return reference.ensemble_cross_entropy(logits, target, ignore_index, align_corners, eps)
