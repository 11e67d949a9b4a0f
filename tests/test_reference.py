"""The reference ops against straightforward, independently written numpy computations.

The reference is the oracle of every fast backend, so it gets its own oracle: explicit per-row
softmax attention, explicit dot products, and a numpy bilinear resize written from torch's
coordinate rules (not F.interpolate), all in float64 on fresh random inputs with ragged sizes.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from senformer.ops import reference

rng = np.random.default_rng()


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def np_resize(x, size, align_corners):
    """Bilinear resize of (B,C,h,w) with torch's source-coordinate rules."""
    b, c, h, w = x.shape
    oh, ow = size
    if (h, w) == (oh, ow):
        return x

    def coords(n_in, n_out):
        d = np.arange(n_out, dtype=np.float64)
        if align_corners:
            src = d * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(d)
        else:
            src = np.maximum((d + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = coords(h, oh)
    x0, x1, wx = coords(w, ow)
    top = x[:, :, y0][:, :, :, x0] * (1 - wx) + x[:, :, y0][:, :, :, x1] * wx
    bot = x[:, :, y1][:, :, :, x0] * (1 - wx) + x[:, :, y1][:, :, :, x1] * wx
    return top * (1 - wy)[:, None] + bot * wy[:, None]


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_ce(z, target, ignore):
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    total, count = 0.0, 0
    b, _, hh, ww = z.shape
    for bi in range(b):
        for y in range(hh):
            for x in range(ww):
                t = target[bi, y, x]
                if t != ignore:
                    total -= logp[bi, t, y, x]
                    count += 1
    return total / count if count else 0.0


@pytest.mark.parametrize("shape", [(2, 3, 5, 37, 16), (1, 2, 19, 1, 8), (3, 1, 1, 64, 32)])
def test_attention_matches_explicit_softmax(shape):
    b, h, n, l, d = shape
    q, k, v = rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, l, d)), rng.standard_normal((b, h, l, d))
    scale = 0.37
    want = np.empty((b, h, n, d))
    for bi in range(b):
        for hi in range(h):
            for ni in range(n):
                s = k[bi, hi] @ q[bi, hi, ni] * scale
                p = np.exp(s - s.max())
                want[bi, hi, ni] = (p / p.sum()) @ v[bi, hi]
    got = reference.class_cross_attention(_t(q), _t(k), _t(v), scale).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-12
    sdpa = F.scaled_dot_product_attention(_t(q), _t(k), _t(v))
    ref = reference.class_cross_attention(_t(q), _t(k), _t(v))
    assert torch.allclose(ref, sdpa, rtol=1e-10, atol=1e-12)


def test_attention_rejects_bad_shapes():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="k .* and v"):
        reference.class_cross_attention(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8))
    with pytest.raises(ValueError, match="agree on B, H and D"):
        reference.class_cross_attention(q, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))


def test_mask_logits_matches_dot_products():
    b, h, w, n, c = 2, 5, 7, 9, 12
    feats, cls = rng.standard_normal((b, h * w, c)), rng.standard_normal((b, n, c))
    got = reference.mask_logits(_t(feats), _t(cls), (h, w)).numpy()
    for bi in range(b):
        for ni in range(n):
            for y in range(h):
                for x in range(w):
                    assert abs(got[bi, ni, y, x] - feats[bi, y * w + x] @ cls[bi, ni]) < 1e-12
    with pytest.raises(ValueError, match="hw=5x6"):
        reference.mask_logits(_t(feats), _t(cls), (5, 6))


@pytest.mark.parametrize("align_corners", [False, True])
def test_numpy_bilinear_agrees_with_torch(align_corners):
    # Guards the oracle itself: if this fails, the CE oracle below is wrong, not the reference.
    x = rng.standard_normal((2, 3, 5, 7))
    for size in [(13, 9), (5, 7), (2, 3), (1, 1), (37, 45)]:
        want = F.interpolate(_t(x), size=size, mode="bilinear", align_corners=align_corners).numpy()
        assert np.abs(np_resize(x, size, align_corners) - want).max() < 1e-12


def _random_maps(b, n, sizes):
    return [rng.standard_normal((b, n, h, w)) * 3 for h, w in sizes]


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("sizes,hw", [([(10, 12), (5, 6), (3, 3), (2, 2)], (37, 45)), ([(6, 5)], (11, 13)),
                                      ([(4, 4), (7, 3)], (9, 9))])
def test_ensemble_ce_matches_numpy(sizes, hw, align_corners):
    b, n, eps, ignore = 2, 7, 1e-15, 255
    maps = _random_maps(b, n, sizes)
    target = rng.integers(0, n, size=(b, *hw))
    target[rng.random(target.shape) < 0.2] = ignore
    u = [np_resize(x, sizes[0], align_corners) for x in maps]
    e = np.log(np.maximum(sum(np_softmax(x, 1) for x in u), eps))
    want_ens = np_ce(np_resize(e, hw, align_corners), target, ignore)
    want_learn = np.mean([np_ce(np_resize(x, hw, align_corners), target, ignore) for x in u])
    ens, learn = reference.ensemble_cross_entropy([_t(x) for x in maps], _t(target), ignore, align_corners)
    assert ens.dtype == torch.float64
    assert abs(ens.item() - want_ens) < 1e-10 * abs(want_ens)
    assert abs(learn.item() - want_learn) < 1e-10 * abs(want_learn)


def test_ensemble_ce_all_ignored_is_zero_with_zero_grad():
    maps = [torch.randn(2, 5, 6, 7, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)]
    target = torch.full((2, 23, 29), 255)
    ens, learn = reference.ensemble_cross_entropy(maps, target)
    assert ens.item() == 0.0 and learn.item() == 0.0
    (ens + learn).backward()
    for m in maps:
        assert torch.isfinite(m.grad).all() and m.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("bad", [7, 250, -1])
def test_ensemble_ce_bad_label_names_value(bad):
    maps = [torch.randn(1, 7, 4, 4)]
    target = torch.randint(0, 7, (1, 9, 9))
    target[0, 4, 5] = bad
    with pytest.raises(ValueError, match=rf"label {bad}\b"):
        reference.ensemble_cross_entropy(maps, target)


def test_ensemble_ce_float_target_rejected():
    with pytest.raises(TypeError, match="integer"):
        reference.ensemble_cross_entropy([torch.randn(1, 3, 4, 4)], torch.zeros(1, 8, 8))


@pytest.mark.parametrize("merge", ["mean", "product", "vote"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_ensemble_predict_matches_numpy(merge, align_corners):
    b, n, sizes, hw = 2, 19, [(9, 11), (5, 6), (3, 3)], (33, 41)
    maps = _random_maps(b, n, sizes)
    probs = [np_softmax(np_resize(x, sizes[0], align_corners), 1) for x in maps]
    if merge == "mean":
        s = sum(probs) / len(probs)
    elif merge == "product":
        s = np_softmax(sum(np.log(p) for p in probs), 1)
    else:
        s = sum(p * (p == p.max(1, keepdims=True)) for p in probs) / len(probs)
    want_scores = np_resize(s, hw, align_corners)
    labels, scores = reference.ensemble_predict([_t(x) for x in maps], hw, merge, align_corners, return_probs=True)
    assert np.abs(scores.numpy() - want_scores).max() < 1e-12
    assert torch.equal(labels, _t(want_scores.argmax(1)))


def test_predict_rejects_unknown_merge():
    with pytest.raises(ValueError, match="merge must be one of"):
        reference.ensemble_predict([torch.randn(1, 3, 4, 4)], (8, 8), merge="max")
