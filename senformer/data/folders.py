"""Datasets stored as image files + label PNGs in the layouts mmsegmentation documents."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import DataError
from .base import SegDataset
from .classes import ADE20K_CLASSES, CITYSCAPES_CLASSES, COCO_STUFF_CLASSES, PASCAL_CONTEXT59_CLASSES
from .io import IMAGE_EXTS, check_label_mode, read_header, read_image, read_label

VALIDATE_SAMPLE = 32  # label maps decoded by a default validate(); full=True decodes them all
_PROGRESS_MIN = 500  # fewer files than this check in about a second: no bar


def sample_indices(n: int, k: int = VALIDATE_SAMPLE) -> list:
    """``min(n, k)`` evenly spaced indices of ``range(n)``, first and last included: deterministic, so a
    rerun checks the same files, and spread out, so one bad sub-folder or conversion batch is likely hit."""
    if n <= k:
        return list(range(n))
    return [i * (n - 1) // (k - 1) for i in range(k)]


def _size_mismatch(seg_path, seg_hw, img_path, img_hw):
    return DataError(f"label map {seg_path} is {tuple(seg_hw)} but image {img_path} is {tuple(img_hw)} (HxW)")


def _layout_error(name, root, expected, problem):
    lines = "\n  ".join(expected)
    return FileNotFoundError(f"{name}: {problem} under data root {root!s}.\nExpected layout:\n  {lines}")


class FolderDataset(SegDataset):
    """Images in ``img_dir`` and label maps in ``ann_dir`` paired by file stem.

    ``img_suffix``/``seg_suffix`` are the file-name endings (``_leftImg8bit.png`` and
    ``_gtFine_labelTrainIds.png`` for Cityscapes); ``split_file`` optionally lists the stems to use;
    ``reduce_zero_label`` maps label 0 to ignore (255) and shifts the others down by one
    (ADE20K, Pascal-Context 59)."""

    NAME = "folder"
    LAYOUT: tuple = ("<root>/<img_dir>/**/<name><img_suffix>", "<root>/<ann_dir>/**/<name><seg_suffix>")

    def __init__(self, root, img_dir, ann_dir, classes, img_suffix=".jpg", seg_suffix=".png",
                 split_file=None, reduce_zero_label=False, ignore_index=255, pipeline=None):
        super().__init__(pipeline)
        self.root = Path(root)
        self.CLASSES = tuple(classes)
        if not self.CLASSES:
            raise ValueError(f"{self.NAME}: classes must list at least one class name")
        self.reduce_zero_label = bool(reduce_zero_label)
        self.ignore_index = int(ignore_index)
        img_root, ann_root = self.root / img_dir, self.root / ann_dir
        for d, what in ((img_root, "image folder"), (ann_root, "annotation folder")):
            if not d.is_dir():
                raise _layout_error(self.NAME, self.root, self.LAYOUT, f"missing {what} {d}")
        images = self._scan(img_root, img_suffix)
        labels = self._scan(ann_root, seg_suffix)
        if split_file is not None:
            sf = self.root / split_file
            if not sf.is_file():
                raise _layout_error(self.NAME, self.root, self.LAYOUT, f"missing split file {sf}")
            wanted = [ln.strip() for ln in sf.read_text().splitlines() if ln.strip()]
            missing = [w for w in wanted if w not in images]
            if missing:
                raise FileNotFoundError(f"{self.NAME}: {len(missing)} images listed in {sf} are missing from "
                                        f"{img_root} (first: {missing[0]}{img_suffix})")
            stems = wanted
        else:
            stems = sorted(images)
        unlabeled = [s for s in stems if s not in labels]
        if unlabeled:
            raise FileNotFoundError(f"{self.NAME}: {len(unlabeled)} images have no label map in {ann_root} "
                                    f"(first: {unlabeled[0]}{seg_suffix} expected)")
        if not stems:
            raise _layout_error(self.NAME, self.root, self.LAYOUT, f"no '*{img_suffix}' images in {img_root}")
        self.names = stems
        self.img_files = [images[s] for s in stems]
        self.seg_files = [labels[s] for s in stems]

    @staticmethod
    def _scan(folder: Path, suffix: str):
        out = {}
        for dirpath, _, files in os.walk(folder):
            for f in files:
                if f.endswith(suffix):
                    out[f[: len(f) - len(suffix)]] = Path(dirpath) / f
        return out

    def __len__(self):
        return len(self.names)

    def _class_ids(self, label, path):
        """Stored label values -> class ids (int64) after ``reduce_zero_label``; the one place that decides
        which values a label map may hold, for both ``load`` and ``validate``."""
        seg = label.astype(np.int64)
        if self.reduce_zero_label:
            # 0 ("other") becomes ignore and the classes shift down; an existing ignore stays ignore
            seg = np.where((seg == 0) | (seg == self.ignore_index), self.ignore_index + 1, seg) - 1
        bad = (seg != self.ignore_index) & ((seg < 0) | (seg >= len(self.CLASSES)))
        if bad.any():
            raise DataError(f"label map {path} holds class {int(seg[bad][0])}, but {self.NAME} has "
                            f"{len(self.CLASSES)} classes (ids 0..{len(self.CLASSES) - 1}, {self.ignore_index} = ignore)"
                            + ("; Cityscapes needs the *_labelTrainIds.png maps" if self.NAME == "cityscapes" else ""))
        return seg

    def load(self, index):
        img_path, seg_path = self.img_files[index], self.seg_files[index]
        img, label = read_image(img_path), read_label(seg_path)
        if label.shape != img.shape[:2]:
            raise _size_mismatch(seg_path, label.shape, img_path, img.shape[:2])
        seg = self._class_ids(label, seg_path)
        return img, seg.astype(np.uint8)

    def validate(self, full=False, progress=False):
        """Check the dataset before training rather than in a DataLoader worker mid-epoch: every
        image/label pair's sizes from the file headers (cheap: no pixels decoded), then the values of
        an evenly spaced sample of ``VALIDATE_SAMPLE`` label maps, or of all of them with ``full``.
        Raises ``DataError`` naming the first bad file; returns ``{"pairs": n, "labels_decoded": k}``."""
        n = len(self)
        bar = progress and n >= _PROGRESS_MIN
        for i in tqdm(range(n), desc=f"{self.NAME}: file sizes", unit="pair", disable=not bar, leave=False):
            (iw, ih), _ = read_header(self.img_files[i], "image")
            (sw, sh), mode = read_header(self.seg_files[i], "label")
            check_label_mode(self.seg_files[i], mode)
            if (sw, sh) != (iw, ih):
                raise _size_mismatch(self.seg_files[i], (sh, sw), self.img_files[i], (ih, iw))
        decode = range(n) if full else sample_indices(n)
        for i in tqdm(decode, desc=f"{self.NAME}: label values", unit="map", disable=not bar, leave=False):
            self._class_ids(read_label(self.seg_files[i]), self.seg_files[i])
        return {"pairs": n, "labels_decoded": len(decode)}


class ADE20K(FolderDataset):
    NAME = "ade20k"
    LAYOUT = ("ADEChallengeData2016/images/{training,validation}/*.jpg",
              "ADEChallengeData2016/annotations/{training,validation}/*.png  (0 = other, 1..150 = classes)")

    def __init__(self, root, split="train", pipeline=None):
        d = {"train": "training", "val": "validation"}.get(split, split)
        super().__init__(root, f"images/{d}", f"annotations/{d}", ADE20K_CLASSES, ".jpg", ".png",
                         reduce_zero_label=True, pipeline=pipeline)


class Cityscapes(FolderDataset):
    NAME = "cityscapes"
    LAYOUT = ("cityscapes/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png",
              "cityscapes/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png  "
              "(made by cityscapesscripts' createTrainIdLabelImgs / mmseg's tools/convert_datasets/cityscapes.py)")

    def __init__(self, root, split="train", pipeline=None):
        super().__init__(root, f"leftImg8bit/{split}", f"gtFine/{split}", CITYSCAPES_CLASSES,
                         "_leftImg8bit.png", "_gtFine_labelTrainIds.png", pipeline=pipeline)


class PascalContext59(FolderDataset):
    NAME = "pascal_context59"
    LAYOUT = ("VOCdevkit/VOC2010/JPEGImages/*.jpg",
              "VOCdevkit/VOC2010/SegmentationClassContext/*.png  (mmseg's tools/convert_datasets/pascal_context.py)",
              "VOCdevkit/VOC2010/ImageSets/SegmentationContext/{train,val}.txt")

    def __init__(self, root, split="train", pipeline=None):
        super().__init__(root, "JPEGImages", "SegmentationClassContext", PASCAL_CONTEXT59_CLASSES, ".jpg", ".png",
                         split_file=f"ImageSets/SegmentationContext/{split}.txt", reduce_zero_label=True,
                         pipeline=pipeline)


class COCOStuff10k(FolderDataset):
    NAME = "coco_stuff10k"
    LAYOUT = ("coco_stuff10k/images/{train2014,test2014}/*.jpg",
              "coco_stuff10k/annotations/{train2014,test2014}/*_labelTrainIds.png  "
              "(mmseg's tools/convert_datasets/coco_stuff10k.py)")

    def __init__(self, root, split="train", pipeline=None):
        d = {"train": "train2014", "val": "test2014", "test": "test2014"}.get(split, split)
        super().__init__(root, f"images/{d}", f"annotations/{d}", COCO_STUFF_CLASSES, ".jpg", "_labelTrainIds.png",
                         pipeline=pipeline)


class GenericFolder(FolderDataset):
    """``<root>/images/<split>/*`` + ``<root>/masks/<split>/*.png`` (or flat ``images``/``masks`` without
    split sub-folders) and a class list: names given directly, or a text file one per line."""

    NAME = "folder"
    LAYOUT = ("<root>/images[/<split>]/<name>.{jpg,png,...}", "<root>/masks[/<split>]/<name>.png",
              "classes: a list, or <root>/classes.txt with one class name per line")

    def __init__(self, root, split="train", classes=None, img_dir="images", ann_dir="masks",
                 img_suffix=None, seg_suffix=".png", reduce_zero_label=False, pipeline=None):
        root = Path(root)
        if classes is None or isinstance(classes, (str, Path)):
            cf = Path(classes) if classes is not None else root / "classes.txt"
            if not cf.is_absolute() and not cf.exists():
                cf = root / cf
            if not cf.is_file():
                raise _layout_error(self.NAME, root, self.LAYOUT, f"no class list (looked for {cf})")
            classes = [ln.strip() for ln in cf.read_text().splitlines() if ln.strip()]
        if (root / img_dir / split).is_dir():
            img_dir, ann_dir = f"{img_dir}/{split}", f"{ann_dir}/{split}"
        if img_suffix is None:
            img_suffix = self._guess_suffix(root / img_dir)
        super().__init__(root, img_dir, ann_dir, classes, img_suffix, seg_suffix,
                         reduce_zero_label=reduce_zero_label, pipeline=pipeline)

    def _guess_suffix(self, folder: Path):
        if folder.is_dir():
            for f in sorted(folder.rglob("*")):
                if f.suffix.lower() in IMAGE_EXTS:
                    return f.suffix
        return ".jpg"
