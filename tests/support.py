"""Helpers shared by the tests of every fast backend: the error measure and input makers."""
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


def random_maps(B, N, sizes, dtype=torch.float32, contiguous=True, gen=None):
    """Learner maps (B,N,h,w) for each (h, w) in ``sizes``; non-contiguous ones are channels-last
    storage plus a stride-2 slice, so neither contiguous nor dense."""
    out = []
    for h, w in sizes:
        if contiguous:
            x = torch.randn(B, N, h, w, generator=gen) * 2.0
        else:
            x = (torch.randn(B, h, 2 * w, N, generator=gen) * 2.0).permute(0, 3, 1, 2)[..., ::2]
            assert not x.is_contiguous()
        out.append(x.to(dtype))
    return out
