"""What the detection and segmentation recipes share: the backbone and optimizer config sections, the run fields,
a seeded data loader with a custom collate, and the train / evaluate / checkpoint loop on the shared `Engine`."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mae.config import save_config, to_dict
from mae.data import EpochSampler, SeededDataset, SeededSampler, set_epoch
from mae.errors import CheckpointError, ConfigError, MAEError
from mae.recipes.common import prepare_output_dir, require_at_least, require_precision, resolve_device
from mae.train.checkpoint import CheckpointManager, safe_load
from mae.train.engine import Engine, LRSchedule
from mae.train.logging import MetricsLogger, plot_curves, progress
from mae.train.optim import build_optimizer
from mae.train.precision import resolve_precision
from mae.train.rng import capture_rng_state, restore_rng_state, seed_everything
from mae.transfer.backbone import PYRAMIDS, EncoderLoadReport, ViTPyramid, backbone_param_groups, build_backbone
from mae.transfer.synthetic import SyntheticSpec

log = logging.getLogger("mae")

INITS = ("pretrained", "random")
MODES = ("train", "evaluate")


@dataclass
class BackboneSection:
    """Which encoder to start from and how to turn it into a pyramid."""

    checkpoint: str | None = field(default=None, metadata={
        "help": "MAE / reference / Hugging Face / timm checkpoint (any format the library reads)"})
    init: str = field(default="pretrained", metadata={
        "help": "pretrained: the checkpoint's encoder weights; random: its architecture, freshly initialised"})
    model_name: str | None = field(default=None, metadata={
        "help": "registered architecture (for init=random without a checkpoint, or a file that stores no heads)"})
    num_heads: int | None = field(default=None, metadata={
        "help": "attention heads, for a file that stores no config and has a non-standard width"})
    img_size: int | None = field(default=None, metadata={
        "help": "resolution the position table is interpolated to (default: the task's image size)"})
    pyramid: str = field(default="multiscale", metadata={
        "help": "multiscale (paper A.3: outputs of 4 equal block groups) | simple (last block only)"})
    strides: list[int] = field(default_factory=lambda: [4, 8, 16, 32], metadata={"help": "output strides"})
    rel_pos_bias: bool = field(default=False, metadata={"help": "relative position bias, zero at start (paper A.4)"})
    drop_path: float = field(default=0.1, metadata={"help": "stochastic depth rate of the last block"})

    def validate(self) -> None:
        if self.init not in INITS:
            raise ConfigError(f"backbone.init '{self.init}' is not one of {', '.join(INITS)}")
        if self.pyramid not in PYRAMIDS:
            raise ConfigError(f"backbone.pyramid '{self.pyramid}' is not one of {', '.join(PYRAMIDS)}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"backbone.drop_path must be in [0, 1), got {self.drop_path}")

    def check_source(self) -> None:
        """Raise unless the section names an encoder to start from (needed to train, not to evaluate)."""
        if self.checkpoint is None and self.model_name is None:
            raise ConfigError("set backbone.checkpoint (--checkpoint: an MAE checkpoint, e.g. a pre-training run's "
                              "model.safetensors) or, for backbone.init=random, backbone.model_name")
        if self.init == "pretrained" and self.checkpoint is None:
            raise ConfigError("backbone.init=pretrained needs backbone.checkpoint (or use backbone.init=random)")


@dataclass
class SyntheticSection:
    """Settings of the generated dataset used when data.path is 'synthetic' or 'synthetic:<folder>'."""

    num_train: int = 200
    num_val: int = 50
    image_size: int = 128
    max_objects: int = 4
    seed: int = 0

    def spec(self) -> SyntheticSpec:
        return SyntheticSpec(num_train=self.num_train, num_val=self.num_val, image_size=self.image_size,
                             max_objects=self.max_objects, seed=self.seed)


@dataclass
class TransferOptim:
    """AdamW with layer-wise lr decay over the backbone's blocks, per-iteration warm-up + cosine."""

    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (heads; blocks get lr x decay^k)"})
    min_lr: float = 0.0
    weight_decay: float = 0.05
    layer_decay: float | None = field(default=0.75, metadata={"help": "layer-wise lr decay (null: off)"})
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up length in epochs (fractions ok)"})
    clip_grad: float | None = field(default=None, metadata={"help": "max gradient norm (null: no clipping)"})

    def validate(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError(f"optim: lr must be > 0 and min_lr, weight_decay, warmup_epochs >= 0, got lr={self.lr}, "
                              f"min_lr={self.min_lr}, weight_decay={self.weight_decay}, "
                              f"warmup_epochs={self.warmup_epochs}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay must be in (0, 1] or null, got {self.layer_decay}")


@dataclass
class TransferRun:
    """Fields every transfer recipe has (train and evaluate)."""

    mode: str = field(default="train", metadata={"help": "train | evaluate (scores `weights` on the val split)"})
    weights: str | None = field(default=None, metadata={
        "help": "mode=evaluate: a run directory or its checkpoint-*.pth"})
    output_dir: str = field(default="runs/transfer", metadata={"help": "checkpoints, metrics and summary go here"})
    epochs: int = 12
    batch_size: int = field(default=16, metadata={"help": "images per optimizer step (before accumulation)"})
    accum_iter: int = 1
    eval_batch_size: int = 8
    eval_every: int = field(default=1, metadata={"help": "evaluate every N epochs (and after the last)"})
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    seed: int = 0
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes"})
    save_every: int = field(default=1, metadata={"help": "write checkpoint-last.pth every N epochs"})
    keep_last: int = field(default=0, metadata={"help": "numbered checkpoints kept besides last/best"})
    log_every: int = 20
    resume: str | None = field(default=None, metadata={"help": "a checkpoint path, or 'auto' for the newest one"})
    progress: bool = True

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode '{self.mode}' is not one of {', '.join(MODES)}")
        if self.mode == "evaluate" and not self.weights:
            raise ConfigError("mode=evaluate needs weights=<run directory or checkpoint>")
        require_at_least(self, ("epochs", "batch_size", "accum_iter", "eval_batch_size", "eval_every", "save_every", "log_every"))
        if self.num_workers < 0 or self.keep_last < 0:
            raise ConfigError("num_workers and keep_last must be >= 0")
        require_precision(self.precision)


# ---------------------------------------------------------------------------------------------------- building
def make_backbone(section: BackboneSection, img_size: int) -> tuple[ViTPyramid, EncoderLoadReport | None]:
    """The section's backbone at ``img_size`` (unless ``section.img_size`` is set)."""
    arch = {"num_heads": section.num_heads} if section.num_heads is not None else {}
    return build_backbone(section.checkpoint, model_name=section.model_name, pretrained=section.init == "pretrained",
                          img_size=section.img_size or img_size, arch_overrides=arch, pyramid=section.pyramid,
                          strides=section.strides,
                          rel_pos_bias=section.rel_pos_bias, drop_path_rate=section.drop_path)


def backbone_spec(backbone: ViTPyramid) -> dict[str, Any]:
    """The `ViTPyramid` arguments that rebuild ``backbone`` (stored in task checkpoints)."""
    block = backbone.blocks[0]
    return {"img_size": list(backbone.img_size), "patch_size": backbone.patch_size,
            "in_chans": backbone.patch_embed.proj.in_channels, "embed_dim": backbone.embed_dim,
            "depth": backbone.depth, "num_heads": block.attn.num_heads,
            "mlp_ratio": block.mlp.fc1.out_features / backbone.embed_dim, "norm_eps": backbone.norm.eps,
            "pyramid": backbone.pyramid, "strides": list(backbone.strides),
            "rel_pos_bias": backbone.rel_pos_bias is not None}


def seeded_loader(dataset: Dataset, batch_size: int, *, seed: int, num_workers: int, shuffle: bool = True,
                  drop_last: bool = True, collate_fn: Callable | None = None) -> DataLoader:
    """Like `mae.data.build_loader` (order and augmentation a pure function of (seed, epoch); call
    `mae.data.set_epoch`), with a custom ``collate_fn``."""
    sampler = SeededSampler(EpochSampler(len(dataset), shuffle=shuffle, seed=seed), seed)
    return DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, drop_last=drop_last, persistent_workers=num_workers > 0,
                      pin_memory=torch.cuda.is_available())


def single_process_device(name: str) -> torch.device:
    """The run's device; these recipes run as one process (torchrun with several processes is refused)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ConfigError("detection / segmentation runs use one process (one GPU or the CPU); launch without "
                          "torchrun or with --nproc-per-node 1")
    return resolve_device(name)


# ---------------------------------------------------------------------------------------------------- the loop
@dataclass
class TransferJob:
    """Everything `train_and_evaluate` needs; the recipes build it."""

    model: nn.Module
    backbone: ViTPyramid
    backbone_prefix: str  # where the backbone sits in the model's parameter names, e.g. 'backbone.body.'
    train_loader: DataLoader
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, Any]]  # metrics of the model on the val split
    best_key: str  # the metric that picks checkpoint-best.pth (higher is better)
    task: dict[str, Any]  # what rebuilds the model without the pre-training checkpoint (stored in checkpoints)
    format: str  # checkpoint format tag, e.g. 'mae-detect'
    run: TransferRun
    optim: TransferOptim
    config: Any  # the full resolved config, saved as config.yaml and in checkpoints
    device: torch.device
    precision: str
    out: Path
    train_images: int
    init_report: EncoderLoadReport | None = None
    metric_keys: tuple[str, ...] = ()  # metrics shown in the log line and summary


def train_and_evaluate(job: TransferJob) -> dict[str, Any]:
    """Train ``job.model`` end to end (layer-wise lr decay on the backbone), evaluate every ``eval_every`` epochs
    and after the last, keep checkpoint-last / checkpoint-best; returns the summary (also in summary.json)."""
    run, optim, out = job.run, job.optim, job.out
    groups = backbone_param_groups(job.model, job.backbone, job.backbone_prefix, optim.weight_decay,
                                   optim.layer_decay)
    (out / "param_groups.json").write_text(json.dumps(
        [{"lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"], "params": g["param_names"]} for g in groups],
        indent=1))
    optimizer = build_optimizer(groups, "adamw", lr=optim.lr, betas=tuple(optim.betas),
                                weight_decay=optim.weight_decay)
    updates_per_epoch = len(job.train_loader) // run.accum_iter
    if updates_per_epoch == 0:
        raise ConfigError(f"{job.train_images} training images make {len(job.train_loader)} batches of "
                          f"{run.batch_size}, fewer than one update (accum_iter={run.accum_iter}); lower batch_size")
    schedule = LRSchedule(optim.lr, total_steps=run.epochs * updates_per_epoch,
                          warmup_steps=round(optim.warmup_epochs * updates_per_epoch), min_lr=optim.min_lr)
    logger = MetricsLogger(out)
    manager = CheckpointManager(out, keep_last=run.keep_last)
    engine = Engine(job.model, optimizer, schedule, precision=job.precision, device=job.device,
                    accum_iter=run.accum_iter, clip_grad=optim.clip_grad, logger=logger, log_every=run.log_every,
                    show_progress=run.progress)

    start_epoch, history, best, best_epoch = 0, [], float("-inf"), -1
    resumed = manager.load_latest() if run.resume == "auto" else (
        (Path(run.resume), safe_load(run.resume)) if run.resume else None)
    if resumed is not None:
        path, state = resumed
        if state.get("format") != job.format or "engine" not in state:
            raise CheckpointError(f"'{path}' is not a training checkpoint of a {job.format} run; resume from the "
                                  f"run's checkpoint-last.pth (or resume=auto)")
        job.model.load_state_dict(state["model"])
        engine.load_state_dict(state["engine"])
        start_epoch, history = int(state["epoch"]) + 1, list(state.get("history", []))
        best, best_epoch = float(state.get("best", best)), int(state.get("best_epoch", -1))
        restore_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d (update %d)", path, start_epoch, engine.step)
    elif run.resume == "auto":
        log.info("resume=auto: no checkpoint in %s yet, starting from scratch", out)

    save_config(job.config, out / "config.yaml")
    n_params = sum(p.numel() for p in job.model.parameters()) / 1e6
    n_backbone = sum(p.numel() for p in job.backbone.parameters()) / 1e6
    log.info("%s: %.2f M parameters (backbone %.2f M, %s init); %d training images, %d updates per epoch; peak lr "
             "%.3g, layer decay %s; precision %s on %s", job.format, n_params, n_backbone,
             "pre-trained" if job.init_report is not None else "random", job.train_images, updates_per_epoch,
             optim.lr, optim.layer_decay, job.precision, job.device)

    t_start, metrics = time.perf_counter(), {}
    for epoch in range(start_epoch, run.epochs):
        set_epoch(job.train_loader, epoch)
        stats = engine.train_epoch(job.train_loader, epoch, job.loss_fn)
        record: dict[str, Any] = {"epoch": epoch, "step": engine.step, "epoch_loss": stats.loss, "lr": stats.lr,
                                  "epoch_seconds": stats.seconds}
        last = epoch + 1 == run.epochs
        is_best = False
        if last or (epoch + 1) % run.eval_every == 0:
            t_eval = time.perf_counter()
            metrics = job.evaluate(job.model)
            record.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                          eval_seconds=time.perf_counter() - t_eval)
            is_best = metrics[job.best_key] > best
            if is_best:
                best, best_epoch = metrics[job.best_key], epoch
        logger.log(record)
        history.append({k: record[k] for k in ("epoch", "epoch_loss", *job.metric_keys) if k in record})
        shown = ", ".join(f"{k} {record[k]:.2f}" for k in job.metric_keys if k in record)
        log.info("epoch %d: loss %.4f%s (%.0f s)", epoch, stats.loss, f", {shown}" if shown else "", stats.seconds)
        if is_best or last or (epoch + 1) % run.save_every == 0:
            manager.save({"format": job.format, "model": job.model.state_dict(), "engine": engine.state_dict(),
                          "epoch": epoch, "task": job.task, "history": history, "best": best,
                          "best_epoch": best_epoch, "metrics": _plain_metrics(metrics), "rng": capture_rng_state(),
                          "config": to_dict(job.config)}, epoch, is_best=is_best)
    elapsed = time.perf_counter() - t_start
    logger.close()
    if not metrics and history:  # resumed after the last epoch: score the final weights once
        metrics = job.evaluate(job.model)
    summary: dict[str, Any] = {"output_dir": str(out), "init": "pre-trained" if job.init_report else "random",
                               "epochs": run.epochs, "updates": engine.step, "train_seconds": elapsed,
                               **{k: metrics[k] for k in job.metric_keys if k in metrics},
                               f"best_{job.best_key}": best, "best_epoch": best_epoch,
                               "first_epoch_loss": history[0]["epoch_loss"] if history else None,
                               "last_epoch_loss": history[-1]["epoch_loss"] if history else None,
                               "checkpoint": str(manager.last_path)}
    (out / "metrics_final.json").write_text(json.dumps(_plain_metrics(metrics), indent=1))
    try:
        plot_curves(out / "metrics.jsonl", out / "curves.png", keys=("loss", "lr", job.best_key))
        summary["curves_png"] = str(out / "curves.png")
    except (MAEError, OSError, ValueError) as e:  # a plot is a convenience; never fail a finished run for it
        log.warning("could not draw curves.png: %s", e)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _plain_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(metrics, default=float))


def load_task_checkpoint(weights: str | Path, fmt: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(task spec, model state_dict, path) of a task run's checkpoint, or of a run directory's best / last one."""
    path = Path(weights).expanduser()
    if path.is_dir():
        for name in ("checkpoint-best.pth", "checkpoint-last.pth"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"run directory '{weights}' holds no checkpoint-best.pth or checkpoint-last.pth")
    state = safe_load(path)
    if state.get("format") != fmt or "task" not in state:
        raise CheckpointError(f"'{path}' is not a checkpoint of a {fmt} run (format {state.get('format')!r})")
    return state["task"], state["model"], path


def prepare_run(run: TransferRun) -> tuple[torch.device, str, Path]:
    """Device, resolved precision and output folder; seeds every generator."""
    device = single_process_device(run.device)
    precision = resolve_precision(run.precision, device)
    out = prepare_output_dir(run.output_dir)
    seed_everything(run.seed)
    return device, precision, out


def eval_progress(enabled: bool, desc: str) -> Callable[[Any], Any]:
    return lambda it: progress(it, desc=desc, enabled=enabled)
