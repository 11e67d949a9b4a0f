"""ensemble_cross_entropy: the SenFormer training loss fused with the learners' upsampling (DESIGN.md, op 3).

One chain for every fast backend (``senformer_fused::ensemble_cross_entropy``); the backends differ
only at the kernel-level steps (kernels/ensemble_ce.py for Triton, the same steps of senformer._C for
``cpu`` / ``cuda``, see ``_kernels``); a step a backend lacks is done in plain torch here:
  1. low resolution: E = log(clamp(S, eps)) of S = sum_i softmax(U_i), U_i = resize(X_i -> (h1, w1)),
     channels-last (for Triton with class rows padded to the kernel's ROW_ALIGN, so its gathers
     vectorise), and clamp's pass mask S >= eps -- one pass of the backend's ``log_sum_scores`` step,
     else plain torch one learner at a time;
  2. full resolution, ``upsampled_ce`` once per map (E, then each U_i): per pixel, bilinear samples of
     the map for all classes, the NLL sum, the valid count and, when a gradient is wanted, the raw
     gradient sums reduced back onto (h1, w1) -- in the forward pass (as Liger-Kernel does), so the
     backward never revisits the full-resolution target (the Triton step's default design reduces
     per tile of low-res cells, deterministic with no atomics; see kernels/ensemble_ce.py);
  3. still in the forward: those sums pushed through the small chain -- dS from dE (``log_sum_grad``,
     else by hand), per learner U_i and softmax's backward (``learner_map``, else aten's softmax
     and its backward), the resize's adjoint (aten's bilinear backward; for a resized learner the
     backend's ``learner_grads`` does the softmax backward and both adjoints in one pass instead)
     -- to dL_ens/dX_i and dL_learn/dX_i at the learners' own sizes, the only tensors saved; the
     backward just scales them by the incoming gradients and casts (``combine_grads``, else three
     aten ops).
At most about four (B, h1, w1, N) grids are alive at once, never a (B, N, H, W) one.

Label check: the step reports how many labels are outside [0, N) and one such value;
bad pixels count as ignored meanwhile, so the loss stays finite. Reading that record needs a host
sync, so on CUDA the check has two modes (``label_check=`` or ``SENFORMER_LABEL_CHECK``):
- ``"deferred"`` (default): the record is copied asynchronously to pinned memory and inspected by
  this op's backward if the copy has already landed (never waiting), else at the start of the op's
  next forward (waiting, which in a training loop is for a kernel of the previous step, long
  finished), or by ``check_pending_labels()``. The ValueError names the value and says it comes from
  an earlier call.
- ``"eager"``: the call waits for its own record and raises before returning (one sync per call).
Inside CUDA-graph capture nothing may sync or be read back, so there the host check is skipped
(bad labels count as ignored, silently): check the labels before capturing. On the CPU
(interpreter) the check is always eager. ``SENFORMER_SYNC_CHECKS=1`` is a synonym of ``eager``.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import _checks, _kernels, reference
from ._dispatch import deterministic_requested, resolve

_OP = "ensemble_cross_entropy"


def ensemble_cross_entropy(logits, target, ignore_index=255, align_corners=False, eps=1e-15, label_check=None):
    """Returns ``(loss_ensemble, loss_learners)`` (float32 scalars; float64 for float64 maps).

    logits: list of M learner maps (B,N,h_i,w_i), finest first; target (B,H,W) integer labels.
    Pixels equal to ``ignore_index`` are skipped; if all are, both losses are 0 with zero gradients.
    A label outside [0, N) that is not ``ignore_index`` raises ValueError: at once on the CPU and
    with ``label_check="eager"``, from a later call with ``"deferred"`` (the CUDA default, no sync);
    see the module docstring."""
    op = "ensemble_cross_entropy"
    logits = list(logits)
    _checks.check_maps(op, logits)
    _checks.check_target(op, logits, target)
    eager = label_check_mode(label_check) == "eager"
    backend = resolve(op, logits[0], has_triton=True)
    if backend == "reference":
        return reference.ensemble_cross_entropy(logits, target, ignore_index, align_corners, eps)
    return _fused_ensemble_ce(logits, target, int(ignore_index), bool(align_corners), float(eps), eager, backend)


# ----------------------------------------------------------------------------------------------
# Deferred label check

_pending: list = []  # (pinned host summary, cuda event, num_classes, ignore_index) of unchecked calls


def _raise_if_bad(summary, num_classes: int, ignore_index: int, deferred: bool):
    n_bad, value = (int(v) for v in summary)
    if n_bad > 0:
        when = " (found by the deferred device-side check of an earlier call)" if deferred else ""
        raise ValueError(f"{_OP}: target contains label {value}, outside [0, {num_classes}) and not "
                         f"ignore_index={ignore_index}{when}")


def check_pending_labels(wait: bool = True):
    """Inspect the label checks of earlier CUDA calls (``wait=False``: only those already finished on
    the device); raises ValueError on a bad label. A no-op inside CUDA-graph capture (no sync there)."""
    if _pending and _capturing():
        return
    while _pending:
        host, event, n, ig = _pending[0]
        if wait:
            event.synchronize()
        elif not event.query():
            return
        _pending.pop(0)
        _raise_if_bad(host.tolist(), n, ig, deferred=True)


LABEL_CHECKS = ("deferred", "eager")


def label_check_mode(label_check: str | None = None) -> str:
    """``label_check`` if given, else ``SENFORMER_LABEL_CHECK`` (``SENFORMER_SYNC_CHECKS=1`` = eager),
    else ``deferred``."""
    mode = label_check
    if mode is None:
        mode = os.environ.get("SENFORMER_LABEL_CHECK", "").strip().lower() or None
    if mode is None:
        mode = "eager" if os.environ.get("SENFORMER_SYNC_CHECKS", "0") == "1" else "deferred"
    if mode not in LABEL_CHECKS:
        raise ValueError(f"{_OP}: label_check must be one of {LABEL_CHECKS}, got {mode!r}")
    return mode


def _capturing(device: torch.device | None = None) -> bool:
    """Whether the current CUDA stream is capturing a graph (never without CUDA in use)."""
    if device is not None and device.type != "cuda":
        return False
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _check_labels(bad_summary: torch.Tensor, num_classes: int, ignore_index: int, eager: bool):
    if _capturing(bad_summary.device):
        return  # no sync, no read-back and no pinned copy may happen inside graph capture
    if bad_summary.device.type != "cuda" or eager:
        _raise_if_bad(bad_summary.tolist(), num_classes, ignore_index, deferred=False)
        return
    host = torch.empty(2, dtype=torch.int64, pin_memory=True)
    host.copy_(bad_summary, non_blocking=True)  # on the current stream of bad_summary's device
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(bad_summary.device))  # that stream, whichever GPU is current
    _pending.append((host, event, num_classes, ignore_index))


# ----------------------------------------------------------------------------------------------
# The one autograd chain of every fast backend

def _padded_rows(n: int, row_align: int) -> int:
    """The row stride of a channels-last grid of n classes padded to row_align (as the kernels'
    kernels/_launch.padded_rows; that module imports triton, which ``import senformer`` must not)."""
    return -(-n // row_align) * row_align if row_align > 1 else n


def _learner_cl(x: torch.Tensor, h1: int, w1: int, align_corners: bool, acc: torch.dtype,
                row_align: int = 1) -> torch.Tensor:
    """U_i = resize(X_i -> (h1, w1)) as a channels-last (B, h1, w1, N) grid: each pixel's class scores
    one contiguous vector, for the kernels and for last-dim softmaxes. ``row_align`` > 1: the vectors
    start row_align elements apart (a [..., :N] view of a padded buffer), so kernel loads vectorise."""
    x = x.detach().to(acc)
    if tuple(x.shape[-2:]) != (h1, w1):
        x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(h1, w1), mode="bilinear",
                          align_corners=align_corners)
    n = x.shape[1]
    if row_align <= 1 or n % row_align == 0:
        return x.permute(0, 2, 3, 1).contiguous()
    buf = x.new_empty((x.shape[0], h1, w1, _padded_rows(n, row_align)))
    buf[..., n:].zero_()  # the kernel reads padding (then drops it): finite values, no NaN arithmetic
    return buf[..., :n].copy_(x.permute(0, 2, 3, 1))


def _to_input_grid(d: torch.Tensor, x: torch.Tensor, align_corners: bool, deterministic: bool) -> torch.Tensor:
    """Adjoint of the resize X_i -> (h1, w1) applied to d (B, h1, w1, N): a (B, N, h_i, w_i) gradient."""
    g = d.permute(0, 3, 1, 2)  # a view: aten's bilinear backward reads channels-last memory as is
    if tuple(x.shape[-2:]) == tuple(g.shape[-2:]):
        return g.contiguous()  # the custom op's outputs have the fake kernel's (contiguous) strides
    if deterministic and g.device.type == "cuda":  # aten's CUDA bilinear backward scatters with atomics
        return reference.resize_backward_by_matrices(g, x.shape[-2:], align_corners)
    return torch.ops.aten.upsample_bilinear2d_backward(g, list(g.shape[-2:]), list(x.shape), align_corners, None,
                                                       None).contiguous()


def _log_sum(kern, logits, h1: int, w1: int, align_corners: bool, eps: float, acc: torch.dtype, row_align: int,
             need_grad: bool):
    """(E, active): E = log(clamp(S, eps)) of S = sum_i softmax(U_i) and clamp's pass mask S >= eps
    (None without a gradient, unless the backend's step gives it anyway). A backend with a
    ``log_sum_scores`` step does it all in one pass (every learner read once, no resized map or
    softmax grid); else plain torch, one learner at a time."""
    if hasattr(kern, "log_sum_scores"):
        return kern.log_sum_scores(logits, align_corners, row_align, eps)
    s = None
    for x in logits:
        u = _learner_cl(x, h1, w1, align_corners, acc, row_align)
        p = torch.softmax(u, dim=-1)
        if s is None:
            # A padded U_1 is this op's own buffer: S keeps its rows. An unpadded one may be a
            # view of the caller's tensor (channels-last input at the finest size): never written.
            s = u.copy_(p) if u.stride(-2) != u.shape[-1] else p
        else:
            s.add_(p)
        del u, p
    active = s >= eps if need_grad else None  # clamp passes the gradient where S >= eps, as torch's does
    return s.clamp_(min=eps).log_(), active


def _finest_rows(kern, n_cls: int) -> int:
    """0, or the row stride of the (B, h1, w1, rows) float grid in which the finest learner's own
    gradient is saved: a backend whose ``combine_grads`` reads a channels-last d_learn
    (``COMBINE_TRANSPOSES``) gets the full-resolution step's grid as it is, so the forward never
    copies it class-major. The custom op's fake returns that same shape."""
    if not (getattr(kern, "COMBINE_TRANSPOSES", False) and hasattr(kern, "combine_grads")):
        return 0
    return _padded_rows(n_cls, getattr(kern, "ROW_ALIGN", 1))


def _grid_buffer(g: torch.Tensor, rows: int) -> torch.Tensor:
    """The (B, h, w, rows) buffer whose [..., :N] is the grid g (B, h, w, N): g's own memory when g is
    such a view (the full-resolution step's padded gradient), else a copy."""
    B, h, w, n = g.shape
    dense = (h * w * rows, w * rows, rows, 1)
    end = (g.storage_offset() + B * h * w * rows) * g.element_size()
    if g.stride() == dense and g.untyped_storage().nbytes() >= end:
        return g.as_strided((B, h, w, rows), dense)
    buf = g.new_empty((B, h, w, rows))
    buf[..., :n].copy_(g)
    return buf


def _fused(logits, target, ignore_index: int, align_corners: bool, eps: float, need_grad: bool, eager_check: bool,
           backend: str):
    """Losses' NLL sums, valid count and (need_grad) the unscaled gradients of those sums.

    Low resolution in torch, full resolution only in the backend's ``upsampled_ce`` step, one map at
    a time, so at most a handful of (B, h1, w1, N) grids are alive at once and never a (B, N, H, W)
    one. The gradient of the small chain is taken here, in the forward (it needs the same softmaxes);
    the backward only scales it by the incoming gradients."""
    kern = _kernels.steps(backend, "ensemble_ce")
    row_align = getattr(kern, "ROW_ALIGN", 1)
    deterministic = deterministic_requested(None)
    x0 = logits[0]
    _, n_cls, h1, w1 = x0.shape
    acc = reference.acc_dtype(x0.dtype)

    def per_pixel(grid, grad):
        return kern.upsampled_ce(grid.unsqueeze(0), target, ignore_index, align_corners, grad, deterministic)

    e, active = _log_sum(kern, logits, h1, w1, align_corners, eps, acc, row_align, need_grad)
    sums_e, count, bad, g = per_pixel(e, need_grad)
    _check_labels(bad, n_cls, ignore_index, eager_check)
    sums = [sums_e.reshape(())]
    d_s = None
    if need_grad:
        if hasattr(kern, "log_sum_grad"):
            d_s = kern.log_sum_grad(g[0], e, active)
        else:
            d_s = g[0].mul_(e.neg_().exp_()).mul_(active)  # dE/dS = 1 / clamp(S, eps) = exp(-E)
    del e, active, g
    m = len(logits)
    learner_sums, d_ens, d_learn = [None] * m, [None] * m, [None] * m
    fused_learner = hasattr(kern, "learner_map")
    finest_rows = _finest_rows(kern, n_cls)
    # The finest learner last: its softmax backward is dS's last use, so dS is freed before that
    # learner's full-resolution step allocates G -- one (B, h1, w1, N) grid less at the peak.
    for i in [*range(1, m), 0]:
        x = logits[i]
        # A resized learner's two gradients come from one pass of ``learner_grads`` after its full-
        # resolution step: dU never exists at (h1, w1), and no aten adjoint reads it back.
        late = need_grad and hasattr(kern, "learner_grads") and tuple(x.shape[-2:]) != (h1, w1)
        if fused_learner:  # U and its softmax's backward in one pass (d is None without a gradient)
            u, d = kern.learner_map(x, (h1, w1), align_corners, row_align, None if late else d_s)
            if i == 0:
                d_s = None
        else:
            u = _learner_cl(x, h1, w1, align_corners, acc, row_align)
        sums_i, _, _, g = per_pixel(u, need_grad)
        learner_sums[i] = sums_i.reshape(())
        if late:
            del u
            d_ens[i], d_learn[i] = kern.learner_grads(x, d_s, g[0], align_corners)
            del g
        elif need_grad:
            if not fused_learner:
                p = torch.softmax(u, dim=-1)
                # softmax's own backward, p * (dS - <p, dS>): one pass, no (p * dS) grid
                d = torch.ops.aten._softmax_backward_data(d_s, p, -1, p.dtype)
                del p
                if i == 0:
                    d_s = None
            del u
            d_ens[i] = _to_input_grid(d, x, align_corners, deterministic)
            if finest_rows and i == 0:  # saved channels-last: combine_grads transposes it
                d_learn[i] = _grid_buffer(g[0], finest_rows)
            else:
                d_learn[i] = _to_input_grid(g[0], x, align_corners, deterministic)
            del d, g
    sums += learner_sums
    if not need_grad:
        return torch.stack(sums).to(acc), count.to(acc), []
    return torch.stack(sums).to(acc), count.to(acc), d_ens + d_learn


@torch.library.custom_op("senformer_fused::ensemble_cross_entropy", mutates_args=())
def _ce(logits: list[torch.Tensor], target: torch.Tensor, ignore_index: int, align_corners: bool, eps: float,
        need_grad: bool, eager_check: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   list[torch.Tensor]]:
    """(loss_ensemble, loss_learners, valid count, [d sums_E / dX_i ..., d sum_k sums_U_k / dX_i ...])."""
    check_pending_labels()
    with torch.no_grad():
        sums, count, grads = _fused(logits, target, ignore_index, align_corners, eps, need_grad, eager_check, backend)
    inv = 1.0 / count.clamp(min=1.0)  # all pixels ignored -> 0 / 1 = 0, never NaN
    return sums[0] * inv, sums[1:].sum() * inv / len(logits), count, grads


@_ce.register_fake
def _(logits, target, ignore_index, align_corners, eps, need_grad, eager_check, backend):
    acc = reference.acc_dtype(logits[0].dtype)
    scalar = logits[0].new_empty((), dtype=acc)
    # Fresh tensors for both halves: repeating the list would make the outputs alias each other.
    grads = [x.new_empty(x.shape, dtype=acc) for _ in range(2) for x in logits] if need_grad else []
    b, n, h1, w1 = logits[0].shape
    rows = _finest_rows(_kernels.steps(backend, "ensemble_ce"), n)
    if need_grad and rows:
        grads[len(logits)] = logits[0].new_empty((b, h1, w1, rows), dtype=acc)
    return scalar, scalar.clone(), scalar.clone(), grads


@torch.library.custom_op("senformer_fused::combine_grads", mutates_args=())
def _combine(d_ens: torch.Tensor, d_learn: torch.Tensor, scale_e: torch.Tensor, scale_l: torch.Tensor,
             dtype: torch.dtype, backend: str) -> torch.Tensor:
    """The backend's ``combine_grads`` step as an op of its own: the backward is traced under
    torch.compile, and a launcher cannot run on the tracer's fake tensors."""
    return _kernels.steps(backend, "ensemble_ce").combine_grads(d_ens, d_learn, scale_e, scale_l, dtype)


@_combine.register_fake
def _(d_ens, d_learn, scale_e, scale_l, dtype, backend):
    return d_ens.new_empty(d_ens.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    logits = inputs[0]
    _, _, count, grads = output
    ctx.dtypes = [x.dtype for x in logits]
    ctx.backend = inputs[7]
    ctx.finest_rows = _finest_rows(_kernels.steps(ctx.backend, "ensemble_ce"), logits[0].shape[1])
    ctx.save_for_backward(count, *grads)
    # The saved gradients are outputs too, and never receive a gradient: without this, autograd hands
    # the backward a zero tensor for each -- as much memory again as they hold, filled, every step.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_ensemble, grad_learners, _grad_count, _grad_grads):
    count, *grads = ctx.saved_tensors
    m = len(ctx.dtypes)
    if not grads:
        raise RuntimeError(f"{_OP}: backward through a call made without gradients (need_grad=False)")
    check_pending_labels(wait=False)
    inv = 1.0 / count.clamp(min=1.0)
    scale_e = inv * (grad_ensemble if grad_ensemble is not None else 0.0)
    scale_l = inv / m * (grad_learners if grad_learners is not None else 0.0)
    fused = hasattr(_kernels.steps(ctx.backend, "ensemble_ce"), "combine_grads")
    dxs = []
    for i, (d_ens, d_learn, dtype) in enumerate(zip(grads[:m], grads[m:], ctx.dtypes)):
        if i == 0 and ctx.finest_rows:  # the full-resolution step's grid, as saved: a channels-last view
            d_learn = d_learn[..., :d_ens.shape[1]].permute(0, 3, 1, 2)
        if fused:  # one pass: both gradients read once, dx written once
            dxs.append(_combine(d_ens, d_learn, scale_e, scale_l, dtype, ctx.backend))
            continue
        dx = torch.empty(d_ens.shape, dtype=d_ens.dtype, device=d_ens.device)  # contiguous, whatever d's layout
        torch.mul(d_ens, scale_e, out=dx)
        dxs.append(dx.addcmul_(d_learn, scale_l).to(dtype))
    return dxs, None, None, None, None, None, None, None


_ce.register_autograd(_backward, setup_context=_setup_context)


def _fused_ensemble_ce(logits, target, ignore_index, align_corners, eps, eager_check, backend):
    need_grad = torch.is_grad_enabled() and any(x.requires_grad for x in logits)
    loss_e, loss_l, _, _ = _ce(logits, target, ignore_index, align_corners, eps, need_grad, eager_check, backend)
    return loss_e, loss_l
