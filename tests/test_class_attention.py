"""class_cross_attention: every fast backend (Triton -- on CUDA, or through TRITON_INTERPRET=1 on a CPU
machine -- and senformer._C's kernel for the device) against the float64 reference."""
import pytest
import torch

import senformer.ops as ops
from senformer.ops import reference

pytest.importorskip("triton")
from senformer.kernels import class_attention as kern  # noqa: E402

from support import fast_backends, poison_cuda_cache, recorded_ops  # noqa: E402
from triton_support import DEVICE, ON_INTERPRETER, check_cpu_tensor_dispatch, rel, require_triton  # noqa: E402
from senformer.ops._dispatch import extension_loaded  # noqa: E402
from support import strided  # noqa: E402

FAST = fast_backends("class_cross_attention")

require_triton()
on_interpreter = ON_INTERPRETER




@pytest.fixture
def poison(monkeypatch):
    """Outputs and scratch start as NaN, so an element the kernels forget to write fails the test."""
    monkeypatch.setattr(kern, "_alloc", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


def make(B, H, N, L, D, dtype=torch.float32, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):  # drawn on the CPU for reproducibility, views taken after the move
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    if layout == "contiguous":
        return rand(B, H, N, D), rand(B, H, L, D), rand(B, H, L, D)
    # how a learner builds them: (B, len, H, D) projections viewed as heads, and a strided D
    q = rand(B, N, H, D).transpose(1, 2)
    k = rand(B, L, H, D).transpose(1, 2)
    v = rand(B, H, L, 2 * D)[..., ::2]
    assert not v.is_contiguous()  # (q, k are too unless H == 1)
    return q, k, v


def ref64(q, k, v, do, scale=None):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference.class_cross_attention(q64, k64, v64, scale)
    out.backward(do.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def check_fp32(got, want, tol=1e-4):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        if w.abs().max() == 0:  # e.g. L == 1: dq and dk are exactly zero
            assert g.abs().max() < 1e-6, name
        else:
            assert rel(g, w) < tol, (name, rel(g, w))


@pytest.mark.parametrize("B,H,N,L,D", [
    (1, 1, 1, 1, 16),      # one query, one key
    (2, 2, 19, 37, 32),    # Cityscapes-like N, L not a multiple of any block
    (1, 2, 33, 250, 64),   # N just past a power of two, several splits
    (1, 1, 5, 100, 48),    # D not a power of two
])
@pytest.mark.parametrize("backend", FAST)
def test_public_op_fp32_forward_backward(B, H, N, L, D, backend, poison):
    q, k, v = make(B, H, N, L, D, seed=B * 1000 + L)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    with ops.use_backend(backend):
        out = ops.class_cross_attention(qg, kg, vg)
    do = torch.randn_like(out)
    out.backward(do)
    check_fp32((out, qg.grad, kg.grad, vg.grad), ref64(q, k, v, do))


@pytest.mark.parametrize("splits", [1, 2, 7])
@pytest.mark.parametrize("deterministic", [True, False])
def test_splits_and_dq_reduction(splits, deterministic, poison):
    q, k, v = make(1, 2, 19, 250, 32, layout="strided", seed=splits)
    scale = 0.3
    out, lse = kern.forward(q, k, v, scale, splits=splits)
    do = torch.randn(out.shape, device=DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous dO
    dq, dk, dv = kern.backward(do, q, k, v, out, lse, scale, deterministic, splits=splits)
    check_fp32((out, dq, dk, dv), ref64(q, k, v, do, scale))


def test_several_query_blocks_accumulate_dk_dv(poison):
    # block_n=16 < N=33: three query blocks per head in the forward grid and in the backward loop
    q, k, v = make(1, 2, 33, 90, 16, seed=5)
    out, lse = kern.forward(q, k, v, 0.25, splits=3, block_n=16)
    do = torch.randn_like(out)
    dq, dk, dv = kern.backward(do, q, k, v, out, lse, 0.25, True, splits=2, block_n=16)
    check_fp32((out, dq, dk, dv), ref64(q, k, v, do, 0.25))


def test_backward_fills_no_zero_gradient_for_lse():
    # lse is an output of the forward op only for the backward's use: autograd must not fill a zero
    # gradient for it on every backward (the backward takes None).
    q, k, v = (torch.randn(1, 2, n, 16, device=DEVICE, requires_grad=True) for n in (19, 37, 37))
    with ops.use_backend("triton"):
        out = ops.class_cross_attention(q, k, v)
        seen = recorded_ops(lambda: out.sum().backward())
    assert not [op for op in seen if "zero" in op or "fill" in op], seen
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_lse_matches_reference():
    q, k, v = make(1, 2, 19, 70, 32, seed=3)
    _, lse = kern.forward(q, k, v, 0.2, splits=3)
    want = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * 0.2, -1)
    assert rel(lse * torch.log(torch.tensor(2.0, dtype=torch.float64)), want) < 1e-5  # kernel keeps log2 units


def test_deterministic_backward_is_bitwise_reproducible():
    q, k, v = make(1, 2, 19, 120, 32, seed=9)
    out, lse = kern.forward(q, k, v, 0.2, splits=4)
    do = torch.randn_like(out)
    a = kern.backward(do, q, k, v, out, lse, 0.2, True, splits=4)
    b = kern.backward(do, q, k, v, out, lse, 0.2, True, splits=4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def native_reference(q, k, v, do):
    """Attention computed in the input dtype itself (no fp32 upcast): FlashAttention's yardstick for
    what 16-bit rounding costs."""
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    p = torch.softmax((qn @ kn.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    out = p @ vn
    out.backward(do)
    return out.detach(), qn.grad, kn.grad, vn.grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", FAST)
def test_half_precision(dtype, backend, poison):
    q, k, v = make(1, 2, 19, 70, 32, dtype=dtype, layout="strided", seed=11)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    with ops.use_backend(backend):
        out = ops.class_cross_attention(qg, kg, vg)
    assert out.dtype == dtype
    do = torch.randn(out.shape, device=DEVICE).to(dtype)
    out.backward(do)
    got = (out, qg.grad, kg.grad, vg.grad)
    want = ref64(q, k, v, do)
    native = native_reference(q, k, v, do)
    # DESIGN.md: under 1e-2 and about 2x what the same-dtype computation loses. The interpreter
    # rounds fp32 -> bf16 by truncation (GPUs round to nearest), which doubles bf16 storage error.
    factor = 4.0 if (dtype == torch.bfloat16 and on_interpreter and backend == "triton") else 2.0
    for name, g, n, w in zip(("out", "dq", "dk", "dv"), got, native, want):
        assert g.dtype == dtype, name
        err, base = rel(g, w), rel(n, w)
        assert err < 1e-2, (name, err)
        assert err <= factor * base + 1e-4, (name, err, base)


def test_public_op_atomic_dq():
    q, k, v = make(1, 2, 19, 130, 32, seed=21)
    qg = q.clone().requires_grad_()
    with ops.use_backend("triton"):
        out = ops.class_cross_attention(qg, k, v, scale=0.15, deterministic=False)
    do = torch.randn_like(out)
    out.backward(do)
    want = ref64(q, k, v, do, 0.15)
    assert rel(out, want[0]) < 1e-4 and rel(qg.grad, want[1]) < 1e-4


def test_large_scores_stay_finite(poison):
    # scores of several hundred: exp() overflows unless every split subtracts its running max
    q, k, v = make(1, 1, 19, 100, 32, seed=13)
    out, lse = kern.forward(q * 8, k, v, 1.0, splits=3)
    do = torch.randn_like(out)
    dq, dk, dv = kern.backward(do, q * 8, k, v, out, lse, 1.0, True, splits=3)
    check_fp32((out, dq, dk, dv), ref64(q * 8, k, v, do, 1.0))


def test_deterministic_default_follows_torch(monkeypatch):
    seen = []
    real = kern.backward
    monkeypatch.setattr(kern, "backward", lambda *a, **kw: seen.append(a[7]) or real(*a, **kw))
    q, k, v = make(1, 1, 3, 20, 16, seed=2)
    for flag in (True, False):
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda flag=flag: flag)
        qg = q.clone().requires_grad_()
        with ops.use_backend("triton"):
            ops.class_cross_attention(qg, k, v).sum().backward()
    assert seen == [True, False]


def test_no_queries():
    q, k, v = make(1, 2, 0, 9, 16)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    with ops.use_backend("triton"):
        out = ops.class_cross_attention(qg, kg, v)
    assert out.shape == (1, 2, 0, 16)
    out.sum().backward()
    assert kg.grad.abs().max() == 0


def test_auto_backend_on_cpu_stays_off_triton():
    q = torch.randn(1, 1, 3, 16)  # CPU whatever DEVICE is
    check_cpu_tensor_dispatch("class_cross_attention", q)


def test_custom_op_registration():
    q, k, v = make(1, 2, 5, 40, 16, seed=4)
    q.requires_grad_()
    torch.library.opcheck(torch.ops.senformer_triton.class_cross_attention.default, (q, k, v, 0.25, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_bad_arguments_name_the_argument():
    q, k, v = make(1, 1, 3, 5, 16)
    with ops.use_backend("triton"):
        with pytest.raises(ValueError, match="k .* and v"):
            ops.class_cross_attention(q, k, v[:, :, :4])
        with pytest.raises(TypeError, match="dtypes differ"):
            ops.class_cross_attention(q, k.double(), v)


@pytest.mark.parametrize("variant", kern.VARIANTS)
def test_gpu_tile_configs_on_the_interpreter(variant, monkeypatch, poison):
    """The tiles the paper's shapes select on a GPU (tf32 dots), run through the interpreter. legacy:
    forward BLOCK_N=256 for N=150, backward BLOCK_N=128, i.e. two query blocks and the fp32 dK/dV
    scratch. tiled: 128 + 32 query rows in one program both ways, 64 keys a step, no scratch."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # tf32: the fast config family
    try:
        if variant == "legacy":
            if on_interpreter:
                monkeypatch.setattr(kern, "_interpret", lambda: False)  # pick the GPU tiles...
            fwd = kern._fwd_config(150, 64, "tf32")
            bwd = kern._bwd_config(150, 64, "tf32")
            monkeypatch.undo()  # ...but run them on the interpreter
            monkeypatch.setattr(kern, "_alloc", lambda shape, dtype, device: torch.full(
                shape, float("nan"), dtype=dtype, device=device))
            assert fwd[0] == 256 and bwd[0] == 128
            fkw = dict(block_n=fwd[0], block_l=fwd[1])
            bkw = dict(block_n=bwd[0], block_l=bwd[1])
        else:  # the tiled configs do not depend on where they run
            fwd = kern._tiled_fwd_config(150, 64, "tf32")
            bwd = kern._tiled_bwd_config(150, 64, "tf32")
            assert all((c.tiles, c.groups, c.block_l) == ((128, 32, 0, 0), 1, 64) for c in (fwd, bwd))
            # (fp32 inputs would get the small fp32 groups: force the 16-bit GPU tiles onto them)
            fkw = bkw = dict(block_n=128, block_r=32, block_l=64)
        q, k, v = make(1, 1, 150, 70, 64, seed=31)
        with kern.use_variant(variant):
            out, lse = kern.forward(q, k, v, 0.125, splits=2, **fkw)
            do = torch.randn_like(out)
            dq, dk, dv = kern.backward(do, q, k, v, out, lse, 0.125, True, splits=2, **bkw)
    finally:
        torch.set_float32_matmul_precision(prev)
    # tf32 products on a GPU (10-bit mantissa); exact on the interpreter
    check_fp32((out, dq, dk, dv), ref64(q, k, v, do, 0.125), tol=1e-4 if on_interpreter else 2e-3)


# ---------------------------------------------------------------------------------------------
# Kernel variants: "tiled" (default: main + remainder query tiles, dK/dV finished in registers) and
# "legacy" (one power-of-two query tile; the benchmark's triton[legacy] rows)

@pytest.fixture(params=["highest", "high"])
def matmul_precision(request):
    """highest: exact-fp32 ("ieee") dots and their small-tile configs; high: tf32 dots, i.e. the config
    family 16-bit inputs get on a GPU (exact fp32 on the interpreter)."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(request.param)
    yield request.param
    torch.set_float32_matmul_precision(prev)


def _tol(precision):
    return 1e-4 if (on_interpreter or precision == "highest") else 2e-3


@pytest.mark.parametrize("N", [19, 59, 150, 171, 300])  # 300: more than one query group/block
@pytest.mark.parametrize("variant", kern.VARIANTS)
def test_variant_matches_reference(variant, N, matmul_precision, poison):
    D = 32 if N < 100 else 16
    q, k, v = make(1, 2, N, 137, D, layout="strided", seed=N)  # L=137: not a multiple of any block
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    with kern.use_variant(variant):
        out, lse = kern.forward(q, k, v, 0.3)
        do = torch.randn(out.shape, device=DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)
        dq, dk, dv = kern.backward(do, q, k, v, out, lse, 0.3, True)
    check_fp32((out, dq, dk, dv), ref64(q, k, v, do, 0.3), tol=_tol(matmul_precision))


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("variant", kern.VARIANTS)
def test_variant_splits_and_dq_reduction(variant, splits, deterministic, poison):
    # N=171 with fp32 inputs at tf32: several query groups (the tiled backward's fp32 dK/dV scratch)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        q, k, v = make(1, 1, 171, 150, 16, layout="strided", seed=splits + 10 * deterministic)
        with kern.use_variant(variant):
            out, lse = kern.forward(q, k, v, 0.25, splits=splits)
            do = torch.randn_like(out)
            dq, dk, dv = kern.backward(do, q, k, v, out, lse, 0.25, deterministic, splits=splits)
    finally:
        torch.set_float32_matmul_precision(prev)
    check_fp32((out, dq, dk, dv), ref64(q, k, v, do, 0.25), tol=_tol("high"))


@pytest.mark.parametrize("dtype,N", [(torch.float16, 150), (torch.bfloat16, 171)])
@pytest.mark.parametrize("variant", kern.VARIANTS)
def test_variant_half_precision(variant, dtype, N, poison):
    # the GPU's 16-bit tiles: N=150 -> 128 + 32 both ways; N=171 -> 128 + 32 + 16 forward, 128 + 128 backward
    q, k, v = make(1, 2, N, 90, 16, dtype=dtype, layout="strided", seed=12)
    do = torch.randn(q.shape, device=DEVICE).to(dtype)
    with kern.use_variant(variant):
        out, lse = kern.forward(q, k, v, 0.25)
        got = (out,) + kern.backward(do, q, k, v, out, lse, 0.25, True)
    want = ref64(q, k, v, do, 0.25)
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    outn = torch.softmax((qn @ kn.transpose(-1, -2)) * 0.25, dim=-1) @ vn
    outn.backward(do)
    native = (outn.detach(), qn.grad, kn.grad, vn.grad)
    factor = 4.0 if (dtype == torch.bfloat16 and on_interpreter) else 2.0  # see test_half_precision
    for name, g, n, w in zip(("out", "dq", "dk", "dv"), got, native, want):
        assert g.dtype == dtype, name
        err, base = rel(g, w), rel(n, w)
        assert err < 1e-2 and err <= factor * base + 1e-4, (name, err, base)


def test_public_op_runs_the_selected_variant(monkeypatch):
    seen = []
    for name in ("_tiled_forward", "_legacy_forward", "_tiled_backward", "_legacy_backward"):
        real = getattr(kern, name)
        monkeypatch.setattr(kern, name, lambda *a, _n=name, _r=real, **kw: seen.append(_n) or _r(*a, **kw))
    q, k, v = make(1, 2, 19, 40, 16, seed=6)
    want = None
    for variant in kern.VARIANTS:
        qg = q.clone().requires_grad_()
        with kern.use_variant(variant), ops.use_backend("triton"):
            out = ops.class_cross_attention(qg, k, v)
            out.sum().backward()
        want = want if want is not None else reference.class_cross_attention(q.double(), k.double(), v.double())
        assert rel(out, want) < 1e-4
    assert seen == ["_tiled_forward", "_tiled_backward", "_legacy_forward", "_legacy_backward"]


def test_use_variant_validates_and_restores():
    assert kern.VARIANTS[0] == "tiled" and kern.current_variant() == "tiled"
    with pytest.raises(ValueError, match="unknown variant"):
        with kern.use_variant("fast"):
            pass
    with kern.use_variant("legacy"):
        assert kern.current_variant() == "legacy"
        with kern.use_variant("tiled"):
            assert kern.current_variant() == "tiled"
        assert kern.current_variant() == "legacy"
    assert kern.current_variant() == "tiled"


@pytest.mark.parametrize("N,fwd_rows,bwd_rows", [(19, 32, 32), (59, 64, 64), (150, 160, 160), (171, 176, 256),
                                                 (256, 256, 256), (1024, 1024, 1024)])
def test_tiled_query_padding(N, fwd_rows, bwd_rows):
    """The GPU configs at D=64 (bf16/tf32): padded rows per N, one group up to 256 rows, no 64-row tile
    under 8 warps (a chained dot would run it on both warpgroups). The backward keeps <= 2 tiles of
    <= 128 rows (what compiles for sm_90 without spills), so N=171 pads to 128 + 128 there."""
    for cfg, rows in ((kern._tiled_fwd_config(N, 64, "tf32"), fwd_rows), (kern._tiled_bwd_config(N, 64, "tf32"), bwd_rows)):
        tiles, groups, block_l, num_warps = cfg.tiles, cfg.groups, cfg.block_l, cfg.num_warps
        assert groups * sum(tiles) == rows and sum(tiles) <= 256
        assert list(tiles) == sorted(tiles, reverse=True) and all(t == 0 or t >= 16 for t in tiles)
        assert num_warps == 4 or 64 not in tiles
        assert block_l >= 64  # M of the backward's dK/dV products: a whole wgmma warpgroup tile
    assert kern._tiled_fwd_config(N, 64, "tf32").groups == (1 if N <= 256 else 4)  # K/V read once per group
    assert kern._tiled_bwd_config(N, 64, "tf32").groups == (1 if N <= 256 else 8)  # no dK/dV scratch up to 256


def test_tiled_overrides_get_their_own_launch_options():
    """A block_n override (tests, benchmarks) changes the query groups; the launch options that depend
    on them follow the override, not the default tiling's."""
    cfg = kern._tiled_bwd_config
    assert cfg(40, 64, "ieee", True).groups == 2 and cfg(40, 64, "ieee", True).maxnreg == 128
    one = cfg(40, 64, "ieee", True, block_n=64)
    assert (one.tiles, one.groups, one.maxnreg) == ((64, 0, 0, 0), 1, None)  # the cap spills one group
    assert cfg(40, 128, "tf32").block_l == 32  # one group: no fp32 dK/dV scratch
    many = cfg(40, 128, "tf32", block_n=16)
    assert (many.groups, many.block_l) == (3, 16)  # the scratch needs the 16-key steps
    assert kern._tiled_fwd_config(150, 64, "ieee", True).num_warps == 8
    fwd = kern._tiled_fwd_config(150, 64, "ieee", True, block_n=16)
    assert (fwd.tiles, fwd.groups, fwd.num_warps) == ((16, 0, 0, 0), 10, 4)  # warps sized to 16 rows


def test_tiled_splits_fill_the_gpu(monkeypatch):
    monkeypatch.setattr(kern, "_num_sms", lambda device: 132)
    monkeypatch.setattr(kern, "_interpret", lambda: False)
    for programs, want in ((64, 2), (8, 16), (16, 8), (128, 1)):
        splits, per = kern._tiled_splits(16384, 64, programs, torch.device("cpu"))
        assert splits == want and per % 64 == 0 and splits * per >= 16384
    assert kern._tiled_splits(256, 64, 8, torch.device("cpu"))[0] == 1  # >= 4 key blocks a split


# ---------------------------------------------------------------------------------------------
# GPU: the paper's shapes (B=8, H=8, N=150, D=64, L in {1024, 16384}; N=19 and N=171 too)

@pytest.mark.gpu
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,L", [(150, 1024), (150, 16384), (19, 16384), (171, 1024)])
def test_paper_shapes_gpu(N, L, dtype, backend, poison):
    q, k, v = make(8, 8, N, L, 64, dtype=dtype, layout="strided", seed=N + L)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    poison_cuda_cache()
    with ops.use_backend(backend):
        out = ops.class_cross_attention(qg, kg, vg)
    do = torch.randn(out.shape, device=DEVICE).to(dtype)
    out.backward(do)
    got = (out, qg.grad, kg.grad, vg.grad)
    want = ref64(q, k, v, do)
    if dtype == torch.float32:
        check_fp32(got, want)
        return
    native = native_reference(q, k, v, do)
    for name, g, n, w in zip(("out", "dq", "dk", "dv"), got, native, want):
        err, base = rel(g, w), rel(n, w)
        assert g.dtype == dtype and err < 1e-2 and err <= 2.0 * base + 1e-4, (name, err, base)


@pytest.mark.gpu
def test_launches_on_the_tensors_device_not_the_current_one():
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    q, k, v = (t.to(dev) for t in make(2, 2, 19, 300, 32, seed=41))
    qg = q.clone().requires_grad_()
    with torch.cuda.device(0), ops.use_backend("triton"):
        out = ops.class_cross_attention(qg, k, v)
        do = torch.randn_like(out)
        out.backward(do)
    want = ref64(q, k, v, do)
    assert out.device == dev and rel(out, want[0]) < 1e-4 and rel(qg.grad, want[1]) < 1e-4

# ---------------------------------------------------------------------------------------------
# senformer._C kernel specifics (formerly tests/test_ext_class_attention.py): senformer._C CPU class_cross_attention (blocked online softmax, forward + backward) against the

EXT_OP = getattr(torch.ops.senformer, "class_cross_attention") if extension_loaded() else None
needs_ext = pytest.mark.skipif(not extension_loaded(), reason="senformer._C is not built (pip install -e .)")


def ext_run(fn, q, k, v, gout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(gout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def ext_inputs(B, H, N, L, D, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, gout = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (N, L, L, N))
    return q, k, v, gout


@needs_ext
@pytest.mark.parametrize("block", ["64", "100000"])  # several key blocks (ragged last one) / a single block
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-4)])
def test_matches_reference(monkeypatch, block, dtype, tol):
    monkeypatch.setenv("SENFORMER_CPU_ATTENTION_BLOCK", block)
    q, k, v, gout = ext_inputs(2, 3, 19, 333, 16, seed=int(block) % 7)
    q = q * 2  # sharper softmax: the running max matters
    scale = 16 ** -0.5
    ref = ext_run(lambda a, b, c: reference.class_cross_attention(a, b, c, scale), q, k, v, gout)
    with ops.use_backend("cpu"):
        fn = (lambda a, b, c: EXT_OP(a, b, c, scale)) if dtype == torch.float64 else \
            (lambda a, b, c: ops.class_cross_attention(a, b, c, scale))
        got = ext_run(fn, q.to(dtype), k.to(dtype), v.to(dtype), gout)
    for a, b in zip(got, ref):
        assert a.dtype == dtype and rel(a, b) < tol


@needs_ext
def test_non_contiguous_inputs(monkeypatch):
    monkeypatch.setenv("SENFORMER_CPU_ATTENTION_BLOCK", "64")
    q, k, v, _ = ext_inputs(1, 2, 7, 130, 8, seed=3)
    qn = q.transpose(1, 2).contiguous().transpose(1, 2)
    kn = strided(k)
    assert not qn.is_contiguous() and not kn.is_contiguous()
    out = EXT_OP(qn, kn, v, 0.3)
    assert rel(out, reference.class_cross_attention(q, k, v, 0.3)) < 1e-11


@needs_ext
def test_bad_arguments_named():
    q, k, v, _ = ext_inputs(1, 2, 5, 9, 4, seed=4)
    with pytest.raises(ValueError, match="agree on B, H and D"):
        EXT_OP(q, k[..., :3], v[..., :3], 1.0)
    with pytest.raises(ValueError, match="v"):
        EXT_OP(q, k, v[:, :, :4], 1.0)
    with pytest.raises(TypeError, match="dtypes differ"):
        EXT_OP(q, k.float(), v, 1.0)


@needs_ext
def test_meta_kernel_shape():
    q = torch.empty(2, 8, 150, 64, device="meta")
    k = torch.empty(2, 8, 4096, 64, device="meta")
    assert EXT_OP(q, k, k, 0.125).shape == q.shape
