"""Transfer of MAE encoders to detection, instance segmentation and semantic segmentation (paper section 5).

    from mae.transfer import build_backbone, build_mask_rcnn, Segmenter, generate_synthetic
    backbone, report = build_backbone("runs/pretrain/model.safetensors", img_size=128)   # any checkpoint format
    detector = build_mask_rcnn(backbone, num_classes=5, min_size=128, max_size=128)    # torchvision Mask R-CNN
    data = generate_synthetic("runs/shapes", num_train=300, num_val=100)               # COCO + ADE20K-style files

- `backbone`: `ViTPyramid` (4 block groups -> strides 4/8/16/32, or the simple pyramid), relative position bias,
  checkpoint loading, layer-wise lr decay groups;
- `detection`: Mask R-CNN + FPN on the pyramid, COCO-format data, COCOeval box / mask AP;
- `segmentation`: UperNet head, ADE20K-style folders, mIoU / pixel accuracy;
- `synthetic`: the download-free scene generator.

The recipes `mae detect` / `mae segment` and the run they share (`mae.recipes.transfer_run`) build on these.

Names are imported on first use, so ``import mae.transfer`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "backbone": ("ViTPyramid", "RelativePositionBias", "build_backbone", "encoder_arch",
                 "backbone_layer_id", "backbone_param_groups"),
    "detection": ("ViTFPN", "build_mask_rcnn", "CocoInstances", "collate_detection", "detections_to_coco",
                  "coco_eval", "evaluate_coco"),
    "segmentation": ("UperNetHead", "FCNHead", "Segmenter", "SegmentationFolder", "SegmentationTransform",
                     "segmentation_loss", "confusion_matrix", "segmentation_metrics", "evaluate_segmentation"),
    "synthetic": ("SHAPES", "SyntheticSpec", "SyntheticDataset", "generate_synthetic"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "SHAPES", "CocoInstances", "FCNHead", "RelativePositionBias", "SegmentationFolder",
    "SegmentationTransform", "Segmenter", "SyntheticDataset", "SyntheticSpec", "UperNetHead", "ViTFPN", "ViTPyramid",
    "backbone_layer_id", "backbone_param_groups", "build_backbone", "build_mask_rcnn", "coco_eval",
    "collate_detection", "confusion_matrix", "detections_to_coco", "encoder_arch", "evaluate_coco",
    "evaluate_segmentation", "generate_synthetic", "segmentation_loss", "segmentation_metrics",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mae.transfer' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"mae.transfer.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
