"""Checkpoints: ``<dir>/iter_XXXXXXX/{model.safetensors,state.pt}`` written atomically.

A checkpoint is assembled in a temporary folder beside its final name and renamed into place, then
the ``latest`` pointer file is replaced (write temp + ``os.replace``). A process killed at any point
leaves either the old or the new checkpoint complete, never a half-written one under a real name.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

_NAME = re.compile(r"^iter_(\d+)$")
WEIGHTS, STATE, LATEST = "model.safetensors", "state.pt", "latest"


def rng_state() -> dict:
    np_state = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    pos, has_gauss, cached = st["numpy_rest"]
    np.random.set_state(("MT19937", st["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    random.setstate(_to_tuples(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def model_state(model: torch.nn.Module) -> dict:
    """Contiguous CPU copies; safetensors refuses tensors that share memory, so shared ones are cloned."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def list_checkpoints(ckpt_dir) -> list:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / WEIGHTS).is_file() and (p / STATE).is_file()]


def latest_checkpoint(ckpt_dir):
    """The checkpoint named by ``latest`` (falls back to the highest complete ``iter_*``), or None."""
    d = Path(ckpt_dir)
    ptr = d / LATEST
    if ptr.is_file():
        name = ptr.read_text(errors="replace").strip()  # a damaged pointer falls back, not fails
        p = d / name
        if _NAME.match(name) and (p / WEIGHTS).is_file() and (p / STATE).is_file():
            return p
    ckpts = list_checkpoints(d)
    return ckpts[-1] if ckpts else None


def save_checkpoint(ckpt_dir, step: int, model, state: dict, keep_last: int = 3) -> Path:
    """Write model weights (safetensors) and ``state`` (optimizer, scheduler, step, RNG, ...)."""
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"iter_{int(step):07d}"
    tmp = d / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # the run's config and classes also go in the weights file's header, so that eval and --resume read
    # them without loading state.pt (optimizer moments: twice the model's size)
    meta = {"step": str(int(step)), **{k: state[k] if isinstance(state[k], str) else json.dumps(state[k])
                                       for k in ("config", "classes") if k in state}}
    save_file(model_state(model), str(tmp / WEIGHTS), metadata=meta)
    torch.save(state, tmp / STATE)
    # safetensors creates its file 0600; give it the mode open() gave state.pt (0o666 & ~umask)
    os.chmod(tmp / WEIGHTS, stat.S_IMODE(os.stat(tmp / STATE).st_mode))
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. after a resume) replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    ptr_tmp = d / f".{LATEST}.tmp-{os.getpid()}"
    ptr_tmp.write_text(final.name)
    os.replace(ptr_tmp, d / LATEST)
    _fsync_dir(d)
    if keep_last and keep_last > 0:
        for old in list_checkpoints(d)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in d.glob(".tmp-iter_*"):  # left by killed processes
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(p: Path):
    """Tensors of a ``.safetensors`` file or a ``torch.load(weights_only=True)`` object; a damaged file
    raises CheckpointError naming it."""
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except SafetensorError as e:
            raise _unreadable(p, e) from e
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # damaged bytes fail deep in zip reading or unpickling with almost any type:
        raise _unreadable(p, e) from e  # OSError, EOFError, IndexError, KeyError, struct.error, ...


def _unreadable(p: Path, e: Exception) -> CheckpointError:
    text = str(e).strip()
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # the cause, under torch's paragraph of advice
    why = (m.group(1) if m else text.split("\n")[0]).split(". ")[0]
    why = f"{type(e).__name__}: {why}"[:200] if why else type(e).__name__
    try:
        size = f"{p.stat().st_size} bytes"
    except OSError:
        size = "size unknown"
    if "Unsupported global" in why:  # an intact file holding more than tensors
        msg = f"checkpoint file {p} ({size}) stores Python objects that torch.load(weights_only=True) refuses ({why})"
    else:
        msg = f"checkpoint file {p} ({size}) is unreadable (truncated or corrupt: {why})"
    if _NAME.match(p.parent.name):
        others = [c for c in list_checkpoints(p.parent.parent) if c.name != p.parent.name]
        if others:
            msg += (f"; other checkpoints: {', '.join(c.name for c in others)}; "
                    f"resume from one with --resume {others[-1]}")
    return CheckpointError(msg)


def run_info(ckpt):
    """(config dict or None, class names or None) saved with a checkpoint folder or weights file ``ckpt``:
    from the weights file's header when it holds them (no tensor is read), else from a folder's state.pt
    (older checkpoints)."""
    p = Path(ckpt)
    weights = p / WEIGHTS if p.is_dir() else p
    meta = {}
    if weights.suffix == ".safetensors" and weights.is_file():
        meta = read_header(weights)
    if "config" not in meta and p.is_dir() and (p / STATE).is_file():
        meta = load_state(p)
    config, classes = meta.get("config"), meta.get("classes")
    return (json.loads(config) if isinstance(config, str) else config,
            json.loads(classes) if isinstance(classes, str) else classes)


def read_header(weights) -> dict:
    """The metadata of a ``.safetensors`` file ({} if none); a damaged file raises CheckpointError."""
    from ..convert.reading import read_metadata
    try:
        return read_metadata(weights)
    except SafetensorError as e:
        raise _unreadable(Path(weights), e) from e


def load_state(ckpt) -> dict:
    return _read(Path(ckpt) / STATE)


def read_weights(path) -> dict:
    """Weights from a checkpoint folder, a ``.safetensors`` file, or a ``torch.save``d state dict."""
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (expected a checkpoint folder with {WEIGHTS}, "
                                f"a .safetensors file or a .pth state dict)")
    sd = _read(p)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def load_weights(model: torch.nn.Module, path, strict: bool = True):
    """Load weights into ``model``; on a mismatch raise a ValueError that names the differing keys."""
    sd = read_weights(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if shapes or (strict and (missing or unexpected)):
        def show(keys):
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {show(missing)}")
        if unexpected:
            parts.append(f"not in the model: {show(unexpected)}")
        if shapes:
            parts.append("shape differs: " + show([f"{k} (checkpoint {tuple(sd[k].shape)} vs model "
                                                   f"{tuple(own[k].shape)})" for k in shapes]))
        raise ValueError(f"checkpoint {path} was saved from a different model:\n  " + "\n  ".join(parts))
    model.load_state_dict(sd, strict=strict)
    return model
