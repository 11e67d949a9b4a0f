"""senformer._C CPU mask_logits (forward + backward) against the float64 reference."""
import pytest
import torch

pytest.importorskip("senformer._C", reason="senformer._C is not built (pip install -e .)")

from senformer import ops  # noqa: E402
from senformer.ops import reference  # noqa: E402
from support import rel  # noqa: E402

OP = torch.ops.senformer.mask_logits


def run(fn, features, cls, hw, gout):
    f = features.detach().clone().requires_grad_(True)
    c = cls.detach().clone().requires_grad_(True)
    out = fn(f, c, hw)
    out.backward(gout.to(out.dtype))
    return out.detach(), f.grad, c.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_matches_reference(dtype, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator().manual_seed(0)
    B, N, C, h, w = 2, 19, 37, 7, 9
    features = torch.randn(B, h * w, C, generator=g, dtype=torch.float64)
    cls = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    gout = torch.randn(B, N, h, w, generator=g, dtype=torch.float64)
    ref = run(lambda f, c, hw: reference.mask_logits(f, c, hw), features, cls, (h, w), gout)
    with ops.use_backend("cpu"):
        got = run(lambda f, c, hw: OP(f, c, hw[0], hw[1]) if dtype == torch.float64 else ops.mask_logits(f, c, hw),
                  features.to(dtype), cls.to(dtype), (h, w), gout)
    assert got[0].shape == (B, N, h, w) and got[0].dtype == dtype
    for a, b in zip(got, ref):
        assert rel(a, b) < tol


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 13, 6 * 5, generator=g, dtype=torch.float64).transpose(1, 2)  # (B, L, C) view
    cls = torch.randn(2, 13, 6, generator=g, dtype=torch.float64).transpose(1, 2)  # (B, N=6, C=13) view
    assert not features.is_contiguous() and not cls.is_contiguous()
    out = OP(features, cls, 6, 5)
    assert rel(out, reference.mask_logits(features, cls, (6, 5))) < 1e-12


def test_bad_arguments_named():
    f = torch.randn(2, 12, 4, dtype=torch.float64)
    c = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="hw=3x5"):
        OP(f, c, 3, 5)
    with pytest.raises(ValueError, match="agree on B and C"):
        OP(f, c[..., :3], 3, 4)
    with pytest.raises(TypeError, match="share dtype"):
        OP(f, c.float(), 3, 4)


def test_meta_kernel_shape():
    out = OP(torch.empty(2, 12, 4, device="meta"), torch.empty(2, 3, 4, device="meta"), 3, 4)
    assert out.shape == (2, 3, 3, 4) and out.device.type == "meta"
