"""Bytes each design of the ensemble ops moves through memory, counted without running anything.

The ops run on meta tensors (shapes only) under a dispatch mode that charges every aten op with the
bytes of its tensor inputs and outputs (an in-place op: its inputs, written back in place; a copy:
source read, destination written; views and allocations: nothing). The Triton kernels cannot run
on meta tensors, so each kernel-level step is replaced by a stub charged at its floor: every input
read once, every output written once (the full-resolution loss step: its low-resolution maps read,
their gradients written -- its real on-chip work and any re-reads are not counted). So the figures
compare designs' *off-chip traffic outside the kernels* plus the kernels' minimum; on the GPU each
design's time is at least its bytes over the copy bandwidth.

    python benchmarks/lowres_traffic.py [--B 8] [--N 150] [--size 512] [--dtype bfloat16]

Defaults: the paper's ADE20K training shape (4 learners at 1/4..1/32 of a 512x512 crop).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # run from a checkout without `pip install -e .`

_FREE = ("empty", "new_empty", "empty_like", "empty_strided", "lift_fresh", "_local_scalar_dense")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Traffic(TorchDispatchMode):
    """Sums the bytes every aten op reads and writes (``by_op``: per op name)."""

    def __init__(self):
        super().__init__()
        self.total, self.by_op = 0, collections.Counter()

    def charge(self, name: str, nbytes: int):
        self.total += nbytes
        self.by_op[name] += nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if func.is_view or name in _FREE:
            return out
        kw = {k: v for k, v in (kwargs or {}).items() if k != "out"}  # an out= tensor is written, not read
        ins = [t for t in tree_flatten((args, kw))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name == "copy_":
            cost = 2 * _nbytes(ins[1])
        elif name in ("zero_", "fill_"):
            cost = _nbytes(ins[0])
        elif name.endswith("_"):
            cost = sum(_nbytes(t) for t in ins)  # self read and written back: charged once more below
            cost += _nbytes(ins[0])
        else:
            cost = sum(_nbytes(t) for t in ins + outs)
        self.charge(name, cost)
        return out


@contextlib.contextmanager
def floor_steps(meter: Traffic):
    """The Triton kernel-level steps replaced by meta stubs charged at their floor. (A step wrapped in
    a custom op of its own, as the loss's combine_grads, runs its fake on meta tensors and is charged
    by the meter like any op: its inputs and output, its floor.)"""
    ce = importlib.import_module("senformer.kernels.ensemble_ce")
    ep = importlib.import_module("senformer.kernels.ensemble_predict")
    ce_ops = importlib.import_module("senformer.ops.ensemble_ce")

    def padded(shape, n, row_align, device):
        ld = -(-n // row_align) * row_align if row_align > 1 else n
        return torch.empty(*shape, ld, device=device)[..., :n]

    def merge_scores(logits, merge, align_corners, row_align=1):
        b, n, h, w = logits[0].shape
        out = padded((b, h, w), n, row_align, logits[0].device)
        meter.charge("merge_scores (floor)", sum(_nbytes(x) for x in logits) + _nbytes(out))
        return out

    def log_sum_scores(logits, align_corners, row_align=1, eps=1e-15):
        b, n, h, w = logits[0].shape
        e = padded((b, h, w), n, row_align, logits[0].device)
        active = torch.empty(b, h, w, n, dtype=torch.bool, device=e.device)
        meter.charge("log_sum_scores (floor)", sum(_nbytes(x) for x in logits) + _nbytes(e) + _nbytes(active))
        return e, active

    def log_sum_grad(d_e, e, active):
        out = torch.empty_like(d_e)
        meter.charge("log_sum_grad (floor)", _nbytes(d_e) + _nbytes(e) + _nbytes(active) + _nbytes(out))
        return out

    def learner_map(x, size, align_corners, row_align=1, d_sum=None):
        b, n, h, w = x.shape
        u = padded((b, *size), n, row_align, x.device)
        d = None
        if d_sum is not None:  # class-major when it is x's own gradient, as the kernel's
            same = (h, w) == tuple(size)
            d = torch.empty(b, n, *size, device=x.device).permute(0, 2, 3, 1) if same else \
                torch.empty(b, *size, n, device=x.device)
        meter.charge("learner_map (floor)", _nbytes(x) + _nbytes(u) + (2 * _nbytes(d) if d is not None else 0))
        return u, d

    def learner_grads(x, d_sum, g, align_corners):
        d_ens, d_learn = torch.empty(x.shape, device=x.device), torch.empty(x.shape, device=x.device)
        meter.charge("learner_grads (floor)", _nbytes(x) + _nbytes(d_sum) + _nbytes(g) + 2 * _nbytes(d_ens))
        return d_ens, d_learn

    def upsampled_ce(z, target, ignore_index, align_corners, need_grad, deterministic=False):
        # the gradient in z's (padded) row layout, as the tiled kernel allocates it
        grad = torch.empty(*z.shape[:-1], z.stride(-2), device=z.device)[..., :z.shape[-1]] if need_grad else None
        meter.charge("upsampled_ce (floor)", _nbytes(z) + _nbytes(target) + (_nbytes(grad) if need_grad else 0))
        k, dev = z.shape[0], z.device
        return (torch.empty(k, device=dev), torch.empty((), device=dev), torch.empty(2, dtype=torch.int64, device=dev),
                grad)

    def upsampled_argmax(scores, size, align_corners, out=None):
        labels = torch.empty(scores.shape[0], *size, dtype=torch.int64, device=scores.device)
        meter.charge("upsampled_argmax (floor)", _nbytes(scores) + _nbytes(labels))
        return labels

    patches = [(ce, "log_sum_scores", log_sum_scores),
               (ce, "log_sum_grad", log_sum_grad), (ce, "learner_map", learner_map),
               (ce, "learner_grads", learner_grads), (ce, "upsampled_ce", upsampled_ce),
               (ep, "merge_scores", merge_scores), (ep, "upsampled_argmax", upsampled_argmax),
               (ce_ops, "_check_labels", lambda *a, **k: None)]  # a label check reads back: not on meta
    saved = [(m, n, getattr(m, n)) for m, n, _ in patches]
    try:
        for m, n, f in patches:
            setattr(m, n, f)
        yield
    finally:
        for m, n, f in saved:
            setattr(m, n, f)


def _maps(B, N, size, dtype):
    return [torch.empty(B, N, size // s, size // s, dtype=dtype, device="meta") for s in (4, 8, 16, 32)]


def _loss_triton(logits, target):
    ce_ops = importlib.import_module("senformer.ops.ensemble_ce")
    le, ll, count, grads = ce_ops._ce._init_fn(logits, target, 255, False, 1e-15, True, True, "triton")
    ctx = type("Ctx", (), {})()
    ctx.saved_tensors, ctx.dtypes, ctx.backend = (count, *grads), [x.dtype for x in logits], "triton"
    steps = importlib.import_module("senformer.ops._kernels").steps("triton", "ensemble_ce")
    ctx.finest_rows = ce_ops._finest_rows(steps, logits[0].shape[1])
    one = torch.ones((), device="meta")
    ce_ops._backward(ctx, one, one, None, None)


def _loss_reference(logits, target):
    from senformer.ops import _checks, reference

    xs = [x.clone().requires_grad_() for x in logits]
    real, _checks.check_labels = _checks.check_labels, lambda *a, **k: None
    try:
        le, ll = reference.ensemble_cross_entropy(xs, target)
    finally:
        _checks.check_labels = real
    (le + ll).backward()


def _predict_triton(logits, size):
    pred = importlib.import_module("senformer.ops.ensemble_predict")
    pred._predict._init_fn(logits, size, size, "mean", False, "triton")


def _predict_reference(logits, size):
    from senformer.ops import reference

    reference.ensemble_predict(logits, (size, size), "mean")


def measure(B=8, N=150, size=512, dtype=torch.bfloat16) -> list[dict]:
    """[{op, design, gb, top}] for each design of the two ensemble ops (``top``: the 4 costliest ops)."""
    ce = importlib.import_module("senformer.kernels.ensemble_ce")
    ep = importlib.import_module("senformer.kernels.ensemble_predict")
    target = torch.empty(B, size, size, dtype=torch.int64, device="meta")
    runs = [("ensemble_cross_entropy fwd+bwd", "reference", None, lambda m: _loss_reference(m, target)),
            ("ensemble_cross_entropy fwd+bwd", "triton", (ce, ce.VARIANTS[0]), lambda m: _loss_triton(m, target)),
            ("ensemble_cross_entropy fwd+bwd", "triton[torch-lowres]", (ce, "torch-lowres"),
             lambda m: _loss_triton(m, target)),
            ("ensemble_cross_entropy fwd+bwd", "triton[aten-adjoint]", (ce, "aten-adjoint"),
             lambda m: _loss_triton(m, target)),
            ("ensemble_predict mean", "reference", None, lambda m: _predict_reference(m, size)),
            ("ensemble_predict mean", "triton", (ep, ep.VARIANTS[0]), lambda m: _predict_triton(m, size)),
            ("ensemble_predict mean", "triton[torch-merge]", (ep, "torch-merge"), lambda m: _predict_triton(m, size))]
    rows = []
    for op, design, variant, run in runs:
        meter = Traffic()
        use = variant[0].use_variant(variant[1]) if variant else contextlib.nullcontext()
        with use, floor_steps(meter), meter:
            run(_maps(B, N, size, dtype))
        rows.append({"op": op, "design": design, "gb": meter.total / 1e9,
                     "top": [(n, b / 1e9) for n, b in meter.by_op.most_common(4)]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--N", type=int, default=150)
    p.add_argument("--size", type=int, default=512, help="crop side; learners at 1/4..1/32 of it")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    a = p.parse_args(argv)
    rows = measure(a.B, a.N, a.size, getattr(torch, a.dtype))
    print(f"B={a.B} N={a.N} {a.size}x{a.size} {a.dtype} maps 1/4..1/32: GB through memory (aten ops counted, "
          f"kernel steps at their floor)")
    for r in rows:
        top = ", ".join(f"{n} {gb:.2f}" for n, gb in r["top"])
        print(f"  {r['op']:32s} {r['design']:22s} {r['gb']:7.2f} GB   ({top})")
    return rows


if __name__ == "__main__":
    main()
