"""Build configuration of the compiled extension ``senformer._C`` (called by setup.py).

Kept apart from setup.py so the flag logic (CUDA on/off, arch list, job count) is readable and
testable without running a build.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "7.0;8.0;9.0"  # V100 / A100 / H100
# -fno-trapping-math: without it GCC keeps the exp loops of the CPU kernels scalar (3x slower);
# nothing here relies on floating-point exceptions. The sources are C++17: torch <= 2.11 builds with -std=c++17.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def detect_cuda_home():
    """$CUDA_HOME / $CUDA_PATH, else /usr/local/cuda or the toolkit above the real ``nvcc``, if it
    holds bin/nvcc and libcudart. torch guesses from the nvcc on PATH, which can be a wrapper (as in
    /usr/local/bin here): linking against that fails (-lcudart not found)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        if os.path.exists(os.path.join(c, "bin", "nvcc")) and glob.glob(os.path.join(c, "lib*", "libcudart*")):
            return c
    return None


def _warn(msg: str) -> None:
    print(f"senformer: {msg}", file=sys.stderr)


def nvcc_version(cuda_home: str):
    """(major, minor) of the toolkit's nvcc, or None when it cannot be run."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_arch_list(nvcc_ver) -> str:
    """TORCH_CUDA_ARCH_LIST if set, else V100/A100/H100. CUDA >= 13 dropped sm_70 (and older):
    such entries are removed with a warning instead of failing the whole build."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCHS
    entries = [a for a in re.split(r"[;\s,]+", archs) if a]
    if nvcc_ver is not None and nvcc_ver[0] >= 13:
        kept = []
        for a in entries:
            num = re.match(r"(\d+)\.(\d+)", a)
            if num and (int(num.group(1)), int(num.group(2))) < (7, 5):
                _warn(f"CUDA {nvcc_ver[0]}.{nvcc_ver[1]} cannot build sm_{num.group(1)}{num.group(2)}; "
                      f"dropping '{a}' from TORCH_CUDA_ARCH_LIST")
            else:
                kept.append(a)
        if not kept:
            kept = ["7.5"]
            _warn("no buildable CUDA arch left; using 7.5")
        entries = kept
    return ";".join(entries)


def max_jobs() -> str:
    """One ninja job per core, but at most one per ~3 GB of RAM (nvcc on torch headers is hungry)."""
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8.0
    return str(max(1, min(cores, int(mem_gb // 3))))


def make_extensions(ce, cpu_sources, cuda_home):
    """[CppExtension | CUDAExtension] named ``senformer._C`` for torch.utils.cpp_extension ``ce``."""
    os.environ.setdefault("MAX_JOBS", max_jobs())
    cpu_sources = [os.path.relpath(s) if os.path.isabs(s) else s for s in cpu_sources]
    include_dirs = [HERE]
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    why_not, ver = _why_no_cuda(cuda_home, cuda_sources)
    if why_not is None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(ver)
        _warn(f"building CUDA kernels with {cuda_home} (nvcc {ver}) for TORCH_CUDA_ARCH_LIST="
              f"{os.environ['TORCH_CUDA_ARCH_LIST']}")
        return [ce.CUDAExtension(
            "senformer._C", cpu_sources + cuda_sources, include_dirs=include_dirs,
            define_macros=[("SENFORMER_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"])]
    if why_not:
        _warn(f"{why_not}; building the CPU kernels only")
    return [ce.CppExtension("senformer._C", cpu_sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])]


def _why_no_cuda(cuda_home, cuda_sources):
    """(reason, nvcc version): reason is None when the CUDA kernels can be built, else why not ('' when
    there is nothing to build)."""
    if not cuda_sources:
        return "", None
    if os.environ.get("SENFORMER_SKIP_CUDA_BUILD", "0") == "1":
        return "SENFORMER_SKIP_CUDA_BUILD=1", None
    if not cuda_home:
        return "no CUDA toolkit found (set CUDA_HOME)", None
    torch_cuda = _torch_cuda_version()
    if torch_cuda is None:
        return "this torch is a CPU-only build", None
    ver = nvcc_version(cuda_home)
    if ver is not None and ver[0] != torch_cuda[0]:
        # torch's extension builder refuses a toolkit of another major version than torch's own
        return (f"nvcc {ver[0]}.{ver[1]} in {cuda_home} does not match torch's CUDA {torch_cuda[0]}.{torch_cuda[1]} "
                f"(point CUDA_HOME at a CUDA {torch_cuda[0]}.x toolkit for the CUDA kernels)"), ver
    return None, ver


def _torch_cuda_version():
    """(major, minor) of the CUDA torch was built with, or None for a CPU-only torch."""
    import torch

    m = re.match(r"(\d+)\.(\d+)", torch.version.cuda or "")
    return (int(m.group(1)), int(m.group(2))) if m else None
