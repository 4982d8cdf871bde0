"""Semantic segmentation with a ViT pyramid and an UperNet head (paper section 5 / A.4), ADE20K-style data, mIoU.

`UperNetHead` is UperNet's decoder (Xiao et al., 2018): a pyramid pooling module on the coarsest map, an FPN
top-down path over the others, all levels fused at stride 4. `Segmenter` puts it (plus the usual auxiliary FCN
head on the stride-16 map) on a `ViTPyramid`. The data are ADE20K-style folders (``images/<split>`` and
``annotations/<split>`` with label PNGs of the same stem) read by `SegmentationFolder`; `evaluate_segmentation`
reports mIoU, pixel accuracy and mean class accuracy from a confusion matrix, on whole images or with BEiT's
sliding-window inference (`slide_logits`: 512 x 512 windows every 341 px, overlapping logits averaged).
`PolySchedule` is BEiT's ADE20K learning-rate schedule (linear warm-up over 1,500 iterations, then poly decay).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.functional import pil_to_tensor

from mae.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mae.errors import ConfigError, DataError
from mae.train.precision import autocast_context
from mae.transfer.backbone import ViTPyramid

_log = logging.getLogger(__name__)

NORMS = ("bn", "gn")
INFERENCE = ("whole", "slide")
SCHEDULES = ("cosine", "poly")
SPLIT_ALIASES = {"training": ("training", "train"), "validation": ("validation", "val")}
"""Folder names tried for each split: ADE20K's, then the short ones."""


# ---------------------------------------------------------------------------------------------------- heads
def conv_norm_act(in_ch: int, out_ch: int, kernel: int, norm: str = "bn") -> nn.Sequential:
    """Conv (no bias) -> BatchNorm or GroupNorm -> ReLU, UperNet's building block."""
    if norm not in NORMS:
        raise ConfigError(f"norm '{norm}' is not one of {', '.join(NORMS)}")
    norm_layer = nn.BatchNorm2d(out_ch) if norm == "bn" else nn.GroupNorm(math.gcd(32, out_ch), out_ch)
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False), norm_layer,
                         nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UperNetHead(nn.Module):
    """UperNet decoder over maps [fine, ..., coarse] (here strides 4, 8, 16, 32): PPM on the coarsest, lateral 1x1
    convs and a top-down sum on the others, a 3x3 conv per level, everything upsampled to the finest map,
    concatenated, fused by a 3x3 conv, then dropout and a 1x1 classifier. Output: logits at the finest stride."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, norm: str = "bn"):
        super().__init__()
        *fine, coarse = in_channels
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_norm_act(coarse, channels, 1, norm))
                                  for s in pool_scales])
        self.bottleneck = conv_norm_act(coarse + len(pool_scales) * channels, channels, 3, norm)
        self.lateral = nn.ModuleList([conv_norm_act(c, channels, 1, norm) for c in fine])
        self.smooth = nn.ModuleList([conv_norm_act(channels, channels, 3, norm) for _ in fine])
        self.fuse = conv_norm_act(len(in_channels) * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        *fine, coarse = features
        pooled = [_resize(branch(coarse), coarse.shape[-2:]) for branch in self.ppm]
        levels = [lat(f) for lat, f in zip(self.lateral, fine, strict=False)]
        levels += [self.bottleneck(torch.cat([coarse, *pooled], 1))]
        for i in range(len(levels) - 1, 0, -1):  # top-down: add each coarser level to the next finer one
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[-2:])
        outs = [smooth(x) for smooth, x in zip(self.smooth, levels[:-1], strict=False)] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0]] + [_resize(x, size) for x in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))  # [N, classes, H/4, W/4]


class FCNHead(nn.Module):
    """The auxiliary head: a 3x3 conv block, dropout and a 1x1 classifier on one map (its loss helps training)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1,
                 norm: str = "bn"):
        super().__init__()
        self.conv = conv_norm_act(in_channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class Segmenter(nn.Module):
    """`ViTPyramid` + `UperNetHead` (+ `FCNHead` on the third map when ``aux_channels`` > 0).

    ``forward(images [N, 3, H, W])`` returns ``{'out': logits [N, classes, H, W]}``, plus ``'aux'`` in training.
    Inputs are zero-padded to a multiple of the coarsest stride and the logits cropped back.
    """

    def __init__(self, backbone: ViTPyramid, num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), aux_channels: int = 256, dropout: float = 0.1,
                 norm: str = "bn"):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        in_channels = [backbone.out_channels] * len(backbone.strides)
        self.decode_head = UperNetHead(in_channels, num_classes, channels, pool_scales, dropout, norm)
        self.aux_head = FCNHead(backbone.out_channels, num_classes, aux_channels, dropout, norm) \
            if aux_channels > 0 else None
        self.size_divisor = max(*backbone.strides, backbone.patch_size)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % self.size_divisor, -width % self.size_divisor
        x = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
        features = list(self.backbone(x).values())
        size = x.shape[-2:]
        out = {"out": _resize(self.decode_head(features), size)[..., :height, :width]}
        if self.aux_head is not None and self.training:
            out["aux"] = _resize(self.aux_head(features[2]), size)[..., :height, :width]
        return out


def segmentation_loss(outputs: dict[str, torch.Tensor], labels: torch.Tensor, ignore_index: int = 255,
                      aux_weight: float = 0.4) -> torch.Tensor:
    """Pixel-wise cross-entropy (ignored pixels left out) of the main logits, plus ``aux_weight`` x the auxiliary."""
    loss = F.cross_entropy(outputs["out"].float(), labels, ignore_index=ignore_index)
    if "aux" in outputs and aux_weight:
        loss = loss + aux_weight * F.cross_entropy(outputs["aux"].float(), labels, ignore_index=ignore_index)
    return loss


# ---------------------------------------------------------------------------------------------------- data
def split_folder(parent: Path, split: str) -> Path:
    """``parent/<split>`` under ADE20K's name ('training' / 'validation') or the short one ('train' / 'val')."""
    names = SPLIT_ALIASES.get(split, (split,))
    for name in names:
        if (parent / name).is_dir():
            return parent / name
    raise DataError(f"no {' or '.join(repr(n) for n in names)} folder in '{parent}'; expected ADE20K's layout "
                    f"images/<split> and annotations/<split>")


@dataclass
class SegmentationTransform:
    """Resize, crop, flip and normalise an (image, label) pair; random choices come from torch's RNG.

    Training (``crop_size`` set): short side to ``scale`` x a ratio drawn from ``ratio_range``, a random crop of
    ``crop_size`` (padded with 0 / ignore_index when the image is smaller), horizontal flip with ``hflip``.
    Evaluation: short side to ``scale`` (None keeps the size); the label is left at its own size.
    """

    scale: int | None = 512
    crop_size: int | None = None
    ratio_range: tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5
    ignore_index: int = 255
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image uint8 [3, H, W], label int64 [H, W] -> normalised float image, int64 label."""
        train = self.crop_size is not None
        if self.scale is not None:
            ratio = float(torch.empty(()).uniform_(*self.ratio_range)) if train else 1.0
            short = min(image.shape[-2:])
            factor = self.scale * ratio / short
            size = (max(1, round(image.shape[-2] * factor)), max(1, round(image.shape[-1] * factor)))
            if size != tuple(image.shape[-2:]):
                image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                                      antialias=True)[0].round().clamp(0, 255)
                if train:
                    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        image = image.float()
        if train:
            image, label = self._crop(image, label, self.crop_size)  # type: ignore[arg-type]  # train: crop_size is set
            if self.hflip and torch.rand(()) < self.hflip:
                image, label = image.flip(-1), label.flip(-1)
        mean = torch.tensor(self.mean).view(3, 1, 1) * 255
        std = torch.tensor(self.std).view(3, 1, 1) * 255
        return (image - mean) / std, label

    def _crop(self, image: torch.Tensor, label: torch.Tensor, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = image.shape[-2:]
        pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
        if pad_h or pad_w:
            # pad with the mean colour (0 after normalisation) and ignored labels
            fill = torch.tensor(self.mean).view(3, 1, 1) * 255
            image = F.pad(image - fill, (0, pad_w, 0, pad_h)) + fill
            label = F.pad(label, (0, pad_w, 0, pad_h), value=self.ignore_index)
            h, w = image.shape[-2:]
        y = int(torch.randint(0, h - crop + 1, ()))
        x = int(torch.randint(0, w - crop + 1, ()))
        return image[:, y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]


class SegmentationFolder(Dataset):
    """ADE20K-style semantic segmentation data: ``root/images/<split>/<name>.<ext>`` with
    ``root/annotations/<split>/<name>.png`` (8-bit class values).

    With ``reduce_zero_label`` (ADE20K's convention) value 0 ('other / unlabelled') becomes ``ignore_index`` and
    every other value v becomes class v - 1; otherwise values are classes as they are. Values >= ``num_classes``
    (after the reduction) are ignored too. Items: ``transform(image uint8 [3, H, W], label int64 [H, W])``.
    """

    def __init__(self, root: str | Path, split: str, num_classes: int, reduce_zero_label: bool = True,
                 ignore_index: int = 255, transform: Callable | None = None, limit: int | None = None):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"segmentation data folder '{root}' does not exist")
        self.images_dir = split_folder(root / "images", split)
        self.labels_dir = split_folder(root / "annotations", split)
        images = sorted(p for p in self.images_dir.iterdir()
                        if p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith("."))
        labels = {p.stem: p for p in self.labels_dir.glob("*.png")}
        unlabelled = [p.name for p in images if p.stem not in labels]
        if unlabelled:
            raise DataError(f"{len(unlabelled)} images in '{self.images_dir}' have no label PNG in "
                            f"'{self.labels_dir}' (e.g. {unlabelled[0]})")
        if not images:
            raise DataError(f"no images in '{self.images_dir}'")
        self.items = [(p, labels[p.stem]) for p in images][:limit]
        self.num_classes, self.reduce_zero_label, self.ignore_index = num_classes, reduce_zero_label, ignore_index
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The untransformed pair: image uint8 [3, H, W] and label int64 [H, W] (classes and ignore_index)."""
        image_path, label_path = self.items[index]
        try:
            with Image.open(image_path) as f:
                image = pil_to_tensor(f.convert("RGB"))
            with Image.open(label_path) as f:
                raw = np.asarray(f if f.mode in ("L", "P") else f.convert("L"), dtype=np.int64)
        except OSError as e:
            raise DataError(f"could not read '{image_path}' or its label '{label_path}': {e}") from e
        if raw.shape != tuple(image.shape[1:]):
            raise DataError(f"label '{label_path}' is {raw.shape[1]}x{raw.shape[0]} but its image is "
                            f"{image.shape[2]}x{image.shape[1]}")
        label = torch.from_numpy(raw)
        if self.reduce_zero_label:
            label = torch.where(label == 0, self.ignore_index, label - 1)
        label = torch.where(label >= self.num_classes, self.ignore_index, label)
        return image, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.read(index)
        return self.transform(image, label) if self.transform is not None else (image, label)


# ---------------------------------------------------------------------------------------------------- inference
def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Top (or left) edges of the sliding windows over a side of ``size`` px: every ``stride`` px, the last window
    moved back so that it ends at the border; one window when the side is no longer than the crop."""
    count = max(math.ceil((size - crop) / stride), 0) + 1
    return [max(min(i * stride, size - crop), 0) for i in range(count)]


@torch.no_grad()
def slide_logits(model: nn.Module, images: torch.Tensor, num_classes: int, crop: int = 512, stride: int = 341
                 ) -> torch.Tensor:
    """Sliding-window inference (BEiT's ADE20K test setting): ``model(window)['out']`` on ``crop`` x ``crop`` windows
    every ``stride`` px (windows at the border shifted inside, smaller images scored whole), the logits of
    overlapping windows averaged. images [N, 3, H, W] -> logits [N, classes, H, W] (float32)."""
    if crop < 1 or stride < 1:
        raise ConfigError(f"sliding-window crop and stride must be positive, got {crop}, {stride}")
    n, _, height, width = images.shape
    logits = images.new_zeros((n, num_classes, height, width), dtype=torch.float32)
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    for top in window_starts(height, crop, stride):
        for left in window_starts(width, crop, stride):
            bottom, right = min(top + crop, height), min(left + crop, width)
            out = model(images[..., top:bottom, left:right])["out"].float()  # [N, classes, h, w]
            logits[..., top:bottom, left:right] += out
            count[..., top:bottom, left:right] += 1
    return logits / count


@dataclass
class PolySchedule:
    """BEiT's ADE20K schedule: ``lr = (peak - min_lr) * (1 - step / total) ** power + min_lr``, and during the first
    ``warmup_steps`` that value times a factor rising linearly from ``warmup_ratio`` to 1 (mmcv's linear warm-up;
    BEiT: 1,500 iterations, ratio 1e-6, power 1.0, min_lr 0). Called with the optimizer step like the run layer's
    `LRSchedule`."""

    peak_lr: float
    total_steps: int
    warmup_steps: int = 1500
    min_lr: float = 0.0
    power: float = 1.0
    warmup_ratio: float = 1e-6

    def __call__(self, step: int) -> float:
        return poly_lr(step, self.total_steps, self.warmup_steps, self.peak_lr, self.power, self.min_lr,
                       self.warmup_ratio)


def poly_lr(step: float, total: int, warmup: int, peak: float, power: float = 1.0, min_lr: float = 0.0,
            warmup_ratio: float = 1e-6) -> float:
    """The lr of `PolySchedule` at optimizer step ``step`` (0-based); ``min_lr`` from ``total`` on."""
    if total <= 0 or warmup < 0 or power <= 0:
        raise ConfigError(f"poly schedule needs total > 0, warmup >= 0 and power > 0, got {total}, {warmup}, {power}")
    if step >= total:
        return min_lr
    lr = (peak - min_lr) * (1 - step / total) ** power + min_lr
    if step < warmup:
        lr *= warmup_ratio + (1 - warmup_ratio) * step / warmup
    return lr


# ---------------------------------------------------------------------------------------------------- metrics
def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
                     ) -> torch.Tensor:
    """[classes, classes] counts, rows = ground truth, columns = prediction; ignored pixels left out."""
    valid = label != ignore_index
    index = label[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def segmentation_metrics(confusion: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, pixel accuracy (aAcc) and mean class accuracy (mAcc) in %, as mmsegmentation reports them: classes
    with no ground-truth and no predicted pixel are left out of the means; ``per_class`` IoU too."""
    confusion = confusion.double()
    tp = confusion.diag()
    gt, predicted = confusion.sum(1), confusion.sum(0)
    union = gt + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.nan)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    return {
        "mIoU": float(np.nanmean(iou.numpy())) * 100 if torch.any(union > 0) else 0.0,
        "aAcc": float(tp.sum() / gt.sum().clamp(min=1)) * 100,
        "mAcc": float(np.nanmean(acc.numpy())) * 100 if torch.any(gt > 0) else 0.0,
        "per_class_IoU": {n: (None if math.isnan(v) else v * 100) for n, v in zip(names, iou.tolist(), strict=False)},
    }


@torch.no_grad()
def evaluate_segmentation(model: Segmenter, dataset: SegmentationFolder, device: torch.device,
                          batch_size: int = 8, precision: str = "fp32", class_names: Sequence[str] | None = None,
                          progress: Callable[[Any], Any] = lambda it: it, inference: str = "whole",
                          crop: int = 512, stride: int = 341) -> dict[str, Any]:
    """Inference over a dataset (images of one size are batched): mIoU, aAcc, mAcc, per-class IoU.

    ``inference='whole'`` runs each image at once; ``'slide'`` runs ``crop`` x ``crop`` windows every ``stride`` px
    and averages the overlapping logits (`slide_logits`, BEiT's ADE20K setting: 512 / 341). The logits are resized to
    each label's size before the argmax, so the scores are at full label resolution.
    """
    if inference not in INFERENCE:
        raise ConfigError(f"inference '{inference}' is not one of {', '.join(INFERENCE)}")
    model.eval()
    confusion = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.int64)
    for start in progress(range(0, len(dataset), batch_size)):
        pairs = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        groups: dict[tuple, list] = {}
        for image, label in pairs:
            groups.setdefault(tuple(image.shape), []).append((image, label))
        for group in groups.values():
            images = torch.stack([im for im, _ in group]).to(device)
            with autocast_context(precision, device):
                logits = model(images)["out"] if inference == "whole" else \
                    slide_logits(model, images, dataset.num_classes, crop, stride)
            for image_logit, (_, label) in zip(logits, group, strict=True):
                logit = image_logit
                if logit.shape[-2:] != label.shape:
                    logit = _resize(image_logit[None].float(), label.shape)[0]
                confusion += confusion_matrix(logit.argmax(0).cpu(), label, dataset.num_classes,
                                              dataset.ignore_index)
    return segmentation_metrics(confusion, class_names)
