"""Locate a trained run's checkpoint and recover its configuration and class names."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import WEIGHTS, latest_checkpoint, run_info
from .config import load_config


def resolve_checkpoint(path) -> Path:
    """A work dir (its latest checkpoint), a checkpoints folder, a checkpoint folder or a weights file."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if (p / WEIGHTS).is_file():
        return p
    for d in (p / "checkpoints", p):
        c = latest_checkpoint(d)
        if c is not None:
            return c
    raise FileNotFoundError(f"no checkpoint in {p} (expected {WEIGHTS} in it, or checkpoints/iter_*/)")


def load_run(checkpoint, config=None, overrides=()):
    """(cfg, class names or None, checkpoint path). The config saved in the checkpoint is used unless
    ``config`` names another; ``overrides`` (key=value) apply on top."""
    ckpt = resolve_checkpoint(checkpoint)
    saved, classes = run_info(ckpt)
    if config is not None:
        cfg = load_config(config, overrides)
    elif saved is not None:
        cfg = load_config(None, [(k, v) for k, v in saved.items()] + list(overrides))
    else:
        raise ValueError(f"checkpoint {ckpt} carries no config: pass --config (the YAML preset it was trained with)")
    return cfg, classes, ckpt
