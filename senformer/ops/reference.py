"""Reference implementations: plain torch, the ground truth every fast backend is tested against.

Accumulation is float32 for float32/bfloat16/float16 inputs and float64 for float64 inputs, so a
float64 call of these functions is the oracle of the tests.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import _checks


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def resize(x: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w); the identity when the size already matches.

    Under ``torch.use_deterministic_algorithms(True)`` a CUDA resize that autograd records runs as
    two interpolation-matrix products instead: aten's bilinear backward on CUDA scatters with atomics
    and refuses to run in deterministic mode, while a matmul's backward is a matmul."""
    size = tuple(_checks.as_size(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if (x.device.type == "cuda" and torch.are_deterministic_algorithms_enabled() and x.requires_grad
            and torch.is_grad_enabled()):
        return resize_by_matrices(x, size, align_corners)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def interp_matrix(n_in: int, n_out: int, align_corners: bool, dtype=torch.float32, device=None) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation as ``F.interpolate(mode="bilinear")`` samples
    one axis for an explicit output size: row o holds the two taps of output o (the weights are
    computed in float64, then cast)."""
    # Built on the target device by comparisons (no host-to-device copy, no scatter: usable inside
    # CUDA-graph capture and under deterministic algorithms).
    o = torch.arange(n_out, dtype=torch.float64, device=device)
    if align_corners:
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        src = o * scale
    else:
        src = ((o + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    i0 = src.floor().clamp(max=n_in - 1)
    i1 = torch.clamp(i0 + 1, max=n_in - 1)
    w1 = (src - i0)[:, None]
    cols = torch.arange(n_in, dtype=torch.float64, device=device)[None, :]
    m = (cols == i0[:, None]) * (1.0 - w1) + (cols == i1[:, None]) * w1
    return m.to(dtype)


def resize_by_matrices(x: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) as ``A_h @ x @ A_w^T`` (same function as ``resize``)."""
    h, w = x.shape[-2:]
    a_h = interp_matrix(h, size[0], align_corners, x.dtype, x.device)
    a_w = interp_matrix(w, size[1], align_corners, x.dtype, x.device)
    return torch.matmul(torch.matmul(a_h, x), a_w.transpose(0, 1))


def resize_backward_by_matrices(grad: torch.Tensor, in_size, align_corners: bool = False) -> torch.Tensor:
    """Adjoint of ``resize`` from (h, w) = ``in_size`` to grad's size: ``A_h^T @ grad @ A_w``.
    Deterministic on every device (aten's CUDA bilinear backward uses atomics)."""
    H, W = grad.shape[-2:]
    a_h = interp_matrix(int(in_size[0]), H, align_corners, grad.dtype, grad.device)
    a_w = interp_matrix(int(in_size[1]), W, align_corners, grad.dtype, grad.device)
    return torch.matmul(torch.matmul(a_h.transpose(0, 1), grad), a_w)


def class_cross_attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v with q (B,H,N,D), k/v (B,H,L,D); scale defaults to D**-0.5."""
    _checks.check_attention(q, k, v)
    acc = acc_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v.to(acc)).to(q.dtype)


def mask_logits(features, cls, hw):
    """(B,L,C) tokens x (B,N,C) class embeddings -> (B,N,h,w) logits."""
    h, w = _checks.check_mask_logits(features, cls, hw)
    acc = acc_dtype(features.dtype)
    out = torch.matmul(cls.to(acc), features.to(acc).transpose(1, 2))
    return out.reshape(cls.shape[0], cls.shape[1], h, w).to(features.dtype)


def masked_cross_entropy(z: torch.Tensor, target: torch.Tensor, ignore_index: int,
                         avg_non_ignore: bool = True) -> torch.Tensor:
    """NLL of log_softmax(z) summed over non-ignored pixels, divided by their number (``avg_non_ignore``)
    or by the number of ALL pixels (mmseg 0.20's ``CrossEntropyLoss``: ignored pixels count as zeros in
    the mean); exactly 0 (with zero gradient) if all are ignored."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    nll = -torch.log_softmax(z, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    count = valid.sum().clamp(min=1) if avg_non_ignore else valid.numel()
    return nll.sum() / torch.as_tensor(count, dtype=nll.dtype, device=nll.device)


def learner_maps(logits: Sequence[torch.Tensor], align_corners: bool):
    """U_i: every learner map resized to the finest learner's grid, in the accumulation dtype."""
    acc = acc_dtype(logits[0].dtype)
    size = logits[0].shape[-2:]
    return [resize(x.to(acc), size, align_corners) for x in logits]


def ensemble_cross_entropy(logits, target, ignore_index=255, align_corners=False, eps=1e-15):
    """(loss_ensemble, loss_learners) as the official SenFormer head computes them (DESIGN.md, op 3)."""
    op = "ensemble_cross_entropy"
    _checks.check_maps(op, logits)
    _checks.check_target(op, logits, target)
    _checks.check_labels(op, target, logits[0].shape[1], ignore_index)
    size = target.shape[-2:]
    u = learner_maps(logits, align_corners)
    e = torch.log(torch.clamp(sum(torch.softmax(x, dim=1) for x in u), min=eps))
    loss_ensemble = masked_cross_entropy(resize(e, size, align_corners), target, ignore_index)
    loss_learners = sum(masked_cross_entropy(resize(x, size, align_corners), target, ignore_index) for x in u) / len(u)
    return loss_ensemble, loss_learners


def merged_scores(logits, merge="mean", align_corners=False):
    """Merged class scores on the finest learner's grid (B,N,h1,w1), each a distribution over classes:
    mean = mean of softmaxes; product = normalised product of softmaxes; vote = each learner's top
    class keeps its probability, the rest 0, averaged over learners (paper eq. 3-5)."""
    _checks.check_merge("ensemble_predict", merge)
    u = learner_maps(logits, align_corners)
    if merge == "mean":
        return sum(torch.softmax(x, dim=1) for x in u) / len(u)
    if merge == "product":
        return torch.softmax(sum(torch.log_softmax(x, dim=1) for x in u), dim=1)
    votes = 0
    for x in u:
        p = torch.softmax(x, dim=1)
        votes = votes + p * F.one_hot(p.argmax(1), p.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    return votes / len(u)


def ensemble_predict(logits, size, merge="mean", align_corners=False, return_probs=False):
    """Label map (B,H,W) int64 of the merged prediction resized to ``size``; with ``return_probs``
    also the merged scores at ``size`` (the only path that builds a (B,N,H,W) tensor)."""
    op = "ensemble_predict"
    _checks.check_maps(op, logits)
    size = _checks.check_size(op, size)
    probs = resize(merged_scores(logits, merge, align_corners), size, align_corners)
    labels = probs.argmax(dim=1)
    return (labels, probs) if return_probs else labels
