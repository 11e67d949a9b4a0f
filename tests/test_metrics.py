import math

import numpy as np
import pytest
import torch

from senformer.engine.metrics import ConfusionMatrix, mean_iou


def numpy_iou(preds, targets, k, ignore=255):
    """Independent oracle: explicit per-class counting loops."""
    inter, union, correct, total = np.zeros(k), np.zeros(k), 0, 0
    for p, t in zip(preds, targets):
        p, t = np.asarray(p).ravel(), np.asarray(t).ravel()
        keep = t != ignore
        p, t = p[keep], t[keep]
        for c in range(k):
            inter[c] += np.sum((p == c) & (t == c))
            union[c] += np.sum((p == c) | (t == c))
        correct += np.sum(p == t)
        total += len(t)
    iou = np.array([inter[c] / union[c] if union[c] > 0 else np.nan for c in range(k)])
    return iou, np.nanmean(iou), correct / total


def _rand(rng, shape, k, absent=()):
    t = rng.integers(0, k, shape)
    p = rng.integers(0, k, shape)
    for c in absent:
        t[t == c] = (c + 1) % k
        p[p == c] = (c + 1) % k
    t[rng.random(shape) < 0.15] = 255
    return p, t


def test_mean_iou_matches_numpy_counts_exactly():
    rng = np.random.default_rng(0)
    k = 7
    preds, targets = zip(*[_rand(rng, (13, 17 + i), k, absent=(3,)) for i in range(4)])
    iou, miou, aacc = numpy_iou(preds, targets, k)
    res = mean_iou(iter(preds), iter(targets), k)
    assert math.isnan(res["IoU"][3]) and np.isnan(iou[3])
    np.testing.assert_array_equal(np.array(res["IoU"]), iou)  # same counts -> identical floats
    assert res["mIoU"] == pytest.approx(miou, rel=1e-12, abs=0)
    assert res["aAcc"] == pytest.approx(aacc, rel=1e-12, abs=0)


def test_accumulation_equals_one_shot_and_accepts_tensors():
    rng = np.random.default_rng(1)
    p, t = _rand(rng, (4, 9, 11), 5)
    one = mean_iou(torch.from_numpy(p), torch.from_numpy(t), 5)
    many = mean_iou([torch.from_numpy(x) for x in p], [torch.from_numpy(x) for x in t], 5)
    assert one["IoU"] == many["IoU"] and one["aAcc"] == many["aAcc"]


def test_class_only_in_prediction_counts_as_zero_not_nan():
    t = np.zeros((4, 4), np.int64)
    p = t.copy()
    p[0, 0] = 2
    res = mean_iou(p, t, 3)
    assert res["IoU"][2] == 0.0 and math.isnan(res["IoU"][1])
    assert res["mIoU"] == pytest.approx((15 / 16 + 0) / 2)


def test_bad_labels_are_named():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target holds class 5"):
        cm.update(np.zeros((2, 2), np.int64), np.full((2, 2), 5))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="more items"):
        mean_iou([np.zeros(3)] * 2, [np.zeros(3)], 3)
