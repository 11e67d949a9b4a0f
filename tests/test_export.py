"""ONNX and torch.export of the evaluation model (senformer.engine.export).

The exports are the expensive part (seconds each), so each is made once per module and shared."""
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import senformer
from senformer import ops
from senformer.engine import export as E
from senformer.engine.inference import infer_image
from senformer.errors import UserError

SIZE = (96, 128)  # not square, and no level of it (24x32 ... 3x4) is a multiple of the 7-token window


def _build(**overrides):
    torch.manual_seed(0)
    return senformer.build_model("senformer_tiny", num_classes=5, **overrides).eval()


def _image(batch, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 3, h, w), generator=g) * 255


def _eager(model, x):
    with torch.no_grad(), ops.use_backend("reference"):
        return E.ExportModule(model).eval()(x)


def _assert_agree(probs, labels, ref_probs, ref_labels):
    """Probabilities within 1e-4 of the largest; a label may differ only where the eager probabilities of
    the two labels are closer than twice the largest probability error (a near tie)."""
    probs, labels = torch.as_tensor(probs), torch.as_tensor(labels)
    assert probs.shape == ref_probs.shape and labels.shape == ref_labels.shape
    err = float((probs - ref_probs).abs().max())
    assert err <= 1e-4 * float(ref_probs.abs().max()), err
    gap = ref_probs.gather(1, ref_labels[:, None]) - ref_probs.gather(1, labels.long()[:, None])
    assert not bool(((labels != ref_labels) & (gap[:, 0] > 2 * err)).any())


def _onnx_session(path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _need_onnx():
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def model():
    return _build()


@pytest.fixture(scope="module")
def static_onnx(model, tmp_path_factory):
    _need_onnx()
    depth = len(ops._dispatch._stack())
    with ops.use_backend("cpu"):
        result = E.export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx", size=SIZE)
        inside = ops.requested_backend()
    return result, inside, depth == len(ops._dispatch._stack())


@pytest.fixture(scope="module")
def dynamic_onnx(tmp_path_factory):
    _need_onnx()
    # two learners (finest and coarsest level) keep the windowed neck and the resize to the finest grid
    # at half the trace time of the full tiny model
    small = _build(levels=(2, 5))
    return small, E.export_onnx(small, tmp_path_factory.mktemp("onnx") / "tiny_dyn.onnx", size=SIZE, dynamic=True)


def test_export_module_is_the_official_whole_image_view(model):
    rng = np.random.default_rng(0)
    img = rng.integers(1, 256, size=SIZE + (3,), dtype=np.uint8)
    ref = infer_image(model, img, scale=SIZE[::-1], protocol="official")[0]
    with torch.no_grad():
        probs, labels = E.ExportModule(model).eval()(torch.from_numpy(img).permute(2, 0, 1)[None].float())
    assert probs.shape == (1, 5) + SIZE and labels.shape == (1,) + SIZE and labels.dtype == torch.int64
    torch.testing.assert_close(probs, ref, rtol=0, atol=1e-6)
    assert torch.equal(labels, ref.argmax(1))
    assert float(probs.std()) > 1e-3  # not a flat map: the comparisons below can fail


def test_onnx_matches_eager(static_onnx, model):
    result, _, _ = static_onnx
    assert not model.training  # left in eval mode, as it was
    assert result["size"] == list(SIZE) and not result["dynamic"]
    assert result["inputs"] == {"image": [1, 3, *SIZE]}
    assert result["outputs"] == {"probs": [1, 5, *SIZE], "labels": [1, *SIZE]}
    assert result["max_rel_err"] <= 1e-4 and result["file_bytes"] > 0
    x = _image(1, *SIZE, seed=11)  # not the image the export traced or checked with
    probs, labels = _onnx_session(result["path"]).run(None, {"image": x.numpy()})
    _assert_agree(probs, labels, *_eager(model, x))


def test_onnx_graph_has_only_standard_ops(static_onnx):
    import onnx
    result, _, _ = static_onnx
    proto = onnx.load(result["path"])
    domains = {n.domain for n in proto.graph.node} | {f.domain for f in proto.functions}
    assert domains <= {"", "ai.onnx"}, domains
    assert result["op_domains"] == [""]
    assert not any("senformer" in n.op_type.lower() for n in proto.graph.node)


def test_export_leaves_the_backend_as_it_was(static_onnx):
    _, inside, balanced = static_onnx
    assert inside == "cpu" and balanced


def test_failed_export_leaves_the_backend_as_it_was():
    class Broken(nn.Module):
        def learner_logits(self, x):
            raise RuntimeError("boom")

        def head_scores(self, logits):
            return logits

    depth = len(ops._dispatch._stack())
    with pytest.raises(RuntimeError, match="boom"):
        E.export_program(Broken(), SIZE)
    assert len(ops._dispatch._stack()) == depth


def test_dynamic_onnx_runs_at_other_sizes(dynamic_onnx):
    small, result = dynamic_onnx
    assert result["inputs"] == {"image": ["batch", 3, "height", "width"]}
    assert len(result["check"]) == 2  # the export size and a second batch and size
    session = _onnx_session(result["path"])
    for batch, h, w in [(1, *SIZE), (3, 70, 101), (1, 161, 64)]:
        x = _image(batch, h, w, seed=h)
        probs, labels = session.run(None, {"image": x.numpy()})
        assert probs.shape == (batch, 5, h, w)
        _assert_agree(probs, labels, *_eager(small, x))


def test_export_program_matches_eager(model):
    model.train()
    model.backbone.eval()  # a frozen part
    ep = E.export_program(model, SIZE)
    assert model.training and model.head.training and not model.backbone.training  # each flag restored
    model.eval()
    namespaces = {str(n.target).split(".")[0] for n in ep.graph.nodes if n.op == "call_function"}
    assert not any(ns.startswith("senformer") for ns in namespaces), namespaces
    x = _image(1, *SIZE, seed=5)
    probs, labels = ep.module()(x)
    ref_probs, ref_labels = _eager(model, x)
    # The program runs decomposed ops: float32 rounding differs from eager by ~1e-6 on some CPUs
    # (oneDNN picks kernels by ISA), so a near tie may flip a label.
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=1e-5)
    _assert_agree(probs, labels, ref_probs, ref_labels)


@pytest.mark.parametrize("size", [(0, 64), (64,), (64, 64, 3), "64", (64.5, 64), (-1, 64), None])
def test_bad_size_is_a_user_error(model, size, tmp_path):
    with pytest.raises(UserError, match="size"):
        E.export_program(model, size)
    with pytest.raises(UserError, match="size"):
        E.export_onnx(model, tmp_path / "m.onnx", size=size)


def test_bad_path_opset_and_missing_packages_are_user_errors(model, tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"\.onnx"):
        E.export_onnx(model, tmp_path / "model.pt", size=SIZE)
    for opset in ("18", 17, 18.0):
        with pytest.raises(UserError, match="opset"):
            E.export_onnx(model, tmp_path / "m.onnx", size=SIZE, opset=opset)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    with pytest.raises(UserError, match="pip install onnx onnxscript"):
        E.export_onnx(model, tmp_path / "m.onnx", size=SIZE)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("n_in,n_out", [(7, 3), (4, 6), (13, 1), (5, 5), (3, 2)])
def test_pool_by_matrices_is_adaptive_avg_pool(n_in, n_out):
    x = torch.randn(2, 3, n_in, n_in + 3, dtype=torch.float64)
    ref = nn.AdaptiveAvgPool2d(n_out)(x)
    torch.testing.assert_close(E._PoolByMatrices(n_out)(x), ref)
    torch.testing.assert_close(E._PoolByMatrices((n_out, None))(x), nn.AdaptiveAvgPool2d((n_out, None))(x))


def test_ragged_trace_size_needs_padding_everywhere():
    for n in (64, 96, 128, 512):
        m = E._ragged(n, {4, 7})
        assert m >= n and all(-(-m // 2 ** j) % d for j in range(7) for d in (4, 7))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["senformer_swin_t", "upernet_r50"])
def test_dynamic_onnx_of_larger_presets(preset, tmp_path):
    _need_onnx()
    torch.manual_seed(0)
    m = senformer.build_model(preset, num_classes=5).eval()
    result = E.export_onnx(m, tmp_path / f"{preset}.onnx", size=(64, 64), dynamic=True)
    assert result["max_rel_err"] <= 1e-4 and len(result["check"]) == 2


def test_export_cli_writes_a_checked_onnx_file_from_a_run(tmp_path, capsys):
    """senformer-export CHECKPOINT OUT.onnx --size H W, from a training run's work dir."""
    _need_onnx()
    from senformer.cli import export_main, train_main
    wd = tmp_path / "run"
    assert train_main(["--model", "toy", "--iters", "1", "--work-dir", str(wd), "--num-workers", "0", "--no-progress",
                       "--set", "data.val_options.length=1", "--set", "data.crop_size=[32,32]",
                       "--device", "cpu"]) == 0
    out = tmp_path / "m.onnx"
    assert export_main([str(wd), str(out), "--size", "40", "56"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "traced at 40x56" in text and "labels equal" in text
    session = _onnx_session(out)
    probs, labels = session.run(None, {"image": _image(1, 40, 56, seed=9).numpy()})
    assert probs.shape == (1, 5, 40, 56) and labels.shape == (1, 40, 56)
    with pytest.raises(SystemExit):
        export_main([str(wd), str(tmp_path / "m.txt")])
    assert "must end in .onnx" in capsys.readouterr().err
