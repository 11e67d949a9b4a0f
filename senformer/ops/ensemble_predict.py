"""ensemble_predict: fused upsample + merge + argmax for inference (DESIGN.md, op 4).

Triton path (``senformer_triton::ensemble_predict``): the merged scores are computed with plain torch
on the finest learner grid (h1, w1) -- small -- and stored channels-last; one kernel
(kernels/ensemble_predict.py) then samples them bilinearly at every output pixel for all classes and
writes only the argmax, so the (B, N, H, W) probabilities never exist.
"""
from __future__ import annotations

import torch

from . import _checks, reference
from ._dispatch import resolve



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


@torch.library.custom_op("senformer_triton::ensemble_predict", mutates_args=())
def _predict(logits: list[torch.Tensor], height: int, width: int, merge: str, align_corners: bool) -> torch.Tensor:
    from senformer.kernels import ensemble_predict as kernel

    scores = reference.merged_scores(logits, merge, align_corners)
    # Channels-last so each neighbour's class scores are one contiguous vector for the gather.
    scores = scores.float().permute(0, 2, 3, 1).contiguous()
    return kernel.upsample_argmax(scores, (height, width), align_corners)


@_predict.register_fake
def _(logits, height, width, merge, align_corners):
    return logits[0].new_empty((logits[0].shape[0], height, width), dtype=torch.int64)


_triton_impl = _predict
