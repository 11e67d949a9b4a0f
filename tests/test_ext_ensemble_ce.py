"""senformer._C CPU kernel of ensemble_cross_entropy against the float64 reference."""
import pytest
import torch

pytest.importorskip("senformer._C", reason="senformer._C is not built (pip install -e .)")

from senformer import ops  # noqa: E402
from senformer.ops import reference  # noqa: E402
from support import rel, strided  # noqa: E402

OP = torch.ops.senformer.ensemble_cross_entropy


def make(B=2, N=7, sizes=((9, 11), (5, 6), (3, 3)), HW=(19, 23), dtype=torch.float64, ignore_frac=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = [3 * torch.randn(B, N, h, w, generator=g, dtype=torch.float64).to(dtype) for h, w in sizes]
    target = torch.randint(0, N, (B, *HW), generator=g)
    target[torch.rand(B, *HW, generator=g) < ignore_frac] = 255
    return logits, target


def ref_losses_and_grads(logits, target, weights, align=False, ignore=255):
    xs = [x.detach().double().requires_grad_(True) for x in logits]
    le, ll = reference.ensemble_cross_entropy(xs, target, ignore, align)
    (weights[0] * le + weights[1] * ll).backward()
    return le.detach(), ll.detach(), [x.grad for x in xs]


def ext_losses_and_grads(logits, target, weights, align=False, ignore=255, call=OP):
    xs = [x.detach().clone().requires_grad_(True) for x in logits]
    le, ll = call(xs, target, ignore, align, 1e-15)
    (weights[0] * le + weights[1] * ll).backward()
    return le.detach(), ll.detach(), [x.grad for x in xs]


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("sizes,HW", [
    (((9, 11), (5, 6), (3, 3)), (19, 23)),   # upsampling, odd sizes
    (((6, 5),), (6, 5)),                     # one learner at the target size (identity resizes)
    (((12, 10), (7, 4)), (8, 7)),            # target coarser than the finest map
])
def test_float64_matches_reference(align, sizes, HW):
    logits, target = make(sizes=sizes, HW=HW, seed=len(sizes) + 10 * align)
    w = (0.7, 1.3)
    le, ll, g = ext_losses_and_grads(logits, target, w, align)
    rle, rll, rg = ref_losses_and_grads(logits, target, w, align)
    assert le.dtype == torch.float64 and ll.dtype == torch.float64
    assert rel(le, rle) < 1e-10 and rel(ll, rll) < 1e-10
    for a, b in zip(g, rg):
        assert a.shape == b.shape
        assert rel(a, b) < 1e-9


def test_float32_through_dispatcher_within_tolerance():
    logits, target = make(N=19, dtype=torch.float32, seed=3)
    w = (1.0, 0.4)
    with ops.use_backend("cpu"):
        le, ll, g = ext_losses_and_grads(logits, target, w, call=lambda *a: ops.ensemble_cross_entropy(*a))
    rle, rll, rg = ref_losses_and_grads(logits, target, w)
    assert le.dtype == torch.float32
    assert rel(le, rle) < 1e-5 and rel(ll, rll) < 1e-5
    for a, b in zip(g, rg):
        assert a.dtype == torch.float32 and rel(a, b) < 1e-5


def test_non_contiguous_inputs():
    logits, target = make(N=5, seed=4)
    # channels-last storage and a strided target: same values, other layouts
    nc = [x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) for x in logits]
    nc[1] = strided(logits[1])
    assert not nc[0].is_contiguous() and not nc[1].is_contiguous()
    wide = torch.full((target.shape[0], target.shape[1], 2 * target.shape[2]), 255, dtype=torch.int64)
    wide[..., ::2] = target
    tnc = wide[..., ::2]
    assert not tnc.is_contiguous()
    le, ll, g = ext_losses_and_grads(nc, tnc.to(torch.int32), (1.0, 1.0))
    rle, rll, rg = ref_losses_and_grads(logits, target, (1.0, 1.0))
    assert rel(le, rle) < 1e-10 and rel(ll, rll) < 1e-10
    for a, b in zip(g, rg):
        assert rel(a, b) < 1e-9


def test_all_ignored_gives_zero_loss_and_zero_grad():
    logits, target = make(seed=5)
    target.fill_(7)
    le, ll, g = ext_losses_and_grads(logits, target, (1.0, 1.0), ignore=7)
    assert le.item() == 0.0 and ll.item() == 0.0
    for x in g:
        assert torch.isfinite(x).all() and x.abs().max().item() == 0.0


@pytest.mark.parametrize("bad", [7, -1, 1000])
def test_bad_label_raises_value_error_naming_it(bad):
    logits, target = make(N=7, seed=6)
    target[1, 3, 4] = bad
    with pytest.raises(ValueError, match=str(bad)):
        OP(logits, target, 255, False, 1e-15)


def test_bad_arguments_are_named():
    logits, target = make(seed=7)
    with pytest.raises(TypeError, match="target"):
        OP(logits, target.double(), 255, False, 1e-15)
    with pytest.raises(ValueError, match=r"logits\[1\]"):
        OP([logits[0], logits[1][:, :3]], target, 255, False, 1e-15)
    with pytest.raises(TypeError, match=r"logits\[2\]"):
        OP([logits[0], logits[1], logits[2].float()], target, 255, False, 1e-15)
    with pytest.raises(ValueError, match="target batch"):
        OP(logits, target[:1], 255, False, 1e-15)


def test_bfloat16_upcasts():
    logits, target = make(N=11, dtype=torch.bfloat16, seed=8)
    le, ll, g = ext_losses_and_grads(logits, target, (1.0, 1.0))
    rle, rll, rg = ref_losses_and_grads(logits, target, (1.0, 1.0))
    assert le.dtype == torch.float32 and g[0].dtype == torch.bfloat16
    assert rel(le, rle) < 1e-2 and rel(ll, rll) < 1e-2
    for a, b in zip(g, rg):
        assert rel(a, b) < 1e-2


def test_no_grad_path_and_thread_count_do_not_change_results():
    logits, target = make(N=9, dtype=torch.float32, seed=9)
    with torch.no_grad():
        base = OP(logits, target, 255, False, 1e-15)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _, _, g2 = ext_losses_and_grads(logits, target, (1.0, 1.0))
        le2, ll2 = OP(logits, target, 255, False, 1e-15)
        torch.set_num_threads(1)
        _, _, g1 = ext_losses_and_grads(logits, target, (1.0, 1.0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(base[0], le2) and torch.equal(base[1], ll2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)  # deterministic: no atomics, fixed reduction order


def test_meta_kernel_shapes():
    logits = [torch.empty(2, 5, 8, 8, device="meta"), torch.empty(2, 5, 4, 4, device="meta")]
    target = torch.empty(2, 32, 32, dtype=torch.int64, device="meta")
    le, ll = OP(logits, target, 255, False, 1e-15)
    assert le.device.type == "meta" and le.shape == () and le.dtype == torch.float32


def test_active_eps_clamp_matches_reference():
    # eps large enough that clamp(sum softmax, eps) is active on many (pixel, class) pairs: its
    # gradient mask must match torch.clamp's.
    logits, target = make(N=6, sizes=((7, 8), (4, 4)), HW=(13, 11), seed=11)
    xs = [x.clone().requires_grad_(True) for x in logits]
    le, _ = OP(xs, target, 255, False, 0.3)
    le.backward()
    rs = [x.clone().requires_grad_(True) for x in logits]
    rle, _ = reference.ensemble_cross_entropy(rs, target, 255, False, eps=0.3)
    rle.backward()
    assert rel(le, rle) < 1e-10
    for a, b in zip(xs, rs):
        assert rel(a.grad, b.grad) < 1e-9
