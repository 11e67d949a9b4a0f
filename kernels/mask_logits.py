"""Triton kernels for mask_logits: (B,N,C) class embeddings x (B,L,C) pixel tokens -> (B,N,h,w).

All three products (forward, dFeatures, dCls) are one strided batched matmul kernel: operands are
addressed through their strides, so transposed views cost nothing and the forward writes each
(N-tile, L-tile) straight into the channels-first output (no (B,L,N) intermediate, no transpose
copy). dCls reduces over the long pixel axis, so it is split along L into fp32 partials summed in
a fixed order afterwards (deterministic) to give a small batch enough programs.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Module-level names: tests monkeypatch ``<module>._alloc``.
from ._launch import alloc as _alloc
from ._launch import cuda_sms as _cuda_sms
from ._launch import interpret as _interpret
from ._launch import on_input_device
from ._launch import pow2 as _pow2
from .indexing import rows64


@triton.jit
def _bmm_kernel(
    A, B, C, M, N, K, k_per_split, M_BKT, N_BKT, K_BKT,
    sab, sam, sak, sbb, sbk, sbn, scs, scb, scm, scn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    tiles_m = tl.cdiv(M, BLOCK_M)
    # M fastest: neighbouring programs share one B tile (the large pixel operand) while it is in L2.
    pm = pid % tiles_m
    pn = pid // tiles_m
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_m64 = rows64(offs_m)
    offs_n64 = rows64(offs_n)
    a_base = A + batch * sab + offs_m64[:, None] * sam
    b_base = B + batch * sbb + offs_n64[None, :] * sbn
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        offs_k64 = offs_k.to(tl.int64)
        a = tl.load(a_base + offs_k64[None, :] * sak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_base + offs_k64[:, None] * sbk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_F32:  # the interpreter's tl.dot mishandles bfloat16 operands
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PREC)
        else:
            acc += tl.dot(a, b, input_precision=DOT_PREC)
    c = C + split.to(tl.int64) * scs + batch * scb + offs_m64[:, None] * scm + offs_n64[None, :] * scn
    tl.store(c, acc.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _gpu_configs(exact: bool = False):
    # Tensor-core shapes for 16-bit/tf32 operands. Exact fp32 dots run on FMA units with the whole
    # tile in registers: there the 64x256x32 (255 registers) and 64x64x64 4-warp (128) tiles spilled
    # 4 bytes on sm_90 (tests/sm90_compile.py), so that tuner goes without them.
    cfgs = []
    for bm, bn, bk, w, s in [(64, 128, 32, 4, 4), (128, 128, 32, 8, 3), (64, 64, 64, 4, 3),
                             (128, 64, 64, 4, 3), (16, 128, 64, 4, 4), (64, 256, 32, 8, 3),
                             (64, 64, 32, 8, 3), (32, 64, 32, 4, 3), (64, 128, 32, 8, 3)]:
        if exact and (bm, bn, bk, w) in ((64, 256, 32, 8), (64, 64, 64, 4)):
            continue
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s))
    return cfgs


@functools.lru_cache(maxsize=None)
def _tuned(exact: bool = False):
    # Tuning launches overwrite every output element (no accumulation), so repeated trial runs are safe.
    # Keyed on power-of-two buckets (M_BKT, N_BKT, K_BKT are otherwise unused kernel arguments), not on
    # the exact sizes: whole-image evaluation sees a new token count per image size, and re-tuning
    # the configs for each would cost more than the products. Exact fp32 and tf32 have their own
    # tuners (config lists); the tensor dtypes are part of the key by triton itself.
    return triton.autotune(configs=_gpu_configs(exact), key=["M_BKT", "N_BKT", "K_BKT", "DOT_PREC"])(_bmm_kernel)


def bucket(x: int) -> int:
    """Autotuning bucket of a size: the next power of two (at least 16)."""
    return _pow2(x)


def split_plan(K: int, want: int) -> tuple[int, int]:
    """(splits, k_per_split) with k_per_split a multiple of the largest BLOCK_K, so no split is empty."""
    grain = 16 if _interpret() else 128
    per = triton.cdiv(triton.cdiv(K, max(1, want)), grain) * grain
    return triton.cdiv(K, per), per


@on_input_device
def bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, k_per_split: int | None = None) -> torch.Tensor:
    """out[(s,) i] = a[i] @ b[i] over the s-th K chunk, for (Bt,M,K) x (Bt,K,N) strided views.
    ``out`` is (Bt,M,N), or (splits,Bt,M,N) fp32 with ``k_per_split`` from ``split_plan``;
    every element is written."""
    Bt, M, K = a.shape
    N = b.shape[2]
    if out.numel() == 0:  # a zero-sized grid is not launchable
        return out
    if k_per_split is not None:
        split_k, per, scs, oc = out.shape[0], k_per_split, out.stride(0), out[0]
    else:
        split_k, per, scs, oc = 1, K, 0, out
    # fp32 follows torch's matmul policy ("highest", the default: no tf32); 16-bit uses native MMA
    exact = a.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    dot = dict(DOT_PREC="ieee" if exact else "tf32", DOT_F32=_interpret() and a.dtype == torch.bfloat16)
    args = (a, b, out, M, N, K, per, bucket(M), bucket(N), bucket(per), *a.stride(), *b.stride(), scs, *oc.stride())
    if _interpret():
        bm, bn, bk = min(_pow2(M), 64), min(_pow2(N), 64), min(_pow2(K), 64)
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), Bt, split_k)
        _bmm_kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **dot)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), Bt, split_k)
        _tuned(exact)[grid](*args, **dot)
    return out


def _split_for(Bt: int, M: int, N: int, K: int, device: torch.device) -> int:
    """Splits of the reduction axis so that ~3 waves of 64x64 tiles run; 1 when the tiles already fill the GPU."""
    if device.type != "cuda":
        return 1 if K < 64 else 2  # interpreter: still exercise the split path on small shapes
    sms = _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    tiles = Bt * triton.cdiv(M, 64) * triton.cdiv(N, 64)
    return max(1, min(triton.cdiv(3 * sms, tiles), triton.cdiv(K, 512)))


@on_input_device
def forward(features: torch.Tensor, cls: torch.Tensor, h: int, w: int) -> torch.Tensor:
    B, L, C = features.shape
    N = cls.shape[1]
    out = _alloc((B, N, h, w), features.dtype, features.device)
    bmm(cls, features.transpose(1, 2), out.view(B, N, L))
    return out


@on_input_device
def backward(grad: torch.Tensor, features: torch.Tensor, cls: torch.Tensor):
    """(dFeatures (B,L,C), dCls (B,N,C)) for grad (B,N,h,w) of any strides."""
    B, L, C = features.shape
    N = cls.shape[1]
    g = grad.reshape(B, N, L)  # a view whenever h and w are mergeable, which autograd's grads are
    d_feat = _alloc((B, L, C), features.dtype, features.device)
    bmm(g.transpose(1, 2), cls, d_feat)
    if L == 0:  # no pixels: dCls is an empty sum
        return d_feat, torch.zeros((B, N, C), dtype=cls.dtype, device=cls.device)
    split, per = split_plan(L, _split_for(B, N, C, L, features.device))
    if split > 1:
        part = _alloc((split, B, N, C), torch.float32, features.device)
        bmm(g, features, part, k_per_split=per)
        d_cls = part.sum(0).to(cls.dtype)  # fixed-order reduction: bitwise reproducible
    else:
        d_cls = _alloc((B, N, C), cls.dtype, cls.device)
        bmm(g, features, d_cls)
    return d_feat, d_cls
