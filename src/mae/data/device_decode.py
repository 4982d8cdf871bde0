"""Decoding JPEGs on the training device (``mae pretrain data.decode=nvjpeg``: nvJPEG on CUDA).

DataLoader workers only read each file's bytes and its size from the JPEG header, and draw the sample's crop and
flip from the per-sample RNG (so crops stay a pure function of (seed, epoch, index), as with CPU decoding). The
training process decodes the whole batch on the device with ``torchvision.io.decode_jpeg(..., device=...)``, then
crops, resizes (bicubic, antialiased), flips and normalises there. This takes the decoding, the most expensive
part of the input pipeline (see docs/benchmarks.md), off the CPU cores.

Pieces: `EncodedJpeg` (what a folder dataset built with ``decode='encoded'`` yields), `CropPlan` (its transform:
bytes + crop box), `collate_encoded` (the DataLoader's collate) and `DeviceDecoder` (bytes + boxes -> batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from mae.data.transforms import RRC_SCALE
from mae.errors import ConfigError, DataError, first_line

DEVICE_AUGMENTATIONS = ("rrc", "none")
"""The augmentations `CropPlan` draws (the paper's default, and resize + centre crop)."""


class EncodedJpeg(NamedTuple):
    """A JPEG file's bytes (uint8 [n]) and its size from the header, not yet decoded."""

    data: torch.Tensor
    height: int
    width: int


class CropPlan:
    """Transform of an `EncodedJpeg`: ``(bytes, box)`` with box = int64 [top, left, height, width, flip].

    ``rrc``: RandomResizedCrop's box (scale 0.2-1, ratio 3/4-4/3) and a flip with probability 0.5, drawn from torch's
    RNG (seeded per sample by the loader). ``none``: the centred square, no flip (= resize the shorter side, centre
    crop).
    """

    def __init__(self, augment: str):
        if augment not in DEVICE_AUGMENTATIONS:
            raise ConfigError(f"data.decode=nvjpeg supports data.augment {' or '.join(DEVICE_AUGMENTATIONS)}, not "
                              f"'{augment}'; use data.decode=tensor for the others")
        self.augment = augment

    def __call__(self, image: EncodedJpeg) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = image.height, image.width
        if self.augment == "rrc":
            shape_only = torch.empty(1, 1, 1).expand(1, h, w)  # get_params reads only the size: no allocation
            top, left, ch, cw = T.RandomResizedCrop.get_params(shape_only, list(RRC_SCALE), [3 / 4, 4 / 3])
            flip = int(torch.rand(1).item() < 0.5)
        else:
            side = min(h, w)
            top, left, ch, cw, flip = (h - side) // 2, (w - side) // 2, side, side, 0
        return image.data, torch.tensor([top, left, ch, cw, flip], dtype=torch.int64)


def collate_encoded(items: Sequence) -> tuple[tuple[list[torch.Tensor], torch.Tensor], torch.Tensor]:
    """``[((bytes, box), noise), ...]`` -> ``((list of bytes, boxes [N, 5]), noise [N, L])``."""
    data = [item[0][0] for item in items]
    boxes = torch.stack([item[0][1] for item in items])
    return (data, boxes), torch.stack([item[1] for item in items])


class DeviceDecoder:
    """``(list of JPEG bytes, boxes [N, 5])`` -> normalised float images [N, 3, size, size] on `device`."""

    def __init__(self, device: torch.device | str, size: int, mean: Sequence[float], std: Sequence[float]):
        self.device, self.size = torch.device(device), size
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    def __call__(self, batch: tuple[list[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        data, boxes = batch
        try:
            images = decode_jpeg(list(data), mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as e:
            reason = first_line(e) or type(e).__name__
            raise DataError(f"a JPEG of this batch could not be decoded on {self.device} ({reason}); find and remove "
                            "it with data.decode=tensor (which skips corrupt files) or data.strict=true") from e
        out = []
        for image, (top, left, h, w, flip) in zip(images, boxes.tolist(), strict=True):
            crop = image[:, top:top + h, left:left + w].unsqueeze(0).float()
            crop = F.interpolate(crop, size=(self.size, self.size), mode="bicubic", antialias=True,
                                 align_corners=False).clamp_(0, 255)
            out.append(crop.flip(-1) if flip else crop)
        return (torch.cat(out) / 255 - self.mean) / self.std
