"""Datasets (built-in embedded sets and image folders), transforms and data loaders.

`build_dataset(spec, split)` takes `builtin:<name>`, a folder, or split files (iNaturalist JSON, Places lists; see
`mae.data.lists`); `build_transform(name, ...)` the paper's augmentations; `build_loader(...)` a DataLoader whose
order is a pure function of (seed, epoch).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mae.data.builtin import DATASETS, BuiltinDataset, Digits, MNIST5k, Photos
from mae.data.folders import UNLABELED, ClassFolderDataset, PlainFolderDataset, is_image_file, to_mode
from mae.data.transforms import (
    AUGMENTATIONS,
    GRAY_MEAN,
    GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_transform,
    build_transform,
    default_mean_std,
)
from mae.errors import ConfigError, DataError

__all__ = [
    "AUGMENTATIONS", "DATASETS", "GRAY_MEAN", "GRAY_STD", "IMAGENET_MEAN", "IMAGENET_STD", "UNLABELED",
    "BuiltinDataset", "ClassFolderDataset", "Digits", "EpochSampler", "MNIST5k", "Photos", "PlainFolderDataset",
    "SeededDataset", "SeededSampler", "WithMaskNoise",
    "build_dataset", "build_eval_transform", "build_loader", "build_transform", "default_mean_std", "list_builtin",
    "set_epoch", "skipped_files", "to_mode",
]

BUILTIN_PREFIX = "builtin:"
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation", "valid")}
"""Sub-folders that `build_dataset` reads for each split when the data folder has them."""


def list_builtin() -> list[str]:
    """Specs of the built-in datasets, e.g. 'builtin:mnist5k'."""
    return [BUILTIN_PREFIX + name for name in DATASETS]


def _has_direct_images(folder: Path) -> bool:
    return any(e.is_file() and is_image_file(e.name) for e in os.scandir(folder))


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
        raise DataError(f"data path '{spec}' does not exist; give an image folder or one of {', '.join(list_builtin())}")
    if not root.is_dir():
        raise DataError(f"data path '{spec}' is a file, not a folder; give the folder that holds the images")
    root = _split_folder(root, split)
    mode = mode or "RGB"
    split_file = find_split_file(root, split)
    if split_file is not None:
        return split_dataset(split_file, transform, mode, strict, decode)
    has_classes = any(_has_direct_images(Path(e.path)) for e in os.scandir(root)
                      if e.is_dir() and not e.name.startswith("."))
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
    number of workers, and a run resumed at epoch k sees exactly the crops the uninterrupted run saw.
    """

    def __init__(self, sampler: Sampler[int], seed: int):
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        for index in self.sampler:
            yield index, hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class SeededDataset(Dataset):
    """Reads `(index, seed)` keys: the wrapped dataset's item with torch's RNG seeded from `seed` (the caller's RNG
    state is left untouched)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


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


def skipped_files(dataset: Dataset) -> list[str]:
    """Unreadable image files skipped so far by a folder dataset (worker processes included), looking through
    `Subset`, `SeededDataset` and `WithMaskNoise`; [] for datasets that never skip."""
    while not hasattr(dataset, "unreadable_files") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset.unreadable_files() if hasattr(dataset, "unreadable_files") else []


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, num_workers: int = 0, seed: int = 0,
                 drop_last: bool = False, distributed: bool = False,
                 collate_fn: Callable | None = None) -> DataLoader:
    """A DataLoader whose order and augmentations are a pure function of (seed, epoch); call
    `set_epoch(loader, epoch)` each epoch.

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
    if len(dataset) == 0:
        raise DataError(f"dataset {dataset!r} is empty; nothing to load")
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("distributed=True needs torch.distributed initialised first (init_process_group)")
        sampler: Sampler[int] = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    else:
        sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed)
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
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Make the loader's next pass use the order of `epoch` (a pure function of the loader's seed and `epoch`)."""
    if not hasattr(loader.sampler, "set_epoch"):
        raise ConfigError(f"loader's sampler {type(loader.sampler).__name__} has no set_epoch; "
                          "build the loader with build_loader")
    loader.sampler.set_epoch(epoch)
