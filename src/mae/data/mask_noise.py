"""The pre-training sample: an image and its random-masking noise, drawn from the sample's own seeded generator.

It lives in the data layer because the shard loader builds it too (`mae.data.shards.loader`, ``num_patches``)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


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
