"""Kernel-level steps by backend, under one contract.

An op's autograd chain is written once (``senformer/ops/<op>.py``); only its kernel calls differ by
backend. ``steps(backend, module)`` returns the object whose functions the chain calls: the Triton
launcher module ``senformer.kernels.<module>`` itself, or, for the compiled ``cpu`` / ``cuda``
backends, the matching ``torch.ops.senformer.*`` ops wrapped to the launchers' signatures (the C++
ops keep a fixed schema; e.g. they want an int64 contiguous target and return an empty tensor where
a launcher returns None). The contract of each step is the launcher's docstring.
"""
from __future__ import annotations

import importlib
import types

import torch


def _target_for_extension(target: torch.Tensor) -> torch.Tensor:
    return target.to(torch.int64).contiguous()


def _ext_upsampled_ce(maps, target, ignore_index, align_corners, need_grad, deterministic=False):
    # The compiled kernels are deterministic on the CPU; on CUDA the dispatcher never picks them
    # under deterministic algorithms (their gradient scatter uses atomics).
    sums, count, bad, grad = torch.ops.senformer.upsampled_ce(
        maps, _target_for_extension(target), int(ignore_index), bool(align_corners), bool(need_grad))
    return sums, count, bad, (grad if need_grad else None)


def _ext_upsampled_argmax(scores, size, align_corners):
    h, w = (int(s) for s in size)
    return torch.ops.senformer.upsampled_argmax(scores, h, w, bool(align_corners))


def _ext_merge_scores(logits, merge, align_corners, row_align=1):
    # row_align is a layout hint for the Triton kernels; the compiled ones read dense rows
    return torch.ops.senformer.merge_scores(list(logits), merge, bool(align_corners))


def _ext_learner_map(x, size, align_corners, row_align=1, d_sum=None):
    # row_align is a layout hint for the Triton kernels; the compiled ones write dense rows
    h, w = (int(s) for s in size)
    u, d = torch.ops.senformer.learner_map(x, h, w, bool(align_corners), d_sum)
    return u, (d if d_sum is not None else None)


def _ext_log_sum_scores(logits, align_corners, row_align=1, eps=1e-15):
    # row_align is a layout hint for the Triton kernels; the compiled ones write dense rows
    return torch.ops.senformer.log_sum_scores(list(logits), bool(align_corners), float(eps))


def _ext_log_sum_grad(d_e, e, active):
    return torch.ops.senformer.log_sum_grad(d_e, e, active)


def _ext_learner_grads(x, d_sum, g, align_corners):
    return torch.ops.senformer.learner_grads(x, d_sum, g, bool(align_corners))


def _ext_combine_grads(d_ens, d_learn, scale_e, scale_l, dtype):
    return torch.ops.senformer.combine_grads(d_ens, d_learn, scale_e, scale_l, dtype)


# Steps a build may lack (the CUDA one has only the two above): each wrapped by _ext_<step> here.
_OPTIONAL_STEPS = ("merge_scores", "log_sum_scores", "log_sum_grad", "learner_map", "learner_grads", "combine_grads")


def _extension_steps(device_type: str) -> types.SimpleNamespace:
    from ._dispatch import extension_has

    ns = types.SimpleNamespace(upsampled_ce=_ext_upsampled_ce, upsampled_argmax=_ext_upsampled_argmax)
    for step in _OPTIONAL_STEPS:  # looked up by name when the steps are built, so tests can patch a wrapper
        if extension_has(step, device_type):
            setattr(ns, step, globals()[f"_ext_{step}"])
    if hasattr(ns, "combine_grads"):
        ns.COMBINE_TRANSPOSES = True  # it reads a channels-last d_learn
    return ns


def steps(backend: str, module: str):
    """The kernel-level steps of ``backend`` (``triton``, ``cpu`` or ``cuda``) for kernels/<module>.py."""
    if backend == "triton":
        mod = importlib.import_module(f"senformer.kernels.{module}")
        hidden = mod.unused_steps() if hasattr(mod, "unused_steps") else ()
        if not hidden:
            return mod
        # A design that leaves a step to the chain's plain-torch path (a variant kept for the benchmark)
        return types.SimpleNamespace(**{k: v for k, v in vars(mod).items() if k not in hidden})
    if backend in ("cpu", "cuda"):
        return _extension_steps(backend)
    raise ValueError(f"no kernel-level steps for backend {backend!r}")
