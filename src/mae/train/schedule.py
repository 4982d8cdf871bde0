"""Learning-rate schedule of the MAE recipes: linear warm-up from 0, then a half-cycle cosine down to `min_lr`.

The reference updates the lr every iteration (not every epoch); steps here are optimizer steps.
"""

from __future__ import annotations

import math

import torch

from mae.errors import ConfigError

__all__ = ["apply_lr", "lr_at", "scaled_lr"]


def lr_at(step: float, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """The lr at optimizer step `step` (0-based): ``peak * step / warmup`` during warm-up, then cosine to `min_lr`.

    Past `total_steps` the lr stays at `min_lr`. A warm-up longer than the run (tiny debug runs) just never
    reaches the cosine part.
    """
    if total_steps <= 0:
        raise ConfigError(f"total_steps must be > 0, got {total_steps}; check epochs and the dataset size")
    if warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group['lr_scale']`` (layer-wise decay; scale 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule of the paper: ``lr = base_lr * effective_batch / 256``."""
    if effective_batch <= 0:
        raise ConfigError(f"effective batch size must be > 0, got {effective_batch}")
    return base_lr * effective_batch / 256
