"""Samplers whose order is a pure function of (seed, epoch), and the per-sample seeding that makes each sample's
random augmentation a pure function of (seed, epoch, index) whatever the worker that reads it."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler[int]):
    """All indices, in order or shuffled by a permutation that is a pure function of (seed, epoch).

    The single-process twin of DistributedSampler (same `seed + epoch` seeding and `set_epoch`), so the loop code
    is the same with and without distributed training.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0):
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class SeededSampler(Sampler[tuple[int, int]]):
    """Pairs each index of a sampler with a seed that is a pure function of (seed, epoch, index).

    `SeededDataset` draws the sample's random augmentation from that seed, so a sample looks the same whatever the
    number of workers, and a run resumed at epoch k (or in the middle of it, after `skip` samples) sees exactly the
    crops the uninterrupted run saw.
    """

    def __init__(self, sampler: Sampler[int], seed: int):
        self.sampler, self.seed, self.epoch, self.skip = sampler, seed, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Take the order of `epoch`, leaving out its first `skip` indices (already seen before a resume)."""
        self.epoch, self.skip = epoch, skip
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            if position >= self.skip:
                yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)  # type: ignore[arg-type]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's random draws in one epoch (a pure function: no process or worker enters it)."""
    return hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF


class SeededDataset(Dataset):
    """Reads `(index, seed)` keys: the wrapped dataset's item with torch's (CPU), python's and numpy's global
    generators seeded from `seed`.

    Augmentations from torchvision draw from torch's generator; timm's (RandomResizedCropAndInterpolation,
    RandAugment, RandomErasing) from python's `random`; seeding all three makes every sample a pure function of
    (seed, epoch, index) whatever the worker that reads it. In the main process the caller's generator states are
    restored afterwards; a DataLoader worker reseeds them for every sample and runs nothing else, so it keeps none.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        """The items of a batch (the DataLoader asks for a whole batch at once). In the main process the caller's
        generator states are saved and restored once per batch, not per sample (what that costs per sample:
        docs/benchmarks.md, "The demo's recipe")."""
        if torch.utils.data.get_worker_info() is not None:
            return self._items(keys)
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            return self._items(keys)
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])

    def _items(self, keys: list[tuple[int, int]]) -> list:
        items = []
        for index, seed in keys:
            _seed_generators(seed)
            items.append(self.dataset[index])
        return items


def _seed_generators(seed: int) -> None:
    # the CPU generator only (what transforms and torch.rand use): torch.manual_seed would also queue the seeding of
    # every accelerator, many times slower per sample (docs/benchmarks.md, "Reading shards vs a folder")
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)
