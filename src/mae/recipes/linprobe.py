"""Linear probing: ``run(LinprobeConfig) -> summary``; the CLI's ``mae linprobe`` only parses and calls this.

Paper Table 10: a frozen encoder (kept in eval mode), its class-token feature (or the mean of its patch tokens,
``model.global_pool=avg``), ``BatchNorm1d(affine=False, eps=1e-6)`` + Linear (init std 0.01), LARS (base lr 0.1,
no weight decay, momentum 0.9), per-iteration warm-up + cosine, random-resized crop + flip (the release's TF-style
crop: one draw, clamped to the image, no retry loop). With ``aug.augment=none``
the features are extracted once (encoder in eval mode over the train and val sets, kept in memory) and the head
trains on them: the same probe, orders of magnitude faster.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from mae.data import build_loader
from mae.data.transforms import build_probe_transform
from mae.errors import ConfigError
from mae.eval.classification import EvalResult, eval_loader, evaluate, extract_features, score_logits
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
)
from mae.recipes.common import run_distributed
from mae.train.distributed import DistInfo
from mae.train.optim import param_groups
from mae.train.run import Run, TrainFields
from mae.train.spec import TrainSpec, run_training

log = logging.getLogger("mae")

CLI_FLAGS = {"--data": "data.path", "--output-dir": "output_dir", "--checkpoint": "checkpoint", "--resume": "resume",
             "--epochs": "epochs", "--precision": "precision", "--device": "device"}
PROBE_AUGMENTATIONS = ("rrc", "none")


@dataclass
class LinprobeAugment:
    augment: str = field(default="rrc", metadata={
        "help": "rrc (the release's single-draw random-resized crop + flip) | none (cached features: fast)"})
    scale: tuple[float, float] = field(default=(0.08, 1.0), metadata={"help": "RandomResizedCrop area range"})
    hflip: float = field(default=0.5, metadata={"help": "horizontal flip probability (0 for digits and text)"})

    RANGES: ClassVar[dict[str, str]] = {"scale": "(0, 1]", "hflip": "[0, 1]"}

    def validate(self) -> None:
        if self.augment not in PROBE_AUGMENTATIONS:
            raise ConfigError(f"aug.augment '{self.augment}' is not one of {', '.join(PROBE_AUGMENTATIONS)}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ConfigError(f"aug.scale must be (min, max) with 0 < min <= max <= 1, got {list(self.scale)}")


@dataclass
class LinprobeOptim:
    name: str = field(default="lars", metadata={"help": "lars (paper, batch 16384) | sgd (works similarly at 4096)"})
    base_lr: float = field(default=0.1, metadata={"help": "lr = base_lr x effective batch / 256"})
    lr: float | None = field(default=None, metadata={"help": "absolute peak lr (overrides base_lr)"})
    min_lr: float = 0.0
    weight_decay: float = field(default=0.0, metadata={"help": "paper: 0"})
    momentum: float = 0.9
    warmup_epochs: float = field(default=10.0, metadata={"help": "linear warm-up (per iteration) from 0"})

    RANGES: ClassVar[dict[str, str]] = {"base_lr": "> 0", "lr": "> 0", "min_lr": ">= 0", "weight_decay": ">= 0",
                                        "momentum": "[0, 1)", "warmup_epochs": ">= 0"}

    def validate(self) -> None:
        if self.name not in ("lars", "sgd"):
            raise ConfigError(f"optim.name '{self.name}' is not one of lars, sgd")


def _probe_model() -> ClassifierSection:
    return ClassifierSection(global_pool="token", drop_path=0.0)


@dataclass
class LinprobeConfig(TrainFields):
    """Everything a linear-probing run needs; saved (resolved) as config.yaml next to the run."""

    output_dir: str = field(default="runs/linprobe", metadata={"help": "checkpoints, logs and metrics go here"})
    epochs: int = 90
    batch_size: int = field(default=256, metadata={"help": "images (or cached features) per device per step"})
    save_every: int = field(default=1, metadata={"help": "write checkpoint-last.pth every N epochs (best: always)"})
    keep_last: int = field(default=0, metadata={"help": "numbered epoch checkpoints kept besides last/best"})
    model: ClassifierSection = field(default_factory=_probe_model)
    data: ClassifyData = field(default_factory=ClassifyData)
    aug: LinprobeAugment = field(default_factory=LinprobeAugment)
    optim: LinprobeOptim = field(default_factory=LinprobeOptim)
    checkpoint: str | None = field(default=None, metadata={
        "help": "pre-trained weights: a run directory, any checkpoint the library reads (mae, reference, HF, timm) "
                "or released weights by name (official:mae_pretrain_vit_base, hf:<org/repo>, timm:<tag>)"})
    init: str = field(default="pretrained", metadata={"help": "pretrained | random (a random-encoder baseline)"})
    eval_batch_size: int | None = field(default=None, metadata={"help": "default: batch_size"})

    RESUME_FREE: ClassVar[tuple[str, ...]] = (*TrainFields.RESUME_FREE, "eval_batch_size")

    def validate(self) -> None:
        super().validate()
        check_init(self.init, self.checkpoint, self.model.name)
        if self.batch_size < 2:
            raise ConfigError("the probe's BatchNorm needs batch_size >= 2")


def build_probe_train_transform(cfg: LinprobeConfig, img_size: int, in_chans: int, mean, std):
    """The probe's training augmentation (aug.augment=rrc): the release's TF-style random-resized crop, drawn once
    with no retry loop (`mae.data.transforms.SingleDrawResizedCrop`), and the flip."""
    return build_probe_transform(img_size, in_chans, scale=tuple(cfg.aug.scale), hflip=cfg.aug.hflip, mean=mean,
                                 std=std)


def build_probe(source: EncoderSource, cfg_model: ClassifierSection, num_classes: int
                ) -> tuple[torch.nn.Module, ClassifierConfig, PartiallyFrozen]:
    """The probe: the encoder, the paper's pooling (class token after the pre-trained norm, or the mean of the
    normed patch tokens for global_pool=avg) and a BatchNorm + Linear head (std 0.01); returns the classifier, its
    config and the `PartiallyFrozen` wrapper in which only the head trains (the encoder stays in eval mode)."""
    model, ccfg = build_from_source(
        source, head_init_std=0.01, img_size=cfg_model.img_size, num_classes=num_classes,
        global_pool=cfg_model.global_pool, fc_norm=False, drop_path_rate=0.0, head="bn_linear")
    return model, ccfg, PartiallyFrozen(model, trainable_prefixes(ccfg.depth, head_only=True))


class FeatureBatches:
    """Shuffled mini-batches of cached features, a pure function of (seed, epoch); `steps` batches per epoch (the
    same on every rank, so DDP ranks stay in step)."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int, steps: int, seed: int = 0):
        self.feats, self.labels, self.batch_size, self.steps, self.seed, self.epoch, self.skip = (
            feats, labels, batch_size, steps, seed, 0, 0)
        self.feature_seconds = 0.0  # time it took to extract the features

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The batches of `epoch`, without its first `skip` (done before a resume)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.steps  # the whole epoch, whatever `skip`

    def __iter__(self):
        order = torch.randperm(len(self.feats), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        order = order.to(self.feats.device)
        for i in range(self.skip, self.steps):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.feats[idx], self.labels[idx]


def run(cfg: LinprobeConfig) -> dict:
    """Train a linear probe on a frozen encoder; returns a summary with the best top-1."""
    return run_distributed(cfg.device, lambda dist: run_training(cfg, dist, "classify",
                                                                 lambda run: build_spec(cfg, run)))


def build_spec(cfg: LinprobeConfig, run: Run) -> TrainSpec:
    """What a linear-probing run trains (`classify_common.classifier_spec`): the head on images, or on features
    extracted once (aug.augment=none)."""
    device, dist, precision = run.device, run.dist, run.precision
    source = load_encoder_source(cfg.init, cfg.checkpoint, cfg.model.name)
    in_chans = source.config.in_chans
    side = square_side(ClassifierConfig.from_mae(source.config, img_size=cfg.model.img_size, num_classes=0))
    mean, std = mean_std(cfg.data, in_chans)
    cached = cfg.aug.augment == "none"
    tf_eval = eval_transform(cfg.data, side, in_chans)
    # cached features come from the evaluation transform: no augmentation
    tf_train = tf_eval if cached else build_probe_train_transform(cfg, side, in_chans, mean, std)
    train_set, classes = labelled_dataset(cfg.data, "train", tf_train, in_chans, cfg.data.train_limit, cfg.seed)
    num_classes = cfg.model.num_classes or len(classes)
    model, ccfg, wrapper = build_probe(source, cfg.model, num_classes)
    val_set, val_classes = labelled_dataset(cfg.data, "val", tf_eval, in_chans, cfg.data.val_limit, cfg.seed)
    if val_classes != classes:
        raise ConfigError(f"the train and val splits of '{cfg.data.path}' have different classes "
                          f"({len(classes)} vs {len(val_classes)}); give both splits the same class folders")
    model.to(device)
    groups = param_groups(model, cfg.optim.weight_decay)
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    val_loader = eval_loader(val_set, eval_bs, cfg.data.num_workers, dist)
    if cached:
        train_loader, score, train_module = _cached_features(cfg, model, wrapper, train_set, val_loader, dist,
                                                             device, precision, eval_bs)
    else:
        train_loader = build_loader(train_set, cfg.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
                                    seed=cfg.seed, drop_last=True, distributed=dist.world_size > 1)
        train_module = wrapper

        def score(m: torch.nn.Module) -> EvalResult:
            return evaluate(m, val_loader, device, precision)

    def loss_fn(m: torch.nn.Module, batch) -> torch.Tensor:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        return F.cross_entropy(m(x), y)

    o = cfg.optim
    protocol = "linear probe" + (" (cached features)" if cached else "")
    return classifier_spec(
        run, model=model, classifier_config=ccfg, class_names=classes, train_set=train_set,
        train_loader=train_loader, loss_fn=loss_fn, score=score, groups=groups, optimizer=o.name,
        optim={"base_lr": o.base_lr, "lr": o.lr, "warmup_epochs": o.warmup_epochs, "min_lr": o.min_lr,
               "weight_decay": o.weight_decay, "momentum": o.momentum},
        model_section=resolved_model_section(cfg.model, ccfg, num_classes), train_module=train_module,
        eval_module=wrapper, protocol=protocol,
        more_summary=(lambda result: {"feature_seconds": train_loader.feature_seconds}) if cached else None,
        weights=source.provenance)


def _cached_features(cfg: LinprobeConfig, model, wrapper, train_set, val_loader, dist: DistInfo,
                     device: torch.device, precision: str, eval_bs: int):
    """Extract the frozen features once (this rank's share of train and val); the head then trains on them."""
    t0 = time.perf_counter()
    wrapper.eval()

    def features(images: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(images), pre_logits=True)

    train_feats, train_labels = extract_features(features, eval_loader(train_set, eval_bs, cfg.data.num_workers,
                                                                       dist), device, precision)
    val_feats, val_labels = extract_features(features, val_loader, device, precision)
    steps = len(train_feats) // cfg.batch_size
    if dist.world_size > 1:  # every rank takes the same number of steps
        t = torch.tensor([steps], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        steps = int(t.item())
    batches = FeatureBatches(train_feats, train_labels, cfg.batch_size, steps, cfg.seed + dist.rank)
    batches.feature_seconds = time.perf_counter() - t0
    log.info("cached %d train and %d val features of width %d in %.1f s", len(train_feats), len(val_feats),
             train_feats.shape[1] if train_feats.dim() == 2 else 0, batches.feature_seconds)

    head = model.head

    @torch.no_grad()
    def evaluate_fn(_: torch.nn.Module) -> EvalResult:
        was = head.training
        head.eval()
        try:
            chunks = ((head(val_feats[i:i + eval_bs]), val_labels[i:i + eval_bs])
                      for i in range(0, len(val_feats), eval_bs))
            return score_logits(chunks, device)
        finally:
            head.train(was)

    return batches, evaluate_fn, head
