"""What a training set is made of, for the run's records: its fingerprint (a resume compares it to catch changed
data) and the files its folder scan or its loads skipped."""

from __future__ import annotations

import hashlib
import os

from torch.utils.data import Dataset, Subset

from mae.data.builtin import BuiltinDataset
from mae.data.shards.dataset import ShardDataset


def fingerprint(dataset: Dataset) -> dict:
    """``{"size", "fingerprint"}`` of a training set: its length and a SHA-256 of what it is made of (a folder's
    file list relative to its root with labels, a built-in set's name and split, a subset's indices), looking
    through `Subset`, `SeededDataset` and `WithMaskNoise`. A resume compares them to catch changed data."""
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
