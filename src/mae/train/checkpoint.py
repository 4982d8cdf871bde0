"""Checkpoints that survive crashes and full disks, and loading that never runs code from a file: the entry point
every other module uses, whatever the backend.

    src/mae/train/
      checkpoint_schema.py    primitives: digest, verify, position, NaN / inf scan, safe file load, atomic write
      checkpoint_formats.py   the table of checkpoint kinds (format tags, commands) and what a loaded state is
      checkpoint_store.py     the `CheckpointStore` interface and the training-state layout every store writes
      file_store.py           `FileStore`: one ``.pth`` file per checkpoint (DDP and one-process runs)
      dcp.py                  `DCPStore`: a ``torch.distributed.checkpoint`` directory per checkpoint (fsdp runs)
      checkpoint.py           this module: the stores together (`STORES`, `CheckpointManager`), reading any path
      checkpoint_kinds.py     what kind a file on disk is, for one-line refusals

* `CheckpointManager` is what a run holds: it writes through the store of the run's strategy, finds the newest
  valid checkpoint among every store's (a run may resume with another strategy) and restores from the store that
  wrote it; the trainer never asks which backend it has.
* `safe_load` / `load_training_state` read any checkpoint path (a file, or a DCP directory) safely, verified.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mae.errors import ConfigError
from mae.train.checkpoint_schema import (
    SCHEMA_KEYS,
    SCHEMA_VERSION,
    atomic_save,
    nonfinite_keys,
    peek_file,
    position_of,
    refuse_nonfinite,
    restore_model_state,
    safe_load_file,
    standing,
    state_digest,
    verify_state,
)
from mae.train.checkpoint_store import CheckpointStore, TrainingParts
from mae.train.dcp import DCPStore, is_dcp_checkpoint, read_state
from mae.train.file_store import BEST_NAME, FileStore

__all__ = ["SCHEMA_KEYS", "SCHEMA_VERSION", "STORES", "CheckpointManager", "TrainingParts", "atomic_save",
           "load_latest", "load_training_state", "nonfinite_keys", "peek", "position_of", "refuse_nonfinite",
           "restore_model_state", "safe_load", "state_digest", "store_for", "verify_state"]

STORES: dict[str, type[CheckpointStore]] = {"file": FileStore, "dcp": DCPStore}
"""The checkpoint backends, by name: where a new backend is registered. Reading looks through all of them in this
order (the first one wins a tie)."""


# ---------------------------------------------------------------------------------------------------- any path
def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a ``.pth``/``.pt`` (weights only) or ``.safetensors`` file without executing anything from it, or a DCP
    directory as one state (its schema keys and the whole model); NaN or inf is refused."""
    if is_dcp_checkpoint(path):  # a sharded run's checkpoint: its schema keys and the whole model
        return read_state(path)
    return safe_load_file(path, map_location)


def peek(path: str | Path) -> dict[str, Any]:
    """What a checkpoint says about itself (format, kind, configs) cheaply: a ``.pth`` memory-mapped, without the
    finiteness check; a DCP directory as `safe_load` reads it. Nothing from the file is executed."""
    if is_dcp_checkpoint(path):
        return read_state(path)
    return peek_file(path)


def store_for(path: str | Path) -> type[CheckpointStore]:
    """The store that wrote the checkpoint at `path` (the single-file one for a path no store holds: its reader
    names what is wrong)."""
    return next((store for store in STORES.values() if store.holds(path)), FileStore)


def load_training_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A training checkpoint read safely, verified against its digest and in the current schema. A DCP directory
    (sharded run) gives its verified schema keys without tensors: restoring loads those in place."""
    return store_for(path).read(path, map_location)


def load_latest(directory: str | Path,
                map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The newest valid checkpoint of a run directory, whichever store wrote it, as (path, state); damaged ones are
    passed over with a warning; None when there is none. The one standing furthest in the run wins (a run may
    switch between ddp and fsdp on resume)."""
    found: tuple[Path, dict[str, Any]] | None = None
    for store in STORES.values():
        candidate = store(directory).load_latest(map_location)
        if candidate is not None and (found is None or standing(candidate[1]) > standing(found[1])):
            found = candidate
    return found


# ---------------------------------------------------------------------------------------------------- a run's
class CheckpointManager:
    """A run directory's checkpoints: written through one store (`backend`, a key of `STORES`), read back from any.

    `keep_last` numbered checkpoints are kept (None: all; 0: none, only last and best); last and best are never
    pruned. Every state written carries a SHA-256 digest that loading for a resume verifies.
    """

    def __init__(self, output_dir: str | Path, keep_last: int | None = None, backend: str = "file") -> None:
        if backend not in STORES:
            raise ConfigError(f"unknown checkpoint backend '{backend}' (valid: {', '.join(STORES)})")
        self.store = STORES[backend](output_dir, keep_last)

    @property
    def output_dir(self) -> Path:
        return self.store.output_dir

    @property
    def keep_last(self) -> int | None:
        return self.store.keep_last

    @property
    def last_path(self) -> Path:
        """The newest checkpoint this run wrote."""
        return self.store.last_path

    @property
    def best_path(self) -> Path:
        """The best epoch's checkpoint (a ``checkpoint-best.pth`` file, or a ``checkpoint-best`` DCP link)."""
        return self.store.best_path

    def path_for(self, epoch: int) -> Path:
        return self.store.path_for(epoch)

    def result_name(self, name: str) -> str:
        """A run's result file as this store names it: ``checkpoint-best.pth`` (how recipes name their best
        checkpoint) is `best_path`; any other name is kept."""
        return self.best_path.name if name == BEST_NAME else name

    def save(self, state: dict[str, Any], epoch: int | None, is_best: bool = False,
             parts: TrainingParts | None = None) -> Path | None:
        """Write a checkpoint through this run's store (`CheckpointStore.save`: a collective; the path on rank 0)."""
        return self.store.save(state, epoch, is_best=is_best, parts=parts)

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """The directory's newest valid checkpoint, whichever store wrote it (`load_latest`)."""
        return load_latest(self.output_dir, map_location)

    def latest_valid(self) -> Path | None:
        """The path of the newest checkpoint that loads and verifies, skipping (with a warning) damaged ones."""
        found = self.load_latest()
        return found[0] if found is not None else None

    def restore(self, path: str | Path, state: dict[str, Any], parts: TrainingParts) -> None:
        """Load the checkpoint at `path` (read as `state`) into `parts`, through the store that wrote it."""
        store_for(path).restore(path, state, parts)
