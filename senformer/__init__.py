"""senformer: the SenFormer semantic-segmentation model with fused kernels for its hot paths.

    model = senformer.load("work_dirs/shapes_tiny")      # a run, checkpoint, Hub-layout folder or official .pth
    labels = model.segment("photo.jpg")                  # (H, W) numpy class ids

Submodules and functions load on first use: ``import senformer`` (and every CLI's ``--help``)
does not import torch."""
import importlib

__version__ = "0.1.0"

_WHERE = {
    "build_model": ".models.zoo",
    "list_models": ".models.presets",
    "load": ".engine.pretrained",
    "from_pretrained": ".engine.pretrained",
    "Segmenter": ".engine.pretrained",
}
_SUBMODULES = ("ops", "models", "data", "engine", "convert", "flops", "errors", "kernels")

__all__ = ["ops", "load", "from_pretrained", "list_models", "build_model", "Segmenter", "__version__"]


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE) | set(_SUBMODULES))
