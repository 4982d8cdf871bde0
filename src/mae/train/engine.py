"""The training loop every recipe shares: precision, gradient accumulation, per-iteration lr schedule, gradient
clipping, non-finite-loss guard, DDP ``no_sync``, progress bar and metrics.

A recipe supplies a ``loss_fn(model, batch) -> loss`` (the mean over the batch) and the loop does the rest:

    engine = Engine(model, optimizer, schedule, precision="bf16", accum_iter=2)
    for epoch in range(start, epochs):
        stats = engine.train_epoch(loader, epoch, loss_fn)

With several processes (DDP) the logged per-step loss and the epoch loss are means over every process's
micro-batches (one all-reduce per update, shared with the non-finite vote), so every rank reports the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mae.errors import TrainingError
from mae.train.logging import MetricsLogger, progress
from mae.train.precision import autocast_context, make_grad_scaler
from mae.train.schedule import apply_lr, lr_at

LossFn = Callable[[nn.Module, object], torch.Tensor]

_log = logging.getLogger(__name__)


@dataclass
class LRSchedule:
    """Linear warm-up from 0 then half-cycle cosine to ``min_lr``, stepped once per optimizer update."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr)


@dataclass
class EpochStats:
    loss: float  # mean of the finite micro-batch losses of the epoch, over all processes
    lr: float  # lr at the last update
    images: int  # images seen by this process
    seconds: float
    skipped_steps: int  # optimizer updates skipped for a non-finite loss
    extra: dict = field(default_factory=dict)


class Engine:
    """Owns the optimizer step logic; holds the position in the schedule (``step`` = updates done)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: LRSchedule, *,
                 precision: str = "fp32", device: torch.device | str = "cpu", accum_iter: int = 1,
                 clip_grad: float | None = None, max_nonfinite: int = 5, logger: MetricsLogger | None = None,
                 log_every: int = 20, show_progress: bool = True, world_size: int = 1):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.device = torch.device(device)
        self.precision, self.accum_iter, self.clip_grad = precision, accum_iter, clip_grad
        self.scaler = make_grad_scaler(precision, self.device)
        self.max_nonfinite, self.logger, self.log_every = max_nonfinite, logger, log_every
        self.show_progress, self.world_size = show_progress, world_size
        self.step = 0  # optimizer updates done: the schedule position
        self.nonfinite_total = 0
        self._nonfinite_streak = 0

    # -------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "nonfinite_total": self.nonfinite_total,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    # -------------------------------------------------------------------------------------------------------------
    def _ddp(self) -> DistributedDataParallel | None:
        model = getattr(self.model, "_orig_mod", self.model)  # look through torch.compile's wrapper
        return model if isinstance(model, DistributedDataParallel) else None

    def _sync_context(self, boundary: bool):
        """Skip DDP's gradient all-reduce on micro-batches that do not end an accumulation window."""
        ddp = self._ddp()
        if ddp is not None and not boundary:
            return ddp.no_sync()
        return contextlib.nullcontext()

    def _reduce_window(self, loss_sum: float, count: int, finite: bool) -> tuple[float, int, bool]:
        """(sum of losses, number of micro-batches, all finite) of the window over every process, in one all-reduce:
        every process must agree to skip, or the DDP replicas would diverge."""
        if self.world_size == 1:
            return loss_sum, count, finite
        t = torch.tensor([loss_sum if finite else 0.0, float(count), 0.0 if finite else 1.0], dtype=torch.float64,
                         device=self.device)
        torch.distributed.all_reduce(t)
        total, n, bad = t.tolist()
        return total, int(n), bad == 0

    def _update(self, window_finite: bool) -> bool:
        """End of an accumulation window: step the optimizer, or skip it if any micro-batch loss was non-finite
        (`window_finite` is already agreed between processes)."""
        if not window_finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_total += 1
            self._nonfinite_streak += 1
            _log.warning("update %d skipped: non-finite loss (%d in a row, %d in total; the run stops at %d in a row)",
                         self.step + 1, self._nonfinite_streak, self.nonfinite_total, self.max_nonfinite)
            if self._nonfinite_streak >= self.max_nonfinite:
                raise TrainingError(
                    f"loss was non-finite for {self._nonfinite_streak} consecutive steps (step {self.step}); "
                    f"lower the learning rate, use --precision fp32, or check the data; the last good "
                    f"checkpoint is untouched")
            return False
        self._nonfinite_streak = 0
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return True

    def train_epoch(self, loader: Iterable, epoch: int, loss_fn: LossFn, num_batches: int | None = None,
                    batch_size_of: Callable[[object], int] = lambda b: len(b[0])) -> EpochStats:
        """One pass over ``loader``; updates the lr before every optimizer step (per iteration, as the reference).

        Micro-batches left over after the last full accumulation window are not used, so every update
        sees exactly ``accum_iter`` micro-batches (the same rule as the reference's per-window updates).
        A window with a non-finite loss on any process is skipped by all of them (no update, counted, logged).
        """
        self.model.train()
        num_batches = num_batches if num_batches is not None else len(loader)  # type: ignore[arg-type]
        usable = num_batches - num_batches % self.accum_iter
        if usable == 0:
            raise TrainingError(f"an epoch has {num_batches} batches, fewer than accum_iter={self.accum_iter}; "
                                f"lower accum_iter or the batch size")
        bar = progress(range(usable), total=usable, desc=f"epoch {epoch}", enabled=self.show_progress)
        it = iter(loader)
        loss_sum, loss_count, images = 0.0, 0, 0  # finite windows of the epoch, all processes
        window_sum, window_count, window_finite = 0.0, 0, True  # this process's current window
        log_images, log_t0 = 0, time.perf_counter()
        t0 = time.perf_counter()
        lr = self.schedule(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        for i in bar:
            batch = next(it)
            boundary = (i + 1) % self.accum_iter == 0
            if i % self.accum_iter == 0:
                lr = self.schedule(self.step)
                apply_lr(self.optimizer, lr)
            with self._sync_context(boundary):
                with autocast_context(self.precision, self.device):
                    loss = loss_fn(self.model, batch)
                loss_value = loss.item()
                finite = math.isfinite(loss_value)
                # Backward even a non-finite loss: under DDP every process must join the gradient all-reduce;
                # the window's gradients are discarded below when any loss in it was non-finite.
                self.scaler.scale(loss / self.accum_iter).backward()
                window_sum, window_count = window_sum + (loss_value if finite else 0.0), window_count + 1
                window_finite &= finite
            n = batch_size_of(batch)
            images += n
            log_images += n
            if boundary:
                total, count, all_finite = self._reduce_window(window_sum, window_count, window_finite)
                window_sum, window_count, window_finite = 0.0, 0, True
                step_loss = total / count if all_finite else float("nan")
                if all_finite:
                    loss_sum, loss_count = loss_sum + total, loss_count + count
                updated = self._update(all_finite)
                if self.step % self.log_every == 0 or not updated or i + 1 == usable:
                    now = time.perf_counter()
                    ips = log_images * self.world_size / max(now - log_t0, 1e-9)
                    log_images, log_t0 = 0, now
                    record = {"epoch": epoch, "step": self.step, "loss": step_loss, "lr": lr,
                              "images_per_sec": ips, "skipped_steps": self.nonfinite_total}
                    if self.logger is not None:
                        self.logger.log(record)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
        if hasattr(bar, "close"):
            bar.close()
        mean_loss = loss_sum / loss_count if loss_count else float("nan")
        return EpochStats(loss=mean_loss, lr=lr, images=images, seconds=time.perf_counter() - t0,
                          skipped_steps=self.nonfinite_total)
