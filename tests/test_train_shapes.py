"""Acceptance: the small preset learns `shapes` on the CPU within the CI budget."""
import numpy as np

from senformer.engine.config import load_config
from senformer.engine.metrics import mean_iou
from senformer.engine.builders import build_val_dataset
from senformer.engine.trainer import train


def test_senformer_tiny_learns_shapes_far_above_chance(tmp_path):
    cfg = load_config("shapes_tiny", [
        ("schedule.iters", 80), ("schedule.warmup_iters", 8), ("data.num_workers", 0),
        ("data.val_options", {"length": 16}), ("checkpoint.interval", 0), ("log.interval", 20), ("device", "cpu")])
    res = train(cfg, tmp_path, progress=False, print_fn=lambda *_: None)
    # chance = the best constant prediction: every pixel labelled with the most frequent class
    val = build_val_dataset(cfg)
    targets = [val[i]["seg"] for i in range(len(val))]
    counts = np.bincount(np.concatenate([t.numpy().ravel() for t in targets]), minlength=5)
    chance = mean_iou([np.full(t.shape, counts.argmax()) for t in targets], targets, 5)["mIoU"]
    miou = res["metrics"]["mIoU"]
    print(f"shapes val mIoU {miou:.3f} after 80 iterations; chance {chance:.3f}")
    assert chance < 0.2
    assert miou > 0.5 and miou > 3 * chance
    assert res["losses"][-1] < 0.6 * res["losses"][0]
