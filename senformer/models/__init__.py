"""SenFormer models: timm backbones, FPN/FPNT necks, transformer learners, heads, baselines and the zoo."""
from .segmentor import Segmentor
from .zoo import OVERRIDES, PRESETS, build_model, preset_config

__all__ = ["Segmentor", "build_model", "PRESETS", "OVERRIDES", "preset_config"]
