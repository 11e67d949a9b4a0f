"""`shapes`: a procedural segmentation dataset that needs no download.

Textured geometric objects on textured backgrounds. Every object class has its own hue band and
surface pattern (so a small network can learn it in minutes on a CPU) while position, size,
rotation, occlusion and background vary, so the task is still segmentation, not colour lookup.
Sample ``i`` of a split is a pure function of (seed, split, i): any size, any length, reproducible.
"""
from __future__ import annotations

import zlib

import numpy as np

from .base import SegDataset

SHAPES_CLASSES = ("background", "disk", "rectangle", "triangle", "ring")
# centre hue of each object class (0..1); bands are +-0.06 wide so they never overlap
_CLASS_HUE = {1: 0.02, 2: 0.30, 3: 0.58, 4: 0.80}


def hsv_to_rgb(h, s, v):
    """Vectorised HSV (all in [0,1]) -> RGB float array (..., 3) in [0,1]."""
    h = (h % 1.0) * 6.0
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _object_mask(cls, yy, xx, cy, cx, r, theta):
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    if cls == 1:
        return dx * dx + dy * dy < r * r
    if cls == 2:
        return (np.abs(u) < r) & (np.abs(v) < 0.6 * r)
    if cls == 3:
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = theta + 2 * np.pi * k / 3
            inside &= dx * np.cos(a) + dy * np.sin(a) < 0.5 * r
        return inside
    d2 = dx * dx + dy * dy
    return (d2 < r * r) & (d2 > (0.55 * r) ** 2)


def _pattern(cls, u, v, period):
    if cls == 1:  # smooth radial shading
        return np.clip(1 - (u * u + v * v) / (4 * period * period), 0, 1)
    if cls == 2:  # stripes
        return 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    if cls == 3:  # checkerboard
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float64)
    return 0.5 + 0.5 * np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)  # dots


def render_shapes(rng: np.random.Generator, height: int, width: int, max_objects: int = 4):
    """One (image uint8 HxWx3, label uint8 HxW) sample drawn with ``rng``."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    # background: low-saturation noise blobs of a random hue
    coarse = rng.random((max(2, height // 16), max(2, width // 16)))
    iy = np.minimum((yy / height * coarse.shape[0]).astype(int), coarse.shape[0] - 1)
    ix = np.minimum((xx / width * coarse.shape[1]).astype(int), coarse.shape[1] - 1)
    bg_v = 0.25 + 0.5 * coarse[iy, ix] + 0.1 * rng.standard_normal((height, width))
    h = np.full((height, width), rng.random())
    s = np.full((height, width), 0.25 * rng.random())
    v = np.clip(bg_v, 0, 1)
    label = np.zeros((height, width), np.uint8)
    side = min(height, width)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(1, len(SHAPES_CLASSES)))
        r = side * rng.uniform(0.12, 0.3)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        theta = rng.uniform(0, 2 * np.pi)
        m = _object_mask(cls, yy, xx, cy, cx, r, theta)
        if not m.any():
            continue
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        w = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        pat = _pattern(cls, u, w, max(2.0, r / 3))
        h[m] = _CLASS_HUE[cls] + rng.uniform(-0.06, 0.06)
        s[m] = rng.uniform(0.55, 1.0)
        v[m] = np.clip(rng.uniform(0.55, 0.95) * (0.6 + 0.4 * pat[m]), 0, 1)
        label[m] = cls
    rgb = hsv_to_rgb(h, s, v) * 255 + rng.normal(0, 6, (height, width, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8), label


class ShapesDataset(SegDataset):
    """Procedural dataset; ``length`` samples of ``size`` = (H, W) per split, deterministic by seed."""

    CLASSES = SHAPES_CLASSES

    def __init__(self, split="train", length=None, size=(128, 128), seed=0, pipeline=None):
        super().__init__(pipeline)
        if split not in ("train", "val", "test"):
            raise ValueError(f"shapes: split must be train, val or test, got {split!r}")
        self.split = split
        self.length = int(length if length is not None else (2000 if split == "train" else 64))
        if self.length <= 0:
            raise ValueError(f"shapes: length must be positive, got {self.length}")
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or min(size) < 8:
            raise ValueError(f"shapes: size must be (H, W) with both >= 8, got {size}")
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self.names = [f"shapes_{split}_{i:06d}" for i in range(self.length)]

    def __len__(self):
        return self.length

    def load(self, index):
        # crc32 of the split keeps train and val disjoint for the same seed
        rng = np.random.default_rng([self.seed, zlib.crc32(self.split.encode()), int(index)])
        return render_shapes(rng, *self.size)
