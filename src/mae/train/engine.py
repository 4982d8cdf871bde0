"""The inner training loop every recipe shares: precision, gradient accumulation, per-iteration lr schedule, gradient
clipping, the non-finite-loss guard, DDP ``no_sync`` (FSDP's gradient-sync switch), progress bar and per-step
metrics.

A recipe supplies a ``loss_fn(model, batch) -> loss`` (the mean over the batch); the loop does the rest, and the
run layer (`mae.train.trainer.Trainer`) drives it epoch by epoch:

    engine = Engine(model, optimizer, schedule, precision="bf16", accum_iter=2)
    stats = engine.train_epoch(loader, epoch, loss_fn, num_batches=len(loader))

**No host synchronisation per micro-batch.** Losses and the non-finite flag of an accumulation window stay on the
device; the host reads them at log steps (every ``log_every`` updates and at the end of an epoch). An update whose
window held a non-finite loss on any process is skipped exactly (no parameter, moment or step-count change): with
torch's fused optimizers (AdamW / Adam / SGD with ``fused=True``, the default here) the skip happens on the device,
through the ``found_inf`` tensor those optimizers accept (the contract `torch.amp.GradScaler` uses), so an update
costs no host synchronisation either; other optimizers (LARS, fp16 with a grad scaler) read the flag once per update.
Under DDP the flag is agreed with one small all-reduce per update (asynchronous on NCCL).

The schedule advances once per accumulation window, skipped or not (as the reference's per-iteration schedule), so
``step`` counts windows: the run's position. The logged per-step loss and the epoch loss are means over every
process's finite windows.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

from mae.errors import TrainingError
from mae.train.metrics_log import MetricsLogger, progress
from mae.train.precision import autocast_context, make_grad_scaler
from mae.train.schedule import apply_lr, lr_at

LossFn = Callable[[nn.Module, object], torch.Tensor]
AfterUpdate = Callable[[int, Callable[[], "EpochProgress"]], bool]
"""Called after every update with the micro-batches of the epoch done so far and a snapshot function of the epoch's
running sums; a true result stops the epoch."""

_log = logging.getLogger(__name__)


@dataclass
class LRSchedule:
    """Linear warm-up from 0 then half-cycle cosine to ``min_lr``, stepped once per accumulation window."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr)


@dataclass
class EpochProgress:
    """The running sums of an epoch (what a checkpoint in the middle of an epoch must carry so that the resumed
    epoch reports the same mean loss): finite windows' loss sum and micro-batch count, skipped updates."""

    loss_sum: float = 0.0
    count: int = 0
    skipped: int = 0

    def to_dict(self) -> dict:
        return {"loss_sum": self.loss_sum, "count": self.count, "skipped": self.skipped}

    @classmethod
    def from_dict(cls, d: dict | None) -> EpochProgress:
        return cls(**d) if d else cls()


@dataclass
class EpochStats:
    loss: float  # mean of the finite micro-batch losses of the epoch, over all processes
    lr: float  # lr at the last update
    images: int  # images seen by this process in this call
    seconds: float
    skipped_steps: int  # updates of this epoch skipped for a non-finite loss (a resumed part included)
    batches: int = 0  # micro-batches of the epoch done when the call returned
    stopped: bool = False  # True when `after_update` ended the epoch early
    progress: EpochProgress = field(default_factory=EpochProgress)


def _fsdp_root(model: nn.Module) -> FSDPModule | None:
    """The outermost FSDP-sharded module inside `model` (the model, or the module a wrapper calls), or None."""
    import sys

    if "torch.distributed.fsdp" not in sys.modules:  # nothing can be sharded: do not import it for nothing
        return None
    from torch.distributed.fsdp import FSDPModule

    return next((m for m in getattr(model, "_orig_mod", model).modules() if isinstance(m, FSDPModule)), None)


@contextlib.contextmanager
def _fsdp_no_sync(root):
    """FSDP's counterpart of DDP's ``no_sync``: gradients accumulate unreduced until the window's last micro-batch."""
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch's fused optimizers, which skip an update on the device when given a ``found_inf`` flag."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)) and bool(
        optimizer.defaults.get("fused"))


class Engine:
    """Owns the optimizer step logic; holds the position in the schedule (``step`` = accumulation windows done)."""

    effective_batch: int  # set by `mae.train.trainer.build_engine` (for the recipes' start-of-run log line)
    peak_lr: float

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Callable[[int], float], *,
                 precision: str = "fp32", device: torch.device | str = "cpu", accum_iter: int = 1,
                 clip_grad: float | None = None, max_nonfinite: int = 5, logger: MetricsLogger | None = None,
                 log_every: int = 20, show_progress: bool = True, world_size: int = 1):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.device = torch.device(device)
        self.precision, self.accum_iter, self.clip_grad = precision, accum_iter, clip_grad
        self.scaler = make_grad_scaler(precision, self.device)
        self.max_nonfinite, self.logger, self.log_every = max_nonfinite, logger, log_every
        self.show_progress, self.world_size = show_progress, world_size
        self.device_skip = supports_device_skip(optimizer) and not self.scaler.is_enabled()
        self.step = 0  # accumulation windows done: the schedule position
        self.skipped_total = 0  # of them, updates skipped for a non-finite loss
        self.epoch_skipped = 0  # updates of the current epoch skipped (host view, after the last read)
        self.on_update: Callable[[], None] | None = None  # called after each applied update (e.g. an EMA)
        self._streak = 0  # consecutive skipped updates up to the last host read
        self._counters: torch.Tensor | None = None  # on the device: [skipped total, streak, longest streak]
        self._fsdp_root = _fsdp_root(model)
        # where the optimizer steps: the device, or the host for FSDP's CPU offload (its found_inf flag goes there)
        self._step_device = next((p.device for g in optimizer.param_groups for p in g["params"]), self.device)

    # -------------------------------------------------------------------------------------------------------------
    @property
    def nonfinite_total(self) -> int:
        return self.skipped_total

    def state_dict(self) -> dict:
        self._read_counters(check=False)
        return {"step": self.step, "skipped_total": self.skipped_total, "streak": self._streak,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_total = int(state.get("skipped_total", state.get("nonfinite_total", 0)))
        self._streak = int(state.get("streak", 0))
        self._counters = None
        if "optimizer" in state:  # a DCP checkpoint restores the (sharded) optimizer itself: mae.train.dcp
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    # -------------------------------------------------------------------------------------------------------------
    def _ddp(self) -> DistributedDataParallel | None:
        model = getattr(self.model, "_orig_mod", self.model)  # look through torch.compile's wrapper
        return model if isinstance(model, DistributedDataParallel) else None

    def _sync_context(self, boundary: bool):
        """Skip DDP's gradient all-reduce (FSDP's reduce-scatter) on micro-batches that do not end an accumulation
        window."""
        ddp = self._ddp()
        if ddp is not None and not boundary:
            return ddp.no_sync()
        if not boundary and self._fsdp_root is not None:
            return _fsdp_no_sync(self._fsdp_root)
        return contextlib.nullcontext()

    def _agree(self, bad: torch.Tensor) -> torch.Tensor:
        """The window's non-finite flag, true on every process when it is true on any (one small all-reduce)."""
        if self.world_size == 1:
            return bad
        flag = bad.to(torch.float32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag > 0

    def _global_mean(self, value: torch.Tensor) -> float:
        """Mean of a scalar over the processes (a host read: only at log steps)."""
        if self.world_size == 1:
            return float(value)
        v = value.detach().clone()
        torch.distributed.all_reduce(v)
        return float(v) / self.world_size

    def _update(self, bad: torch.Tensor) -> None:
        """End of an accumulation window: step the optimizer unless `bad` (agreed between processes) is set."""
        if self.device_skip and self.on_update is None:
            if self.clip_grad is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            # fused kernels leave every tensor untouched when 1
            self.optimizer.found_inf = bad.to(self._step_device, torch.float32)  # type: ignore[attr-defined]  # torch's fused optimizers read found_inf / grad_scale as GradScaler sets them
            self.optimizer.grad_scale = None  # type: ignore[attr-defined]  # as above
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale  # type: ignore[attr-defined]  # as above
        elif not bool(bad):  # one host read per update for optimizers that cannot skip on the device
            if self.clip_grad is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.on_update is not None:
                self.on_update()
        self.optimizer.zero_grad(set_to_none=True)
        if self._counters is None:
            self._counters = self._fresh_counters(bad.device)
        b = bad.to(torch.int64)
        c = self._counters
        streak = (c[1] + 1) * b
        self._counters = torch.stack([c[0] + b, streak, torch.maximum(c[2], streak)])
        self.step += 1

    def _fresh_counters(self, device: torch.device) -> torch.Tensor:
        """[skipped since the last read, current run of skipped updates, longest run since the last read]; the run
        carries on from the host's count so that it spans reads."""
        return torch.tensor([0, self._streak, self._streak], dtype=torch.int64, device=device)

    def _read_counters(self, check: bool = True) -> int:
        """Fold the device counters into the host ones (a host read: log steps and epoch ends only); returns the
        updates skipped since the last read. Raises TrainingError after `max_nonfinite` skipped updates in a row
        (unless `check` is false)."""
        if self._counters is None:
            return 0
        device = self._counters.device
        skipped, self._streak, longest = (int(v) for v in self._counters.tolist())
        self._counters = self._fresh_counters(device)  # made right after the read: the host waits for nothing here
        self.skipped_total += skipped
        self.epoch_skipped += skipped
        if skipped:
            _log.warning("%d update(s) skipped for a non-finite loss by update %d (%d in total; the run stops at %d "
                         "in a row)", skipped, self.step, self.skipped_total, self.max_nonfinite)
        if check and longest >= self.max_nonfinite:
            raise TrainingError(
                f"loss was non-finite for {longest} consecutive updates (by update {self.step}); lower the learning "
                f"rate, use --precision fp32, or check the data; the last good checkpoint is untouched")
        return skipped

    def train_epoch(self, loader: Iterable, epoch: int, loss_fn: LossFn, num_batches: int | None = None,
                    batch_size_of: Callable[[Any], int] = lambda b: len(b[0]), *, start_batch: int = 0,
                    progress_so_far: EpochProgress | None = None, after_update: AfterUpdate | None = None
                    ) -> EpochStats:
        """One pass over ``loader``; the lr is set before every update (per iteration, as the reference).

        ``num_batches`` is the length of the whole epoch (default ``len(loader)``); ``start_batch`` micro-batches of
        it are already done (a resumed epoch: ``loader`` then yields the rest) and ``progress_so_far`` holds their
        sums. Micro-batches left over after the last full accumulation window are not used, so every update sees
        exactly ``accum_iter`` micro-batches (the same rule as the reference's per-window updates).

        ``after_update(batches_done, snapshot)`` runs after every update; ``snapshot()`` gives the epoch's running
        sums (a collective under DDP: call it on every rank or none) and a true return value ends the epoch there.

        It is one function of about 100 lines on purpose: the hot loop (accumulation windows, the resume position,
        non-finite updates, the progress bar) reads top to bottom in one place.
        """
        self.model.train()
        num_batches = num_batches if num_batches is not None else len(loader)  # type: ignore[arg-type]
        usable = num_batches - num_batches % self.accum_iter
        if usable == 0:
            raise TrainingError(f"an epoch has {num_batches} batches, fewer than accum_iter={self.accum_iter}; "
                                f"lower accum_iter or the batch size")
        if start_batch % self.accum_iter or not 0 <= start_batch <= usable:
            raise TrainingError(f"cannot resume epoch {epoch} at batch {start_batch}: not the end of an accumulation "
                                f"window of {self.accum_iter} within {usable} batches")
        before = progress_so_far or EpochProgress()
        self._read_counters()
        self.epoch_skipped = before.skipped
        bar = progress(range(start_batch, usable), total=usable, desc=f"epoch {epoch}", enabled=self.show_progress)
        if start_batch and hasattr(bar, "n"):
            bar.n = start_batch
        acc_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        sums: list[torch.Tensor | None] = [None, None]  # this call's finite-window loss sum and count, on the device
        window_loss = window_bad = last_loss = None

        def snapshot() -> EpochProgress:
            """The epoch's sums so far, over every process."""
            total, count = 0.0, 0
            if sums[0] is not None:
                both = torch.stack([sums[0], sums[1]])  # type: ignore[list-item]  # sums[1] is set together with sums[0]
                if self.world_size > 1:
                    torch.distributed.all_reduce(both)
                total, n = both.tolist()
                count = round(n)
            self._read_counters(check=False)
            return EpochProgress(before.loss_sum + total, before.count + count, self.epoch_skipped)

        it = iter(loader)
        images, log_images, log_t0, t0 = 0, 0, time.perf_counter(), time.perf_counter()
        lr = self.schedule(self.step)
        stopped, batches_done = False, start_batch
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
                value = loss.detach().to(acc_dtype)
                if window_loss is None:
                    window_loss, window_bad = value, ~torch.isfinite(value)
                else:
                    window_loss, window_bad = window_loss + value, window_bad | ~torch.isfinite(value)  # type: ignore[operator]  # window_bad is set together with window_loss
                # Backward even a non-finite loss: under DDP every process must join the gradient all-reduce; the
                # window's update is skipped below when any loss in it was non-finite.
                self.scaler.scale(loss / self.accum_iter).backward()
            n = batch_size_of(batch)
            images += n
            log_images += n
            if not boundary:
                continue
            bad = self._agree(window_bad)
            self._update(bad)
            batches_done = i + 1
            kept = torch.where(bad, torch.zeros_like(window_loss), window_loss)
            count = (~bad).to(acc_dtype) * self.accum_iter
            sums = [kept, count] if sums[0] is None else [sums[0] + kept, sums[1] + count]  # type: ignore[operator]  # sums[1] is set together with sums[0]
            last_loss = torch.where(bad, torch.full_like(window_loss, float("nan")), window_loss / self.accum_iter)
            window_loss = window_bad = None
            stopped = after_update is not None and bool(after_update(batches_done, snapshot))
            if self.step % self.log_every == 0 or batches_done == usable or stopped:
                step_loss = self._global_mean(last_loss)
                self._read_counters()
                now = time.perf_counter()
                ips = log_images * self.world_size / max(now - log_t0, 1e-9)
                log_images, log_t0 = 0, now
                record = {"epoch": epoch, "step": self.step, "loss": step_loss, "lr": lr, "images_per_sec": ips,
                          "skipped_steps": self.skipped_total}
                if self.logger is not None:
                    self.logger.log(record)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
            if stopped:
                break
        if hasattr(bar, "close"):
            bar.close()
        done = snapshot()
        self._read_counters()
        mean_loss = done.loss_sum / done.count if done.count else float("nan")
        return EpochStats(loss=mean_loss, lr=lr, images=images, seconds=time.perf_counter() - t0,
                          skipped_steps=done.skipped, batches=batches_done, stopped=stopped, progress=done)
