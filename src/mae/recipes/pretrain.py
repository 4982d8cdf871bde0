"""MAE pre-training: ``run(PretrainConfig) -> summary``. The CLI's ``mae pretrain`` only parses and calls this.

Defaults follow paper Table 8 (AdamW (0.9, 0.95), weight decay 0.05, base lr 1.5e-4 x batch / 256, 40 warm-up
epochs, cosine, RandomResizedCrop + flip); the shipped YAML presets set the rest.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset

from mae.config import save_config, to_dict
from mae.data import (
    AUGMENTATIONS,
    WithMaskNoise,
    build_dataset,
    build_loader,
    build_transform,
    default_mean_std,
    set_epoch,
    skipped_files,
)
from mae.data.device_decode import CropPlan, DeviceDecoder, collate_encoded
from mae.errors import ConfigError
from mae.models import MAEConfig, MaskedAutoencoderViT, create_model
from mae.recipes.common import (
    ModelSection,
    prepare_output_dir,
    require_at_least,
    require_precision,
    run_distributed,
)
from mae.train.checkpoint import CheckpointManager, load_model_state, safe_load
from mae.train.distributed import DistInfo, all_gather_objects
from mae.train.engine import Engine, LRSchedule
from mae.train.logging import MetricsLogger, plot_curves
from mae.train.optim import build_optimizer, param_groups
from mae.train.precision import resolve_precision
from mae.train.rng import capture_rng_state, restore_rng_state, seed_everything
from mae.train.schedule import scaled_lr

log = logging.getLogger("mae")

PRETRAIN_DECODERS = ("tensor", "pil", "nvjpeg")


@dataclass
class PretrainData:
    path: str = field(default="builtin:mnist5k", metadata={"help": "builtin:<name>, a class-folder tree or a folder of images"})
    augment: str = field(default="rrc", metadata={"help": "rrc | fixed_crop | none | rrc_jitter (paper Table 1e)"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes"})
    decode: str = field(default="tensor", metadata={
        "help": "tensor: JPEGs decoded by torchvision.io to uint8 (about 2x PIL's speed) | pil | nvjpeg: JPEGs "
                "decoded, cropped and normalised on the GPU (CUDA only; augment rrc or none)"})
    mean: list[float] | None = field(default=None, metadata={"help": "normalisation mean (default: ImageNet / 0.5)"})
    std: list[float] | None = None
    strict: bool = field(default=False, metadata={"help": "fail on a corrupt image instead of skipping it"})
    limit: int | None = field(default=None, metadata={"help": "use a fixed random subset of N images (quick trials)"})

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be at least 1, got {self.limit}")
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

    def validate(self) -> None:
        if self.base_lr <= 0 or (self.lr is not None and self.lr <= 0):
            raise ConfigError(f"learning rate must be positive, got base_lr={self.base_lr}, lr={self.lr}")
        if self.warmup_epochs < 0 or self.weight_decay < 0:
            raise ConfigError("optim.warmup_epochs and optim.weight_decay must be >= 0")


@dataclass
class PretrainConfig:
    """Everything a pre-training run needs; saved as config.yaml next to the run."""

    model: ModelSection = field(default_factory=ModelSection)
    data: PretrainData = field(default_factory=PretrainData)
    optim: PretrainOptim = field(default_factory=PretrainOptim)
    output_dir: str = field(default="runs/pretrain", metadata={"help": "where checkpoints, logs and pictures go"})
    epochs: int = 800
    batch_size: int = field(default=64, metadata={"help": "images per device per step"})
    accum_iter: int = field(default=1, metadata={"help": "gradient accumulation steps per update"})
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    seed: int = 0
    save_every: int = field(default=20, metadata={"help": "checkpoint every N epochs (and at the end)"})
    keep_last: int = field(default=2, metadata={"help": "numbered checkpoints kept besides last/best"})
    log_every: int = field(default=20, metadata={"help": "optimizer updates between metrics.jsonl lines"})
    resume: str | None = field(default=None, metadata={"help": "a checkpoint path, or 'auto' for the newest valid one"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations (saves memory)"})
    max_nonfinite: int = field(default=5, metadata={"help": "consecutive non-finite losses before stopping"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    visualize: bool = field(default=True, metadata={"help": "draw reconstructions.png at the end"})
    pca_fit_batches: int = field(default=20, metadata={"help": "batches used to fit a PCA target's basis"})
    knn_every: int = field(default=0, metadata={
        "help": "k-NN top-1 / top-5 of the encoder every N epochs on the labelled data.path (0: off)"})

    def validate(self) -> None:
        require_at_least(self, ("epochs", "batch_size", "accum_iter", "save_every", "log_every", "max_nonfinite"))
        if self.keep_last < 0:
            raise ConfigError(f"keep_last must be >= 0, got {self.keep_last}")
        require_precision(self.precision)


def build_model(section: ModelSection) -> MaskedAutoencoderViT:
    return create_model(section.name, **section.overrides())


def _image_side(cfg: MAEConfig) -> int:
    h, w = cfg.image_hw
    if h != w:
        raise ConfigError(f"the pre-training transforms make square crops; img_size {h}x{w} is not square")
    return h


def build_pretrain_loader(cfg: PretrainConfig, model_cfg: MAEConfig, dist: DistInfo, split: str = "train"):
    """The training loader, whose batches are ``(images [N, C, H, W], noise [N, L])``, or with data.decode=nvjpeg
    ``((JPEG bytes, crop boxes), noise)`` for `device_batch_fn` to finish on the device."""
    on_device = cfg.data.decode == "nvjpeg"
    if on_device:
        transform = CropPlan(cfg.data.augment)
    else:
        transform = build_transform(cfg.data.augment, _image_side(model_cfg), model_cfg.in_chans, cfg.data.mean,
                                    cfg.data.std)
    mode = "L" if model_cfg.in_chans == 1 else "RGB"
    dataset = build_dataset(cfg.data.path, split, transform=transform, mode=mode, strict=cfg.data.strict,
                            decode="encoded" if on_device else cfg.data.decode)
    if cfg.data.limit is not None and cfg.data.limit < len(dataset):  # a fixed random subset (splits may be sorted)
        keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.data.limit]
        dataset = Subset(dataset, sorted(keep.tolist()))
    # per-sample masking noise: masks are a function of (seed, epoch, index), like the crops, whatever the world size
    noisy = WithMaskNoise(dataset, model_cfg.grid_size[0] * model_cfg.grid_size[1])
    loader = build_loader(noisy, cfg.batch_size, shuffle=True, num_workers=cfg.data.num_workers, seed=cfg.seed,
                          drop_last=True, distributed=dist.world_size > 1,
                          collate_fn=collate_encoded if on_device else None)
    if len(loader) == 0:
        raise ConfigError(f"{len(dataset)} training images are fewer than one batch of {cfg.batch_size} per "
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
    batches = (imgs for i, (imgs, _) in zip(range(num_batches), loader))
    ratio = model.target.fit(batches)
    log.info("PCA target fitted on %d batches: top-%d components explain %.1f%% of patch variance",
             num_batches, model.target.dim, 100 * float(ratio))
    return float(ratio)


def run(cfg: PretrainConfig) -> dict:
    """Pre-train an MAE; returns a summary (losses of the first and last epoch, time, output paths)."""
    return run_distributed(cfg.device, lambda dist: _run(cfg, dist))


def _run(cfg: PretrainConfig, dist: DistInfo) -> dict:
    device = dist.device
    precision = resolve_precision(cfg.precision, device)
    out = prepare_output_dir(cfg.output_dir)
    seed_everything(cfg.seed + dist.rank)

    model = build_model(cfg.model).to(device)
    model_cfg = model.config
    images_of = device_batch_fn(cfg, model_cfg, device)  # refuses nvjpeg without CUDA before any data is read
    dataset, loader = build_pretrain_loader(cfg, model_cfg, dist)
    effective_batch = cfg.batch_size * cfg.accum_iter * dist.world_size
    peak_lr = cfg.optim.lr if cfg.optim.lr is not None else scaled_lr(cfg.optim.base_lr, effective_batch)
    updates_per_epoch = len(loader) // cfg.accum_iter
    if updates_per_epoch == 0:
        raise ConfigError(f"one epoch has {len(loader)} batches, fewer than accum_iter={cfg.accum_iter}")
    schedule = LRSchedule(peak_lr, total_steps=cfg.epochs * updates_per_epoch,
                          warmup_steps=round(cfg.optim.warmup_epochs * updates_per_epoch), min_lr=cfg.optim.min_lr)
    # As the reference: biases and 1-D parameters get no weight decay; class and mask tokens do.
    groups = param_groups(model, cfg.optim.weight_decay)
    optimizer = build_optimizer(groups, "adamw", lr=peak_lr, betas=tuple(cfg.optim.betas),
                                weight_decay=cfg.optim.weight_decay)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)

    logger = MetricsLogger(out, enabled=dist.is_main)
    manager = CheckpointManager(out, keep_last=cfg.keep_last)
    train_model: torch.nn.Module = model
    if dist.world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    engine = Engine(train_model, optimizer, schedule, precision=precision, device=device, accum_iter=cfg.accum_iter,
                    clip_grad=cfg.optim.clip_grad, max_nonfinite=cfg.max_nonfinite, logger=logger,
                    log_every=cfg.log_every, show_progress=cfg.progress and dist.is_main, world_size=dist.world_size)

    start_epoch, history, best_loss, skipped = 0, [], float("inf"), []
    resumed = manager.load_latest() if cfg.resume == "auto" else (
        (cfg.resume, safe_load(cfg.resume)) if cfg.resume else None)
    if resumed is not None:
        resume_path, state = resumed
        if state.get("format") != "mae-train":
            raise ConfigError(f"'{resume_path}' is not a training checkpoint of this library (no optimizer state); "
                              f"to start from its weights, convert it and use it as an initialisation instead")
        load_model_state(model, state["model"], resume_path)
        engine.load_state_dict(state["engine"])
        start_epoch, history = int(state["epoch"]) + 1, list(state.get("history", []))
        best_loss = float(state.get("best_loss", best_loss))
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rng) == dist.world_size:  # else a new world size: keep the fresh seeding (data and masks do not
            restore_rng_state(rng[dist.rank])  # depend on it: they are per-sample functions of seed and epoch)
        log.info("resumed from %s at epoch %d (update %d)", resume_path, start_epoch, engine.step)
    elif model_cfg.target == "pca" and not bool(model.target.fitted):
        set_epoch(loader, 0)
        fit_pca_target(model, ((images_of(x), y) for x, y in loader), cfg.pca_fit_batches)
        seed_everything(cfg.seed + dist.rank)

    if dist.is_main:
        save_config(cfg, out / "config.yaml")
        log.info("model %s: %.2f M parameters; %d images; effective batch %d (= %d x %d accum x %d processes); "
                 "peak lr %.3g; precision %s on %s", cfg.model.name, sum(p.numel() for p in model.parameters()) / 1e6,
                 len(dataset), effective_batch, cfg.batch_size, cfg.accum_iter, dist.world_size, peak_lr, precision,
                 device)

    mask_ratio = model_cfg.mask_ratio

    def loss_fn(m: torch.nn.Module, batch) -> torch.Tensor:
        images, noise = images_of(batch[0]), batch[1].to(device, non_blocking=True)
        return m(images, mask_ratio, noise=noise)[0]

    t_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        set_epoch(loader, epoch)
        stats = engine.train_epoch(loader, epoch, loss_fn)
        epoch_loss = stats.loss  # already the mean over all processes
        history.append({"epoch": epoch, "loss": epoch_loss, "seconds": stats.seconds})
        logger.log({"epoch": epoch, "step": engine.step, "epoch_loss": epoch_loss, "lr": stats.lr,
                    "epoch_seconds": stats.seconds, "images_per_sec": stats.images * dist.world_size / stats.seconds})
        if cfg.knn_every > 0 and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
            from mae.recipes.knn import pretrain_knn  # the `mae knn` monitor: knn_top1 / knn_top5 in metrics.jsonl

            logger.log({"epoch": epoch, "step": engine.step, **pretrain_knn(model, cfg.data)})
        skipped = sorted(set().union(*all_gather_objects(skipped_files(dataset))))  # all ranks and their workers
        if skipped:
            log.warning("epoch %d: %d unreadable image file(s) skipped so far (each replaced by the next readable "
                        "image; data.strict=true stops instead), e.g. %s", epoch, len(skipped), skipped[0])
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.save_every == 0 or last:
            rng = _gather_rng(dist)
            is_best = epoch_loss < best_loss  # the lowest epoch loss among saved epochs
            best_loss = epoch_loss if is_best else best_loss
            if dist.is_main:
                manager.save({"model": model.state_dict(), "engine": engine.state_dict(), "epoch": epoch,
                              "rng": rng, "history": history, "model_config": model_cfg.to_dict(),
                              "config": to_dict(cfg), "format": "mae-train", "best_loss": best_loss}, epoch,
                             is_best=is_best)
    elapsed = time.perf_counter() - t_start
    logger.close()

    summary = {"output_dir": str(out), "epochs": cfg.epochs, "updates": engine.step,
               "first_epoch_loss": history[0]["loss"] if history else None,
               "last_epoch_loss": history[-1]["loss"] if history else None,
               "train_seconds": elapsed, "skipped_steps": engine.nonfinite_total,
               "skipped_files": len(skipped)}
    if dist.is_main:
        from mae.interop import save_model

        summary["model_path"] = str(save_model(model, out / "model.safetensors"))
        plot_curves(out / "metrics.jsonl", out / "loss.png")
        summary["loss_png"] = str(out / "loss.png")
        if cfg.visualize and model_cfg.target in ("pixel", "norm_pixel"):
            from mae.viz.reconstruction import save_reconstructions

            save_reconstructions(model, cfg.data.path, out / "reconstructions.png", mask_ratios=(mask_ratio,),
                                 mean=cfg.data.mean, std=cfg.data.std, seed=cfg.seed)
            summary["reconstructions_png"] = str(out / "reconstructions.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _gather_rng(dist: DistInfo):
    """Every process's RNG state (rank 0 writes them all), so a resumed multi-process run replays exactly."""
    state = capture_rng_state()
    if dist.world_size == 1:
        return state
    states: list = [None] * dist.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def load_run_model(path: str | Path) -> MaskedAutoencoderViT:
    """The model of a run directory (its newest checkpoint) or of any checkpoint file the library reads."""
    path = Path(path)
    if path.is_dir() and (path / "config.yaml").exists():
        latest = CheckpointManager(path).latest_valid()
        if latest is None:
            if (path / "model.safetensors").exists():
                path = path / "model.safetensors"
            else:
                raise ConfigError(f"run directory '{path}' has no checkpoint yet; train first or pass a checkpoint file")
        else:
            path = latest
    if path.suffix == ".pth":
        state = safe_load(path)
        if state.get("format") == "mae-train":
            model = MaskedAutoencoderViT(MAEConfig(**state["model_config"]))
            model.load_state_dict(state["model"])
            return model
    from mae.interop import load_model

    return load_model(path)
