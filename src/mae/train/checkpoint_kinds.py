"""What kind of checkpoint a file on disk is, and which command takes it, so that every reader names a file of
another kind for what it is in one line ("'x.pth' is a fine-tuning checkpoint (mae finetune); resume it with ...").

The table of kinds and the classification of a loaded state are `mae.train.checkpoint_formats` (re-exported here);
this module adds what needs the files: reading a ``.pth`` cheaply, a safetensors file's keys, a DCP directory's meta,
a run directory's newest checkpoint or a transformers directory's ``config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from mae.errors import CheckpointError
from mae.train.checkpoint import STORES, peek
from mae.train.checkpoint_formats import (
    COMMANDS,
    FORMAT_BY_KIND,
    FROM_WEIGHTS,
    KIND_BY_FORMAT,
    RUN_FORMATS,
    RUNS,
    Kind,
    kind_of_state,
    kind_of_transformers,
    kind_of_weights,
    recipe_command,
    refuse_resume,
)
from mae.train.dcp import is_dcp_checkpoint, read_meta
from mae.train.file_store import FileStore

__all__ = ["COMMANDS", "FORMAT_BY_KIND", "FROM_WEIGHTS", "KIND_BY_FORMAT", "RUNS", "RUN_FORMATS", "Kind",
           "check_resume", "describe", "kind_of", "kind_of_state", "kind_of_weights", "recipe_command"]


def kind_of(path: str | Path) -> Kind | None:
    """The kind of a checkpoint file, DCP directory, transformers directory or run directory (its newest training
    checkpoint), read cheaply: a ``.pth`` memory-mapped, a safetensors file's keys, a DCP directory's meta.pt. None
    when it is unreadable or of no kind this library knows (its reader then says what is wrong)."""
    path = Path(path).expanduser()
    try:
        if is_dcp_checkpoint(path):
            return kind_of_state(read_meta(path))
        if path.is_dir():
            kind = _kind_of_dir(path)
            if kind is not None and kind.label.endswith(")") and " checkpoint (" in kind.label:  # say what it is
                kind = replace(kind, label=kind.label.replace(" checkpoint (", " run directory (", 1))
            return kind
        if path.suffix == ".safetensors":
            return _kind_of_safetensors(path)
        return kind_of_state(peek(path)) if path.is_file() else None
    except (CheckpointError, OSError, ValueError, RuntimeError, AttributeError):
        return None


def _kind_of_safetensors(path: Path) -> Kind | None:
    from safetensors import SafetensorError, safe_open  # loaded only when a .safetensors file is read

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return kind_of_weights(f.keys())
    except SafetensorError:
        return None


def _kind_of_dir(path: Path) -> Kind | None:
    """A run directory: its newest training checkpoint (file or DCP), else its weights; a transformers directory."""
    files = FileStore(path)
    for file in (files.last_path, *(p for _, p in reversed(files.numbered())), files.best_path):
        if file.is_file() and (kind := kind_of(file)) is not None:
            return kind
    for store in STORES.values():
        if store is not FileStore and (found := store(path).load_latest()) is not None:
            return kind_of_state(found[1])
    if (path / "model.safetensors").is_file():
        return kind_of(path / "model.safetensors")
    if (path / "config.json").is_file():
        return kind_of_transformers(json.loads((path / "config.json").read_text()).get("model_type"))
    return None


def check_resume(path: str | Path, command: str, state: Mapping[str, Any] | None = None) -> None:
    """Raise CheckpointError when `path` (or its loaded `state`) is not a training checkpoint that
    ``mae {command} --resume`` continues, naming what it is and the command that takes it. A file of no known kind
    passes (its reader says what is wrong), as does any file for a command that writes no training checkpoints."""
    if command not in RUN_FORMATS:
        return
    refuse_resume(path, command, kind_of_state(state) if state is not None else kind_of(path), state)


def describe(path: str | Path, kind: Kind | None = None, fallback: str | None = None) -> str:
    """The start of a reader's message about a file it cannot use: what the file is and what takes it
    ("'PATH' is a fine-tuning checkpoint (mae finetune), for `mae finetune --resume`, `mae evaluate`, ..."), or
    `fallback` (default "'PATH'") for a file of no known kind."""
    kind = kind or kind_of(path)
    return kind.named(path) if kind is not None else (fallback or f"'{path}'")
