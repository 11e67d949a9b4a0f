"""Common dataset protocol: ``load(i) -> (image uint8 HxWx3, label uint8/int HxW)`` plus a pipeline."""
from __future__ import annotations

import numpy as np
import torch


class SegDataset(torch.utils.data.Dataset):
    """Subclasses set ``CLASSES`` and ``names`` and implement ``load``. ``__getitem__`` accepts an
    index or an ``(index, seed)`` pair (see ``engine.sampler``): the seed drives the random
    augmentation, so a sample is the same whatever worker draws it and after a resume."""

    CLASSES: tuple = ()
    names: list

    def __init__(self, pipeline=None):
        self.pipeline = pipeline

    @property
    def num_classes(self) -> int:
        return len(self.CLASSES)

    def load(self, index):
        raise NotImplementedError

    def validate(self, full=False, progress=False):
        """Check the data before training, raising ``senformer.errors.DataError`` on the first bad
        sample; returns a summary dict to log, or None when there is nothing to check (generated data)."""
        return None

    def __getitem__(self, key):
        index, seed = key if isinstance(key, (tuple, list)) else (key, None)
        if not 0 <= int(index) < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        img, seg = self.load(int(index))
        if self.pipeline is None:
            return {"img": img, "seg": seg, "name": self.names[index]}
        rng = np.random.default_rng(seed if seed is not None else [int(index)])
        out = self.pipeline(img, seg, rng)
        out["name"] = self.names[index]
        return out
