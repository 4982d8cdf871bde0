"""The checkpoint store interface: what every backend (one ``.pth`` file per checkpoint, `mae.train.file_store`; a
DCP directory written by every rank, `mae.train.dcp`) does, and the training-state layout they all write.

A training checkpoint is the run's record (`run_record`: format, version, kind, ``train_state``, RNG states, the
resolved config, the data's facts, the library versions and the recipe's metadata) plus the named states of the
live objects (`TrainingParts`: ``model``, ``engine`` (optimizer, scaler, schedule position, counters) and extra
modules such as ``model_ema``). A store saves them, finds its newest valid checkpoint in a run directory, reads one
back verified and restores it into the live objects; `mae.train.checkpoint.CheckpointManager` puts the stores
together for a run.

Adding a backend: a subclass of `CheckpointStore` in its own module and one entry in
`mae.train.checkpoint.STORES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mae.errors import CheckpointError, TrainingError
from mae.train.checkpoint_formats import KIND_BY_FORMAT
from mae.train.checkpoint_schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from mae.train.engine import Engine

__all__ = ["CheckpointStore", "TrainingParts", "nonfinite_save_error", "refuse_old_schema", "run_record",
           "single_file_state"]


@dataclass
class TrainingParts:
    """The live objects a checkpoint saves and restores by name: ``model`` (the module whose weights are saved, not
    a DDP / compile wrapper), ``engine`` (optimizer, scaler, schedule position, counters) and `extra` modules saved
    next to the model (e.g. ``{"model_ema": ema.module}``)."""

    model: nn.Module
    engine: Engine
    extra: dict[str, nn.Module] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- the layout
def run_record(*, format: str, kind: str, train_state: dict[str, Any], rng: Any, config: dict[str, Any],
               data: dict[str, Any], versions: dict[str, str], meta: dict[str, Any]) -> dict[str, Any]:
    """The plain part of a training checkpoint (every schema key but the tensors' and ``integrity``), plus the
    recipe's `meta` (how to rebuild the model, class names, ...)."""
    return {"format": format, "version": SCHEMA_VERSION, "kind": kind, "train_state": train_state, "rng": rng,
            "config": config, "data": data, "versions": versions, **meta}


def single_file_state(record: dict[str, Any], *, model: dict[str, Any], engine: dict[str, Any],
                      extra: dict[str, Any]) -> dict[str, Any]:
    """A whole training state in one dict, as a ``.pth`` checkpoint holds it: the record, the model's and the
    engine's state dicts and each extra module's by name (not yet stamped with its digest)."""
    return {**record, "model": model, "engine": engine, **extra}


def refuse_old_schema(state: dict[str, Any], path: str | Path) -> None:
    """Raise CheckpointError for a training checkpoint of an older schema (version 1, written before the shared run
    layer, has no ``version`` key): this version resumes only what it writes. Its weights still load (docs/
    checkpoints.md, "Which files are read")."""
    version = state.get("version", 1)
    if state.get("format") in KIND_BY_FORMAT and isinstance(version, int) and version < SCHEMA_VERSION:
        raise CheckpointError(f"'{path}' is a training checkpoint of schema version {version}, which this version of "
                              f"mae no longer resumes (it resumes version {SCHEMA_VERSION}); its weights still load: "
                              f"start a new run from them (checkpoint={path}) or convert them with mae convert")


def nonfinite_save_error(bad: str, epoch: int | None, directory: Path) -> TrainingError:
    """Why a store refuses to write a state with NaN or inf in `bad`: the previous checkpoint stays the newest."""
    where = f"epoch {epoch}" if epoch is not None else "this step"
    return TrainingError(f"refusing to save the checkpoint of {where}: '{bad}' holds NaN or inf (the weights "
                         f"diverged); the previous checkpoint in '{directory}' is kept; lower the learning rate or "
                         f"use --precision fp32")


# ---------------------------------------------------------------------------------------------------- the interface
class CheckpointStore(ABC):
    """The checkpoints of one run directory in one on-disk backend.

    Numbered checkpoints end epochs (``keep_last`` of them kept; None: all; 0: none, only last and best); the newest
    state, which may stand in the middle of an epoch, is ``last_path`` and the best one ``best_path``, never pruned.
    Every state written carries a SHA-256 digest that reading it back verifies; a state holding NaN or inf is refused
    and nothing is written.
    """

    def __init__(self, output_dir: str | Path, keep_last: int | None = None) -> None:
        if keep_last is not None and keep_last < 0:
            raise CheckpointError(f"keep_last must be >= 0 or None (keep all), got {keep_last}")
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last

    @property
    @abstractmethod
    def last_path(self) -> Path:
        """The newest checkpoint this store wrote (a file, or a link to a directory)."""

    @property
    @abstractmethod
    def best_path(self) -> Path:
        """The checkpoint of the best epoch."""

    @abstractmethod
    def path_for(self, epoch: int) -> Path:
        """Where the checkpoint that ends `epoch` goes."""

    @abstractmethod
    def save(self, state: dict[str, Any], epoch: int | None, is_best: bool = False,
             parts: TrainingParts | None = None) -> Path | None:
        """Write a checkpoint: the run's record `state` and the named states of `parts` (without `parts`, `state` is
        the whole state, where the backend allows it). ``epoch`` is the epoch it ends (a numbered checkpoint), or
        None in the middle of one (last only). A collective: every rank calls it; returns the path on rank 0, None
        on the others. A state with NaN or inf raises TrainingError and nothing is written."""

    @abstractmethod
    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """This backend's newest checkpoint in the directory that reads and verifies, as (path, state); damaged ones
        are passed over with a warning; None when there is none."""

    @classmethod
    @abstractmethod
    def holds(cls, path: str | Path) -> bool:
        """True when `path` is a checkpoint written by this backend."""

    @classmethod
    @abstractmethod
    def read(cls, path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """One checkpoint of this backend, verified against its digest, in the current schema (what `restore`
        takes; a backend that loads tensors in place may leave them out)."""

    @classmethod
    @abstractmethod
    def restore(cls, path: str | Path, state: dict[str, Any], parts: TrainingParts) -> None:
        """Load the checkpoint at `path` (read as `state`) into the live `parts`; a collective where the backend
        needs one (every rank calls it)."""
