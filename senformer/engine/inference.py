"""Whole-image, sliding-window and multi-scale + flip inference that returns class probabilities for
several learner subsets ("heads") from one pass: the ensemble, each learner, any subset (Table 1)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.transforms import normalize, rescale_size, resize_pair
from ..ops import reference


def num_learners(model) -> int:
    head = getattr(model, "head", None)
    if hasattr(head, "num_outputs"):
        return int(head.num_outputs)
    learners = getattr(head, "learners", None)
    return len(learners) if learners is not None else 1


def _merged(model, logits, merge, full):
    if hasattr(model, "merged_scores"):
        # a learned merge needs every learner: a subset falls back to the mean of softmaxes
        if merge is None and not full and getattr(model, "merger", None) is not None:
            merge = "mean"
        return model.merged_scores(logits, merge)
    return reference.merged_scores(logits, merge or "mean")


def head_probs(model, x, heads, merge=None):
    """List of (B,N,h,w) merged probabilities, one per learner subset in ``heads`` (None = all);
    ``merge`` None = the model's own merge."""
    if hasattr(model, "learner_logits"):
        logits = [t.float() for t in model.learner_logits(x)]
        out = []
        for subset in heads:
            chosen = logits if subset is None else [logits[i] for i in subset]
            out.append(_merged(model, chosen, merge, subset is None or len(chosen) == len(logits)))
        return out
    if any(h is not None for h in heads):
        raise ValueError("learner subsets need a model with learner_logits()")
    return [model(x).float() for _ in heads]


def _resize(p, size):
    return F.interpolate(p, size=tuple(size), mode="bilinear", align_corners=False) \
        if tuple(p.shape[-2:]) != tuple(size) else p


def slide_probs(model, x, heads, crop, stride, merge=None):
    """mmseg's slide inference: overlapping windows of ``crop``, moved by ``stride``, averaged."""
    ch, cw = crop
    sh, sw = stride
    H, W = x.shape[-2:]
    # an image smaller than a window is padded up to it, and the padding cut off afterwards
    ph, pw = max(ch - H, 0), max(cw - W, 0)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    Hp, Wp = x.shape[-2:]
    ny = max(math.ceil((Hp - ch) / sh), 0) + 1
    nx = max(math.ceil((Wp - cw) / sw), 0) + 1
    acc, count = None, torch.zeros(1, 1, Hp, Wp, device=x.device)
    for iy in range(ny):
        for ix in range(nx):
            y0, x0 = min(iy * sh, Hp - ch), min(ix * sw, Wp - cw)
            window = x[..., y0:y0 + ch, x0:x0 + cw]
            ps = [_resize(p, (ch, cw)) for p in head_probs(model, window, heads, merge)]
            if acc is None:
                acc = [torch.zeros(p.shape[0], p.shape[1], Hp, Wp, device=x.device) for p in ps]
            for a, p in zip(acc, ps):
                a[..., y0:y0 + ch, x0:x0 + cw] += p
            count[..., y0:y0 + ch, x0:x0 + cw] += 1
    return [(a / count)[..., :H, :W] for a in acc]


@torch.no_grad()
def infer_image(model, img: np.ndarray, heads=(None,), scale=(512, 512), ratios=(1.0,), flip=False,
                mode="whole", crop=None, stride=None, merge=None, device="cpu", mean=None, std=None,
                amp=False):
    """Probabilities (1,N,H,W) at the original size of ``img`` (HxWx3 uint8), one per head, averaged over
    the test scales ``ratios`` x ``scale`` and, with ``flip``, horizontal flips (the paper's +MS)."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError("slide inference needs crop_size and stride")
    H, W = img.shape[:2]
    norm = {} if mean is None else {"mean": mean, "std": std}
    total, n = None, 0
    for r in ratios:
        size = rescale_size(H, W, (scale[0] * r, scale[1] * r))
        im, _ = resize_pair(img, None, size)
        x = normalize(im, **norm).unsqueeze(0).to(device)
        for flipped in ([False, True] if flip else [False]):
            xi = x.flip(-1) if flipped else x
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp and xi.is_cuda):
                if mode == "slide":
                    ps = slide_probs(model, xi, heads, crop, stride, merge)
                else:
                    ps = head_probs(model, xi, heads, merge)
            ps = [_resize(p.float(), (H, W)) for p in ps]
            if flipped:
                ps = [p.flip(-1) for p in ps]
            total = ps if total is None else [t + p for t, p in zip(total, ps)]
            n += 1
    return [t / n for t in total]
