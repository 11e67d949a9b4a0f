"""Datasets (ADE20K, Cityscapes, Pascal-Context 59, COCO-Stuff-10k, generic folders, procedural
``shapes``) and the paper's augmentation pipeline."""
from __future__ import annotations

from .base import SegDataset
from .classes import (ADE20K_CLASSES, CITYSCAPES_CLASSES, COCO_STUFF_CLASSES, PASCAL_CONTEXT59_CLASSES, default_palette,
                      palette_for)
from .folders import ADE20K, COCOStuff10k, Cityscapes, FolderDataset, GenericFolder, PascalContext59
from .shapes import SHAPES_CLASSES, ShapesDataset
from .transforms import TestPipeline, TrainPipeline

DATASETS = {
    "shapes": ShapesDataset,
    "ade20k": ADE20K,
    "cityscapes": Cityscapes,
    "pascal_context59": PascalContext59,
    "coco_stuff10k": COCOStuff10k,
    "folder": GenericFolder,
}

# the fixed class lists, for naming a checkpoint's classes without reading the dataset
KNOWN_CLASSES = {"shapes": SHAPES_CLASSES, "ade20k": ADE20K_CLASSES, "cityscapes": CITYSCAPES_CLASSES,
                 "pascal_context59": PASCAL_CONTEXT59_CLASSES, "coco_stuff10k": COCO_STUFF_CLASSES}


def build_dataset(name: str, split: str = "train", root=None, pipeline=None, **kwargs) -> SegDataset:
    """Dataset ``name`` (one of ``DATASETS``) for ``split``. ``shapes`` takes ``length``, ``size``,
    ``seed``; ``folder`` takes ``classes``, ``img_dir``, ``ann_dir``, ...; the others only ``root``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    cls = DATASETS[name]
    if name == "shapes":
        return cls(split=split, pipeline=pipeline, **kwargs)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a data root (--data-root); expected layout:\n  "
                         + "\n  ".join(cls.LAYOUT))
    if kwargs and name != "folder":
        raise ValueError(f"dataset {name!r} takes no options besides root, got {sorted(kwargs)}")
    return cls(root, split=split, pipeline=pipeline, **kwargs)


__all__ = ["DATASETS", "KNOWN_CLASSES", "build_dataset", "SegDataset", "ShapesDataset", "SHAPES_CLASSES", "FolderDataset",
           "ADE20K", "Cityscapes", "PascalContext59", "COCOStuff10k", "GenericFolder", "TrainPipeline",
           "TestPipeline", "default_palette", "palette_for"]
