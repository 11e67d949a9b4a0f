"""Model zoo: ``build_model(preset, num_classes=150, **overrides)`` and the ``PRESETS`` of the paper.

Presets mirror the official SenFormer / mmseg configs: ResNet-50/101 V1c (timm ``resnet50c``/``resnet101c``),
Swin-T/S at 512 crops with window 7, Swin-B/L at 640 crops with window 12; FPNT neck at 512 channels,
window 7, 8 heads; learners with d=512, 8 heads, 6 applications of one repeated block; auxiliary FCN
head on C4 with 512 channels (256 for UperNet, as mmseg's UperNet configs).

``backbone_weights`` is a backbone-only file. A whole-model checkpoint (official SenFormer or mmseg
UperNet ``.pth``, or a senformer file) fixes classes, sharing and blocks itself: it is loaded by
``senformer.convert.build_from_checkpoint``, and ``build_model`` refuses it with that call spelled out."""
from __future__ import annotations

import pickle
import warnings

from .aux_head import FCNHead
from .backbones import TimmBackbone
from .baselines import FusionBaselineHead, SenUperHead, UPerHead
from .checkpoint_kind import WholeModelCheckpointError, whole_model_error
from .head import SenFormerHead
from .necks import build_neck
from .presets import ARCHS, OVERRIDES, PRESETS, preset_config
from .segmentor import Segmentor

__all__ = ["build_model", "preset_config", "PRESETS", "OVERRIDES", "ARCHS"]


def build_model(preset: str, num_classes: int = 150, **overrides) -> Segmentor:
    """Build a :class:`Segmentor` from a preset name; see ``OVERRIDES`` for what can be changed."""
    cfg = preset_config(preset, **overrides)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    num_classes = int(num_classes)
    arch = cfg["arch"]
    backbone = _backbone(preset, cfg, _backbone_weights(cfg))
    dim = cfg["embed_dim"]
    neck = None
    if arch in ("senformer", "fusion"):
        neck = build_neck(cfg["neck"], backbone.channels, dim, cfg["num_heads"], cfg["neck_window"])
    if arch == "senformer":
        head = SenFormerHead(num_classes, dim, cfg["num_heads"], cfg["num_blocks"], cfg["weight_sharing"],
                             cfg["levels"], cfg["learners_per_level"], cfg["post_norm"], cfg["cache_kv"],
                             repeat_block=cfg["repeat_block"])
    elif arch == "fusion":
        head = FusionBaselineHead(num_classes, dim, cfg["num_heads"], cfg["num_blocks"], cfg["weight_sharing"],
                                  cfg["post_norm"], cfg["cache_kv"], len(backbone.channels))
    elif arch == "upernet":
        head = UPerHead(backbone.channels, num_classes, cfg["channels"])
    elif arch == "senupernet":
        head = SenUperHead(backbone.channels, num_classes, cfg["channels"], levels=cfg["levels"])
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    aux_head = FCNHead(backbone.channels[2], cfg["aux_channels"], num_classes) if cfg["aux"] else None
    model = Segmentor(backbone, neck, head, num_classes, aux_head=aux_head, merge=cfg["merge"],
                      merge_channels=cfg["merge_channels"], avg_non_ignore=cfg["avg_non_ignore"])
    model.preset = preset
    model.config = cfg
    return model


def _backbone_weights(cfg: dict):
    """The backbone file: ``backbone_weights``, or the deprecated ``pretrained`` alias."""
    weights, alias = cfg["backbone_weights"], cfg["pretrained"]
    if not alias:
        return weights
    if weights and str(weights) != str(alias):
        raise ValueError(f"build_model: backbone_weights={weights!r} and pretrained={alias!r} disagree; "
                         f"pretrained is the deprecated alias of backbone_weights: give backbone_weights only")
    # FutureWarning, not DeprecationWarning: the users of build_model are end users, and Python hides
    # DeprecationWarning outside __main__; stacklevel 3 names the caller of build_model
    warnings.warn("build_model(pretrained=...) is deprecated: use backbone_weights=... for a backbone file; "
                  "a whole-model checkpoint loads with senformer.convert.build_from_checkpoint(path)",
                  FutureWarning, stacklevel=3)
    return alias


def _backbone(preset: str, cfg: dict, weights) -> TimmBackbone:
    try:
        return TimmBackbone(cfg["backbone"], img_size=cfg["img_size"], window_size=cfg["window_size"],
                            pretrained=weights, drop_path_rate=cfg["drop_path_rate"])
    except (ValueError, OSError, pickle.UnpicklingError):
        # only now is the file inspected: the usual path reads it once, in the backbone loader
        message = whole_model_error(str(weights), preset) if weights else None
        if message is None:
            raise
    # the backbone loader's key listing says nothing useful about a whole-model file
    raise WholeModelCheckpointError(message)
