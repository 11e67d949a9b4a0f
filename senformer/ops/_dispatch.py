"""Backend resolution for senformer.ops.

Order of precedence: the innermost ``use_backend`` context, then ``SENFORMER_BACKEND``, then an
automatic choice by device (CUDA -> triton, else the compiled ``cuda`` op, else reference;
CPU -> the compiled ``cpu`` op, else reference). A requested backend that cannot run the call
(not built, wrong device, unsupported dtype) falls back to ``reference`` with one warning per
(op, backend, reason), so a user's script never dies because a kernel is missing -- unless the
request is strict (``use_backend(name, strict=True)`` or ``SENFORMER_STRICT_BACKEND=1``, which the
test suite sets): then it raises ``BackendUnavailable``, so a test of a fast backend can never
silently pass on the reference.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings

import torch

BACKENDS = ("reference", "triton", "cpu", "cuda")
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_state = threading.local()
_warned: set = set()


def _stack() -> list:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


class BackendUnavailable(RuntimeError):
    """A strictly requested backend cannot run the call."""


@contextlib.contextmanager
def use_backend(name: str | None, strict: bool = False):
    """Force a backend (``reference``, ``triton``, ``cpu``, ``cuda``) inside the block; ``None`` = automatic.
    ``strict=True``: a call that backend cannot run raises ``BackendUnavailable`` instead of falling
    back to the reference with a warning."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown senformer backend {name!r}; choose one of {BACKENDS}")
    _stack().append((name, strict))
    try:
        yield
    finally:
        _stack().pop()


def _strict_requested() -> bool:
    innermost = next((strict for name, strict in reversed(_stack()) if name is not None), False)
    return innermost or os.environ.get("SENFORMER_STRICT_BACKEND", "0") == "1"


def requested_backend() -> str | None:
    for name, _ in reversed(_stack()):
        if name is not None:
            return name
    env = os.environ.get("SENFORMER_BACKEND", "").strip().lower()
    if env and env != "auto":
        if env not in BACKENDS:
            raise ValueError(f"SENFORMER_BACKEND={env!r} is not one of {BACKENDS} (or 'auto')")
        return env
    return None


def _probe_extension() -> bool:
    try:
        import senformer._C  # noqa: F401  (registers torch.ops.senformer.*)
    except ImportError:
        return False
    return True


# Probed once at import, not behind functools caches: resolve() runs inside torch.compile'd code,
# where Dynamo warns on lru_cache'd calls.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
_EXTENSION_LOADED = _probe_extension()


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def extension_loaded() -> bool:
    """True when the compiled ``senformer._C`` is importable (it registers ``torch.ops.senformer.*``)."""
    return _EXTENSION_LOADED


def extension_cpu_isa() -> str | None:
    """Which clone of senformer._C's hot CPU loops this machine runs ("x86-64-v4" = AVX-512,
    "x86-64-v3" = AVX2+FMA, "default", or "single build" without clones); None without the extension.
    GCC's load-time resolver picks it, so this is what the CPU kernels actually execute."""
    if not _EXTENSION_LOADED:
        return None
    return torch.ops.senformer.cpu_isa()


# The compiled op each public op needs: the ensemble ops' autograd chains are in Python and call
# only their full-resolution steps from senformer._C.
_EXTENSION_OP = {"ensemble_cross_entropy": "upsampled_ce", "ensemble_predict": "upsampled_argmax"}


def _probe_kernels() -> frozenset:
    """(op, dispatch key) of every senformer._C kernel, read once: resolve() runs inside
    torch.compile'd code, where Dynamo cannot trace the dispatcher query."""
    if not _EXTENSION_LOADED:
        return frozenset()
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("senformer::")]
    return frozenset((n, key) for n in names for key in ("CPU", "CUDA")
                     if torch._C._dispatch_has_kernel_for_dispatch_key(f"senformer::{n}", key))


_EXTENSION_KERNELS = _probe_kernels()


def extension_has(op: str, device_type: str = "cpu") -> bool:
    """True when senformer._C registered ``op`` (a public op's name stands for the compiled step it
    needs) with a kernel for ``device_type`` (a CPU-only build has the op but no CUDA kernel)."""
    return (_EXTENSION_OP.get(op, op), device_type.upper()) in _EXTENSION_KERNELS


def _why_not(backend: str, op: str, t: torch.Tensor, has_triton: bool) -> str | None:
    """Reason ``backend`` cannot run ``op`` on tensor ``t``, or None when it can."""
    if backend == "reference":
        return None
    if t.dtype not in FAST_DTYPES:
        return f"dtype {t.dtype} (fast kernels take float32/bfloat16/float16)"
    if backend == "triton":
        if not has_triton:
            return "no Triton kernel for this op"
        if not triton_importable():
            return "triton is not installed"
        if t.device.type != "cuda" and not triton_interpret():
            return f"tensor on {t.device.type} (Triton needs CUDA, or TRITON_INTERPRET=1)"
        return None
    if t.device.type != backend:
        return f"tensor on {t.device.type}, backend {backend!r} runs on {backend} tensors"
    if backend == "cuda" and op == "ensemble_cross_entropy" and torch.are_deterministic_algorithms_enabled():
        return "deterministic algorithms requested; its CUDA gradient scatter uses atomics"
    if not extension_has(op, backend):
        return f"senformer._C was not built with a {backend} kernel for this op (see README: install)"
    return None


def resolve(op: str, t: torch.Tensor, has_triton: bool = False, slower_here: tuple = ()) -> str:
    """Pick the backend for one call of ``op`` whose leading tensor is ``t``. ``slower_here``: backends
    measured slower than the reference at this call's sizes -- the automatic choice skips them (an
    explicit request still gets them)."""
    want = requested_backend()
    if want is not None:
        why = _why_not(want, op, t, has_triton)
        if why is None:
            return want
        if _strict_requested():
            raise BackendUnavailable(f"senformer.ops.{op}: backend {want!r} cannot run this call ({why})")
        key = (op, want, why)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"senformer.ops.{op}: backend {want!r} unavailable ({why}); using 'reference'",
                          stacklevel=3)
        return "reference"
    if t.device.type == "cuda":
        order = ("triton", "cuda")
    elif t.device.type == "cpu":
        order = ("cpu",)
    else:
        order = ()
    for b in order:
        if b not in slower_here and _why_not(b, op, t, has_triton) is None:
            return b
    return "reference"


def deterministic_requested(flag: bool | None) -> bool:
    return bool(flag) if flag is not None else torch.are_deterministic_algorithms_enabled()
