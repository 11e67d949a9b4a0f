"""ensemble_cross_entropy: the SenFormer training loss fused with the learners' upsampling (DESIGN.md, op 3).

Triton path (``senformer_triton::ensemble_ce_fwd`` / ``ensemble_ce_bwd``):
  1. low resolution, plain torch: U_i = resize(X_i -> (h1, w1)), E = log(clamp(sum_i softmax(U_i), eps)),
     stacked channels-last as Z (M+1, B, h1, w1, N) float32 -- the only maps ever materialised;
  2. full resolution, one kernel pass (kernels/ensemble_ce.py): per pixel, bilinear samples of every map
     for all classes, both losses' NLL sums, the valid count and, when a gradient is wanted, the raw
     gradient sums dZ scattered back to (h1, w1) -- computed in the forward pass (as Liger-Kernel does)
     so the backward never revisits the full-resolution target (under torch.use_deterministic_algorithms
     a second kernel gathers dZ per low-res cell in a fixed order instead of using fp32 atomics);
  3. backward, low resolution: scale dZ by the upstream gradients / valid count and push it through
     the small (h1, w1) chain (softmax, log, clamp by hand; resize with aten's bilinear backward).

Label check: the kernel records, per block, how many labels are outside [0, N) and one such value;
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

from . import _checks, reference
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
    backend = resolve(op, logits[0], has_triton=_triton_impl is not None)
    if backend == "triton":
        return _triton_impl(logits, target, int(ignore_index), bool(align_corners), float(eps), eager)
    if backend in ("cpu", "cuda"):
        return torch.ops.senformer.ensemble_cross_entropy(logits, target, int(ignore_index), bool(align_corners), float(eps))
    return reference.ensemble_cross_entropy(logits, target, ignore_index, align_corners, eps)


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
# Triton custom ops

def _low_res_chain(xs, align_corners: bool, eps: float):
    """U_i on the finest learner grid and E, in float32: low resolution only, never (B,N,H,W)."""
    u = reference.learner_maps(xs, align_corners)
    e = torch.log(torch.clamp(sum(torch.softmax(x, dim=1) for x in u), min=eps))
    return u, e


@torch.library.custom_op("senformer_triton::ensemble_ce_fwd", mutates_args=())
def _ce_fwd(logits: list[torch.Tensor], target: torch.Tensor, ignore_index: int, align_corners: bool,
            eps: float, need_grad: bool, eager_check: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_ensemble, loss_learners, raw gradient sums dZ (M+1,B,h1,w1,N) or empty, valid count)."""
    from senformer.kernels import ensemble_ce as kernel

    check_pending_labels()
    # Under torch.use_deterministic_algorithms the gradient is gathered per low-res cell in a fixed
    # order instead of scattered with fp32 atomics (whose summation order varies run to run on GPU).
    deterministic = deterministic_requested(None)
    with torch.no_grad():
        u, e = _low_res_chain(logits, align_corners, eps)
        # Channels-last stack: each pixel's N class scores become one contiguous vector for the gather.
        z = torch.stack([e] + u, dim=0).permute(0, 1, 3, 4, 2).contiguous()
        del u, e
        sums, count, bad, gz = kernel.ensemble_ce_sums(z, target, ignore_index, align_corners, need_grad,
                                                          deterministic)
    _check_labels(bad, logits[0].shape[1], ignore_index, eager_check)
    inv = 1.0 / count.clamp(min=1.0)
    loss_e = sums[0] * inv
    loss_l = sums[1:].sum() * inv / len(logits)
    if gz is None:
        gz = z.new_empty((0,))
    return loss_e, loss_l, gz, count


@_ce_fwd.register_fake
def _(logits, target, ignore_index, align_corners, eps, need_grad, eager_check):
    x = logits[0]
    b, n, h, w = x.shape
    scalar = x.new_empty((), dtype=torch.float32)
    gz = x.new_empty((len(logits) + 1, b, h, w, n) if need_grad else (0,), dtype=torch.float32)
    return scalar, scalar.clone(), gz, scalar.clone()


@torch.library.custom_op("senformer_triton::ensemble_ce_bwd", mutates_args=())
def _ce_bwd(logits: list[torch.Tensor], gz: torch.Tensor, count: torch.Tensor, grad_ensemble: torch.Tensor,
            grad_learners: torch.Tensor, align_corners: bool, eps: float) -> list[torch.Tensor]:
    """d(loss)/d(logits[i]) from the raw full-resolution gradient sums, through the low-res chain."""
    if gz.numel() == 0:
        raise RuntimeError(f"{_OP}: backward without the gradient buffer (forward ran with need_grad=False)")
    check_pending_labels(wait=False)
    deterministic = deterministic_requested(None)
    inv = 1.0 / count.clamp(min=1.0)
    scale_e = grad_ensemble.float() * inv
    scale_l = grad_learners.float() * inv / len(logits)
    # Hand-written chain rule: autograd is not recording inside a custom op's implementation.
    u = reference.learner_maps([x.detach() for x in logits], align_corners)
    p = [torch.softmax(x, dim=1) for x in u]
    s = sum(p)
    d_e = gz[0].permute(0, 3, 1, 2) * scale_e
    # E = log(clamp(S, eps)): clamp passes the gradient where S >= eps, as torch.clamp's backward does.
    d_s = torch.where(s >= eps, d_e / s.clamp(min=eps), torch.zeros_like(d_e))
    dxs = []
    for x, pi, gi in zip(logits, p, gz[1:]):
        d_u = pi * (d_s - (pi * d_s).sum(dim=1, keepdim=True)) + gi.permute(0, 3, 1, 2) * scale_l
        if tuple(x.shape[-2:]) != tuple(d_u.shape[-2:]):
            if deterministic:  # aten's CUDA bilinear backward scatters with atomics
                d_u = reference.resize_backward_by_matrices(d_u, x.shape[-2:], align_corners)
            else:
                d_u = torch.ops.aten.upsample_bilinear2d_backward(
                    d_u, list(d_u.shape[-2:]), list(x.shape), align_corners, None, None)
        dxs.append(d_u)
    return [d.to(x.dtype) for d, x in zip(dxs, logits)]


@_ce_bwd.register_fake
def _(logits, gz, count, grad_ensemble, grad_learners, align_corners, eps):
    return [torch.empty_like(x) for x in logits]


def _setup_context(ctx, inputs, output):
    logits, _, _, align_corners, eps, _, _ = inputs
    _, _, gz, count = output
    ctx.align_corners = align_corners
    ctx.eps = eps
    ctx.save_for_backward(gz, count, *logits)


def _backward(ctx, grad_ensemble, grad_learners, _grad_gz, _grad_count):
    gz, count, *logits = ctx.saved_tensors
    if grad_ensemble is None:
        grad_ensemble = torch.zeros_like(count)
    if grad_learners is None:
        grad_learners = torch.zeros_like(count)
    dxs = _ce_bwd(logits, gz, count, grad_ensemble, grad_learners, ctx.align_corners, ctx.eps)
    return list(dxs), None, None, None, None, None, None


_ce_fwd.register_autograd(_backward, setup_context=_setup_context)


def _triton_ensemble_ce(logits, target, ignore_index, align_corners, eps, eager_check=False):
    need_grad = torch.is_grad_enabled() and any(x.requires_grad for x in logits)
    loss_e, loss_l, _, _ = _ce_fwd(logits, target, ignore_index, align_corners, eps, need_grad, eager_check)
    return loss_e, loss_l


_triton_impl = _triton_ensemble_ce
