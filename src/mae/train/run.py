"""The life of a run around the training loop: the fields every training recipe shares, starting a run (device,
precision, a guarded and locked run directory, the checkpoint to resume from), and the rules of a resume.

    @dataclass
    class PretrainConfig(TrainFields):      # output_dir, epochs, batch_size, ... come from TrainFields
        model: ModelSection = ...
    with start_run(cfg, dist, kind="pretrain") as run:
        ...build the model, data and engine...
        result = Trainer(run, ...).fit()

A resume continues what the run computes, nothing else: `check_resume_changes` compares the resolved config of the
resumed run with the one stored in its checkpoint and refuses (one line naming each changed field) a change to anything
but the fields in ``RESUME_FREE`` (where the run writes, how often it logs and saves, the device and precision, the
number of loader workers, ...), unless ``allow_config_change``, which records the change in
``config_changes.jsonl``. The effective batch (batch x accumulation x processes) is compared instead of the
per-process batch, so a run may resume on another number of processes with the per-process batch adjusted.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import platform
import shlex
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from mae.errors import ConfigError, ResumeConflictError
from mae.train.checkpoint import load_latest, load_training_state
from mae.train.checkpoint_kinds import FORMAT_BY_KIND, check_resume, recipe_command
from mae.train.dcp import is_dcp_checkpoint
from mae.train.distributed import DistInfo, DistributedSection, on_main
from mae.train.precision import PRECISIONS, resolve_precision
from mae.train.rng import seed_everything
from mae.train.run_dir import RunLock, guard_fresh_start
from mae.version import __version__

__all__ = ["Run", "RunFields", "TrainFields", "check_resume_changes", "provenance", "start_run"]

_log = logging.getLogger(__name__)

COMMAND_LINE: contextvars.ContextVar[str | None] = contextvars.ContextVar("mae_command_line", default=None)
"""The command line of the `mae` invocation running now (set by `mae.cli.main`); None when called from Python."""


@dataclass
class RunFields:
    """Fields of every command that writes a run directory (training and evaluation)."""

    output_dir: str = field(default="runs/run", metadata={"help": "where checkpoints, logs and results go"})
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    seed: int = 0
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")


@dataclass
class TrainFields(RunFields):
    """Fields of every training recipe: schedule length, batch, checkpoint and log cadence, resume."""

    epochs: int = 1
    batch_size: int = field(default=32, metadata={"help": "images per device per step"})
    accum_iter: int = field(default=1, metadata={"help": "gradient accumulation steps per update"})
    save_every: int = field(default=1, metadata={"help": "checkpoint every N epochs (and at the end)"})
    save_every_steps: int = field(default=0, metadata={
        "help": "also checkpoint every N updates, mid-epoch (0: off); resuming from one is bit-exact"})
    save_every_minutes: float = field(default=30.0, metadata={
        "help": "also checkpoint when this many minutes passed since the last checkpoint (0: off)"})
    keep_last: int = field(default=1, metadata={"help": "numbered epoch checkpoints kept besides last/best"})
    log_every: int = field(default=20, metadata={"help": "updates between metrics.jsonl lines"})
    resume: str | None = field(default=None, metadata={
        "help": "auto (the newest valid checkpoint of output_dir; a fresh start if there is none) or a checkpoint "
                "path; the run's own config.yaml is the base config"})
    overwrite: bool = field(default=False, metadata={
        "help": "start a new run in an output_dir that holds a previous one, deleting that run's files"})
    allow_config_change: bool = field(default=False, metadata={
        "help": "resume even when the config changes what the run computes; the change is recorded"})
    max_nonfinite: int = field(default=5, metadata={"help": "consecutive non-finite losses before stopping"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations (saves memory)"})
    distributed: DistributedSection = field(default_factory=DistributedSection, metadata={
        "help": "ddp or fsdp (sharded parameters, gradients and optimizer state; DCP checkpoints): docs/scale.md"})

    RANGES: ClassVar[dict[str, str]] = {"save_every_minutes": ">= 0"}
    """Valid values of the number fields (`mae.config.Range`), checked when the config is loaded."""
    RESUME_FREE: ClassVar[tuple[str, ...]] = (
        "output_dir", "precision", "device", "progress", "save_every", "save_every_steps", "save_every_minutes",
        "keep_last", "log_every", "resume", "overwrite", "allow_config_change", "max_nonfinite", "compile",
        "grad_checkpointing", "batch_size", "accum_iter", "data.num_workers", "data.strict", "distributed")
    """Fields a resume may change: they decide where and how the run goes, not what it computes (the per-process
    batch and accumulation are compared through the effective batch; ddp and fsdp compute the same updates)."""

    def validate(self) -> None:
        super().validate()
        for name in ("epochs", "batch_size", "accum_iter", "save_every", "log_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.save_every_steps < 0 or self.save_every_minutes < 0 or self.keep_last < 0:
            raise ConfigError("save_every_steps, save_every_minutes and keep_last must be >= 0")
        if self.overwrite and self.resume:
            raise ConfigError("overwrite deletes the run that resume would continue; use one of them")


# ---------------------------------------------------------------------------------------------------- starting
@dataclass
class Run:
    """A started run: where it runs, in what precision, in which locked directory, and what it resumes from."""

    cfg: TrainFields
    kind: str  # pretrain | classify | detect | segment
    format: str  # the checkpoint format tag of this kind (mae.train.checkpoint_formats.FORMAT_BY_KIND)
    dist: DistInfo
    device: torch.device
    precision: str
    out: Path
    resume_path: Path | None = None
    resume_state: dict[str, Any] | None = None
    started: float = field(default_factory=time.perf_counter)


@contextlib.contextmanager
def start_run(cfg: TrainFields, dist: DistInfo, kind: str) -> Iterator[Run]:
    """Resolve device and precision, claim the output directory (refuse a previous run unless resuming or
    ``overwrite``; take the lock) and load the checkpoint to resume from; release the lock on exit."""
    device = dist.device
    precision = resolve_precision(cfg.precision, device)
    out = Path(cfg.output_dir).expanduser()

    def claim() -> RunLock:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create output directory '{out}': {e.strerror or e}; choose another "
                              f"--output-dir") from e
        lock = RunLock.acquire(out, command=f"mae {kind}")
        try:
            if not cfg.resume:
                guard_fresh_start(out, cfg.overwrite)
        except BaseException:
            lock.release()
            raise
        return lock

    lock = on_main(claim, dist)
    try:
        path, state = None, None
        if cfg.resume == "auto":
            found = load_latest(out)
            if found is None:
                _log.info("resume=auto: no checkpoint in '%s' yet, starting from the beginning", out)
            else:
                path, state = found
        elif cfg.resume:
            path = Path(cfg.resume).expanduser()
            if path.is_dir() and not is_dcp_checkpoint(path):  # a run directory (a DCP checkpoint is one directory)
                found = load_latest(path)
                if found is None:
                    raise ConfigError(f"resume: '{path}' holds no valid checkpoint; pass a checkpoint file or "
                                      f"resume=auto")
                path, state = found
            else:
                state = load_training_state(path)
        if state is not None:  # another kind of checkpoint: named, with the command that takes it
            check_resume(path, recipe_command(cfg) if kind == "classify" else kind, state)  # type: ignore[arg-type]  # a state was loaded, so path is set
        if state is not None and state.get("format") != FORMAT_BY_KIND[kind]:
            raise ConfigError(f"'{path}' is not a training checkpoint of a {kind} run (its format is "
                              f"{state.get('format')!r}); resume from the run's own checkpoint-last.pth (or "
                              f"--resume auto), or start a new run from its weights")
        seed_everything(cfg.seed + dist.rank)
        yield Run(cfg=cfg, kind=kind, format=FORMAT_BY_KIND[kind], dist=dist, device=device, precision=precision,
                  out=out, resume_path=path, resume_state=state)
    finally:
        if lock is not None:
            lock.release()


# ---------------------------------------------------------------------------------------------------- resuming
def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if str(k).startswith("_"):
            continue
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(saved: Mapping[str, Any], now: Mapping[str, Any], free: tuple[str, ...]) -> list[tuple]:
    """(key, saved value, new value) for every field that differs outside `free` (dotted keys or section prefixes)."""
    a, b = _flatten(saved), _flatten(now)
    changed = []
    for key in sorted(set(a) | set(b)):
        if any(key == f or key.startswith(f + ".") for f in free):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            changed.append((key, a.get(key, "<absent>"), b.get(key, "<absent>")))
    return changed


def check_resume_changes(run: Run, resolved: Mapping[str, Any], data: Mapping[str, Any],
                         free: tuple[str, ...]) -> list[tuple]:
    """Refuse a resume that would change what the run computes (see the module docstring); returns the accepted
    changes (empty without ``allow_config_change``)."""
    state = run.resume_state or {}
    changes: list[tuple] = []
    saved = state.get("config")
    if isinstance(saved, Mapping):
        changes += config_changes(saved, resolved, free)
    saved_data = state.get("data") or {}
    for key in ("effective_batch", "size", "fingerprint"):
        if key in saved_data and key in data and saved_data[key] != data[key]:
            label = {"effective_batch": "effective batch", "size": "training images",
                     "fingerprint": "training data (file list)"}[key]
            old, new = saved_data[key], data[key]
            if key == "fingerprint":
                old, new = f"{str(old)[:12]}...", f"{str(new)[:12]}..."
            changes.append((label, old, new))
    if changes and not run.cfg.allow_config_change:
        listed = "; ".join(f"{k} {_short(o)} -> {_short(n)}" for k, o, n in changes)
        raise ResumeConflictError(f"resuming '{run.resume_path}' would change what the run computes: {listed}; "
                                  f"keep the run's settings (its config.yaml), start a new --output-dir, or pass "
                                  f"--allow-config-change to go on and record the change", listed)
    return changes


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def provenance() -> dict[str, Any]:
    """How the run was started: the command line, host, time and the versions that produced it."""
    import timm  # here, not at the top: importing timm takes a second, and only a started run needs its version

    command = COMMAND_LINE.get() or shlex.join(sys.argv)
    return {"command": command, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "versions": {"mae": str(__version__), "torch": str(torch.__version__), "timm": str(timm.__version__),
                         "python": platform.python_version()}}
