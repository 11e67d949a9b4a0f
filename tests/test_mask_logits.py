"""mask_logits: every fast backend (Triton -- on CUDA, or through TRITON_INTERPRET=1 on a CPU machine --
and senformer._C's kernel for the device) against the float64 reference."""
import pytest
import torch

import senformer.ops as ops
from senformer.ops import reference

pytest.importorskip("triton")
from senformer.kernels import mask_logits as kern  # noqa: E402

from support import fast_backends, poison_cuda_cache  # noqa: E402
from triton_support import DEVICE, ON_INTERPRETER, check_cpu_tensor_dispatch, rel, require_triton  # noqa: E402
from senformer.ops._dispatch import extension_loaded  # noqa: E402

FAST = fast_backends("mask_logits")

require_triton()
on_interpreter = ON_INTERPRETER




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


def run(feat, cls, hw, grad_seed=1, backend="triton"):
    fg, cg = feat.clone().requires_grad_(), cls.clone().requires_grad_()
    with ops.use_backend(backend):
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
@pytest.mark.parametrize("backend", FAST)
def test_fp32_forward_backward(B, N, h, w, C, strided, backend, poison):
    feat, cls = make(B, N, h, w, C, strided=strided, seed=N + C)
    out, d_feat, d_cls, g = run(feat, cls, (h, w), backend=backend)
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
@pytest.mark.parametrize("backend", FAST)
def test_half_precision(dtype, backend, poison):
    feat, cls = make(2, 19, 7, 9, 32, dtype=dtype, strided=True, seed=7)
    out, d_feat, d_cls, g = run(feat, cls, (7, 9), backend=backend)
    want = ref64(feat, cls, (7, 9), g)
    # the same products in the input dtype (fp32 accumulation, one rounding of the result)
    same = (reference.mask_logits(feat, cls, (7, 9)),
            (g.reshape(2, 19, -1).transpose(1, 2).float() @ cls.float()).to(dtype),
            (g.reshape(2, 19, -1).float() @ feat.float()).to(dtype))
    # The interpreter rounds fp32 -> bf16 by truncation (GPUs round to nearest): twice the storage error.
    factor = 3.0 if (dtype == torch.bfloat16 and on_interpreter and backend == "triton") else 2.0
    for name, got, s, w in zip(("out", "dfeatures", "dcls"), (out, d_feat, d_cls), same, want):
        assert got.dtype == dtype, name
        err, base = rel(got, w), rel(s, w)
        assert err < 1e-2, (name, err)
        assert err <= factor * base + 1e-4, (name, err, base)


@pytest.mark.parametrize("B,N,h,w,C", [(1, 0, 3, 4, 16), (1, 3, 0, 4, 16), (2, 3, 2, 2, 0)])
@pytest.mark.parametrize("backend", FAST)
def test_empty_sizes(B, N, h, w, C, backend):
    feat, cls = make(B, N, h, w, C)
    out, d_feat, d_cls, g = run(feat, cls, (h, w), backend=backend)
    want = ref64(feat, cls, (h, w), g)
    for got, ref in zip((out, d_feat, d_cls), want):
        assert got.shape == ref.shape and torch.equal(got.double(), ref)


def test_auto_backend_on_cpu_stays_off_triton():
    feat = torch.randn(1, 4, 16)  # CPU whatever DEVICE is
    check_cpu_tensor_dispatch("mask_logits", feat)


def test_custom_op_registration():
    feat, cls = make(1, 3, 4, 5, 16, seed=3)
    feat.requires_grad_()
    torch.library.opcheck(torch.ops.senformer_triton.mask_logits.default, (feat, cls, 4, 5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_bad_hw_is_reported():
    feat, cls = make(1, 2, 3, 4, 16)
    with ops.use_backend("triton"), pytest.raises(ValueError, match="hw=5x3"):
        ops.mask_logits(feat, cls, (5, 3))


def test_autotune_key_buckets_sizes_and_carries_the_precision():
    """Whole-image evaluation meets a new token count per image size: the tuned kernel is keyed on
    power-of-two buckets (and the dot precision), so similar sizes share one tuning."""
    assert kern.bucket(21888) == kern.bucket(30000) == 32768
    assert kern.bucket(1) == 16
    if not on_interpreter:
        assert kern._tuned().keys == ["M_BKT", "N_BKT", "K_BKT", "DOT_PREC"]


# ---------------------------------------------------------------------------------------------
# GPU: the paper's shapes (B=8, C=512 tokens of the 1/4 map of a 512x512 crop; N=150, 19, 171)

@pytest.mark.gpu
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N", [150, 19, 171])
def test_paper_shapes_gpu(N, dtype, backend, poison):
    feat, cls = make(8, N, 128, 128, 512, dtype=dtype, seed=N)
    poison_cuda_cache()
    out, d_feat, d_cls, g = run(feat, cls, (128, 128), backend=backend)
    want = ref64(feat, cls, (128, 128), g)
    if dtype == torch.float32:
        for name, got, w in zip(("out", "dfeatures", "dcls"), (out, d_feat, d_cls), want):
            assert rel(got, w) < 1e-4, (name, rel(got, w))
        return
    same = (reference.mask_logits(feat, cls, (128, 128)),
            (g.reshape(8, N, -1).transpose(1, 2).float() @ cls.float()).to(dtype),
            (g.reshape(8, N, -1).float() @ feat.float()).to(dtype))
    for name, got, s, w in zip(("out", "dfeatures", "dcls"), (out, d_feat, d_cls), same, want):
        err, base = rel(got, w), rel(s, w)
        assert got.dtype == dtype and err < 1e-2 and err <= 2.0 * base + 1e-4, (name, err, base)

# ---------------------------------------------------------------------------------------------
# senformer._C kernel specifics (formerly tests/test_ext_mask_logits.py): senformer._C CPU mask_logits (forward + backward) against the float64 reference.

EXT_OP = getattr(torch.ops.senformer, "mask_logits") if extension_loaded() else None
needs_ext = pytest.mark.skipif(not extension_loaded(), reason="senformer._C is not built (pip install -e .)")


def ext_run(fn, features, cls, hw, gout):
    f = features.detach().clone().requires_grad_(True)
    c = cls.detach().clone().requires_grad_(True)
    out = fn(f, c, hw)
    out.backward(gout.to(out.dtype))
    return out.detach(), f.grad, c.grad


@needs_ext
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_matches_reference(dtype, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(0)
    B, N, C, h, w = 2, 19, 37, 7, 9
    features = torch.randn(B, h * w, C, generator=g, dtype=torch.float64)
    cls = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    gout = torch.randn(B, N, h, w, generator=g, dtype=torch.float64)
    ref = ext_run(lambda f, c, hw: reference.mask_logits(f, c, hw), features, cls, (h, w), gout)
    with ops.use_backend("cpu"):
        got = ext_run(lambda f, c, hw: EXT_OP(f, c, hw[0], hw[1]) if dtype == torch.float64 else ops.mask_logits(f, c, hw),
                  features.to(dtype), cls.to(dtype), (h, w), gout)
    assert got[0].shape == (B, N, h, w) and got[0].dtype == dtype
    for a, b in zip(got, ref):
        assert rel(a, b) < tol


@needs_ext
def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 13, 6 * 5, generator=g, dtype=torch.float64).transpose(1, 2)  # (B, L, C) view
    cls = torch.randn(2, 13, 6, generator=g, dtype=torch.float64).transpose(1, 2)  # (B, N=6, C=13) view
    assert not features.is_contiguous() and not cls.is_contiguous()
    out = EXT_OP(features, cls, 6, 5)
    assert rel(out, reference.mask_logits(features, cls, (6, 5))) < 1e-12


@needs_ext
def test_bad_arguments_named():
    f = torch.randn(2, 12, 4, dtype=torch.float64)
    c = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="hw=3x5"):
        EXT_OP(f, c, 3, 5)
    with pytest.raises(ValueError, match="agree on B and C"):
        EXT_OP(f, c[..., :3], 3, 4)
    with pytest.raises(TypeError, match="share dtype"):
        EXT_OP(f, c.float(), 3, 4)


@needs_ext
def test_meta_kernel_shape():
    out = EXT_OP(torch.empty(2, 12, 4, device="meta"), torch.empty(2, 3, 4, device="meta"), 3, 4)
    assert out.shape == (2, 3, 3, 4) and out.device.type == "meta"
