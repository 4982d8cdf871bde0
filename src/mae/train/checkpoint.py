"""Checkpoints that survive crashes and full disks, and loading that never runs code from a file.

* `atomic_save` writes through `mae.files.atomic_write` (temporary file, fsync, rename, umask-respecting mode), so a
  reader sees either the old file or the new one, never half of one.
* `safe_load` uses ``torch.load(weights_only=True)``: tensors and plain containers only. Reference MAE
  checkpoints also pickle an ``argparse.Namespace`` under ``'args'``; that one class is allowed, nothing else.
* `CheckpointManager` keeps numbered checkpoints plus ``checkpoint-last.pth`` / ``checkpoint-best.pth``, refuses
  to write a state holding NaN or inf, and finds the newest loadable one to resume from.
* `load_model_state` loads a state dict into a module and names the keys that do not fit (another architecture).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import pickle
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

import torch

from mae.errors import CheckpointError, TrainingError
from mae.files import atomic_write, fsync_dir, is_stale_temporary

__all__ = ["CheckpointManager", "atomic_save", "load_model_state", "safe_load"]

_log = logging.getLogger(__name__)

# the only non-tensor class a reference checkpoint needs: its training arguments
_SAFE_GLOBALS: list[Any] = [argparse.Namespace]


# ---------------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj)` to `path` atomically (`mae.files.atomic_write`): on any error the previous file at `path`
    is left untouched and an `OutputError` names the reason and the fix."""
    return atomic_write(path, lambda f: torch.save(obj, f))


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


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


# ---------------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------------

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a ``.pth``/``.pt`` (weights only) or ``.safetensors`` file without executing anything from it."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint '{path}' {what}; check the path")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        match = _GLOBAL.search(str(e))
        if match:
            raise CheckpointError(
                f"refused to load checkpoint '{path}': it would import/run '{match.group(1)}'; only weights are "
                "loaded (weights_only=True), re-save it with tensors and plain containers only"
            ) from None
        raise CheckpointError(
            f"refused to load checkpoint '{path}': it is not a weights-only PyTorch file ({_first_line(e)}); only "
            "weights are loaded, re-save it with torch.save(state_dict)"
        ) from None
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            raise CheckpointError(f"could not read checkpoint '{path}': {_reason(e)}; check its permissions") from None
        raise CheckpointError(
            f"checkpoint '{path}' is truncated or corrupt ({_first_line(e)}); use an earlier checkpoint or "
            "download it again"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"checkpoint '{path}' is truncated or corrupt ({_first_line(e)}); "
            "use an earlier checkpoint or download it again"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, expected a dict (a state dict)")
    return obj


def _load_safetensors(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint '{path}' is truncated or corrupt ({_first_line(e)}); use an earlier file or download it again"
        ) from None


def _first_line(e: BaseException) -> str:
    """The specific reason in an exception message: torch wraps it in paragraphs of generic advice."""
    generic = (
        "Weights only load failed",
        "In PyTorch",
        "(1)",
        "(2)",
        "Please file an issue",
        "Check the documentation",
    )
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    specific = [ln for ln in lines if not ln.startswith(generic)]
    reason = (specific or lines or [""])[0].split(". This is an internal miniz error")[0][:200]
    return f"{type(e).__name__}: {reason}" if reason else type(e).__name__


# ---------------------------------------------------------------------------------------------------------------------
# a directory of checkpoints
# ---------------------------------------------------------------------------------------------------------------------

_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pth$")


class CheckpointManager:
    """Numbered checkpoints ``checkpoint-{epoch:04d}.pth`` plus ``checkpoint-last.pth`` and ``checkpoint-best.pth``.

    `keep_last` numbered files are kept (None: all; 0: none, only last/best); last and best are never pruned.
    """

    def __init__(self, output_dir: str | Path, keep_last: int | None = None) -> None:
        if keep_last is not None and keep_last < 0:
            raise CheckpointError(f"keep_last must be >= 0 or None (keep all), got {keep_last}")
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last

    @property
    def last_path(self) -> Path:
        return self.output_dir / "checkpoint-last.pth"

    @property
    def best_path(self) -> Path:
        return self.output_dir / "checkpoint-best.pth"

    def path_for(self, epoch: int) -> Path:
        return self.output_dir / f"checkpoint-{epoch:04d}.pth"

    def save(self, state: dict[str, Any], epoch: int, is_best: bool = False) -> Path:
        """Write the checkpoint of `epoch` (stored inside as ``state['epoch']`` if absent); returns its path.

        A state with a NaN or inf floating-point tensor is refused (TrainingError) and nothing is written, so the
        previous checkpoints stay the newest; so is any failed write (CheckpointError, e.g. a full disk).
        """
        bad = _first_nonfinite(state)
        if bad is not None:
            raise TrainingError(f"refusing to save the checkpoint of epoch {epoch}: '{bad}' holds NaN or inf (the "
                                f"weights diverged); the previous checkpoint in '{self.output_dir}' is kept; lower the "
                                f"learning rate or use --precision fp32")
        if "epoch" not in state:
            state = {**state, "epoch": epoch}
        self._remove_stale_temporaries()
        if self.keep_last == 0:
            written = atomic_save(state, self.last_path)
        else:
            written = atomic_save(state, self.path_for(epoch))
            _atomic_link(written, self.last_path)
        if is_best:
            _atomic_link(written, self.best_path)
        self._prune()
        _log.info("saved checkpoint %s", written)
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

    def latest_valid(self) -> Path | None:
        """The newest checkpoint that loads, skipping (with a warning) damaged ones; None when there is none."""
        found = self.load_latest()
        return found[0] if found is not None else None

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """Like `latest_valid`, but also returns the loaded state so that resuming reads the file only once.

        ``checkpoint-last.pth`` is tried first; a numbered file with a later epoch (a crash between writing it and
        updating last) wins over it, and the numbered files are the fallback when last is missing or damaged.
        """
        numbered = list(reversed(self.numbered()))  # newest first
        last = self._try_load(self.last_path, map_location) if self.last_path.is_file() else None
        if last is not None:
            last_epoch = last.get("epoch")
            if isinstance(last_epoch, int):
                for epoch, path in numbered:
                    if epoch > last_epoch and (state := self._try_load(path, map_location)) is not None:
                        return path, state
            return self.last_path, last
        for _, path in numbered:
            if (state := self._try_load(path, map_location)) is not None:
                return path, state
        return None

    @staticmethod
    def _try_load(path: Path, map_location: str | torch.device) -> dict[str, Any] | None:
        try:
            return safe_load(path, map_location)
        except CheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint '{path}': {e}", stacklevel=4)
            return None


def _first_nonfinite(obj: Any, prefix: str = "") -> str | None:
    """The dotted key of the first floating-point tensor in `obj` (nested dicts / lists) with a NaN or inf."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return prefix or "<tensor>"
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------------------------------
# loading into a module
# ---------------------------------------------------------------------------------------------------------------------


def load_model_state(module: torch.nn.Module, state_dict: dict[str, Any], source: str | Path) -> None:
    """`module.load_state_dict(state_dict)` (strict), but a file of another architecture raises CheckpointError
    naming the keys whose shapes differ (file vs model), the missing and the unexpected keys."""
    own = module.state_dict()
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"'{source}' holds a {type(state_dict).__name__} where a state dict was expected")
    mismatched = [f"{k} is {_shape(state_dict[k])} in the file but {_shape(v)} in the model"
                  for k, v in own.items() if k in state_dict and _shape(state_dict[k]) != _shape(v)]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if mismatched or missing or unexpected:
        parts = mismatched[:3] + ([f"... ({len(mismatched) - 3} more)"] if len(mismatched) > 3 else [])
        if missing:
            parts.append(f"missing from the file: {_few(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_few(unexpected)}")
        raise CheckpointError(f"'{source}' does not fit the model (another architecture?): {'; '.join(parts)}; "
                              "use the model settings of the run that wrote it")
    module.load_state_dict(state_dict)


def _shape(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
