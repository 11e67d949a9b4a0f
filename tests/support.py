"""Helpers shared by the tests of every fast backend: the error measure and input makers."""
import zlib

import torch


def rel(a, b):
    """||a - b|| / ||b|| in float64; a non-finite ``a`` fails (an element was not written?)."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "NaN/inf in the fast path's result (an element was not written?)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def strided(x):
    """Same values as x, stored every other element along the last dim (a non-contiguous view)."""
    big = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])
    big[..., ::2] = x
    return big[..., ::2]


def stable_seed(*parts) -> int:
    """A generator seed from test parameters, the same in every process (``hash`` of a str is salted
    per process, so a seed taken from it draws different data on every run)."""
    return zlib.crc32(repr(parts).encode())


def random_maps(B, N, sizes, dtype=torch.float32, contiguous=True, gen=None, device=None):
    """Learner maps (B,N,h,w) for each (h, w) in ``sizes`` on ``device`` (default DEVICE), drawn on
    the CPU for reproducibility; non-contiguous ones are channels-last storage plus a stride-2
    slice taken after the move, so neither contiguous nor dense."""
    device = DEVICE if device is None else device
    out = []
    for h, w in sizes:
        if contiguous:
            x = (torch.randn(B, N, h, w, generator=gen) * 2.0).to(device, dtype)
        else:
            x = (torch.randn(B, h, 2 * w, N, generator=gen) * 2.0).to(device, dtype).permute(0, 3, 1, 2)[..., ::2]
            assert not x.is_contiguous()
        out.append(x)
    return out


# ---------------------------------------------------------------------------------------------
# Where tests run, and which backends they run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fast_backends(op):
    """pytest params of every fast backend that should run ``op`` on DEVICE: triton (CUDA, or the
    interpreter on a CPU machine) and senformer._C's kernel for DEVICE. A backend that is missing
    shows as a skip with its reason, never as a pass; tests force it strictly
    (SENFORMER_STRICT_BACKEND=1 in conftest), so a backend that cannot take the tensors fails."""
    import importlib.util

    import pytest

    from senformer.ops import _dispatch

    params = [pytest.param("triton", marks=() if importlib.util.find_spec("triton") else
                           pytest.mark.skip(reason="triton is not installed"))]
    if not _dispatch.extension_has(op, DEVICE):
        why = ("senformer._C is not built" if not _dispatch.extension_loaded()
               else f"senformer._C has no {DEVICE} kernel for {op}")
        params.append(pytest.param(DEVICE, marks=pytest.mark.skip(reason=why)))
    else:
        params.append(pytest.param(DEVICE))
    return params


def poison_cuda_cache():
    """Leave NaN-filled blocks in torch's CUDA caching allocator, so the next allocations of a
    kernel that does not come from our allocation hooks (senformer._C, cuBLAS) start as NaN: an
    output element it forgets to write then fails the test. A no-op without CUDA."""
    if not torch.cuda.is_available():
        return
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in
              [2 ** k for k in range(8, 27)] for _ in range(2)]
    torch.cuda.synchronize()
    del blocks


def recorded_ops(fn):
    """The names (overload packets, e.g. ``aten.zeros``) of every op dispatched while ``fn()`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        fn()
    return rec.ops
