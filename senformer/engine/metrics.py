"""mIoU from a confusion matrix accumulated image by image (the dataset is never held in memory)."""
from __future__ import annotations

import math

import torch


class ConfusionMatrix:
    """Running (K,K) int64 confusion matrix, rows = target class, columns = predicted class."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if int(num_classes) <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred, target):
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        k = self.num_classes
        if target.numel() and (target.min() < 0 or target.max() >= k):
            bad = target[(target < 0) | (target >= k)][0].item()
            raise ValueError(f"target holds class {bad}, outside [0, {k}) and not ignore_index={self.ignore_index}")
        if pred.numel() and (pred.min() < 0 or pred.max() >= k):
            bad = pred[(pred < 0) | (pred >= k)][0].item()
            raise ValueError(f"pred holds class {bad}, outside [0, {k})")
        self.mat += torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)
        return self

    def merge(self, other: "ConfusionMatrix"):
        self.mat += other.mat
        return self

    def compute(self) -> dict:
        return iou_from_confusion(self.mat)


def iou_from_confusion(mat: torch.Tensor) -> dict:
    """{"mIoU", "IoU" (list; NaN for a class absent from prediction and target, left out of the mean as
    mmseg does), "aAcc", "Acc" (per-class recall; NaN for a class absent from the target), "mAcc"}."""
    mat = mat.to(torch.float64)
    tp = mat.diag()
    union = mat.sum(0) + mat.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    gt = mat.sum(1)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
    total = mat.sum()
    return {
        "mIoU": _nanmean(iou),
        "IoU": iou.tolist(),
        "aAcc": (tp.sum() / total).item() if total > 0 else math.nan,
        "Acc": acc.tolist(),
        "mAcc": _nanmean(acc),
    }


def _nanmean(x: torch.Tensor) -> float:
    ok = ~torch.isnan(x)
    return x[ok].mean().item() if ok.any() else math.nan


def mean_iou(pred, target, num_classes: int, ignore_index: int = 255) -> dict:
    """mIoU of predictions against targets. ``pred``/``target`` are label tensors/arrays of equal shape,
    or equally long iterables of them (e.g. a generator over a dataset: one image at a time is held)."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    if isinstance(pred, torch.Tensor) or hasattr(pred, "shape"):
        cm.update(pred, target)
    else:
        pred_it, target_it = iter(pred), iter(target)
        for p in pred_it:
            try:
                t = next(target_it)
            except StopIteration:
                raise ValueError("pred yields more items than target") from None
            cm.update(p, t)
        if next(target_it, None) is not None:
            raise ValueError("target yields more items than pred")
    return cm.compute()
