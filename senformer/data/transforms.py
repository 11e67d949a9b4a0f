"""The paper's (mmseg's) training and test pipelines on numpy images.

Train: random resize (ratio 0.5-2.0 of the base scale, aspect kept; OpenCV bilinear image, nearest
labels, as mmcv.imrescale) -> random crop with cat_max_ratio -> horizontal flip -> photometric
distortion -> normalize -> pad (image 0, label 255).
Every random choice comes from the ``rng`` passed in, so a sample is reproducible from its seed.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def rescale_size(h, w, scale):
    """mmseg's keep-ratio rescale (mmcv.rescale_size): the largest size with long edge <= max(scale),
    short <= min(scale), each side rounded half up."""
    long_edge, short_edge = max(scale), min(scale)
    f = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))


def aug_scales(scale, ratios):
    """The scales of a multi-scale test, as mmseg's MultiScaleFlipAug: ``int(side * ratio)``, truncated
    before the keep-ratio rescale."""
    return [(int(scale[0] * r), int(scale[1] * r)) for r in ratios]


def resize_pillow(img, size):
    """``img`` resized to ``size`` = (h, w) by Pillow's antialiased bilinear (the fast protocol's test resize)."""
    h, w = size
    if (h, w) == img.shape[:2]:
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def _cv2(purpose):
    try:
        import cv2
    except ImportError as e:
        raise ImportError(f"{purpose} resizes images with OpenCV, as mmseg does: pip install opencv-python-headless") from e
    return cv2


def resize_nearest(seg, size):
    """Labels resized to ``size`` = (h, w) by OpenCV's INTER_NEAREST (source index floor(x * src/dst), not
    Pillow's pixel centres), as mmcv.imrescale(..., interpolation='nearest') in mmseg's training Resize."""
    h, w = size
    if (h, w) == seg.shape[:2]:
        return seg
    cv2 = _cv2("the training pipeline")
    src = np.ascontiguousarray(seg)
    # OpenCV has no int64 images; nearest only copies values, so a narrower container loses nothing
    if src.dtype == np.int64 and src.size and src.min() >= np.iinfo(np.int32).min and src.max() <= np.iinfo(np.int32).max:
        return cv2.resize(src.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int64)
    return cv2.resize(src, (w, h), interpolation=cv2.INTER_NEAREST)


def resize_linear(img, size):
    """``img`` resized to ``size`` = (h, w) by OpenCV's INTER_LINEAR, as mmcv.imresize does in mmseg's
    test pipeline: no antialiasing when shrinking (Pillow's bilinear filter widens with the scale, so
    its images differ), OpenCV's own fixed-point uint8 arithmetic, which only OpenCV reproduces."""
    h, w = size
    if (h, w) == img.shape[:2]:
        return img
    cv2 = _cv2("protocol='official' (use protocol='fast' for Pillow)")
    return cv2.resize(np.ascontiguousarray(img), (w, h), interpolation=cv2.INTER_LINEAR)


def random_crop(img, seg, crop, rng, cat_max_ratio=0.75, ignore_index=255, tries=10):
    """Crop of at most ``crop`` = (h, w); retried up to ``tries`` times until no class covers more than
    ``cat_max_ratio`` of the crop's labelled pixels (mmseg's RandomCrop)."""
    ch, cw = min(crop[0], img.shape[0]), min(crop[1], img.shape[1])

    def draw():
        y = int(rng.integers(0, img.shape[0] - ch + 1))
        x = int(rng.integers(0, img.shape[1] - cw + 1))
        return y, x

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            labels, counts = np.unique(seg[y:y + ch, x:x + cw], return_counts=True)
            counts = counts[labels != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return img[y:y + ch, x:x + cw], seg[y:y + ch, x:x + cw]


def rgb_to_hsv(rgb):
    """float RGB in [0,255] -> H in [0,360), S in [0,1], V in [0,255] (OpenCV's float convention)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    s = np.where(v > 0, delta / np.maximum(v, 1e-12), 0)
    d = np.maximum(delta, 1e-12)
    h = np.where(v == r, (g - b) / d, np.where(v == g, 2 + (b - r) / d, 4 + (r - g) / d))
    h = np.where(delta > 0, (h * 60) % 360, 0)
    return np.stack([h, s, v], -1)


def hsv_to_rgb(hsv):
    h, s, v = hsv[..., 0] / 60.0, hsv[..., 1], hsv[..., 2]
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], -1)


def photometric_distortion(img, rng, brightness=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18):
    """mmseg's PhotoMetricDistortion: each step with probability 1/2; contrast before or after the
    colour steps at random. ``hue`` is in OpenCV's half-degree units (18 = 36 degrees)."""
    x = img.astype(np.float32)
    if rng.random() < 0.5:
        x = np.clip(x + rng.uniform(-brightness, brightness), 0, 255)
    contrast_first = rng.random() < 0.5

    def do_contrast(x):
        return np.clip(x * rng.uniform(*contrast), 0, 255) if rng.random() < 0.5 else x

    if contrast_first:
        x = do_contrast(x)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        hsv = rgb_to_hsv(x)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation), 0, 1)
        if do_hue:
            hsv[..., 0] = (hsv[..., 0] + 2 * rng.integers(-hue, hue + 1)) % 360
        x = np.clip(hsv_to_rgb(hsv), 0, 255)
    if not contrast_first:
        x = do_contrast(x)
    return x


def normalize(img, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """HxWx3 (uint8 or float, 0..255) -> float32 (3,H,W). On uint8 input this is bit-identical to mmcv's
    imnormalize (cv2.subtract, then cv2.multiply by 1/std), checked in tests/test_protocol.py."""
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def _pair(v, name):
    v = (v, v) if isinstance(v, (int, float)) else tuple(v)
    if len(v) != 2 or min(v) <= 0:
        raise ValueError(f"{name} must be a positive int or (h, w) pair, got {v}")
    return int(v[0]), int(v[1])


class TrainPipeline:
    def __init__(self, scale, crop_size, ratio_range=(0.5, 2.0), cat_max_ratio=0.75, flip_prob=0.5,
                 photometric=True, ignore_index=255, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.scale = _pair(scale, "scale")
        self.crop = _pair(crop_size, "crop_size")
        self.ratio_range = tuple(float(r) for r in ratio_range)
        if len(self.ratio_range) != 2 or not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        self.cat_max_ratio, self.flip_prob = float(cat_max_ratio), float(flip_prob)
        self.photometric, self.ignore_index = bool(photometric), int(ignore_index)
        self.mean, self.std = mean, std

    def __call__(self, img, seg, rng):
        r = rng.uniform(*self.ratio_range)
        # mmseg's Resize truncates the sampled scale to ints before the keep-ratio rescale
        size = rescale_size(img.shape[0], img.shape[1], (int(self.scale[0] * r), int(self.scale[1] * r)))
        img, seg = resize_linear(img, size), resize_nearest(seg, size)
        img, seg = random_crop(img, seg, self.crop, rng, self.cat_max_ratio, self.ignore_index)
        if rng.random() < self.flip_prob:
            img, seg = img[:, ::-1], seg[:, ::-1]
        x = photometric_distortion(img, rng) if self.photometric else img
        x = normalize(x, self.mean, self.std)
        y = torch.from_numpy(np.ascontiguousarray(seg, dtype=np.int64))
        ph, pw = self.crop[0] - x.shape[1], self.crop[1] - x.shape[2]
        if ph > 0 or pw > 0:
            x = torch.nn.functional.pad(x, (0, max(pw, 0), 0, max(ph, 0)), value=0.0)
            y = torch.nn.functional.pad(y, (0, max(pw, 0), 0, max(ph, 0)), value=self.ignore_index)
        return {"img": x, "seg": y}


class TestPipeline:
    __test__ = False  # not a pytest class despite the name
    """Keeps the original image and label; ``scale`` is the base test scale (the evaluator resizes)."""

    def __init__(self, scale, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.scale = _pair(scale, "scale")
        self.mean, self.std = mean, std

    def __call__(self, img, seg, rng=None):
        return {"img": np.ascontiguousarray(img), "seg": torch.from_numpy(np.asarray(seg, dtype=np.int64))}
