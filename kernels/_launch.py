"""Helpers shared by the kernel launchers."""
from __future__ import annotations

import functools

import torch


def on_input_device(fn):
    """Run a launcher with its first tensor argument's CUDA device current.

    Triton launches on the *current* CUDA device, not on the device of the tensors it is given: a
    tensor on cuda:1 launched from a process whose current device is cuda:0 reads foreign memory
    (an illegal address at best). Buffers the launcher allocates follow the same guard."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or t.device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)

    return wrapper
