"""Fused ops of SenFormer's hot paths, each with a plain-torch reference (``senformer.ops.reference``).

Backends: ``reference`` (plain torch, any device), ``triton`` (CUDA, or the CPU interpreter with
TRITON_INTERPRET=1), ``cpu`` / ``cuda`` (the compiled ``senformer._C``). The choice is automatic by
device; override with ``SENFORMER_BACKEND=...`` or ``with senformer.ops.use_backend("..."):``.
"""
from . import reference
from ._dispatch import (BACKENDS, BackendUnavailable, extension_cpu_isa, extension_loaded, requested_backend, resolve,
                        use_backend)
from .class_attention import class_cross_attention
from .ensemble_ce import ensemble_cross_entropy
from .ensemble_predict import ensemble_predict
from .mask_logits import mask_logits

__all__ = [
    "BACKENDS", "BackendUnavailable", "use_backend", "requested_backend", "resolve", "extension_loaded",
    "extension_cpu_isa", "reference",
    "class_cross_attention", "mask_logits", "ensemble_cross_entropy", "ensemble_predict",
]
