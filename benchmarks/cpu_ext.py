"""CPU backend (senformer._C) vs the eager reference on the issue's shapes: B=2, N=150 classes,
learner maps at 128/64/32/16, target 512x512.

Each (op, backend) runs in its own subprocess so that its peak extra memory is clean: we report
VmHWM (peak resident set) minus the resident set measured right after the inputs were built.
Times are medians of ``--repeats`` runs after one warm-up (the warm-up is the run whose peak
memory counts, so the numbers include first-touch allocations).

    OMP_NUM_THREADS=2 python benchmarks/cpu_ext.py [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = dict(B=2, N=150, H=512, W=512, maps=(128, 64, 32, 16))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(op: str, backend: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from senformer.ops import reference

    if backend == "cpu":
        import senformer._C  # noqa: F401
    g = torch.Generator().manual_seed(0)
    B, N, H, W = SHAPES["B"], SHAPES["N"], SHAPES["H"], SHAPES["W"]
    logits = [torch.randn(B, N, s, s, generator=g) for s in SHAPES["maps"]]
    target = torch.randint(0, N, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < 0.1] = 255

    if op == "ce":
        def run():
            xs = [x.clone().requires_grad_(True) for x in logits]
            if backend == "cpu":
                le, ll = torch.ops.senformer.ensemble_cross_entropy(xs, target, 255, False, 1e-15)
            else:
                le, ll = reference.ensemble_cross_entropy(xs, target, 255, False)
            (le + ll).backward()
            return le.item()
    else:
        def run():
            with torch.no_grad():
                if backend == "cpu":
                    out = torch.ops.senformer.ensemble_predict(logits, H, W, "mean", False)
                else:
                    out = reference.ensemble_predict(logits, (H, W), "mean", False)
            return int(out[0, 0, 0])

    base = _status_kb("VmRSS")
    run()  # warm-up; its peak is the one reported
    peak_mb = (_status_kb("VmHWM") - base) / 1024
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"op": op, "backend": backend, "median_s": statistics.median(times), "times_s": times,
            "peak_extra_mb": peak_mb, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", nargs=2, metavar=("OP", "BACKEND"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.repeats)))
        return
    results = {}
    for op in ("ce", "predict"):
        for backend in ("reference", "cpu"):
            out = subprocess.run([sys.executable, __file__, "--worker", op, backend, "--repeats", str(a.repeats)],
                                 capture_output=True, text=True, check=True)
            results[(op, backend)] = json.loads(out.stdout.strip().splitlines()[-1])
    names = {"ce": "ensemble CE fwd+bwd", "predict": "ensemble predict"}
    print(f"B={SHAPES['B']} N={SHAPES['N']} target {SHAPES['H']}x{SHAPES['W']} maps {SHAPES['maps']}, "
          f"threads={results[('ce', 'cpu')]['threads']}")
    print(f"{'op':22s} {'reference s':>12s} {'cpu s':>8s} {'speed-up':>9s} {'ref +MB':>8s} {'cpu +MB':>8s} {'mem ratio':>9s}")
    for op in ("ce", "predict"):
        r, c = results[(op, "reference")], results[(op, "cpu")]
        print(f"{names[op]:22s} {r['median_s']:12.3f} {c['median_s']:8.3f} {r['median_s'] / c['median_s']:8.1f}x "
              f"{r['peak_extra_mb']:8.0f} {c['peak_extra_mb']:8.0f} "
              f"{c['peak_extra_mb'] / max(r['peak_extra_mb'], 1e-9):9.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([v for v in results.values()], f, indent=1)


if __name__ == "__main__":
    main()
