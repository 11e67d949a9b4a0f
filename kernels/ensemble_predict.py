"""Fused bilinear upsample + argmax of merged class scores (DESIGN.md, op 4).

The merged scores live on the finest learner grid, channels-last (B, h, w, N). One program labels
BLOCK_P consecutive output pixels of one image: it gathers the 4 bilinear neighbours' N scores,
interpolates in registers and writes only the int64 label, so no (B, N, H, W) tensor exists.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import on_input_device
from .bilinear import source_index, source_scale


@triton.jit
def _upsample_argmax_kernel(
    s_ptr,                              # (B, h, w, N) float32 merged scores, contiguous
    out_ptr,                            # (B, H, W) int64 labels, contiguous
    N, H, W, h, w, map_numel, scale_h, scale_w,
    ALIGN_CORNERS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    in_img = offs < H * W
    y = offs // W
    x = offs % W
    y0, y1, ly1 = source_index(y, h, scale_h, ALIGN_CORNERS)
    x0, x1, lx1 = source_index(x, w, scale_w, ALIGN_CORNERS)
    ly0 = 1.0 - ly1
    lx0 = 1.0 - lx1

    cls = tl.arange(0, BLOCK_N)
    cmask = cls < N
    m2 = in_img[:, None] & cmask[None, :]
    base = s_ptr + b * map_numel
    v00 = tl.load(base + ((y0 * w + x0).to(tl.int64) * N)[:, None] + cls[None, :], mask=m2, other=0.0)
    v01 = tl.load(base + ((y0 * w + x1).to(tl.int64) * N)[:, None] + cls[None, :], mask=m2, other=0.0)
    v10 = tl.load(base + ((y1 * w + x0).to(tl.int64) * N)[:, None] + cls[None, :], mask=m2, other=0.0)
    v11 = tl.load(base + ((y1 * w + x1).to(tl.int64) * N)[:, None] + cls[None, :], mask=m2, other=0.0)
    z = ly0[:, None] * (lx0[:, None] * v00 + lx1[:, None] * v01) \
        + ly1[:, None] * (lx0[:, None] * v10 + lx1[:, None] * v11)
    z = tl.where(cmask[None, :], z, float("-inf"))
    # As torch.argmax: ties go to the lowest class index, and a NaN beats everything (first NaN wins).
    zmax = tl.max(z, axis=1)
    label = tl.min(tl.where(z == zmax[:, None], cls[None, :], BLOCK_N), axis=1)
    first_nan = tl.min(tl.where(z != z, cls[None, :], BLOCK_N), axis=1)
    label = tl.where(first_nan < BLOCK_N, first_nan, label)
    tl.store(out_ptr + b * H * W + offs, label.to(tl.int64), mask=in_img)


def _launch_config(n_classes: int, n_pixels: int, interpret: bool):
    block_n = triton.next_power_of_2(max(n_classes, 1))
    if interpret:
        return block_n, max(16, min(256, triton.next_power_of_2(n_pixels), 16384 // block_n)), 4
    # sm_90 ptxas: 4096-element tiles with 8 warps compile to ~150 registers without spills
    # (8192 spills). Untimed: a benchmark session should tune this.
    block_p = max(1, min(256, 4096 // block_n))
    return block_n, block_p, 8 if block_p * block_n >= 4096 else 4


@on_input_device
def upsampled_argmax(scores: torch.Tensor, size, align_corners: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Step ``upsampled_argmax`` of ensemble_predict: labels (B, H, W) int64 of ``scores`` (B, h, w, N)
    float32 channels-last, bilinearly resized to size (first maximum, as torch.argmax).
    ``out``: optional contiguous (B, H, W) int64 buffer to write into."""
    B, h, w, N = scores.shape
    H, W = (int(s) for s in size)
    interpret = scores.device.type != "cuda"
    block_n, block_p, num_warps = _launch_config(N, H * W, interpret)
    if out is None:
        out = torch.empty((B, H, W), device=scores.device, dtype=torch.int64)
    elif out.shape != (B, H, W) or out.dtype != torch.int64 or not out.is_contiguous():
        raise ValueError(f"upsampled_argmax: out must be a contiguous ({B}, {H}, {W}) int64 tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    grid = (triton.cdiv(H * W, block_p), B)
    _upsample_argmax_kernel[grid](
        scores, out, N, H, W, h, w, h * w * N,
        source_scale(h, H, align_corners), source_scale(w, W, align_corners),
        ALIGN_CORNERS=bool(align_corners), BLOCK_P=block_p, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out
