"""The training flags and the device of a model, for code that runs a model it does not own (FLOP
counts, export, ``Segmenter.segment``) and must hand it back as it found it."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def submodules(model) -> list:
    # the ops contract allows any object with learner_logits/head_scores, not only an nn.Module
    return list(model.modules()) if isinstance(model, nn.Module) else []


@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` inside, then every submodule's own training flag back (not ``model.train(flag)``:
    a model may hold frozen parts that stay in eval mode while the rest trains)."""
    flags = [(m, m.training) for m in submodules(model)]
    if flags:
        model.eval()  # through train(False): a module may override it
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def module_device(model) -> torch.device:
    """The device of the model's first parameter (else first buffer); the CPU for a model holding none."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device("cpu")
