"""Whole-model checkpoints: the official SenFormer ones (mmsegmentation 0.x, github.com/WalBouss/SenFormer),
mmseg 0.x UperNet ones (ResNetV1c / Swin backbones), and ours. The one place that loads them.

- ``build_from_checkpoint(path)``: build the model a file describes (preset, classes, weight sharing
  read from an official file's keys or a converted file's metadata) and load it strictly.
- ``from_official(path_or_state_dict, preset=None) -> (preset, state_dict)``: infer the preset
  from the keys and shapes, rename and reshape every tensor to our model's layout, and check the
  result against the model that preset builds (nothing partial unless ``strict=False``).
- ``load_checkpoint(model, path_or_state_dict, strict=True)``: load an official checkpoint or one
  of ours into a built model.
- the ``senformer-convert IN.pth OUT.safetensors`` command: ``senformer.cli.convert_main`` parses it,
  ``.cli.run`` converts.

``build_model`` (the zoo, below this package) loads backbone weights only and refuses a whole-model
file with the call to make here.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from .infer import OfficialPreset, infer_official, is_official
from .mapping import map_key, official_to_ours, ours_to_official
from .official_layout import _mmseg_relative_position_index, official_shapes
from .reading import read_state_dict
from .report import MismatchError, check_against

__all__ = ["from_official", "to_official", "load_checkpoint", "build_from_checkpoint", "is_official",
           "read_state_dict", "MismatchError", "OfficialPreset"]

StateOrPath = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


def _state(path_or_state: StateOrPath, trust_pickle: bool = False) -> Dict[str, torch.Tensor]:
    if isinstance(path_or_state, Mapping):
        return read_state_dict(dict(path_or_state))
    return read_state_dict(path_or_state, trust_pickle=trust_pickle)


def _check_index_buffers(state_dict: Mapping[str, torch.Tensor]) -> None:
    # Dropping them is only right if they hold the standard index our modules recompute.
    for k, v in state_dict.items():
        if k.endswith("relative_position_index"):
            window = int(round(v.shape[0] ** 0.5))
            if not torch.equal(v.to(torch.int64), _mmseg_relative_position_index(window)):
                raise ValueError(f"{k} is not the standard Swin relative position index for window {window}; "
                                 f"this checkpoint uses a layout the converter does not know")


def build_kwargs(preset: OfficialPreset) -> Dict[str, object]:
    """``build_model`` arguments that reproduce the official model of ``preset``."""
    cfg = preset.config
    kw = dict(preset.build_kwargs())
    if cfg.backbone == "swin":
        kw["window_size"] = cfg.window_size
    kw["aux"] = cfg.aux
    if cfg.aux:
        kw["aux_channels"] = cfg.aux_channels
    if cfg.arch == "senformer" and cfg.dim != 512:
        kw["embed_dim"] = cfg.dim
    if cfg.arch == "upernet" and cfg.channels != 512:
        kw["channels"] = cfg.channels
    return kw


def expected_shapes(preset: OfficialPreset) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the model ``preset`` describes, built on the meta device (no memory, no init)."""
    from ..models.zoo import build_model

    with torch.device("meta"):
        model = build_model(preset.name, **build_kwargs(preset))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _official_names(preset: OfficialPreset) -> Dict[str, str]:
    """Our key -> the official key that fills it (for error messages)."""
    names = {}
    for k in official_shapes(preset.config):
        hit = map_key(k, preset.arch)
        if hit is not None:
            names.setdefault(hit[0], k)
    return names


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], preset: OfficialPreset):
    """(ours, unknown official keys, dropped official keys) for an official state dict."""
    _check_index_buffers(state_dict)
    keep = 1 if preset.weight_sharing == "repeated" else None
    return official_to_ours(dict(state_dict), keep_blocks=keep, arch=preset.arch)


def _what(info: OfficialPreset) -> str:
    kind = "official" if info.arch == "senformer" else "mmseg"
    return f"{kind} {info.describe()} checkpoint"


def from_official(state_dict_or_path: StateOrPath, preset: Optional[str] = None, *, strict: bool = True,
                  num_blocks: Optional[int] = None, trust_pickle: bool = False
                  ) -> Tuple[OfficialPreset, Dict[str, torch.Tensor]]:
    """Convert an official SenFormer or mmseg UperNet checkpoint to our naming and layout.

    Returns ``(preset, state_dict)``; ``preset.name`` is the zoo preset and
    ``build_kwargs(preset)`` the ``build_model`` arguments (classes, weight sharing, blocks).
    ``preset`` (optional) is checked against the checkpoint. With ``strict`` (default), any
    official key without a counterpart, or any model key the file does not fill, raises
    :class:`MismatchError` listing them with their expected shapes; ``strict=False`` warns and
    returns only the tensors that match."""
    sd = _state(state_dict_or_path, trust_pickle)
    if not is_official(sd):
        raise ValueError("not an official SenFormer or mmseg UperNet checkpoint (it needs backbone.stem.* or "
                         "backbone.patch_embed.projection.* keys, and decode_head.learners.*.queries or "
                         "decode_head.psp_modules.* keys); to load one of ours use load_checkpoint")
    info = infer_official(sd, preset, num_blocks)
    ours, unknown, _ = convert_state_dict(sd, info)
    ours = check_against(ours, expected_shapes(info), strict=strict, unknown=unknown,
                         official_names=_official_names(info), what=_what(info))
    return info, ours


def to_official(state_dict: Mapping[str, torch.Tensor], preset: OfficialPreset) -> Dict[str, torch.Tensor]:
    """Our state dict back to the official layout (the inverse of :func:`from_official`), e.g. to
    check a conversion or to run the original code. SenFormer's ``decode_head.conv_seg``, which it
    never uses, is not recreated."""
    return ours_to_official(dict(state_dict), official_shapes(preset.config), arch=preset.arch)


def load_checkpoint(model: torch.nn.Module, path_or_state: StateOrPath, strict: bool = True,
                    trust_pickle: bool = False) -> Optional[OfficialPreset]:
    """Load an official SenFormer / mmseg UperNet checkpoint (detected by its keys) or one of ours into ``model``.

    Returns the inferred :class:`OfficialPreset` for an official file, None for ours. Raises
    :class:`MismatchError` naming every unknown / missing key with the expected shapes; with
    ``strict=False`` the matching tensors are loaded and the rest is reported as a warning."""
    sd = _state(path_or_state, trust_pickle)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    info = None
    if is_official(sd):
        # a weight-shared file stores one block: apply it as many times as the model does
        info = infer_official(sd, num_blocks=_model_num_blocks(model))
        ours, unknown, _ = convert_state_dict(sd, info)
        ours = check_against(ours, expected, strict=strict, unknown=unknown, official_names=_official_names(info),
                             what=_what(info))
    else:
        ours = check_against(sd, expected, strict=strict, what="checkpoint")
    model.load_state_dict(ours, strict=strict)
    return info


def _model_num_blocks(model: torch.nn.Module) -> Optional[int]:
    head = getattr(model, "head", None)
    learners = getattr(head, "learners", None)
    if learners is None or len(learners) == 0:
        return None
    return getattr(getattr(learners[0], "decoder", None), "num_blocks", None)


def build_from_checkpoint(path_or_state: StateOrPath, strict: bool = True, trust_pickle: bool = False, *,
                          preset: Optional[str] = None, **overrides):
    """Build the model a whole-model checkpoint describes and load it (strictly by default).

    - an official SenFormer or mmseg UperNet file (``.pth`` or state dict): preset, classes, weight
      sharing and blocks are inferred from its keys and shapes (``preset``, if given, is checked);
    - a file written by ``senformer-convert``: its safetensors metadata names the model;
    - any other senformer file (e.g. a training checkpoint's ``model.safetensors``): give ``preset``
      and the ``build_model`` arguments it was built with.

    ``overrides`` go to ``build_model`` on top of what the file says (e.g. ``merge="product"``)."""
    from ..models.zoo import build_model
    from .reading import read_metadata

    meta = {} if isinstance(path_or_state, Mapping) else read_metadata(path_or_state)
    if meta.get("format") == "senformer" and "preset" in meta:
        if preset is not None and preset != meta["preset"]:
            raise ValueError(f"preset={preset!r} does not match the checkpoint, whose model is {meta['preset']!r}")
        model = build_model(meta["preset"], **{**_kwargs_from_metadata(meta), **overrides})
        load_checkpoint(model, path_or_state, strict=strict)
        return model
    sd = _state(path_or_state, trust_pickle)
    if is_official(sd):
        info, ours = from_official(sd, preset, strict=strict)
        model = build_model(info.name, **{**build_kwargs(info), **overrides})
        model.load_state_dict(ours, strict=strict)
        return model
    if preset is None:
        name = "the state dict" if isinstance(path_or_state, Mapping) else repr(str(path_or_state))
        raise ValueError(f"{name} is neither an official SenFormer / mmseg UperNet checkpoint nor a file that names "
                         f"its model (senformer-convert writes the preset into the metadata): pass preset= and the "
                         f"build_model arguments it was built with, e.g. build_from_checkpoint(path, "
                         f"preset='senformer_r50', num_classes=150)")
    model = build_model(preset, **overrides)
    load_checkpoint(model, sd, strict=strict)
    return model


def metadata(preset: OfficialPreset) -> Dict[str, str]:
    """safetensors metadata that lets ``build_from_checkpoint`` rebuild the model of a converted file:
    the zoo preset and its ``build_model`` arguments (JSON), plus the main ones readable on their own."""
    meta = {"format": "senformer", "source": "official", "arch": preset.arch, "preset": preset.name,
            "num_classes": str(preset.num_classes), "aux": "true" if preset.config.aux else "false",
            "build_kwargs": json.dumps(build_kwargs(preset), sort_keys=True)}
    if preset.arch == "senformer":
        meta.update(weight_sharing=preset.weight_sharing, num_blocks=str(preset.num_blocks))
    if preset.config.backbone == "swin":
        meta["window_size"] = str(preset.config.window_size)
    return meta


def _kwargs_from_metadata(meta: Mapping[str, str]) -> Dict[str, object]:
    if "build_kwargs" in meta:
        return json.loads(meta["build_kwargs"])
    # files converted before the arguments were stored whole (SenFormer only)
    kwargs: Dict[str, object] = {"num_classes": int(meta["num_classes"]), "weight_sharing": meta["weight_sharing"],
                                 "num_blocks": int(meta["num_blocks"])}
    if meta.get("window_size"):
        kwargs["window_size"] = int(meta["window_size"])
    if meta.get("aux") == "false":
        kwargs["aux"] = False
    return kwargs
