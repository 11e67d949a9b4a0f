"""CPU class_cross_attention: senformer._C's blocked kernel vs the reference, fwd+bwd, at the paper's
key counts (L = 256 .. 65536; B=2, H=8 heads, N=150 classes, D=64, float32). Decides the automatic
CPU choice (``senformer.ops.class_attention.CPU_MIN_KEYS``): the dispatcher must never pick a path
slower than the reference. Both backends run alternately in one process, so a load change hits both.

    OMP_NUM_THREADS=2 python benchmarks/cpu_attention.py [--lengths 256 1024 ...] [--repeats 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from cpu_ext import run_env
from senformer.ops import class_attention as attn
from senformer.ops._dispatch import use_backend


def step(q, k, v, backend):
    with use_backend(backend, strict=True):
        out = attn.class_cross_attention(q, k, v)
    out.backward(torch.ones_like(out))


def measure(L: int, repeats: int, B=2, H=8, N=150, D=64) -> dict:
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(B, H, n, D, generator=g).requires_grad_(True) for n in (N, L, L))
    times = {"reference": [], "cpu": []}
    for b in times:
        step(q, k, v, b)  # warm-up
    for _ in range(repeats):
        for b in times:
            t0 = time.perf_counter()
            step(q, k, v, b)
            times[b].append(time.perf_counter() - t0)
    med = {b: statistics.median(t) for b, t in times.items()}
    return {"L": L, "B": B, "H": H, "N": N, "D": D, "reference_s": med["reference"], "cpu_s": med["cpu"],
            "speedup": med["reference"] / med["cpu"], "auto": "cpu" if L >= attn.CPU_MIN_KEYS else "reference"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 3072, 4096, 16384, 65536])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"{'L':>6s} {'reference s':>12s} {'cpu s':>8s} {'cpu speed-up':>12s} {'auto choice':>12s}")
    rows = []
    for L in a.lengths:
        r = measure(L, max(1, a.repeats if L <= 16384 else a.repeats // 2))
        rows.append(r)
        print(f"{L:6d} {r['reference_s']:12.4f} {r['cpu_s']:8.4f} {r['speedup']:11.2f}x {r['auto']:>12s}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**run_env(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
