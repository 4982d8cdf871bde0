"""Semantic segmentation: ``run(SegmentConfig) -> summary``; ``mae segment`` parses and calls it.

UperNet on a ViT pyramid with relative position bias (zero at start) in every block, trained end to end with AdamW
and layer-wise lr decay (paper section 5, appendix A.4); ADE20K-style data (images + label PNGs, value 0 ignored);
mIoU, pixel accuracy and mean class accuracy.

The defaults follow BEiT's semantic segmentation code, which the paper used (A.4): features of blocks 3, 5, 7, 11
(ViT-B) / 7, 11, 15, 23 (ViT-L) taken raw, BatchNorm between the two stride-4 transposed convolutions, a learnable
absolute position table, UperNet as wide as the encoder (768 / 1024), poly lr schedule with 1,500 warm-up
iterations (`optim.schedule`, applied by the run layer through `mae.transfer.segmentation.PolySchedule`) and
sliding-window inference (512 crops, stride 341). ``backbone.feature_blocks=quarters backbone.feature_norm=layernorm
backbone.deconv_norm=layernorm backbone.learnable_pos_embed=false head.channels=512 test.mode=whole`` is this
project's earlier head (paper A.3's detection pyramid); docs/transfer.md compares the two.

    mae segment --config configs/segment/synthetic_tiny.yaml --checkpoint runs/pretrain/model.safetensors
    mae segment mode=evaluate weights=runs/segment --data data/ADEChallengeData2016
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

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
from mae.transfer.backbone import DECONV_NORMS, FEATURE_BLOCKS, FEATURE_NORMS, ViTPyramid, check_pyramid
from mae.transfer.segmentation import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INFERENCE,
    NORMS,
    SCHEDULES,
    SegmentationFolder,
    SegmentationTransform,
    Segmenter,
    evaluate_segmentation,
    segmentation_loss,
)
from mae.transfer.synthetic import generate_synthetic, synthetic_root

log = logging.getLogger("mae")

CLI_FLAGS = {"--data": "data.path", "--output-dir": "output_dir", "--checkpoint": "backbone.checkpoint",
             "--init": "backbone.init", "--mode": "mode", "--weights": "weights", "--resume": "resume",
             "--epochs": "epochs", "--precision": "precision", "--device": "device"}
FORMAT = FORMAT_BY_KIND["segment"]
METRICS = ("mIoU", "aAcc", "mAcc")


@dataclass
class SegmentData:
    """ADE20K-style data: ``path/images/<split>`` and ``path/annotations/<split>`` (label PNGs, same stems)."""

    path: str = field(default="data/ADEChallengeData2016", metadata={
        "help": "dataset root; 'synthetic' generates shapes into output_dir/synthetic, 'synthetic:<folder>' there"})
    train_split: str = field(default="training", metadata={"help": "split folder name ('train' is tried too)"})
    val_split: str = field(default="validation", metadata={"help": "split folder name ('val' is tried too)"})
    num_classes: int = field(default=150, metadata={"help": "classes after reduce_zero_label (ADE20K: 150)"})
    class_names: list[str] | None = field(default=None, metadata={"help": "names for the per-class IoU"})
    reduce_zero_label: bool = field(default=True, metadata={
        "help": "label 0 is 'unlabelled' (ignored) and v becomes class v-1 (ADE20K's convention)"})
    ignore_index: int = 255
    crop_size: int = field(default=512, metadata={"help": "training crop side"})
    scale: int = field(default=512, metadata={"help": "short side before the random ratio (train) / for eval"})
    ratio_range: tuple[float, float] = field(default=(0.5, 2.0), metadata={"help": "random rescale range"})
    eval_scale: int | None = field(default=512, metadata={"help": "eval short side (null: native size)"})
    hflip: float = 0.5
    train_limit: int | None = field(default=None, metadata={"help": "use only the first N training images"})
    val_limit: int | None = field(default=None, metadata={"help": "score only the first N val images"})
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)

    RANGES: ClassVar[dict[str, str]] = {"ratio_range": "> 0", "hflip": "[0, 1]"}

    def validate(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(f"data.num_classes must be at least 2, got {self.num_classes}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ConfigError(f"data.class_names has {len(self.class_names)} names for {self.num_classes} classes")
        if not 0 <= self.ignore_index <= 255 or self.ignore_index < self.num_classes:
            raise ConfigError(f"data.ignore_index must be in [num_classes, 255], got {self.ignore_index}")
        if self.crop_size < 32 or self.scale < 32 or (self.eval_scale is not None and self.eval_scale < 32):
            raise ConfigError("data.crop_size, data.scale and data.eval_scale must be at least 32")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ConfigError(f"data.ratio_range must be increasing and positive, got {list(self.ratio_range)}")


@dataclass
class SegmentHead:
    """UperNet decoder and auxiliary FCN head."""

    channels: int | None = field(default=None, metadata={
        "help": "UperNet width (default: the encoder's width, BEiT's 768 for ViT-B / 1024 for ViT-L)"})
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6], metadata={"help": "PPM bins"})
    aux_channels: int = field(default=256, metadata={"help": "auxiliary FCN head width (0: no auxiliary head)"})
    aux_weight: float = field(default=0.4, metadata={"help": "weight of the auxiliary loss"})
    dropout: float = 0.1
    norm: str = field(default="bn", metadata={"help": "bn | gn (GroupNorm for batches of 1 image)"})

    RANGES: ClassVar[dict[str, str]] = {"aux_weight": ">= 0", "dropout": "[0, 1)"}

    def validate(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"head.norm '{self.norm}' is not one of {', '.join(NORMS)}")
        if (self.channels is not None and self.channels < 1) or self.aux_channels < 0:
            raise ConfigError(f"head.channels must be >= 1 (or null) and head.aux_channels >= 0, got "
                              f"{self.channels}, {self.aux_channels}")


@dataclass
class SegmentBackbone(BackboneSection):
    """The backbone section plus the pyramid choices of BEiT's semantic segmentation code (the defaults)."""

    feature_blocks: str = field(default="beit", metadata={
        "help": "beit (blocks 3, 5, 7, 11 of ViT-B; 7, 11, 15, 23 of ViT-L) | quarters (last of 4 equal groups)"})
    out_indices: list[int] | None = field(default=None, metadata={
        "help": "the 4 blocks (0-based) that feed the pyramid; overrides feature_blocks"})
    feature_norm: str = field(default="none", metadata={
        "help": "none (raw block outputs, BEiT) | layernorm (a LayerNorm per map)"})
    deconv_norm: str = field(default="batchnorm", metadata={
        "help": "batchnorm (BEiT; SyncBatchNorm under DDP) | layernorm, between the two stride-4 deconvolutions"})
    learnable_pos_embed: bool = field(default=True, metadata={
        "help": "train the absolute position table (BEiT) instead of keeping the sin-cos table fixed"})

    def validate(self) -> None:
        super().validate()
        for name, value, valid in (("feature_blocks", self.feature_blocks, FEATURE_BLOCKS),
                                   ("feature_norm", self.feature_norm, FEATURE_NORMS),
                                   ("deconv_norm", self.deconv_norm, DECONV_NORMS)):
            if value not in valid:
                raise ConfigError(f"backbone.{name} '{value}' is not one of {', '.join(valid)}")
        if self.out_indices is not None and (len(self.out_indices) != 4 or
                                             list(self.out_indices) != sorted(set(self.out_indices))):
            raise ConfigError(f"backbone.out_indices must be 4 increasing block indices, got {self.out_indices}")

    def pyramid_kwargs(self) -> dict[str, Any]:
        """The `ViTPyramid` arguments of this section beyond `BackboneSection`'s."""
        return {"feature_blocks": self.feature_blocks, "out_indices": self.out_indices,
                "feature_norm": self.feature_norm, "deconv_norm": self.deconv_norm,
                "learnable_pos_embed": self.learnable_pos_embed}


def _default_backbone() -> SegmentBackbone:
    return SegmentBackbone(rel_pos_bias=True)


@dataclass
class SegmentOptim(TransferOptim):
    """AdamW with layer-wise lr decay; the lr schedule of BEiT's ADE20K code by default."""

    schedule: str = field(default="poly", metadata={
        "help": "poly (BEiT: linear warm-up over warmup_iters, then (1 - t/T)^power) | cosine (warm-up epochs)"})
    warmup_iters: int = field(default=1500, metadata={"help": "poly: warm-up length in optimizer steps (BEiT: 1500)"})
    power: float = field(default=1.0, metadata={"help": "poly: exponent of the decay (BEiT: 1.0)"})

    RANGES: ClassVar[dict[str, str]] = {"power": "> 0"}

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule '{self.schedule}' is not one of {', '.join(SCHEDULES)}")
        if self.warmup_iters < 0:
            raise ConfigError(f"optim.warmup_iters must be >= 0, got {self.warmup_iters}")


def _default_optim() -> SegmentOptim:
    return SegmentOptim(lr=1e-4, weight_decay=0.05, layer_decay=0.65)


@dataclass
class SegmentTest:
    """How validation images are scored."""

    mode: str = field(default="slide", metadata={
        "help": "slide (BEiT: crop x crop windows every stride px, logits averaged) | whole (the image at once)"})
    crop: int = field(default=512, metadata={"help": "slide: window side (BEiT ADE20K: 512)"})
    stride: int = field(default=341, metadata={"help": "slide: step between windows (BEiT ADE20K: 341)"})

    def validate(self) -> None:
        if self.mode not in INFERENCE:
            raise ConfigError(f"test.mode '{self.mode}' is not one of {', '.join(INFERENCE)}")
        if self.crop < 32 or not 1 <= self.stride <= self.crop:
            raise ConfigError(f"test.crop must be >= 32 and test.stride in [1, crop], got {self.crop}, {self.stride}")


@dataclass
class SegmentConfig(TransferRun):
    """Everything a segmentation run needs; saved as config.yaml next to the run."""

    output_dir: str = field(default="runs/segment", metadata={"help": "checkpoints, metrics and summary go here"})
    backbone: SegmentBackbone = field(default_factory=_default_backbone)
    data: SegmentData = field(default_factory=SegmentData)
    head: SegmentHead = field(default_factory=SegmentHead)
    optim: SegmentOptim = field(default_factory=_default_optim)
    test: SegmentTest = field(default_factory=SegmentTest)

    def validate(self) -> None:
        super().validate()
        if self.mode == "train":
            self.backbone.check_source()
        if self.mode == "train" and self.head.norm == "bn" and self.batch_size < 2:
            raise ConfigError("head.norm=bn needs batch_size >= 2 (BatchNorm over one image's pooled map fails); "
                              "raise batch_size or use head.norm=gn")
        if self.mode == "train" and self.backbone.deconv_norm == "batchnorm" and self.batch_size < 2:
            raise ConfigError("backbone.deconv_norm=batchnorm needs batch_size >= 2; raise batch_size or use "
                              "backbone.deconv_norm=layernorm")


def segmenter_from_task(task: dict[str, Any], backbone: ViTPyramid | None = None) -> Segmenter:
    """Build the model a task spec (stored in every segment checkpoint) describes."""
    if backbone is None:
        spec = dict(task["backbone"])
        check_pyramid(spec["pyramid"], spec["depth"], spec["patch_size"], spec["strides"])
        backbone = ViTPyramid(**spec)
    head = task["head"]
    return Segmenter(backbone, len(task["classes"]), channels=head["channels"] or backbone.embed_dim,
                     pool_scales=head["pool_scales"],
                     aux_channels=head["aux_channels"], dropout=head["dropout"], norm=head["norm"])


def _data(cfg: SegmentConfig, out: Path) -> tuple[Path, list[str], int]:
    """(root, class names, num_classes), generating synthetic data when asked (its classes override data.*)."""
    root = synthetic_root(cfg.data.path, out)
    if root is not None:
        data = generate_synthetic(root, cfg.data.synthetic.spec())
        names = data.segmentation_classes
        if cfg.data.num_classes != len(names):
            log.info("synthetic data: %d classes (%s)", len(names), ", ".join(names))
        return data.root, names, len(names)
    names = cfg.data.class_names or [str(i) for i in range(cfg.data.num_classes)]
    return Path(cfg.data.path).expanduser(), list(names), cfg.data.num_classes


def run(cfg: SegmentConfig) -> dict[str, Any]:
    """Train (mode=train) or score (mode=evaluate) an UperNet segmenter; returns mIoU / aAcc / mAcc and run facts."""
    if cfg.mode == "evaluate":
        return _evaluate(cfg)
    return run_transfer(cfg, "segment", lambda run: build_spec(cfg, run))


def _val_set(cfg: SegmentConfig, out: Path) -> tuple[SegmentationFolder, Path, list[str], int]:
    root, names, num_classes = _data(cfg, out)
    d = cfg.data
    eval_transform = SegmentationTransform(scale=d.eval_scale, crop_size=None, ignore_index=d.ignore_index)
    val_set = SegmentationFolder(root, d.val_split, num_classes, d.reduce_zero_label, d.ignore_index, eval_transform,
                                 limit=d.val_limit)
    return val_set, root, names, num_classes


def _scorer(cfg: SegmentConfig, val_set: SegmentationFolder, names: list[str], device: torch.device,
            precision: str):
    progress = eval_progress(cfg.progress, "evaluate")
    return lambda model: evaluate_segmentation(model, val_set, device, cfg.eval_batch_size, precision, names,
                                               progress, inference=cfg.test.mode, crop=cfg.test.crop,
                                               stride=cfg.test.stride)


def _evaluate(cfg: SegmentConfig) -> dict[str, Any]:
    device, precision, out = evaluation_setup(cfg)
    val_set, _, names, num_classes = _val_set(cfg, out)
    task, state, path = load_task_checkpoint(cfg.weights, FORMAT)  # type: ignore[arg-type]  # validate(): mode=evaluate needs weights
    if len(task["classes"]) != num_classes:
        raise ConfigError(f"'{path}' predicts {len(task['classes'])} classes but data.num_classes is {num_classes}")
    model = segmenter_from_task(task).to(device)
    model.load_state_dict(state)
    metrics = _scorer(cfg, val_set, names, device, precision)(model)
    write_json(out / "eval.json", metrics, indent=1)
    return {"weights": str(path), "val_images": len(val_set), **{k: metrics[k] for k in METRICS}}


def build_spec(cfg: SegmentConfig, run: Run) -> TrainSpec:
    device = run.device
    val_set, root, names, num_classes = _val_set(cfg, run.out)
    d = cfg.data
    train_transform = SegmentationTransform(scale=d.scale, crop_size=d.crop_size, ratio_range=tuple(d.ratio_range),  # type: ignore[arg-type]  # two floats (validated config)
                                            hflip=d.hflip, ignore_index=d.ignore_index)
    train_set = SegmentationFolder(root, d.train_split, num_classes, d.reduce_zero_label, d.ignore_index,
                                   train_transform, limit=d.train_limit)
    backbone, report = make_backbone(cfg.backbone, d.crop_size)
    h = cfg.head
    task = {"backbone": {**backbone_spec(backbone), **backbone.pyramid_options()}, "classes": names,
            "ignore_index": d.ignore_index, "reduce_zero_label": d.reduce_zero_label, "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD), "head": {"channels": h.channels or backbone.embed_dim,
                                                      "pool_scales": list(h.pool_scales),
                                                      "aux_channels": h.aux_channels, "dropout": h.dropout,
                                                      "norm": h.norm}}
    model = segmenter_from_task(task, backbone).to(device)
    loader = build_loader(train_set, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers, seed=cfg.seed,
                          drop_last=True)

    def loss_fn(m: torch.nn.Module, batch) -> torch.Tensor:
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        return segmentation_loss(m(images), labels, d.ignore_index, h.aux_weight)

    return transfer_spec(run, model=model, backbone=backbone, backbone_prefix="backbone.", train_set=train_set,
                         train_loader=loader, loss_fn=loss_fn,
                         evaluate=_scorer(cfg, val_set, names, device, run.precision), best_key="mIoU", task=task,
                         init_report=report, metric_keys=METRICS, weights=backbone_weights(cfg.backbone))
