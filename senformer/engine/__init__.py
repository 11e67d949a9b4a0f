"""Training, evaluation and prediction: metrics, checkpoints, optimizer/schedule, DDP, the loop.

Names load on first use, so that the CLIs' argument parsing (``engine.config``) needs no torch."""
import importlib

__all__ = ["ConfusionMatrix", "iou_from_confusion", "mean_iou"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module(".metrics", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
