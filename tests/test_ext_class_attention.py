"""senformer._C CPU class_cross_attention (blocked online softmax, forward + backward) against the
float64 reference."""
import pytest
import torch

pytest.importorskip("senformer._C", reason="senformer._C is not built (pip install -e .)")

from senformer import ops  # noqa: E402
from senformer.ops import reference  # noqa: E402
from support import rel, strided  # noqa: E402

OP = torch.ops.senformer.class_cross_attention


def run(fn, q, k, v, gout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(gout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def inputs(B, H, N, L, D, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, gout = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (N, L, L, N))
    return q, k, v, gout


@pytest.mark.parametrize("block", ["64", "100000"])  # several key blocks (ragged last one) / a single block
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-4)])
def test_matches_reference(monkeypatch, block, dtype, tol):
    monkeypatch.setenv("SENFORMER_CPU_ATTENTION_BLOCK", block)
    q, k, v, gout = inputs(2, 3, 19, 333, 16, seed=int(block) % 7)
    q = q * 2  # sharper softmax: the running max matters
    scale = 16 ** -0.5
    ref = run(lambda a, b, c: reference.class_cross_attention(a, b, c, scale), q, k, v, gout)
    with ops.use_backend("cpu"):
        fn = (lambda a, b, c: OP(a, b, c, scale)) if dtype == torch.float64 else \
            (lambda a, b, c: ops.class_cross_attention(a, b, c, scale))
        got = run(fn, q.to(dtype), k.to(dtype), v.to(dtype), gout)
    for a, b in zip(got, ref):
        assert a.dtype == dtype and rel(a, b) < tol


def test_non_contiguous_inputs(monkeypatch):
    monkeypatch.setenv("SENFORMER_CPU_ATTENTION_BLOCK", "64")
    q, k, v, _ = inputs(1, 2, 7, 130, 8, seed=3)
    qn = q.transpose(1, 2).contiguous().transpose(1, 2)
    kn = strided(k)
    assert not qn.is_contiguous() and not kn.is_contiguous()
    out = OP(qn, kn, v, 0.3)
    assert rel(out, reference.class_cross_attention(q, k, v, 0.3)) < 1e-11


def test_bad_arguments_named():
    q, k, v, _ = inputs(1, 2, 5, 9, 4, seed=4)
    with pytest.raises(ValueError, match="agree on B, H and D"):
        OP(q, k[..., :3], v[..., :3], 1.0)
    with pytest.raises(ValueError, match="v"):
        OP(q, k, v[:, :, :4], 1.0)
    with pytest.raises(TypeError, match="dtypes differ"):
        OP(q, k.float(), v, 1.0)


def test_meta_kernel_shape():
    q = torch.empty(2, 8, 150, 64, device="meta")
    k = torch.empty(2, 8, 4096, 64, device="meta")
    assert OP(q, k, k, 0.125).shape == q.shape
