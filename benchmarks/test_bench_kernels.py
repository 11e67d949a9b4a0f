"""pytest-benchmark entries for the kernel set, to compare runs over time:

    pytest benchmarks/test_bench_kernels.py --benchmark-autosave          # store this run
    pytest benchmarks/test_bench_kernels.py --benchmark-compare           # against the last one

Not under tests/, so CI never times it. Shapes: the first (--quick) shape of each op from
``bench_ops.shapes`` on this device. Backends that cannot run here are skipped, and so is the
Triton interpreter on CPU (its timings mean nothing). Each entry's ``extra_info`` carries its
roofline (bytes, FLOPs, ideal ms on ceilings measured once per session, % of that limit), so a
stored run states each kernel's gap; ``test_roofline_of_every_case`` runs without the plugin.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402

import bench_ops  # noqa: E402
import ceilings  # noqa: E402

HAS_BENCHMARK = importlib.util.find_spec("pytest_benchmark") is not None
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = [(op, b, mode) for op in bench_ops.OPS for b in bench_ops.backends_for(op, DEVICE)
         if b != "compile" or DEVICE.type == "cuda"  # compiling on CPU takes minutes per op
         for mode in (("fwd",) if op == "ensemble_predict" else ("fwd", "fwd+bwd"))]


DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


@functools.cache
def _ceilings(dtype) -> dict:
    """Measured once per dtype and session, beside the kernels they judge."""
    return ceilings.measure(DEVICE, dtype, quick=True)


@pytest.mark.parametrize("op,backend,mode", CASES, ids=["-".join(c) for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_roofline_of_every_case(op, backend, mode, dtype):
    """Every case benchmarked below has a cost model: bytes to move, FLOPs (0 for the ops without a
    matmul), and a positive ideal time on any ceilings."""
    nbytes, flops = bench_ops._cost(op, bench_ops.shapes(op, DEVICE, quick=True)[0], dtype, mode)
    fields = ceilings.roofline(nbytes, flops, {"copy": {"gbps": 1.0}, "matmul": {"tflops": 1.0}}, median_ms=1.0)
    assert nbytes > 0 and flops >= 0 and fields["ideal_ms"] > 0 and fields["pct_of_limit"] > 0
    assert fields["bound"] in ("memory", "compute")


@pytest.mark.skipif(not HAS_BENCHMARK, reason="pytest-benchmark is not installed")
@pytest.mark.parametrize("op,backend,mode", CASES, ids=["-".join(c) for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_kernel(benchmark, op, backend, mode, dtype):
    if backend.startswith("triton") and DEVICE.type != "cuda":
        pytest.skip("Triton interpreter on CPU: timings mean nothing")
    shape = bench_ops.shapes(op, DEVICE, quick=True)[0]
    x = bench_ops.make_inputs(op, shape, DEVICE, dtype, grad=mode != "fwd")
    why = bench_ops._why_not(op, backend, x, DEVICE)
    if why:
        pytest.skip(why)
    fn = bench_ops._make_fn(op, backend, x, {})
    step = bench_ops._fwd_bwd(fn, x, {}) if mode != "fwd" else fn
    try:
        step()
    except RuntimeError as e:  # an SDPA backend that refuses this dtype/shape on this GPU
        pytest.skip(f"{backend} cannot run this case: {str(e).splitlines()[0][:120]}")

    def timed():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    benchmark.extra_info.update(shape=bench_ops._label(op, shape), device=str(DEVICE),
                                threads=torch.get_num_threads())
    benchmark(timed)
    if benchmark.stats is None:  # --benchmark-disable: one plain call, nothing timed
        return
    ceil = _ceilings(dtype)
    benchmark.extra_info.update(ceilings.roofline(*bench_ops._cost(op, shape, dtype, mode), ceil,
                                                  benchmark.stats.stats.median * 1e3),
                                copy_gbps=ceil["copy"]["gbps"], matmul_tflops=ceil["matmul"]["tflops"])
