"""Datasets (built-in embedded sets and image folders), transforms and data loaders.

`build_dataset(spec, split)` takes `builtin:<name>`, a folder, split files (iNaturalist JSON, Places lists; see
`mae.data.lists`) or ``shards:DIR`` (tar shards written by ``mae prepare``); `build_transform(name, ...)` the paper's
augmentations; `build_loader(...)` a loader whose order is a pure function of (seed, epoch), resumable mid-epoch.
"""

from __future__ import annotations

import difflib
import math
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mae.data.builtin import DATASETS, BuiltinDataset, Digits, MNIST5k, Photos
from mae.data.folders import (
    UNLABELED,
    ClassFolderDataset,
    PlainFolderDataset,
    is_dir_entry,
    is_image_entry,
    to_mode,
)
from mae.data.shards import (
    SHARDS_PREFIX,
    ShardDataset,
    ShardLoader,
    build_shard_dataset,
    build_shard_loader,
    is_shard_spec,
    resolve_shards,
)
from mae.data.transforms import (
    AUGMENTATIONS,
    GRAY_MEAN,
    GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_transform,
    build_transform,
    default_mean_std,
    eval_preprocessing,
)
from mae.errors import ConfigError, DataError

__all__ = [
    "AUGMENTATIONS", "DATASETS", "GRAY_MEAN", "GRAY_STD", "HOLDOUT_SEED", "IMAGENET_MEAN", "IMAGENET_STD",
    "SHARDS_PREFIX", "UNLABELED", "BuiltinDataset", "ClassFolderDataset", "Digits", "EpochSampler", "MNIST5k",
    "MemoizedDataset", "Photos", "PlainFolderDataset", "SeededDataset", "SeededSampler", "ShardDataset", "ShardLoader",
    "WithMaskNoise", "build_dataset", "build_eval_transform", "build_loader", "build_shard_dataset",
    "build_shard_loader", "build_transform", "default_mean_std", "eval_preprocessing", "fingerprint",
    "has_split_folders", "holdout_split", "is_shard_spec", "list_builtin", "memoize_if_fixed", "passed_over_files",
    "resolve_shards", "sample_seed", "set_epoch", "skipped_files", "to_mode",
]

BUILTIN_PREFIX = "builtin:"
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation", "valid")}
"""Sub-folders that `build_dataset` reads for each split when the data folder has them."""


def list_builtin() -> list[str]:
    """Specs of the built-in datasets, e.g. 'builtin:mnist5k'."""
    return [BUILTIN_PREFIX + name for name in DATASETS]


def _has_direct_images(folder: Path) -> bool:
    with os.scandir(folder) as it:
        return any(is_image_entry(e) for e in it)


def _split_folder(root: Path, split: str) -> Path:
    """`root/<split>` when present; else `root` itself, unless it has the other split's folder (which would leak)."""
    if split not in SPLIT_FOLDERS:
        raise DataError(f"split '{split}' is not known; use one of {', '.join(SPLIT_FOLDERS)}")
    for name in SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    others = [root / n for s, names in SPLIT_FOLDERS.items() if s != split for n in names if (root / n).is_dir()]
    if others:
        raise DataError(f"folder '{root}' has '{others[0].name}' but no '{SPLIT_FOLDERS[split][0]}' sub-folder; "
                        f"add '{root / SPLIT_FOLDERS[split][0]}' for the {split} split")
    return root


def has_split_folders(spec: str) -> bool:
    """True when `spec` brings its own splits: a built-in dataset, shards (their index names the splits), a folder
    with a train/ or val/ sub-folder, or with split files (iNaturalist JSON, Places lists)."""
    if spec.startswith(BUILTIN_PREFIX) or is_shard_spec(spec) or "{split}" in spec:
        return True
    root = Path(spec).expanduser()
    if any((root / name).is_dir() for names in SPLIT_FOLDERS.values() for name in names):
        return True
    if not root.is_dir():
        return False
    from mae.data.lists import find_split_file

    return any(find_split_file(root, split) is not None for split in SPLIT_FOLDERS)


HOLDOUT_SEED = 0
"""Seed of the validation hold-out of folders without splits: a property of the data, the same in every run (and
every recipe: finetune, linprobe, knn and evaluate hold out the same images whatever their own seed)."""


def holdout_split(targets: Sequence[int], fraction: float, seed: int = HOLDOUT_SEED) -> tuple[list[int], list[int]]:
    """Indices (train, val) of a seeded, class-stratified hold-out: of each class of n >= 2 images,
    ``min(n - 1, max(1, round(fraction * n)))`` go to val, chosen by a permutation that is a pure function of
    `seed`; a class of one image stays in train. Both lists are sorted."""
    if not 0 < fraction < 1:
        raise ConfigError(f"the validation fraction must be in (0, 1), got {fraction}")
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        by_class.setdefault(int(label), []).append(index)
    generator = torch.Generator().manual_seed(seed)
    train: list[int] = []
    val: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        n = len(members)
        n_val = 0 if n < 2 else min(n - 1, max(1, math.floor(fraction * n + 0.5)))
        order = torch.randperm(n, generator=generator).tolist()
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    return sorted(train), sorted(val)


def build_dataset(spec: str, split: str = "train", transform: Callable | None = None, mode: str | None = None,
                  strict: bool = False, require_classes: bool = False, decode: str = "pil") -> Dataset:
    """A dataset of `(image, label)` from `builtin:<name>` or a folder.

    A folder's `train` / `val` sub-folder is used for that split when present, else the whole folder. A folder
    with a split file for ``split`` (iNaturalist's ``train2018.json`` / ``val2018.json``, Places'
    ``places365_train_standard.txt`` / ``places365_val.txt``, ...: `mae.data.lists.find_split_file`) reads that
    file; a spec with ``{split}`` in it names the file (``/data/inat/{split}2018.json``). Otherwise sub-folders that
    hold images directly are classes (ImageFolder layout), or every image below it is read, recursively, with label
    -1.

    Args:
        spec: 'builtin:mnist5k' | 'builtin:digits' | 'builtin:photos' | a folder path | a split file path with
            '{split}'.
        split: 'train' or 'val'.
        transform: applied to each PIL image (see `build_transform`).
        mode: 'RGB' or 'L'; None keeps a built-in dataset's native mode and reads folders as 'RGB'.
        strict: raise at the first corrupt image file instead of skipping it with a warning.
        require_classes: the folder must have class sub-folders (for fine-tuning and linear probing).
        decode: for folders, 'tensor' decodes JPEGs with torchvision.io into uint8 tensors (the transform then gets
            tensors; v2 transforms take both) instead of PIL; built-in datasets ignore it.
    """
    if is_shard_spec(spec):  # tar shards written by `mae prepare` (mae.data.shards)
        return build_shard_dataset(spec, split, transform=transform, mode=mode or "RGB", decode=decode, strict=strict)
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in DATASETS:
            close = difflib.get_close_matches(name, DATASETS, n=1)
            hint = f"did you mean '{BUILTIN_PREFIX}{close[0]}'? " if close else ""
            raise DataError(f"unknown built-in dataset '{spec}'; {hint}valid: {', '.join(list_builtin())}")
        return DATASETS[name](split, transform=transform, mode=mode)
    from mae.data.lists import find_split_file, split_dataset

    if "{split}" in spec:
        return split_dataset(Path(spec.replace("{split}", split)).expanduser(), transform, mode or "RGB", strict,
                             decode)
    root = Path(spec).expanduser()
    if not root.exists():
        raise DataError(f"data path '{spec}' does not exist; give an image folder or one of "
                        f"{', '.join(list_builtin())}")
    if not root.is_dir():
        raise DataError(f"data path '{spec}' is a file, not a folder; give the folder that holds the images")
    root = _split_folder(root, split)
    mode = mode or "RGB"
    split_file = find_split_file(root, split)
    if split_file is not None:
        return split_dataset(split_file, transform, mode, strict, decode)
    with os.scandir(root) as it:
        folders = [Path(e.path) for e in it if is_dir_entry(e) and not e.name.startswith(".")]
    has_classes = any(_has_direct_images(f) for f in folders)
    if has_classes or require_classes:
        return ClassFolderDataset(root, transform=transform, mode=mode, strict=strict, decode=decode)
    return PlainFolderDataset(root, transform=transform, mode=mode, strict=strict, decode=decode)


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
        generator states are saved and restored once per batch, not per sample: numpy's alone costs ~0.13 ms."""
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
    # every accelerator, about 80x slower per sample
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)


class MemoizedDataset(Dataset):
    """Keeps each item of a dataset whose items never change (an in-memory set under a deterministic transform,
    such as the 'none' augmentation of the embedded digits) after its first read: later epochs skip the image
    conversion and transform (about 0.15 ms a digit: the loader's 0.70 s of an AVX2 demo epoch becomes 0.08 s).
    Items are identical to the wrapped dataset's; `fingerprint` and `skipped_files` look through it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._items: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        item = self._items.get(index)
        if item is None:
            item = self._items[index] = self.dataset[index]
        return item


MEMOIZE_MAX_BYTES = 256 * 2**20


def memoize_if_fixed(dataset: Dataset, augment: str, item_bytes: int) -> Dataset:
    """`dataset` wrapped in a `MemoizedDataset` when its items cannot change between epochs (an embedded dataset,
    held in memory, with the deterministic 'none' augmentation) and all of them fit in `MEMOIZE_MAX_BYTES`;
    otherwise `dataset` itself."""
    if augment == "none" and isinstance(dataset, BuiltinDataset) and len(dataset) * item_bytes <= MEMOIZE_MAX_BYTES:
        return MemoizedDataset(dataset)
    return dataset


class WithMaskNoise(Dataset):
    """`(image, noise [L])` items: the wrapped item's image and the sample's random-masking noise, uniform in [0, 1).

    The noise is drawn right after the image from the per-sample RNG that `SeededDataset` seeds, so a sample's mask,
    like its crop, is a pure function of (seed, epoch, index): the same with 1 or N processes, any number of
    workers, and after a resume. The model keeps the reference semantics (``argsort(noise)``, small = kept).
    """

    def __init__(self, dataset: Dataset, num_patches: int):
        self.dataset, self.num_patches = dataset, num_patches

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.dataset[index][0]
        return image, torch.rand(self.num_patches)  # [L]


def fingerprint(dataset: Dataset) -> dict:
    """``{"size", "fingerprint"}`` of a training set: its length and a SHA-256 of what it is made of (a folder's
    file list relative to its root with labels, a built-in set's name and split, a subset's indices), looking
    through `Subset`, `SeededDataset` and `WithMaskNoise`. A resume compares them to catch changed data."""
    import hashlib

    from torch.utils.data import Subset

    h = hashlib.sha256()
    size, inner = len(dataset), dataset  # type: ignore[arg-type]
    while True:
        if isinstance(inner, Subset):
            h.update(b"subset:" + ",".join(map(str, inner.indices)).encode())
        if not hasattr(inner, "dataset"):
            break
        inner = inner.dataset
    if isinstance(inner, BuiltinDataset):
        h.update(f"builtin:{inner.name}:{inner.split}:{len(inner)}".encode())
    elif isinstance(inner, ShardDataset):
        for path, count in zip(inner.shards.paths, inner.shards.counts, strict=True):
            h.update(f"{os.path.basename(path)}\t{count}\n".encode())
    elif hasattr(inner, "samples") and hasattr(inner, "root"):
        root = str(inner.root)
        for path, label in inner.samples:
            h.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    else:
        h.update(f"{type(inner).__name__}:{len(inner)}".encode())  # type: ignore[arg-type]
    return {"size": size, "fingerprint": h.hexdigest()}


def skipped_files(dataset: Dataset) -> list[str]:
    """Unreadable image files skipped so far by a folder dataset (worker processes included), looking through
    `Subset`, `SeededDataset` and `WithMaskNoise`; [] for datasets that never skip."""
    while not hasattr(dataset, "unreadable_files") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset.unreadable_files() if hasattr(dataset, "unreadable_files") else []


def passed_over_files(dataset: Dataset) -> list[str]:
    """Entries the scan of a folder dataset passed over (dangling links, unreadable entries; see
    `mae.data.folders.walk_images`), looking through wrappers as `skipped_files` does; [] for other datasets."""
    while not hasattr(dataset, "passed_over") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return list(getattr(dataset, "passed_over", []))


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


def ignore_stop_signals(worker_id: int = 0) -> None:
    """In a DataLoader worker: ignore SIGTERM, SIGUSR1 and SIGINT. A scheduler or a terminal signals the whole
    process group; the training process decides (it finishes its update and saves a checkpoint, see
    `mae.train.preemption`), and a worker dying first would turn that clean stop into a crash."""
    import signal

    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


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
