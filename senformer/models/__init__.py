"""SenFormer models: timm backbones, FPN/FPNT necks, transformer learners, heads, baselines and the zoo."""
from .backbones import TimmBackbone, load_backbone_weights
from .checkpoint_kind import WholeModelCheckpointError
from .head import SenFormerHead
from .learner import DecoderBlock, TransformerLearner, build_learners
from .necks import PyramidNeck, SwinWindowBlock
from .segmentor import Segmentor
from .zoo import OVERRIDES, PRESETS, build_model, preset_config

__all__ = ["Segmentor", "build_model", "PRESETS", "OVERRIDES", "preset_config", "TimmBackbone",
           "load_backbone_weights", "SenFormerHead", "DecoderBlock", "TransformerLearner", "build_learners",
           "PyramidNeck", "SwinWindowBlock", "WholeModelCheckpointError"]
