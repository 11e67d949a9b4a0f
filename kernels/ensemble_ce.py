"""Fused full-resolution cross-entropy over bilinearly upsampled low-resolution maps (DESIGN.md, op 3).

One program handles BLOCK_P consecutive pixels of one image. For every pixel it reads the label once,
then for each of the K stacked low-resolution maps (the ensemble map E, then every learner map U_i,
all already on the finest learner grid (h, w)) it gathers the 4 bilinear neighbours for all classes,
forms the upsampled logits in registers, and computes the log-sum-exp, the NLL and (when a gradient
is wanted) softmax - onehot, which it scatters back to the low-resolution grid with the same bilinear
weights. No (B, N, H, W) tensor exists at any point.

The maps are stored channels-last, (K, B, h, w, N), so each neighbour's N class scores are one
contiguous vector: a gather becomes a few wide loads and the gradient atomics hit consecutive
addresses.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import on_input_device
from .bilinear import source_index, source_scale

@triton.jit
def _ensemble_ce_kernel(
    z_ptr, gz_ptr,                      # (K, B, h, w, N) float32; gz accumulates raw gradient sums
    t_ptr, st_b, st_h, st_w,            # target (B, H, W), any integer dtype, any strides
    part_ptr,                           # (B * n_blocks, K + 1) float32: per-map NLL sums, valid count
    bad_ptr,                            # (B * n_blocks, 2) int64: number of bad labels, one bad value
    K, B, N, H, W, h, w, map_numel, scale_h, scale_w, ignore_index,
    ALIGN_CORNERS: tl.constexpr, NEED_GRAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1)
    n_blocks = tl.num_programs(0)
    row = b * n_blocks + pid_p

    offs = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    in_img = offs < H * W
    y = offs // W
    x = offs % W
    y0, y1, ly1 = source_index(y, h, scale_h, ALIGN_CORNERS)
    x0, x1, lx1 = source_index(x, w, scale_w, ALIGN_CORNERS)
    ly0 = 1.0 - ly1
    lx0 = 1.0 - lx1

    t = tl.load(t_ptr + b.to(tl.int64) * st_b + y.to(tl.int64) * st_h + x.to(tl.int64) * st_w,
                mask=in_img, other=ignore_index).to(tl.int64)
    labelled = in_img & (t != ignore_index)
    bad = labelled & ((t < 0) | (t >= N))
    valid = labelled & (t >= 0) & (t < N)
    tl.store(bad_ptr + row * 2, tl.sum(bad.to(tl.int64), axis=0))
    # -2**62 stands for "no bad label here": below any label a real dataset uses.
    tl.store(bad_ptr + row * 2 + 1, tl.max(tl.where(bad, t, -(2 ** 62)), axis=0))
    tl.store(part_ptr + row * (K + 1) + K, tl.sum(valid.to(tl.float32), axis=0))

    cls = tl.arange(0, BLOCK_N)
    cmask = cls < N
    # Offsets of the 4 neighbours' class vectors inside one (h, w, N) map. int32 (the launcher checks
    # h*w*N < 2**31; the int64 part is the per-map base) keeps these 4 tiles at one register per element.
    o00 = ((y0 * w + x0) * N)[:, None] + cls[None, :]
    o01 = ((y0 * w + x1) * N)[:, None] + cls[None, :]
    o10 = ((y1 * w + x0) * N)[:, None] + cls[None, :]
    o11 = ((y1 * w + x1) * N)[:, None] + cls[None, :]
    m2 = in_img[:, None] & cmask[None, :]
    onehot = cls[None, :] == t[:, None]

    for k in range(K):
        zk = z_ptr + (k * B + b).to(tl.int64) * map_numel
        v00 = tl.load(zk + o00, mask=m2, other=0.0)
        v01 = tl.load(zk + o01, mask=m2, other=0.0)
        v10 = tl.load(zk + o10, mask=m2, other=0.0)
        v11 = tl.load(zk + o11, mask=m2, other=0.0)
        # Same association order as torch's CPU/CUDA bilinear kernels.
        z = ly0[:, None] * (lx0[:, None] * v00 + lx1[:, None] * v01) \
            + ly1[:, None] * (lx0[:, None] * v10 + lx1[:, None] * v11)
        z = tl.where(cmask[None, :], z, float("-inf"))
        zmax = tl.max(z, axis=1)
        ez = tl.exp(z - zmax[:, None])
        sez = tl.sum(ez, axis=1)
        lse = zmax + tl.log(sez)
        zt = tl.sum(tl.where(onehot, z, 0.0), axis=1)
        nll = tl.where(valid, lse - zt, 0.0)
        tl.store(part_ptr + row * (K + 1) + k, tl.sum(nll, axis=0))
        if NEED_GRAD:
            # d(sum of NLL)/dz; the 1/valid_count and upstream scales are applied on the small grid.
            g = ez / sez[:, None] - onehot.to(tl.float32)
            gm = valid[:, None] & cmask[None, :]
            gk = gz_ptr + (k * B + b).to(tl.int64) * map_numel
            tl.atomic_add(gk + o00, g * (ly0 * lx0)[:, None], mask=gm, sem="relaxed")
            tl.atomic_add(gk + o01, g * (ly0 * lx1)[:, None], mask=gm, sem="relaxed")
            tl.atomic_add(gk + o10, g * (ly1 * lx0)[:, None], mask=gm, sem="relaxed")
            tl.atomic_add(gk + o11, g * (ly1 * lx1)[:, None], mask=gm, sem="relaxed")


@triton.jit
def _ensemble_ce_grad_gather_kernel(
    z_ptr, gz_ptr,                      # (K, B, h, w, N) float32; gz written, never accumulated
    t_ptr, st_b, st_h, st_w,
    B, N, H, W, h, w, map_numel, scale_h, scale_w, inv_h, inv_w, win_h, ignore_index,
    ALIGN_CORNERS: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Deterministic gradient: one program per low-resolution cell of one map gathers, in a fixed
    order, the contributions of every full-resolution pixel whose bilinear footprint contains the
    cell (a window of ~2/scale rows x ~2/scale columns), recomputing those pixels' softmax."""
    cell = tl.program_id(0)
    kb = tl.program_id(1)               # k * B + b
    b = kb % B
    yl = cell // w
    xl = cell % w
    # First full-resolution row/column whose source coordinate can reach yl - 1 (then one more for
    # rounding); inv_* = 1/scale, 0 when every output pixel samples the same input row/column.
    if ALIGN_CORNERS:
        y_lo = tl.maximum(tl.floor((yl - 1).to(tl.float32) * inv_h).to(tl.int32) - 1, 0)
        x_lo = tl.maximum(tl.floor((xl - 1).to(tl.float32) * inv_w).to(tl.int32) - 1, 0)
    else:
        y_lo = tl.maximum(tl.floor((yl.to(tl.float32) - 0.5) * inv_h - 0.5).to(tl.int32) - 1, 0)
        x_lo = tl.maximum(tl.floor((xl.to(tl.float32) - 0.5) * inv_w - 0.5).to(tl.int32) - 1, 0)

    xs = x_lo + tl.arange(0, BLOCK_X)
    x_ok = xs < W
    x0, x1, lx1 = source_index(xs, w, scale_w, ALIGN_CORNERS)
    lx0 = 1.0 - lx1
    wx = tl.where(x0 == xl, lx0, 0.0) + tl.where(x1 == xl, lx1, 0.0)
    cls = tl.arange(0, BLOCK_N)
    cmask = cls < N
    zk = z_ptr + kb.to(tl.int64) * map_numel
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(win_h):
        yy = y_lo + i
        y0, y1, ly1 = source_index(yy, h, scale_h, ALIGN_CORNERS)
        ly0 = 1.0 - ly1
        wy = tl.where(y0 == yl, ly0, 0.0) + tl.where(y1 == yl, ly1, 0.0)
        ok = x_ok & ((xs * 0 + yy) < H) & (wx * wy != 0.0)  # vector form: the interpreter wants a vector mask
        t = tl.load(t_ptr + b.to(tl.int64) * st_b + yy.to(tl.int64) * st_h + xs.to(tl.int64) * st_w,
                    mask=ok, other=ignore_index).to(tl.int64)
        valid = ok & (t != ignore_index) & (t >= 0) & (t < N)
        m2 = valid[:, None] & cmask[None, :]
        v00 = tl.load(zk + ((y0 * w + x0) * N)[:, None] + cls[None, :], mask=m2, other=0.0)
        v01 = tl.load(zk + ((y0 * w + x1) * N)[:, None] + cls[None, :], mask=m2, other=0.0)
        v10 = tl.load(zk + ((y1 * w + x0) * N)[:, None] + cls[None, :], mask=m2, other=0.0)
        v11 = tl.load(zk + ((y1 * w + x1) * N)[:, None] + cls[None, :], mask=m2, other=0.0)
        z = ly0 * (lx0[:, None] * v00 + lx1[:, None] * v01) + ly1 * (lx0[:, None] * v10 + lx1[:, None] * v11)
        z = tl.where(cmask[None, :], z, float("-inf"))
        zmax = tl.max(z, axis=1)
        ez = tl.exp(z - zmax[:, None])
        g = ez / tl.sum(ez, axis=1)[:, None] - (cls[None, :] == t[:, None]).to(tl.float32)
        g = tl.where(m2, g, 0.0)
        acc += tl.sum(g * (wx * wy)[:, None], axis=0)
    tl.store(gz_ptr + kb.to(tl.int64) * map_numel + cell * N + cls, acc, mask=cmask)


def _window(in_size: int, out_size: int, scale: float) -> int:
    """Full-resolution rows (or columns) whose bilinear footprint can contain one input cell."""
    if scale == 0.0:
        return out_size
    return min(out_size, math.ceil(2.0 / scale) + 4)


def _launch_config(n_classes: int, n_pixels: int, interpret: bool):
    block_n = triton.next_power_of_2(max(n_classes, 1))
    if interpret:
        # The interpreter pays per program, not per element: few large programs run fastest, yet
        # several per image so the tests cover ragged last blocks and atomics across programs.
        return block_n, max(16, min(256, triton.next_power_of_2(n_pixels), 16384 // block_n)), 4
    # sm_90 ptxas: 2048-element tiles with 8 warps (8 per thread) compile to ~250 registers and no
    # spills (4096 spills), because the 4 gathered neighbour tiles, their int32 offsets, the logits,
    # exps and the gradient tile are all live at once. Untimed: a benchmark session should tune this.
    block_p = max(1, min(64, 2048 // block_n))
    return block_n, block_p, 8 if block_p * block_n >= 2048 else 4


@on_input_device
def upsampled_ce(z: torch.Tensor, target: torch.Tensor, ignore_index: int, align_corners: bool,
                     need_grad: bool, deterministic: bool = False):
    """Step ``upsampled_ce`` of ensemble_cross_entropy over stacked channels-last maps ``z``
    (K, B, h, w, N) float32 and an integer target (B, H, W) of any strides.

    Returns ``(nll_sums (K,), valid_count (), bad (2,) = [number of bad labels, one bad value],
    grad_sums)`` where grad_sums (same shape as z, or None) is d(nll_sums[k])/dz[k] for every k;
    bad labels count as ignored.
    ``deterministic``: gather the gradient per low-resolution cell in a fixed order (a second kernel,
    several times the work) instead of scattering it with fp32 atomics.
    Every result stays on the device: nothing here synchronises with the host."""
    K, B, h, w, N = z.shape
    H, W = target.shape[-2:]
    interpret = z.device.type != "cuda"
    if h * w * N >= 2 ** 31:
        raise ValueError(f"ensemble_cross_entropy: one low-resolution map (h, w, N) = ({h}, {w}, {N}) has "
                         f"2**31 or more elements; the kernel indexes inside a map with int32")
    block_n, block_p, num_warps = _launch_config(N, H * W, interpret)
    n_blocks = triton.cdiv(H * W, block_p)
    part = torch.empty((B * n_blocks, K + 1), device=z.device, dtype=torch.float32)
    bad = torch.empty((B * n_blocks, 2), device=z.device, dtype=torch.int64)
    scatter = need_grad and not deterministic
    gz = torch.zeros_like(z) if scatter else z  # z is a never-written dummy when nothing is scattered
    _ensemble_ce_kernel[(n_blocks, B)](
        z, gz, target, target.stride(0), target.stride(1), target.stride(2), part, bad,
        K, B, N, H, W, h, w, h * w * N,
        source_scale(h, H, align_corners), source_scale(w, W, align_corners), int(ignore_index),
        ALIGN_CORNERS=bool(align_corners), NEED_GRAD=scatter,
        BLOCK_P=block_p, BLOCK_N=block_n, num_warps=num_warps,
    )
    if need_grad and deterministic:
        gz = torch.empty_like(z)
        sh, sw = source_scale(h, H, align_corners), source_scale(w, W, align_corners)
        block_x = triton.next_power_of_2(_window(w, W, sw))
        _ensemble_ce_grad_gather_kernel[(h * w, K * B)](
            z, gz, target, target.stride(0), target.stride(1), target.stride(2),
            B, N, H, W, h, w, h * w * N, sh, sw, 1.0 / sh if sh else 0.0, 1.0 / sw if sw else 0.0,
            _window(h, H, sh), int(ignore_index),
            ALIGN_CORNERS=bool(align_corners), BLOCK_X=block_x, BLOCK_N=block_n,
            # sm_90 ptxas: 16 x 256 tiles spill a little with 4 warps, not with 8.
            num_warps=8 if block_x * block_n >= 4096 else 4,
        )
    bad_summary = torch.stack([bad[:, 0].sum(), bad[:, 1].max()])
    return part[:, :K].sum(dim=0), part[:, K].sum(), bad_summary, (gz if need_grad else None)
