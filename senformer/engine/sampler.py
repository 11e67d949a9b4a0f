"""An endless, resumable, DDP-aware stream of (index, augmentation seed) pairs.

Global position p of the stream (p = step * global_batch + j) maps to a sample index through a
per-epoch permutation seeded by (seed, epoch), and to an augmentation seed (seed, p). Rank r of W
takes positions j in [r*B/W, (r+1)*B/W) of every global batch, so W processes see exactly the
samples, with the same augmentations, that one process with the whole batch would, and a resume at
step s continues the stream at p = s * global_batch.
"""
from __future__ import annotations

import numpy as np
import torch


class ResumableSampler(torch.utils.data.Sampler):
    def __init__(self, length: int, global_batch: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, shuffle: bool = True):
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} is not divisible by the world size {world_size}")
        self.length, self.global_batch, self.seed = int(length), int(global_batch), int(seed)
        self.rank, self.world_size, self.shuffle = int(rank), int(world_size), bool(shuffle)
        self.local_batch = global_batch // world_size
        self.start_step = int(start_step)
        self._perm_epoch, self._perm = None, None

    def _index(self, p: int) -> int:
        epoch, i = divmod(p, self.length)
        if not self.shuffle:
            return i
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.length)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def __iter__(self):
        step = self.start_step
        while True:
            base = step * self.global_batch + self.rank * self.local_batch
            for j in range(self.local_batch):
                p = base + j
                yield (self._index(p), [self.seed, 1, p])
            step += 1

    def __len__(self):  # endless; DataLoader only needs this for len(), which the trainer never asks
        return 2 ** 62
