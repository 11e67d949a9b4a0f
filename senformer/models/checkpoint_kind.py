"""What a weights file holds, told from its keys: backbone weights, or a whole segmentation model.

``build_model(backbone_weights=...)`` loads backbone files only. A whole-model file (an official
SenFormer or mmseg UperNet checkpoint, or one senformer wrote) fixes its own classes, weight sharing
and blocks, so it is loaded by ``senformer.convert.build_from_checkpoint``, which builds the model
the file describes. The converter builds models, so it sits above this package and the zoo must
not import it; the key facts both use to tell the kinds apart live here, below both, so that the
zoo can refuse a whole-model file with the exact call that loads it.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

# One key that only an official checkpoint of each decode head has.
SENFORMER_QUERIES = re.compile(r"^decode_head\.learners\.\d+\.queries$")
UPERNET_MARK = "decode_head.fpn_bottleneck.conv.weight"
UPERNET_CLASSIFIER = "decode_head.conv_seg.weight"
# Top-level modules of a segmentor besides its backbone: mmseg's names, then ours.
HEAD_PREFIXES = ("decode_head.", "auxiliary_head.", "neck.", "head.", "aux_head.")


class WholeModelCheckpointError(ValueError):
    """A whole-model checkpoint was given where backbone weights were expected."""


def official_head(keys: Iterable[str]) -> Optional[str]:
    """"senformer" or "upernet" when the keys hold that official (mmseg) decode head, else None."""
    keys = list(keys)
    if any(SENFORMER_QUERIES.match(k) for k in keys):
        return "senformer"
    if UPERNET_MARK in keys and any(k.startswith("decode_head.psp_modules.") for k in keys):
        return "upernet"
    return None


def whole_model_kind(keys: Iterable[str]) -> Optional[str]:
    """"senformer" / "upernet" (official), "mmseg" (another mmseg decode head), "ours" (a senformer
    segmentor), or None for backbone weights. A whole model has a backbone *and* a head: timm
    classifier files carry a ``head.`` but no ``backbone.`` prefix."""
    keys = list(keys)
    if not any(k.startswith("backbone.") for k in keys) or not any(k.startswith(HEAD_PREFIXES) for k in keys):
        return None
    kind = official_head(keys)
    if kind is not None:
        return kind
    return "mmseg" if any(k.startswith("decode_head.") for k in keys) else "ours"


def count_nested(state_dict: Mapping[str, object], pattern: str) -> Dict[int, int]:
    """Outer index -> number of distinct inner indices, over the keys matching ``pattern`` (two groups:
    outer, inner), e.g. stage -> blocks or learner -> stored blocks."""
    rx = re.compile(pattern)
    seen: Dict[int, set] = {}
    for k in state_dict:
        m = rx.match(k)
        if m:
            seen.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return {i: len(v) for i, v in sorted(seen.items())}


def stored_blocks(state_dict: Mapping[str, object]) -> Dict[int, int]:
    """Learner index -> number of ``decode_head.learners.i.layers.j`` blocks an official file stores."""
    return count_nested(state_dict, r"^decode_head\.learners\.(\d+)\.layers\.(\d+)\.")


def _blocks_identical(state_dict: Mapping[str, torch.Tensor], learner: int, n: int) -> bool:
    prefix = f"decode_head.learners.{learner}.layers."
    first = {k[len(prefix) + 2:]: v for k, v in state_dict.items() if k.startswith(prefix + "0.")}
    for j in range(1, n):
        for name, v in first.items():
            other = state_dict.get(f"{prefix}{j}.{name}")
            # meta tensors (shape-only checks) have no values to compare
            if other is None or other.shape != v.shape or v.is_meta or not torch.equal(other, v):
                return False
    return True


def weight_sharing_of(state_dict: Mapping[str, torch.Tensor]) -> Tuple[str, int]:
    """(weight_sharing, stored blocks per learner) of an official SenFormer state dict.

    The released code builds ``branch_depth`` distinct blocks even for the weight-shared models,
    so "repeated" is recognised when each learner's blocks are all equal or only ``layers.0``
    is stored."""
    blocks = stored_blocks(state_dict)
    if not blocks:
        raise ValueError("official checkpoint has no decode_head.learners.*.layers.* keys")
    counts = set(blocks.values())
    if len(counts) != 1:
        raise ValueError(f"learners store different numbers of blocks: {blocks}")
    n = counts.pop()
    if n == 1 or all(_blocks_identical(state_dict, i, n) for i in blocks):
        return "repeated", n
    return "none", n


def _official_summary(state_dict: Mapping[str, torch.Tensor], kind: str) -> str:
    if kind == "upernet":
        return f"mmseg UperNet, {state_dict[UPERNET_CLASSIFIER].shape[0]} classes"
    sharing, n = weight_sharing_of(state_dict)
    classes = state_dict["decode_head.learners.0.queries"].shape[1]
    if sharing == "none":
        blocks = f"{n} distinct blocks per learner"
    else:
        blocks = "one block per learner" + (f", stored {n} times" if n > 1 else "")
    return f"official SenFormer, weight_sharing={sharing!r}, {blocks}, {classes} classes"


def whole_model_error(path: str, preset: str) -> Optional[str]:
    """The message for ``build_model(preset, backbone_weights=path)`` when ``path`` is a whole-model
    checkpoint (or a training checkpoint folder); None for anything else (the backbone loader's own
    error then stands). Reads the file: call it only once loading it as a backbone has failed."""
    from .backbones import _read_state_dict

    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            return None
        return (f"{path!r} is a senformer checkpoint folder (a whole model), not backbone weights: "
                f"senformer-eval / senformer-predict take it with the run's config, and "
                f"senformer.convert.load_checkpoint(model, {path!r}) loads it into a model you built")
    try:
        state = _read_state_dict(path)
    except (ValueError, OSError, RuntimeError, pickle.UnpicklingError):
        return None  # unreadable here too: the backbone loader's error says why
    kind = whole_model_kind(state)
    if kind is None:
        return None
    head = f"{path!r} is a whole-model checkpoint"
    why = "not backbone weights (build_model's backbone_weights= / pretrained= loads a backbone file only)"
    if kind == "mmseg":
        return (f"{head} (mmseg, a decode head senformer.convert does not map: it converts SenFormer and "
                f"UperNet), {why}")
    if kind == "ours":
        return (f"{head} (senformer), {why}; load it with senformer.convert.build_from_checkpoint({path!r}) "
                f"(a file senformer-convert wrote names its own model; otherwise add preset={preset!r} and the "
                f"build_model arguments it was trained with), or senformer.convert.load_checkpoint(model, {path!r})")
    try:
        summary = _official_summary(state, kind)
    except (ValueError, KeyError):  # an odd file: the converter will name what is wrong with it
        summary = "official SenFormer" if kind == "senformer" else "mmseg UperNet"
    return (f"{head} ({summary}), {why}; load it with "
            f"senformer.convert.build_from_checkpoint({path!r}), which builds the model the file describes, "
            f"or convert it once with senformer-convert {os.path.basename(path)} OUT.safetensors")
