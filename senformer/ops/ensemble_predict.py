"""ensemble_predict: fused upsample + merge + argmax for inference (DESIGN.md, op 4).

One chain for every fast backend (``senformer_fused::ensemble_predict``): the learners are merged on
the finest learner grid (h1, w1) -- small -- into channels-last scores (the backend's ``merge_scores``
step where it has one, Triton's and the CPU's: one pass reading every learner; plain torch
otherwise), then the backend's
``upsampled_argmax`` step samples them bilinearly at every output pixel for all classes and writes
only the argmax, so the (B, N, H, W) probabilities never exist.
"""
from __future__ import annotations

import torch

from . import _checks, _kernels, reference
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
    backend = resolve(op, logits[0], has_triton=True)
    with torch.no_grad():
        if backend == "reference":
            return reference.ensemble_predict(logits, (h, w), merge, align_corners)
        return _predict(logits, h, w, merge, bool(align_corners), backend)


def _merged_cl(logits, merge: str, align_corners: bool) -> torch.Tensor:
    """reference.merged_scores as contiguous channels-last (B, h1, w1, N) in the accumulation dtype:
    each pixel's class scores one contiguous vector for the upsampled argmax."""
    scores = reference.merged_scores(logits, merge, align_corners)
    return scores.to(reference.acc_dtype(logits[0].dtype)).permute(0, 2, 3, 1).contiguous()


@torch.library.custom_op("senformer_fused::ensemble_predict", mutates_args=())
def _predict(logits: list[torch.Tensor], height: int, width: int, merge: str, align_corners: bool,
             backend: str) -> torch.Tensor:
    kern = _kernels.steps(backend, "ensemble_predict")
    merge_scores = getattr(kern, "merge_scores", _merged_cl)
    scores = merge_scores(logits, merge, align_corners)
    return kern.upsampled_argmax(scores, (height, width), align_corners)


@_predict.register_fake
def _(logits, height, width, merge, align_corners, backend):
    return logits[0].new_empty((logits[0].shape[0], height, width), dtype=torch.int64)
