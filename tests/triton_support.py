"""Shared pieces of the Triton tests: where the kernels run, the error measure, allocation recording."""
import os


import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

from support import rel  # noqa: F401  (re-exported for the Triton tests)

ON_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if ON_INTERPRETER else "cuda"


def require_triton():
    """Skip the calling test module unless Triton can run here (CUDA, or the CPU interpreter)."""
    pytest.importorskip("triton")
    if not ON_INTERPRETER and not torch.cuda.is_available():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)


class AllocationRecorder(TorchDispatchMode):
    """Records (numel, bytes) of every tensor any op returns, stepping inside senformer's Python
    custom ops (namespaces senformer_triton and senformer_fused) (whose implementations the dispatcher would otherwise run with this mode switched off).
    Bytes matter because the Triton interpreter copies kernel arguments through uint8 views."""

    def __init__(self):
        super().__init__()
        self.numels = []
        self.nbytes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in ("senformer_triton", "senformer_fused"):
            with self:
                out = OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor):
                self.numels.append(o.numel())
                self.nbytes.append(o.numel() * o.element_size())
        return out


def check_cpu_tensor_dispatch(op, t):
    """Automatic dispatch keeps a CPU tensor off Triton; forcing Triton works on the interpreter and,
    on a GPU machine, raises (strict) instead of silently running something else."""
    import senformer.ops as ops
    from senformer.ops._dispatch import resolve

    assert resolve(op, t, has_triton=True) != "triton"
    if ON_INTERPRETER:
        with ops.use_backend("triton"):
            assert resolve(op, t, has_triton=True) == "triton"
    else:
        with ops.use_backend("triton"), pytest.raises(ops.BackendUnavailable, match="Triton needs CUDA"):
            resolve(op, t, has_triton=True)


def spy_launches(monkeypatch, module, *names) -> list:
    """Wrap the Triton kernels ``names`` of ``module``; the returned list gets a kernel's name per launch."""
    launched = []

    class _Spy:
        def __init__(self, name):
            self.name, self.fn = name, getattr(module, name)

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.fn[grid]

    for name in names:
        monkeypatch.setattr(module, name, _Spy(name))
    return launched
