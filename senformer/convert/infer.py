"""Recognise an official checkpoint (SenFormer, or mmseg UperNet) and infer its preset from its keys and shapes."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Mapping, Optional

import torch

from ..models.checkpoint_kind import count_nested, official_head, weight_sharing_of
from .official_layout import OFFICIAL_PRESETS, OfficialConfig

# One key that only an official (mmseg) checkpoint of each backbone family has.
RESNET_MARK = "backbone.stem.0.weight"
SWIN_MARK = "backbone.patch_embed.projection.weight"

__all__ = ["OfficialPreset", "is_official", "official_arch", "infer_official", "weight_sharing_of"]


@dataclass(frozen=True)
class OfficialPreset:
    """What ``build_model`` needs to rebuild the model an official checkpoint came from.

    ``weight_sharing`` and ``num_blocks`` describe SenFormer learners; they are None for UperNet."""

    name: str  # zoo preset, e.g. "senformer_r50" or "upernet_r50"
    num_classes: int
    weight_sharing: Optional[str]  # "repeated" | "none"; None for UperNet
    num_blocks: Optional[int]
    config: OfficialConfig  # the official layout the file follows

    @property
    def arch(self) -> str:
        return self.config.arch

    def build_kwargs(self) -> Dict[str, object]:
        kw: Dict[str, object] = {"num_classes": self.num_classes}
        if self.arch == "senformer":
            kw.update(weight_sharing=self.weight_sharing, num_blocks=self.num_blocks)
        return kw

    def describe(self) -> str:
        """e.g. "senformer_r50, 150 classes, weight sharing 'repeated' (6 block applications)"."""
        text = f"{self.name}, {self.num_classes} classes"
        if self.arch == "senformer":
            text += f", weight sharing {self.weight_sharing!r} ({self.num_blocks} block applications)"
        return text

    def __str__(self) -> str:
        return self.name


def official_arch(state_dict: Mapping[str, object]) -> Optional[str]:
    """"senformer" or "upernet" for an official checkpoint (mmseg ResNetV1c or Swin backbone and that
    decode head), None otherwise."""
    if RESNET_MARK not in state_dict and SWIN_MARK not in state_dict:
        return None
    return official_head(state_dict)


def is_official(state_dict: Mapping[str, object]) -> bool:
    """True when the keys follow the official mmseg naming (ResNetV1c or mmseg Swin + SenFormer or UperNet head)."""
    return official_arch(state_dict) is not None


def _shape(state_dict: Mapping[str, torch.Tensor], key: str):
    if key not in state_dict:
        raise KeyError(f"official checkpoint lacks {key!r}, needed to infer the preset")
    return tuple(state_dict[key].shape)


def _presets_of(arch: str) -> str:
    return ", ".join(n for n, c in OFFICIAL_PRESETS.items() if c.arch == arch)


def _backbone_config(state_dict: Mapping[str, torch.Tensor], arch: str) -> OfficialConfig:
    """The official preset of ``arch`` whose backbone the keys describe."""
    candidates = [c for c in OFFICIAL_PRESETS.values() if c.arch == arch]
    if RESNET_MARK in state_dict:
        per_stage = count_nested(state_dict, r"^backbone\.layer(\d)\.(\d+)\.")
        depths = tuple(per_stage.get(i, 0) for i in (1, 2, 3, 4))
        hits = [c for c in candidates if c.backbone == "resnet" and c.depths == depths]
        if not hits:
            raise ValueError(f"official ResNet backbone with blocks per stage {depths} matches no {arch} preset "
                             f"({_presets_of(arch)}; ResNet-50 is (3, 4, 6, 3), ResNet-101 (3, 4, 23, 3))")
        return hits[0]
    embed = _shape(state_dict, SWIN_MARK)[0]
    depths = tuple(count_nested(state_dict, r"^backbone\.stages\.(\d)\.blocks\.(\d+)\.").values())
    hits = [c for c in candidates if c.backbone == "swin" and c.depths == depths and c.embed_dim == embed]
    if not hits:
        raise ValueError(f"official Swin backbone with embed_dims={embed} and depths={depths} matches no {arch} "
                         f"preset ({_presets_of(arch)})")
    table, heads = _shape(state_dict, "backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table")
    cfg = replace(hits[0], window_size=int(round(table ** 0.5) + 1) // 2)
    if heads != cfg.num_heads[0]:
        raise ValueError(f"official Swin backbone has {heads} heads in stage 0, "
                         f"{cfg.preset} expects {cfg.num_heads[0]}")
    return cfg


def infer_official(state_dict: Mapping[str, torch.Tensor], preset: Optional[str] = None,
                   num_blocks: Optional[int] = None) -> OfficialPreset:
    """Infer architecture, backbone, width, classes and sharing of an official checkpoint.

    ``preset`` (a zoo name) is checked against what the keys say rather than trusted, so a
    wrong guess fails with the reason. ``num_blocks`` sets how many times the single stored
    block of a weight-shared learner is applied (default: the number stored, or 6 when only
    ``layers.0`` is present, the paper's setting); UperNet ignores it."""
    arch = official_arch(state_dict)
    if arch is None:
        raise ValueError(f"not an official SenFormer or mmseg UperNet checkpoint: it needs {RESNET_MARK!r} (ResNetV1c) "
                         f"or {SWIN_MARK!r} (Swin), and decode_head.learners.*.queries (SenFormer) or "
                         f"decode_head.psp_modules.* (UperNet)")
    cfg = _backbone_config(state_dict, arch)
    if preset is not None and preset != cfg.preset:
        raise ValueError(f"preset={preset!r} does not match the checkpoint, whose model is {cfg.preset!r}")

    aux_key = "auxiliary_head.convs.0.conv.weight"
    cfg = replace(cfg, aux=aux_key in state_dict,
                  aux_channels=_shape(state_dict, aux_key)[0] if aux_key in state_dict else cfg.aux_channels)
    if arch == "upernet":
        n_cls, channels = _shape(state_dict, "decode_head.conv_seg.weight")[:2]
        cfg = replace(cfg, num_classes=n_cls, channels=channels)
        return OfficialPreset(cfg.preset, n_cls, None, None, cfg)

    n_cls, dim = _shape(state_dict, "decode_head.learners.0.queries")[1:]
    sharing, stored = weight_sharing_of(state_dict)
    cfg = replace(cfg, num_classes=n_cls, dim=dim, num_blocks=stored)
    if "decode_head.conv_seg.weight" in state_dict:
        cfg = replace(cfg, head_channels=_shape(state_dict, "decode_head.conv_seg.weight")[1])
    if num_blocks is None:
        num_blocks = 6 if stored == 1 else stored
    if sharing == "none" and num_blocks != stored:
        raise ValueError(f"num_blocks={num_blocks} but the checkpoint stores {stored} distinct blocks per learner")
    return OfficialPreset(cfg.preset, n_cls, sharing, num_blocks, cfg)
