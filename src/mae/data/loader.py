"""The training loader: order and augmentations a pure function of (seed, epoch), resumable mid-epoch (`build_loader`,
`set_epoch`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mae.data.mask_noise import WithMaskNoise
from mae.data.sampling import EpochSampler, SeededDataset, SeededSampler
from mae.data.shards.dataset import ShardDataset
from mae.data.shards.loader import ShardLoader
from mae.data.workers import ignore_stop_signals
from mae.errors import ConfigError, DataError


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, num_workers: int = 0, seed: int = 0,
                 drop_last: bool = False, distributed: bool = False,
                 collate_fn: Callable | None = None) -> DataLoader:
    """A DataLoader whose order and augmentations are a pure function of (seed, epoch); call
    `set_epoch(loader, epoch)` each epoch. A `ShardDataset` (``shards:`` data) gets a `ShardLoader`, which plans
    its epochs over the shards (`mae.data.shards`); everything else this DataLoader.

    Workers persist across epochs and prefetch 4 batches each; batches are pinned when CUDA is available. With
    `distributed=True` (torch.distributed initialised) each rank reads its own shard through a DistributedSampler
    (reseeded by `set_epoch`): rank r of W takes positions r, r + W, ... of the same (seed, epoch) permutation as the
    single-process `EpochSampler`, so batch k of B per rank holds, over all ranks, exactly the samples (and sample
    seeds) of batch k of a single-process loader with batch size W x B.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    if num_workers < 0:
        raise ConfigError(f"num_workers={num_workers} must be 0 (load in the main process) or more")
    if len(dataset) == 0:  # type: ignore[arg-type]  # torch types no Dataset.__len__
        raise DataError(f"dataset {dataset!r} is empty; nothing to load")
    shards = dataset.dataset if isinstance(dataset, WithMaskNoise) else dataset
    if isinstance(shards, ShardDataset):  # tar shards: their own epoch plan (exact mid-epoch resume, equal ranks)
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        return ShardLoader(shards, batch_size=batch_size, seed=seed, rank=rank, world_size=world,  # type: ignore[return-value]  # a ShardLoader does what callers use of a DataLoader
                           num_workers=num_workers, shuffle=shuffle, drop_last=drop_last, collate_fn=collate_fn,
                           num_patches=dataset.num_patches if isinstance(dataset, WithMaskNoise) else None)
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("distributed=True needs torch.distributed initialised first (init_process_group)")
        sampler: Sampler[int] = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    else:
        sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed)  # type: ignore[arg-type]  # torch types no Dataset.__len__
    return DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=SeededSampler(sampler, seed),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),  # the loader's own draws leave the global generator alone
        worker_init_fn=ignore_stop_signals,
    )


def set_epoch(loader, epoch: int, skip: int = 0) -> None:
    """Make the loader's next pass the pass of `epoch` (a pure function of the loader's seed and `epoch`), without its
    first `skip` batches (already done before a resume: the pass then yields batch `skip` onwards).

    Takes a DataLoader built by `build_loader` (or on a `SeededSampler`), or any loader object with its own
    ``set_epoch(epoch, skip)`` (cached features, streamed shards).
    """
    if not isinstance(loader, DataLoader) and callable(getattr(loader, "set_epoch", None)):
        loader.set_epoch(epoch, skip)
        return
    sampler = getattr(loader, "sampler", None)
    if not hasattr(sampler, "set_epoch"):
        raise ConfigError(f"loader's sampler {type(sampler).__name__} has no set_epoch; "
                          "build the loader with build_loader")
    if skip and not isinstance(sampler, SeededSampler):
        raise ConfigError(f"cannot resume inside an epoch with a {type(sampler).__name__}; build the loader with "
                          "build_loader")
    if isinstance(sampler, SeededSampler):
        sampler.set_epoch(epoch, skip * (loader.batch_size or 1))
    else:
        sampler.set_epoch(epoch)  # type: ignore[union-attr]  # hasattr(sampler, "set_epoch") above
