"""SenFormer learner: structure, wiring through senformer.ops, weight sharing, and K/V caching exactness."""
import pytest
import torch
import torch.nn.functional as F

import senformer.models.learner as learner_mod
from senformer.models.head import SenFormerHead
from senformer.models.learner import Decoder, DecoderBlock, TransformerLearner, build_learners


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _pyramid(dim, b=2, sizes=((9, 11), (5, 6), (3, 3), (2, 1)), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, dim, h, w, generator=g, dtype=dtype) for h, w in sizes]


def _plain_block(blk: DecoderBlock, cls, tokens, heads):
    """The pre-norm decoder block written out with plain torch ops and the block's own weights."""
    def split(t):
        b, n, c = t.shape
        return t.reshape(b, n, heads, c // heads).transpose(1, 2)

    def merge(t):
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)

    ca = blk.cross_attn
    q = split(F.linear(blk.norm1(cls), ca.to_q.weight, ca.to_q.bias))
    k, v = (split(t) for t in F.linear(tokens, ca.kv.weight, ca.kv.bias).chunk(2, dim=-1))
    a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    x = cls + F.linear(merge(a @ v), ca.proj.weight, ca.proj.bias)
    q, k, v = (split(t) for t in F.linear(blk.norm2(x), blk.attn.qkv.weight, blk.attn.qkv.bias).chunk(3, dim=-1))
    a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    x = x + F.linear(merge(a @ v), blk.attn.proj.weight, blk.attn.proj.bias)
    return x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm3(x))))


def _randomize(module, seed=1):
    # LayerNorm weights start at exactly 1/0: perturb every parameter so that a swapped norm would show
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_learner_matches_plain_torch(num_blocks):
    torch.manual_seed(0)
    dim, heads, n = 24, 4, 7
    learner = build_learners(1, n, dim, heads, num_blocks, "none").double()[0]
    _randomize(learner)
    feat = _pyramid(dim, sizes=((5, 7),))[0].transpose(2, 3)  # non-contiguous input
    out = learner(feat)
    tokens = learner.decoder.norm_features(feat.flatten(2).transpose(1, 2))
    cls = learner.cls_emb.unsqueeze(0).expand(2, -1, -1)
    for blk in learner.decoder.blocks:
        cls = _plain_block(blk, cls, tokens, heads)
    ref = (learner.decoder.norm_embs(cls) @ tokens.transpose(1, 2)).reshape(2, n, 7, 5)
    assert out.shape == (2, n, 7, 5)
    assert rel(out, ref) < 1e-12


def test_post_norm_block_applies_layernorm_after_each_residual():
    torch.manual_seed(0)
    blk = DecoderBlock(16, 4, post_norm=True).double()
    _randomize(blk)
    cls = torch.randn(2, 5, 16, dtype=torch.float64)
    tokens = torch.randn(2, 13, 16, dtype=torch.float64)
    k, v = blk.cross_attn.keys_values(tokens)
    out = blk(cls, k, v)
    x = blk.norm1(cls + blk.cross_attn(cls, k, v))
    x = blk.norm2(x + blk.attn(x))
    assert rel(out, blk.norm3(x + blk.mlp(x))) < 1e-14
    pre = DecoderBlock(16, 4).double()
    pre.load_state_dict(blk.state_dict())
    assert rel(pre(cls, k, v), out) > 1e-3


def test_block_parameter_count_matches_official_structure():
    d = 512
    blk = DecoderBlock(d, 8)
    # cross-attn q d->d, kv d->2d, proj d->d; self-attn qkv d->3d, proj d->d; MLP d->4d->d; 3 LayerNorms
    assert sum(p.numel() for p in blk.parameters()) == 16 * d * d + 19 * d
    dec = Decoder(d, 8, 6, repeated=True)
    assert sum(p.numel() for p in dec.parameters()) == 16 * d * d + 23 * d  # ~4.2M per learner


def test_cross_attention_goes_through_ops_and_kv_is_cached(monkeypatch):
    calls = []
    real = learner_mod.ops.class_cross_attention

    def spy(q, k, v, *args, **kwargs):
        assert q.dim() == 4 and k.shape == v.shape and q.shape[:2] == k.shape[:2]
        calls.append((tuple(q.shape), tuple(k.shape)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(learner_mod.ops, "class_cross_attention", spy)
    head = SenFormerHead(5, dim=16, num_heads=4, num_blocks=3)
    kv_calls = []
    for lrn in head.learners:
        lrn.decoder.blocks[0].cross_attn.kv.register_forward_hook(lambda *a: kv_calls.append(1))
    pyr = _pyramid(16, dtype=torch.float32)
    head(pyr)
    assert len(calls) == 12 and calls[0] == ((2, 4, 5, 4), (2, 4, 99, 4))
    assert len(kv_calls) == 4  # once per learner
    head.cache_kv = False
    kv_calls.clear()
    head(pyr)
    assert len(kv_calls) == 12  # the paper's recompute path


@pytest.mark.parametrize("sharing", ["repeated", "decoder"])
def test_cache_kv_same_outputs_and_gradients_float64(sharing):
    torch.manual_seed(0)
    # decoder sharing caches K/V only when the shared decoder is one repeated block
    head = SenFormerHead(7, dim=32, num_heads=4, num_blocks=4, weight_sharing=sharing, repeat_block=True).double()
    _randomize(head)
    pyr = [p.requires_grad_() for p in _pyramid(32, seed=3)]
    weights = [torch.randn(2, 7, *p.shape[-2:], dtype=torch.float64) for p in pyr]

    def run(cache):
        head.cache_kv = cache
        head.zero_grad(set_to_none=True)
        for p in pyr:
            p.grad = None
        outs = head(pyr)
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        grads = {n: p.grad.clone() for n, p in head.named_parameters()}
        return [o.detach() for o in outs], grads, [p.grad.clone() for p in pyr]

    o1, g1, x1 = run(True)
    o0, g0, x0 = run(False)
    for a, b in zip(o1, o0):
        assert rel(a, b) < 1e-10
    assert g1.keys() == g0.keys() and len(g1) > 0
    for name in g1:
        assert torch.isfinite(g1[name]).all()
        assert rel(g1[name], g0[name]) < 1e-10, name
    for a, b in zip(x1, x0):
        assert rel(a, b) < 1e-10
    # the comparison can fail: a perturbed K/V weight changes the outputs
    with torch.no_grad():
        head.learners[0].decoder.blocks[0].cross_attn.kv.weight.mul_(1.01)
    assert rel(head(pyr)[0], o0[0]) > 1e-6


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_weight_sharing_modes_share_what_they_say():
    n, d, heads, blocks = 7, 16, 4, 3
    kw = dict(dim=d, num_heads=heads, num_blocks=blocks)
    rep = SenFormerHead(n, weight_sharing="repeated", **kw)
    none = SenFormerHead(n, weight_sharing="none", **kw)
    dec = SenFormerHead(n, weight_sharing="decoder", repeat_block=True, **kw)
    cls = SenFormerHead(n, weight_sharing="cls", **kw)
    block = _count(DecoderBlock(d, heads))
    assert _count(none) - _count(rep) == 4 * (blocks - 1) * block
    assert all(len(lr.decoder.blocks) == 1 for lr in rep.learners)
    assert all(len(lr.decoder.blocks) == blocks for lr in none.learners)
    assert len({id(lr.decoder) for lr in dec.learners}) == 1
    assert len({id(lr.cls_emb) for lr in dec.learners}) == 4
    assert _count(dec) == _count(rep) - 3 * _count(rep.learners[0].decoder)
    assert len({id(lr.cls_emb) for lr in cls.learners}) == 1
    assert len({id(lr.decoder) for lr in cls.learners}) == 4
    for lr in rep.learners:
        assert lr.cls_emb.shape == (n, d)
    # the paper's Table 2 "decoder shared" row: one decoder of distinct blocks shared by all learners
    dec6 = SenFormerHead(n, weight_sharing="decoder", **kw)
    assert len({id(lr.decoder) for lr in dec6.learners}) == 1 and len(dec6.learners[0].decoder.blocks) == blocks
    assert _count(dec6) == _count(dec) + (blocks - 1) * block
    # learners of a shared decoder still differ through their own class embeddings
    pyr = [torch.randn(1, d, 4, 4)] * 4
    outs = dec(pyr)
    assert rel(outs[0], outs[1]) > 1e-3
    with pytest.raises(ValueError, match="weight_sharing"):
        SenFormerHead(n, weight_sharing="layers", **kw)


def test_levels_and_learners_per_level():
    head = SenFormerHead(5, dim=16, num_heads=4, num_blocks=1, levels=(5, 3), learners_per_level=2)
    assert head.learner_levels == [3, 3, 5, 5]
    outs = head(_pyramid(16, dtype=torch.float32))
    assert [tuple(o.shape) for o in outs] == [(2, 5, 5, 6)] * 2 + [(2, 5, 2, 1)] * 2
    with pytest.raises(ValueError, match="levels"):
        SenFormerHead(5, dim=16, num_heads=4, levels=(1, 2))


def test_learner_rejects_wrong_width():
    lrn = build_learners(1, 3, 16, 4, 1)[0]
    assert isinstance(lrn, TransformerLearner)
    with pytest.raises(ValueError, match="channels"):
        lrn(torch.randn(1, 8, 3, 3))
