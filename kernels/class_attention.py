"""Triton kernels for class_cross_attention: N class queries (small) over L pixel keys (large).

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
import os

import torch
import triton
import triton.language as tl

from ._launch import on_input_device

LOG2E = 1.4426950408889634


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every output and scratch buffer comes from here (uninitialised); tests swap in a NaN fill
    to prove that each element is written."""
    return torch.empty(shape, dtype=dtype, device=device)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


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
    q = tl.load(Q + b * sqb + h * sqh + offs_n[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd,
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

    row = bh.to(tl.int64) * N + offs_n
    if SINGLE:
        out = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + offs_n[:, None].to(tl.int64) * son + offs_d[None, :] * sod,
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
    row = bh.to(tl.int64) * N + offs_n

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
    tl.store(O + b * sob + h * soh + offs_n[:, None].to(tl.int64) * son + offs_d[None, :] * sod,
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
        offs_n64 = offs_n.to(tl.int64)
        q = tl.load(Q + b * sqb + h * sqh + offs_n64[:, None] * sqn + offs_d[None, :] * sqd, mask=mask_nd, other=0.0)
        do = tl.load(DO + b * sgb + h * sgh + offs_n64[:, None] * sgn + offs_d[None, :] * sgd, mask=mask_nd, other=0.0)
        o = tl.load(O + b * sob + h * soh + offs_n64[:, None] * son + offs_d[None, :] * sod, mask=mask_nd, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse = tl.load(LSE + bh.to(tl.int64) * N + offs_n, mask=mask_n, other=0.0)
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


@on_input_device
def forward(q, k, v, scale: float, *, splits: int | None = None, block_n: int | None = None,
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


@on_input_device
def backward(do, q, k, v, out, lse, scale: float, deterministic: bool = True, *,
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
