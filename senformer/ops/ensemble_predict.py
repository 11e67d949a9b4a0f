"""ensemble_predict: fused upsample + merge + argmax for inference (DESIGN.md, op 4)."""
from __future__ import annotations

import torch

from . import _checks, reference
from ._dispatch import resolve

_triton_impl = None  # set by the Triton wrapper once kernels/ensemble_predict.py exists


def ensemble_predict(logits, size, merge="mean", align_corners=False, return_probs=False):
    """Label map (B,H,W) int64 of the merged learners (``merge`` = mean | product | vote, see
    ``reference.merged_scores``) at ``size`` = (H, W), without building a (B,N,H,W) tensor.
    ``return_probs=True`` also returns the merged scores at ``size`` (reference path: it must build them)."""
    op = "ensemble_predict"
    logits = list(logits)
    _checks.check_maps(op, logits)
    _checks.check_merge(op, merge)
    h, w = _checks.check_size(op, size)
    if return_probs:
        return reference.ensemble_predict(logits, (h, w), merge, align_corners, return_probs=True)
    backend = resolve(op, logits[0], has_triton=_triton_impl is not None)
    with torch.no_grad():
        if backend == "triton":
            return _triton_impl(logits, h, w, merge, bool(align_corners))
        if backend in ("cpu", "cuda"):
            return torch.ops.senformer.ensemble_predict(logits, h, w, merge, bool(align_corners))
        return reference.ensemble_predict(logits, (h, w), merge, align_corners)
