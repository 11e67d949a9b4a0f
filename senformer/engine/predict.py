"""Segment image files: label PNGs (class ids), colour-palette PNGs and overlays (paper Figure 5 style)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..data.io import IMAGE_EXTS, read_image, write_label
from .inference import infer_image
from .legend import LEGEND_CHOICES, write_class_key


def collect_images(inputs) -> list:
    """Image files from a mix of file and folder paths (folders: recursively, sorted)."""
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise FileNotFoundError(f"folder {p} holds no image files ({', '.join(IMAGE_EXTS)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input {p} is neither an image file nor a folder")
    return files


def colorize(label: np.ndarray, palette: np.ndarray, ignore_index=255) -> np.ndarray:
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(palette)] = palette[:256]
    out = pal[np.clip(label, 0, 255)]
    out[label == ignore_index] = 0
    return out


def overlay(img: np.ndarray, colour: np.ndarray, alpha=0.5, keep=None) -> np.ndarray:
    """Blend ``colour`` over ``img``; pixels where ``keep`` is True show the plain image."""
    out = (img.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).round().astype(np.uint8)
    if keep is not None:
        out[keep] = img[keep]
    return out


@torch.no_grad()
def predict_files(model, files, out_dir, palette, scale, ratios=(1.0,), flip=False, mode="whole", crop=None,
                  stride=None, merge=None, learners=None, device="cpu", alpha=0.5, outputs=("label", "color", "overlay"),
                  progress=None, protocol="official", classes=None, legend="present"):
    """Writes <out_dir>/{label,color,overlay}/<stem>.png for each file, then <out_dir>/classes.json
    (every class with its predicted pixel count) and <out_dir>/legend.png (see ``legend.write_class_key``);
    returns the written stems.
    ``classes``: class names (None: "class0", ...). ``legend``: "present", "all" or "none".
    ``progress``: True for a progress bar on stderr, or a callable called with each file after it is written.
    ``protocol``: "official" (mmseg 0.20's test arithmetic) or "fast" (see ``inference.infer_image``)."""
    if legend not in LEGEND_CHOICES:  # before any work, not after the last image
        raise ValueError(f"legend must be one of {', '.join(LEGEND_CHOICES)}, got {legend!r}")
    out_dir = Path(out_dir)
    for kind in outputs:
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
    model.eval()
    head = None if learners is None else tuple(learners)
    written = []
    seen = set()
    counts = np.zeros(len(classes) if classes is not None else 0, np.int64)
    files = list(files)
    bar = tqdm(files, desc="predict", unit="img", file=sys.stderr, dynamic_ncols=True,
               disable=progress is not True)
    for f in bar:
        f = Path(f)
        bar.set_postfix_str(f.name)  # the file being segmented, shown while it is
        stem = f.stem
        if stem in seen:  # same name in two input folders: keep both
            stem = f"{f.parent.name}_{stem}"
        seen.add(stem)
        img = read_image(f)
        probs = infer_image(model, img, [head], scale, ratios, flip, mode, crop, stride, merge, device,
                            protocol=protocol)[0]
        label = probs.argmax(1)[0].cpu().numpy().astype(np.uint8)
        # counted from the uint8 map, so classes.json agrees with the label PNGs
        hist = np.bincount(label.ravel(), minlength=max(len(counts), probs.shape[1]))
        counts = np.pad(counts, (0, len(hist) - len(counts))) + hist
        colour = colorize(label, palette)
        if "label" in outputs:
            write_label(out_dir / "label" / f"{stem}.png", label)
        if "color" in outputs:
            write_label(out_dir / "color" / f"{stem}.png", label, palette)
        if "overlay" in outputs:
            keep = (label == 0) if not palette[0].any() else None  # a black class 0 is "background"
            Image.fromarray(overlay(img, colour, alpha, keep)).save(out_dir / "overlay" / f"{stem}.png")
        written.append(stem)
        if callable(progress):
            progress(f)
    bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_class_key(out_dir, counts, classes, palette, legend)
    return written
