"""Which dataset a data spec names (`build_dataset`: ``builtin:<name>``, a folder, split files or ``shards:DIR``) and
the seeded hold-out split of folders that bring no validation split of their own."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mae.data.builtin import DATASETS
from mae.data.folders import ClassFolderDataset, PlainFolderDataset, is_dir_entry, is_image_entry
from mae.data.lists import find_split_file, split_dataset
from mae.data.moving_mnist import CLIP_DATASETS
from mae.data.shards.dataset import build_shard_dataset
from mae.data.shards.index import is_shard_spec
from mae.errors import ConfigError, DataError

BUILTIN_PREFIX = "builtin:"
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation", "valid")}
"""Sub-folders that `build_dataset` reads for each split when the data folder has them."""


def list_builtin(clips: bool = False) -> list[str]:
    """Specs of the built-in image datasets, e.g. 'builtin:mnist5k'; with `clips`, also the clip datasets
    ('builtin:moving_mnist'), which only video models read."""
    return [BUILTIN_PREFIX + name for name in (*DATASETS, *(CLIP_DATASETS if clips else ()))]


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
                  strict: bool = False, require_classes: bool = False, decode: str = "pil",
                  clips: bool = False) -> Dataset:
    """A dataset of `(image, label)` from `builtin:<name>` or a folder.

    A folder's `train` / `val` sub-folder is used for that split when present, else the whole folder. A folder
    with a split file for ``split`` (iNaturalist's ``train2018.json`` / ``val2018.json``, Places'
    ``places365_train_standard.txt`` / ``places365_val.txt``, ...: `mae.data.lists.find_split_file`) reads that
    file; a spec with ``{split}`` in it names the file (``/data/inat/{split}2018.json``). Otherwise sub-folders that
    hold images directly are classes (ImageFolder layout), or every image below it is read, recursively, with label
    -1.

    Args:
        spec: 'builtin:mnist5k' | 'builtin:digits' | 'builtin:photos' | 'builtin:moving_mnist' (clips
            `[C, T, H, W]`, see `mae.data.moving_mnist`) | a folder path | a split file path with '{split}'.
        split: 'train' or 'val'.
        transform: applied to each PIL image (see `build_transform`); for clip datasets, to the clip tensor.
        mode: 'RGB' or 'L'; None keeps a built-in dataset's native mode and reads folders as 'RGB'.
        strict: raise at the first corrupt image file instead of skipping it with a warning.
        require_classes: the folder must have class sub-folders (for fine-tuning and linear probing).
        decode: for folders, 'tensor' decodes JPEGs with torchvision.io into uint8 tensors (the transform then gets
            tensors; v2 transforms take both) instead of PIL; built-in datasets ignore it.
        clips: the caller reads clips `[C, T, H, W]` (a video model); without it a clip dataset is refused with one
            line instead of failing inside an image transform.
    """
    if is_shard_spec(spec):  # tar shards written by `mae prepare` (mae.data.shards)
        return build_shard_dataset(spec, split, transform=transform, mode=mode or "RGB", decode=decode, strict=strict)
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name in CLIP_DATASETS:  # clips [C, T, H, W]: `transform` takes the clip tensor, not a PIL image
            if not clips:
                raise DataError(f"'{spec}' holds video clips [C, T, H, W] and this command reads images; pass an "
                                f"image dataset ({', '.join(list_builtin())}) or a folder of images")
            return CLIP_DATASETS[name](split, transform=transform, mode=mode)
        if name not in DATASETS:
            close = difflib.get_close_matches(name, [*DATASETS, *CLIP_DATASETS], n=1)
            hint = f"did you mean '{BUILTIN_PREFIX}{close[0]}'? " if close else ""
            raise DataError(f"unknown built-in dataset '{spec}'; {hint}valid: {', '.join(list_builtin(clips=True))}")
        return DATASETS[name](split, transform=transform, mode=mode)
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
