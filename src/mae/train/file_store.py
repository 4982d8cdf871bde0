"""The single-file checkpoint store: one ``.pth`` file per checkpoint, written by rank 0 (a DDP or one-process run).

    runs/vit-b/
      checkpoint-0019.pth     the end of epoch 19 (``keep_last`` of these are kept)
      checkpoint-last.pth     the newest state (a hard link to the numbered file, or a state in the middle of an epoch)
      checkpoint-best.pth     the best epoch's state (a hard link)

Each file is written atomically (`mae.train.checkpoint_schema.atomic_save`) and carries the SHA-256 digest of its
contents; `FileStore.load_latest` takes the newest one that loads and verifies, passing over damaged ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import IO, Any

import torch

from mae.errors import CheckpointError
from mae.files import atomic_write, fsync_dir, is_stale_temporary
from mae.train.checkpoint_schema import (
    atomic_save,
    first_nonfinite,
    position_of,
    restore_model_state,
    safe_load_file,
    stamp,
    verify_state,
)
from mae.train.checkpoint_store import (
    CheckpointStore,
    TrainingParts,
    nonfinite_save_error,
    refuse_old_schema,
    single_file_state,
)
from mae.train.distributed import is_main

__all__ = ["BEST_NAME", "LAST_NAME", "FileStore"]

_log = logging.getLogger(__name__)

LAST_NAME = "checkpoint-last.pth"
BEST_NAME = "checkpoint-best.pth"
"""What a recipe calls its best checkpoint (its result file), whatever the store (`CheckpointManager.result_name`)."""
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pth$")


class FileStore(CheckpointStore):
    """Numbered epoch-end checkpoints ``checkpoint-{epoch:04d}.pth`` plus ``checkpoint-last.pth`` and
    ``checkpoint-best.pth`` (see the module docstring); rank 0 writes, the other ranks wait for nothing."""

    @property
    def last_path(self) -> Path:
        return self.output_dir / LAST_NAME

    @property
    def best_path(self) -> Path:
        return self.output_dir / BEST_NAME

    def path_for(self, epoch: int) -> Path:
        return self.output_dir / f"checkpoint-{epoch:04d}.pth"

    # ------------------------------------------------------------------------------------------------ writing
    def save(self, state: dict[str, Any], epoch: int | None, is_best: bool = False,
             parts: TrainingParts | None = None) -> Path | None:
        """Write `state` (with `parts`: the record, to which their state dicts are added) on rank 0; see
        `CheckpointStore.save`. A failed write (OutputError, e.g. a full disk) leaves the previous checkpoints the
        newest, as a refused non-finite state does."""
        if not is_main():
            return None
        if parts is not None:
            state = single_file_state(state, model=parts.model.state_dict(), engine=parts.engine.state_dict(),
                                      extra={k: m.state_dict() for k, m in parts.extra.items()})
        bad = first_nonfinite(state)
        if bad is not None:
            raise nonfinite_save_error(bad, epoch, self.output_dir)
        state = {**state, "integrity": None}
        if epoch is not None and "train_state" not in state:
            state.setdefault("epoch", epoch)
        stamp(state)
        self._remove_stale_temporaries()
        if epoch is None or self.keep_last == 0:
            written = atomic_save(state, self.last_path)
        else:
            written = atomic_save(state, self.path_for(epoch))
            _atomic_link(written, self.last_path)
        if is_best:
            _atomic_link(written, self.best_path)
        self._prune()
        _log.debug("saved checkpoint %s", written)
        return written

    def _remove_stale_temporaries(self) -> None:
        """Temporary files left by a save that was killed before its rename (they are never read)."""
        if self.output_dir.is_dir():
            for p in self.output_dir.glob(".checkpoint-*.tmp"):
                if is_stale_temporary(p):
                    with contextlib.suppress(OSError):
                        p.unlink()

    def numbered(self) -> list[tuple[int, Path]]:
        """The numbered checkpoints in the directory as (epoch, path), oldest first."""
        if not self.output_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.output_dir.iterdir() if (m := _NUMBERED.match(p.name))]
        return sorted(found)

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        numbered = self.numbered()
        for _, path in numbered[: max(len(numbered) - self.keep_last, 0)]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ------------------------------------------------------------------------------------------------ reading
    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """The newest valid file as (path, state), or None. ``checkpoint-last.pth`` is tried first; a numbered file
        standing later (a crash between writing it and updating last) wins over it, and the numbered files, newest
        first, are the fallback when last is missing, unreadable or fails its checksum."""
        numbered = list(reversed(self.numbered()))  # newest first
        last = self._try_read(self.last_path, map_location) if self.last_path.is_file() else None
        if last is not None:
            here = position_of(last)
            for epoch, path in numbered:
                if (epoch + 1, 0) > here and (state := self._try_read(path, map_location)) is not None:
                    return path, state
            return self.last_path, last
        for _, path in numbered:
            if (state := self._try_read(path, map_location)) is not None:
                return path, state
        return None

    @classmethod
    def _try_read(cls, path: Path, map_location: str | torch.device) -> dict[str, Any] | None:
        """`read`, but a damaged file is passed over with a warning (None); one of an older schema still raises."""
        try:
            state = cls._read_verified(path, map_location)
        except CheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint '{path}': {e}", stacklevel=5)
            return None
        refuse_old_schema(state, path)
        return state

    @classmethod
    def _read_verified(cls, path: str | Path, map_location: str | torch.device) -> dict[str, Any]:
        state = safe_load_file(path, map_location)
        verify_state(state, path)
        return state

    @classmethod
    def holds(cls, path: str | Path) -> bool:
        return Path(path).is_file()

    @classmethod
    def read(cls, path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """A checkpoint file read safely and verified against its digest; one of an older schema is refused."""
        state = cls._read_verified(path, map_location)
        refuse_old_schema(state, path)
        return state

    @classmethod
    def restore(cls, path: str | Path, state: dict[str, Any], parts: TrainingParts) -> None:
        """The state's weights into the model (a file of another architecture is named), the engine's state, and
        each extra module the file holds."""
        restore_model_state(parts.model, state["model"], path)
        parts.engine.load_state_dict(state["engine"])
        for key, module in parts.extra.items():
            if state.get(key) is not None:
                module.load_state_dict(state[key])


def _atomic_link(src: Path, dst: Path) -> None:
    """Make `dst` the same file as `src` atomically: a hard link renamed over `dst` (no second copy of a checkpoint
    of several GB), or an atomic copy where the file system has no hard links."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.link(src, tmp)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()

        def copy(f: IO[bytes]) -> None:
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, length=16 << 20)

        atomic_write(dst, copy)
