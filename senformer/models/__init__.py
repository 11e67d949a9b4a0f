"""SenFormer models: timm backbones, FPN/FPNT necks, transformer learners, heads, baselines and the zoo.

Names are imported on first use, so that ``senformer.models.presets`` (the preset table) loads
without torch."""
import importlib

_WHERE = {
    "TimmBackbone": "backbones", "load_backbone_weights": "backbones",
    "WholeModelCheckpointError": "checkpoint_kind",
    "SenFormerHead": "head",
    "DecoderBlock": "learner", "TransformerLearner": "learner", "build_learners": "learner",
    "PyramidNeck": "necks", "SwinWindowBlock": "necks",
    "Segmentor": "segmentor",
    "build_model": "zoo",
    "OVERRIDES": "presets", "PRESETS": "presets", "preset_config": "presets", "list_models": "presets",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
