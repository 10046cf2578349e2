"""Training batches that depend on (seed, epoch) alone, so a resumed run repeats an uninterrupted one.

A shuffling DataLoader draws its order, and each worker its augmentations, from random states
that an interrupted and resumed run does not restore; a model trained across a resume then sees
other images in other crops than one trained straight through. Here the order of each epoch is a
permutation seeded by (seed, epoch), dealt to the ranks as torch's DistributedSampler deals it,
and every image's augmentation runs with the random generators (torch, Python, NumPy) seeded by
(seed, epoch, index): the same views whatever the number of workers or where a run resumed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (seeded shuffle per epoch, this rank's share), yielding
    ``(epoch, index)`` so that :class:`SeededViews` can seed each image's augmentation.

    Subclassing DistributedSampler makes Lightning keep it (and call ``set_epoch``) rather than
    inject its own; one device is one rank of one.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        for index in super().__iter__():
            yield self.epoch, index


class SeededViews(Dataset):
    """``dataset[index]`` with every random generator seeded by (seed, epoch, index), read as
    ``views[(epoch, index)]``; the generators' states outside the call are left as they were."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        words = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(words[0]) << 32 | int(words[1]))
            random.seed(int(words[0]))
            np.random.seed(int(words[1]))
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)
