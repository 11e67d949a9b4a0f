"""senformer._C CPU kernel of ensemble_predict against the float64 reference."""
import pytest
import torch

pytest.importorskip("senformer._C", reason="senformer._C is not built (pip install -e .)")

from senformer import ops  # noqa: E402
from senformer.ops import reference  # noqa: E402
from support import strided  # noqa: E402

OP = torch.ops.senformer.ensemble_predict


def make(B=2, N=7, sizes=((9, 11), (5, 6), (3, 3)), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [2 * torch.randn(B, N, h, w, generator=g, dtype=torch.float64).to(dtype) for h, w in sizes]


@pytest.mark.parametrize("merge", ["mean", "product", "vote"])
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("size", [(21, 17), (9, 11), (4, 5)])
def test_float64_labels_equal_reference(merge, align, size):
    logits = make(seed=hash((merge, align, size)) % 1000)
    got = OP(logits, size[0], size[1], merge, align)
    want = reference.ensemble_predict(logits, size, merge, align)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("merge", ["mean", "product", "vote"])
def test_float32_through_dispatcher(merge):
    logits = make(N=19, dtype=torch.float32, seed=1)
    size = (33, 29)
    with ops.use_backend("cpu"):
        got = ops.ensemble_predict(logits, size, merge)
    _, probs = reference.ensemble_predict([x.double() for x in logits], size, merge, return_probs=True)
    want = probs.argmax(1)
    diff = got != want
    # Only near-ties may flip under float32 rounding.
    if diff.any():
        chosen = probs.gather(1, got.unsqueeze(1)).squeeze(1)
        best = probs.max(1).values
        assert ((best - chosen)[diff] < 1e-5).all()
    assert diff.float().mean().item() < 1e-3


def test_non_contiguous_inputs():
    logits = make(N=6, seed=2)
    nc = [x.transpose(2, 3).contiguous().transpose(2, 3) for x in logits]
    nc[0] = strided(logits[0])
    assert not nc[0].is_contiguous()
    got = OP(nc, 15, 13, "mean", False)
    assert torch.equal(got, reference.ensemble_predict(logits, (15, 13), "mean"))


def test_bad_arguments():
    logits = make(seed=3)
    with pytest.raises(ValueError, match="merge"):
        OP(logits, 8, 8, "median", False)
    with pytest.raises(ValueError, match="size"):
        OP(logits, 0, 8, "mean", False)
    with pytest.raises(ValueError, match=r"logits\[2\]"):
        OP(logits[:2] + [logits[2][:1]], 8, 8, "mean", False)


def test_meta_kernel_shape():
    logits = [torch.empty(3, 5, 8, 8, device="meta")]
    out = OP(logits, 31, 17, "vote", False)
    assert out.shape == (3, 31, 17) and out.dtype == torch.int64 and out.device.type == "meta"
