"""Triton kernels for class_cross_attention: N class queries (small) over L pixel keys (large).

Two designs, picked with ``use_variant`` (``VARIANTS[0]`` is the default): "tiled" (see the section
of that name below: several power-of-two query tiles per program instead of one padded tile, dK/dV
finished in registers for N <= 256) and "legacy", described next and kept, unchanged, for the
benchmark's ``triton[legacy]`` rows until a GPU run has measured both; then the loser goes.

Forward = split-KV flash attention: the key axis is cut into ``splits`` contiguous ranges, one
program per (batch*head, query block, split) keeps its queries resident, streams its keys once
with an online softmax, and leaves an unnormalised partial output plus its running max/sum; a
merge kernel combines the splits with a log-sum-exp rescale. Splitting the keys is what fills
the GPU when B*H is small (batch 1-2 at inference), since N alone gives only one tile.

Backward: one program per (batch*head, split) walks its key blocks with the queries resident,
producing dK/dV for each key block exactly once (no atomics) and a dQ partial per split, reduced
afterwards (deterministic) or added with fp32 atomics (``deterministic=False``).

When N*D is too large for one register tile (e.g. N=1024, D=128) the queries are cut into
blocks: the forward gives each block its own programs, the backward walks the blocks inside one
program and accumulates dK/dV for its key range in fp32 scratch (still exclusive, still no atomics).

Scores are kept in the log2 domain (scale * log2(e) folded into one multiplier, ``exp2`` in the
loop); the saved LSE is therefore log2-based and only meaningful to this file's backward.
"""
from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Module-level names: tests monkeypatch ``<module>._alloc``.
from ._launch import Designs
from ._launch import alloc as _alloc
from ._launch import cuda_sms as _cuda_sms
from ._launch import interpret as _interpret
from ._launch import on_input_device
from ._launch import pow2 as _pow2
from .indexing import rows64

LOG2E = 1.4426950408889634


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a handful of programs is enough to exercise the split path


def _pick_splits(L: int, block_l: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys_per_split): aim for ~3 waves of programs, but keep >= 2 key blocks per split on
    GPU so the Q load and the merge stay amortised. keys_per_split is a multiple of block_l."""
    n_blocks = triton.cdiv(L, block_l)
    want = triton.cdiv(3 * _num_sms(device), max(1, programs))
    min_blocks = 1 if _interpret() else 2
    splits = max(1, min(want, n_blocks // min_blocks if n_blocks >= min_blocks else 1))
    per = triton.cdiv(n_blocks, splits) * block_l
    return triton.cdiv(L, per), per


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's matmul policy: "highest" (torch's default, and the tests') keeps true fp32
    # products; "high"/"medium" allow tf32 tensor cores. 16-bit operands always use native MMA.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _dot_f32(dtype: torch.dtype) -> bool:
    return _interpret() and dtype == torch.bfloat16


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    if DOT_F32:  # the interpreter's tl.dot mishandles bfloat16 operands; fp32 on the rounded values is exact
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PREC)
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _fwd_split_kernel(
    Q, K, V, O, LSE, OP, MP, LP,
    sqb, sqh, sqn, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, son, sod,
    H, N, L, D, keys_per_split, n_nblocks, BH, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid0 = tl.program_id(0)
    split = tl.program_id(1)
    bh = pid0 // n_nblocks
    nb = pid0 % n_nblocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + rows64(offs_n)[:, None] * sqn + offs_d[None, :] * sqd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)

    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, L)

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_l in range(start, end, BLOCK_L):
        offs_l = start_l + tl.arange(0, BLOCK_L)
        mask_l = offs_l < end
        offs_l64 = offs_l.to(tl.int64)
        kt = tl.load(k_base + offs_l64[None, :] * skl + offs_d[:, None] * skd,
                     mask=mask_d[:, None] & mask_l[None, :], other=0.0)
        s = _dot(q, kt, DOT_PREC, DOT_F32) * qk_scale
        s = tl.where(mask_l[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_l64[:, None] * svl + offs_d[None, :] * svd,
                    mask=mask_l[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC, DOT_F32)
        m_i = m_new

    row = bh.to(tl.int64) * N + rows64(offs_n)
    if SINGLE:
        out = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + rows64(offs_n)[:, None] * son + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
        tl.store(LSE + row, m_i + tl.log2(l_i), mask=mask_n)
    else:
        part = (split * BH) * N + row  # row of the (split, bh, n) partial buffers
        tl.store(OP + part[:, None] * D + offs_d[None, :], acc, mask=mask_n[:, None] & mask_d[None, :])
        tl.store(MP + part, m_i, mask=mask_n)
        tl.store(LP + part, l_i, mask=mask_n)


@triton.jit
def _fwd_merge_kernel(
    O, LSE, OP, MP, LP, sob, soh, son, sod,
    H, N, D, n_splits, n_nblocks, BH,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid0 = tl.program_id(0)
    bh = pid0 // n_nblocks
    nb = pid0 % n_nblocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_d < D)[None, :]
    row = bh.to(tl.int64) * N + rows64(offs_n)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for s in range(0, n_splits):
        part = (s * BH) * N + row
        m_s = tl.load(MP + part, mask=mask_n, other=0.0)
        l_s = tl.load(LP + part, mask=mask_n, other=1.0)
        a_s = tl.load(OP + part[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, m_s)
        c_old = tl.exp2(m - m_new)
        c_new = tl.exp2(m_s - m_new)
        l = l * c_old + l_s * c_new
        acc = acc * c_old[:, None] + a_s * c_new[:, None]
        m = m_new
    out = acc / l[:, None]
    tl.store(O + b * sob + h * soh + rows64(offs_n)[:, None] * son + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + row, m + tl.log2(l), mask=mask_n)


@triton.jit
def _bwd_kernel(
    Q, K, V, O, DO, LSE, DQ, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    sob, soh, son, sod, sgb, sgh, sgn, sgd,
    sdqs, sdqb, sdqh, sdqn, sdqd, sdkb, sdkh, sdkl, sdkd, sdvb, sdvh, sdvl, sdvd,
    H, N, L, D, keys_per_split, scale, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ACCUM_KV: tl.constexpr, DQ_ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, L)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dk_base = DK + b * sdkb + h * sdkh
    dv_base = DV + b * sdvb + h * sdvh
    dq_base = DQ + split.to(tl.int64) * sdqs + b * sdqb + h * sdqh

    # Query blocks outermost: with one block (the common N <= BLOCK_N case) every key block's dK/dV
    # is finished in registers and stored once; with more, this program alone owns its key range, so
    # it accumulates dK/dV in fp32 scratch across query blocks without atomics.
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_nd = mask_n[:, None] & mask_d[None, :]
        offs_n64 = rows64(offs_n)
        q = tl.load(Q + b * sqb + h * sqh + offs_n64[:, None] * sqn + offs_d[None, :] * sqd, mask=mask_nd, other=0.0)
        do = tl.load(DO + b * sgb + h * sgh + offs_n64[:, None] * sgn + offs_d[None, :] * sgd, mask=mask_nd, other=0.0)
        o = tl.load(O + b * sob + h * soh + offs_n64[:, None] * son + offs_d[None, :] * sod, mask=mask_nd, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse = tl.load(LSE + bh.to(tl.int64) * N + rows64(offs_n), mask=mask_n, other=0.0)
        dq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_l in range(start, end, BLOCK_L):
            offs_l = start_l + tl.arange(0, BLOCK_L)
            mask_l = offs_l < end
            offs_l64 = offs_l.to(tl.int64)
            mask_ld = mask_l[:, None] & mask_d[None, :]
            k = tl.load(k_base + offs_l64[:, None] * skl + offs_d[None, :] * skd, mask=mask_ld, other=0.0)
            v = tl.load(v_base + offs_l64[:, None] * svl + offs_d[None, :] * svd, mask=mask_ld, other=0.0)
            s = _dot(q, tl.trans(k), DOT_PREC, DOT_F32) * qk_scale
            p = tl.exp2(s - lse[:, None])
            p = tl.where(mask_n[:, None] & mask_l[None, :], p, 0.0)
            dv = _dot(tl.trans(p.to(do.dtype)), do, DOT_PREC, DOT_F32)
            dp = _dot(do, tl.trans(v), DOT_PREC, DOT_F32)
            ds = p * (dp - delta[:, None])
            dk = _dot(tl.trans(ds.to(q.dtype)), q, DOT_PREC, DOT_F32) * scale
            dq += _dot(ds.to(k.dtype), k, DOT_PREC, DOT_F32)
            dk_ptr = dk_base + offs_l64[:, None] * sdkl + offs_d[None, :] * sdkd
            dv_ptr = dv_base + offs_l64[:, None] * sdvl + offs_d[None, :] * sdvd
            if ACCUM_KV:
                dk += tl.load(dk_ptr, mask=mask_ld, other=0.0)
                dv += tl.load(dv_ptr, mask=mask_ld, other=0.0)
            tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=mask_ld)
            tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=mask_ld)
        dq = dq * scale
        dq_ptr = dq_base + offs_n64[:, None] * sdqn + offs_d[None, :] * sdqd
        if DQ_ATOMIC:
            tl.atomic_add(dq_ptr, dq, mask=mask_nd, sem="relaxed")  # only the final sum is read
        else:
            tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=mask_nd)
        if ACCUM_KV:
            # the next query block re-reads this block's dK/dV scratch, possibly from other threads
            tl.debug_barrier()


# Block shapes for H100 (sm_90), checked by compiling for sm_90 and reading the register/spill
# report: none of these spill. Exact-fp32 ("ieee") dots run on FMA units and need far more
# registers per tile, hence the halved query tiles on that path.
def _fwd_config(N: int, D: int, prec: str):
    """(BLOCK_N, BLOCK_L, BLOCK_D, num_warps, num_stages) of the forward split kernel."""
    block_d = _pow2(D)
    if _interpret():  # few, fat programs: the interpreter's cost is per program and per block
        return min(_pow2(N), 64), 16, block_d, 4, 1
    if prec == "ieee":
        block_n = min(_pow2(N), max(16, 4096 // block_d))
        return block_n, 32, block_d, 8 if block_n * block_d >= 2048 else 4, 2
    block_n = min(_pow2(N), max(16, 16384 // block_d))
    tile = block_n * block_d
    block_l = 128 if tile <= 2048 else 64 if tile <= 8192 else 32
    num_warps = 4 if tile <= 4096 else 8
    return block_n, block_l, block_d, num_warps, 3


def _bwd_config(N: int, D: int, prec: str):
    """(BLOCK_N, BLOCK_L, BLOCK_D, num_warps, num_stages) of the backward kernel; the queries, dO and
    the dQ accumulator stay resident, so the key block shrinks as the query tile grows."""
    block_d = _pow2(D)
    if _interpret():
        return min(_pow2(N), 64), 16, block_d, 4, 1
    if prec == "ieee":
        block_n = min(_pow2(N), max(16, 2048 // block_d))
        return block_n, 32 if block_d <= 64 else 16, block_d, 8, 2
    block_n = min(_pow2(N), max(16, 8192 // block_d))
    tile = block_n * block_d
    block_l = 64 if tile <= 2048 else 32 if tile < 8192 else 16
    return block_n, block_l, block_d, 4 if tile <= 1024 else 8, 2


def _legacy_forward(q, k, v, scale: float, *, splits: int | None = None, block_n: int | None = None,
                    block_l: int | None = None):
    """Returns (out (B,H,N,D) in q.dtype, lse (B,H,N) fp32, log2 domain). Keyword overrides exist for tests."""
    B, H, N, D = q.shape
    L = k.shape[2]
    if q.numel() == 0:  # nothing to compute, and a zero-sized grid is not launchable
        return (torch.zeros((B, H, N, D), dtype=q.dtype, device=q.device),
                torch.zeros((B, H, N), dtype=torch.float32, device=q.device))
    prec = _dot_precision(q.dtype)
    bn, bl, bd, num_warps, num_stages = _fwd_config(N, D, prec)
    bn = block_n or bn
    bl = block_l or bl
    n_nblocks = triton.cdiv(N, bn)
    if splits is None:
        splits, per = _pick_splits(L, bl, B * H * n_nblocks, q.device)
    else:
        per = triton.cdiv(triton.cdiv(L, bl), splits) * bl
        splits = triton.cdiv(L, per)
    out = _alloc((B, H, N, D), q.dtype, q.device)
    lse = _alloc((B, H, N), torch.float32, q.device)
    single = splits == 1
    if single:
        op = mp = lp = lse  # unused placeholders
    else:
        op = _alloc((splits, B * H, N, D), torch.float32, q.device)
        mp = _alloc((splits, B * H, N), torch.float32, q.device)
        lp = _alloc(mp.shape, torch.float32, q.device)
    grid = (B * H * n_nblocks, splits)
    _fwd_split_kernel[grid](
        q, k, v, out, lse, op, mp, lp,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N, L, D, per, n_nblocks, B * H, scale * LOG2E,
        BLOCK_N=bn, BLOCK_L=bl, BLOCK_D=bd, SINGLE=single, DOT_PREC=prec, DOT_F32=_dot_f32(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    if not single:
        _fwd_merge_kernel[(B * H * n_nblocks,)](
            out, lse, op, mp, lp, *out.stride(), H, N, D, splits, n_nblocks, B * H,
            BLOCK_N=bn, BLOCK_D=bd, num_warps=num_warps,
        )
    return out, lse


def _legacy_backward(do, q, k, v, out, lse, scale: float, deterministic: bool = True, *,
                     splits: int | None = None, block_n: int | None = None, block_l: int | None = None):
    """Returns (dq, dk, dv) in the input dtype. Keyword overrides exist for tests."""
    B, H, N, D = q.shape
    L = k.shape[2]
    if q.numel() == 0:  # no queries: every gradient is zero
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    prec = _dot_precision(q.dtype)
    bn, bl, bd, num_warps, num_stages = _bwd_config(N, D, prec)
    bn = block_n or bn
    bl = block_l or bl
    if splits is None:
        splits, per = _pick_splits(L, bl, B * H, q.device)
    else:
        per = triton.cdiv(triton.cdiv(L, bl), splits) * bl
        splits = triton.cdiv(L, per)
    accum_kv = triton.cdiv(N, bn) > 1
    if accum_kv:  # fp32 scratch: several query blocks add into each key block's gradient
        dk = torch.zeros((B, H, L, D), dtype=torch.float32, device=q.device)
        dv = torch.zeros_like(dk)
    else:
        dk = _alloc((B, H, L, D), k.dtype, q.device)
        dv = _alloc((B, H, L, D), v.dtype, q.device)
    atomic = False
    if splits == 1:
        dq = _alloc((1, B, H, N, D), q.dtype, q.device)
    elif deterministic:
        dq = _alloc((splits, B, H, N, D), torch.float32, q.device)
    else:
        dq = torch.zeros((1, B, H, N, D), dtype=torch.float32, device=q.device)
        atomic = True
    if atomic:
        dq_strides = (0,) + dq.stride()[1:]
    else:
        dq_strides = dq.stride()
    _bwd_kernel[(B * H, splits)](
        q, k, v, out, do, lse, dq, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride(),
        *dq_strides, *dk.stride(), *dv.stride(),
        H, N, L, D, per, scale, scale * LOG2E,
        BLOCK_N=bn, BLOCK_L=bl, BLOCK_D=bd, ACCUM_KV=accum_kv, DQ_ATOMIC=atomic,
        DOT_PREC=prec, DOT_F32=_dot_f32(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    if splits == 1 or atomic:
        dq = dq[0].to(q.dtype)
    else:
        dq = dq.sum(0).to(q.dtype)  # fixed-order reduction over splits: bitwise reproducible
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# =============================================================================================
# "tiled" (the default): a query group = a main tile + a remainder tile, both powers of two
#
# tl.arange wants powers of two, so N rows are covered by BLOCK_N + BLOCK_R rows (BLOCK_R may be
# 0) instead of the next power of two: N=150 -> 128 + 32 (6% padding, vs 41% for one 256 tile),
# N=171 -> 128 + 64. Both tiles live in the same program and consume the same K/V tile, so K/V
# cross HBM once per query group; N up to the group cap (256 rows at D=64) is one group.
#
# Backward, "transposed": with the queries resident, a program walks its key blocks and computes
# S^T = K Q^T, dP^T = V dO^T, dV = P^T dO and dK = dS^T Q, so the M side of these four dots is
# BLOCK_L (64: a whole wgmma warpgroup tile on sm_90) whatever N is, and the query count sits on
# the MMA's N side, where 32 or 128 columns cost no padding. dK/dV of a key block are complete
# when the block is done (all queries were resident): one store in the input dtype, no fp32
# scratch, no atomics. Only dQ = dS K is a per-program partial (one (N, D) fp32 per split).
# Beyond the group cap (N > 256 at D=64) the program walks its groups and, as legacy does,
# accumulates dK/dV in fp32 scratch across them.

@triton.jit
def _tiled_fwd_step(q, kt, v, m_i, l_i, acc, mask_l, qk_scale, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    s = _dot(q, kt, DOT_PREC, DOT_F32) * qk_scale
    s = tl.where(mask_l[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC, DOT_F32)
    return m_new, l_i, acc


@triton.jit
def _tiled_fwd_store(O, LSE, OP, MP, LP, o_base, offs_n, offs_d, mask_d, son, sod, bh, split, BH, N, D,
                     m_i, l_i, acc, SINGLE: tl.constexpr):
    mask_n = offs_n < N
    mask = mask_n[:, None] & mask_d[None, :]
    row = bh.to(tl.int64) * N + rows64(offs_n)
    if SINGLE:
        out = acc / l_i[:, None]
        tl.store(o_base + rows64(offs_n)[:, None] * son + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=mask)
        tl.store(LSE + row, m_i + tl.log2(l_i), mask=mask_n)
    else:
        part = (split * BH) * N + row  # row of the (split, bh, n) partial buffers
        tl.store(OP + part[:, None] * D + offs_d[None, :], acc, mask=mask)
        tl.store(MP + part, m_i, mask=mask_n)
        tl.store(LP + part, l_i, mask=mask_n)


@triton.jit
def _tiled_fwd_kernel(
    Q, K, V, O, LSE, OP, MP, LP,
    sqb, sqh, sqn, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, son, sod,
    H, N, L, D, keys_per_split, n_groups, BH, qk_scale,
    TILE0: tl.constexpr, TILE1: tl.constexpr, TILE2: tl.constexpr, TILE3: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid0 = tl.program_id(0)
    split = tl.program_id(1)
    bh = pid0 // n_groups  # a head's query groups are neighbours in launch order: they share K/V in L2
    g = pid0 % n_groups
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    n0 = g * (TILE0 + TILE1 + TILE2 + TILE3)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q_base = Q + b * sqb + h * sqh
    offs0 = n0 + tl.arange(0, TILE0)
    q0 = tl.load(q_base + rows64(offs0)[:, None] * sqn + offs_d[None, :] * sqd,
                 mask=(offs0 < N)[:, None] & mask_d[None, :], other=0.0)
    m0 = tl.full([TILE0], float("-inf"), tl.float32)
    l0 = tl.zeros([TILE0], tl.float32)
    acc0 = tl.zeros([TILE0, BLOCK_D], tl.float32)
    if TILE1 > 0:
        offs1 = n0 + TILE0 + tl.arange(0, TILE1)
        q1 = tl.load(q_base + rows64(offs1)[:, None] * sqn + offs_d[None, :] * sqd,
                     mask=(offs1 < N)[:, None] & mask_d[None, :], other=0.0)
        m1 = tl.full([TILE1], float("-inf"), tl.float32)
        l1 = tl.zeros([TILE1], tl.float32)
        acc1 = tl.zeros([TILE1, BLOCK_D], tl.float32)
    if TILE2 > 0:
        offs2 = n0 + TILE0 + TILE1 + tl.arange(0, TILE2)
        q2 = tl.load(q_base + rows64(offs2)[:, None] * sqn + offs_d[None, :] * sqd,
                     mask=(offs2 < N)[:, None] & mask_d[None, :], other=0.0)
        m2 = tl.full([TILE2], float("-inf"), tl.float32)
        l2 = tl.zeros([TILE2], tl.float32)
        acc2 = tl.zeros([TILE2, BLOCK_D], tl.float32)
    if TILE3 > 0:
        offs3 = n0 + TILE0 + TILE1 + TILE2 + tl.arange(0, TILE3)
        q3 = tl.load(q_base + rows64(offs3)[:, None] * sqn + offs_d[None, :] * sqd,
                     mask=(offs3 < N)[:, None] & mask_d[None, :], other=0.0)
        m3 = tl.full([TILE3], float("-inf"), tl.float32)
        l3 = tl.zeros([TILE3], tl.float32)
        acc3 = tl.zeros([TILE3, BLOCK_D], tl.float32)

    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, L)
    for start_l in range(start, end, BLOCK_L):
        offs_l = start_l + tl.arange(0, BLOCK_L)
        mask_l = offs_l < end
        offs_l64 = offs_l.to(tl.int64)
        kt = tl.load(k_base + offs_l64[None, :] * skl + offs_d[:, None] * skd,
                     mask=mask_d[:, None] & mask_l[None, :], other=0.0)
        v = tl.load(v_base + offs_l64[:, None] * svl + offs_d[None, :] * svd,
                    mask=mask_l[:, None] & mask_d[None, :], other=0.0)
        # every tile consumes the same K/V tile: no second trip to memory
        m0, l0, acc0 = _tiled_fwd_step(q0, kt, v, m0, l0, acc0, mask_l, qk_scale, DOT_PREC, DOT_F32)
        if TILE1 > 0:
            m1, l1, acc1 = _tiled_fwd_step(q1, kt, v, m1, l1, acc1, mask_l, qk_scale, DOT_PREC, DOT_F32)
        if TILE2 > 0:
            m2, l2, acc2 = _tiled_fwd_step(q2, kt, v, m2, l2, acc2, mask_l, qk_scale, DOT_PREC, DOT_F32)
        if TILE3 > 0:
            m3, l3, acc3 = _tiled_fwd_step(q3, kt, v, m3, l3, acc3, mask_l, qk_scale, DOT_PREC, DOT_F32)

    o_base = O + b * sob + h * soh
    _tiled_fwd_store(O, LSE, OP, MP, LP, o_base, offs0, offs_d, mask_d, son, sod, bh, split, BH, N, D,
                     m0, l0, acc0, SINGLE)
    if TILE1 > 0:
        _tiled_fwd_store(O, LSE, OP, MP, LP, o_base, offs1, offs_d, mask_d, son, sod, bh, split, BH, N, D,
                         m1, l1, acc1, SINGLE)
    if TILE2 > 0:
        _tiled_fwd_store(O, LSE, OP, MP, LP, o_base, offs2, offs_d, mask_d, son, sod, bh, split, BH, N, D,
                         m2, l2, acc2, SINGLE)
    if TILE3 > 0:
        _tiled_fwd_store(O, LSE, OP, MP, LP, o_base, offs3, offs_d, mask_d, son, sod, bh, split, BH, N, D,
                         m3, l3, acc3, SINGLE)


@triton.jit
def _tiled_bwd_load(Q, DO, O, LSE, q_base, do_base, o_base, bh, offs_n, offs_d, mask_d,
                    sqn, sqd, sgn, sgd, son, sod, N):
    """One query tile's resident operands: q, dO, the log2 LSE and delta = rowsum(dO * O). Padding rows
    get LSE = +inf, so their probabilities are exactly 0 and no query mask is needed in the loop."""
    mask_n = offs_n < N
    mask = mask_n[:, None] & mask_d[None, :]
    offs_n64 = rows64(offs_n)
    q = tl.load(q_base + offs_n64[:, None] * sqn + offs_d[None, :] * sqd, mask=mask, other=0.0)
    do = tl.load(do_base + offs_n64[:, None] * sgn + offs_d[None, :] * sgd, mask=mask, other=0.0)
    o = tl.load(o_base + offs_n64[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(LSE + bh.to(tl.int64) * N + rows64(offs_n), mask=mask_n, other=float("inf"))
    return q, do, lse, delta


@triton.jit
def _tiled_bwd_step(q, do, lse, delta, k, v, dq, dk, dv, mask_l, qk_scale,
                    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """One (query tile, key block) pair: this tile's terms added into dQ, dK and dV.

    dV = P^T dO and dK = dS^T Q have M = BLOCK_L whatever the tile. Each comes from its own
    zero-initialised dot and passes a select before it is added in: Triton folds
    `acc + dot(a, b)` into the dot's accumulator, and a dot feeding another dot gets all its warps
    along M, which for M = BLOCK_L = 64 < 16 * num_warps computes the tile twice. (The select also
    zeroes rows past the key range, whose K/V were loaded as zeros; no other key mask is needed:
    those zero K rows add nothing to dQ.) Padding query rows have LSE = +inf, so P = 0 there."""
    s = _dot(q, tl.trans(k), DOT_PREC, DOT_F32) * qk_scale
    p = tl.exp2(s - lse[:, None])
    dv += tl.where(mask_l[:, None], _dot(tl.trans(p.to(do.dtype)), do, DOT_PREC, DOT_F32), 0.0)
    dp = _dot(do, tl.trans(v), DOT_PREC, DOT_F32)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dk += tl.where(mask_l[:, None], _dot(tl.trans(ds), q, DOT_PREC, DOT_F32), 0.0)
    dq += _dot(ds, k, DOT_PREC, DOT_F32)
    return dq, dk, dv


@triton.jit
def _tiled_bwd_store_dq(DQ, dq_base, offs_n, offs_d, mask_d, sdqn, sdqd, N, dq, scale):
    mask = (offs_n < N)[:, None] & mask_d[None, :]
    dq_ptr = dq_base + rows64(offs_n)[:, None] * sdqn + offs_d[None, :] * sdqd
    tl.store(dq_ptr, (dq * scale).to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _tiled_bwd_kernel(
    Q, K, V, O, DO, LSE, DQ, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
    sob, soh, son, sod, sgb, sgh, sgn, sgd,
    sdqs, sdqb, sdqh, sdqn, sdqd, sdkb, sdkh, sdkl, sdkd, sdvb, sdvh, sdvl, sdvd,
    H, N, L, D, keys_per_split, n_groups, scale, qk_scale,
    TILE0: tl.constexpr, TILE1: tl.constexpr, TILE2: tl.constexpr, TILE3: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ACCUM_KV: tl.constexpr, DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, L)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sgb + h * sgh
    o_base = O + b * sob + h * soh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dk_base = DK + b * sdkb + h * sdkh
    dv_base = DV + b * sdvb + h * sdvh
    dq_base = DQ + split.to(tl.int64) * sdqs + b * sdqb + h * sdqh

    # n_groups == 1 (ACCUM_KV off) is the case this kernel is shaped for; more groups re-walk the key
    # range once per group and add into this program's exclusive fp32 dK/dV scratch rows.
    for g in range(0, n_groups):
        n0 = g * (TILE0 + TILE1 + TILE2 + TILE3)
        offs0 = n0 + tl.arange(0, TILE0)
        q0, do0, lse0, delta0 = _tiled_bwd_load(Q, DO, O, LSE, q_base, do_base, o_base, bh, offs0, offs_d,
                                                mask_d, sqn, sqd, sgn, sgd, son, sod, N)
        dq0 = tl.zeros([TILE0, BLOCK_D], tl.float32)
        if TILE1 > 0:
            offs1 = n0 + TILE0 + tl.arange(0, TILE1)
            q1, do1, lse1, delta1 = _tiled_bwd_load(Q, DO, O, LSE, q_base, do_base, o_base, bh, offs1, offs_d,
                                                    mask_d, sqn, sqd, sgn, sgd, son, sod, N)
            dq1 = tl.zeros([TILE1, BLOCK_D], tl.float32)
        if TILE2 > 0:
            offs2 = n0 + TILE0 + TILE1 + tl.arange(0, TILE2)
            q2, do2, lse2, delta2 = _tiled_bwd_load(Q, DO, O, LSE, q_base, do_base, o_base, bh, offs2, offs_d,
                                                    mask_d, sqn, sqd, sgn, sgd, son, sod, N)
            dq2 = tl.zeros([TILE2, BLOCK_D], tl.float32)
        if TILE3 > 0:
            offs3 = n0 + TILE0 + TILE1 + TILE2 + tl.arange(0, TILE3)
            q3, do3, lse3, delta3 = _tiled_bwd_load(Q, DO, O, LSE, q_base, do_base, o_base, bh, offs3, offs_d,
                                                    mask_d, sqn, sqd, sgn, sgd, son, sod, N)
            dq3 = tl.zeros([TILE3, BLOCK_D], tl.float32)
        for start_l in range(start, end, BLOCK_L):
            offs_l = start_l + tl.arange(0, BLOCK_L)
            mask_l = offs_l < end
            offs_l64 = offs_l.to(tl.int64)
            mask_ld = mask_l[:, None] & mask_d[None, :]
            k = tl.load(k_base + offs_l64[:, None] * skl + offs_d[None, :] * skd, mask=mask_ld, other=0.0)
            v = tl.load(v_base + offs_l64[:, None] * svl + offs_d[None, :] * svd, mask=mask_ld, other=0.0)
            dk = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
            # one query tile at a time: only one tile's score/dP tiles are live, the dQ sums all are
            dq0, dk, dv = _tiled_bwd_step(q0, do0, lse0, delta0, k, v, dq0, dk, dv, mask_l, qk_scale,
                                          DOT_PREC, DOT_F32)
            if TILE1 > 0:
                dq1, dk, dv = _tiled_bwd_step(q1, do1, lse1, delta1, k, v, dq1, dk, dv, mask_l, qk_scale,
                                              DOT_PREC, DOT_F32)
            if TILE2 > 0:
                dq2, dk, dv = _tiled_bwd_step(q2, do2, lse2, delta2, k, v, dq2, dk, dv, mask_l, qk_scale,
                                              DOT_PREC, DOT_F32)
            if TILE3 > 0:
                dq3, dk, dv = _tiled_bwd_step(q3, do3, lse3, delta3, k, v, dq3, dk, dv, mask_l, qk_scale,
                                              DOT_PREC, DOT_F32)
            dk = dk * scale
            dk_ptr = dk_base + offs_l64[:, None] * sdkl + offs_d[None, :] * sdkd
            dv_ptr = dv_base + offs_l64[:, None] * sdvl + offs_d[None, :] * sdvd
            if ACCUM_KV:
                dk += tl.load(dk_ptr, mask=mask_ld, other=0.0)
                dv += tl.load(dv_ptr, mask=mask_ld, other=0.0)
            tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=mask_ld)
            tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=mask_ld)
        _tiled_bwd_store_dq(DQ, dq_base, offs0, offs_d, mask_d, sdqn, sdqd, N, dq0, scale)
        if TILE1 > 0:
            _tiled_bwd_store_dq(DQ, dq_base, offs1, offs_d, mask_d, sdqn, sdqd, N, dq1, scale)
        if TILE2 > 0:
            _tiled_bwd_store_dq(DQ, dq_base, offs2, offs_d, mask_d, sdqn, sdqd, N, dq2, scale)
        if TILE3 > 0:
            _tiled_bwd_store_dq(DQ, dq_base, offs3, offs_d, mask_d, sdqn, sdqd, N, dq3, scale)
        if ACCUM_KV:
            # the next group re-reads this range's dK/dV scratch, possibly from other threads
            tl.debug_barrier()


@functools.lru_cache(maxsize=None)
def _query_tiles(N: int, cap: int, num_warps: int, fma: bool = False, max_tiles: int = 4,
                 max_tile: int = 256, cap_multi: int | None = None) -> tuple[tuple[int, int, int, int], int]:
    """((TILE0..TILE3), n_groups): each query group is up to ``max_tiles`` power-of-two tiles (largest
    first, 0 = absent) of <= cap rows in all (<= cap_multi when N needs several groups), chosen for
    the fewest padded rows.

    Tile sizes an MMA handles without waste: a dot whose result feeds another dot (S -> P V, the
    backward's S and dP) gets all warps along M, so with 8 warps a 64-row tile would be computed by
    both warpgroups; tiles are therefore < 64 rows (mma.sync, warps along the keys) or >= 16 rows a
    warp (wgmma). Each extra tile is charged 8 rows (its reductions and bookkeeping), each extra group
    64 (it walks K/V again: an L2 re-read in the forward, an fp32 dK/dV scratch pass in the backward)."""
    cap_multi = cap if cap_multi is None else cap_multi
    sizes = [t for t in (16, 32, 64, 128, 256)
             if t <= min(cap, max_tile) and (fma or t < 64 or t >= 16 * num_warps)]
    combos = [tuple(sorted(c, reverse=True)) for n in range(1, max_tiles + 1)
              for c in itertools.combinations_with_replacement(sizes, n) if sum(c) <= cap]
    best = None
    for groups in range(1, triton.cdiv(max(N, 1), 16) + 1):
        rows = triton.cdiv(max(N, 1), groups)
        for c in combos:
            if sum(c) < rows or (groups > 1 and sum(c) > cap_multi):
                continue
            key = (groups * sum(c) + 8 * (len(c) - 1) + 64 * (groups - 1), len(c))
            if best is None or key < best[0]:
                best = (key, (c + (0, 0, 0))[:4], groups)
    return best[1], best[2]


class TiledConfig(NamedTuple):
    """A tiled kernel's launch shape (maxnreg None: ptxas's choice)."""
    tiles: tuple[int, int, int, int]  # query tiles of a group, largest first, 0 = absent
    groups: int
    block_l: int
    block_d: int
    num_warps: int
    num_stages: int
    maxnreg: int | None


def _chosen_tiles(N, cap, num_warps, block_n, block_r, **kw):
    """The query tiling: ``block_n`` (+ ``block_r``, tests and benchmarks) or the least-padded one.
    The configs derive everything else from this final tiling, so an override gets its own."""
    if block_n:
        return (block_n, block_r or 0, 0, 0), triton.cdiv(N, block_n + (block_r or 0))
    return _query_tiles(N, cap, num_warps, **kw)


# Tile shapes for H100/H200 (sm_90), checked by compiling every shape below for sm_90 and reading
# ptxas's register/spill report (none spill; the worst is 255 registers with none spilled). The
# budget: 255 registers a thread; at 8 warps = 256 threads an (r x c) fp32 tile costs r*c/256 of them.
# Exact-fp32 ("ieee") dots run on FMA units and need far more registers per tile, hence the smaller
# groups on that path.
def _tiled_fwd_config(N: int, D: int, prec: str, fp32: bool = False, block_n: int | None = None,
                      block_r: int | None = None) -> TiledConfig:
    """The tiled forward's launch shape.
    ``fp32``: fp32 operands (tf32 dots) take twice the shared memory and registers of 16-bit ones;
    they get the exact-fp32 path's small groups (128 + 32 rows of fp32 spill and overflow smem)."""
    block_d = _pow2(D)
    if prec == "ieee" or fp32:
        tiles, groups = _chosen_tiles(N, max(16, min(128, 4096 // block_d)), 8, block_n, block_r, fma=True)
        warps = 8 if sum(tiles) * block_d >= 2048 else 4
        # D=128: 32 keys a step spill 8-12 bytes on the fp32 paths; 16 do not, with one stage for the
        # FMA (ieee) dots and two for tf32 (each spills 8-24 bytes with the other count). The FMA
        # path uncapped: triton 3.6's ptxas aims at 64 registers and spills 8-12 bytes; capped at
        # 128 it takes 85-94 on 3.6 and 3.8 alike.
        if block_d > 64:
            return TiledConfig(tiles, groups, 16, block_d, warps, 1 if prec == "ieee" else 2,
                               128 if prec == "ieee" else None)
        return TiledConfig(tiles, groups, 32, block_d, warps, 2, None)
    num_warps = 4 if _pow2(N) * block_d <= 4096 else 8
    # per thread at 8 warps, D=64, <= 256 rows: accumulators <= 64 registers, the (rows x 64) score
    # tile <= 64; 64 keys a step = an 8 KB K and V load (bf16), 3 stages = 48 KB in flight per SM.
    # D=128 doubles the K/V tiles: 128 keys a step spilled 8-176 bytes, 64 keys 16; 32 keys, 2 stages.
    tiles, groups = _chosen_tiles(N, max(16, min(256, 16384 // block_d)), num_warps, block_n, block_r)
    rows = sum(tiles)
    block_l = max(32, min(128, triton.next_power_of_2(2048 * num_warps // rows + 1) // 2))
    if block_d > 64:  # 64 + 64-row groups at 64 keys still spilled 16 bytes with 3 stages
        return TiledConfig(tiles, groups, 32, block_d, num_warps, 2, None)
    return TiledConfig(tiles, groups, block_l, block_d, num_warps, 3, None)


def _tiled_bwd_config(N: int, D: int, prec: str, fp32: bool = False, block_n: int | None = None,
                      block_r: int | None = None) -> TiledConfig:
    """The tiled backward's launch shape (``fp32``: see _tiled_fwd_config)."""
    block_d = _pow2(D)
    if prec == "ieee" or fp32:
        tiles, groups = _chosen_tiles(N, max(16, min(64, 2048 // block_d)), 8, block_n, block_r, fma=True)
        # Exact-fp32 (FMA) dots at D <= 64 with several query groups: left to itself ptxas aims at 80
        # registers (3 CTAs an SM) and spills 8-12 bytes; a 128 cap compiles clean. (A cap is also a
        # target: with one group it made ptxas fill 128 and spill 28 bytes where it needs 66-94.)
        maxnreg = 128 if prec == "ieee" and block_d <= 64 and groups > 1 else None
        return TiledConfig(tiles, groups, 32 if block_d <= 64 else 16, block_d, 8, 2 if block_d <= 64 else 1,
                           maxnreg)
    num_warps = 4 if _pow2(N) * block_d <= 4096 else 8
    # per thread at 8 warps, D=64, BLOCK_L=64: the dQ sums of every resident query row (256 rows:
    # 64 registers) + one tile's S and dP (128 x 64: 32 each) + dK and dV (64 x 64 in two warpgroups)
    # + the K/V tiles. ptxas (sm_90): 128 + 32 -> 255 registers, 128 + 128 -> 254, none spilled; a
    # 256-row tile, a third tile or (with the fp32 scratch of N > 256) 128 + 32 spill, hence <= 2
    # tiles of <= 128 rows, and <= 128 + 16 rows a group beyond 256.
    cap = max(16, min(256, 16384 // block_d))
    tiles, groups = _chosen_tiles(N, cap, num_warps, block_n, block_r, max_tiles=2, max_tile=128,
                                  cap_multi=max(16, min(144, 9216 // block_d)))
    # D=128: 64-key steps spilled 28-290 bytes (dK/dV and the K/V tiles double), 32 still 12-40 with
    # the fp32 dK/dV scratch: 16 keys there, 32 otherwise, 8 warps
    if block_d > 64:
        return TiledConfig(tiles, groups, 32 if groups == 1 else 16, block_d, 8, 2, None)
    return TiledConfig(tiles, groups, 64, block_d, num_warps, 2, None)


def _tiled_splits(L: int, block_l: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys_per_split): the split count with the shortest critical path, in key blocks:
    waves * (key blocks a split + 4), waves = ceil(programs * splits / SMs); ties go to fewer splits.

    These programs hold 8 warps and most of an SM's registers, so about one runs per SM at a time:
    64 programs (B=8, H=8) -> 2 splits = 128 of 132 SMs in one wave; batch 1 (8 heads) -> 16 splits.
    The "+ 4" is a program's fixed cost in key-block units: at N=150, D=64 its Q (+ dO, O) load and
    its fp32 (N, D) partial (38 KB written, read again by the merge) weigh about as much as 4 K/V
    tiles of 64 keys (16 KB each, bf16). Legacy's "three waves" rule (7 splits of 64 programs) leaves
    its fourth wave 40% full and writes 3.5x the partials. A split streams >= 4 key blocks on a GPU."""
    n_blocks = triton.cdiv(L, block_l)
    sms = _num_sms(device)
    best = None
    for s in range(1, max(1, n_blocks // (1 if _interpret() else 4)) + 1):
        per_blocks = triton.cdiv(n_blocks, s)
        s_real = triton.cdiv(n_blocks, per_blocks)
        key = (triton.cdiv(programs * s_real, sms) * (per_blocks + 4), s_real)
        if best is None or key < best:
            best = key
    per = triton.cdiv(n_blocks, best[1]) * block_l
    return triton.cdiv(L, per), per


def _splits_override(L, bl, splits):
    per = triton.cdiv(triton.cdiv(L, bl), splits) * bl
    return triton.cdiv(L, per), per


def _tiled_forward(q, k, v, scale: float, *, splits=None, block_n=None, block_l=None, block_r=None):
    B, H, N, D = q.shape
    L = k.shape[2]
    prec = _dot_precision(q.dtype)
    cfg = _tiled_fwd_config(N, D, prec, q.dtype == torch.float32, block_n, block_r)
    tiles, groups, bd = cfg.tiles, cfg.groups, cfg.block_d
    bl = block_l or cfg.block_l
    if splits is None:
        splits, per = _tiled_splits(L, bl, B * H * groups, q.device)
    else:
        splits, per = _splits_override(L, bl, splits)
    out = _alloc((B, H, N, D), q.dtype, q.device)
    lse = _alloc((B, H, N), torch.float32, q.device)
    single = splits == 1
    if single:
        op = mp = lp = lse  # unused placeholders
    else:
        op = _alloc((splits, B * H, N, D), torch.float32, q.device)
        mp = _alloc((splits, B * H, N), torch.float32, q.device)
        lp = _alloc(mp.shape, torch.float32, q.device)
    _tiled_fwd_kernel[(B * H * groups, splits)](
        q, k, v, out, lse, op, mp, lp,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N, L, D, per, groups, B * H, scale * LOG2E,
        TILE0=tiles[0], TILE1=tiles[1], TILE2=tiles[2], TILE3=tiles[3], BLOCK_L=bl, BLOCK_D=bd,
        SINGLE=single, DOT_PREC=prec,
        DOT_F32=_dot_f32(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
    )
    if not single:  # the merge reads only the partials: its own row blocks, independent of the groups
        mbn = min(_pow2(N), max(16, 4096 // bd))
        n_mblocks = triton.cdiv(N, mbn)
        _fwd_merge_kernel[(B * H * n_mblocks,)](
            out, lse, op, mp, lp, *out.stride(), H, N, D, splits, n_mblocks, B * H,
            BLOCK_N=mbn, BLOCK_D=bd, num_warps=4,
        )
    return out, lse


def _tiled_backward(do, q, k, v, out, lse, scale: float, deterministic: bool = True, *,
                    splits=None, block_n=None, block_l=None, block_r=None):
    B, H, N, D = q.shape
    L = k.shape[2]
    prec = _dot_precision(q.dtype)
    cfg = _tiled_bwd_config(N, D, prec, q.dtype == torch.float32, block_n, block_r)
    tiles, groups, bd = cfg.tiles, cfg.groups, cfg.block_d
    bl = block_l or cfg.block_l
    if splits is None:
        splits, per = _tiled_splits(L, bl, B * H, q.device)
    else:
        splits, per = _splits_override(L, bl, splits)
    accum_kv = groups > 1
    if accum_kv:  # fp32 scratch: several query groups add into each key block's gradient
        dk = torch.zeros((B, H, L, D), dtype=torch.float32, device=q.device)
        dv = torch.zeros_like(dk)
    else:  # each key block's dK/dV is finished in registers and stored once, in the input dtype
        dk = _alloc((B, H, L, D), k.dtype, q.device)
        dv = _alloc((B, H, L, D), v.dtype, q.device)
    # dQ: one (N, D) fp32 partial per split, summed in a fixed order, whatever ``deterministic`` says.
    # The partials weigh what atomics' zero-filled fp32 buffer would (splits x 38 KB a head at N=150),
    # and the atomic epilogue made the 128 + 128 tile pair spill on sm_90.
    if splits == 1:
        dq = _alloc((1, B, H, N, D), q.dtype, q.device)
    else:
        dq = _alloc((splits, B, H, N, D), torch.float32, q.device)
    _tiled_bwd_kernel[(B * H, splits)](
        q, k, v, out, do, lse, dq, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *do.stride(),
        *dq.stride(), *dk.stride(), *dv.stride(),
        H, N, L, D, per, groups, scale, scale * LOG2E,
        TILE0=tiles[0], TILE1=tiles[1], TILE2=tiles[2], TILE3=tiles[3], BLOCK_L=bl, BLOCK_D=bd,
        ACCUM_KV=accum_kv, DOT_PREC=prec, DOT_F32=_dot_f32(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
    )
    dq = dq[0].to(q.dtype) if splits == 1 else dq.sum(0).to(q.dtype)  # fixed order: bitwise reproducible
    if accum_kv:
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    return dq, dk, dv


# =============================================================================================
# Variants and the launchers senformer.ops calls

# "legacy": the single-tile forward and the BLOCK_N=128 backward (module docstring).
_DESIGNS = Designs("class_attention", ("tiled", "legacy"))
VARIANTS, use_variant, current_variant = _DESIGNS.names, _DESIGNS.use, _DESIGNS.current


@on_input_device
def forward(q, k, v, scale: float, *, splits: int | None = None, block_n: int | None = None,
            block_l: int | None = None, block_r: int | None = None):
    """Returns (out (B,H,N,D) in q.dtype, lse (B,H,N) fp32, log2 domain). Keyword overrides exist for
    tests (``block_r``: the tiled variant's remainder tile; 0 or None with ``block_n`` = one tile)."""
    B, H, N, D = q.shape
    if q.numel() == 0:  # nothing to compute, and a zero-sized grid is not launchable
        return (torch.zeros((B, H, N, D), dtype=q.dtype, device=q.device),
                torch.zeros((B, H, N), dtype=torch.float32, device=q.device))
    if current_variant() == "legacy":
        return _legacy_forward(q, k, v, scale, splits=splits, block_n=block_n, block_l=block_l)
    return _tiled_forward(q, k, v, scale, splits=splits, block_n=block_n, block_l=block_l, block_r=block_r)


@on_input_device
def backward(do, q, k, v, out, lse, scale: float, deterministic: bool = True, *,
             splits: int | None = None, block_n: int | None = None, block_l: int | None = None,
             block_r: int | None = None):
    """Returns (dq, dk, dv) in the input dtype. Keyword overrides exist for tests."""
    if q.numel() == 0:  # no queries: every gradient is zero
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if current_variant() == "legacy":
        return _legacy_backward(do, q, k, v, out, lse, scale, deterministic, splits=splits, block_n=block_n,
                                block_l=block_l)
    return _tiled_backward(do, q, k, v, out, lse, scale, deterministic, splits=splits, block_n=block_n,
                           block_l=block_l, block_r=block_r)
