"""The one outer loop of every training recipe (pre-training, fine-tuning / partial / from scratch, linear probing,
detection, segmentation, the demo's stages): resume, epochs, evaluation, the best metric, checkpoints, preemption and
the per-epoch log line. Recipes differ in what they build (model, data, loss, evaluation), never in this loop: they
fill a `mae.train.spec.TrainSpec`, and `mae.train.spec.run_training`, the one place that drives this class, does:

    with start_run(cfg, dist, kind="classify") as run:
        engine = build_engine(run, model, groups, optimizer="adamw", base_lr=1e-3, updates_per_epoch=len(loader))
        trainer = Trainer(run, model=model, engine=engine, loader=loader, loss_fn=loss_fn, best=Best("top1", "max"),
                          evaluate=evaluate, resolved=resolved, data=data_facts(train_set, run), meta=meta)
        result = trainer.fit()
        trainer.finish(summary, result_file="checkpoint-best.pth")

A checkpoint holds the fixed keys of `mae.train.checkpoint_schema.SCHEMA_KEYS`: the model and engine (optimizer,
scaler, schedule position), ``train_state`` (the position (epoch, batch) inside the run, history, the best metric with
its name and direction, the running sums of a half-done epoch), every process's RNG state, the resolved config, the
data's facts and the library versions, plus the recipe's metadata (``meta``: how to rebuild the model). The trainer
saves and restores them through one `mae.train.checkpoint.CheckpointManager`, whatever the backend.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mae.config import save_config
from mae.data import fingerprint, set_epoch
from mae.errors import ConfigError, Interrupted, MAEError
from mae.files import write_json
from mae.train.checkpoint import CheckpointManager
from mae.train.checkpoint_store import TrainingParts, run_record
from mae.train.distributed import all_gather_objects
from mae.train.engine import Engine, EpochProgress, LRSchedule
from mae.train.fsdp import checkpoint_backend, distribute, replicate
from mae.train.metrics_log import MetricsLogger, truncate_metrics
from mae.train.optim import build_optimizer
from mae.train.preemption import SignalStop
from mae.train.rng import capture_rng_state, restore_rng_state
from mae.train.run import Run, check_resume_changes, provenance
from mae.train.run_dir import write_status
from mae.train.schedule import scaled_lr

__all__ = ["Best", "TrainResult", "Trainer", "build_engine", "data_facts", "peak_lr"]

_log = logging.getLogger("mae")


@dataclass
class Best:
    """The metric that picks ``checkpoint-best.pth``, its direction, and how to read it from an epoch's record
    (`score` may return extra facts to keep with the best, e.g. that the EMA weights were the better ones)."""

    metric: str
    mode: str = "max"  # "max" | "min"
    score: Callable[[Mapping[str, Any]], tuple[float | None, dict]] | None = None

    def read(self, record: Mapping[str, Any]) -> tuple[float | None, dict]:
        if self.score is not None:
            return self.score(record)
        value = record.get(self.metric)
        return (float(value) if isinstance(value, (int, float)) else None), {}

    def better(self, value: float, than: float | None) -> bool:
        if than is None or math.isnan(than):
            return not math.isnan(value)
        return value < than if self.mode == "min" else value > than


@dataclass
class TrainResult:
    history: list[dict]
    best: dict  # {"name", "mode", "value", "epoch", ...}
    updates: int
    train_seconds: float  # of this session
    skipped_updates: int
    skipped_epochs: list[int]  # epochs with updates skipped for a non-finite loss (never the best)
    best_path: Path  # checkpoint-best.pth, or the checkpoint-best DCP link under fsdp
    last_path: Path  # the newest checkpoint the run wrote
    last: dict = field(default_factory=dict)  # the last epoch's record


def peak_lr(base_lr: float | None, lr: float | None, effective_batch: int) -> float:
    """The absolute peak lr: ``lr`` when set, else the paper's linear rule ``base_lr x effective batch / 256``."""
    return lr if lr is not None else scaled_lr(base_lr, effective_batch)  # type: ignore[arg-type]  # the recipes pass base_lr whenever lr is None


def build_engine(run: Run, model: nn.Module, groups: list[dict[str, Any]], *, optimizer: str, updates_per_epoch: int,
                 base_lr: float | None = None, lr: float | None = None, warmup_epochs: float = 0.0,
                 min_lr: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 momentum: float = 0.9, clip_grad: float | None = None, train_module: nn.Module | None = None,
                 checkpointing: nn.Module | None = None,
                 schedule: Callable[[float, int], Callable[[int], float]] | None = None) -> Engine:
    """The set-up every recipe shares: the peak lr from the effective batch, the warm-up + cosine schedule, the
    optimizer over `groups`, activation checkpointing, the DDP wrap or FSDP sharding (``distributed.strategy``; and
    torch.compile), and the `Engine`.

    `train_module` is what the engine calls (default `model`; e.g. a `PartiallyFrozen` wrapper), `checkpointing`
    the module whose ``set_grad_checkpointing`` ``grad_checkpointing=true`` turns on (default `model`); `schedule`
    ``(peak lr, total updates) -> lr of an update`` replaces the warm-up + cosine (e.g. BEiT's poly schedule).
    """
    cfg, dist = run.cfg, run.dist
    if updates_per_epoch < 1:
        raise ConfigError(f"an epoch makes no update: fewer batches per process than accum_iter={cfg.accum_iter}; "
                          f"lower batch_size or accum_iter")
    effective = cfg.batch_size * cfg.accum_iter * dist.world_size
    peak = peak_lr(base_lr, lr, effective)
    total, warmup = cfg.epochs * updates_per_epoch, round(warmup_epochs * updates_per_epoch)
    if schedule is None and warmup >= total and warmup > 0 and dist.is_main:
        _log.warning("the warm-up (%g epochs, %d updates) is as long as the run (%d epochs, %d updates): the lr rises "
                     "linearly and never reaches its peak %.3g; shorten optim.warmup_epochs or train longer",
                     warmup_epochs, warmup, cfg.epochs, total, peak)
    lr_of = schedule(peak, total) if schedule is not None else LRSchedule(peak, total_steps=total, warmup_steps=warmup,
                                                                         min_lr=min_lr)
    if cfg.grad_checkpointing:
        target = checkpointing if checkpointing is not None else model
        if not hasattr(target, "set_grad_checkpointing"):
            raise ConfigError(f"grad_checkpointing=true: {type(target).__name__} has no activation checkpointing")
        target.set_grad_checkpointing(True)  # type: ignore[operator]  # Module.__getattr__ gives Tensor | Module
    groups = distribute(run, model, groups)  # fsdp shards `model` in place; the optimizer then holds the shards
    opt = build_optimizer(groups, optimizer, lr=peak, betas=tuple(betas), weight_decay=weight_decay,  # type: ignore[arg-type]  # betas: two floats (tuple() keeps a list from YAML working)
                          momentum=momentum)
    module = replicate(run, train_module if train_module is not None else model)
    if cfg.compile:
        module = torch.compile(module)  # type: ignore[assignment]  # torch.compile of a module returns a module (OptimizedModule)
    engine = Engine(module, opt, lr_of, precision=run.precision, device=run.device, accum_iter=cfg.accum_iter,
                    clip_grad=clip_grad, max_nonfinite=cfg.max_nonfinite, log_every=cfg.log_every,
                    show_progress=cfg.progress and dist.is_main, world_size=dist.world_size)
    engine.effective_batch, engine.peak_lr = effective, peak
    return engine


def data_facts(dataset: Any, run: Run, batches_per_epoch: int | None = None) -> dict[str, Any]:
    """What a resume checks about the training data: its size, a fingerprint of its file list, the effective batch."""
    cfg = run.cfg
    facts = {"effective_batch": cfg.batch_size * cfg.accum_iter * run.dist.world_size, **fingerprint(dataset)}
    if batches_per_epoch is not None:
        facts["batches_per_epoch"] = batches_per_epoch
    return facts


def _fmt_eta(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Trainer:
    """Drives `Engine.train_epoch` over the epochs of a run (see the module docstring).

    Args:
        run: from `mae.train.run.start_run`.
        model: the module whose weights are saved and restored (not a DDP / compile wrapper).
        engine: from `build_engine`.
        loader: the training loader (`mae.data.set_epoch` positions it each epoch).
        loss_fn: ``loss_fn(module, batch) -> loss``.
        num_batches: batches per epoch per process (default ``len(loader)``).
        best: the metric of ``checkpoint-best.pth``; an epoch with skipped updates never becomes the best.
        save_on_best: write a checkpoint whenever the metric improves (classification); else the best is chosen
            among the epochs saved anyway (pre-training, whose checkpoints are large).
        evaluate: ``evaluate(epoch) -> metrics`` after every ``eval_every`` epochs and the last.
        on_epoch_end: ``hook(epoch, record) -> extra metrics or None`` (e.g. a k-NN monitor), before checkpointing.
        resolved: the resolved config (written as config.yaml and into checkpoints; compared on resume).
        data: `data_facts` of the training data (compared on resume).
        meta: recipe metadata stored in every checkpoint (how to rebuild the model, class names, ...).
        extra_state: modules saved and restored by name next to the model (e.g. ``{"model_ema": ema.module}``).
        resume_free: fields a resume may change besides `TrainFields.RESUME_FREE`.
        run_info: facts added to config.yaml's run record (``_run``), e.g. the released weights the run started from.
    """

    _due_at_epoch_end: bool  # a save by time or steps that came due in the last window of an epoch

    def __init__(self, run: Run, *, model: nn.Module, engine: Engine, loader: Any,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor], best: Best, resolved: dict[str, Any],
                 data: dict[str, Any], meta: dict[str, Any] | None = None, num_batches: int | None = None,
                 evaluate: Callable[[int], dict[str, Any]] | None = None, eval_every: int = 1,
                 save_on_best: bool = True, on_epoch_end: Callable[[int, dict], dict | None] | None = None,
                 extra_state: dict[str, nn.Module] | None = None, resume_free: tuple[str, ...] = (),
                 batch_size_of: Callable[[Any], int] = lambda b: len(b[0]),
                 run_info: dict[str, Any] | None = None) -> None:
        self.run, self.model, self.engine, self.loader, self.loss_fn = run, model, engine, loader, loss_fn
        # how the run was launched is not what it computes: a saved config.yaml reused for a new run starts fresh
        resolved = {**resolved, "resume": None, "overwrite": False, "allow_config_change": False}
        self.best, self.resolved, self.data, self.meta = best, resolved, data, dict(meta or {})
        self.num_batches = num_batches if num_batches is not None else len(loader)
        self.evaluate, self.eval_every, self.save_on_best = evaluate, eval_every, save_on_best
        self.on_epoch_end, self.extra_state = on_epoch_end, dict(extra_state or {})
        self.resume_free = tuple(type(run.cfg).RESUME_FREE) + tuple(resume_free)
        self.batch_size_of = batch_size_of
        self.run_info = dict(run_info or {})
        self.parts = TrainingParts(model, engine, self.extra_state)  # what every checkpoint saves, by name
        self.manager = CheckpointManager(run.out, keep_last=run.cfg.keep_last, backend=checkpoint_backend(run))
        self.logger: MetricsLogger | None = None
        self.history: list[dict] = []
        self.best_state: dict[str, Any] = {"name": best.metric, "mode": best.mode, "value": None, "epoch": None}
        self.skipped_epochs: list[int] = []
        self._last_save = time.monotonic()
        self._stop = SignalStop()

    # ------------------------------------------------------------------------------------------------ resume
    def _restore(self, state: dict[str, Any]) -> tuple[int, int, EpochProgress | None]:
        run = self.run
        self.manager.restore(run.resume_path, state, self.parts)  # type: ignore[arg-type]  # a restored state implies resume_path is set
        rng = state.get("rng")
        states = rng if isinstance(rng, list) else ([rng] if rng is not None else [])
        if len(states) == run.dist.world_size:
            restore_rng_state(states[run.dist.rank])
        elif states and run.dist.is_main:
            _log.warning("the checkpoint holds the RNG states of %d process(es), this run has %d: generators are "
                         "re-seeded (per-sample crops and masks stay exact; dropout and mixup draws differ)",
                         len(states), run.dist.world_size)
        ts = state["train_state"]
        self.history = list(ts.get("history") or [])
        saved_best = dict(ts.get("best") or {})
        if saved_best.get("value") is not None:
            self.best_state.update({k: v for k, v in saved_best.items() if k not in ("name", "mode")})
        self.skipped_epochs = list(ts.get("skipped_epochs") or [])
        partial = EpochProgress.from_dict(ts.get("partial")) if ts.get("partial") else None
        return int(ts["epoch"]), int(ts.get("batch", 0)), partial

    def _explain_schedule_change(self, changes: list[tuple]) -> None:
        old_epochs = next((old for key, old, _ in changes if key == "epochs"), None)
        schedule = self.engine.schedule
        if old_epochs is None or not isinstance(schedule, LRSchedule) or not isinstance(old_epochs, int):
            return
        per_epoch = schedule.total_steps // self.run.cfg.epochs
        old = LRSchedule(schedule.peak_lr, old_epochs * per_epoch, schedule.warmup_steps, schedule.min_lr)
        step = self.engine.step
        _log.warning("epochs %d -> %d: the lr schedule is recomputed for %d updates instead of %d, so at update %d the "
                     "lr is %.3g where the old schedule had %.3g%s", old_epochs, self.run.cfg.epochs,
                     schedule.total_steps, old.total_steps, step, schedule(step), old(step),
                     " (it had finished its cosine: training restarts from a higher lr)" if step >= old.total_steps
                     else "")

    # ------------------------------------------------------------------------------------------------ saving
    def _gather_rng(self) -> Any:
        state = capture_rng_state()
        return state if self.run.dist.world_size == 1 else all_gather_objects(state)

    def _save(self, position: tuple[int, int], partial: EpochProgress | None, epoch_end: int | None,
              is_best: bool = False) -> None:
        """Write a checkpoint standing at `position` (a collective: every rank calls it; the store decides who writes
        what, e.g. rank 0 one file, or every rank its shards of one DCP directory)."""
        train_state = {"epoch": position[0], "batch": position[1], "history": self.history, "best": self.best_state,
                       "partial": partial.to_dict() if partial else None, "skipped_epochs": self.skipped_epochs}
        record = run_record(format=self.run.format, kind=self.run.kind, train_state=train_state,
                            rng=self._gather_rng(), config=self.resolved, data=self.data,
                            versions=provenance()["versions"], meta=self.meta)
        path = self.manager.save(record, epoch_end, is_best=is_best, parts=self.parts)
        if self.run.dist.is_main:
            write_status(self.run.out, status="running", checkpoint=path.name, step=self.engine.step,  # type: ignore[union-attr]  # saved above on the main rank
                         position=list(position))
            total = self.run.cfg.epochs  # messages count epochs from 1, as the per-epoch line does
            where = f"end of epoch {epoch_end + 1}/{total}" if epoch_end is not None else \
                f"epoch {position[0] + 1}/{total}, batch {position[1]}"
            _log.info("saved %s (%s, update %d)", path.name, where, self.engine.step)  # type: ignore[union-attr]  # saved above on the main rank
        self._last_save = time.monotonic()

    def _agreed(self, *flags: bool) -> list[bool]:
        """Flags true on any process (a small all-reduce under DDP; as they are in a single process)."""
        if self.run.dist.world_size == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=self.run.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def _after_update(self, epoch: int, usable: int):
        cfg = self.run.cfg

        def check(batches_done: int, snapshot: Callable[[], EpochProgress]) -> bool:
            step = self.engine.step
            by_steps = cfg.save_every_steps > 0 and step % cfg.save_every_steps == 0
            want_stop = self._stop.requested is not None
            by_time = cfg.save_every_minutes > 0 and time.monotonic() - self._last_save >= 60 * cfg.save_every_minutes
            if self.run.dist.world_size > 1:  # signals and clocks differ between processes: agree at sync points
                want_stop, by_time = self._agreed(want_stop, by_time) if step % cfg.log_every == 0 else (False, False)
                if want_stop and self._stop.requested is None:
                    self._stop.requested = 15  # another process was told to stop
            if batches_done >= usable:  # the epoch's end: checkpoints and stops are handled there
                self._due_at_epoch_end = self._due_at_epoch_end or by_time or by_steps
                return False
            if want_stop or by_time or by_steps:
                self._save((epoch, batches_done), snapshot(), epoch_end=None)
            return want_stop

        return check

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        """Train the remaining epochs; raises `mae.errors.Interrupted` after checkpointing on SIGTERM / SIGUSR1 /
        SIGINT."""
        run, cfg, engine = self.run, self.run.cfg, self.engine
        epoch, batch, partial = 0, 0, None
        changes: list[tuple] = []
        if run.resume_state is not None:
            changes = check_resume_changes(run, self.resolved, self.data, self.resume_free)
            epoch, batch, partial = self._restore(run.resume_state)
            run.resume_state = None  # the big state is not needed any more
            if run.dist.is_main:
                _log.info("resumed from %s at epoch %d/%d, batch %d (update %d)", run.resume_path, epoch + 1,
                          cfg.epochs, batch, engine.step)
        if run.dist.is_main:
            if cfg.resume:
                truncate_metrics(run.out / "metrics.jsonl", engine.step)
            save_config(self.resolved, run.out / "config.yaml", run_info={**provenance(), **self.run_info})
            if changes:
                self._record_changes(changes)
            write_status(run.out, status="running", kind=run.kind, step=engine.step, position=[epoch, batch],
                         result=None)
        self._explain_schedule_change(changes)
        self.logger = MetricsLogger(run.out, enabled=run.dist.is_main,
                                    purge_step=engine.step + 1 if cfg.resume else None)
        engine.logger = self.logger
        t_start = time.perf_counter()
        epoch_times: list[float] = []
        try:
            with self._stop:
                while epoch < cfg.epochs:
                    self._run_epoch(epoch, batch, partial, epoch_times)
                    epoch, batch, partial = epoch + 1, 0, None
        except (Interrupted, KeyboardInterrupt):  # a checkpoint then a signal, or a second Ctrl-C (no checkpoint)
            if run.dist.is_main:
                write_status(run.out, status="interrupted")
            raise
        except BaseException:
            if run.dist.is_main:
                write_status(run.out, status="failed")
            raise
        finally:
            self.logger.close()
        if not self.history and run.dist.is_main:
            _log.info("the run had already finished its %d epochs: nothing to train (raise epochs with "
                      "--allow-config-change to train longer)", cfg.epochs)
        return TrainResult(history=self.history, best=dict(self.best_state), updates=engine.step,
                           train_seconds=time.perf_counter() - t_start, skipped_updates=engine.skipped_total,
                           skipped_epochs=self.skipped_epochs, best_path=self.manager.best_path,
                           last_path=self.manager.last_path, last=self.history[-1] if self.history else {})

    def _run_epoch(self, epoch: int, batch: int, partial: EpochProgress | None, epoch_times: list[float]) -> None:
        run, cfg, engine = self.run, self.run.cfg, self.engine
        usable = self.num_batches - self.num_batches % cfg.accum_iter
        if batch > usable:
            raise ConfigError(f"the checkpoint stands at batch {batch} of epoch {epoch}, but an epoch now has {usable} "
                              f"batches per process; resume with the run's batch size and number of processes")
        self._due_at_epoch_end = False
        set_epoch(self.loader, epoch, skip=batch)
        stats = engine.train_epoch(self.loader, epoch, self.loss_fn, self.num_batches, self.batch_size_of,
                                   start_batch=batch, progress_so_far=partial,
                                   after_update=self._after_update(epoch, usable))
        if stats.stopped:
            self._interrupted(epoch, stats.batches)
        epoch_times.append(stats.seconds)
        last = epoch + 1 == cfg.epochs
        record: dict[str, Any] = {"epoch": epoch, "step": engine.step, "epoch_loss": stats.loss, "lr": stats.lr,
                                  "epoch_seconds": stats.seconds, "skipped_steps": stats.skipped_steps,
                                  "images_per_sec": stats.images * run.dist.world_size / max(stats.seconds, 1e-9)}
        if self.evaluate is not None and (last or (epoch + 1) % self.eval_every == 0):
            t_eval = time.perf_counter()
            record.update(self.evaluate(epoch))
            record["eval_seconds"] = time.perf_counter() - t_eval
        if self.on_epoch_end is not None:
            record.update(self.on_epoch_end(epoch, record) or {})
        if stats.skipped_steps:
            self.skipped_epochs.append(epoch)
        value, info = self.best.read(record)
        is_better = stats.skipped_steps == 0 and value is not None and self.best.better(value, self.best_state["value"])
        stop_now = self._stop_requested()
        due = last or (epoch + 1) % cfg.save_every == 0 or self._due_at_epoch_end or (self.save_on_best and is_better) \
            or stop_now
        is_best = is_better and due
        if is_best:
            self.best_state.update(value=value, epoch=epoch, **info)
        record[f"best_{self.best.metric}"] = self.best_state["value"]
        self.history.append({k: v for k, v in record.items() if isinstance(v, (int, float, bool)) or v is None})
        if self.logger is not None:
            self.logger.log(record)
        self._log_epoch(epoch, record, epoch_times)
        if due:
            self._save((epoch + 1, 0), None, epoch_end=epoch, is_best=is_best)
        if stop_now:
            self._interrupted(epoch + 1, 0)

    def _stop_requested(self) -> bool:
        return self._agreed(self._stop.requested is not None)[0]

    def _interrupted(self, epoch: int, batch: int) -> None:
        signum = self._stop.requested or signal.SIGTERM
        name = signal.Signals(signum).name
        last = self.manager.last_path
        raise Interrupted(f"stopped by {name} after saving {last} (epoch {epoch + 1}/{self.run.cfg.epochs}, batch "
                          f"{batch}, update {self.engine.step}); continue with --resume auto --output-dir "
                          f"{self.run.out}", signum)

    def _log_epoch(self, epoch: int, record: dict[str, Any], epoch_times: list[float]) -> None:
        if not self.run.dist.is_main:
            return
        cfg = self.run.cfg
        parts = [f"loss {record['epoch_loss']:.4f}", f"lr {record['lr']:.3g}",
                 f"{record['images_per_sec']:.0f} img/s", f"{record['epoch_seconds']:.1f} s"]
        remaining = cfg.epochs - epoch - 1
        if remaining and epoch_times:
            parts.append(f"ETA {_fmt_eta(remaining * sum(epoch_times) / len(epoch_times))}")
        skip = ("epoch", "step", "epoch_loss", "lr", "epoch_seconds", "images_per_sec", "skipped_steps", "eval_seconds")
        parts += [f"{k} {v:.4g}" for k, v in record.items()
                  if k not in skip and not k.startswith("best_") and isinstance(v, float)]
        if record["skipped_steps"]:
            parts.append(f"{record['skipped_steps']} update(s) skipped (non-finite loss; not eligible as best)")
        _log.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, " | ".join(parts))

    def _record_changes(self, changes: list[tuple]) -> None:
        line = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_from": str(self.run.resume_path),
                "step": self.engine.step, "changes": {k: {"from": o, "to": n} for k, o, n in changes},
                "command": provenance()["command"]}
        path = self.run.out / "config_changes.jsonl"
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, default=str) + "\n")
        except OSError as e:
            raise MAEError(f"could not record the config change in '{path}': {e.strerror or e}") from e
        _log.warning("resuming with a changed config (recorded in %s): %s", path.name,
                     "; ".join(f"{k} {o!r} -> {n!r}" for k, o, n in changes))

    # ------------------------------------------------------------------------------------------------ the end
    @property
    def best_path(self) -> Path:
        """Where the best checkpoint is: ``checkpoint-best.pth``, or the ``checkpoint-best`` DCP link under fsdp."""
        return self.manager.best_path

    def finish(self, summary: dict[str, Any], result_file: str | None) -> dict[str, Any]:
        """Write ``summary.json`` and mark the run finished with `result_file` as its result (rank 0); under fsdp
        ``checkpoint-best.pth`` means the ``checkpoint-best`` DCP directory. Updates skipped for a non-finite loss
        (fewer in a row than ``max_nonfinite``, so the run went on) end the run with one warning naming their epochs."""
        if result_file is not None:
            result_file = self.manager.result_name(result_file)
        if self.run.dist.is_main:
            summary = {"skipped_steps": self.engine.skipped_total, **summary, "skipped_epochs": self.skipped_epochs,
                       "best": dict(self.best_state)}
            write_json(self.run.out / "summary.json", summary)
            write_status(self.run.out, status="finished", result=result_file, step=self.engine.step)
            if self.engine.skipped_total:
                epochs = ", ".join(str(e + 1) for e in self.skipped_epochs)  # counted from 1, as the epoch lines
                where = f" (epoch{'s' if len(self.skipped_epochs) > 1 else ''} {epochs})" if epochs else ""
                _log.warning("%d update(s) were skipped for a non-finite loss%s; see summary.json",
                             self.engine.skipped_total, where)
        return summary

