"""Fused full-resolution cross-entropy over bilinearly upsampled low-resolution maps (DESIGN.md, op 3).

Step ``upsampled_ce``: for the K stacked low-resolution maps (K, B, h, w, N) -- the ensemble map E and
the learner maps U_i, all on the finest learner grid -- and a full-resolution target (B, H, W): per
pixel, the 4 bilinear neighbours of every class are gathered, the upsampled logits formed in
registers, the log-sum-exp and NLL taken and, when a gradient is wanted, softmax - onehot reduced back
onto the low-resolution grid with the same bilinear weights. No (B, N, H, W) tensor exists. Maps are
channels-last, so a neighbour's N class scores are one contiguous vector (a few wide loads).

The chain's low-resolution work has five steps here, each one pass over the (B, h1, w1, N) grid:
``log_sum_scores`` (the forward's E = log(clamp(S, eps)), S = sum_i softmax(U_i), and clamp's mask, from
ensemble_predict's merge kernel: every learner read once, E written once with its class rows padded to
ROW_ALIGN), ``log_sum_grad`` (dS from the gradient of E), ``learner_map`` (per learner, U_i for this
step and, for the finest learner, the gradient reaching U_i through its softmax), ``learner_grads``
(per resized learner, after its full-resolution step: that softmax gradient and this step's gradient
of U_i, both taken through the resize's adjoint to the learner's own cells, tiled as this step is)
and, in the backward, ``combine_grads`` (the two saved gradients scaled by the incoming ones and
cast, per learner; the finest learner's own gradient is read as this step left it, channels-last,
and transposed on chip).

Four designs, picked with ``use_variant`` (``VARIANTS[0]`` is the default):
- ``"tiled"``: each program owns a tile of low-resolution cells and reduces the gradient of every
  full-resolution pixel that touches it with one matrix product per pixel block (``tl.dot``), stores
  each cell once: no atomics, deterministic by construction, halo pixels recomputed (~1.3-1.6x the
  per-pixel work at the paper's 4x upsampling).
- ``"scatter"``: one program per run of pixels, the gradient scattered with 4 fp32 atomics per pixel
  and class (nondeterministic; under deterministic algorithms a second kernel gathers it per cell).
- ``"torch-lowres"``: the tiled kernel, with the low-resolution chain in plain torch (per learner a
  resized map, a padded copy, a softmax, an add, and again a resized map, a copy, a softmax and its
  backward, aten's resize adjoint; clamp, log and their backward; the backward's scaling). At the
  paper's shapes (B=8, N=150, bf16 maps 128..16) fwd+bwd moves 8.9 GB, the default 2.6 GB, the eager
  reference 76.5 GB (``benchmarks/lowres_traffic.py``: aten ops counted, kernel steps at their floor).
- ``"aten-adjoint"``: the default without ``learner_grads``: each resized learner's softmax backward
  written at (h1, w1) by ``learner_map`` and both of its gradients taken back through aten's bilinear
  backward (channels-last; atomics on CUDA), as before that step existed: 3.2 GB by the same count.
The older designs stay reachable (benchmark rows ``triton[<name>]``) until a GPU run has measured them
against the default; then the losers go.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import Designs, alloc, on_input_device, padded_rows
from .bilinear import blend_taps, grid_config, grid_pixels, pixel_grid, resized_scores, source_index, source_scale
from .ensemble_predict import LOG_SUM, launch_merge

@triton.jit
def _tile_window(ywin_ptr, xwin_ptr, n_tx, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """For program pid of a tiled kernel (grid (n_tiles, B)): its tile's first output row y_lo and
    column x_lo, the window's width and pixel count (``_axis_tables``' windows), and the tile's cells
    (row-major TILE_H x TILE_W) as their low-resolution (y, x)."""
    pid = tl.program_id(0)
    ty = pid // n_tx
    tx = pid % n_tx
    y_lo = tl.load(ywin_ptr + 2 * ty)
    x_lo = tl.load(xwin_ptr + 2 * tx)
    win_w = tl.load(xwin_ptr + 2 * tx + 1) - x_lo
    n_pix = (tl.load(ywin_ptr + 2 * ty + 1) - y_lo) * win_w
    cell = tl.arange(0, TILE_H * TILE_W)
    return y_lo, x_lo, win_w, n_pix, ty * TILE_H + cell // TILE_W, tx * TILE_W + cell % TILE_W


@triton.jit
def _window_taps(p0, n_pix, win_w, y_lo, x_lo, yi_ptr, yl_ptr, xi_ptr, xl_ptr, out_h, out_w, BLOCK_P: tl.constexpr):
    """Pixels p0 .. p0 + BLOCK_P of a tile's window: (in window, y, x, and their bilinear taps y0, y1,
    ly1, x0, x1, lx1 from the tables; 0 outside the window)."""
    idx = p0 + tl.arange(0, BLOCK_P)
    in_win = idx < n_pix
    y = y_lo + idx // win_w
    x = x_lo + idx % win_w
    y0 = tl.load(yi_ptr + y, mask=in_win, other=0)
    y1 = tl.load(yi_ptr + out_h + y, mask=in_win, other=0)
    ly1 = tl.load(yl_ptr + y, mask=in_win, other=0.0)
    x0 = tl.load(xi_ptr + x, mask=in_win, other=0)
    x1 = tl.load(xi_ptr + out_w + x, mask=in_win, other=0)
    lx1 = tl.load(xl_ptr + x, mask=in_win, other=0.0)
    return in_win, y, x, y0, y1, ly1, x0, x1, lx1


@triton.jit
def _tile_weights(cell_y, cell_x, y0, y1, ly1, x0, x1, lx1):
    """(cells x pixels) bilinear weights of a tile's cells at a block of pixels: the matrix whose
    product with the pixels' (pixels x classes) gradient is the resize's adjoint on the tile. A clamped
    edge pixel (i0 == i1) gives its cell both weights."""
    wy = tl.where(y0[None, :] == cell_y[:, None], 1.0 - ly1[None, :], 0.0) \
        + tl.where(y1[None, :] == cell_y[:, None], ly1[None, :], 0.0)
    wx = tl.where(x0[None, :] == cell_x[:, None], 1.0 - lx1[None, :], 0.0) \
        + tl.where(x1[None, :] == cell_x[:, None], lx1[None, :], 0.0)
    return wy * wx


@triton.jit
def _ensemble_ce_tiled_kernel(
    z_ptr, gz_ptr,                      # (K, B, h, w, *) float32, class rows `row_stride` apart; gz: stored once
    t_ptr, st_b, st_h, st_w,            # target (B, H, W), any integer dtype, any strides
    yi_ptr, yl_ptr, ywin_ptr,           # rows: (2, H) int32 neighbours i0, i1; (H,) fp32 weight of i1;
    xi_ptr, xl_ptr, xwin_ptr,           #   (n_ty, 2) int32 window [lo, hi) of each tile row; columns alike
    part_ptr,                           # (B * n_tiles, K + 1) float32: per-map NLL sums, valid count
    bad_ptr,                            # (B * n_tiles, 2) int64: number of bad labels, one bad value
    K, B, N, H, W, h, w, map_numel, row_stride, n_tx, ignore_index,
    NEED_GRAD: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program owns a TILE_H x TILE_W tile of low-resolution cells of one image and walks the
    full-resolution pixels whose bilinear footprint touches it (the window: pixels whose lower
    neighbour row/column lies in [tile start - 1, tile end - 1]), BLOCK_P at a time. Their gradient
    rows are reduced onto the tile's cells as one matrix product, (cells x pixels bilinear weights) @
    (pixels x classes gradient): the cell gradients live in registers and are stored once, no
    atomics, in a fixed order. Halo pixels (in two tiles' windows) are recomputed, not shared; a
    pixel's NLL and label are counted by the tile that holds its lower neighbour (y0, x0)."""
    b = tl.program_id(1)
    row = b * tl.num_programs(0) + tl.program_id(0)
    y_lo, x_lo, win_w, n_pix, cell_y, cell_x = _tile_window(ywin_ptr, xwin_ptr, n_tx, TILE_H, TILE_W)
    ty_lo = (tl.program_id(0) // n_tx) * TILE_H
    tx_lo = (tl.program_id(0) % n_tx) * TILE_W

    cls = tl.arange(0, BLOCK_N)
    cmask = cls < N
    t_base = t_ptr + b.to(tl.int64) * st_b

    count = tl.zeros((BLOCK_P,), dtype=tl.float32)
    n_bad = tl.zeros((BLOCK_P,), dtype=tl.int32)
    bad_val = tl.full((BLOCK_P,), -(2 ** 62), dtype=tl.int64)  # "no bad label": below any real label
    for k in range(K):
        zk = z_ptr + (k * B + b).to(tl.int64) * map_numel
        count = tl.zeros((BLOCK_P,), dtype=tl.float32)
        n_bad = tl.zeros((BLOCK_P,), dtype=tl.int32)
        bad_val = tl.full((BLOCK_P,), -(2 ** 62), dtype=tl.int64)
        nll = tl.zeros((BLOCK_P,), dtype=tl.float32)
        acc = tl.zeros((TILE_H * TILE_W, BLOCK_N), dtype=tl.float32)
        for p0 in range(0, n_pix, BLOCK_P):
            in_win, y, x, y0, y1, ly1, x0, x1, lx1 = _window_taps(p0, n_pix, win_w, y_lo, x_lo, yi_ptr, yl_ptr, xi_ptr,
                                                                 xl_ptr, H, W, BLOCK_P)
            ly0 = 1.0 - ly1
            lx0 = 1.0 - lx1
            owned = in_win & (y0 >= ty_lo) & (y0 < ty_lo + TILE_H) & (x0 >= tx_lo) & (x0 < tx_lo + TILE_W)

            t = tl.load(t_base + y.to(tl.int64) * st_h + x.to(tl.int64) * st_w, mask=in_win,
                        other=ignore_index).to(tl.int64)
            labelled = in_win & (t != ignore_index)
            valid = labelled & (t >= 0) & (t < N)
            bad = owned & labelled & ~valid
            count += (owned & valid).to(tl.float32)
            n_bad += bad.to(tl.int32)
            bad_val = tl.maximum(bad_val, tl.where(bad, t, -(2 ** 62)))

            m2 = valid[:, None] & cmask[None, :]
            # Loads run over the whole (padded) row: with row_stride a multiple of 16 (the launcher pads,
            # triton specialises on it) this mask is constant over 16 classes and the gathers vectorise;
            # padding columns are dropped by the -inf below.
            lm = valid[:, None] & (cls < row_stride)[None, :]
            # Same association order as torch's CPU/CUDA bilinear kernels; one neighbour row at a time
            # keeps two gathered tiles live, not four.
            # int32 offsets inside the map (the launcher checks h*w*row_stride < 2**31): one register
            # per element where a pointer tile would take two.
            top = lx0[:, None] * tl.load(zk + (((y0 * w + x0) * row_stride)[:, None] + cls[None, :]), mask=lm,
                                         other=0.0) \
                + lx1[:, None] * tl.load(zk + (((y0 * w + x1) * row_stride)[:, None] + cls[None, :]), mask=lm,
                                         other=0.0)
            bottom = lx0[:, None] * tl.load(zk + (((y1 * w + x0) * row_stride)[:, None] + cls[None, :]), mask=lm,
                                            other=0.0) \
                + lx1[:, None] * tl.load(zk + (((y1 * w + x1) * row_stride)[:, None] + cls[None, :]), mask=lm,
                                         other=0.0)
            z = ly0[:, None] * top + ly1[:, None] * bottom
            z = tl.where(cmask[None, :], z, float("-inf"))
            zmax = tl.max(z, axis=1)
            ez = tl.exp(z - zmax[:, None])
            sez = tl.sum(ez, axis=1)
            onehot = cls[None, :] == t[:, None]
            zt = tl.sum(tl.where(onehot, z, 0.0), axis=1)
            nll += tl.where(owned & valid, zmax + tl.log(sez) - zt, 0.0)
            if NEED_GRAD:
                # d(sum of NLL)/dz; the 1/valid_count and upstream scales are applied on the small grid.
                g = tl.where(m2, ez / sez[:, None] - onehot.to(tl.float32), 0.0)
                acc = tl.dot(_tile_weights(cell_y, cell_x, y0, y1, ly1, x0, x1, lx1), g, acc,
                             input_precision=DOT_PRECISION)
        tl.store(part_ptr + row * (K + 1) + k, tl.sum(nll, axis=0))
        if NEED_GRAD:
            gk = gz_ptr + (k * B + b).to(tl.int64) * map_numel
            dst = ((cell_y * w + cell_x) * row_stride)[:, None] + cls[None, :]
            tl.store(gk + dst, acc, mask=((cell_y < h) & (cell_x < w))[:, None] & cmask[None, :])
    tl.store(part_ptr + row * (K + 1) + K, tl.sum(count, axis=0))
    tl.store(bad_ptr + row * 2, tl.sum(n_bad, axis=0).to(tl.int64))
    tl.store(bad_ptr + row * 2 + 1, tl.max(bad_val, axis=0))


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


# ---------------------------------------------------------------------------------------------
# Launch configurations

def _launch_config(n_classes: int, n_pixels: int, interpret: bool):
    """The scatter design's (BLOCK_N, BLOCK_P, num_warps)."""
    block_n = triton.next_power_of_2(max(n_classes, 1))
    if interpret:
        # The interpreter pays per program, not per element: few large programs run fastest, yet
        # several per image so the tests cover ragged last blocks and atomics across programs.
        return block_n, max(16, min(256, triton.next_power_of_2(n_pixels), 16384 // block_n)), 4
    # sm_90 ptxas: 2048-element tiles with 8 warps (8 per thread) compile to ~250 registers and no
    # spills (4096 spills), because the 4 gathered neighbour tiles, their int32 offsets, the logits,
    # exps and the gradient tile are all live at once; below 128 classes 2048 spills too (80 bytes at
    # 32 x 64), 1024 does not. Untimed: a benchmark session should tune this.
    block_p = max(1, min(64, (2048 if block_n >= 128 else 1024) // block_n))
    return block_n, block_p, 8 if block_p * block_n >= 2048 else 4


def _tiled_config(n_classes: int, interpret: bool, need_grad: bool = True) -> dict:
    """The tiled design's tile of cells, pixel block, class block and warps.

    16 cells (4 x 4) is tl.dot's smallest M; a larger tile recomputes fewer halo pixels ((T+1)^2/T^2 of
    the pixels at 4x upsampling) but multiplies more zero weights (each pixel touches 4 cells of the
    tile). The dot runs in tf32x3 (three tf32 MMAs, ~fp32 accurate) on the GPU. Untimed: a benchmark
    session should tune all of this."""
    block_n = max(16, triton.next_power_of_2(max(n_classes, 1)))  # tl.dot's smallest N
    if interpret:
        # Few large programs for the interpreter, but 4 x 4 tiles so small test maps span several.
        return dict(TILE_H=4, TILE_W=4, BLOCK_P=max(16, min(128, 8192 // block_n)), BLOCK_N=block_n,
                    DOT_PRECISION="ieee", num_warps=4, num_stages=1)
    # sm_90 ptxas (tests/sm90_compile.py), spill-free on triton 3.6 (the GPU machine's) and 3.8 alike:
    # num_stages=1 (pipelining the loop's gathers spills 70-690 bytes). With a gradient, BLOCK_P=16
    # (the dot's K) on 8 warps from 64 classes (256: 179-255 registers; 4 warps spill 24 bytes, at 64
    # classes 8 on 3.6). Without, no dot: 8 pixels a step, 8 warps from 128 classes (96-148
    # registers; 16 pixels spilled 192 bytes on 4 warps on 3.6 and 8 bytes on 8 warps on 3.8).
    if not need_grad:
        return dict(TILE_H=4, TILE_W=4, BLOCK_P=8, BLOCK_N=block_n, DOT_PRECISION="tf32x3",
                    num_warps=8 if block_n >= 128 else 4, num_stages=1)
    return dict(TILE_H=4, TILE_W=4, BLOCK_P=16, BLOCK_N=block_n, DOT_PRECISION="tf32x3",
                num_warps=8 if block_n >= 64 else 4, num_stages=1)


# ---------------------------------------------------------------------------------------------
# Bilinear source tables of the tiled design

def _axis_tables(in_size: int, out_size: int, align_corners: bool, tile: int, device) -> tuple:
    """Per output row (or column): the two input neighbours (2, out) int32 and the weight of the second
    (out,) float32, as bilinear.source_index computes them; and per tile of ``tile`` input cells the
    window [lo, hi) of outputs whose lower neighbour lies in [tile start - 1, tile end - 1] (the
    outputs that touch the tile), from the same tables so kernel and window can never disagree."""
    scale = source_scale(in_size, out_size, align_corners)
    d = torch.arange(out_size, dtype=torch.float32, device=device)
    src = d * scale if align_corners else ((d + 0.5) * scale - 0.5).clamp_(min=0.0)
    i0 = src.to(torch.int32).clamp_(max=in_size - 1)  # src >= 0: truncation is floor
    i1 = (i0 + 1).clamp_(max=in_size - 1)
    l1 = (src - i0).clamp_(0.0, 1.0)
    first = torch.arange(0, in_size, tile, dtype=torch.int32, device=device)
    lo = torch.searchsorted(i0, first - 1)
    hi = torch.searchsorted(i0, first + (tile - 1), side="right")
    return torch.stack([i0, i1]), l1, torch.stack([lo, hi], dim=1).to(torch.int32)


_tables_cache: dict = {}
_TABLES_KEPT = 64  # (size, device) pairs: a training run uses a handful; varying image sizes cycle


def _tables(in_size: int, out_size: int, align_corners: bool, tile: int, device: torch.device) -> tuple:
    """_axis_tables, kept per device for the most recent sizes: they depend only on the sizes, and
    rebuilding them is a handful of tiny launches per call. Not cached while a CUDA graph is captured
    (its memory is the graph's)."""
    key = (in_size, out_size, bool(align_corners), tile, device)
    hit = _tables_cache.pop(key, None)
    if hit is None:
        hit = _axis_tables(in_size, out_size, align_corners, tile, device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return hit
    _tables_cache[key] = hit  # (re)inserted last: the dict's order is the recency order
    while len(_tables_cache) > _TABLES_KEPT:
        del _tables_cache[next(iter(_tables_cache))]
    return hit


# ---------------------------------------------------------------------------------------------
# Variants and the launcher senformer.ops calls

# Class rows of the maps handed to upsampled_ce are best padded to a multiple of this (z[..., :N] of a
# wider buffer): the tiled kernel's gathers then vectorise. Any row stride >= N is accepted.
ROW_ALIGN = 16

# combine_grads reads a channels-last d_learn (the full-resolution step's grid, transposed on chip)
COMBINE_TRANSPOSES = True

# The steps of the low-resolution chain (the torch-lowres design does their work in plain torch).
LOWRES_STEPS = ("log_sum_scores", "log_sum_grad", "learner_map", "learner_grads", "combine_grads")

# The designs: module docstring.
_DESIGNS = Designs("ensemble_ce", ("tiled", "scatter", "torch-lowres", "aten-adjoint"))
VARIANTS, use_variant, current_variant = _DESIGNS.names, _DESIGNS.use, _DESIGNS.current


def unused_steps() -> tuple[str, ...]:
    """Steps the design in use leaves to the op's plain-torch path (``_kernels.steps`` hides them)."""
    return {"torch-lowres": LOWRES_STEPS, "aten-adjoint": ("learner_grads",)}.get(current_variant(), ())


@on_input_device
def upsampled_ce(z: torch.Tensor, target: torch.Tensor, ignore_index: int, align_corners: bool,
                 need_grad: bool, deterministic: bool = False):
    """Step ``upsampled_ce`` of ensemble_cross_entropy over stacked channels-last maps ``z``
    (K, B, h, w, N) float32 (class dimension contiguous; rows may be padded: z[..., :N] of a wider
    buffer) and an integer target (B, H, W) of any strides.

    Returns ``(nll_sums (K,), valid_count (), bad (2,) = [number of bad labels, one bad value],
    grad_sums)`` where grad_sums (z's shape, or None) is d(nll_sums[k])/dz[k] for every k;
    bad labels count as ignored.
    ``deterministic``: the tiled design always is; the scatter design then gathers the gradient per
    low-resolution cell in a fixed order (a second kernel, several times the work) instead of
    scattering it with fp32 atomics. Every result stays on the device: nothing here synchronises
    with the host."""
    K, B, h, w, N = z.shape
    if z.stride(-1) != 1 or any(z.stride(i) != z.stride(i + 1) * z.shape[i + 1] for i in range(3)) \
            or z.stride(-2) < N:
        z = z.contiguous()  # the kernels index rows `row_stride` apart inside densely stacked maps
    if h * w * z.stride(-2) >= 2 ** 31:
        raise ValueError(f"ensemble_cross_entropy: one low-resolution map (h, w, N) = ({h}, {w}, {N}) has "
                         f"2**31 or more elements; the kernel indexes inside a map with int32")
    if current_variant() == "scatter":
        return _scatter(z.contiguous(), target, ignore_index, align_corners, need_grad, deterministic)
    return _tiled(z, target, ignore_index, align_corners, need_grad)


def _tiled(z, target, ignore_index, align_corners, need_grad):
    K, B, h, w, N = z.shape
    H, W = target.shape[-2:]
    cfg = _tiled_config(N, interpret=z.device.type != "cuda", need_grad=need_grad)
    th, tw = cfg["TILE_H"], cfg["TILE_W"]
    yi, yl, ywin = _tables(h, H, align_corners, th, z.device)
    xi, xl, xwin = _tables(w, W, align_corners, tw, z.device)
    n_tx = triton.cdiv(w, tw)
    n_tiles = triton.cdiv(h, th) * n_tx
    part = alloc((B * n_tiles, K + 1), torch.float32, z.device)
    bad = alloc((B * n_tiles, 2), torch.int64, z.device)
    # z's (padded) layout; every cell's N classes are stored by exactly one program, padding never.
    gz = alloc((K, B, h, w, z.stride(-2)), z.dtype, z.device)[..., :N] if need_grad else z
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    _ensemble_ce_tiled_kernel[(n_tiles, B)](
        z, gz, target, target.stride(0), target.stride(1), target.stride(2),
        yi, yl, ywin, xi, xl, xwin, part, bad,
        K, B, N, H, W, h, w, z.stride(1), z.stride(-2), n_tx, int(ignore_index),
        NEED_GRAD=bool(need_grad), num_warps=num_warps, num_stages=num_stages, **cfg,
    )
    bad_summary = torch.stack([bad[:, 0].sum(), bad[:, 1].max()])
    return part[:, :K].sum(dim=0), part[:, K].sum(), bad_summary, (gz if need_grad else None)


def _scatter(z, target, ignore_index, align_corners, need_grad, deterministic):
    K, B, h, w, N = z.shape
    H, W = target.shape[-2:]
    interpret = z.device.type != "cuda"
    block_n, block_p, num_warps = _launch_config(N, H * W, interpret)
    n_blocks = triton.cdiv(H * W, block_p)
    part = alloc((B * n_blocks, K + 1), torch.float32, z.device)
    bad = alloc((B * n_blocks, 2), torch.int64, z.device)
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
        gz = alloc(z.shape, z.dtype, z.device)
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


# ---------------------------------------------------------------------------------------------
# The learners' low-resolution step

@triton.jit
def _learner_map_kernel(
    x_ptr, s_b, s_c, s_h, s_w, h, w, scale_h, scale_w,   # learner X (B, N, h, w), any strides
    u_ptr, ld,                          # U (B, h1, w1, ld) float32: rows ld apart, lanes [N, ld) written 0
    ds_ptr, ds_b, ds_p,                 # dS (B, h1 * w1, N): image and pixel strides, classes contiguous
    d_ptr, d_b, d_p, d_c,               # dU (B, h1 * w1, N) float32: image, pixel and class strides
    h1, w1, N,
    RESIZE: tl.constexpr, NEED_GRAD: tl.constexpr, ALIGN_CORNERS: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """BLOCK_P pixels of image b of the finest grid: U = resize(X) stored channels-last for the
    full-resolution step and, with NEED_GRAD, P = softmax(U) over the classes and dU = P * (dS - <P,
    dS>) (softmax's backward), stored in the layout its consumer wants (the launcher's strides)."""
    b = tl.program_id(2)
    y, xs, pmask, pix = grid_pixels(b, h1, w1, ROWS, BLOCK_P)
    cls = tl.arange(0, BLOCK_N)
    cmask = cls < N
    m2 = pmask[:, None] & cmask[None, :]
    u = resized_scores(x_ptr, s_b, s_c, s_h, s_w, h, w, scale_h, scale_w, b, y, xs, cls, m2, RESIZE,
                       ALIGN_CORNERS, ROWS)
    # masked lanes loaded as 0: the pad lanes [N, ld) are stored 0
    tl.store(u_ptr + pix[:, None] * ld + cls[None, :], u, mask=pmask[:, None] & (cls < ld)[None, :])
    if NEED_GRAD:
        z = tl.where(cmask[None, :], u, float("-inf"))
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
        local = pix - b.to(tl.int64) * h1 * w1
        ds = tl.load(ds_ptr + b.to(tl.int64) * ds_b + (local * ds_p)[:, None] + cls[None, :], mask=m2, other=0.0)
        d = p * (ds - tl.sum(p * ds, axis=1)[:, None])
        tl.store(d_ptr + b.to(tl.int64) * d_b + (local * d_p)[:, None] + (cls.to(tl.int64) * d_c)[None, :], d,
                 mask=m2)


_learner_config = grid_config  # a module-level _*config: tests/sm90_compile.py swaps in the GPU's


@on_input_device
def learner_map(x: torch.Tensor, size, align_corners: bool, row_align: int = 1, d_sum: torch.Tensor | None = None):
    """Step ``learner_map`` of ensemble_cross_entropy for one learner x (B, N, h, w), any float dtype
    and strides: ``(U, dU)`` with U = resize(x -> size) channels-last (B, h1, w1, N) float32 (rows
    padded to row_align as ``merge_scores``' are) and, when ``d_sum`` (B, h1, w1, N) float32 (classes
    contiguous) is given, dU = softmax'(U)^T d_sum -- the gradient that reaches U through softmax(U)
    -- (B, h1, w1, N) float32 in the layout its consumer wants: class-major memory (a permuted view)
    when x is (h1, w1) already (it is x's own gradient), else channels-last (for the resize's adjoint,
    as the compiled step's; csrc/ops.h); else dU is None."""
    B, N, h, w = x.shape
    h1, w1 = (int(s) for s in size)
    ld = padded_rows(N, row_align)
    block_n, block_p, num_warps, rows = _learner_config(ld, h1, w1, x.device.type != "cuda")
    u = alloc((B, h1, w1, ld), torch.float32, x.device)
    need_grad = d_sum is not None
    if need_grad:
        if tuple(d_sum.shape) != (B, h1, w1, N) or d_sum.stride(-1) != 1 or d_sum.stride(1) != w1 * d_sum.stride(2):
            raise ValueError(f"learner_map: d_sum must be ({B}, {h1}, {w1}, {N}) with contiguous classes and "
                             f"rows, got {tuple(d_sum.shape)} strides {d_sum.stride()}")
        same = (h, w) == (h1, w1)
        d = alloc((B, N, h1, w1), torch.float32, x.device).permute(0, 2, 3, 1) if same else \
            alloc((B, h1, w1, N), torch.float32, x.device)
    else:
        d_sum, d = u, u  # never read or written
    grid = pixel_grid(B, h1, w1, block_p, rows)
    _learner_map_kernel[grid](
        x, *x.stride(), h, w, source_scale(h, h1, align_corners), source_scale(w, w1, align_corners),
        u, ld, d_sum, d_sum.stride(0), d_sum.stride(2), d, d.stride(0), d.stride(2), d.stride(3), h1, w1, N,
        RESIZE=(h, w) != (h1, w1), NEED_GRAD=need_grad, ALIGN_CORNERS=bool(align_corners), ROWS=rows,
        BLOCK_P=block_p, BLOCK_N=block_n, num_warps=num_warps,
    )
    return (u if ld == N else u[..., :N]), (d if need_grad else None)


@triton.jit
def _learner_grads_kernel(
    x_ptr, s_b, s_c, s_h, s_w,          # learner X (B, N, h, w), any strides
    ds_ptr, ds_ld, g_ptr, g_ld,         # dS, G (B, h1, w1, *) float32, class rows ld apart
    de_ptr, dl_ptr,                     # dX_ens, dX_learn (B, N, h, w) float32 contiguous: stored once
    yi_ptr, yl_ptr, ywin_ptr,           # the resize's tables (h -> h1), as the tiled loss kernel's
    xi_ptr, xl_ptr, xwin_ptr,           #   (w -> w1)
    N, h, w, h1, w1, n_tx,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program owns a TILE_H x TILE_W tile of the learner's cells of one image and walks the
    finest-grid pixels whose bilinear footprint touches it, BLOCK_P at a time: U = resize(X) there
    (recomputed from X, a small map, rather than read back at the finest size), P = softmax(U), dU =
    P * (dS - <P, dS>), and both dU and G reduced onto the tile's cells with the bilinear weights as
    (cells x pixels) @ (pixels x classes) products -- the resize's adjoint, no atomics, each cell
    stored once, class-major (x's own layout). Halo pixels are recomputed by both tiles."""
    b = tl.program_id(1)
    y_lo, x_lo, win_w, n_pix, cell_y, cell_x = _tile_window(ywin_ptr, xwin_ptr, n_tx, TILE_H, TILE_W)
    cls = tl.arange(0, BLOCK_N)
    cmask = cls < N
    x_base = x_ptr + b.to(tl.int64) * s_b + (cls.to(tl.int64) * s_c)[None, :]
    acc_e = tl.zeros((TILE_H * TILE_W, BLOCK_N), dtype=tl.float32)
    acc_l = tl.zeros((TILE_H * TILE_W, BLOCK_N), dtype=tl.float32)
    for p0 in range(0, n_pix, BLOCK_P):
        in_win, y, x, y0, y1, ly1, x0, x1, lx1 = _window_taps(p0, n_pix, win_w, y_lo, x_lo, yi_ptr, yl_ptr, xi_ptr,
                                                              xl_ptr, h1, w1, BLOCK_P)
        m2 = in_win[:, None] & cmask[None, :]
        u = blend_taps(x_base, (y0.to(tl.int64) * s_h)[:, None], (y1.to(tl.int64) * s_h)[:, None],
                       (x0.to(tl.int64) * s_w)[:, None], (x1.to(tl.int64) * s_w)[:, None], ly1[:, None],
                       lx1[:, None], m2)
        z = tl.where(cmask[None, :], u, float("-inf"))
        e = tl.exp(z - tl.max(z, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
        pix = (b.to(tl.int64) * h1 + y) * w1 + x
        ds = tl.load(ds_ptr + (pix * ds_ld)[:, None] + cls[None, :], mask=m2, other=0.0)
        d = p * (ds - tl.sum(p * ds, axis=1)[:, None])  # 0 on masked pixels (dS 0) and classes (P 0)
        g = tl.load(g_ptr + (pix * g_ld)[:, None] + cls[None, :], mask=m2, other=0.0)
        wt = _tile_weights(cell_y, cell_x, y0, y1, ly1, x0, x1, lx1)
        acc_e = tl.dot(wt, d, acc_e, input_precision=DOT_PRECISION)
        acc_l = tl.dot(wt, g, acc_l, input_precision=DOT_PRECISION)
    dst = b.to(tl.int64) * N * h * w + (cls.to(tl.int64) * h * w)[None, :] + (cell_y * w + cell_x)[:, None]
    keep = ((cell_y < h) & (cell_x < w))[:, None] & cmask[None, :]
    tl.store(de_ptr + dst, acc_e, mask=keep)
    tl.store(dl_ptr + dst, acc_l, mask=keep)


def _learner_grads_config(n_classes: int, interpret: bool) -> dict:
    """The tiled loss kernel's tile, pixel block and class block (with a gradient): the same
    (cells x pixels) @ (pixels x classes) reduction, here twice per step."""
    return _tiled_config(n_classes, interpret, need_grad=True)


@on_input_device
def learner_grads(x: torch.Tensor, d_sum: torch.Tensor, g: torch.Tensor, align_corners: bool):
    """Step ``learner_grads`` of ensemble_cross_entropy for a learner x (B, N, h, w) (any float dtype
    and strides) resized onto the finest grid (h1, w1): ``(dX_ens, dX_learn)``, each (B, N, h, w)
    float32 contiguous -- the resize's adjoint applied to dU = softmax'(U)^T d_sum (U = resize(x), as
    ``learner_map`` computes it, whose ``d_sum`` call this replaces for a resized learner) and to g,
    the full-resolution step's gradient of U. d_sum and g: (B, h1, w1, N) float32 grids with
    contiguous classes and evenly spaced pixel rows (padded rows welcome). Deterministic: each cell is
    reduced by one program in a fixed order."""
    B, N, h, w = x.shape
    if d_sum.dim() != 4 or tuple(d_sum.shape[::3]) != (B, N) or g.shape != d_sum.shape \
            or d_sum.dtype != torch.float32 or g.dtype != torch.float32:
        raise ValueError(f"learner_grads: d_sum {tuple(d_sum.shape)} {d_sum.dtype} and g {tuple(g.shape)} {g.dtype} "
                         f"must be one float32 ({B}, h1, w1, {N}) shape for x {tuple(x.shape)}")
    _, h1, w1, _ = d_sum.shape
    ds_ld, g_ld = _rows(d_sum, "d_sum", "learner_grads"), _rows(g, "g", "learner_grads")
    cfg = _learner_grads_config(N, x.device.type != "cuda")
    th, tw = cfg["TILE_H"], cfg["TILE_W"]
    yi, yl, ywin = _tables(h, h1, align_corners, th, x.device)
    xi, xl, xwin = _tables(w, w1, align_corners, tw, x.device)
    n_tx = triton.cdiv(w, tw)
    d_ens = alloc((B, N, h, w), torch.float32, x.device)
    d_learn = alloc((B, N, h, w), torch.float32, x.device)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    _learner_grads_kernel[(triton.cdiv(h, th) * n_tx, B)](
        x, *x.stride(), d_sum, ds_ld, g, g_ld, d_ens, d_learn, yi, yl, ywin, xi, xl, xwin, N, h, w, h1, w1, n_tx,
        num_warps=num_warps, num_stages=num_stages, **cfg,
    )
    return d_ens, d_learn


# ---------------------------------------------------------------------------------------------
# The ensemble map's steps: E = log(clamp(S, eps)) forward, dS from dE backward

@on_input_device
def log_sum_scores(logits, align_corners: bool, row_align: int = 1, eps: float = 1e-15):
    """Step ``log_sum_scores`` of ensemble_cross_entropy: ``(E, active)`` with E = log(clamp(S, eps)),
    S = sum_i softmax(U_i) over the learners (B, N, h_i, w_i), finest first, merged on the finest grid
    in one pass (``merge_scores``' kernel and layout: (B, h1, w1, N) float32 channels-last, rows padded
    to row_align), and active = S >= eps (B, h1, w1, N) bool, where clamp passes its gradient (as
    torch's clamp: a NaN S stays NaN in E and is not active)."""
    return launch_merge(list(logits), LOG_SUM, align_corners, row_align, eps)


@triton.jit
def _log_sum_grad_kernel(
    g_ptr, g_ld, e_ptr, e_ld, a_ptr, out_ptr, out_ld,   # (B, h1, w1, *) rows ld apart; a: rows N apart
    h1, w1, N,
    ROWS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dS = dE * exp(-E) where S >= eps, else 0: the backward of E = log(clamp(S, eps)) (dE/dS =
    1 / clamp(S, eps) = exp(-E)), for BLOCK_P pixels of image b."""
    b = tl.program_id(2)
    _, _, pmask, pix = grid_pixels(b, h1, w1, ROWS, BLOCK_P)
    cls = tl.arange(0, BLOCK_N)
    m2 = pmask[:, None] & (cls < N)[None, :]
    g = tl.load(g_ptr + pix[:, None] * g_ld + cls[None, :], mask=m2, other=0.0)
    e = tl.load(e_ptr + pix[:, None] * e_ld + cls[None, :], mask=m2, other=0.0)
    active = tl.load(a_ptr + pix[:, None] * N + cls[None, :], mask=m2, other=0)
    tl.store(out_ptr + pix[:, None] * out_ld + cls[None, :], tl.where(active != 0, g * tl.exp(-e), 0.0), mask=m2)


_log_sum_grad_config = grid_config


def _rows(t: torch.Tensor, name: str, step: str = "log_sum_grad") -> int:
    """The row stride of a (B, h, w, N) grid with contiguous classes and evenly spaced pixel rows."""
    B, h, w, N = t.shape
    ld = t.stride(2)
    if t.stride(3) != 1 or ld < N or t.stride(1) != w * ld or t.stride(0) != h * w * ld:
        raise ValueError(f"{step}: {name} must be a (B, h, w, N) grid with contiguous classes and evenly "
                         f"spaced pixel rows, got strides {t.stride()}")
    return ld


@on_input_device
def log_sum_grad(d_e: torch.Tensor, e: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Step ``log_sum_grad``: the gradient dS reaching S from d_e (the gradient of E), E and active as
    ``log_sum_scores`` returned them, all (B, h1, w1, N): dS = d_e * exp(-E) where active, else 0;
    float32, rows laid out as d_e's (classes contiguous, so ``learner_map`` reads it as d_sum)."""
    B, h1, w1, N = d_e.shape
    if e.shape != d_e.shape or active.shape != d_e.shape or active.dtype != torch.bool:
        raise ValueError(f"log_sum_grad: d_e {tuple(d_e.shape)}, e {tuple(e.shape)} and active {tuple(active.shape)} "
                         f"{active.dtype} must be one (B, h1, w1, N) shape, active bool")
    g_ld, e_ld = _rows(d_e, "d_e"), _rows(e, "e")
    if not active.is_contiguous():
        raise ValueError("log_sum_grad: active must be contiguous")
    out = alloc((B, h1, w1, g_ld), torch.float32, d_e.device)
    block_n, block_p, num_warps, rows = _log_sum_grad_config(g_ld, h1, w1, d_e.device.type != "cuda")
    grid = pixel_grid(B, h1, w1, block_p, rows)
    _log_sum_grad_kernel[grid](d_e, g_ld, e, e_ld, active.view(torch.uint8), out, g_ld, h1, w1, N,
                               ROWS=rows, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=num_warps)
    return out[..., :N]


# ---------------------------------------------------------------------------------------------
# The backward: the saved gradients scaled by the incoming ones

@triton.jit
def _combine_grads_kernel(de_ptr, dl_ptr, dl_b, dl_c, dl_p, se_ptr, sl_ptr, out_ptr, N, P,
                          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """A (classes x pixels) tile of image b: d_ens and out are (B, N, P) contiguous, d_learn at its own
    strides -- class-major, or channels-last (its classes contiguous: the compiler then loads it along
    the classes and transposes on chip, so both reads and the write stay coalesced)."""
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    m = (c < N)[:, None] & (p < P)[None, :]
    own = b * N * P + (c.to(tl.int64) * P)[:, None] + p[None, :]
    learn = b * dl_b + (c.to(tl.int64) * dl_c)[:, None] + (p.to(tl.int64) * dl_p)[None, :]
    v = tl.load(de_ptr + own, mask=m, other=0.0) * tl.load(se_ptr) \
        + tl.load(dl_ptr + learn, mask=m, other=0.0) * tl.load(sl_ptr)
    tl.store(out_ptr + own, v.to(out_ptr.dtype.element_ty), mask=m)


def _combine_config(n_classes: int, n_pixels: int, interpret: bool):
    """(BLOCK_C, BLOCK_P, num_warps): memory-bound, 8 elements a thread on the GPU in 32 x 64 tiles
    (a transposed tile is staged through 8 KB of shared memory; untimed); in the interpreter few
    large programs."""
    if interpret:
        block_c = triton.next_power_of_2(max(n_classes, 1))
        return block_c, max(1, min(triton.next_power_of_2(max(n_pixels, 1)), (1 << 16) // block_c)), 4
    return 32, 64, 8


def _pixels_flat(t: torch.Tensor) -> bool:
    """Whether a (B, N, h, w) tensor's pixels are evenly spaced (h and w flatten into one stride)."""
    return t.size(2) <= 1 or t.stride(2) == t.size(3) * t.stride(3) or t.size(3) <= 1


@on_input_device
def combine_grads(d_ens: torch.Tensor, d_learn: torch.Tensor, scale_e: torch.Tensor, scale_l: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """Step ``combine_grads`` of the loss's backward: d_ens * scale_e + d_learn * scale_l, cast to
    ``dtype``, in one pass, (B, N, h, w) contiguous. d_ens: contiguous (B, N, h, w); d_learn: of its
    shape and float dtype, contiguous or a channels-last view (e.g. ``grid[..., :N].permute(0, 3, 1,
    2)`` of the full-resolution step's padded grid: transposed here, not copied beforehand); scale_e,
    scale_l: one-element tensors on their device (no host sync)."""
    if d_ens.dim() != 4 or d_ens.shape != d_learn.shape or d_ens.dtype != d_learn.dtype \
            or not d_ens.is_contiguous() or not _pixels_flat(d_learn):
        raise ValueError(f"combine_grads: d_ens {tuple(d_ens.shape)} {d_ens.dtype} and d_learn "
                         f"{tuple(d_learn.shape)} {d_learn.dtype} strides {d_learn.stride()} must be of one "
                         f"(B, N, h, w) shape and dtype, d_ens contiguous, d_learn contiguous or channels-last")
    if scale_e.numel() != 1 or scale_l.numel() != 1:
        raise ValueError("combine_grads: scale_e and scale_l must hold one element each")
    B, N, h, w = d_ens.shape
    out = alloc(d_ens.shape, dtype, d_ens.device)
    if out.numel() == 0:
        return out
    block_c, block_p, num_warps = _combine_config(N, h * w, d_ens.device.type != "cuda")
    dl_p = d_learn.stride(3) if w > 1 else d_learn.stride(2)
    grid = (triton.cdiv(h * w, block_p), triton.cdiv(N, block_c), B)
    _combine_grads_kernel[grid](
        d_ens, d_learn, d_learn.stride(0), d_learn.stride(1), dl_p, scale_e.to(d_ens.dtype), scale_l.to(d_ens.dtype),
        out, N, h * w, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps)
    return out
