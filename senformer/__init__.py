"""senformer: the SenFormer semantic-segmentation model with fused kernels for its hot paths."""
__version__ = "0.1.0"

from . import ops  # noqa: E402

__all__ = ["ops", "build_model", "__version__"]


def build_model(preset: str, num_classes: int = 150, **overrides):
    """Build a model of the zoo by preset name (see ``senformer.models.zoo.PRESETS``)."""
    from .models.zoo import build_model as _build

    return _build(preset, num_classes=num_classes, **overrides)
