"""Image and label-map file reading with errors that name the file."""
from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path) -> np.ndarray:
    """RGB uint8 HxWx3."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image file {path}: {e}") from e


def read_header(path, what="image"):
    """``(width, height), mode`` from the file header alone: PIL decodes pixels lazily, so this is cheap
    enough to run over every file of a dataset before training."""
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read {what} file {path}: {e}") from e


def check_label_mode(path, mode):
    if mode in ("RGB", "RGBA"):
        raise DataError(f"label map {path} is {mode}; expected a single-channel (L/P/I) PNG of class ids")


def read_label(path) -> np.ndarray:
    """Label map HxW (class ids as stored; palette PNGs give their indices, not colours)."""
    try:
        with Image.open(path) as im:
            check_label_mode(path, im.mode)
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"cannot read label file {path}: {e}") from e
    if arr.ndim != 2:
        raise DataError(f"label map {path} has shape {arr.shape}; expected HxW class ids")
    return arr


def write_label(path, label: np.ndarray, palette=None):
    """Save class ids as an 8-bit PNG (palette mode when ``palette`` (K,3) is given)."""
    arr = np.asarray(label)
    if arr.max(initial=0) > 255:
        raise ValueError(f"cannot save {path}: class id {arr.max()} does not fit an 8-bit PNG")
    im = Image.fromarray(arr.astype(np.uint8), mode="L")
    if palette is not None:
        im = im.convert("P")
        flat = np.zeros((256, 3), np.uint8)
        pal = np.asarray(palette, np.uint8)[:256]
        flat[: len(pal)] = pal
        im.putpalette(flat.reshape(-1).tolist())
    im.save(path)
