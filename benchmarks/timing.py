"""Timers and peak-memory probes shared by every benchmark section.

Time: on CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed between reps) when Triton is
importable, else CUDA events around each call; on CPU, ``time.perf_counter`` around each call.
Every timing returns the median and the 20/80 quantiles in milliseconds.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` minus what was allocated before the call
(what mmsegmentation reports). On CPU there is no allocator counter, so the call runs once under
``torch.profiler`` with ``profile_memory=True`` and the peak is the running sum of its allocation
and free events: bytes the call asked torch for beyond what existed before it, the same quantity
as the CUDA figure (the inputs are not counted; allocator slack and non-torch memory are not seen).
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(samples_ms: list[float]) -> dict:
    """Median and 20/80 quantiles (ms) of a list of per-call times."""
    s = sorted(samples_ms)
    if len(s) == 1:
        return {"median_ms": s[0], "p20_ms": s[0], "p80_ms": s[0], "min_ms": s[0], "reps": 1}
    q = statistics.quantiles(s, n=10, method="inclusive")  # deciles: q[1] = 20%, q[7] = 80%
    return {"median_ms": statistics.median(s), "p20_ms": q[1], "p80_ms": q[7], "min_ms": s[0], "reps": len(s)}


def time_fn(fn: Callable[[], object], device, warmup: int = 2, reps: int = 10,
            budget_s: float = 5.0, cuda_events: bool = False) -> dict:
    """Median and 20/80 quantiles of ``fn()``'s wall time in ms.

    ``reps`` bounds the sample count on CPU; ``budget_s`` stops early on a slow case so one
    big shape cannot eat a whole ``--quick`` run (at least 3 samples are taken when possible).
    ``cuda_events`` times each call with CUDA events instead of ``do_bench``: for calls of
    hundreds of ms (a training step), where do_bench's time budget would leave one sample."""
    device = torch.device(device)
    if device.type == "cuda":
        return _time_cuda(fn, device, warmup, reps, cuda_events)
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < reps:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > budget_s and len(samples) >= 3:
            break
    return quantiles(samples)


def _time_cuda(fn, device, warmup, reps, cuda_events) -> dict:
    try:
        import triton.testing
    except ImportError:
        cuda_events = True
    if not cuda_events:
        # do_bench picks its own rep count from a time budget (ms) and flushes L2 between calls.
        med, p20, p80, low = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8, 0.0])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "min_ms": low, "reps": None}
    for _ in range(max(warmup, 3)):
        fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b))
    return quantiles(samples)


def peak_memory(fn: Callable[[], object], device) -> int | None:
    """Bytes allocated by ``fn()`` at its peak beyond what was allocated before it (None if unmeasurable)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    return _cpu_peak(fn)


def _cpu_peak(fn) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    # The profiler prints a harmless CUDA probe error on CPU-only hosts; keep the report clean.
    with _quiet_fd(2):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    try:
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:
        return None
    events = []
    stack = list(tree)
    while stack:
        node = stack.pop()
        size = getattr(node.extra_fields, "alloc_size", None)
        if size is not None:
            events.append((node.start_time_ns, size))
        stack.extend(node.children)
    events.sort()
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return int(peak)


@contextlib.contextmanager
def _quiet_fd(fd: int):
    """Silence a C-level file descriptor (the profiler's native logging) for the block."""
    try:
        saved = os.dup(fd)
    except OSError:
        yield
        return
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def mib(nbytes) -> float | None:
    return None if nbytes is None else nbytes / 2**20


__all__ = ["quantiles", "time_fn", "peak_memory", "mib"]
