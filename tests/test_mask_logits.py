"""Triton mask_logits vs the float64 reference, run through TRITON_INTERPRET on CPU."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest
import torch

import senformer.ops as ops
from senformer.ops import reference
from senformer.ops._dispatch import resolve

pytest.importorskip("triton")
from senformer.kernels import mask_logits as kern  # noqa: E402

from triton_support import DEVICE, ON_INTERPRETER, rel, require_triton  # noqa: E402

require_triton()
on_interpreter = ON_INTERPRETER


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "NaN/inf in the Triton result (an element was not written?)"
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def poison(monkeypatch):
    """Outputs and scratch start as NaN, so an element the kernels forget to write fails the test."""
    monkeypatch.setattr(kern, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def make(B, N, h, w, C, dtype=torch.float32, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):  # drawn on the CPU for reproducibility, views taken after the move
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    L = h * w
    if not strided:
        return rand(B, L, C), rand(B, N, C)
    # features as a channels-first map viewed as tokens; cls with a gap between channels
    return rand(B, C, L).transpose(1, 2), rand(B, N, 2 * C)[..., ::2]


def run(feat, cls, hw, grad_seed=1):
    fg, cg = feat.clone().requires_grad_(), cls.clone().requires_grad_()
    with ops.use_backend("triton"):
        out = ops.mask_logits(fg, cg, hw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    out.backward(g)
    return out, fg.grad, cg.grad, g


def ref64(feat, cls, hw, g):
    f64, c64 = feat.double().requires_grad_(), cls.double().requires_grad_()
    out = reference.mask_logits(f64, c64, hw)
    out.backward(g.double())
    return out.detach(), f64.grad, c64.grad


@pytest.mark.parametrize("B,N,h,w,C", [
    (1, 1, 1, 1, 16),
    (2, 19, 5, 7, 32),     # odd h, w
    (1, 33, 10, 25, 48),   # L = 250, two dCls splits; C not a power of two
    (2, 5, 9, 9, 64),
])
@pytest.mark.parametrize("strided", [False, True])
def test_fp32_forward_backward(B, N, h, w, C, strided, poison):
    feat, cls = make(B, N, h, w, C, strided=strided, seed=N + C)
    out, d_feat, d_cls, g = run(feat, cls, (h, w))
    assert out.shape == (B, N, h, w) and out.is_contiguous()
    for name, got, want in zip(("out", "dfeatures", "dcls"), (out, d_feat, d_cls), ref64(feat, cls, (h, w), g)):
        assert rel(got, want) < 1e-4, (name, rel(got, want))


def test_noncontiguous_output_grad(poison):
    feat, cls = make(1, 7, 6, 5, 32, seed=2)
    out = kern.forward(feat, cls, 6, 5)
    g = torch.randn(1, 7, 5, 6, device=DEVICE).transpose(2, 3)  # (1,7,6,5) with swapped h/w strides
    d_feat, d_cls = kern.backward(g, feat, cls)
    want = ref64(feat, cls, (6, 5), g)
    assert rel(out, want[0]) < 1e-4
    assert rel(d_feat, want[1]) < 1e-4
    assert rel(d_cls, want[2]) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, poison):
    feat, cls = make(2, 19, 7, 9, 32, dtype=dtype, strided=True, seed=7)
    out, d_feat, d_cls, g = run(feat, cls, (7, 9))
    want = ref64(feat, cls, (7, 9), g)
    # the same products in the input dtype (fp32 accumulation, one rounding of the result)
    same = (reference.mask_logits(feat, cls, (7, 9)),
            (g.reshape(2, 19, -1).transpose(1, 2).float() @ cls.float()).to(dtype),
            (g.reshape(2, 19, -1).float() @ feat.float()).to(dtype))
    # The interpreter rounds fp32 -> bf16 by truncation (GPUs round to nearest): twice the storage error.
    factor = 3.0 if (dtype == torch.bfloat16 and on_interpreter) else 2.0
    for name, got, s, w in zip(("out", "dfeatures", "dcls"), (out, d_feat, d_cls), same, want):
        assert got.dtype == dtype, name
        err, base = rel(got, w), rel(s, w)
        assert err < 1e-2, (name, err)
        assert err <= factor * base + 1e-4, (name, err, base)


@pytest.mark.parametrize("B,N,h,w,C", [(1, 0, 3, 4, 16), (1, 3, 0, 4, 16), (2, 3, 2, 2, 0)])
def test_empty_sizes(B, N, h, w, C):
    feat, cls = make(B, N, h, w, C)
    out, d_feat, d_cls, g = run(feat, cls, (h, w))
    want = ref64(feat, cls, (h, w), g)
    for got, ref in zip((out, d_feat, d_cls), want):
        assert got.shape == ref.shape and torch.equal(got.double(), ref)


def test_auto_backend_on_cpu_stays_off_triton():
    feat = torch.randn(1, 4, 16)  # CPU whatever DEVICE is
    assert resolve("mask_logits", feat, has_triton=True) != "triton"
    with ops.use_backend("triton"):
        assert resolve("mask_logits", feat, has_triton=True) == "triton"


def test_custom_op_registration():
    feat, cls = make(1, 3, 4, 5, 16, seed=3)
    feat.requires_grad_()
    torch.library.opcheck(torch.ops.senformer_triton.mask_logits.default, (feat, cls, 4, 5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_bad_hw_is_reported():
    feat, cls = make(1, 2, 3, 4, 16)
    with ops.use_backend("triton"), pytest.raises(ValueError, match="hw=5x3"):
        ops.mask_logits(feat, cls, (5, 3))
