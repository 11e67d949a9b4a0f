"""Bilinear source coordinates exactly as torch's ``F.interpolate(mode="bilinear")`` computes them.

Shared by the fused loss and the fused predict kernels, which sample low-resolution maps at
full-resolution pixels instead of materialising the upsampled (B, N, H, W) tensor.
"""
from __future__ import annotations

import triton
import triton.language as tl


def source_scale(in_size: int, out_size: int, align_corners: bool) -> float:
    """The per-axis scale torch uses when ``size`` (not ``scale_factor``) is given."""
    if align_corners:
        return (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    return in_size / out_size


@triton.jit
def source_index(dst, in_size, scale, ALIGN_CORNERS: tl.constexpr):
    """For integer output coordinates ``dst``: the two input neighbours and the weight of the second.

    Mirrors torch's guard_index_and_lambda: the lower index is clamped to in_size - 1 and the
    weight to [0, 1], so an identity resize (scale 1) reproduces the input exactly."""
    d = dst.to(tl.float32)
    if ALIGN_CORNERS:
        src = d * scale
    else:
        src = tl.maximum((d + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0, so truncation is floor
    i1 = tl.minimum(i0 + 1, in_size - 1)
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    return i0, i1, l1
