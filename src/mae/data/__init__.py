"""Datasets (built-in embedded sets and image folders), transforms and data loaders.

`build_dataset(spec, split)` takes `builtin:<name>`, a folder, split files (iNaturalist JSON, Places lists; see
`mae.data.lists`) or ``shards:DIR`` (tar shards written by ``mae prepare``); `build_transform(name, ...)` the paper's
augmentations; `build_loader(...)` a loader whose order is a pure function of (seed, epoch), resumable mid-epoch.

Where each idea lives: `datasets` (which dataset a spec names, the hold-out split), `sampling` (seeded samplers and
per-sample seeding), `loader` (`build_loader`, `set_epoch`), `memoize`, `provenance` (fingerprints, skipped files),
`mask_noise` (the pre-training sample), `moving_mnist` (the clip dataset), `shards` (tar shards), `folders`,
`builtin`, `lists`, `transforms`. The names below are re-exported here, so ``from mae.data import X`` is the one
import users need.
"""

from mae.data.builtin import DATASETS, BuiltinDataset, Digits, MNIST5k, Photos
from mae.data.datasets import (
    BUILTIN_PREFIX,
    HOLDOUT_SEED,
    SPLIT_FOLDERS,
    build_dataset,
    has_split_folders,
    holdout_split,
    list_builtin,
)
from mae.data.folders import UNLABELED, ClassFolderDataset, PlainFolderDataset, to_mode
from mae.data.loader import build_loader, set_epoch
from mae.data.mask_noise import WithMaskNoise
from mae.data.memoize import MEMOIZE_MAX_BYTES, MemoizedDataset, memoize_if_fixed
from mae.data.moving_mnist import CLIP_DATASETS, ClipNormalize, MovingMNIST
from mae.data.provenance import fingerprint, passed_over_files, skipped_files
from mae.data.sampling import EpochSampler, SeededDataset, SeededSampler, sample_seed
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
from mae.data.workers import ignore_stop_signals

__all__ = [
    "AUGMENTATIONS", "BUILTIN_PREFIX", "CLIP_DATASETS", "DATASETS", "GRAY_MEAN", "GRAY_STD", "HOLDOUT_SEED",
    "IMAGENET_MEAN", "IMAGENET_STD", "MEMOIZE_MAX_BYTES", "SHARDS_PREFIX", "SPLIT_FOLDERS", "UNLABELED",
    "BuiltinDataset", "ClassFolderDataset", "ClipNormalize", "Digits", "EpochSampler", "MNIST5k", "MemoizedDataset",
    "MovingMNIST", "Photos", "PlainFolderDataset", "SeededDataset", "SeededSampler", "ShardDataset", "ShardLoader",
    "WithMaskNoise", "build_dataset", "build_eval_transform", "build_loader", "build_shard_dataset",
    "build_shard_loader", "build_transform", "default_mean_std", "eval_preprocessing", "fingerprint",
    "has_split_folders", "holdout_split", "ignore_stop_signals", "is_shard_spec", "list_builtin", "memoize_if_fixed",
    "passed_over_files", "resolve_shards", "sample_seed", "set_epoch", "skipped_files", "to_mode",
]
