"""Training, evaluation and prediction: metrics, checkpoints, optimizer/schedule, DDP, the loop."""
from .metrics import ConfusionMatrix, iou_from_confusion, mean_iou

__all__ = ["ConfusionMatrix", "iou_from_confusion", "mean_iou"]
