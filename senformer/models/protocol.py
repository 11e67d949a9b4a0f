"""The two test protocols' tensor arithmetic, shared by ``Segmentor.predict`` and the evaluator.

``official`` computes what mmseg 0.20's EncoderDecoder (WalBouss/SenFormer, the paper's numbers) does:
the decode head returns *unnormalised* scores on the finest learner's grid (SenFormer's head: the SUM of
the learners' softmaxes; UperNet: its logits); the segmentor resizes them to the network input's size,
averages sliding windows (a window larger than the image is the image itself, unpadded), resizes to the
original image size and only then takes a softmax.

``fast`` is senformer's own: the merged probabilities (mean of softmaxes) resized once, windows
zero-padded to the crop, which lets whole-image prediction run the fused ``ops.ensemble_predict``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..ops import reference

PROTOCOLS = ("official", "fast")


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return protocol


def official_scores(logits: Sequence[torch.Tensor], merge: str = "mean", learners: Optional[Sequence[int]] = None,
                align_corners: bool = False, single_output: bool = False) -> torch.Tensor:
    """(B,N,h1,w1) scores as the official decode head's ``forward_test`` returns them, for the
    parameter-free merges. ``logits``: every learner's map, finest first; ``learners``: a subset of their
    indices (None = all). Every chosen map is first resized to the FINEST learner's grid (the official
    head resizes to its first input, whichever subset is kept), then

    - a single-output head (UperNet, fusion baseline): its logits as they are;
    - mean (SenFormer's head): the sum of softmaxes -- not their mean: the segmentor's softmax of this
      sum is what the paper's numbers were measured with;
    - product: the sum of log-softmaxes (its softmax is the normalised product);
    - vote: the sum of votes (each learner's top-class probability)."""
    grid = logits[0].shape[-2:]
    if single_output:
        if len(logits) != 1 or learners is not None:
            raise ValueError("a single-output head has no learner subsets")
        return reference.resize(logits[0].to(reference.acc_dtype(logits[0].dtype)), grid, align_corners)
    chosen = list(logits) if learners is None else [logits[i] for i in learners]
    maps = [reference.resize(x.to(reference.acc_dtype(x.dtype)), grid, align_corners) for x in chosen]
    if merge == "mean":
        parts = [torch.softmax(u, dim=1) for u in maps]
    elif merge == "product":
        parts = [torch.log_softmax(u, dim=1) for u in maps]
    elif merge == "vote":
        parts = []
        for u in maps:
            p = torch.softmax(u, dim=1)
            parts.append(p * F.one_hot(p.argmax(1), p.shape[1]).permute(0, 3, 1, 2).to(p.dtype))
    else:
        raise ValueError(f"official_scores: merge must be mean | product | vote, got {merge!r}")
    out = parts[0]
    for p in parts[1:]:  # left to right, as torch.stack(...).sum(0) in the official head
        out = out + p
    return out


def windows(height: int, width: int, crop, stride):
    """mmseg's sliding-window grid: (y1, y2, x1, x2) of every window; the last row/column is moved back
    to end at the border, and a window larger than the image is clipped to it."""
    (hc, wc), (hs, ws) = crop, stride
    rows = max(height - hc + hs - 1, 0) // hs + 1
    cols = max(width - wc + ws - 1, 0) // ws + 1
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * hs + hc, height), min(c * ws + wc, width)
            yield max(y2 - hc, 0), y2, max(x2 - wc, 0), x2


def slide(images: torch.Tensor, crop, stride, decode: Callable, pad: bool):
    """Sliding-window accumulation: ``decode(tile)`` returns a list of (B,N,th,tw) maps at the tile's
    size (one per requested output); each is summed over the windows and divided by the number of
    windows covering each pixel. ``pad`` (fast): the image is zero-padded up to the crop first and the
    padding cut off at the end; without it (official) a small image is decoded as it is."""
    h, w = images.shape[-2:]
    if pad:
        images = F.pad(images, (0, max(crop[1] - w, 0), 0, max(crop[0] - h, 0)))
    hp, wp = images.shape[-2:]
    sums, count = None, None
    for y1, y2, x1, x2 in windows(hp, wp, crop, stride):
        maps = decode(images[:, :, y1:y2, x1:x2])
        if sums is None:
            sums = [m.new_zeros(m.shape[:2] + (hp, wp)) for m in maps]
            count = maps[0].new_zeros((1, 1, hp, wp))
        for s, m in zip(sums, maps):
            s[:, :, y1:y2, x1:x2] += m
        count[:, :, y1:y2, x1:x2] += 1
    return [(s / count)[:, :, :h, :w] for s in sums]


def official_probs(scores: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    """The official segmentor's ``inference`` tail: scores at the network input's size -> resized to the
    original size -> softmax (the first resize, decoder grid -> input size, is the caller's)."""
    return torch.softmax(reference.resize(scores, tuple(size), align_corners), dim=1)
