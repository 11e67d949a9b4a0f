"""CPU backend (senformer._C) vs the eager reference on the issue's shapes: B=2, N=150 classes,
learner maps at 128/64/32/16, target 512x512, through the public ops (``senformer.ops``) under
``use_backend("cpu", strict=True)`` resp. ``use_backend("reference")``.

Each (op, backend) runs in its own subprocesses so that its peak extra memory is clean: we report
VmHWM (peak resident set, reset before each call) minus the resident set just before the call: the
largest over the calls after one warm-up (the warm-up's peak, which includes one-time lazy imports,
is kept in the JSON as ``first_call_peak_extra_mb``). Memory is measured in a second subprocess
with a fixed malloc mmap threshold (``MEMORY_ENV``): glibc otherwise raises the threshold as large
blocks are freed and then keeps later ones in its heap, so the resident set before a call holds a
varying share of the previous call's memory, and one path's "extra" read anywhere from 8 to 281 MB
over four calls. The fixed threshold returns every large block to the system when freed (the same
peak, call after call) but makes each allocation fault its pages in again, so times come from the
first subprocess, under the default malloc users get. Times are medians. Roofline: the bytes that must
move (``bench_ops._cost``: maps and int64 target read once, the maps' gradients written once, the
label map written) over the copy bandwidth measured in this run (the ops do no matmul), and each
backend's % of that ideal time.

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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # run from a checkout without `pip install -e .`

SHAPES = dict(B=2, N=150, H=512, W=512, maps=(128, 64, 32, 16))
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # blocks >= 128 KiB: mmap'd, unmapped when freed
OPS = {"ce": ("ensemble_cross_entropy", "fwd+bwd"), "predict": ("ensemble_predict", "fwd")}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_env() -> dict:
    """Where and when: CPU model, cores, versions, commit, the command, the host's load."""
    import platform
    import torch

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        commit = None
    return {"device": model, "cores": os.cpu_count(), "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""), "python"] + sys.argv),
            "load_average_before": os.getloadavg()[0]}


def worker(op: str, backend: str, repeats: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    import senformer.ops as sops

    # strict: a CPU kernel that cannot run must fail here, not time the reference under its name
    backend_ctx = (lambda: sops.use_backend("cpu", strict=True)) if backend == "cpu" else \
        (lambda: sops.use_backend("reference"))
    g = torch.Generator().manual_seed(0)
    B, N, H, W = SHAPES["B"], SHAPES["N"], SHAPES["H"], SHAPES["W"]
    logits = [torch.randn(B, N, s, s, generator=g) for s in SHAPES["maps"]]
    target = torch.randint(0, N, (B, H, W), generator=g)
    target[torch.rand(B, H, W, generator=g) < 0.1] = 255

    if op == "ce":
        def run():
            xs = [x.clone().requires_grad_(True) for x in logits]
            with backend_ctx():
                le, ll = sops.ensemble_cross_entropy(xs, target, 255, False)
                (le + ll).backward()
            return le.item()
    else:
        def run():
            with torch.no_grad(), backend_ctx():
                out = sops.ensemble_predict(logits, (H, W), "mean", False)
            return int(out[0, 0, 0])

    base = _status_kb("VmRSS")
    run()  # warm-up: also pays one-time costs (lazy imports, the custom ops' first dispatch)
    first_mb = (_status_kb("VmHWM") - base) / 1024
    times, peaks = [], []
    for _ in range(repeats):
        # Writing 5 to clear_refs resets VmHWM: each timed call's own peak, not the warm-up's imports.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        peaks.append((_status_kb("VmHWM") - base) / 1024)
    return {"op": op, "backend": backend, "median_s": statistics.median(times), "times_s": times,
            "peak_extra_mb": max(peaks), "peaks_mb": peaks, "first_call_peak_extra_mb": first_mb,
            "threads": torch.get_num_threads(), "cpu_isa": sops.extension_cpu_isa()}


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
    for op in OPS:
        for backend in ("reference", "cpu"):
            timed = _run_worker(op, backend, a.repeats, {})
            mem = _run_worker(op, backend, 2, MEMORY_ENV)
            results[(op, backend)] = {**timed, "peak_extra_mb": mem["peak_extra_mb"], "peaks_mb": mem["peaks_mb"],
                                      "peaks_mb_default_malloc": timed["peaks_mb"], "memory_env": MEMORY_ENV}
    # after the workers, so that none of them shares the machine with this measurement
    ceil = measure_ceilings()
    for (op, _), r in results.items():
        r.update(roofline(op, r["median_s"], ceil))
    names = {"ce": "ensemble CE fwd+bwd", "predict": "ensemble predict"}
    print(f"B={SHAPES['B']} N={SHAPES['N']} target {SHAPES['H']}x{SHAPES['W']} maps {SHAPES['maps']}, "
          f"threads={results[('ce', 'cpu')]['threads']}, CPU clone {results[('ce', 'cpu')]['cpu_isa']}, "
          f"copy {ceil['copy']['gbps']:.1f} GB/s, "
          f"fp32 matmul {ceil['matmul']['tflops']:.3f} TFLOP/s")
    print(f"{'op':22s} {'reference s':>12s} {'cpu s':>8s} {'speed-up':>9s} {'ref +MB':>8s} {'cpu +MB':>8s} {'mem ratio':>9s} "
          f"{'MB moved':>9s} {'ideal s':>8s} {'bound':>7s} {'ref % lim':>9s} {'cpu % lim':>9s}")
    for op in OPS:
        r, c = results[(op, "reference")], results[(op, "cpu")]
        print(f"{names[op]:22s} {r['median_s']:12.3f} {c['median_s']:8.3f} {r['median_s'] / c['median_s']:8.1f}x "
              f"{r['peak_extra_mb']:8.0f} {c['peak_extra_mb']:8.0f} "
              f"{c['peak_extra_mb'] / max(r['peak_extra_mb'], 1e-9):9.3f} {c['bytes'] / 1e6:9.1f} "
              f"{c['ideal_ms'] / 1e3:8.4f} {c['bound']:>7s} {r['pct_of_limit']:8.2f}% {c['pct_of_limit']:8.2f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**run_env(), "shapes": SHAPES, "ceilings": ceil, "results": list(results.values())}, f,
                      indent=1)


def _run_worker(op: str, backend: str, repeats: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", op, backend, "--repeats", str(repeats)],
                         capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode != 0:  # e.g. BackendUnavailable: senformer._C built without this kernel
        sys.exit(f"cpu_ext: worker {op} {backend} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_ceilings() -> dict:
    """Copy bandwidth and fp32 matmul rate of this CPU with the workers' thread count."""
    import torch

    import ceilings as probe
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    return probe.measure("cpu", torch.float32, quick=False)


def roofline(op: str, median_s: float, ceil: dict) -> dict:
    """The bench_ops roofline fields for one worker's result (same cost model, same formula)."""
    import torch

    import bench_ops
    from ceilings import roofline as fields
    name, mode = OPS[op]
    return fields(*bench_ops._cost(name, SHAPES, torch.float32, mode), ceil, median_s * 1e3)


if __name__ == "__main__":
    main()
