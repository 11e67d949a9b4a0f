"""ensemble_predict: every fast backend (Triton -- on CUDA, or through TRITON_INTERPRET=1 on a CPU
machine -- and senformer._C's kernel for the device) against the float64 reference."""
import importlib
import os

import pytest
import torch

import senformer.ops as ops
from support import DEVICE, fast_backends, poison_cuda_cache, random_maps
from triton_support import AllocationRecorder, spy_launches
from senformer.ops import reference
from senformer.ops._dispatch import extension_loaded  # noqa: E402
from support import stable_seed, strided  # noqa: E402

pytest.importorskip("triton")
# The package re-exports the function under the module's name, so fetch the module explicitly.
predict_mod = importlib.import_module("senformer.ops.ensemble_predict")


def _check_labels(labels, xs, size, merge, align_corners):
    """Labels must equal the float64 reference's except where its top-2 scores are within 1e-6."""
    ref_labels, probs = reference.ensemble_predict([x.double() for x in xs], size, merge, align_corners,
                                                   return_probs=True)
    assert labels.dtype == torch.int64 and labels.shape == ref_labels.shape
    diff = labels != ref_labels
    if diff.any():
        top2 = probs.topk(2, dim=1).values
        gap = (top2[:, 0] - top2[:, 1])[diff]
        assert (gap < 1e-6).all(), f"{int(diff.sum())} labels differ, smallest top-2 gap {gap.min().item()}"
    return int(diff.sum())


CASES = [
    # (B, N, (H, W), learner sizes finest first, align_corners, contiguous)
    (2, 7, (37, 45), [(10, 12)], False, True),
    (2, 19, (37, 45), [(10, 12), (5, 6), (3, 3), (2, 2)], False, True),
    (1, 19, (37, 45), [(10, 12), (5, 6), (3, 3), (2, 2)], True, False),
    (2, 5, (17, 13), [(17, 13), (5, 4), (2, 3)], True, True),     # output at the finest map's size
    (3, 33, (7, 5), [(10, 12), (3, 2)], False, False),            # downsampling output
]


FAST = fast_backends("ensemble_predict")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("merge", ["mean", "product", "vote"])
@pytest.mark.parametrize("B,N,size,sizes,align_corners,contiguous", CASES)
def test_labels_match_float64_reference(merge, B, N, size, sizes, align_corners, contiguous, backend):
    gen = torch.Generator().manual_seed(stable_seed(merge, B, N, size, align_corners))
    xs = random_maps(B, N, sizes, contiguous=contiguous, gen=gen)
    poison_cuda_cache()
    with ops.use_backend(backend):
        labels = ops.ensemble_predict(xs, size, merge, align_corners)
    assert _check_labels(labels, xs, size, merge, align_corners) == 0  # random data: no near-ties


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, backend):
    gen = torch.Generator().manual_seed(11)
    xs = random_maps(2, 19, [(10, 12), (5, 6), (3, 3)], dtype=dtype, gen=gen)
    with ops.use_backend(backend):
        labels = ops.ensemble_predict(xs, (37, 45), "mean")
    _check_labels(labels, xs, (37, 45), "mean", False)


def test_ties_go_to_the_lowest_class_like_torch_argmax():
    scores = torch.zeros(1, 4, 5, 6, device=DEVICE)
    scores[:, 3] = 1.0
    scores[:, 1] = 1.0  # classes 1 and 3 tie everywhere
    from senformer.kernels import ensemble_predict as kernel
    labels = kernel.upsampled_argmax(scores.permute(0, 2, 3, 1).contiguous(), (9, 11), False)
    assert torch.equal(labels, torch.ones(1, 9, 11, dtype=torch.int64, device=DEVICE))


def test_nan_scores_win_like_torch_argmax():
    from senformer.kernels import ensemble_predict as kernel
    gen = torch.Generator().manual_seed(16)
    scores = torch.rand(1, 4, 5, 6, generator=gen).to(DEVICE)
    scores[0, 2, 1, 3] = float("nan")
    scores[0, 3, 3, 2] = float("nan")
    scores[0, 1, 3, 2] = float("nan")  # two NaN classes at one cell: the lower index wins
    labels = kernel.upsampled_argmax(scores.permute(0, 2, 3, 1).contiguous(), (9, 11), False)
    ref = reference.resize(scores, (9, 11), False).argmax(1)
    assert torch.equal(labels, ref)


def test_kernel_writes_every_label():
    from senformer.kernels import ensemble_predict as kernel
    gen = torch.Generator().manual_seed(12)
    scores = torch.rand(3, 4, 7, 19, generator=gen).to(DEVICE)
    out = torch.full((3, 13, 29), -1, dtype=torch.int64, device=DEVICE)  # poison: -1 is never a class
    kernel.upsampled_argmax(scores, (13, 29), True, out=out)
    ref = reference.resize(scores.permute(0, 3, 1, 2).double(), (13, 29), True).argmax(1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_no_full_resolution_tensor(backend):
    B, N, H, W = 2, 7, 37, 45
    gen = torch.Generator().manual_seed(13)
    xs = random_maps(B, N, [(10, 12), (5, 6), (3, 3)], gen=gen)
    rec = AllocationRecorder()
    with rec, ops.use_backend(backend):
        ops.ensemble_predict(xs, (H, W), "mean")
    full_res_bytes = B * N * H * W * 2  # even a float16 (B, N, H, W) tensor is this big
    if backend == "reference":
        assert max(rec.nbytes) >= full_res_bytes  # the recorder does see full-resolution tensors
    else:
        assert B * N * 10 * 12 in rec.numels  # ...and it sees inside the custom op
        assert max(rec.nbytes) < full_res_bytes


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(14)
    xs = random_maps(2, 7, [(6, 7), (3, 4)], gen=gen)
    with ops.use_backend("triton"):
        labels = torch.compile(lambda m: ops.ensemble_predict(m, (15, 17), "product"),
                               fullgraph=True, backend="aot_eager")(xs)
    _check_labels(labels, xs, (15, 17), "product", False)


@pytest.mark.parametrize("backend", FAST)
def test_custom_op_registration_checks(backend):
    gen = torch.Generator().manual_seed(15)
    xs = random_maps(1, 5, [(4, 5), (2, 3)], gen=gen)
    torch.library.opcheck(predict_mod._predict, (xs, 9, 7, "vote", True, backend),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_arguments_are_named():
    xs = random_maps(1, 5, [(4, 5)])
    with ops.use_backend("triton"):
        with pytest.raises(ValueError, match="merge"):
            ops.ensemble_predict(xs, (9, 7), "median")
        with pytest.raises(ValueError, match="size"):
            ops.ensemble_predict(xs, (0, 7))


# ---------------------------------------------------------------------------------------------
# Triton's merge_scores step (every learner read once, the merged scores written once)

pred_kernel = importlib.import_module("senformer.kernels.ensemble_predict")

MERGE_SIZES = [
    [(9, 37)],                                          # one learner: its softmax
    [(9, 37), (4, 11), (9, 37), (3, 1)],                # a second finest-size learner, a single column
    [(6, 5), (3, 3), (6, 5), (2, 2), (1, 4), (3, 2)],   # 6 learners: two launches, the second accumulates
    [(5, 6), (11, 13)],                                 # a learner finer than the first: resized down
    [(3, 70), (2, 9)],                                  # rows wider than the GPU config's 64-pixel blocks
]


def _merge_inputs(sizes, gen):
    """float32 learners, scale 3 (peaked softmaxes); the 2nd stored channels-last, the 3rd strided."""
    xs = [(3 * torch.randn(2, 21, h, w, generator=gen)).to(DEVICE) for h, w in sizes]
    if len(xs) > 1:
        xs[1] = xs[1].contiguous(memory_format=torch.channels_last)
    if len(xs) > 2:
        xs[2] = strided(xs[2])
    return xs


@pytest.mark.parametrize("config", ["own", "gpu"])
@pytest.mark.parametrize("row_align", [1, 16])
@pytest.mark.parametrize("sizes", MERGE_SIZES, ids=lambda s: f"M{len(s)}w{s[0][1]}")
@pytest.mark.parametrize("merge", ["mean", "product", "vote"])
def test_triton_merge_scores_step_matches_float64(merge, sizes, row_align, config, monkeypatch):
    # Against reference.merged_scores in float64 of the same float32 inputs; the output buffer
    # starts NaN, so an element (or a pad lane) the kernel skips shows. "gpu": the GPU's launch
    # configuration (one row per program) also under the interpreter.
    monkeypatch.setattr(pred_kernel, "alloc", lambda shape, dtype, device: torch.full(
        shape, float("nan"), dtype=dtype, device=device))
    real_config = pred_kernel._merge_config
    if config == "gpu":
        monkeypatch.setattr(pred_kernel, "_merge_config", lambda n, h, w, interpret: real_config(n, h, w, False))
    assert real_config(32, 3, 70, False)[1:] == (64, 8, True)  # so w = 70 takes two programs per row
    gen = torch.Generator().manual_seed(len(sizes) * 10 + row_align)
    xs = _merge_inputs(sizes, gen)
    B, N, h1, w1 = xs[0].shape
    for align in (False, True):
        got = pred_kernel.merge_scores(xs, merge, align, row_align)
        want = reference.merged_scores([x.double() for x in xs], merge, align).permute(0, 2, 3, 1)
        assert got.dtype == torch.float32 and got.shape == want.shape and got.stride(-1) == 1
        ld = N if row_align == 1 else 32
        assert got.stride()[:3] == (h1 * w1 * ld, w1 * ld, ld)
        tol = 4e-6 if merge == "product" else 1e-6  # fp32 sums of M log-softmaxes of size ~10
        assert (got.double() - want.cpu()).abs().max().item() < tol
        if row_align > 1:
            pad = got.as_strided((B, h1, w1, ld), got.stride())[..., N:]
            assert torch.equal(pad, torch.zeros_like(pad))


@pytest.mark.parametrize("merge", ["mean", "product", "vote"])
def test_triton_merge_scores_nan_and_half_inputs(merge):
    # A NaN logit makes its pixel's row NaN in every class, as the reference's softmax (and vote's
    # p * one_hot) does; bfloat16 learners are merged in fp32 after the cast.
    gen = torch.Generator().manual_seed(21)
    xs = [(3 * torch.randn(1, 9, h, w, generator=gen)).to(DEVICE) for h, w in ((5, 7), (2, 3))]
    xs[0][0, 4, 1, 2] = float("nan")
    got = pred_kernel.merge_scores(xs, merge, False)
    want = reference.merged_scores([x.double() for x in xs], merge, False).permute(0, 2, 3, 1).cpu()
    assert torch.equal(got.isnan().cpu(), want.isnan()) and got[0, 1, 2].isnan().all()
    assert (got.double().cpu() - want).nan_to_num().abs().max().item() < 4e-6
    half = [x.nan_to_num().to(torch.bfloat16) for x in xs]
    got = pred_kernel.merge_scores(half, merge, True)
    want = reference.merged_scores([x.double() for x in half], merge, True).permute(0, 2, 3, 1).cpu()
    assert got.dtype == torch.float32 and (got.double().cpu() - want).abs().max().item() < 4e-6


def test_triton_merge_scores_rejects_unknown_merge():
    with pytest.raises(ValueError, match="merge"):
        pred_kernel.merge_scores(random_maps(1, 5, [(4, 5)]), "median", False)


@pytest.mark.parametrize("variant", pred_kernel.VARIANTS)
def test_triton_predict_runs_the_design_it_names(variant, monkeypatch):
    # The default design merges in its kernel (one launch for up to 4 learners); "torch-merge", kept
    # for the benchmark, never launches it. Same labels either way.
    gen = torch.Generator().manual_seed(22)
    xs = random_maps(2, 19, [(10, 12), (5, 6), (3, 3), (2, 2)], gen=gen)
    launched = spy_launches(monkeypatch, pred_kernel, "_merge_kernel")
    with ops.use_backend("triton", strict=True), pred_kernel.use_variant(variant):
        labels = ops.ensemble_predict(xs, (37, 45), "product")
    assert launched == (["_merge_kernel"] if variant == "fused-merge" else [])
    assert _check_labels(labels, xs, (37, 45), "product", False) == 0
    assert pred_kernel.VARIANTS[0] == "fused-merge" and pred_kernel.current_variant() == "fused-merge"


_SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from senformer.kernels import ensemble_predict as pr

for n in (19, 150):
    block_n, block_p, warps = pr._launch_config(n, 512 * 512, interpret=False)
    sig = {"s_ptr": "*fp32", "out_ptr": "*i64", "N": "i32", "H": "i32", "W": "i32", "h": "i32", "w": "i32",
           "map_numel": "i64", "scale_h": "fp32", "scale_w": "fp32",
           "ALIGN_CORNERS": "constexpr", "BLOCK_P": "constexpr", "BLOCK_N": "constexpr"}
    triton.compile(ASTSource(fn=pr._upsample_argmax_kernel, signature=sig,
                             constexprs={"ALIGN_CORNERS": n == 19, "BLOCK_P": block_p, "BLOCK_N": block_n}),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
print("compiled")
"""


def test_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter never lowers to PTX; compile the real GPU path (H100 target) ahead of time."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True,
                         timeout=600)
    if res.returncode != 0 and ("ptxas" in res.stderr and "not found" in res.stderr.lower()):
        pytest.skip("triton's bundled ptxas is unavailable")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# GPU: the paper's shapes (B=8, N=150, learner maps 1/4..1/32 of 512x512), N=19 and N=171 too

# Every merge in fp32; 16-bit inputs with the mean merge (the merges run in fp32 after the cast, so
# a 16-bit x merge grid would only repeat them within the suite's time box).
GPU_CASES = [(dt, m) for dt in (torch.float32,) for m in ("mean", "product", "vote")] + \
            [(dt, "mean") for dt in (torch.bfloat16, torch.float16)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype,merge", GPU_CASES)
@pytest.mark.parametrize("N", [150, 19, 171])
def test_paper_shapes_gpu(N, dtype, merge, backend):
    gen = torch.Generator().manual_seed(N + 7)
    xs = random_maps(8, N, [(128, 128), (64, 64), (32, 32), (16, 16)], dtype=dtype, gen=gen)
    poison_cuda_cache()
    with ops.use_backend(backend):
        labels = ops.ensemble_predict(xs, (512, 512), merge)
    assert labels.device.type == "cuda"
    if merge == "vote":
        # A learner whose top-2 logits tie within fp32 rounding may vote for the other class (a
        # discrete flip, not a small error): allow a few such pixels in 2M, never more.
        want = reference.ensemble_predict([x.double() for x in xs], (512, 512), merge)
        assert (labels != want).float().mean().item() < 1e-5
    else:
        # fp32 merge of the (rounded) inputs: only near-ties of the float64 scores may differ
        _check_labels(labels, xs, (512, 512), merge, False)

# ---------------------------------------------------------------------------------------------
# senformer._C specifics: the op's one chain over the CPU steps (merge_scores, upsampled_argmax) against
# the float64 reference, float64 included (the public dispatcher sends float64 to the reference).

needs_ext = pytest.mark.skipif(not extension_loaded(), reason="senformer._C is not built (pip install -e .)")


def EXT_OP(logits, h, w, merge, align):
    return predict_mod._predict(list(logits), h, w, merge, align, "cpu")


def ext_make(B=2, N=7, sizes=((9, 11), (5, 6), (3, 3)), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [2 * torch.randn(B, N, h, w, generator=g, dtype=torch.float64).to(dtype) for h, w in sizes]


@needs_ext
@pytest.mark.parametrize("merge", ["mean", "product", "vote"])
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("size", [(21, 17), (9, 11), (4, 5)])
def test_float64_labels_equal_reference(merge, align, size):
    logits = ext_make(seed=stable_seed(merge, align, size))
    got = EXT_OP(logits, size[0], size[1], merge, align)
    want = reference.ensemble_predict(logits, size, merge, align)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want)


@needs_ext
@pytest.mark.parametrize("merge", ["mean", "product", "vote"])
def test_float32_through_dispatcher(merge):
    logits = ext_make(N=19, dtype=torch.float32, seed=1)
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


@needs_ext
def test_non_contiguous_inputs():
    logits = ext_make(N=6, seed=2)
    nc = [x.transpose(2, 3).contiguous().transpose(2, 3) for x in logits]
    nc[0] = strided(logits[0])
    assert not nc[0].is_contiguous()
    got = EXT_OP(nc, 15, 13, "mean", False)
    assert torch.equal(got, reference.ensemble_predict(logits, (15, 13), "mean"))


@needs_ext
def test_bad_arguments():
    logits = ext_make(seed=3)
    with pytest.raises(ValueError, match="merge"):
        torch.ops.senformer.merge_scores(logits, "median", False)
    with pytest.raises(ValueError, match=r"logits\[2\]"):
        torch.ops.senformer.merge_scores(logits[:2] + [logits[2][:1]], "mean", False)
    scores = torch.ops.senformer.merge_scores(logits, "mean", False)
    with pytest.raises(ValueError, match="size"):
        torch.ops.senformer.upsampled_argmax(scores, 0, 8, False)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.senformer.upsampled_argmax(scores.transpose(1, 2), 8, 8, False)


@needs_ext
def test_first_nan_wins_as_in_torch_argmax():
    # A NaN after the maximum (and past the first vector chunk) must still win, as in torch.argmax.
    scores = torch.rand(1, 2, 2, 40, dtype=torch.float64)
    scores[..., 3] = 5.0
    scores[..., 37] = float("nan")
    got = torch.ops.senformer.upsampled_argmax(scores, 3, 3, False)
    want = torch.nn.functional.interpolate(scores.permute(0, 3, 1, 2), size=(3, 3), mode="bilinear").argmax(1)
    assert torch.equal(got, want) and (got == 37).all()


@needs_ext
def test_meta_kernel_shape():
    logits = [torch.empty(3, 5, 8, 8, device="meta")]
    out = EXT_OP(logits, 31, 17, "vote", False)
    assert out.shape == (3, 31, 17) and out.dtype == torch.int64 and out.device.type == "meta"


@needs_ext
@pytest.mark.parametrize("N", [16, 17, 31, 150])
@pytest.mark.parametrize("size", [(23, 41), (3, 5)], ids=["up", "down"])
def test_float32_argmax_step_lanes(N, size):
    # The float step compares 16 classes per instruction, a ragged N with one overlapping last step:
    # labels against the float64 argmax of the same float32 scores (only near-ties may differ), exact
    # ties to the lowest class, and the first NaN / infinite scores as torch.argmax.
    g = torch.Generator().manual_seed(N * 100 + size[0])
    scores = (3 * torch.randn(2, 7, 11, N, generator=g)).contiguous()
    got = torch.ops.senformer.upsampled_argmax(scores, size[0], size[1], False)
    probs = torch.nn.functional.interpolate(scores.double().permute(0, 3, 1, 2), size=size, mode="bilinear")
    want = probs.argmax(1)
    diff = got != want
    if diff.any():
        top2 = probs.topk(2, dim=1).values
        assert ((top2[:, 0] - top2[:, 1])[diff] < 1e-5).all()
    assert diff.float().mean().item() < 1e-3

    flat = torch.rand(1, 3, 4, N, generator=g)  # the same class vector at every pixel: blends tie exactly
    flat[..., :] = flat[:1, :1, :1]
    for tie in ([N - 1, 0], [5, N - 2], [N - 16, N - 1]) + (([3, 19],) if N > 19 else ()):  # 3, 19: one lane
        s = flat.clone()
        s[..., tie] = 2.0
        out = torch.ops.senformer.upsampled_argmax(s, *size, False)
        assert (out == min(tie)).all(), (tie, out.unique())
    for bad, where in ((float("nan"), [N - 1]), (float("nan"), [N - 3, 1]), (float("inf"), [N - 2]),
                       (float("-inf"), list(range(N)))):
        s = torch.randn(1, 3, 4, N, generator=g)
        s[..., where] = bad
        got = torch.ops.senformer.upsampled_argmax(s, *size, False)
        want = torch.nn.functional.interpolate(s.permute(0, 3, 1, 2), size=size, mode="bilinear").argmax(1)
        assert torch.equal(got, want), (bad, where)


@needs_ext
@pytest.mark.parametrize("merge", ["mean", "product"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N", [21, 5, 16])
def test_merge_scores_step_equals_reference(merge, dtype, N):
    # The CPU merge builds each finest-grid row from every learner in cache: two learners at the
    # finest size (rows of 37 = 16 + 16 + 5 pixels), coarser ones resized, one of them upsampled
    # from a single column; values against reference.merged_scores in float64. N: the float kernel's
    # 16-lane class vectors with a ragged last one, only one, none ragged.
    g = torch.Generator().manual_seed((7 if merge == "mean" else 8) + N)
    sizes = [(9, 37), (4, 11), (9, 37), (3, 1)]
    logits = [3 * torch.randn(2, N, h, w, generator=g, dtype=torch.float64).to(dtype) for h, w in sizes]
    for align in (False, True):
        got = torch.ops.senformer.merge_scores(logits, merge, align)
        want = reference.merged_scores([x.double() for x in logits], merge, align).permute(0, 2, 3, 1)
        assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        if merge == "product" and dtype == torch.float32:  # P's error: the log-space sum's rounding
            tol = 2e-7 * max(1.0, sum(torch.log_softmax(reference.resize(x.double(), sizes[0], align), 1).abs()
                                      for x in logits).max().item())
        assert (got.double() - want).abs().max().item() < tol
