"""Bilinear source coordinates exactly as torch's ``F.interpolate(mode="bilinear")`` computes them.

Shared by the fused loss and the fused predict kernels, which sample low-resolution maps at
full-resolution pixels instead of materialising the upsampled (B, N, H, W) tensor, and which resize
the learners onto the finest learner grid (``resized_scores``, walked in ``grid_pixels`` blocks).
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


def grid_config(n_lanes: int, height: int, width: int, interpret: bool):
    """(BLOCK_N, BLOCK_P, num_warps, ROWS) of a ``grid_pixels`` kernel over class rows of n_lanes on
    an (height, width) grid: on the GPU rows of BLOCK_P-pixel blocks, in the interpreter the
    flattened grid in blocks of up to 16384 elements."""
    block_n = triton.next_power_of_2(max(n_lanes, 16))
    if interpret:
        return block_n, max(1, min(triton.next_power_of_2(height * width), 16384 // block_n)), 4, False
    # Memory-bound: occupancy first. sm_90 ptxas, 2048-element tiles with 8 warps: merge_scores 80-122
    # registers, two CTAs per SM (4096: 145-190, one); learner_map 24-48. Untimed: a benchmark
    # session should tune this.
    block_p = max(1, min(64, triton.next_power_of_2(width), 2048 // block_n))
    return block_n, block_p, 8 if block_p * block_n >= 2048 else 4, True


def pixel_grid(batch: int, height: int, width: int, block_p: int, rows: bool) -> tuple:
    """The launch grid of a ``grid_pixels`` kernel (its ROWS layout or the flattened one)."""
    if rows:
        return (triton.cdiv(width, block_p), height, batch)
    return (triton.cdiv(height * width, block_p), 1, batch)


@triton.jit
def grid_pixels(b, h, w, ROWS: tl.constexpr, BLOCK_P: tl.constexpr):
    """The BLOCK_P pixels of image b of an (h, w) grid that this program owns: (y, x, mask, flat index
    into (B, h, w)). ROWS: columns of row y = program_id(1) (grid (cdiv(w, BLOCK_P), h, B)), so loads
    along a row are provably contiguous; else consecutive pixels of the flattened grid (grid
    (cdiv(h * w, BLOCK_P), 1, B): fewer, larger programs, which the interpreter runs faster)."""
    if ROWS:
        y = tl.program_id(1)
        xs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = xs < w
        pix = (b.to(tl.int64) * h + y) * w + xs
    else:
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        y = p // w
        xs = p % w
        mask = p < h * w
        pix = b.to(tl.int64) * h * w + p
    return y, xs, mask, pix


@triton.jit
def blend_taps(base, r0, r1, c0, c1, ly1, lx1, m2):
    """torch's bilinear blend, in float32, of the four taps at ``base`` + row offsets r0 / r1 +
    column offsets c0 / c1 (elements, broadcast to the (pixels, classes) mask m2), with ly1 / lx1 the
    weights of the second row / column: the two rows blended across columns, then the rows -- torch's
    order of operations."""
    lx0 = 1.0 - lx1
    top = lx0 * tl.load(base + r0 + c0, mask=m2, other=0.0).to(tl.float32) \
        + lx1 * tl.load(base + r0 + c1, mask=m2, other=0.0).to(tl.float32)
    bottom = lx0 * tl.load(base + r1 + c0, mask=m2, other=0.0).to(tl.float32) \
        + lx1 * tl.load(base + r1 + c1, mask=m2, other=0.0).to(tl.float32)
    return (1.0 - ly1) * top + ly1 * bottom


@triton.jit
def resized_scores(x_ptr, s_b, s_c, s_h, s_w, h, w, scale_h, scale_w, b, y, xs, cls, m2,
                   RESIZE: tl.constexpr, ALIGN_CORNERS: tl.constexpr, ROWS: tl.constexpr):
    """A learner map's float32 class scores (BLOCK_P, BLOCK_N) at pixels (y, xs) of the grid it is
    resized to: x (B, N, h, w) at any strides (s_*, in elements) read as is (RESIZE False: same size)
    or resized as torch's bilinear ``F.interpolate`` does (scale_*: ``source_scale``). ROWS: y is one
    row (a scalar), else one per pixel; m2 masks (pixel, class) pairs."""
    base = x_ptr + b.to(tl.int64) * s_b + (cls.to(tl.int64) * s_c)[None, :]
    if RESIZE:
        y0, y1, ly1 = source_index(y, h, scale_h, ALIGN_CORNERS)
        x0, x1, lx1 = source_index(xs, w, scale_w, ALIGN_CORNERS)
        c0 = (x0.to(tl.int64) * s_w)[:, None]
        c1 = (x1.to(tl.int64) * s_w)[:, None]
        if ROWS:
            r0 = y0.to(tl.int64) * s_h
            r1 = y1.to(tl.int64) * s_h
        else:
            r0 = (y0.to(tl.int64) * s_h)[:, None]
            r1 = (y1.to(tl.int64) * s_h)[:, None]
            ly1 = ly1[:, None]
        return blend_taps(base, r0, r1, c0, c1, ly1, lx1[:, None], m2)
    if ROWS:
        r = y.to(tl.int64) * s_h
    else:
        r = (y.to(tl.int64) * s_h)[:, None]
    return tl.load(base + r + (xs.to(tl.int64) * s_w)[:, None], mask=m2, other=0.0).to(tl.float32)
