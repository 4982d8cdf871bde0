"""What the classification recipes (finetune, linprobe, knn, evaluate) share: config sections, where the encoder
comes from, labelled datasets and their transforms, and `classifier_spec`, the `mae.train.spec.TrainSpec` fine-tuning
and linear probing share. Their evaluation is `mae.eval.classification`; their checkpoint files
`mae.interop.classifier_io`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision import transforms

from mae.config import to_dict
from mae.data import (
    HOLDOUT_SEED,
    UNLABELED,
    build_dataset,
    build_eval_transform,
    default_mean_std,
    has_split_folders,
    holdout_split,
    passed_over_files,
    skipped_files,
)
from mae.errors import ConfigError, DataError
from mae.eval.classification import EvalResult
from mae.files import write_json
from mae.interop.loading import EncoderSource, read_encoder
from mae.models import MaskedAutoencoderViT, model_config
from mae.models.classifier import GLOBAL_POOLS, ClassifierConfig, build_classifier, load_encoder_into
from mae.recipes.common import weights_record
from mae.threads import default_workers
from mae.train.engine import Engine
from mae.train.metrics_log import draw_curves
from mae.train.run import Run
from mae.train.spec import TrainSpec
from mae.train.trainer import Best, TrainResult

log = logging.getLogger("mae")

ENCODER_INITS = ("pretrained", "scratch", "random")
"""Where a classifier's encoder weights come from (the ``init`` field): 'pretrained' loads `checkpoint`; 'scratch' and
'random' (synonyms) start from the MAE's own initialisation."""


# ---------------------------------------------------------------------------------------------------- config sections
@dataclass
class ClassifierSection:
    """The classifier built on the encoder; the encoder's own architecture comes from the checkpoint."""

    name: str | None = field(default=None, metadata={
        "help": "registered MAE architecture: the encoder for init=scratch/random, and a hint (head count) for "
                "checkpoints that store no config"})
    img_size: int | None = field(default=None, metadata={
        "help": "image side (default: the checkpoint's); another size interpolates the position table (bicubic)"})
    global_pool: str = field(default="avg", metadata={
        "help": "avg (mean of patch tokens + new fc_norm, the paper's fine-tuning) | token (class token after norm)"})
    drop_path: float = field(default=0.1, metadata={"help": "stochastic depth rate (paper: 0.1 B/L, 0.2 H)"})
    num_classes: int | None = field(default=None, metadata={"help": "classes of the head (default: the dataset's)"})

    RANGES: ClassVar[dict[str, str]] = {"drop_path": "[0, 1)"}

    def validate(self) -> None:
        if self.global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"model.global_pool '{self.global_pool}' is not one of {', '.join(GLOBAL_POOLS)}")
        if self.img_size is not None and self.img_size < 1:
            raise ConfigError(f"model.img_size must be positive, got {self.img_size}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"model.num_classes must be >= 1, got {self.num_classes}")
        if self.name is not None:
            model_config(self.name)  # unknown names raise with a suggestion


@dataclass
class ClassifyData:
    """A labelled dataset: `builtin:<name>` or a class-folder tree (with train/ and val/ sub-folders)."""

    path: str = field(default="builtin:mnist5k", metadata={
        "help": "builtin:<name> or a folder of class sub-folders (root/train/<class>/..., root/val/<class>/...)"})
    num_workers: int = field(default_factory=default_workers, metadata={
        "help": "DataLoader worker processes (default: this process's share of the CPUs less one, at most 8)"})
    mean: list[float] | None = field(default=None, metadata={"help": "normalisation mean (default: ImageNet / 0.5)"})
    std: list[float] | None = None
    crop_pct: float | None = field(default=None, metadata={
        "help": "evaluation: resize to img_size / crop_pct, centre crop (default 0.875 up to 224 px, 1.0 above 224 px "
                "and for images <= 32 px)"})
    strict: bool = field(default=False, metadata={"help": "fail on a corrupt image instead of skipping it"})
    train_limit: int | None = field(default=None, metadata={"help": "use only this many training images (smoke runs)"})
    val_limit: int | None = field(default=None, metadata={"help": "use only this many validation images"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "a folder without train/ and val/: hold out this fraction of each class (seeded) for validation; "
                "0 uses every image for both"})

    RANGES: ClassVar[dict[str, str]] = {"mean": "any", "std": "> 0", "crop_pct": "(0, 1]", "val_fraction": "[0, 1)"}

    def validate(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        for name in ("train_limit", "val_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be >= 1 (or null for all), got {value}")


def check_init(init: str, checkpoint: str | None, model_name: str | None) -> None:
    """Config-time check of the encoder source (a run fails at start-up, not after loading the data)."""
    if init not in ENCODER_INITS:
        raise ConfigError(f"init '{init}' is not one of {', '.join(ENCODER_INITS)}")
    if init == "pretrained" and not checkpoint:
        raise ConfigError("init=pretrained needs checkpoint=<run directory or checkpoint file> (or --checkpoint); "
                          "use init=scratch with model.name=<architecture> to start from random weights")
    if init != "pretrained" and model_name is None:
        raise ConfigError(f"init={init} needs model.name=<registered architecture> (see `mae models`)")


# ---------------------------------------------------------------------------------------------------- the encoder
def load_encoder_source(init: str, checkpoint: str | None, model_name: str | None) -> EncoderSource:
    """The encoder to start from: any checkpoint or run directory the library reads (`mae.interop.read_encoder`),
    or a fresh MAE initialisation (fixed sin-cos positions, xavier-uniform linears) of the registered architecture
    `model_name`."""
    check_init(init, checkpoint, model_name)
    if init != "pretrained":
        model = MaskedAutoencoderViT(model_config(model_name, decoder_depth=0))  # type: ignore[arg-type]  # check_init above requires model_name without a checkpoint; no decoder: it would be dropped
        return EncoderSource(model_config(model_name), model.encoder_state_dict(), f"a random {model_name} encoder")  # type: ignore[arg-type]  # as above
    return read_encoder(checkpoint, model_name)  # type: ignore[arg-type]  # check_init above requires a checkpoint for init=pretrained


def build_from_source(source: EncoderSource, head_init_std: float, **classifier_fields: Any
                      ) -> tuple[nn.Module, ClassifierConfig]:
    """A classifier for the source's encoder with its weights loaded; logs what was left out."""
    ccfg = ClassifierConfig.from_mae(source.config, **classifier_fields)
    model = build_classifier(ccfg, head_init_std=head_init_std)
    report = load_encoder_into(model, source.state_dict, source.config, source=source.label)
    log.info("encoder: %s", report.describe())
    return model, ccfg


# ---------------------------------------------------------------------------------------------------- data
def image_mode(in_chans: int) -> str:
    return "L" if in_chans == 1 else "RGB"


def square_side(config: ClassifierConfig) -> int:
    h, w = config.image_hw
    if h != w:
        raise ConfigError(f"the image transforms make square images; img_size {h}x{w} is not square")
    return h


def labelled_dataset(data: ClassifyData, split: str, transform: Callable | None, in_chans: int,
                     limit: int | None = None, seed: int = 0) -> tuple[Dataset, list[str]]:
    """A split with class labels, optionally cut to `limit` images (a fixed random subset); and its class names.

    A folder without train/ and val/ sub-folders gives both splits from one tree: a seeded, class-stratified
    ``data.val_fraction`` of it is the val split and the rest the train split (`mae.data.holdout_split`)."""
    dataset = build_dataset(data.path, split, transform=transform, mode=image_mode(in_chans), strict=data.strict,
                            require_classes=True)
    classes = [str(c) for c in getattr(dataset, "classes", [])]
    targets = list(getattr(dataset, "targets", []))
    if not classes or UNLABELED in targets:
        raise DataError(f"'{data.path}' ({split}) has no class labels; classification needs class sub-folders "
                        f"('<root>/{split}/<class>/<image>') or a labelled builtin dataset")
    if data.val_fraction > 0 and not has_split_folders(data.path):
        train_idx, val_idx = holdout_split(targets, data.val_fraction)
        if split == "val":
            log.info("'%s' has no val/ folder: %d images (%.0f%% of each class, seed %d) held out for validation, "
                     "%d for training; add '%s/val' or set data.val_fraction=0 to change this", data.path,
                     len(val_idx), 100 * data.val_fraction, HOLDOUT_SEED, len(train_idx), data.path)
        dataset = Subset(dataset, train_idx if split == "train" else val_idx)
    if limit is not None and limit < len(dataset):  # type: ignore[arg-type]  # torch types no Dataset.__len__
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]  # type: ignore[arg-type]  # torch types no Dataset.__len__
        dataset = Subset(dataset, sorted(order.tolist()))
    return dataset, classes


def skipped_count(*datasets: Dataset) -> int:
    """Distinct files of `datasets` skipped so far by this process: passed over by the folder scan (dangling links,
    unreadable entries) or unreadable when loaded."""
    return len(set().union(*(set(skipped_files(d)) | set(passed_over_files(d)) for d in datasets)))


def eval_transform(data: ClassifyData, img_size: int, in_chans: int) -> Callable:
    """Resize (bicubic) to img_size / crop_pct and centre-crop img_size, normalised as `data` says."""
    return build_eval_transform(img_size, in_chans, data.crop_pct, data.mean, data.std)


def mean_std(data: ClassifyData, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation of `data` (default: ImageNet's for RGB, 0.5 / 0.5 for grey)."""
    mean, std = default_mean_std(in_chans)
    return tuple(data.mean or mean), tuple(data.std or std)


def train_transform(img_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                    scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5, rand_augment: str | None = None,
                    reprob: float = 0.0) -> Callable:
    """timm's ImageNet training pipeline (as ``timm.data.create_transform(is_training=True)``): RandomResizedCrop
    (bicubic), flip, optional RandAugment, normalise, optional random erasing. PIL 'L' and 'RGB' images both work.

    RandAugment's magnitude is capped just below 10 unless the spec sets ``mmax``: at exactly 10 (reached by
    m9 + mstd0.5 noise) timm's PosterizeIncreasing keeps 0 bits, which Pillow >= 10 rejects with a ValueError.
    """
    # timm's data pipeline is slow to import: loaded only by the recipes that train on images
    from timm.data import rand_augment_transform
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation, str_to_pil_interp

    steps: list = [RandomResizedCropAndInterpolation(img_size, scale=tuple(scale), interpolation="bicubic")]
    if hflip > 0:
        steps.append(transforms.RandomHorizontalFlip(p=hflip))
    if rand_augment:
        hparams = {"translate_const": int(img_size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean),
                   "interpolation": str_to_pil_interp("bicubic")}
        if "-mmax" not in rand_augment:
            hparams["magnitude_max"] = 9.99
        steps.append(rand_augment_transform(rand_augment, hparams))
    steps += [MaybeToTensor(), transforms.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))]
    if reprob > 0:
        steps.append(RandomErasing(reprob, mode="pixel", max_count=1, device="cpu"))
    return transforms.Compose(steps)


# ---------------------------------------------------------------------------------------------------- run files
def write_param_groups(path: Path, model: nn.Module, groups: list[dict[str, Any]]) -> Path:
    """``param_groups.json``: every parameter name with its lr_scale and weight_decay (frozen ones: trainable false)."""
    entries: dict[str, dict[str, Any]] = {}
    for i, group in enumerate(groups):
        for name in group["param_names"]:
            entries[name] = {"trainable": True, "lr_scale": group.get("lr_scale", 1.0),
                             "weight_decay": group["weight_decay"], "group": i}
    out = {name: entries.get(name, {"trainable": False}) for name, _ in model.named_parameters()}
    return write_json(path, out, indent=1)


# ---------------------------------------------------------------------------------------------------- training
def resolved_model_section(section: ClassifierSection, config: ClassifierConfig, num_classes: int) -> dict[str, Any]:
    """The model section config.yaml records: the image size and number of classes the built classifier has."""
    h, w = config.image_hw
    return {**to_dict(section), "img_size": h if h == w else [h, w], "num_classes": num_classes}


def classifier_spec(run: Run, *, model: nn.Module, classifier_config: ClassifierConfig, class_names: list[str],
                    train_set: Dataset, train_loader: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                    score: Callable[[nn.Module], EvalResult], groups: list[dict[str, Any]], optimizer: str,
                    optim: dict[str, Any], model_section: dict[str, Any], train_module: nn.Module | None = None,
                    eval_module: nn.Module | None = None, ema: Any = None, protocol: str = "",
                    more_summary: Callable[[TrainResult], dict[str, Any]] | None = None,
                    weights: Mapping[str, Any] | None = None) -> TrainSpec:
    """What fine-tuning and linear probing train: evaluation after every epoch (top-1, top-5 when there are more
    than 5 classes, loss; the EMA weights too when kept), the best top-1 (EMA included) as ``checkpoint-best.pth``,
    ``param_groups.json``, the summary and ``curves.png``; `more_summary` adds the recipe's own entries (exports);
    `weights` (the provenance of released weights the encoder came from) goes into config.yaml's run record."""
    many = len(class_names) > 5  # top-5 of 5 classes or fewer is always 100%
    live = eval_module if eval_module is not None else model

    def evaluate(epoch: int) -> dict[str, float]:
        result = score(live)
        record = {"top1": result.top1, "val_loss": result.loss, **({"top5": result.top5} if many else {})}
        if ema is not None:
            ema_result = score(ema.module)
            record.update(ema_top1=ema_result.top1, **({"ema_top5": ema_result.top5} if many else {}))
        return record

    def best_of(record: Mapping[str, Any]) -> tuple[float | None, dict]:
        top1, ema_top1 = record.get("top1"), record.get("ema_top1")
        if top1 is None:
            return None, {}
        if ema_top1 is not None and ema_top1 > top1:
            return float(ema_top1), {"ema": True}
        return float(top1), {"ema": False}

    def on_start(engine: Engine) -> None:
        if not run.dist.is_main:
            return
        write_param_groups(run.out / "param_groups.json", model, groups)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("%s: %d classes, %s pooling, %.2f M parameters (%.2f M trainable); %d training images; effective "
                 "batch %d; peak lr %.3g (%s); precision %s on %s", protocol or "classifier", len(class_names),
                 classifier_config.global_pool, sum(p.numel() for p in model.parameters()) / 1e6, trainable / 1e6,
                 len(train_set), engine.effective_batch, engine.peak_lr, optimizer, run.precision, run.device)  # type: ignore[arg-type]  # torch types no Dataset.__len__

    def summarize(result: TrainResult) -> dict[str, Any]:
        last = result.history[-1] if result.history else {}
        summary: dict[str, Any] = {"output_dir": str(run.out), "protocol": protocol,
                                   "best_top1": result.best["value"], "best_epoch": result.best["epoch"],
                                   "last_top1": last.get("top1"), **({"last_top5": last.get("top5")} if many else {}),
                                   "train_seconds": result.train_seconds, "updates": result.updates,
                                   "best_checkpoint": str(result.best_path),
                                   "skipped_files": skipped_count(train_set)}
        if run.dist.is_main:
            summary.update(draw_curves(run.out, ("loss", "lr", "top1")))
        if more_summary is not None:
            summary.update(more_summary(result))
        return summary

    return TrainSpec(model=model, train_set=train_set, loader=train_loader, loss_fn=loss_fn, param_groups=groups,
                     optimizer=optimizer, optim=optim, best=Best("top1", "max", best_of), summarize=summarize,
                     meta={"classifier_config": classifier_config.to_dict(), "class_names": list(class_names)},
                     resolved_sections={"model": model_section}, evaluate=evaluate,
                     extra_state={"model_ema": ema.module} if ema is not None else {},
                     # the EMA follows the applied updates only (a skipped update leaves it alone)
                     on_update=(lambda: ema.update(model)) if ema is not None else None,
                     train_module=train_module, on_start=on_start, run_info=weights_record(weights))

