"""`ShardLoader`: one rank's batches of each epoch of a shard set, resumable at any batch without reading the
batches before it."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from mae.data.mask_noise import WithMaskNoise
from mae.data.sampling import SeededDataset, sample_seed
from mae.data.shards.dataset import ShardDataset, build_shard_dataset
from mae.data.shards.plan import DEFAULT_BUFFER, batches_per_rank, plan_epoch
from mae.data.workers import ignore_stop_signals
from mae.errors import ConfigError

log = logging.getLogger("mae")


class _PlanBatches(Sampler[list[tuple[int, int]]]):
    """Batches of ``(global index, sample seed)`` keys of the current (epoch, skip): the loader's batch sampler."""

    def __init__(self, counts: Sequence[int], *, batch_size: int, seed: int, rank: int, world_size: int,
                 shuffle: bool, drop_last: bool, buffer_size: int):
        self.counts, self.batch_size, self.seed = tuple(counts), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last, self.buffer_size = shuffle, drop_last, buffer_size
        self.epoch, self.skip = 0, 0
        self._cache: tuple[int, np.ndarray] | None = None

    def indices(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, plan_epoch(self.counts, seed=self.seed, epoch=epoch, rank=self.rank,
                                             world_size=self.world_size, batch_size=self.batch_size,
                                             shuffle=self.shuffle, drop_last=self.drop_last,
                                             buffer_size=self.buffer_size))
        return self._cache[1]

    def num_batches(self) -> int:
        return math.ceil(len(self.indices(self.epoch)) / self.batch_size)

    def __iter__(self):
        indices, epoch = self.indices(self.epoch), self.epoch
        for start in range(self.skip * self.batch_size, len(indices), self.batch_size):
            yield [(i, sample_seed(self.seed, epoch, i)) for i in indices[start:start + self.batch_size].tolist()]

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.skip)


class ShardLoader:
    """Batches of one rank's share of each epoch of a shard set, resumable at any batch.

    ``set_epoch(epoch, skip=k)`` selects the epoch (its order is a pure function of (seed, epoch), see `plan_epoch`)
    and skips this rank's first k batches without reading them; iterating then yields batches k, k+1, ... of that
    epoch, bit-identical to the uninterrupted pass, with any number of workers. The selection holds for every pass
    until the next `set_epoch`.

    ``len(loader)`` is the number of batches in the *full* epoch (the same on every rank with drop_last), whatever
    `skip` is; `remaining` is what the next pass yields. `dataset` is the `ShardDataset` (for `skipped_files`).
    Batches: ``(images [N, C, H, W], noise [N, L])`` with `num_patches`, else ``(images, labels)``.
    """

    def __init__(self, dataset: ShardDataset, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, num_patches: int | None = None, shuffle: bool = True, drop_last: bool = True,
                 buffer_size: int = DEFAULT_BUFFER, collate_fn: Callable | None = None):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        if num_workers < 0:
            raise ConfigError(f"num_workers={num_workers} must be 0 (load in the main process) or more")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} and world_size={world_size}: need world_size >= 1 and "
                              "0 <= rank < world_size")
        if buffer_size < 0:
            raise ConfigError(f"buffer_size={buffer_size} must be >= 0 (0 or 1: no shuffle buffer)")
        if num_patches is not None and num_patches < 1:
            raise ConfigError(f"num_patches={num_patches} must be at least 1 (or None for (image, label) batches)")
        total = len(dataset)
        batches = batches_per_rank(total, batch_size, world_size, drop_last)
        if batches == 0:
            raise ConfigError(f"{total} samples in '{dataset.shards.spec}' ({dataset.shards.split}) are fewer than "
                              f"one batch of {batch_size} for each of {world_size} rank(s); lower batch_size")
        if drop_last:
            log.info("shards: %d samples in %d shard(s); %d rank(s) x %d batches of %d per epoch; %d sample(s) left "
                     "out of each epoch (a different run of samples each epoch)", total, len(dataset.shards.paths),
                     world_size, batches, batch_size, total - world_size * batches * batch_size)
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        self.rank, self.world_size = rank, world_size
        self.batch_sampler = _PlanBatches(dataset.shards.counts, batch_size=batch_size, seed=seed, rank=rank,
                                          world_size=world_size, shuffle=shuffle, drop_last=drop_last,
                                          buffer_size=buffer_size)
        self._batches = batches
        self.loader = DataLoader(
            SeededDataset(WithMaskNoise(dataset, num_patches) if num_patches is not None else dataset),
            batch_sampler=self.batch_sampler,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
            collate_fn=collate_fn,
            # the workers' base seed comes from here, not from the global RNG: iterating leaves the caller's
            # RNG states untouched (every sample is reseeded anyway)
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=ignore_stop_signals,
        )

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch

    @property
    def skip(self) -> int:
        return self.batch_sampler.skip

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Make the next pass read `epoch`, starting at this rank's batch `skip` (0: the whole epoch)."""
        if not 0 <= skip <= len(self):
            raise ConfigError(f"skip={skip} batches is not in [0, {len(self)}] (batches per epoch on this rank)")
        self.batch_sampler.epoch, self.batch_sampler.skip = epoch, skip

    @property
    def remaining(self) -> int:
        """Batches the next pass yields (``len(self) - skip``; without drop_last, this rank's own count)."""
        return len(self.batch_sampler)

    def __len__(self) -> int:
        return self._batches

    def __iter__(self):
        return iter(self.loader)

    def __repr__(self) -> str:
        return (f"ShardLoader({self.dataset!r}, batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
                f"workers={self.num_workers}, batches={len(self)})")


def build_shard_loader(spec: str, *, transform: Callable | None, batch_size: int, seed: int = 0, rank: int = 0,
                       world_size: int = 1, num_workers: int = 0, num_patches: int | None = None, mode: str = "RGB",
                       decode: str = "tensor", split: str = "train", shuffle: bool = True, drop_last: bool = True,
                       buffer_size: int = DEFAULT_BUFFER, strict: bool = False,
                       collate_fn: Callable | None = None) -> ShardLoader:
    """The loader of ``shards:DIR`` (or a brace pattern) for one rank of `world_size`; see `ShardLoader`.

    Pre-training: pass `num_patches` (L) for ``(images, noise [N, L])`` batches; classification: leave it None for
    ``(images, labels)``. Training keeps shuffle and drop_last (every rank the same number of batches); evaluation
    passes ``shuffle=False, drop_last=False`` (every sample once; ranks may differ by one batch).
    Call ``loader.set_epoch(epoch)`` (or `mae.data.set_epoch`) before each epoch, with ``skip`` to resume inside one.
    """
    dataset = build_shard_dataset(spec, split, transform=transform, mode=mode, decode=decode, strict=strict)
    return ShardLoader(dataset, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                       num_workers=num_workers, num_patches=num_patches, shuffle=shuffle, drop_last=drop_last,
                       buffer_size=buffer_size, collate_fn=collate_fn)
