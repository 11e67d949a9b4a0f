"""Recognise an official SenFormer state dict and infer its preset from its keys and shapes."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Dict, Mapping, Optional

import torch

from .official_layout import OFFICIAL_PRESETS, OfficialConfig

# One key that only an official (mmseg) checkpoint of each backbone family has.
RESNET_MARK = "backbone.stem.0.weight"
SWIN_MARK = "backbone.patch_embed.projection.weight"
HEAD_MARK = re.compile(r"^decode_head\.learners\.\d+\.queries$")

_RESNET_BY_DEPTHS = {(3, 4, 6, 3): "senformer_r50", (3, 4, 23, 3): "senformer_r101"}


@dataclass(frozen=True)
class OfficialPreset:
    """What ``build_model`` needs to rebuild the model an official checkpoint came from."""

    name: str  # zoo preset, e.g. "senformer_r50"
    num_classes: int
    weight_sharing: str  # "repeated" | "none"
    num_blocks: int
    config: OfficialConfig  # the official layout the file follows

    def build_kwargs(self) -> Dict[str, object]:
        return {"num_classes": self.num_classes, "weight_sharing": self.weight_sharing,
                "num_blocks": self.num_blocks}

    def __str__(self) -> str:
        return self.name


def is_official(state_dict: Mapping[str, object]) -> bool:
    """True when the keys follow the official mmseg naming (ResNetV1c or mmseg Swin + SenFormer head)."""
    has_backbone = RESNET_MARK in state_dict or SWIN_MARK in state_dict
    return has_backbone and any(HEAD_MARK.match(k) for k in state_dict)


def _count(state_dict: Mapping[str, object], pattern: str) -> Dict[int, int]:
    """For keys matching ``pattern`` (groups: outer index, inner index) -> outer: number of inner."""
    rx = re.compile(pattern)
    seen: Dict[int, set] = {}
    for k in state_dict:
        m = rx.match(k)
        if m:
            seen.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return {o: len(v) for o, v in sorted(seen.items())}


def _shape(state_dict: Mapping[str, torch.Tensor], key: str):
    if key not in state_dict:
        raise KeyError(f"official checkpoint lacks {key!r}, needed to infer the preset")
    return tuple(state_dict[key].shape)


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


def weight_sharing_of(state_dict: Mapping[str, torch.Tensor]) -> tuple:
    """(weight_sharing, stored blocks per learner) from the decode head's blocks.

    The released code builds ``branch_depth`` distinct blocks even for the weight-shared models,
    so "repeated" is recognised when each learner's blocks are all equal or only ``layers.0``
    is stored."""
    blocks = _count(state_dict, r"^decode_head\.learners\.(\d+)\.layers\.(\d+)\.")
    if not blocks:
        raise ValueError("official checkpoint has no decode_head.learners.*.layers.* keys")
    counts = set(blocks.values())
    if len(counts) != 1:
        raise ValueError(f"learners store different numbers of blocks: {blocks}")
    n = counts.pop()
    if n == 1 or all(_blocks_identical(state_dict, i, n) for i in blocks):
        return "repeated", n
    return "none", n


def infer_official(state_dict: Mapping[str, torch.Tensor], preset: Optional[str] = None,
                   num_blocks: Optional[int] = None) -> OfficialPreset:
    """Infer backbone, width, classes and sharing of an official checkpoint.

    ``preset`` (a zoo name) is checked against what the keys say rather than trusted, so a
    wrong guess fails with the reason. ``num_blocks`` sets how many times the single stored
    block of a weight-shared learner is applied (default: the number stored, or 6 when only
    ``layers.0`` is present, the paper's setting)."""
    if RESNET_MARK in state_dict:
        depths = _count(state_dict, r"^backbone\.layer(\d)\.(\d+)\.")
        depths_t = tuple(depths.get(i, 0) for i in (1, 2, 3, 4))
        name = _RESNET_BY_DEPTHS.get(depths_t)
        if name is None:
            raise ValueError(f"official ResNet backbone with blocks per stage {depths_t} matches no "
                             f"preset (ResNet-50 is (3, 4, 6, 3), ResNet-101 (3, 4, 23, 3))")
        cfg = OFFICIAL_PRESETS[name]
    elif SWIN_MARK in state_dict:
        embed = _shape(state_dict, SWIN_MARK)[0]
        depths_t = tuple(_count(state_dict, r"^backbone\.stages\.(\d)\.blocks\.(\d+)\.").values())
        by_embed = {96: "senformer_swin_s" if depths_t[2:3] == (18,) else "senformer_swin_t",
                    128: "senformer_swin_b", 192: "senformer_swin_l"}
        name = by_embed.get(embed)
        if name is None or depths_t != OFFICIAL_PRESETS[name].depths:
            raise ValueError(f"official Swin backbone with embed_dims={embed} and depths={depths_t} "
                             f"matches no preset (Swin-T/S/B/L)")
        table, heads = _shape(state_dict, "backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table")
        window = int(round(table ** 0.5) + 1) // 2
        cfg = replace(OFFICIAL_PRESETS[name], window_size=window)
        if heads != cfg.num_heads[0]:
            raise ValueError(f"official Swin backbone has {heads} heads in stage 0, "
                             f"{name} expects {cfg.num_heads[0]}")
    else:
        raise ValueError(f"not an official SenFormer checkpoint: neither {RESNET_MARK!r} (ResNetV1c) "
                         f"nor {SWIN_MARK!r} (Swin) is present")
    if preset is not None and preset != cfg.preset:
        raise ValueError(f"preset={preset!r} does not match the checkpoint, whose backbone is {cfg.preset!r}")

    n_cls, dim = _shape(state_dict, "decode_head.learners.0.queries")[1:]
    sharing, stored = weight_sharing_of(state_dict)
    aux_key = "auxiliary_head.convs.0.conv.weight"
    cfg = replace(cfg, num_classes=n_cls, dim=dim, num_blocks=stored, aux=aux_key in state_dict,
                  aux_channels=_shape(state_dict, aux_key)[0] if aux_key in state_dict else 512)
    if "decode_head.conv_seg.weight" in state_dict:
        cfg = replace(cfg, head_channels=_shape(state_dict, "decode_head.conv_seg.weight")[1])
    if num_blocks is None:
        num_blocks = 6 if stored == 1 else stored
    if sharing == "none" and num_blocks != stored:
        raise ValueError(f"num_blocks={num_blocks} but the checkpoint stores {stored} distinct blocks per learner")
    return OfficialPreset(cfg.preset, n_cls, sharing, num_blocks, cfg)
