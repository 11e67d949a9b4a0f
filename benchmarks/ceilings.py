"""Ceilings measured in the same run as the kernels: device copy bandwidth and a large matmul's rate.

A kernel's achieved GB/s and TFLOP/s mean little alone; beside these two numbers they say how
far it is from what this device, in this state (a shared CPU is slower than an idle one), can do at
all. A ceiling is a best case, so it is taken from the fastest repetition, not the median.
``roofline`` turns a call's bytes and FLOPs into the ideal time on these two ceilings.
"""
from __future__ import annotations

import torch

from timing import time_fn


def copy_bandwidth(device, quick: bool) -> dict:
    """GB/s of ``dst.copy_(src)``: read + write of a buffer much larger than the last-level cache."""
    device = torch.device(device)
    nbytes = (64 if quick else 256) * 2**20 if device.type == "cpu" else 2 * 2**30
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=10 if quick else 20, budget_s=3.0)
    moved = 2 * nbytes
    return {"bytes": moved, **t, "gbps": moved / (t["min_ms"] * 1e-3) / 1e9}


def matmul_rate(device, dtype: torch.dtype, quick: bool) -> dict:
    """TFLOP/s of a square matmul in ``dtype`` (fp32 with TF32 as torch is configured)."""
    device = torch.device(device)
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, warmup=1, reps=5 if quick else 10, budget_s=3.0)
    flops = 2 * n**3
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), **t,
            "tflops": flops / (t["min_ms"] * 1e-3) / 1e12,
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else None}


def measure(device, dtype: torch.dtype, quick: bool) -> dict:
    return {"copy": copy_bandwidth(device, quick), "matmul": matmul_rate(device, dtype, quick)}


def roofline(nbytes: float, flops: float, ceil: dict, median_ms: float | None = None) -> dict:
    """The roofline fields of one benchmark row: ``bytes`` and ``flops`` as given, ``ideal_ms`` =
    max(bytes / copy bandwidth, flops / matmul rate) on ``ceil`` (one dtype's ``measure``), ``bound``
    (the larger term: "memory" or "compute") and, for a timed row, ``pct_of_limit`` = 100 * ideal /
    measured: how close the call runs to what this device could do at best (100 = at the limit)."""
    mem_ms = nbytes / (ceil["copy"]["gbps"] * 1e9) * 1e3
    mm_ms = flops / (ceil["matmul"]["tflops"] * 1e12) * 1e3
    out = {"bytes": nbytes, "flops": flops, "ideal_ms": max(mem_ms, mm_ms),
           "bound": "compute" if mm_ms > mem_ms else "memory"}
    if median_ms:
        out["pct_of_limit"] = 100 * out["ideal_ms"] / median_ms
    return out
