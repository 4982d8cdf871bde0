"""The input pipeline alone: decoded and augmented images per second from a folder of JPEGs.

Two decoders, the same augmentation (the paper's RandomResizedCrop(224, scale 0.2-1, bicubic) + horizontal flip):

- ``pil``: the folder datasets with ``decode='pil'`` (as fine-tuning reads, its RandAugment being PIL-only): PIL
  decode -> RGB -> v2 transforms on the PIL image -> float tensor, normalised in the worker
  (``mae.data.build_transform('rrc', ...)``).
- ``tensor``: ``torchvision.io.decode_jpeg`` -> uint8 tensor -> v2 transforms on the uint8 tensor, as ``mae pretrain``
  decodes JPEGs by default (``data.decode=tensor``); here batches also stay uint8 (4x less to copy between
  processes) and are scaled / normalised per batch where they are consumed.
- ``nvjpeg`` (CUDA only): workers only read the file bytes; the main process decodes the batch on the GPU with
  ``decode_jpeg(device='cuda')`` and crops / flips / normalises there.

The folder is made from the real photographs shipped with scikit-image and scikit-learn (the ones
``builtin:photos`` uses): random crops of varied aspect, resized to ~500 px on the long side (the size of an
average ImageNet image) and saved as JPEG quality 90.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode, v2

from mae.data.builtin import PHOTOS
from mae.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RRC_SCALE, build_transform
from mae.errors import ConfigError, DataError

DECODERS = ("pil", "tensor", "nvjpeg")


def _photo_path(package: str, relative: str) -> Path:
    module = importlib.import_module("sklearn" if package == "sklearn" else package)
    return Path(module.__file__).parent / relative  # type: ignore[arg-type]  # a regular package: __file__ is set


def make_jpeg_folder(dest: str | Path, num_images: int = 64, long_side: int = 500, seed: int = 0) -> Path:
    """Write `num_images` JPEGs (random crops of the embedded photos, ~`long_side` px) into `dest`; returns it."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    photos = []
    for package, relative in PHOTOS:
        try:
            with Image.open(_photo_path(package, relative)) as f:
                photos.append(f.convert("RGB"))
        except (OSError, ModuleNotFoundError):
            continue
    if not photos:
        raise DataError("no embedded photos found (scikit-image / scikit-learn data files are missing)")
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        photo = photos[i % len(photos)]
        w, h = photo.size
        aspect = rng.uniform(0.75, 1.333)  # width / height of the crop, like ImageNet's 4:3 and 3:4 images
        side = rng.uniform(0.6, 1.0) * min(w, h)
        cw, ch = min(w, round(side * aspect ** 0.5)), min(h, round(side / aspect ** 0.5))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        scale = long_side / max(cw, ch)
        size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        crop = photo.resize(size, Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))
        crop.save(dest / f"img_{i:04d}.jpg", quality=90)
    return dest


class JpegFolder(Dataset):
    """The JPEGs of a folder, decoded and augmented by `decoder` (see the module docstring)."""

    def __init__(self, files: list[Path], decoder: str, img_size: int = 224, repeats: int = 1):
        if decoder not in DECODERS:
            raise ConfigError(f"unknown decoder '{decoder}'; choose one of {', '.join(DECODERS)}")
        self.files, self.decoder, self.repeats = files, decoder, repeats
        if decoder == "pil":
            self.transform = build_transform("rrc", img_size, 3)
        else:
            self.transform = v2.Compose([
                v2.RandomResizedCrop(img_size, scale=RRC_SCALE, interpolation=InterpolationMode.BICUBIC,
                                     antialias=True),
                v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.files) * self.repeats

    def __getitem__(self, index: int):
        path = self.files[index % len(self.files)]
        if self.decoder == "pil":
            with Image.open(path) as f:
                return self.transform(f.convert("RGB"))
        data = read_file(str(path))
        if self.decoder == "nvjpeg":
            return data  # decoded on the GPU, per batch
        return self.transform(decode_jpeg(data, mode=ImageReadMode.RGB))  # uint8 [3, S, S]


def _list_collate(items):
    return items


class BatchFinisher:
    """What the consumer does to a batch before the model sees it: uint8 -> normalised float on the device."""

    def __init__(self, decoder: str, device: torch.device, img_size: int):
        self.decoder, self.device = decoder, device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        if decoder == "nvjpeg":
            self.transform = v2.Compose([
                v2.RandomResizedCrop(img_size, scale=RRC_SCALE, interpolation=InterpolationMode.BICUBIC,
                                     antialias=True),
                v2.RandomHorizontalFlip()])

    def __call__(self, batch) -> torch.Tensor:
        if self.decoder == "pil":
            return batch.to(self.device, non_blocking=True)
        if self.decoder == "nvjpeg":
            images = decode_jpeg(batch, mode=ImageReadMode.RGB, device=self.device)
            batch = torch.stack([self.transform(img) for img in images])
        x = batch.to(self.device, non_blocking=True).float()
        return (x - self.mean) / self.std


def pipeline_throughput(folder: str | Path, decoder: str, num_workers: int, batch_size: int = 32,
                        batches: int = 8, img_size: int = 224, device: torch.device | None = None) -> dict:
    """Images per second delivered by a DataLoader over `folder`, in steady state: the batches that the workers
    made while starting up (1 + 2 per worker, the prefetch backlog) are drawn before the clock starts."""
    device = device or torch.device("cpu")
    if decoder == "nvjpeg" and device.type != "cuda":
        raise ConfigError("decoder 'nvjpeg' decodes on the GPU; it needs device=cuda")
    files = sorted(Path(folder).glob("*.jpg"))
    if not files:
        raise DataError(f"no .jpg files in '{folder}'")
    skip = 1 + 2 * num_workers
    needed = batch_size * (batches + skip)
    dataset = JpegFolder(files, decoder, img_size, repeats=-(-needed // len(files)))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                        pin_memory=device.type == "cuda", prefetch_factor=2 if num_workers else None,
                        collate_fn=_list_collate if decoder == "nvjpeg" else None,
                        generator=torch.Generator().manual_seed(0))
    finish = BatchFinisher(decoder, device, img_size)
    it = iter(loader)
    for _ in range(skip):
        finish(next(it))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    count = 0
    for _ in range(batches):
        x = finish(next(it))
        count += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    del it
    return {"decoder": decoder, "workers": num_workers, "batch_size": batch_size, "images": count,
            "seconds": seconds, "images_per_s": count / seconds, "image_shape": list(x.shape[1:]),
            "files": len(files)}
