"""Export of the evaluation model: a ``torch.export.ExportedProgram`` and an ONNX file.

Both wrap the model in :class:`ExportModule` (raw 0..255 RGB in, class probabilities and labels out) and
trace it with every fused ``senformer.ops`` call on its plain-torch ``reference`` path, so the graph holds
only aten ops (ONNX: standard-domain ops) and no ``senformer::`` / ``senformer_triton::`` custom op.

ONNX goes through ``torch.onnx.export(dynamo=True)`` fed with our own ExportedProgram: the TorchScript
exporter (``dynamo=False``) is deprecated since torch 2.9 and bakes every size into the graph (the
models' ``int(size)`` calls are constants to its tracer), so ``--dynamic`` could not work with it.
The dynamo exporter needs the ``onnx`` and ``onnxscript`` packages; the check needs ``onnxruntime``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn

from .. import ops
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError
from ..models.module_state import eval_mode, module_device, submodules
from ..models.protocol import official_probs
from ..ops import reference
from .inference import head_scores

INPUT_NAMES = ("image",)
OUTPUT_NAMES = ("probs", "labels")
DIM_NAMES = {0: "batch", 2: "height", 3: "width"}
RTOL = 1e-4  # max |onnx - eager| over max |eager| probability
MIN_OPSET = 18


class ExportModule(nn.Module):
    """``forward(image)``: float32 RGB batch (B,3,H,W), values 0..255, not normalised ->
    ``(probs, labels)``: (B,N,H,W) float32 class probabilities and (B,H,W) int64 argmax.

    It is the official protocol's single-scale whole-image view (``inference._official_view``,
    ``mode="whole"``): ImageNet normalisation ``(x - mean) / std`` as ``transforms.normalize``, the
    decode head's scores (``inference.head_scores``: ``model.head_scores(model.learner_logits(x))`` for a
    Segmentor) resized bilinearly to the
    input's size, then softmax (``protocol.official_probs``). So for an image that needs no test
    resize (``infer_image(model, img, scale=(W, H), protocol="official")`` with ``img`` of size HxW)
    it gives the same probabilities. NOT included: the test-time rescale of the image to the
    evaluation scale (and of the probabilities back to the original size), sliding windows,
    multi-scale and flip augmentation, learner subsets and the ``fast`` protocol. Run the wrapped
    model in eval mode (the export functions do)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.align_corners = bool(getattr(model, "align_corners", False))
        # buffers, not tensors built in forward: they move with .to() and become graph constants
        for name, value in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor):
        x = (image.float() - self.mean) / self.std
        p = _first_parameter(self.model)
        if p is not None and p.is_floating_point():
            x = x.to(p.dtype)  # as infer_image: normalise in float32, run in the model's dtype
        scores = head_scores(self.model, x, [None])[0]  # the whole ensemble, as the official decode head
        scores = reference.resize(scores, x.shape[-2:], self.align_corners)
        probs = official_probs(scores, x.shape[-2:], self.align_corners).float()
        return probs, probs.argmax(dim=1)


def _first_parameter(model):
    return next(model.parameters(), None) if isinstance(model, nn.Module) else None


def _check_size(size) -> tuple:
    try:
        h, w = (int(v) for v in size)
        ok = (h, w) == tuple(size)
    except (TypeError, ValueError):
        ok = False
    if not ok or h < 1 or w < 1:
        raise UserError(f"export size must be two positive integers (height, width), got {size!r}")
    return h, w


def _example(size, batch, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 3) + tuple(size), generator=g) * 255


def _size_oblivious():
    # torch.export treats a size that is 1 in the example as a constant, and guards each view/copy
    # decision on the sizes it meets; size-oblivious reasoning drops most of those guards (and halves
    # the trace time). The flag is private, hence the fallback.
    try:
        from torch.fx.experimental import _config
        return _config.patch(backed_size_oblivious=True)
    except (ImportError, AttributeError, TypeError):
        return contextlib.nullcontext()


def _moduli(model: nn.Module) -> set:
    """The multiples the model pads its maps to (patch sizes, attention windows)."""
    found = set()
    for m in submodules(model):
        for name in ("pad_to", "patch_size", "window_size"):
            v = getattr(m, name, None)
            for x in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(x, int) and not isinstance(x, bool) and x > 1:
                    found.add(x)
    return found


def _ragged(n: int, moduli: set) -> int:
    """The smallest size >= n whose every stride-2^j map (ceil(n / 2^j), j <= 6) is a multiple of none
    of ``moduli``. A branch such as ``if h % window: pad`` only takes its padding path -- the one that is
    exact for every size, padding by 0 included -- when the traced size needs padding."""
    def ok(m):
        return all(-(-m // 2 ** j) % d for j in range(7) for d in moduli)
    return next((m for m in range(n, n + 4096) if ok(m)), n)


def _trace_size(model, size, dynamic):
    if not dynamic:
        return tuple(size)
    moduli = _moduli(model)
    return tuple(_ragged(n, moduli) for n in size)


class _PoolByMatrices(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as ``P_h @ x @ P_w^T``. For symbolic sizes torch decomposes adaptive
    pooling into gathers whose index ranges depend on the traced size (the ONNX graph then fails or is
    wrong at other sizes); the averaging matrices are built from the size itself."""

    def __init__(self, output_size):
        super().__init__()
        out = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
        self.output_size = tuple(out)

    @staticmethod
    def _matrix(n, s, like):
        # PyTorch's bins: [floor(i n / s), ceil((i + 1) n / s))
        i = torch.arange(s, device=like.device)
        start, end = (i * n) // s, ((i + 1) * n + s - 1) // s
        j = torch.arange(n, device=like.device)
        inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
        return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]

    def forward(self, x):
        (sh, sw), (h, w) = self.output_size, x.shape[-2:]
        if sh is not None:
            x = torch.matmul(self._matrix(h, sh, x), x)
        if sw is not None:
            x = torch.matmul(x, self._matrix(w, sw, x).transpose(0, 1))
        return x


@contextlib.contextmanager
def _dynamic_friendly(model: nn.Module):
    """Swap every ``nn.AdaptiveAvgPool2d`` (UperNet's pyramid pooling) for ``_PoolByMatrices`` for the
    duration of the trace; the model is restored afterwards."""
    swapped = []
    for parent in submodules(model):
        for name, child in list(parent.named_children()):
            if type(child) is nn.AdaptiveAvgPool2d:
                swapped.append((parent, name, child))
                setattr(parent, name, _PoolByMatrices(child.output_size))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def export_program(model: nn.Module, size=(512, 512), dynamic: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of ``ExportModule(model)`` traced at ``size`` = (H, W) on the reference backend.

    ``dynamic``: batch, height and width are symbolic. The trace then runs on a batch of 2 (a size-1
    example dimension would be fixed) at a nearby "ragged" size, so that every pad-to-a-multiple branch
    of the model is traced padding (``_ragged``), and ``nn.AdaptiveAvgPool2d`` is traced as averaging
    matrices (``_PoolByMatrices``). torch.export still records guards on what it met at that size:
    memory-layout decisions (is the batch 1, does a level fit in one attention window) and the padding
    branches. ``ep.module()`` checks them and refuses other inputs; ``ep.module(check_guards=False)``
    skips them. None changes the arithmetic: the ONNX graph has no such checks, and ``export_onnx``
    verifies it at ``size`` and at a second size."""
    h, w = _check_size(size)
    wrapper = ExportModule(model)
    shapes = {"image": {d: torch.export.Dim.DYNAMIC for d in DIM_NAMES}} if dynamic else None
    x = _example(_trace_size(model, (h, w), dynamic), 2 if dynamic else 1).to(module_device(model))
    # no_grad: an inference graph (with grad enabled, torch 2.14's ONNX decomposition of SDPA breaks)
    with eval_mode(wrapper), torch.no_grad(), ops.use_backend("reference"), \
            (_dynamic_friendly(model) if dynamic else contextlib.nullcontext()), \
            (_size_oblivious() if dynamic else contextlib.nullcontext()):
        return torch.export.export(wrapper, (x,), dynamic_shapes=shapes, strict=False)


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"ONNX export needs the {module} package: pip install onnx onnxscript onnxruntime") from None


@contextlib.contextmanager
def _quiet_onnxscript():
    # its optimizer logs a warning per multi-output op it leaves alone (every LayerNorm): noise to a user
    log = logging.getLogger("onnxscript")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _name_dims(onnx_program):
    """Readable names for the symbolic input/output dims (torch.export calls them s0, s1, ...)."""
    import onnx_ir as ir

    graph = onnx_program.model.graph
    rename = {str(d): DIM_NAMES[i] for i, d in enumerate(graph.inputs[0].shape)
              if i in DIM_NAMES and not isinstance(d, int)}
    for v in list(graph.inputs) + list(graph.outputs):
        if v.shape is not None:
            v.shape = ir.Shape([rename.get(str(d), d) if not isinstance(d, int) else d for d in v.shape])


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _compare(session, wrapper, x) -> dict:
    """onnxruntime vs eager (reference backend) on ``x``. A label may differ only at a near tie: where
    the eager probabilities of the two labels are within twice the largest probability error (if
    |p' - p| <= e everywhere, p'_j >= p'_i implies p_j >= p_i - 2e), which random weights make common."""
    with torch.no_grad(), ops.use_backend("reference"):
        probs, labels = (t.cpu() for t in wrapper(x.to(module_device(wrapper))))
    got_p, got_l = session.run(None, {"image": x.numpy()})
    got_p, got_l = torch.from_numpy(got_p), torch.from_numpy(got_l)
    if got_p.shape != probs.shape or got_l.shape != labels.shape:
        raise RuntimeError(f"ONNX output shapes {tuple(got_p.shape)}, {tuple(got_l.shape)} differ from eager "
                           f"{tuple(probs.shape)}, {tuple(labels.shape)} at input {tuple(x.shape)}")
    abs_err = float((got_p - probs).abs().max())
    rel_err = abs_err / max(float(probs.abs().max()), 1e-30)
    differ = got_l != labels
    gap = probs.gather(1, labels.unsqueeze(1)) - probs.gather(1, got_l.long().clamp(0, probs.shape[1] - 1).unsqueeze(1))
    bad = int((differ & (gap.squeeze(1) > 2 * abs_err)).sum())
    return {"input": list(x.shape), "max_abs_err": abs_err, "max_rel_err": rel_err,
            "labels_differ": int(differ.sum()), "labels_wrong": bad}


def export_onnx(model: nn.Module, path, size=(512, 512), dynamic: bool = False, opset=None, check: bool = True) -> dict:
    """Write ``ExportModule(model)`` traced at ``size`` = (H, W) to ``path`` (a single .onnx file, weights
    inside): input "image" (B,3,H,W) float32 0..255, outputs "probs" (B,N,H,W) and "labels" (B,H,W) int64.
    ``dynamic``: batch, height and width are free. ``opset``: the default ONNX opset (None: the exporter's).

    ``check``: onnxruntime (CPU) is run on random images -- the export size, and with ``dynamic`` also a
    second batch and size -- and compared with the eager model: RuntimeError unless the probabilities
    agree within 1e-4 of the largest one and the labels agree except at near ties (see ``_compare``).
    Without onnxruntime the check is skipped and the result says so.

    Returns a dict: path, size, dynamic, opset, file_bytes, seconds (trace, onnx, check), op_domains
    (those of the graph's nodes: only the standard "" one), versions and the check's numbers."""
    h, w = _check_size(size)
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise UserError(f"ONNX output path must end in .onnx, got {str(path)!r}")
    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET):
        # below 18 the exporter silently keeps 18 after a failed down-conversion
        raise UserError(f"opset must be an integer >= {MIN_OPSET} (the lowest the torch.export-based exporter "
                        f"writes), got {opset!r}")
    onnx = _require("onnx")
    onnxscript = _require("onnxscript")
    path.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    program = export_program(model, (h, w), dynamic)
    t1 = time.perf_counter()
    with _quiet_onnxscript(), torch.no_grad(), ops.use_backend("reference"):
        onnx_program = torch.onnx.export(program, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                                         opset_version=opset, dynamo=True, external_data=False, verbose=False)
        if dynamic:
            _name_dims(onnx_program)
        onnx_program.save(str(path), external_data=False)
    t2 = time.perf_counter()

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    domains = sorted({n.domain for n in proto.graph.node} | {f.domain for f in proto.functions})
    result = {
        "path": str(path), "size": [h, w], "dynamic": bool(dynamic),
        "trace_size": list(_trace_size(model, (h, w), dynamic)),
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "file_bytes": path.stat().st_size, "op_domains": domains,
        "inputs": {i.name: _dims(i) for i in proto.graph.input},
        "outputs": {o.name: _dims(o) for o in proto.graph.output},
        "exporter": "torch.onnx.export(dynamo=True) of a torch.export program",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__},
        "seconds": {"trace": round(t1 - t0, 2), "onnx": round(t2 - t1, 2)},
    }
    del proto
    if not check:
        result["check"] = "not requested"
        return result
    try:
        import onnxruntime as ort
    except ImportError:
        result["check"] = "skipped: onnxruntime is not installed (pip install onnxruntime)"
        return result
    result["versions"]["onnxruntime"] = ort.__version__
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper = ExportModule(model)
    inputs = [_example((h, w), 1, seed=1)]
    if dynamic:  # another batch and a ragged size: the dims must really be free
        inputs.append(_example((h // 2 + 13, w + 19), 2, seed=2))
    with eval_mode(wrapper):
        runs = [_compare(session, wrapper, xi) for xi in inputs]
    result["seconds"]["check"] = round(time.perf_counter() - t2, 2)
    result["check"] = runs
    result["max_rel_err"] = max(r["max_rel_err"] for r in runs)
    result["max_abs_err"] = max(r["max_abs_err"] for r in runs)
    failed = [r for r in runs if r["max_rel_err"] > RTOL or r["labels_wrong"]]
    if failed:
        raise RuntimeError(f"the ONNX graph written to {path} disagrees with the eager model: {failed}")
    return result
