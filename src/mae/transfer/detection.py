"""Mask R-CNN with a ViT pyramid + FPN backbone (paper section 5 / A.3), COCO-format data, COCO box and mask AP.

The detector is torchvision's `MaskRCNN`; this module supplies the backbone (`ViTFPN`: `ViTPyramid` then
`torchvision.ops.FeaturePyramidNetwork`), anchor sizes and RoIAlign levels for the pyramid, a dataset reading
COCO JSON (boxes, instance masks, class labels) and `evaluate_coco` (pycocotools' COCOeval for 'bbox' and 'segm').
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.transforms.functional import pil_to_tensor

from mae.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mae.errors import DataError
from mae.train.precision import autocast_context
from mae.transfer.backbone import ViTPyramid

_log = logging.getLogger(__name__)


class ViTFPN(nn.Module):
    """`ViTPyramid` followed by an FPN: the backbone torchvision's detection models expect. Outputs '0'..'3' (strides
    4..32 of the pyramid) and 'pool' (stride 64, max-pooled from '3'), each with ``out_channels`` channels."""

    def __init__(self, body: ViTPyramid, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork([body.out_channels] * len(body.strides), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(images))


def build_mask_rcnn(backbone: ViTPyramid, num_classes: int, *, min_size: int = 800, max_size: int = 1333,
                    fpn_channels: int = 256, anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
                    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), box_head_dim: int = 1024,
                    mask_head_channels: int = 256, image_mean: Sequence[float] = IMAGENET_MEAN,
                    image_std: Sequence[float] = IMAGENET_STD, **rcnn_kwargs: Any) -> MaskRCNN:
    """torchvision's Mask R-CNN on ``backbone`` + FPN, for ``num_classes`` object classes (background is added).

    One anchor size per FPN level (strides 4, 8, 16, 32, 64); box and mask RoIAlign read levels '0'..'3'. The box
    head is two FC layers of ``box_head_dim``, the mask head four 3x3 convolutions of ``mask_head_channels`` (the
    torchvision defaults are 1024 and 256; smaller heads train faster on a CPU). Images are resized so that the
    short side is ``min_size`` (long side at most ``max_size``): set both to the image size of small data so
    nothing is upscaled. ``rcnn_kwargs`` go to `MaskRCNN` (e.g. ``box_batch_size_per_image``).
    """
    if len(anchor_sizes) != len(backbone.strides) + 1:
        raise ValueError(f"anchor_sizes needs {len(backbone.strides) + 1} values (one per FPN level, the last for "
                         f"'pool'), got {list(anchor_sizes)}")
    fpn = ViTFPN(backbone, fpn_channels)
    anchors = AnchorGenerator(sizes=tuple((int(s),) for s in anchor_sizes),
                              aspect_ratios=(tuple(float(a) for a in aspect_ratios),) * len(anchor_sizes))
    levels = list(backbone.feature_names)
    box_pool = MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2)
    mask_pool = MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2)
    return MaskRCNN(
        fpn, num_classes=None, min_size=min_size, max_size=max_size, image_mean=list(image_mean),
        image_std=list(image_std), rpn_anchor_generator=anchors, box_roi_pool=box_pool,
        box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_dim),
        box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
        mask_roi_pool=mask_pool, mask_head=MaskRCNNHeads(fpn_channels, [mask_head_channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1), **rcnn_kwargs)


# ---------------------------------------------------------------------------------------------------- data
def _quiet_coco(annotation_file: str | Path):
    """pycocotools' COCO, without its prints (library code never prints)."""
    from pycocotools.coco import COCO  # pycocotools loads matplotlib: only for COCO evaluation

    path = Path(annotation_file)
    if not path.is_file():
        raise DataError(f"COCO annotation file '{path}' does not exist; check data.path and the annotation paths")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"'{path}' is not a COCO instances file ({type(e).__name__}: {e})") from e


class CocoInstances(Dataset):
    """COCO-format instances: items ``(image [3, H, W] float in [0, 1], target)`` as torchvision's detection models
    take them; target has ``boxes`` [K, 4] (x1, y1, x2, y2), ``labels`` [K] (1..num_classes, contiguous in category
    id order), ``masks`` [K, H, W] uint8, ``image_id``. Crowd regions and empty boxes are left out of the targets.

    ``hflip`` is the probability of a horizontal flip (training augmentation), drawn from torch's RNG.
    """

    def __init__(self, images_dir: str | Path, annotation_file: str | Path, hflip: float = 0.0,
                 limit: int | None = None):
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise DataError(f"image folder '{self.images_dir}' does not exist; check data.path and the image paths")
        self.coco = _quiet_coco(annotation_file)
        self.annotation_file = Path(annotation_file)
        self.category_ids = sorted(self.coco.getCatIds())
        if not self.category_ids:
            raise DataError(f"'{annotation_file}' has no categories")
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.classes = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.ids = sorted(self.coco.getImgIds())[:limit]
        if not self.ids:
            raise DataError(f"'{annotation_file}' lists no images")
        self.hflip = hflip

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> torch.Tensor:
        info = self.coco.imgs[image_id]
        path = self.images_dir / info["file_name"]
        try:
            with Image.open(path) as f:
                image = pil_to_tensor(f.convert("RGB"))
        except OSError as e:
            raise DataError(f"could not read image '{path}': {e}") from e
        return image.float().div_(255)  # [3, H, W]

    def target(self, image_id: int, height: int, width: int) -> dict[str, torch.Tensor]:
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes, labels, masks = [], [], []
        for a in anns:
            x, y, w, h = a["bbox"]
            if w < 1 or h < 1:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of[a["category_id"]])
            masks.append(self.coco.annToMask(a))
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width, dtype=torch.uint8),
            "image_id": torch.tensor(image_id),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        image = self.load_image(image_id)
        target = self.target(image_id, image.shape[1], image.shape[2])
        if self.hflip and torch.rand(()) < self.hflip:
            image, target = hflip(image, target)
        return image, target


def hflip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mirror an image and its boxes and masks left-right."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Detection batches stay lists: images may differ in size, targets in length."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


# ---------------------------------------------------------------------------------------------------- evaluation
def detections_to_coco(output: dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int],
                       mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """One image's Mask R-CNN output as COCO result dicts (bbox xywh, score, category, mask as compressed RLE)."""
    from pycocotools import mask as mask_utils  # slow to import (matplotlib): only here

    boxes = output["boxes"].float().cpu()
    if boxes.numel() == 0:
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].float().cpu().tolist()
    labels = output["labels"].cpu().tolist()
    rles: list[Any] = [None] * len(scores)
    if "masks" in output:
        binary = (output["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)  # [K, H, W]
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # one RLE per mask
    results = []
    for box, score, label, rle in zip(xywh, scores, labels, rles, strict=True):
        item = {"image_id": int(image_id), "category_id": int(category_ids[label - 1]), "bbox": box,
                "score": float(score)}
        if rle is not None:
            item["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        results.append(item)
    return results


def coco_eval(coco_gt, results: list[dict[str, Any]], iou_type: str, image_ids: Sequence[int] | None = None
              ) -> dict[str, float]:
    """COCOeval's 12 summary numbers for 'bbox' or 'segm' (AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l), in %.

    No detections at all give zeros (COCO.loadRes cannot read an empty list).
    """
    from pycocotools.cocoeval import COCOeval  # slow to import (matplotlib): only here

    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
    if not results:
        return dict.fromkeys(names, 0.0)
    with contextlib.redirect_stdout(io.StringIO()) as text:
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    _log.debug("COCOeval %s:\n%s", iou_type, text.getvalue())
    # -1 marks "no ground truth in this area range": report it as 0 rather than a negative AP
    return {name: max(float(v), 0.0) * 100 for name, v in zip(names, evaluator.stats, strict=False)}


@torch.no_grad()
def predict_coco(model: nn.Module, dataset: CocoInstances, device: torch.device, batch_size: int = 8,
                 precision: str = "fp32", progress: Callable[[Any], Any] = lambda it: it) -> list[dict[str, Any]]:
    """Run a detector over a dataset (no augmentation); COCO result dicts for every detection."""
    model.eval()
    results: list[dict[str, Any]] = []
    for start in progress(range(0, len(dataset), batch_size)):
        ids = dataset.ids[start:start + batch_size]
        images = [dataset.load_image(i).to(device) for i in ids]
        with autocast_context(precision, device):
            outputs = model(images)
        for image_id, output in zip(ids, outputs, strict=True):
            results.extend(detections_to_coco(output, image_id, dataset.category_ids))
    return results


def evaluate_coco(model: nn.Module, dataset: CocoInstances, device: torch.device, batch_size: int = 8,
                  precision: str = "fp32", progress: Callable[[Any], Any] = lambda it: it) -> dict[str, float]:
    """Box and mask AP of a Mask R-CNN on a COCO-format dataset: ``{'box_AP': ..., 'mask_AP50': ..., ...}`` in %."""
    results = predict_coco(model, dataset, device, batch_size, precision, progress)
    metrics = {f"box_{k}": v for k, v in coco_eval(dataset.coco, results, "bbox", dataset.ids).items()}
    segm = [r for r in results if "segmentation" in r]
    metrics.update({f"mask_{k}": v for k, v in coco_eval(dataset.coco, segm, "segm", dataset.ids).items()})
    metrics["detections"] = float(len(results))
    return metrics
