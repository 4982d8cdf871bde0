"""Memoisation of datasets whose items never change between epochs (an embedded set under a deterministic
transform)."""

from __future__ import annotations

from torch.utils.data import Dataset

from mae.data.builtin import BuiltinDataset


class MemoizedDataset(Dataset):
    """Keeps each item of a dataset whose items never change (an in-memory set under a deterministic transform,
    such as the 'none' augmentation of the embedded digits) after its first read: later epochs skip the image
    conversion and transform (what that saves of a demo epoch: docs/benchmarks.md, "The demo's recipe").
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
