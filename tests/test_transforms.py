import numpy as np
import pytest
import torch

from senformer.data.transforms import (TrainPipeline, hsv_to_rgb, normalize, photometric_distortion, random_crop,
                                       rescale_size, rgb_to_hsv)


def test_rescale_keeps_ratio_within_both_edges():
    assert rescale_size(480, 640, (2048, 512)) == (512, 683)
    assert rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    h, w = rescale_size(300, 1000, (2048, 512))
    assert w <= 2048 and min(h, w) <= 512 and abs(w / h - 1000 / 300) < 0.02


def test_cat_max_ratio_rejects_crops_dominated_by_one_class():
    seg = np.zeros((100, 100), np.uint8)
    seg[:, 90:] = 1  # only crops near the right edge hold two classes in a balanced way
    img = np.zeros((100, 100, 3), np.uint8)
    found = 0
    for s in range(20):
        _, c = random_crop(img, seg, (20, 20), np.random.default_rng(s), cat_max_ratio=0.75, tries=200)
        vals, counts = np.unique(c, return_counts=True)
        found += len(vals) > 1 and counts.max() / counts.sum() < 0.75
    assert found == 20
    _, c = random_crop(img, seg, (20, 20), np.random.default_rng(0), cat_max_ratio=1.0)
    assert c.shape == (20, 20)


def test_hsv_round_trip():
    rgb = np.random.default_rng(0).uniform(0, 255, (7, 9, 3))
    np.testing.assert_allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-6)


def test_photometric_stays_in_range_and_changes_image():
    img = np.random.default_rng(1).integers(0, 256, (11, 13, 3)).astype(np.uint8)
    outs = [photometric_distortion(img, np.random.default_rng(s)) for s in range(8)]
    assert all(o.min() >= 0 and o.max() <= 255 and o.shape == img.shape for o in outs)
    assert any(np.abs(o - img).max() > 1 for o in outs)


def test_train_pipeline_shapes_padding_and_determinism():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (37, 53, 3)).astype(np.uint8)
    seg = rng.integers(0, 4, (37, 53)).astype(np.uint8)
    pipe = TrainPipeline(scale=(53, 37), crop_size=(48, 40), ratio_range=(0.5, 0.6))
    out = pipe(img, seg, np.random.default_rng(5))
    assert out["img"].shape == (3, 48, 40) and out["img"].dtype == torch.float32
    assert out["seg"].shape == (48, 40) and out["seg"].dtype == torch.int64
    # the image is at most 0.6x the base scale, so the crop is padded: label 255, image 0
    assert (out["seg"][-1] == 255).all() and (out["img"][:, -1] == 0).all()
    assert set(out["seg"].unique().tolist()) <= {0, 1, 2, 3, 255}
    again = pipe(img, seg, np.random.default_rng(5))
    assert torch.equal(out["img"], again["img"]) and torch.equal(out["seg"], again["seg"])
    other = pipe(img, seg, np.random.default_rng(6))
    assert not torch.equal(out["img"], other["img"])


def test_normalize_and_bad_args():
    x = normalize(np.full((2, 3, 3), 123.675, np.float32))
    assert torch.allclose(x[0], torch.zeros(2, 3), atol=1e-6)
    with pytest.raises(ValueError, match="crop_size"):
        TrainPipeline((64, 64), (0, 5))
    with pytest.raises(ValueError, match="ratio_range"):
        TrainPipeline((64, 64), 32, ratio_range=(2.0, 1.0))


def test_train_resize_is_mmcv_imrescale():
    """mmseg's training Resize: ratio-scaled img_scale truncated to ints, keep-ratio size as mmcv's
    rescale_size, OpenCV bilinear image and OpenCV nearest labels (source index floor(x * src / dst))."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (97, 143, 3), dtype=np.uint8)
    seg = rng.integers(0, 7, (97, 143), dtype=np.uint8)
    scale, ratio = (2048, 512), 0.6137
    s0, s1 = int(scale[0] * ratio), int(scale[1] * ratio)  # 1256, 314
    f = min(max(s0, s1) / 143, min(s0, s1) / 97)
    h, w = int(97 * f + 0.5), int(143 * f + 0.5)
    ys = np.minimum(np.floor(np.arange(h) * (1.0 / (h / 97))).astype(int), 96)
    xs = np.minimum(np.floor(np.arange(w) * (1.0 / (w / 143))).astype(int), 142)
    want_seg = seg[ys][:, xs]
    want_img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)

    class Fixed:  # the pipeline's random draws: the ratio, then no crop retries, no flip
        def uniform(self, lo, hi):
            return ratio

        def integers(self, lo, hi=None):
            return 0

        def random(self):
            return 1.0

    pipe = TrainPipeline(scale, (h + 10, w + 10), photometric=False, mean=(0, 0, 0), std=(1, 1, 1))
    out = pipe(img, seg, Fixed())
    assert torch.equal(out["seg"][:h, :w], torch.from_numpy(want_seg.astype(np.int64)))
    assert torch.equal(out["img"][:, :h, :w], torch.from_numpy(want_img.astype(np.float32)).permute(2, 0, 1))
    assert (out["seg"][h:] == 255).all() and (out["seg"][:, w:] == 255).all()
    from senformer.data.transforms import resize_nearest

    wide = seg.astype(np.int64) * 1000
    assert np.array_equal(resize_nearest(wide, (h, w)), wide[ys][:, xs])
