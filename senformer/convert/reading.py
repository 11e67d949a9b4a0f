"""Read a state dict from an official ``.pth`` (mmcv checkpoint), a ``torch.save``d dict or ours."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Dict, Mapping, Union

import torch

# mmcv/mmseg checkpoints: {"meta": ..., "state_dict": ..., "optimizer": ...}; others use "model".
_WRAPPERS = ("state_dict", "model")


def _unwrap(obj) -> Dict[str, torch.Tensor]:
    for key in _WRAPPERS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError("the checkpoint holds no state dict (expected a dict of tensors, or one under "
                         "'state_dict' or 'model')")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"the state dict has non-tensor entries: {', '.join(map(str, bad[:8]))}")
    sd = dict(obj)
    # DistributedDataParallel wraps every name in "module."
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_state_dict(source: Union[str, os.PathLike, Mapping], trust_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (``.pth``/``.pt``, ``.safetensors``, or our checkpoint folder).

    ``.pth`` files are read with ``torch.load(weights_only=True)``, which refuses arbitrary Python
    objects; only with ``trust_pickle=True`` (for files from a source you trust) is a file that
    needs more unpickled in full."""
    if isinstance(source, Mapping):
        return _unwrap(source)
    p = Path(source)
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(source)!r} not found (weights are never downloaded: pass a local "
                                f".pth, .safetensors or checkpoint folder)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap(load_file(str(p)))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as e:
        if not trust_pickle:
            raise ValueError(
                f"{str(source)!r} could not be read with torch.load(weights_only=True): it stores Python objects "
                f"besides tensors (an mmcv checkpoint's 'meta' can). If you trust the file's source, retry with "
                f"trust_pickle=True (CLI: --trust-pickle). Original error: {str(e).splitlines()[0]}") from e
        obj = torch.load(p, map_location="cpu", weights_only=False)
    return _unwrap(obj)


def read_metadata(source: Union[str, os.PathLike]) -> Dict[str, str]:
    """The safetensors header metadata of ``source`` ({} for other formats or no metadata)."""
    p = Path(source)
    if p.is_dir():
        p = p / "model.safetensors"
    if p.suffix != ".safetensors" or not p.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        return dict(f.metadata() or {})
