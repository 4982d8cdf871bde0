"""Fine-tuning: ``run(FinetuneConfig) -> summary``; the CLI's ``mae finetune`` only parses and calls this.

One recipe, three protocols of the paper:

- end-to-end fine-tuning (Table 9): AdamW, layer-wise lr decay (scale ``decay ** (depth + 1 - layer_id)``), drop
  path, RandAugment, mixup / cutmix, label smoothing, random erasing, per-iteration warm-up + cosine, global
  average pooling + fc_norm, head init std 2e-5; top-1 / top-5 every epoch, best and last checkpoints;
- partial fine-tuning (section 4.3): ``trainable_blocks=k`` (k >= 1) trains the last k blocks (+ norms + head),
  ``mlp_only=true`` the last block's MLP sub-block; frozen parts stay in eval mode. Figure 9's k = 0 is the linear
  probe protocol (class token, BatchNorm, LARS, no mixup), which is `mae linprobe`: ``trainable_blocks=0`` is
  refused with a pointer to it;
- supervised training from scratch (Table 11): ``init=scratch model.name=<architecture>``, weight decay 0.3, EMA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mae.data import build_loader
from mae.errors import ConfigError
from mae.eval.classification import eval_loader, evaluate
from mae.interop.classifier_export import save_hf_classifier, save_timm_classifier
from mae.interop.classifier_io import load_classifier
from mae.interop.hub_metadata import run_facts, weights_licence
from mae.interop.loading import EncoderSource
from mae.models.classifier import ClassifierConfig, PartiallyFrozen, trainable_prefixes
from mae.recipes.classify_common import (
    ClassifierSection,
    ClassifyData,
    build_from_source,
    check_init,
    classifier_spec,
    eval_transform,
    labelled_dataset,
    load_encoder_source,
    mean_std,
    resolved_model_section,
    square_side,
    train_transform,
)
from mae.recipes.common import run_distributed
from mae.train.optim import param_groups
from mae.train.run import Run, TrainFields
from mae.train.spec import TrainSpec, run_training
from mae.train.trainer import TrainResult

log = logging.getLogger("mae")

CLI_FLAGS = {"--data": "data.path", "--output-dir": "output_dir", "--checkpoint": "checkpoint", "--resume": "resume",
             "--epochs": "epochs", "--precision": "precision", "--device": "device"}
EXPORTS = ("timm", "hf")


@dataclass
class FinetuneAugment:
    """Training augmentation and label regularisation (paper Table 9)."""

    rand_augment: str | None = field(default="rand-m9-mstd0.5-inc1", metadata={
        "help": "timm RandAugment spec (paper: RandAug(9, 0.5)); null turns it off"})

    def __post_init__(self) -> None:
        if self.rand_augment is not None and not self.rand_augment.startswith("rand"):
            raise ConfigError(f"aug.rand_augment '{self.rand_augment}' is not a RandAugment spec; use e.g. "
                              f"'rand-m9-mstd0.5-inc1' or null")
    scale: tuple[float, float] = field(default=(0.08, 1.0), metadata={"help": "RandomResizedCrop area range"})
    hflip: float = field(default=0.5, metadata={"help": "horizontal flip probability (0 for digits and text)"})
    reprob: float = field(default=0.25, metadata={"help": "random erasing probability"})
    mixup: float = field(default=0.8, metadata={"help": "mixup alpha (0: off)"})
    cutmix: float = field(default=1.0, metadata={"help": "cutmix alpha (0: off)"})
    mixup_prob: float = field(default=1.0, metadata={"help": "probability of mixing a batch"})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "probability of cutmix instead of mixup"})
    smoothing: float = field(default=0.1, metadata={"help": "label smoothing"})

    RANGES: ClassVar[dict[str, str]] = {"scale": "(0, 1]", "hflip": "[0, 1]", "reprob": "[0, 1]", "mixup": ">= 0",
                                        "cutmix": ">= 0", "mixup_prob": "[0, 1]", "mixup_switch_prob": "[0, 1]",
                                        "smoothing": "[0, 1)"}

    def validate(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"aug.scale must be (min, max) with 0 < min <= max <= 1, got {list(self.scale)}")

    @property
    def mixes(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass
class FinetuneOptim:
    base_lr: float = field(default=1e-3, metadata={"help": "lr = base_lr x effective batch / 256 (paper: 1e-3)"})
    lr: float | None = field(default=None, metadata={"help": "absolute peak lr (overrides base_lr)"})
    min_lr: float = field(default=1e-6, metadata={"help": "lr at the end of the cosine"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on biases, norms, tokens)"})
    layer_decay: float | None = field(default=0.75, metadata={
        "help": "layer-wise lr decay: scale = decay ** (depth + 1 - layer_id); null turns it off"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    warmup_epochs: float = field(default=5.0, metadata={"help": "linear warm-up (per iteration) from 0"})
    clip_grad: float | None = field(default=None, metadata={"help": "max gradient norm (paper: none)"})

    RANGES: ClassVar[dict[str, str]] = {"base_lr": "> 0", "lr": "> 0", "min_lr": ">= 0", "weight_decay": ">= 0",
                                        "layer_decay": "(0, 1]", "betas": "[0, 1)", "warmup_epochs": ">= 0",
                                        "clip_grad": "> 0"}


@dataclass
class FinetuneConfig(TrainFields):
    """Everything a fine-tuning run needs; saved (resolved) as config.yaml next to the run."""

    output_dir: str = field(default="runs/finetune", metadata={"help": "checkpoints, logs and metrics go here"})
    epochs: int = 100
    save_every: int = field(default=1, metadata={"help": "write checkpoint-last.pth every N epochs (best: always)"})
    keep_last: int = field(default=0, metadata={"help": "numbered epoch checkpoints kept besides last/best"})
    model: ClassifierSection = field(default_factory=ClassifierSection)
    data: ClassifyData = field(default_factory=ClassifyData)
    aug: FinetuneAugment = field(default_factory=FinetuneAugment)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    checkpoint: str | None = field(default=None, metadata={
        "help": "pre-trained weights: a run directory, any checkpoint the library reads (mae, reference, HF, timm) "
                "or released weights by name (official:mae_pretrain_vit_base, hf:<org/repo>, timm:<tag>)"})
    init: str = field(default="pretrained", metadata={"help": "pretrained | scratch (random init, Table 11)"})
    trainable_blocks: int | None = field(default=None, metadata={
        "help": "partial fine-tuning: train only the last k >= 1 blocks (k = 0 is `mae linprobe`); null = all"})
    mlp_only: bool = field(default=False, metadata={"help": "partial fine-tuning: only the last block's MLP"})
    ema: bool = field(default=False, metadata={"help": "keep an EMA of the weights and evaluate it too"})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay per update (paper Table 11: 0.9999)"})
    eval_batch_size: int | None = field(default=None, metadata={"help": "default: 2 x batch_size"})
    export: list[str] = field(default_factory=list, metadata={
        "help": "export the best model at the end: timm (model_timm.safetensors) and/or hf (class-token pooling)"})

    RESUME_FREE: ClassVar[tuple[str, ...]] = (*TrainFields.RESUME_FREE, "eval_batch_size", "export")
    RANGES: ClassVar[dict[str, str]] = {"ema_decay": "[0, 1)"}

    def validate(self) -> None:
        super().validate()
        check_init(self.init, self.checkpoint, self.model.name)
        if self.trainable_blocks == 0:
            raise ConfigError("trainable_blocks=0 is the linear probe (paper Figure 9: class token, BatchNorm, LARS, "
                              "no mixup); run `mae linprobe` with the same checkpoint instead")
        if self.trainable_blocks is not None and self.trainable_blocks < 0:
            raise ConfigError(f"trainable_blocks must be >= 1 (or null for all), got {self.trainable_blocks}")
        if self.mlp_only and self.trainable_blocks is not None:
            raise ConfigError("set either trainable_blocks or mlp_only=true, not both")
        if self.aug.mixes and self.batch_size % 2:
            raise ConfigError(f"mixup / cutmix mix each batch with its flipped self and need an even batch_size, "
                              f"got {self.batch_size}")
        if self.ema and self.distributed.strategy == "fsdp":
            raise ConfigError("ema=true keeps a whole copy of the model on every process, which distributed.strategy="
                              "fsdp exists to avoid; set ema=false or use distributed.strategy=ddp")
        unknown = sorted(set(self.export) - set(EXPORTS))
        if unknown:
            raise ConfigError(f"export '{unknown[0]}' is not one of {', '.join(EXPORTS)}")
        if "hf" in self.export and self.model.global_pool != "token":
            raise ConfigError("export=[hf] needs model.global_pool=token: transformers' ViTForImageClassification has "
                              "no mean-pool + fc_norm equivalent")


def build_train_transform(cfg: FinetuneConfig, img_size: int, mean, std):
    """The fine-tuning augmentation of `cfg` (see `classify_common.train_transform`)."""
    return train_transform(img_size, mean, std, scale=tuple(cfg.aug.scale), hflip=cfg.aug.hflip,  # type: ignore[arg-type]  # two floats (validated config)
                           rand_augment=cfg.aug.rand_augment, reprob=cfg.aug.reprob)


def build_finetune_model(source: EncoderSource, cfg: FinetuneConfig, num_classes: int
                         ) -> tuple[torch.nn.Module, ClassifierConfig, PartiallyFrozen]:
    """The classifier of a fine-tuning run with the encoder loaded (head init std 2e-5), and its `PartiallyFrozen`
    wrapper (the module to train)."""
    model, ccfg = build_from_source(
        source, head_init_std=2e-5, img_size=cfg.model.img_size, num_classes=num_classes,
        global_pool=cfg.model.global_pool, drop_path_rate=cfg.model.drop_path, head="linear")
    wrapper = PartiallyFrozen(model, trainable_prefixes(ccfg.depth, cfg.trainable_blocks, cfg.mlp_only))
    return model, ccfg, wrapper


def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune (or train from scratch); returns a summary with the best top-1."""
    return run_distributed(cfg.device, lambda dist: run_training(cfg, dist, "classify",
                                                                 lambda run: build_spec(cfg, run)))


def build_spec(cfg: FinetuneConfig, run: Run) -> TrainSpec:
    """What a fine-tuning run trains (`classify_common.classifier_spec`), plus the exports of its best model."""
    device, dist = run.device, run.dist
    source = load_encoder_source(cfg.init, cfg.checkpoint, cfg.model.name)
    in_chans = source.config.in_chans
    # data first: the number of classes sizes the head
    side = square_side(ClassifierConfig.from_mae(source.config, img_size=cfg.model.img_size, num_classes=0))
    mean, std = mean_std(cfg.data, in_chans)
    train_set, classes = labelled_dataset(cfg.data, "train", build_train_transform(cfg, side, mean, std), in_chans,
                                          cfg.data.train_limit, cfg.seed)
    num_classes = cfg.model.num_classes or len(classes)
    model, ccfg, wrapper = build_finetune_model(source, cfg, num_classes)
    val_set, val_classes = labelled_dataset(cfg.data, "val", eval_transform(cfg.data, side, in_chans), in_chans,
                                            cfg.data.val_limit, cfg.seed)
    if val_classes != classes:
        raise ConfigError(f"the train and val splits of '{cfg.data.path}' have different classes "
                          f"({len(classes)} vs {len(val_classes)}); give both splits the same class folders")
    if num_classes < len(classes):
        raise ConfigError(f"model.num_classes={num_classes} is fewer than the dataset's {len(classes)} classes")
    model.to(device)
    groups = param_groups(model, cfg.optim.weight_decay, layer_decay=cfg.optim.layer_decay, num_layers=ccfg.depth)
    loader = build_loader(train_set, cfg.batch_size, shuffle=True, num_workers=cfg.data.num_workers, seed=cfg.seed,
                          drop_last=True, distributed=dist.world_size > 1)
    val_loader = eval_loader(val_set, cfg.eval_batch_size or 2 * cfg.batch_size, cfg.data.num_workers, dist)
    ema = None
    if cfg.ema:
        from timm.utils import ModelEmaV3  # timm is slow to import: `mae finetune --help` does without it

        ema = ModelEmaV3(model, decay=cfg.ema_decay)
    mixup_fn, criterion = _loss(cfg, num_classes)

    def loss_fn(m: torch.nn.Module, batch) -> torch.Tensor:
        images = batch[0].to(device, non_blocking=True)
        target = batch[1].to(device, non_blocking=True)
        if mixup_fn is not None:
            images, target = mixup_fn(images, target)
        return criterion(m(images), target)

    def more_summary(result: TrainResult) -> dict:
        summary: dict[str, Any] = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if dist.is_main and cfg.export:
            summary.update(_export(cfg, run.out, classes, result.best_path))
        return summary

    o = cfg.optim
    return classifier_spec(
        run, model=model, classifier_config=ccfg, class_names=classes, train_set=train_set, train_loader=loader,
        loss_fn=loss_fn, score=lambda m: evaluate(m, val_loader, device, run.precision), groups=groups,
        optimizer="adamw", optim={"base_lr": o.base_lr, "lr": o.lr, "warmup_epochs": o.warmup_epochs,
                                  "min_lr": o.min_lr, "betas": tuple(o.betas), "weight_decay": o.weight_decay,
                                  "clip_grad": o.clip_grad},
        model_section=resolved_model_section(cfg.model, ccfg, num_classes), train_module=wrapper,
        eval_module=wrapper, ema=ema, protocol=_protocol(cfg), more_summary=more_summary,
        weights=source.provenance)


def _protocol(cfg: FinetuneConfig) -> str:
    if cfg.init != "pretrained":
        return "scratch"
    if cfg.mlp_only:
        return "partial (last block's MLP)"
    if cfg.trainable_blocks is not None:
        return f"partial ({cfg.trainable_blocks} blocks)"
    return "end-to-end"


def _loss(cfg: FinetuneConfig, num_classes: int):
    """timm's Mixup + SoftTargetCrossEntropy (label smoothing inside Mixup), else label-smoothed cross-entropy."""
    # timm is slow to import: `mae finetune --help` does without it
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.aug.mixes:
        mixup = Mixup(mixup_alpha=cfg.aug.mixup, cutmix_alpha=cfg.aug.cutmix, prob=cfg.aug.mixup_prob,
                      switch_prob=cfg.aug.mixup_switch_prob, mode="batch", label_smoothing=cfg.aug.smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if cfg.aug.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.aug.smoothing)
    return None, torch.nn.CrossEntropyLoss()


def _export(cfg: FinetuneConfig, out, classes: list[str], best) -> dict:
    model, ccfg, names = load_classifier(best)
    paths = {}
    prep: dict[str, Any] = {"mean": cfg.data.mean, "std": cfg.data.std, "crop_pct": cfg.data.crop_pct}
    # both exports carry what the run recorded: its facts, the released weights it started from and their licence
    facts: dict[str, Any] = {"training": run_facts(out), "license": weights_licence(out) or "unknown"}
    if "timm" in cfg.export:
        paths["timm_export"] = str(save_timm_classifier(model, out / "model_timm.safetensors", ccfg,
                                                        class_names=names or classes, **facts, **prep))
    if "hf" in cfg.export:
        paths["hf_export"] = str(save_hf_classifier(model, out / "hf", ccfg, class_names=names or classes, **facts,
                                                    **prep))
    return paths
