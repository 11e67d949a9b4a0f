"""mask_logits: pixel tokens x class embeddings, written straight into (B,N,h,w) (DESIGN.md, op 2)."""
from __future__ import annotations

import torch

from . import _checks, reference
from ._dispatch import resolve

# Backends the automatic choice skips: senformer._C's CPU kernel runs the very GEMMs the reference
# does (MKL/oneDNN), so it cannot be faster and its custom op only adds overhead (fwd+bwd 0.94-1.06x
# the reference, B=2 N=150 C=512 L=1024..16384, 2 threads). ``use_backend("cpu")`` still forces it.
SLOWER_HERE = ("cpu",)


def mask_logits(features, cls, hw):
    """features (B,L,C), cls (B,N,C), hw=(h,w) with h*w == L -> logits (B,N,h,w)."""
    h, w = _checks.check_mask_logits(features, cls, hw)
    backend = resolve("mask_logits", features, has_triton=_triton_impl is not None, slower_here=SLOWER_HERE)
    if backend == "triton":
        return _triton_impl(features, cls, h, w)
    if backend in ("cpu", "cuda"):
        return torch.ops.senformer.mask_logits(features, cls, h, w)
    return reference.mask_logits(features, cls, (h, w))


# --- Triton backend: custom ops (namespace senformer_triton; senformer is the C++ extension's) ---
# The kernels module imports triton, so it is loaded on first call: ``import senformer`` works without triton.

@torch.library.custom_op("senformer_triton::mask_logits", mutates_args=())
def _triton_op(features: torch.Tensor, cls: torch.Tensor, h: int, w: int) -> torch.Tensor:
    from senformer.kernels import mask_logits as kern
    return kern.forward(features, cls, h, w)


@_triton_op.register_fake
def _(features, cls, h, w):
    return features.new_empty((cls.shape[0], cls.shape[1], h, w))


@torch.library.custom_op("senformer_triton::mask_logits_bwd", mutates_args=())
def _triton_bwd(grad: torch.Tensor, features: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from senformer.kernels import mask_logits as kern
    return kern.backward(grad, features, cls)


@_triton_bwd.register_fake
def _(grad, features, cls):
    return features.new_empty(features.shape), cls.new_empty(cls.shape)


def _setup_context(ctx, inputs, output):
    features, cls, h, w = inputs
    ctx.save_for_backward(features, cls)


def _backward(ctx, grad):
    features, cls = ctx.saved_tensors
    d_feat, d_cls = _triton_bwd(grad, features, cls)
    return d_feat, d_cls, None, None


_triton_op.register_autograd(_backward, setup_context=_setup_context)


def _triton_impl(features, cls, h, w):
    return _triton_op(features, cls, h, w)
