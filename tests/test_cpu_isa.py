"""senformer._C's CPU clones (SENF_TARGET_CLONES: AVX-512, AVX2+FMA, baseline): the clone the load-time
resolver picks is the one the CPU's flags call for, and every clone -- not only the one this machine
picks -- passes the CPU kernels' float64 comparisons. The other clones run under qemu-user's emulated
CPUs (``apt install qemu-user``): slow (~20 min on 2 cores), so that part only runs with -m slow."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from senformer.ops import extension_cpu_isa, extension_loaded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLONES = ("x86-64-v4", "x86-64-v3", "default", "single build")
# The x86-64 micro-architecture levels' CPUID flags (as /proc/cpuinfo spells them), from the psABI.
V3_FLAGS = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
V4_FLAGS = V3_FLAGS | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# qemu CPU model -> the clone its CPUID makes the resolver pick. TCG emulates AVX2 but not AVX-512;
# numpy and torch need SSE4.2/POPCNT (x86-64-v2), hence Nehalem for the baseline clone.
EMULATED = {"max": "x86-64-v3", "Nehalem": "default"}

needs_ext = pytest.mark.skipif(not extension_loaded(), reason="senformer._C is not built (pip install -e .)")


def _cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


@needs_ext
def test_cpu_isa_is_the_clone_the_cpu_flags_call_for():
    isa = extension_cpu_isa()
    assert isa in CLONES
    if isa == "single build" or not os.path.exists("/proc/cpuinfo"):
        pytest.skip(f"no clones to check against CPU flags (cpu_isa={isa!r})")
    flags = _cpu_flags()
    expected = "x86-64-v4" if V4_FLAGS <= flags else "x86-64-v3" if V3_FLAGS <= flags else "default"
    assert isa == expected, f"resolver picked {isa}, flags call for {expected}"


def _under_qemu(cpu: str, args: list, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@needs_ext
@pytest.mark.parametrize("cpu", sorted(EMULATED))
def test_every_clone_matches_float64_under_emulation(cpu):
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("qemu-x86_64 not installed (apt install qemu-user)")
    if extension_cpu_isa() == "single build":
        pytest.skip("senformer._C was built without clones")
    probe = _under_qemu(cpu, ["-c", "import senformer.ops as s; print(s.extension_cpu_isa())"], 600)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split()[-1] == EMULATED[cpu]
    # The CPU backend's tests of both ensemble ops and their steps' float64 comparisons; the
    # paper-sized shapes and the Triton interpreter are left out: minutes each when emulated.
    select = "(cpu or step or float64_labels or float32_through or first_nan) and not paper_shapes"
    run = _under_qemu(cpu, ["-m", "pytest", "-q", "-rs", "-x", "-p", "no:cacheprovider", "-k", select,
                            "tests/test_ensemble_ce.py", "tests/test_ensemble_predict.py"], 1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 50, run.stdout[-3000:]
    assert "not built" not in run.stdout, "the emulated run skipped the extension's tests"
