"""What the classification recipes (finetune, linprobe, knn, evaluate) share: config sections, where the encoder
comes from, labelled datasets, exact distributed evaluation (top-1 / top-5), feature extraction, classifier
checkpoints, and `train_classifier`, their common part around the shared run layer (`mae.train.trainer`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from mae.data import (
    UNLABELED,
    build_dataset,
    build_eval_transform,
    default_mean_std,
    ignore_stop_signals,
    passed_over_files,
    skipped_files,
)
from mae.errors import CheckpointError, ConfigError, DataError
from mae.files import write_json
from mae.interop.keys import short_list
from mae.interop.loading import EncoderSource, check_model_name, read_encoder
from mae.models.classifier import GLOBAL_POOLS, ClassifierConfig, build_classifier, load_encoder_into
from mae.models.pos_embed import resize_pos_embed
from mae.threads import default_workers
from mae.train.checkpoint import safe_load
from mae.train.distributed import DistInfo
from mae.train.precision import autocast_context
from mae.train.run import Run
from mae.train.run_dir import resolve_run

log = logging.getLogger("mae")

CLASSIFIER_FORMAT = "mae-classifier"
INITS = ("pretrained", "scratch", "random")
"""'pretrained' loads `checkpoint`; 'scratch' and 'random' (synonyms) start from the MAE's own initialisation."""


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
            from mae.models import model_config

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
    if init not in INITS:
        raise ConfigError(f"init '{init}' is not one of {', '.join(INITS)}")
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
        from mae.models import MaskedAutoencoderViT, model_config

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
    from mae.data import HOLDOUT_SEED, has_split_folders, holdout_split

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
    from timm.data import rand_augment_transform
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation, str_to_pil_interp
    from torchvision import transforms

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


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in order: over all ranks every index exactly once.

    Unlike DistributedSampler it pads nothing, so summed counts are exact even when the size does not divide.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, dist: DistInfo | None = None) -> DataLoader:
    """In-order loader over this rank's share of `dataset` (every image counted once over all ranks)."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world),  # type: ignore[arg-type]  # torch types no Dataset.__len__
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals)


# ---------------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalResult:
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, classes))
    loss: float  # mean cross-entropy
    count: int  # images evaluated over all ranks
    confusion: torch.Tensor | None = None  # [true class, predicted class] counts

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}top1": self.top1, f"{prefix}top5": self.top5, f"{prefix}loss": self.loss}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t)
    return t


def topk_counts(logits: torch.Tensor, target: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Numbers of samples whose true class is the top-1 / among the top-k predictions."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices  # [N, k]
    hits = top == target[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


def score_logits(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 num_classes: int | None = None) -> EvalResult:
    """Top-1 / top-5 / loss over (logits, target) batches of this rank, summed over all ranks; with `num_classes`
    also the confusion matrix."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1 hits, top5 hits, loss sum, count
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device) if num_classes else None
    for batch_logits, batch_target in batches:
        logits, target = batch_logits.float(), batch_target.to(batch_logits.device)
        c1, c5 = topk_counts(logits, target)
        sums += torch.stack([c1.double(), c5.double(), F.cross_entropy(logits, target, reduction="sum").double(),
                             torch.tensor(float(len(target)), dtype=torch.float64, device=device)])
        if cm is not None:
            cm.index_put_((target, logits.argmax(1)), torch.ones_like(target), accumulate=True)
    all_reduce_sum(sums)
    if cm is not None:
        all_reduce_sum(cm)
    n = int(sums[3].item())
    if n == 0:
        raise DataError("no validation images to evaluate")
    return EvalResult(top1=100.0 * sums[0].item() / n, top5=100.0 * sums[1].item() / n, loss=sums[2].item() / n,
                      count=n, confusion=cm.cpu() if cm is not None else None)


def _batches_short(model: nn.Module, done: int, device: torch.device) -> int:
    """How many batches fewer than the busiest rank this rank ran (0 unless the model is FSDP-sharded)."""
    import sys

    if "torch.distributed.fsdp" not in sys.modules or not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return 0
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return 0
    most = torch.tensor([done], device=device)
    tdist.all_reduce(most, op=tdist.ReduceOp.MAX)
    return int(most) - done


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32",
             class_index: torch.Tensor | None = None, confusion_classes: int | None = None) -> EvalResult:
    """Top-1 / top-5 of `model` on this rank's share of `loader`, exact over all ranks. `class_index` restricts the
    logits to the model classes of a dataset's classes (dataset class i = model class ``class_index[i]``);
    `confusion_classes` adds the confusion matrix of that many (dataset) classes."""
    was_training = model.training
    model.eval()
    index = class_index.to(device) if class_index is not None else None

    def batches():
        # A sharded (FSDP) model's forward is a collective: a rank with fewer batches than the busiest one runs (and
        # ignores) as many forwards more, after its own (agreed before any forward).
        short, images = _batches_short(model, len(loader), device), None
        for images, target in loader:
            with autocast_context(precision, device):
                logits = model(images.to(device, non_blocking=True))
            logits = logits.float()
            yield (logits[:, index] if index is not None else logits), target.to(device)
        for _ in range(short):
            if images is None:
                raise DataError("a process got no validation images under distributed.strategy=fsdp; use fewer "
                                "processes or more validation images")
            with autocast_context(precision, device):
                model(images[:1].to(device))

    try:
        return score_logits(batches(), device, confusion_classes)
    finally:
        model.train(was_training)


@torch.no_grad()
def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device: torch.device,
                     precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(images)`` over this rank's share of `loader`: (features float32 [N, D], labels [N]) on `device`."""
    feats, labels = [], []
    for images, target in loader:
        with autocast_context(precision, device):
            out = fn(images.to(device, non_blocking=True))
        feats.append(out.float())
        labels.append(target.to(device))
    if not feats:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(feats), torch.cat(labels)


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


def classifier_state(model: nn.Module, classifier_config: ClassifierConfig, class_names: list[str],
                     **extra: Any) -> dict[str, Any]:
    """The dict a classifier checkpoint holds (weights-only loadable): weights, architecture, class names."""
    return {"format": CLASSIFIER_FORMAT, "model": model.state_dict(), "classifier_config": classifier_config.to_dict(),
            "class_names": list(class_names), **extra}


def load_classifier(path: str | Path, img_size: int | tuple[int, int] | None = None, use_ema: bool | None = None,
                    model_name: str | None = None, strict_name: bool = False
                    ) -> tuple[nn.Module, ClassifierConfig, list[str] | None]:
    """A classifier from a finetune / linprobe run directory (`resolve_run`: its best checkpoint once finished, else
    its newest), one of their checkpoints, an
    exported timm file (with its ``.json``), a `ViTForImageClassification` directory, or a timm / reference
    fine-tuned state_dict (``fc_norm`` + ``head``). ``img_size`` rebuilds it at another resolution (the position
    table is interpolated, bicubic). ``use_ema`` None takes the EMA weights of a run checkpoint when they were the
    best. ``model_name`` picks the architecture of files that store none; one that contradicts a stored architecture
    is a warning (`mae.interop.loading.check_model_name`), or an error with ``strict_name``. Returns (model in eval
    mode, its config, class names or None)."""
    path = resolve_run(path)
    names: list[str] | None = None
    config: ClassifierConfig | None
    if path.is_dir() and (path / "config.json").is_file():
        from mae.interop.classifier_export import load_hf_classifier

        sd, config, names = load_hf_classifier(path)
    else:
        config = None
        if path.suffix == ".safetensors":
            from mae.interop.native import read_safetensors

            sd, _ = read_safetensors(path)
            sidecar = path.with_suffix(".json")
            if sidecar.is_file():
                kwargs = json.loads(sidecar.read_text())
                config = ClassifierConfig(
                    img_size=kwargs["img_size"], patch_size=kwargs["patch_size"], in_chans=kwargs["in_chans"],
                    embed_dim=kwargs["embed_dim"], depth=kwargs["depth"], num_heads=kwargs["num_heads"],
                    mlp_ratio=kwargs["mlp_ratio"], norm_eps=kwargs.get("norm_eps", 1e-6),
                    num_classes=kwargs["num_classes"], global_pool=kwargs["global_pool"], fc_norm=kwargs["fc_norm"])
        else:
            state = safe_load(path)
            if state.get("format") == CLASSIFIER_FORMAT:
                config = ClassifierConfig.from_dict(state["classifier_config"])
                names = state.get("class_names")
                if use_ema is None:  # the best checkpoint's own record says whether its EMA weights were the best
                    best = (state.get("train_state") or {}).get("best") or {}
                    use_ema = bool(best.get("ema", state.get("best_is_ema")))
                key = "model_ema" if use_ema else "model"
                if state.get(key) is None:
                    raise CheckpointError(f"'{path}' holds no EMA weights (the run had ema=false); use use_ema=false")
                sd = state[key]
            else:
                sd = state.get("model", state.get("state_dict", state))
                sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        if config is None:
            config = _infer_classifier_config(sd, path, model_name)
            model_name = None  # it chose the architecture: nothing to contradict
    check_model_name(config, model_name, f"'{path}'", strict=strict_name)
    stored_grid = config.grid_size
    if img_size is not None:
        config = ClassifierConfig.from_dict({**config.to_dict(), "img_size": img_size})
    model = build_classifier(config)
    if "pos_embed" in sd and tuple(stored_grid) != tuple(config.grid_size):
        sd = {**sd, "pos_embed": resize_pos_embed(sd["pos_embed"], stored_grid, config.grid_size)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"'{path}' does not fit the classifier it describes: missing {short_list(missing)}; "
                              f"unexpected {short_list(unexpected)}")
    return model.eval(), config, names


def _infer_classifier_config(sd: dict[str, torch.Tensor], path: Path, model_name: str | None) -> ClassifierConfig:
    if "head.weight" not in sd and "head.1.weight" not in sd:
        from mae.train.checkpoint_kinds import describe

        raise CheckpointError(f"{describe(path)}: it has no classifier head (head.weight); fine-tune it first "
                              f"(mae finetune) or probe it (mae linprobe / mae knn)")
    from mae.interop import infer_config

    encoder = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    mae_config = infer_config(encoder, model_name)
    bn = "head.1.weight" in sd
    return ClassifierConfig.from_mae(mae_config, num_classes=sd["head.1.weight" if bn else "head.weight"].shape[0],
                                     global_pool="avg" if "fc_norm.weight" in sd else "token",
                                     head="bn_linear" if bn else "linear")


# ---------------------------------------------------------------------------------------------------- training
def train_classifier(run: Run, *, model: nn.Module, classifier_config: ClassifierConfig, class_names: list[str],
                     train_set: Dataset, train_loader: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                     score: Callable[[nn.Module], EvalResult], groups: list[dict[str, Any]], optimizer: str,
                     optim: dict[str, Any], resolved: dict[str, Any], train_module: nn.Module | None = None,
                     eval_module: nn.Module | None = None, ema: Any = None, protocol: str = "") -> tuple[Any, dict]:
    """What fine-tuning and linear probing share around the run layer: the engine, evaluation after every epoch
    (top-1, top-5 when there are more than 5 classes, loss; the EMA weights too when kept), the best top-1 (EMA
    included) as ``checkpoint-best.pth``, ``param_groups.json``, the summary and ``curves.png``. Returns the
    `Trainer` (call ``finish`` after any exports) and the summary."""
    from mae.train.logging import draw_curves
    from mae.train.trainer import Best, Trainer, build_engine, data_facts

    cfg = run.cfg
    engine = build_engine(run, model, groups, optimizer=optimizer, train_module=train_module,
                          updates_per_epoch=len(train_loader) // cfg.accum_iter, **optim)
    if ema is not None:  # the EMA follows the applied updates only (a skipped update leaves it alone)
        engine.on_update = lambda: ema.update(model)
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

    trainer = Trainer(run, model=model, engine=engine, loader=train_loader, loss_fn=loss_fn,
                      best=Best("top1", "max", best_of), evaluate=evaluate, resolved=resolved,
                      data=data_facts(train_set, run, len(train_loader)),
                      meta={"classifier_config": classifier_config.to_dict(), "class_names": list(class_names)},
                      extra_state={"model_ema": ema.module} if ema is not None else None)
    if run.dist.is_main:
        write_param_groups(run.out / "param_groups.json", model, groups)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("%s: %d classes, %s pooling, %.2f M parameters (%.2f M trainable); %d training images; effective "
                 "batch %d; peak lr %.3g (%s); precision %s on %s", protocol or "classifier", len(class_names),
                 classifier_config.global_pool, sum(p.numel() for p in model.parameters()) / 1e6, trainable / 1e6,
                 len(train_set), engine.effective_batch, engine.peak_lr, optimizer, run.precision, run.device)  # type: ignore[arg-type]  # torch types no Dataset.__len__
    result = trainer.fit()
    last = result.history[-1] if result.history else {}
    summary: dict[str, Any] = {"output_dir": str(run.out), "protocol": protocol, "best_top1": result.best["value"],
                               "best_epoch": result.best["epoch"], "last_top1": last.get("top1"),
                               **({"last_top5": last.get("top5")} if many else {}),
                               "train_seconds": result.train_seconds, "updates": result.updates,
                               "best_checkpoint": str(trainer.best_path), "skipped_files": skipped_count(train_set)}
    if run.dist.is_main:
        summary.update(draw_curves(run.out, ("loss", "lr", "top1")))
    return trainer, summary
