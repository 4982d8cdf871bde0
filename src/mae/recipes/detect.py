"""Object detection and instance segmentation: ``run(DetectConfig) -> summary``; ``mae detect`` parses and calls it.

Mask R-CNN (torchvision) on a ViT pyramid + FPN (paper section 5, appendix A.3), trained end to end with AdamW and
layer-wise lr decay on the backbone; COCO-format data; box and mask AP from pycocotools' COCOeval.

    mae detect --config configs/detect/synthetic_tiny.yaml --checkpoint runs/pretrain/model.safetensors
    mae detect mode=evaluate weights=runs/detect        # re-score a run's best checkpoint
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torchvision.models.detection import MaskRCNN

from mae.data import build_loader
from mae.errors import ConfigError
from mae.files import write_json
from mae.recipes.transfer_run import (
    BackboneSection,
    SyntheticSection,
    TransferOptim,
    TransferRun,
    backbone_spec,
    backbone_weights,
    eval_progress,
    evaluation_setup,
    load_task_checkpoint,
    make_backbone,
    run_transfer,
    transfer_spec,
)
from mae.train.checkpoint_formats import FORMAT_BY_KIND
from mae.train.run import Run
from mae.train.spec import TrainSpec
from mae.transfer.backbone import ViTPyramid, check_pyramid
from mae.transfer.detection import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CocoInstances,
    build_mask_rcnn,
    collate_detection,
    evaluate_coco,
)
from mae.transfer.synthetic import generate_synthetic, synthetic_root

log = logging.getLogger("mae")

CLI_FLAGS = {"--data": "data.path", "--output-dir": "output_dir", "--checkpoint": "backbone.checkpoint",
             "--init": "backbone.init", "--mode": "mode", "--weights": "weights", "--resume": "resume",
             "--epochs": "epochs", "--precision": "precision", "--device": "device"}
FORMAT = FORMAT_BY_KIND["detect"]
METRICS = ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75")


@dataclass
class DetectData:
    """COCO-format data: images folders and instances JSON files, relative to ``path`` (COCO 2017 layout)."""

    path: str = field(default="data/coco", metadata={
        "help": "dataset root; 'synthetic' generates shapes into output_dir/synthetic, 'synthetic:<folder>' there"})
    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    hflip: float = field(default=0.5, metadata={"help": "horizontal flip probability in training"})
    train_limit: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    val_limit: int | None = field(default=None, metadata={"help": "score only the first N val images"})
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)

    RANGES: ClassVar[dict[str, str]] = {"hflip": "[0, 1]"}

    def validate(self) -> None:
        for name in ("train_limit", "val_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class DetectHead:
    """Mask R-CNN settings (torchvision defaults where not said otherwise)."""

    min_size: int = field(default=1024, metadata={"help": "images are resized to this short side"})
    max_size: int = field(default=1024, metadata={"help": "... with the long side at most this"})
    fpn_channels: int = 256
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512], metadata={
        "help": "one anchor size per FPN level (strides 4, 8, 16, 32, 64)"})
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    box_head_dim: int = field(default=1024, metadata={"help": "width of the two FC layers of the box head"})
    mask_head_channels: int = field(default=256, metadata={"help": "channels of the four mask-head convolutions"})
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = field(default=512, metadata={"help": "sampled RoIs per image in training"})
    box_detections_per_img: int = 100

    RANGES: ClassVar[dict[str, str]] = {"aspect_ratios": "> 0"}

    def validate(self) -> None:
        if self.min_size < 32 or self.max_size < self.min_size:
            raise ConfigError(f"head.min_size must be >= 32 and head.max_size >= min_size, got {self.min_size}, "
                              f"{self.max_size}")
        if len(self.anchor_sizes) != 5:
            raise ConfigError(f"head.anchor_sizes needs 5 values (FPN levels at strides 4..64), got "
                              f"{self.anchor_sizes}")

    def rcnn_kwargs(self) -> dict[str, int]:
        keys = ("rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
                "rpn_post_nms_top_n_test", "box_batch_size_per_image", "box_detections_per_img")
        return {k: getattr(self, k) for k in keys}


@dataclass
class DetectConfig(TransferRun):
    """Everything a detection run needs; saved as config.yaml next to the run."""

    output_dir: str = field(default="runs/detect", metadata={"help": "checkpoints, metrics and summary go here"})
    backbone: BackboneSection = field(default_factory=BackboneSection)
    data: DetectData = field(default_factory=DetectData)
    head: DetectHead = field(default_factory=DetectHead)
    optim: TransferOptim = field(default_factory=lambda: TransferOptim(lr=1e-4, weight_decay=0.1, layer_decay=0.7))

    def validate(self) -> None:
        super().validate()
        if self.mode == "train":
            self.backbone.check_source()


def detector_from_task(task: dict[str, Any], backbone: ViTPyramid | None = None) -> MaskRCNN:
    """Build the Mask R-CNN a task spec (stored in every detect checkpoint) describes."""
    if backbone is None:
        spec = dict(task["backbone"])
        check_pyramid(spec["pyramid"], spec["depth"], spec["patch_size"], spec["strides"])
        backbone = ViTPyramid(**spec)
    head = task["head"]
    return build_mask_rcnn(
        backbone, len(task["classes"]), min_size=head["min_size"], max_size=head["max_size"],
        fpn_channels=head["fpn_channels"], anchor_sizes=head["anchor_sizes"], aspect_ratios=head["aspect_ratios"],
        box_head_dim=head["box_head_dim"], mask_head_channels=head["mask_head_channels"],
        image_mean=task.get("image_mean", IMAGENET_MEAN), image_std=task.get("image_std", IMAGENET_STD),
        **{k: head[k] for k in DetectHead().rcnn_kwargs()})


def _data_paths(cfg: DetectConfig, out: Path) -> tuple[Path, Path, Path, Path]:
    """(train images, train annotations, val images, val annotations), generating synthetic data when asked."""
    root = synthetic_root(cfg.data.path, out)
    if root is not None:
        data = generate_synthetic(root, cfg.data.synthetic.spec())
        return data.images("training"), data.coco("training"), data.images("validation"), data.coco("validation")
    base = Path(cfg.data.path).expanduser()
    d = cfg.data
    return base / d.train_images, base / d.train_annotations, base / d.val_images, base / d.val_annotations


def run(cfg: DetectConfig) -> dict[str, Any]:
    """Train (mode=train) or score (mode=evaluate) a Mask R-CNN; returns box / mask AP and run facts."""
    if cfg.mode == "evaluate":
        return _evaluate(cfg)
    return run_transfer(cfg, "detect", lambda run: build_spec(cfg, run))


def _val_set(cfg: DetectConfig, out: Path) -> tuple[CocoInstances, tuple[Path, Path]]:
    train_images, train_ann, val_images, val_ann = _data_paths(cfg, out)
    return CocoInstances(val_images, val_ann, limit=cfg.data.val_limit), (train_images, train_ann)


def _scorer(cfg: DetectConfig, val_set: CocoInstances, device: torch.device, precision: str):
    progress = eval_progress(cfg.progress, "evaluate")
    return lambda model: evaluate_coco(model, val_set, device, cfg.eval_batch_size, precision, progress)


def _evaluate(cfg: DetectConfig) -> dict[str, Any]:
    device, precision, out = evaluation_setup(cfg)
    val_set, _ = _val_set(cfg, out)
    task, state, path = load_task_checkpoint(cfg.weights, FORMAT)  # type: ignore[arg-type]  # validate(): mode=evaluate needs weights
    if task["classes"] != val_set.classes:
        raise ConfigError(f"'{path}' was trained on classes {task['classes']} but the val data has {val_set.classes}")
    model = detector_from_task(task).to(device)
    model.load_state_dict(state)
    metrics = _scorer(cfg, val_set, device, precision)(model)
    write_json(out / "eval.json", metrics, indent=1)
    return {"weights": str(path), "val_images": len(val_set), **{k: metrics[k] for k in METRICS}}


def build_spec(cfg: DetectConfig, run: Run) -> TrainSpec:
    device = run.device
    val_set, (train_images, train_ann) = _val_set(cfg, run.out)
    train_set = CocoInstances(train_images, train_ann, hflip=cfg.data.hflip, limit=cfg.data.train_limit)
    if train_set.classes != val_set.classes:
        raise ConfigError(f"train and val annotations have different categories: {train_set.classes} vs "
                          f"{val_set.classes}")
    backbone, report = make_backbone(cfg.backbone, cfg.head.min_size)
    task = {"backbone": backbone_spec(backbone), "head": {
        "min_size": cfg.head.min_size, "max_size": cfg.head.max_size, "fpn_channels": cfg.head.fpn_channels,
        "anchor_sizes": list(cfg.head.anchor_sizes), "aspect_ratios": list(cfg.head.aspect_ratios),
        "box_head_dim": cfg.head.box_head_dim, "mask_head_channels": cfg.head.mask_head_channels,
        **cfg.head.rcnn_kwargs()}, "classes": train_set.classes,
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
    model = detector_from_task(task, backbone).to(device)
    loader = build_loader(train_set, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers, seed=cfg.seed,
                          drop_last=True, collate_fn=collate_detection)

    def loss_fn(m: torch.nn.Module, batch) -> torch.Tensor:
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        return sum(m(images, targets).values())

    return transfer_spec(run, model=model, backbone=backbone, backbone_prefix="backbone.body.",
                         train_set=train_set, train_loader=loader, loss_fn=loss_fn,
                         evaluate=_scorer(cfg, val_set, device, run.precision), best_key="box_AP", task=task,
                         init_report=report, metric_keys=METRICS, weights=backbone_weights(cfg.backbone))
