"""Backend resolution: override precedence, env var, and warn-once fallback to the reference."""
import warnings

import pytest
import torch

from senformer import ops
from senformer.ops import _dispatch


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="unknown senformer backend"):
        with ops.use_backend("fastest"):
            pass


def test_env_var_and_context_precedence(monkeypatch):
    monkeypatch.setenv("SENFORMER_BACKEND", "reference")
    assert ops.requested_backend() == "reference"
    with ops.use_backend("triton"):
        assert ops.requested_backend() == "triton"
        with ops.use_backend(None):  # None defers to the outer choice
            assert ops.requested_backend() == "triton"
    assert ops.requested_backend() == "reference"
    monkeypatch.setenv("SENFORMER_BACKEND", "auto")
    assert ops.requested_backend() is None
    monkeypatch.setenv("SENFORMER_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SENFORMER_BACKEND"):
        ops.requested_backend()


def test_float64_always_runs_reference():
    t = torch.randn(2, 3, dtype=torch.float64)
    assert ops.resolve("mask_logits", t, has_triton=True) == "reference"


def test_unavailable_backend_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setenv("SENFORMER_STRICT_BACKEND", "0")  # a user's script: warn, then run the reference
    monkeypatch.setattr(_dispatch, "_warned", set())
    feats, cls = torch.randn(1, 6, 4), torch.randn(1, 3, 4)
    with ops.use_backend("cuda"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = ops.mask_logits(feats, cls, (2, 3))
            ops.mask_logits(feats, cls, (2, 3))
    assert torch.allclose(out, ops.reference.mask_logits(feats, cls, (2, 3)))
    msgs = [str(w.message) for w in caught if "senformer.ops" in str(w.message)]
    assert len(msgs) == 1 and "using 'reference'" in msgs[0]


def test_auto_backend_on_cpu_is_cpu_extension_or_reference():
    t = torch.randn(4, 4)
    want = "cpu" if _dispatch.extension_has("mask_logits") else "reference"
    assert ops.resolve("mask_logits", t, has_triton=True) == want


@pytest.mark.skipif(not _dispatch.extension_has("mask_logits"), reason="senformer._C not built")
def test_cpu_automatic_choice_skips_kernels_no_faster_than_the_reference(monkeypatch):
    """mask_logits' CPU kernel is the reference's own GEMMs and class_cross_attention's loses below
    CPU_MIN_KEYS keys: the automatic choice runs the reference there, an explicit request the kernel."""
    from senformer.ops.class_attention import CPU_MIN_KEYS

    ran = []
    for name in ("mask_logits", "class_cross_attention"):
        real = getattr(ops.reference, name)
        monkeypatch.setattr(ops.reference, name, lambda *a, _real=real, _name=name: (ran.append(_name), _real(*a))[1])
    gen = torch.Generator().manual_seed(3)
    feats, cls = torch.randn(2, 6, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    ops.mask_logits(feats, cls, (2, 3))
    assert ran == ["mask_logits"]
    with ops.use_backend("cpu"):
        forced = ops.mask_logits(feats, cls, (2, 3))
    assert ran == ["mask_logits"] and torch.allclose(forced, torch.matmul(cls, feats.transpose(1, 2)).view(2, 3, 2, 3))
    q = torch.randn(1, 1, 3, 8, generator=gen)
    for keys, reference_ran in ((CPU_MIN_KEYS - 1, True), (CPU_MIN_KEYS, False)):
        ran.clear()
        kv = torch.randn(1, 1, keys, 8, generator=gen)
        ops.class_cross_attention(q, kv, kv)
        assert (ran == ["class_cross_attention"]) is reference_ran, keys


def test_extension_has_checks_the_device_kernel():
    assert not _dispatch.extension_has("no_such_op")
    if _dispatch.extension_loaded():
        assert _dispatch.extension_has("ensemble_predict", "cpu")
        # an op registered for CPU/CUDA only is not offered for another device
        assert not _dispatch.extension_has("ensemble_predict", "xla")


def test_strict_request_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setenv("SENFORMER_STRICT_BACKEND", "0")
    feats, cls = torch.randn(1, 6, 4), torch.randn(1, 3, 4)
    with ops.use_backend("cuda", strict=True), pytest.raises(ops.BackendUnavailable, match="runs on cuda tensors"):
        ops.mask_logits(feats, cls, (2, 3))
    monkeypatch.setenv("SENFORMER_STRICT_BACKEND", "1")
    with ops.use_backend("cuda"), pytest.raises(ops.BackendUnavailable):
        ops.mask_logits(feats, cls, (2, 3))


_FORCED_TESTS = """
import torch
import senformer.ops as ops

def test_forces_cuda_on_cpu_tensors():
    with ops.use_backend("cuda"):
        ops.mask_logits(torch.randn(1, 6, 4), torch.randn(1, 3, 4), (2, 3))

def test_forces_triton_where_it_cannot_run():
    # float64: no fast kernel takes it, the interpreter included
    with ops.use_backend("triton"):
        ops.class_cross_attention(*(torch.randn(1, 1, 3, 8, dtype=torch.float64) for _ in range(3)))
"""


def test_a_test_forcing_a_backend_that_cannot_run_fails(pytester):
    """The suite's own setup (tests/conftest.py) makes such a test FAIL, never pass on the reference."""
    import pathlib

    pytester.makeconftest(pathlib.Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(test_forced=_FORCED_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*BackendUnavailable*"])
