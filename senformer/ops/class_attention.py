"""class_cross_attention: N class queries attend over L pixel tokens (DESIGN.md, op 1)."""
from __future__ import annotations

import torch

from . import _checks, reference
from ._dispatch import deterministic_requested, resolve

# Below this many keys the CPU kernel (blocked online softmax) is no faster than the reference's
# plain softmax (the whole score matrix fits in cache), so the automatic choice takes the reference.
# Measured fwd+bwd, B=2 H=8 N=150 D=64, 2 threads: see benchmarks/results/cpu-attention-*.json.
CPU_MIN_KEYS = 4096


def class_cross_attention(q, k, v, scale=None, deterministic=None):
    """softmax(q k^T * scale) v, q (B,H,N,D), k/v (B,H,L,D); same semantics as
    ``F.scaled_dot_product_attention(q, k, v)`` without a mask. ``deterministic`` (default:
    ``torch.are_deterministic_algorithms_enabled()``) picks a reduction-based backward over atomics."""
    _checks.check_attention(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    slower = ("cpu",) if k.shape[-2] < CPU_MIN_KEYS else ()
    backend = resolve("class_cross_attention", q, has_triton=_triton_impl is not None, slower_here=slower)
    if backend == "triton":
        return _triton_impl(q, k, v, scale, deterministic_requested(deterministic))
    if backend in ("cpu", "cuda"):
        return torch.ops.senformer.class_cross_attention(q, k, v, scale)
    return reference.class_cross_attention(q, k, v, scale)


# --- Triton backend: custom ops (namespace senformer_triton; senformer is the C++ extension's) ---
# The kernels module imports triton, so it is loaded on first call: ``import senformer`` works without triton.

@torch.library.custom_op("senformer_triton::class_cross_attention_bwd", mutates_args=())
def _triton_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, scale: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from senformer.kernels import class_attention as kern
    return kern.backward(do, q, k, v, out, lse, scale, deterministic)


@_triton_bwd.register_fake
def _(do, q, k, v, out, lse, scale, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("senformer_triton::class_cross_attention", mutates_args=())
def _triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward returning (out, lse); lse (log2 domain, fp32) is an output only so backward can reuse it."""
    from senformer.kernels import class_attention as kern
    return kern.forward(q, k, v, scale)


@_triton_op.register_fake
def _(q, k, v, scale, deterministic):
    B, H, N, D = q.shape
    return q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.deterministic = deterministic
    ctx.set_materialize_grads(False)  # lse never gets a gradient: no zero tensor filled for it each step


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None
    dq, dk, dv = _triton_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.deterministic)
    return dq, dk, dv, None, None


_triton_op.register_autograd(_backward, setup_context=_setup_context)


def _triton_impl(q, k, v, scale, deterministic):
    return _triton_op(q, k, v, scale, deterministic)[0]
