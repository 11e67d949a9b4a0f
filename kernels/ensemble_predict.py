"""The two steps of ensemble_predict (DESIGN.md, op 4); ensemble_cross_entropy's chain uses the first.

``merge_scores``: the learners merged on the finest learner grid (h1, w1) in one pass -- per pixel row
segment, every learner's class scores are read (the coarser ones bilinearly sampled from their own
small maps), softmaxed and combined in registers, and the merged scores written once, channels-last
(B, h1, w1, N) float32. No resized learner map and no softmax grid exists.

``upsampled_argmax``: the merged scores bilinearly sampled at every output pixel for all classes and
only the int64 label written, so no (B, N, H, W) tensor exists.

Two designs, picked with ``use_variant`` (``VARIANTS[0]`` is the default): ``"fused-merge"`` (the
above) and ``"torch-merge"`` (the merge in plain torch: a resized map, a softmax and a sum pass per
learner: at the paper's shapes, B=8, N=150, bf16 maps 128..16, predict moves 2.3 GB, the default
0.23 GB, the eager reference 4.7 GB; ``benchmarks/lowres_traffic.py``). The torch merge stays reachable
(benchmark rows ``triton[torch-merge]``) until a GPU run has measured both; then the loser goes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Designs, alloc, on_input_device, padded_rows
from .bilinear import grid_config, grid_pixels, pixel_grid, resized_scores, source_index, source_scale

MERGES = ("mean", "product", "vote")
# Merge index 3 is ensemble_cross_entropy's: E = log(clamp(sum_i softmax(U_i), eps)) and the clamp's
# pass mask (S >= eps), see kernels/ensemble_ce.py's log_sum_scores.
LOG_SUM = len(MERGES)
MAX_LEARNERS = 4  # learners one merge launch reads (SenFormer has 4); more are merged in chunks


@triton.jit
def _merge_add(acc, u, cls, cmask, MERGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc plus one learner's share: its softmax (mean), its log-softmax (product), or its softmax
    kept at the top class only (vote; first maximum, a NaN beating everything, as torch.argmax)."""
    u = tl.where(cmask[None, :], u, float("-inf"))
    m = tl.max(u, axis=1)
    e = tl.exp(u - m[:, None])
    s = tl.sum(e, axis=1)
    if MERGE == 1:
        share = u - m[:, None] - tl.log(s)[:, None]
    else:
        share = e / s[:, None]
        if MERGE == 2:
            top = tl.max(share, axis=1)
            first = tl.min(tl.where(share == top[:, None], cls[None, :], BLOCK_N), axis=1)
            first_nan = tl.min(tl.where(share != share, cls[None, :], BLOCK_N), axis=1)
            first = tl.where(first_nan < BLOCK_N, first_nan, first)
            # p * one_hot(argmax), as the reference: a NaN row stays NaN in every class
            share = share * (cls[None, :] == first[:, None]).to(tl.float32)
    return acc + tl.where(cmask[None, :], share, 0.0)


@triton.jit
def _merge_kernel(
    out_ptr, ld, h1, w1, inv_m,         # (B, h1, w1, ld) float32: rows ld apart, lanes [N, ld) written 0
    act_ptr, eps,                       # log_sum only: (B, h1, w1, N) mask S >= eps (bool as uint8); clamp
    a_ptr, a_sb, a_sc, a_sh, a_sw, a_h, a_w, a_fh, a_fw,   # learner slots: pointer, (B, N, h, w)
    b_ptr, b_sb, b_sc, b_sh, b_sw, b_h, b_w, b_fh, b_fw,   #   strides in elements, size, and the
    c_ptr, c_sb, c_sc, c_sh, c_sw, c_h, c_w, c_fh, c_fw,   #   source scales of the resize to
    d_ptr, d_sb, d_sc, d_sh, d_sw, d_h, d_w, d_fh, d_fw,   #   (h1, w1); slots >= SLOTS unused
    N,
    SLOTS: tl.constexpr, RESIZE_A: tl.constexpr, RESIZE_B: tl.constexpr, RESIZE_C: tl.constexpr,
    RESIZE_D: tl.constexpr, MERGE: tl.constexpr, ACCUMULATE: tl.constexpr, FINAL: tl.constexpr,
    ALIGN_CORNERS: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """BLOCK_P pixels of image b of the finest grid, all classes, every learner of the launch: with
    ROWS (the GPU's), columns of row y = program_id(1), so the finest learner's loads are provably
    contiguous along pixels; else consecutive pixels of the flattened grid (the interpreter's: fewer,
    larger programs). ACCUMULATE: add to the partial total already in out (an earlier chunk of
    learners); FINAL: normalise (mean, vote: times inv_m = 1 / M; product: softmax; log_sum: the
    mask S >= eps stored and log(clamp(S, eps)) -- NaN kept, as torch's clamp); else store the raw
    total."""
    b = tl.program_id(2)
    y, xs, pmask, pix = grid_pixels(b, h1, w1, ROWS, BLOCK_P)
    cls = tl.arange(0, BLOCK_N)
    cmask = cls < N
    m2 = pmask[:, None] & cmask[None, :]
    out = out_ptr + pix[:, None] * ld + cls[None, :]
    if ACCUMULATE:
        acc = tl.load(out, mask=m2, other=0.0)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    u = resized_scores(a_ptr, a_sb, a_sc, a_sh, a_sw, a_h, a_w, a_fh, a_fw, b, y, xs, cls, m2, RESIZE_A,
                       ALIGN_CORNERS, ROWS)
    acc = _merge_add(acc, u, cls, cmask, MERGE, BLOCK_N)
    if SLOTS > 1:
        u = resized_scores(b_ptr, b_sb, b_sc, b_sh, b_sw, b_h, b_w, b_fh, b_fw, b, y, xs, cls, m2, RESIZE_B,
                           ALIGN_CORNERS, ROWS)
        acc = _merge_add(acc, u, cls, cmask, MERGE, BLOCK_N)
    if SLOTS > 2:
        u = resized_scores(c_ptr, c_sb, c_sc, c_sh, c_sw, c_h, c_w, c_fh, c_fw, b, y, xs, cls, m2, RESIZE_C,
                           ALIGN_CORNERS, ROWS)
        acc = _merge_add(acc, u, cls, cmask, MERGE, BLOCK_N)
    if SLOTS > 3:
        u = resized_scores(d_ptr, d_sb, d_sc, d_sh, d_sw, d_h, d_w, d_fh, d_fw, b, y, xs, cls, m2, RESIZE_D,
                           ALIGN_CORNERS, ROWS)
        acc = _merge_add(acc, u, cls, cmask, MERGE, BLOCK_N)
    if FINAL:
        if MERGE == 3:
            tl.store(act_ptr + pix[:, None] * N + cls[None, :], (acc >= eps).to(tl.uint8), mask=m2)
            acc = tl.log(tl.where(acc < eps, eps, acc))
        elif MERGE == 1:
            acc = tl.where(cmask[None, :], acc, float("-inf"))
            top = tl.max(acc, axis=1)
            e = tl.exp(acc - top[:, None])
            acc = e / tl.sum(e, axis=1)[:, None]
        else:
            acc = acc * inv_m
    # pad lanes [N, ld) get 0: a later kernel may read them (then drop them), never NaN arithmetic
    tl.store(out, tl.where(cmask[None, :], acc, 0.0), mask=pmask[:, None] & (cls < ld)[None, :])


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


_DESIGNS = Designs("ensemble_predict", ("fused-merge", "torch-merge"))
VARIANTS, use_variant, current_variant = _DESIGNS.names, _DESIGNS.use, _DESIGNS.current


def unused_steps() -> tuple[str, ...]:
    """Steps the design in use leaves to the op's plain-torch path (``_kernels.steps`` hides them)."""
    return ("merge_scores",) if current_variant() == "torch-merge" else ()


_merge_config = grid_config  # a module-level _*config: tests/sm90_compile.py swaps in the GPU's


@on_input_device
def merge_scores(logits, merge: str, align_corners: bool, row_align: int = 1) -> torch.Tensor:
    """Step ``merge_scores``: the learners (B, N, h_i, w_i), finest first, any float dtype and
    strides, merged on the finest grid as ``reference.merged_scores`` does (mean | product | vote),
    returned channels-last (B, h1, w1, N) float32. ``row_align`` > 1: each pixel's class row starts
    a multiple of row_align elements after the previous one (a [..., :N] view of a padded buffer
    whose pad lanes hold 0), so a kernel reading the rows can vectorise."""
    if merge not in MERGES:
        raise ValueError(f"merge_scores: merge must be one of {MERGES}, got {merge!r}")
    return launch_merge(list(logits), MERGES.index(merge), align_corners, row_align)[0]


def launch_merge(logits: list, merge: int, align_corners: bool, row_align: int, eps: float = 0.0):
    """The merge kernel over every learner (in chunks of MAX_LEARNERS): (merged scores, and for
    merge ``LOG_SUM`` the bool mask S >= eps, else None)."""
    x0 = logits[0]
    B, N, h1, w1 = x0.shape
    ld = padded_rows(N, row_align)
    block_n, block_p, num_warps, rows = _merge_config(ld, h1, w1, x0.device.type != "cuda")
    out = alloc((B, h1, w1, ld), torch.float32, x0.device)
    active = alloc((B, h1, w1, N), torch.bool, x0.device) if merge == LOG_SUM else out  # out: never written
    grid = pixel_grid(B, h1, w1, block_p, rows)
    for start in range(0, len(logits), MAX_LEARNERS):
        chunk = logits[start:start + MAX_LEARNERS]
        slots, resize = [], []
        for x in chunk + [x0] * (MAX_LEARNERS - len(chunk)):  # unused slots: any valid learner
            h, w = x.shape[-2:]
            slots += [x, *x.stride(), h, w, source_scale(h, h1, align_corners), source_scale(w, w1, align_corners)]
            resize.append((h, w) != (h1, w1))
        _merge_kernel[grid](
            out, ld, h1, w1, 1.0 / len(logits), active.view(torch.uint8), float(eps), *slots, N,
            SLOTS=len(chunk), RESIZE_A=resize[0], RESIZE_B=resize[1], RESIZE_C=resize[2], RESIZE_D=resize[3],
            MERGE=merge, ACCUMULATE=start > 0, FINAL=start + MAX_LEARNERS >= len(logits),
            ALIGN_CORNERS=bool(align_corners), ROWS=rows, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=num_warps,
        )
    return (out if ld == N else out[..., :N]), (active if merge == LOG_SUM else None)
