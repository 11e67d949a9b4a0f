"""Whole-image, sliding-window and multi-scale + flip inference that returns class probabilities for
several learner subsets ("heads") from one pass: the ensemble, each learner, any subset (Table 1).

Two protocols (``senformer.models.protocol``): "official" reproduces mmseg 0.20's test arithmetic, the
one behind the paper's numbers and the released checkpoints; "fast" is senformer's own cheaper one."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.transforms import aug_scales, normalize, rescale_size, resize_linear, resize_pillow
from ..models.protocol import check_protocol, official_probs, official_scores, slide
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
    """fast: list of (B,N,h,w) merged probabilities, one per learner subset in ``heads`` (None = all);
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


def head_scores(model, x, heads, merge=None):
    """official: list of (B,N,h,w) unnormalised scores, one per learner subset in ``heads``, as the
    official decode head returns them: a subset's score is the SUM of its learners' softmaxes (each
    resized to the finest learner's grid); a learned merge scores only the whole ensemble, so a subset
    falls back to that sum. A model without ``learner_logits`` is taken to return its scores."""
    if not hasattr(model, "learner_logits"):
        if any(h is not None for h in heads):
            raise ValueError("learner subsets need a model with learner_logits()")
        return [model(x) for _ in heads]
    logits = list(model.learner_logits(x))
    out = []
    for subset in heads:
        full = subset is None or len(set(subset)) == len(logits)
        if hasattr(model, "head_scores"):
            learned = getattr(model, "merger", None) is not None and merge is None
            out.append(model.head_scores(logits, "mean" if learned and not full else merge,
                                         None if full else subset))
        else:
            out.append(official_scores(logits, merge or "mean", None if full else sorted(subset),
                                       _align_corners(model), single_output=num_learners(model) == 1))
    return out


def _resize(p, size, align_corners=False):
    return F.interpolate(p, size=tuple(size), mode="bilinear", align_corners=align_corners) \
        if tuple(p.shape[-2:]) != tuple(size) else p


def _align_corners(model):
    return bool(getattr(model, "align_corners", False))


def slide_probs(model, x, heads, crop, stride, merge=None):
    """fast: mmseg's window grid over ``x`` zero-padded up to ``crop``; merged probabilities averaged."""
    return slide(x, crop, stride, lambda t: [_resize(p, t.shape[-2:]) for p in head_probs(model, t, heads, merge)],
                 pad=True)


def slide_scores(model, x, heads, crop, stride, merge=None):
    """official (mmseg's slide_inference): each window's scores resized to the window, averaged before
    any softmax; a window larger than the image is the unpadded image itself."""
    ac = _align_corners(model)
    return slide(x, crop, stride,
                 lambda t: [_resize(s, t.shape[-2:], ac) for s in head_scores(model, t, heads, merge)], pad=False)


def _official_view(model, x, heads, mode, crop, stride, merge, size):
    """One test view as mmseg's EncoderDecoder.inference: scores at the network input's size (whole:
    encode_decode's resize; slide: window average), resized to the original ``size``, softmax."""
    ac = _align_corners(model)
    if mode == "slide":
        scores = slide_scores(model, x, heads, crop, stride, merge)
    else:
        scores = [_resize(s, x.shape[-2:], ac) for s in head_scores(model, x, heads, merge)]
    return [official_probs(s, size, ac) for s in scores]


def _fast_view(model, x, heads, mode, crop, stride, merge, size, amp):
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp and x.is_cuda):
        if mode == "slide":
            ps = slide_probs(model, x, heads, crop, stride, merge)
        else:
            ps = head_probs(model, x, heads, merge)
    return [_resize(p.float(), size) for p in ps]


def _input_dtype(model):
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


@torch.no_grad()
def infer_image(model, img: np.ndarray, heads=(None,), scale=(512, 512), ratios=(1.0,), flip=False,
                mode="whole", crop=None, stride=None, merge=None, device="cpu", mean=None, std=None,
                amp=False, protocol="official"):
    """Probabilities (1,N,H,W) at the original size of ``img`` (HxWx3 uint8), one per head, averaged over
    the test scales ``ratios`` x ``scale`` and, with ``flip``, horizontal flips (the paper's +MS).

    protocol="official" (mmseg 0.20, the paper's numbers): OpenCV INTER_LINEAR test resize, each view
    ``softmax(resize(resize(scores -> input) -> original))`` with SenFormer's scores the SUM of the
    learners' softmaxes, views averaged; runs in the model's dtype (``amp`` is ignored: the official
    code tests in fp32). protocol="fast": Pillow's antialiased resize, the mean of softmaxes resized
    once, windows zero-padded, bf16 autocast with ``amp`` on CUDA."""
    check_protocol(protocol)
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError("slide inference needs crop_size and stride")
    official = protocol == "official"
    H, W = img.shape[:2]
    norm = {} if mean is None else {"mean": mean, "std": std}
    dtype = _input_dtype(model)
    total, n = None, 0
    for s in aug_scales(scale, ratios):
        size = rescale_size(H, W, s)
        im = resize_linear(img, size) if official else resize_pillow(img, size)
        x = normalize(im, **norm).unsqueeze(0).to(device=device, dtype=dtype)
        for flipped in ([False, True] if flip else [False]):
            # mmseg flips the resized image and flips the softmax back (RandomFlip, then inference)
            xi = x.flip(-1) if flipped else x
            if official:
                ps = _official_view(model, xi, heads, mode, crop, stride, merge, (H, W))
            else:
                ps = _fast_view(model, xi, heads, mode, crop, stride, merge, (H, W), amp)
            if flipped:
                ps = [p.flip(-1) for p in ps]
            total = ps if total is None else [t + p for t, p in zip(total, ps)]
            n += 1
    return [t / n for t in total]
