"""What the detection and segmentation recipes share: the backbone and optimizer config sections, the transfer run
fields, and `transfer_spec`, the `mae.train.spec.TrainSpec` both train through the shared run layer."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from mae.errors import CheckpointError, ConfigError
from mae.files import write_json
from mae.models.loading import LoadReport
from mae.recipes.common import resolve_device, weights_record
from mae.threads import default_workers
from mae.train.checkpoint import safe_load
from mae.train.checkpoint_kinds import describe, kind_of_state
from mae.train.distributed import DistInfo
from mae.train.engine import Engine
from mae.train.metrics_log import draw_curves, progress
from mae.train.precision import resolve_precision
from mae.train.rng import seed_everything
from mae.train.run import Run, TrainFields
from mae.train.run_dir import released_weights, resolve_run
from mae.train.spec import TrainSpec, run_training
from mae.train.trainer import Best, TrainResult
from mae.transfer.backbone import PYRAMIDS, ViTPyramid, backbone_param_groups, build_backbone
from mae.transfer.segmentation import PolySchedule
from mae.transfer.synthetic import SyntheticSpec

log = logging.getLogger("mae")

BACKBONE_INITS = ("pretrained", "random")
"""Where a transfer backbone's weights come from (``backbone.init``)."""
TRANSFER_MODES = ("train", "evaluate")
"""What a `mae detect` / `mae segment` run does (the ``mode`` field)."""


@dataclass
class BackboneSection:
    """Which encoder to start from and how to turn it into a pyramid."""

    checkpoint: str | None = field(default=None, metadata={
        "help": "MAE / reference / Hugging Face / timm checkpoint (any format the library reads), or released "
                "weights by name (official:mae_pretrain_vit_base, hf:<org/repo>, timm:<tag>)"})
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

    RANGES: ClassVar[dict[str, str]] = {"drop_path": "[0, 1)"}

    def validate(self) -> None:
        if self.init not in BACKBONE_INITS:
            raise ConfigError(f"backbone.init '{self.init}' is not one of {', '.join(BACKBONE_INITS)}")
        if self.pyramid not in PYRAMIDS:
            raise ConfigError(f"backbone.pyramid '{self.pyramid}' is not one of {', '.join(PYRAMIDS)}")

    def pyramid_kwargs(self) -> dict[str, Any]:
        """`ViTPyramid` arguments beyond the architecture and the fields above (the segmentation section adds its
        BEiT-style choices)."""
        return {}

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

    RANGES: ClassVar[dict[str, str]] = {"lr": "> 0", "min_lr": ">= 0", "weight_decay": ">= 0", "layer_decay": "(0, 1]",
                                        "betas": "[0, 1)", "warmup_epochs": ">= 0", "clip_grad": "> 0"}


@dataclass
class TransferRun(TrainFields):
    """Fields every transfer recipe has (train and evaluate), on top of the shared run fields."""

    output_dir: str = field(default="runs/transfer", metadata={"help": "checkpoints, metrics and summary go here"})
    epochs: int = 12
    batch_size: int = field(default=16, metadata={"help": "images per optimizer step (before accumulation)"})
    keep_last: int = field(default=0, metadata={"help": "numbered epoch checkpoints kept besides last/best"})
    mode: str = field(default="train", metadata={"help": "train | evaluate (scores `weights` on the val split)"})
    weights: str | None = field(default=None, metadata={
        "help": "mode=evaluate: a run directory (its result, see docs/robustness.md) or a checkpoint-*.pth"})
    eval_batch_size: int = 8
    eval_every: int = field(default=1, metadata={"help": "evaluate every N epochs (and after the last)"})
    num_workers: int = field(default_factory=default_workers, metadata={
        "help": "DataLoader worker processes (default: this process's share of the CPUs less one, at most 8)"})

    RESUME_FREE: ClassVar[tuple[str, ...]] = (*TrainFields.RESUME_FREE, "mode", "weights", "eval_batch_size",
                                              "eval_every", "num_workers")

    def validate(self) -> None:
        super().validate()
        if self.mode not in TRANSFER_MODES:
            raise ConfigError(f"mode '{self.mode}' is not one of {', '.join(TRANSFER_MODES)}")
        if self.mode == "evaluate" and not self.weights:
            raise ConfigError("mode=evaluate needs weights=<run directory or checkpoint>")
        if self.eval_batch_size < 1 or self.eval_every < 1 or self.num_workers < 0:
            raise ConfigError("eval_batch_size and eval_every must be >= 1 and num_workers >= 0")


# ---------------------------------------------------------------------------------------------------- building
def make_backbone(section: BackboneSection, img_size: int) -> tuple[ViTPyramid, LoadReport | None]:
    """The section's backbone at ``img_size`` (unless ``section.img_size`` is set)."""
    arch = {"num_heads": section.num_heads} if section.num_heads is not None else {}
    return build_backbone(section.checkpoint, model_name=section.model_name, pretrained=section.init == "pretrained",
                          img_size=section.img_size or img_size, arch_overrides=arch, pyramid=section.pyramid,
                          strides=section.strides, rel_pos_bias=section.rel_pos_bias,
                          drop_path_rate=section.drop_path, **section.pyramid_kwargs())


def backbone_weights(section: BackboneSection) -> dict[str, Any] | None:
    """Name, source, checksum and licence of the released weights the backbone starts from (``backbone.checkpoint``
    a weights name, ``init=pretrained``), for config.yaml's run record; None otherwise. Read from the cache
    `make_backbone` filled, not downloaded again."""
    if section.init != "pretrained" or section.checkpoint is None:
        return None
    weights = released_weights(section.checkpoint)
    return weights.provenance() if weights is not None else None


def backbone_spec(backbone: ViTPyramid) -> dict[str, Any]:
    """The `ViTPyramid` arguments that rebuild ``backbone`` (stored in task checkpoints)."""
    block = backbone.blocks[0]
    return {"img_size": list(backbone.img_size), "patch_size": backbone.patch_size,
            "in_chans": backbone.patch_embed.proj.in_channels, "embed_dim": backbone.embed_dim,
            "depth": backbone.depth, "num_heads": block.attn.num_heads,  # type: ignore[union-attr]  # Module.__getattr__ gives Tensor | Module
            "mlp_ratio": block.mlp.fc1.out_features / backbone.embed_dim, "norm_eps": backbone.norm.eps,  # type: ignore[operator, union-attr]  # Module.__getattr__ gives Tensor | Module
            "pyramid": backbone.pyramid, "strides": list(backbone.strides),
            "rel_pos_bias": backbone.rel_pos_bias is not None, **backbone.pyramid_options()}


def single_process_device(name: str) -> torch.device:
    """The run's device; these recipes run as one process (torchrun with several processes is refused)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ConfigError("detection / segmentation runs use one process (one GPU or the CPU); launch without "
                          "torchrun or with --nproc-per-node 1")
    return resolve_device(name)


def _single_process(name: str) -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, device=single_process_device(name), is_main=True)


# ---------------------------------------------------------------------------------------------------- the spec
def run_transfer(cfg: TransferRun, kind: str, build: Callable[[Run], TrainSpec]) -> dict[str, Any]:
    """Train a transfer recipe's spec (`transfer_spec`, built in the started run) in one process."""
    return run_training(cfg, _single_process(cfg.device), kind, build)


def transfer_spec(run: Run, *, model: nn.Module, backbone: ViTPyramid, backbone_prefix: str, train_set: Any,
                  train_loader: DataLoader, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                  evaluate: Callable[[nn.Module], dict[str, Any]], best_key: str, task: dict[str, Any],
                  init_report: LoadReport | None = None, metric_keys: tuple[str, ...] = (),
                  weights: Mapping[str, Any] | None = None) -> TrainSpec:
    """What a transfer recipe trains: `model` end to end with layer-wise lr decay on the `backbone` (its parameters
    named under `backbone_prefix`, e.g. 'backbone.body.'), `evaluate` on the val split every ``eval_every`` epochs and
    after the last, the highest `best_key` as checkpoint-best.pth, `task` (what rebuilds the model without the
    pre-training checkpoint) in every checkpoint; `metric_keys` go into the summary; `weights` (the provenance of
    released weights the backbone came from, `backbone_weights`) goes into config.yaml's run record."""
    cfg, out = run.cfg, run.out
    optim = cfg.optim  # type: ignore[attr-defined]  # the transfer recipes' configs (TrainFields subclasses) have it
    eval_every = cfg.eval_every  # type: ignore[attr-defined]  # as optim: a `TransferRun` field
    groups = backbone_param_groups(model, backbone, backbone_prefix, optim.weight_decay, optim.layer_decay)
    write_json(out / "param_groups.json", [{"lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"],
                                            "params": g["param_names"]} for g in groups], indent=1)
    schedule = None
    if getattr(optim, "schedule", "cosine") == "poly":  # BEiT's ADE20K schedule (the segmentation recipe's default)
        def schedule(peak: float, total: int) -> PolySchedule:
            return PolySchedule(peak, total, optim.warmup_iters, optim.min_lr, optim.power)

    last_metrics: dict[str, Any] = {}

    def evaluate_epoch(epoch: int) -> dict[str, Any]:
        last_metrics.clear()
        last_metrics.update(evaluate(model))
        return {k: v for k, v in last_metrics.items() if isinstance(v, (int, float))}

    def on_start(engine: Engine) -> None:
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        n_backbone = sum(p.numel() for p in backbone.parameters()) / 1e6
        log.info("%s: %.2f M parameters (backbone %.2f M, %s init); %d training images, %d updates per epoch; peak "
                 "lr %.3g, layer decay %s; precision %s on %s", run.format, n_params, n_backbone,
                 "pre-trained" if init_report is not None else "random", len(train_set),
                 len(train_loader) // cfg.accum_iter, optim.lr, optim.layer_decay, run.precision, run.device)

    def summarize(result: TrainResult) -> dict[str, Any]:
        if not last_metrics:  # resumed after the last epoch: score the final weights once
            evaluate_epoch(cfg.epochs - 1)
        history, best = result.history, result.best
        summary: dict[str, Any] = {"output_dir": str(out), "init": "pre-trained" if init_report else "random",
                                   "epochs": cfg.epochs, "updates": result.updates,
                                   "train_seconds": result.train_seconds,
                                   **{k: last_metrics[k] for k in metric_keys if k in last_metrics},
                                   f"best_{best_key}": best["value"], "best_epoch": best["epoch"],
                                   "first_epoch_loss": history[0]["epoch_loss"] if history else None,
                                   "last_epoch_loss": history[-1]["epoch_loss"] if history else None,
                                   "checkpoint": str(result.last_path)}
        write_json(out / "metrics_final.json", _plain_metrics(last_metrics), indent=1)
        summary.update(draw_curves(out, ("loss", "lr", best_key)))
        return summary

    return TrainSpec(model=model, train_set=train_set, loader=train_loader, loss_fn=loss_fn, param_groups=groups,
                     optimizer="adamw", optim={"lr": optim.lr, "warmup_epochs": optim.warmup_epochs,
                                               "min_lr": optim.min_lr, "betas": tuple(optim.betas),
                                               "weight_decay": optim.weight_decay, "clip_grad": optim.clip_grad},
                     best=Best(best_key, "max"), summarize=summarize, meta={"task": task}, evaluate=evaluate_epoch,
                     eval_every=eval_every, checkpointing=backbone, schedule=schedule, on_start=on_start,
                     run_info=weights_record(weights))


def _plain_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(metrics, default=float))


def load_task_checkpoint(weights: str | Path, fmt: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(task spec, model state_dict, path) of a task run's checkpoint, or of a run directory (`resolve_run`: its
    best checkpoint once finished, else its newest)."""
    path = resolve_run(weights)
    state = safe_load(path)
    if state.get("format") != fmt or "task" not in state:
        command = fmt.removeprefix("mae-")
        raise CheckpointError(f"{describe(path, kind_of_state(state))}; mode=evaluate scores a checkpoint of a "
                              f"`mae {command}` run (its run directory or checkpoint-best.pth)")
    return state["task"], state["model"], path


def evaluation_setup(cfg: TransferRun) -> tuple[torch.device, str, Path]:
    """Device, resolved precision and output folder of a mode=evaluate run (no training: no run lock)."""
    device = single_process_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    out = Path(cfg.output_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output directory '{out}': {e.strerror or e}; choose another "
                          f"--output-dir") from e
    seed_everything(cfg.seed)
    return device, precision, out


def eval_progress(enabled: bool, desc: str) -> Callable[[Any], Any]:
    return lambda it: progress(it, desc=desc, enabled=enabled)
