"""MAE pre-training: ``run(PretrainConfig) -> summary``. The CLI's ``mae pretrain`` only parses and calls this.

Defaults follow paper Table 8 (AdamW (0.9, 0.95), weight decay 0.05, base lr 1.5e-4 x batch / 256, 40 warm-up
epochs, cosine, RandomResizedCrop + flip); the shipped YAML presets set the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.utils.data import Subset

from mae.data import (
    AUGMENTATIONS,
    WithMaskNoise,
    build_dataset,
    build_loader,
    build_transform,
    default_mean_std,
    memoize_if_fixed,
    passed_over_files,
    set_epoch,
    skipped_files,
)
from mae.data.device_decode import CropPlan, DeviceDecoder, collate_encoded
from mae.errors import CheckpointError, ConfigError
from mae.interop.hub_metadata import WEIGHTS_KEY
from mae.interop.loading import Checkpoint, checkpoint_config, load_checkpoint, model_label, read_checkpoint
from mae.interop.native import save_state_dict
from mae.models import ARCHITECTURES, MAEConfig, MaskedAutoencoderViT, build_model, model_config
from mae.recipes.common import ModelSection, run_distributed, weights_record
from mae.recipes.knn import pretrain_knn
from mae.threads import default_workers
from mae.train.distributed import DistInfo, all_gather_objects
from mae.train.engine import Engine
from mae.train.fsdp import FULL_INIT_MAX_PARAMS, build_for_strategy, full_state_dict, is_sharded
from mae.train.metrics_log import plot_curves
from mae.train.optim import param_groups
from mae.train.rng import seed_everything
from mae.train.run import Run, TrainFields
from mae.train.spec import TrainSpec, run_training
from mae.train.trainer import Best, TrainResult
from mae.viz.reconstruction import save_reconstructions

log = logging.getLogger("mae")

PRETRAIN_DECODERS = ("tensor", "pil", "nvjpeg")
CLI_FLAGS = {"--data": "data.path", "--output-dir": "output_dir", "--resume": "resume", "--epochs": "epochs",
             "--precision": "precision", "--device": "device", "--init": "init"}
_TARGET_FIELDS = ("target", "norm_pix_loss", "pca_components", "hog_bins")
"""What says what the decoder predicts: taken from the init weights with their target."""


@dataclass
class PretrainData:
    path: str = field(default="builtin:mnist5k",
                      metadata={"help": "builtin:<name>, a class-folder tree or a folder of images"})
    augment: str = field(default="rrc", metadata={"help": "rrc | fixed_crop | none | rrc_jitter (paper Table 1e)"})
    num_workers: int = field(default_factory=default_workers, metadata={
        "help": "DataLoader worker processes (default: this process's share of the CPUs less one, at most 8)"})
    decode: str = field(default="tensor", metadata={
        "help": "tensor: JPEGs decoded by torchvision.io to uint8 (faster than PIL: docs/benchmarks.md, the input "
                "pipeline) | pil | nvjpeg: JPEGs decoded, cropped and normalised on the GPU (CUDA only; augment rrc "
                "or none)"})
    mean: list[float] | None = field(default=None, metadata={"help": "normalisation mean (default: ImageNet / 0.5)"})
    std: list[float] | None = None
    strict: bool = field(default=False, metadata={"help": "fail on a corrupt image instead of skipping it"})
    train_limit: int | None = field(default=None, metadata={
        "help": "use a fixed random subset of N images (quick trials)"})

    RANGES: ClassVar[dict[str, str]] = {"mean": "any", "std": "> 0"}

    def validate(self) -> None:
        if self.train_limit is not None and self.train_limit < 1:
            raise ConfigError(f"data.train_limit must be at least 1, got {self.train_limit}")
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"data.augment '{self.augment}' is not one of {', '.join(AUGMENTATIONS)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.decode not in PRETRAIN_DECODERS:
            raise ConfigError(f"data.decode '{self.decode}' is not one of {', '.join(PRETRAIN_DECODERS)}")
        if self.decode == "nvjpeg":
            CropPlan(self.augment)  # refuses the augmentations it cannot draw on the device
        if self.decode == "nvjpeg" and self.path.startswith("builtin:"):
            raise ConfigError(f"data.decode=nvjpeg decodes JPEG files, and {self.path} is an embedded array "
                              "dataset; use data.decode=tensor")


@dataclass
class PretrainOptim:
    base_lr: float = field(default=1.5e-4, metadata={"help": "lr = base_lr x effective batch / 256"})
    lr: float | None = field(default=None, metadata={"help": "absolute peak lr (overrides base_lr)"})
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    clip_grad: float | None = field(default=None, metadata={"help": "max gradient norm (paper: none)"})

    RANGES: ClassVar[dict[str, str]] = {"base_lr": "> 0", "lr": "> 0", "min_lr": ">= 0", "weight_decay": ">= 0",
                                        "betas": "[0, 1)", "warmup_epochs": ">= 0", "clip_grad": "> 0"}


@dataclass
class PretrainConfig(TrainFields):
    """Everything a pre-training run needs; saved (resolved) as config.yaml next to the run."""

    output_dir: str = field(default="runs/pretrain", metadata={"help": "where checkpoints, logs and pictures go"})
    epochs: int = 800
    batch_size: int = field(default=64, metadata={"help": "images per device per step"})
    save_every: int = field(default=20, metadata={"help": "checkpoint every N epochs (and at the end)"})
    keep_last: int = field(default=2, metadata={"help": "numbered epoch checkpoints kept besides last/best"})
    model: ModelSection = field(default_factory=ModelSection)
    data: PretrainData = field(default_factory=PretrainData)
    optim: PretrainOptim = field(default_factory=PretrainOptim)
    visualize: bool = field(default=True, metadata={"help": "draw reconstructions.png at the end"})
    pca_fit_batches: int = field(default=20, metadata={"help": "batches used to fit a PCA target's basis"})
    knn_every: int = field(default=0, metadata={
        "help": "k-NN top-1 / top-5 of the encoder every N epochs on the labelled data.path (0: off)"})
    init: str | None = field(default=None, metadata={
        "help": "start a new run from these weights: released ones (official:<file>, hf:<org/repo>, timm:<tag>), a "
                "run directory or any checkpoint the library reads; the encoder, and the decoder when the file has "
                "one; the architecture and target are the file's unless model.* sets them. A resume ignores it"})

    RESUME_FREE: ClassVar[tuple[str, ...]] = (*TrainFields.RESUME_FREE, "visualize", "knn_every", "data.decode",
                                              "init")

    def validate(self) -> None:
        super().validate()
        if self.distributed.strategy == "fsdp":
            if model_config(self.model.name, **self.model.overrides()).target == "pca":
                raise ConfigError("model.target=pca is fitted on each process's own batches, which fsdp's shards do "
                                  "not reconcile; use distributed.strategy=ddp for PCA targets")
            if self.knn_every:
                raise ConfigError("knn_every runs the encoder on each process's share of the data, which a sharded "
                                  "model cannot do unevenly; set knn_every=0 under distributed.strategy=fsdp and "
                                  "run `mae knn` on the finished model")


def _image_size(cfg: MAEConfig) -> int | tuple[int, int]:
    h, w = cfg.image_hw
    return h if h == w else (h, w)


def _image_side(cfg: MAEConfig) -> int:
    h, w = cfg.image_hw
    if h != w:
        raise ConfigError(f"data.decode=nvjpeg makes square crops; img_size {h}x{w} is not square: use "
                          f"data.decode=tensor")
    return h


def build_pretrain_loader(cfg: PretrainConfig, model_cfg: MAEConfig, dist: DistInfo, split: str = "train"):
    """The training loader, whose batches are ``(images [N, C, H, W], noise [N, L])``, or with data.decode=nvjpeg
    ``((JPEG bytes, crop boxes), noise)`` for `device_batch_fn` to finish on the device."""
    on_device = cfg.data.decode == "nvjpeg"
    transform: Callable[..., Any]  # a CropPlan or a torchvision pipeline
    if on_device:
        transform = CropPlan(cfg.data.augment)
    else:
        transform = build_transform(cfg.data.augment, _image_size(model_cfg), model_cfg.in_chans, cfg.data.mean,
                                    cfg.data.std)
    mode = "L" if model_cfg.in_chans == 1 else "RGB"
    dataset = build_dataset(cfg.data.path, split, transform=transform, mode=mode, strict=cfg.data.strict,
                            decode="encoded" if on_device else cfg.data.decode)
    if not on_device:  # the embedded digits without augmentation: each is transformed once, not every epoch
        h, w = model_cfg.img_size if isinstance(model_cfg.img_size, tuple) else (model_cfg.img_size,) * 2
        dataset = memoize_if_fixed(dataset, cfg.data.augment, 4 * model_cfg.in_chans * h * w)
    if cfg.data.train_limit is not None and cfg.data.train_limit < len(dataset):  # type: ignore[arg-type]  # torch types no Dataset.__len__; a fixed random subset
        keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.data.train_limit]  # type: ignore[arg-type]  # torch types no Dataset.__len__
        dataset = Subset(dataset, sorted(keep.tolist()))
    # per-sample masking noise: masks are a function of (seed, epoch, index), like the crops, whatever the world size
    noisy = WithMaskNoise(dataset, model_cfg.num_patches)
    loader = build_loader(noisy, cfg.batch_size, shuffle=True, num_workers=cfg.data.num_workers, seed=cfg.seed,
                          drop_last=True, distributed=dist.world_size > 1,
                          collate_fn=collate_encoded if on_device else None)
    if len(loader) == 0:
        raise ConfigError(f"{len(dataset)} training images are fewer than one batch of {cfg.batch_size} per "  # type: ignore[arg-type]  # torch types no Dataset.__len__
                          f"process; lower batch_size")
    return dataset, loader


def device_batch_fn(cfg: PretrainConfig, model_cfg: MAEConfig, device: torch.device):
    """What turns a loader batch's images into the model's input on `device`: a copy, or the GPU decoding."""
    if cfg.data.decode != "nvjpeg":
        return lambda images: images.to(device, non_blocking=True)
    if device.type != "cuda" or model_cfg.in_chans != 3:
        raise ConfigError(f"data.decode=nvjpeg decodes RGB JPEGs on a CUDA GPU, not on {device.type} with "
                          f"in_chans={model_cfg.in_chans}; use data.decode=tensor")
    mean, std = default_mean_std(3)
    return DeviceDecoder(device, _image_side(model_cfg), cfg.data.mean or mean, cfg.data.std or std)


@torch.no_grad()
def fit_pca_target(model: MaskedAutoencoderViT, loader, num_batches: int) -> float:
    """Fit a PCA target's basis on training patches (once, before training)."""
    batches = (imgs for i, (imgs, _) in zip(range(num_batches), loader, strict=False))
    ratio = model.target.fit(batches)  # type: ignore[operator]  # Module.__getattr__ gives Tensor | Module
    log.info("PCA target fitted on %d batches: top-%d components explain %.1f%% of patch variance",
             num_batches, model.target.dim, 100 * float(ratio))
    return float(ratio)


def _whole_model(config: MAEConfig, weights: dict[str, torch.Tensor]) -> MaskedAutoencoderViT | None:
    """A CPU copy of a sharded run's model for the reconstruction picture, or None when it is too large to build
    whole (the picture is skipped; ``mae visualize`` draws it from model.safetensors where memory allows)."""
    if sum(v.numel() for v in weights.values()) > FULL_INIT_MAX_PARAMS:
        log.info("reconstructions.png skipped: the model is too large to rebuild whole on rank 0's CPU")
        return None
    model = MaskedAutoencoderViT(config)
    model.load_state_dict(weights)
    return model.eval()


def init_model_config(section: ModelSection, ckpt: Checkpoint) -> tuple[MAEConfig, str]:
    """The model of a run started from the weights `ckpt` (``init``) and the name config.yaml records for it.

    With ``model.name`` left at its default the architecture is the file's (its stored config, else its shapes and
    catalogue entry), the section's other fields applied over it; a name chosen on purpose is built as named (the
    weights must fit it: `load_checkpoint` says which shapes do not). The target is the one the weights were
    trained with, said in one info line, unless ``model.target`` / ``model.norm_pix_loss`` chose another (a
    warning then: the decoder learnt to predict something else)."""
    overrides = section.overrides()
    chosen_target = section.target is not None or section.norm_pix_loss is not None
    if section.name == ModelSection().name:  # left at its default: the file's architecture
        config = checkpoint_config(ckpt, **overrides)
        name = model_label(config) if model_label(config) in ARCHITECTURES else section.name
    else:
        config, name = model_config(section.name, **overrides), section.name
    theirs = ckpt.target
    if theirs is None:  # not known (a reference file without its training arguments): the section's
        return config, name
    if chosen_target:
        if config.target != theirs:
            warnings.warn(f"model.target={config.target} but {ckpt.label} was trained to predict {theirs}: its "
                          f"decoder starts from another target (drop model.target / model.norm_pix_loss to keep "
                          f"{theirs})", stacklevel=2)
        return config, name
    if config.target != theirs:
        stored = ckpt.config
        config = config.replace(**({k: getattr(stored, k) for k in _TARGET_FIELDS} if stored is not None
                                   else {"target": theirs}))
    if model_config(section.name, **overrides).target != theirs:  # what the section alone would have trained
        log.info("init: model.target=%s, the target %s was trained with (set model.target to choose another)",
                 theirs, ckpt.label)
    return config, name


def _load_init(model: MaskedAutoencoderViT, ckpt: Checkpoint, section: ModelSection) -> None:
    """Load the init weights: the encoder strictly, the decoder when the file has one (else it stays fresh, with
    one warning from `load_checkpoint`)."""
    if any(p.is_meta for p in model.parameters()):
        raise ConfigError("init loads whole weights, which a model initialised shard by shard (distributed.init="
                          "sharded) does not hold; set distributed.init=full")
    try:
        load_checkpoint(model, ckpt)
    except CheckpointError as e:
        if section.name == ModelSection().name:  # the file's own architecture: nothing else to suggest
            raise
        raise ConfigError(f"init: {e}; or leave model.name at its default to build the architecture of the "
                          f"weights") from None


def _build_model(cfg: PretrainConfig, run: Run) -> tuple[MaskedAutoencoderViT, ModelSection, dict[str, Any] | None]:
    """The run's model, the model section config.yaml records for it, and the provenance of the released weights
    it started from (None: none). A new run with ``init`` starts from those weights; a resume builds the model
    its checkpoint then restores (the checkpoint wins; its provenance is kept)."""
    if cfg.init and run.resume_state is None:
        init = read_checkpoint(cfg.init)
        config, name = init_model_config(cfg.model, init)
        # on the meta device for sharded init (fsdp), which _load_init refuses
        model = build_for_strategy(run, lambda: MaskedAutoencoderViT(config))
        _load_init(model, init, cfg.model)
        weights = init.weights.provenance() if init.weights is not None else None
        return model, dataclasses.replace(cfg.model, name=name), weights
    if cfg.init and run.dist.is_main:
        log.info("init=%s is not applied: the run resumes from its checkpoint", cfg.init)
    # on the meta device for sharded init (fsdp)
    model = build_for_strategy(run, lambda: build_model(cfg.model.name, **cfg.model.overrides()))
    return model, cfg.model, (run.resume_state or {}).get(WEIGHTS_KEY)


def run(cfg: PretrainConfig) -> dict:
    """Pre-train an MAE; returns a summary (losses of the first and last epoch, time, output paths)."""
    return run_distributed(cfg.device, lambda dist: run_training(cfg, dist, "pretrain",
                                                                 lambda run: build_spec(cfg, run)))


def build_spec(cfg: PretrainConfig, run: Run) -> TrainSpec:
    """What a pre-training run trains: the MAE, the masked loader, the masked-patch loss, the lowest epoch loss as
    the best; at the end model.safetensors, loss.png and reconstructions.png."""
    device, dist, out = run.device, run.dist, run.out
    model, section, weights = _build_model(cfg, run)
    model_cfg = model.config
    images_of = device_batch_fn(cfg, model_cfg, device)  # refuses nvjpeg without CUDA before any data is read
    dataset, loader = build_pretrain_loader(cfg, model_cfg, dist)
    mask_ratio = model_cfg.mask_ratio

    def loss_fn(m: torch.nn.Module, batch) -> torch.Tensor:
        images, noise = images_of(batch[0]), batch[1].to(device, non_blocking=True)
        return m(images, mask_ratio, noise=noise)[0]

    def on_start(engine: Engine) -> None:
        if run.resume_state is None and model_cfg.target == "pca" and not bool(model.target.fitted):
            set_epoch(loader, 0)
            fit_pca_target(model, ((images_of(x), y) for x, y in loader), cfg.pca_fit_batches)
            seed_everything(cfg.seed + dist.rank)
        if dist.is_main:
            log.info("model %s: %.2f M parameters; %d images; effective batch %d (= %d x %d accum x %d processes); "
                     "peak lr %.3g; precision %s on %s", section.name,
                     sum(p.numel() for p in model.parameters()) / 1e6, len(dataset), engine.effective_batch,
                     cfg.batch_size, cfg.accum_iter, dist.world_size, engine.peak_lr, run.precision, device)

    skipped: list[str] = []

    def epoch_end(epoch: int, record: dict) -> dict:
        extra = {}
        if cfg.knn_every > 0 and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
            extra = pretrain_knn(model, cfg.data)
        skipped[:] = sorted(set().union(*all_gather_objects(skipped_files(dataset))))  # all ranks and their workers
        if skipped and dist.is_main:
            log.warning("epoch %d: %d unreadable image file(s) skipped so far (each replaced by the next readable "
                        "image; data.strict=true stops instead), e.g. %s", epoch, len(skipped), skipped[0])
        return extra

    def summarize(result: TrainResult) -> dict:
        history = result.history
        summary = {"output_dir": str(out), "epochs": cfg.epochs, "updates": result.updates,
                   "first_epoch_loss": history[0]["epoch_loss"] if history else None,
                   "last_epoch_loss": history[-1]["epoch_loss"] if history else None,
                   "train_seconds": result.train_seconds, "skipped_steps": result.skipped_updates,
                   "skipped_files": len(set(skipped) | set(passed_over_files(dataset)))}  # unreadable + passed over
        weights = full_state_dict(model) if is_sharded(run) else None  # fsdp: gathered on rank 0 (every rank calls)
        if dist.is_main:
            state = weights if weights is not None else model.state_dict()
            summary["model_path"] = str(save_state_dict(state, model_cfg.to_dict(), out / "model.safetensors"))
            plot_curves(out / "metrics.jsonl", out / "loss.png")
            summary["loss_png"] = str(out / "loss.png")
            shown = model if weights is None else _whole_model(model_cfg, weights)
            if cfg.visualize and model_cfg.target in ("pixel", "norm_pixel") and shown is not None:
                save_reconstructions(shown, cfg.data.path, out / "reconstructions.png", mask_ratios=(mask_ratio,),
                                     mean=cfg.data.mean, std=cfg.data.std, seed=cfg.seed)
                summary["reconstructions_png"] = str(out / "reconstructions.png")
        return summary

    o = cfg.optim
    # As the reference: biases and 1-D parameters get no weight decay; class and mask tokens do.
    return TrainSpec(model=model, train_set=dataset, loader=loader, loss_fn=loss_fn,
                     param_groups=param_groups(model, o.weight_decay), optimizer="adamw",
                     optim={"base_lr": o.base_lr, "lr": o.lr, "warmup_epochs": o.warmup_epochs, "min_lr": o.min_lr,
                            "betas": tuple(o.betas), "weight_decay": o.weight_decay, "clip_grad": o.clip_grad},
                     best=Best("epoch_loss", "min"), save_on_best=False, summarize=summarize,
                     meta={"model_config": model_cfg.to_dict(), **({WEIGHTS_KEY: weights} if weights else {})},
                     resolved_sections={"model": section.resolved(model_cfg)}, on_epoch_end=epoch_end,
                     on_start=on_start, result_file="model.safetensors", run_info=weights_record(weights))
