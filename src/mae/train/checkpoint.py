"""Checkpoints that survive crashes and full disks, and loading that never runs code from a file.

* `atomic_save` writes through `mae.files.atomic_write` (temporary file, fsync, rename, umask-respecting mode), so a
  reader sees either the old file or the new one, never half of one.
* `safe_load` uses ``torch.load(weights_only=True)``: tensors and plain containers only. Reference MAE
  checkpoints also pickle an ``argparse.Namespace`` under ``'args'``; that one class is allowed, nothing else.
* `CheckpointManager` keeps numbered checkpoints plus ``checkpoint-last.pth`` / ``checkpoint-best.pth``, refuses
  to write a state holding NaN or inf, stamps each with a SHA-256 digest of its contents, and finds the newest one
  that loads and verifies to resume from (`load_training_state`; older layouts are upgraded by `upgrade_state`).
* `load_model_state` loads a state dict into a module and names the keys that do not fit (another architecture).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import logging
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from mae.errors import CheckpointError, TrainingError
from mae.files import atomic_write, fsync_dir, is_stale_temporary

__all__ = ["SCHEMA_VERSION", "CheckpointManager", "atomic_save", "load_model_state", "load_training_state",
           "nonfinite_keys", "position_of", "refuse_nonfinite", "safe_load", "state_digest", "upgrade_state",
           "verify_state"]

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
    """Load a ``.pth``/``.pt`` (weights only) or ``.safetensors`` file without executing anything from it; a file
    holding NaN or inf is refused (`refuse_nonfinite`)."""
    path = Path(path)
    obj = _load_any(path, map_location)
    refuse_nonfinite(obj, path)
    return obj


def _load_any(path: Path, map_location: str | torch.device, mmap: bool = False) -> dict[str, Any]:
    """What `safe_load` reads, before its finiteness check; ``mmap`` maps a ``.pth`` instead of reading it (`peek`)."""
    if path.is_dir() and _is_dcp(path):  # a sharded run's checkpoint: its schema keys and the whole model
        from mae.train.dcp import read_state

        return read_state(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint '{path}' {what}; check the path")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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
    except Exception as e:  # noqa: BLE001 (the unpickler meets a file that is not a checkpoint with any error)
        raise CheckpointError(
            f"checkpoint '{path}' is truncated or corrupt, or not a PyTorch checkpoint at all ({_first_line(e)}); "
            "use an earlier checkpoint or download it again"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, expected a dict (a state dict)")
    return obj


def peek(path: str | Path) -> dict[str, Any]:
    """A ``.pth`` checkpoint memory-mapped, without the finiteness check: what the file says about itself (format,
    kind, configs) at the cost of reading its header. Nothing from the file is executed, as in `safe_load`."""
    return _load_any(Path(path), "cpu", mmap=True)


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
# the training-checkpoint schema
# ---------------------------------------------------------------------------------------------------------------------

SCHEMA_VERSION = 2
"""Version of the training-checkpoint layout written by `CheckpointManager` (1: before the shared run layer)."""
TRAINING_FORMATS = ("mae-train", "mae-classifier", "mae-detect", "mae-segment")
"""The ``format`` tag of a training checkpoint, by recipe family: pre-training, classification, detection,
segmentation."""
SCHEMA_KEYS = ("format", "version", "kind", "model", "engine", "train_state", "rng", "config", "data", "versions",
               "integrity")
"""Keys every version-2 training checkpoint has; recipe-specific metadata (``model_config``, ``classifier_config``,
``class_names``, ``task``, ``model_ema``) sits next to them."""


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 over everything in a checkpoint state but its ``integrity`` entry: keys in sorted order, every tensor's
    dtype, shape and bytes, every other value's repr. A flipped bit anywhere in the saved data changes it."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "integrity"})
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for value in obj:
            _feed(h, value)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def verify_state(state: dict[str, Any], path: str | Path) -> None:
    """Raise CheckpointError when a checkpoint's stored digest does not match its contents (a damaged file).
    States without a digest (files of version 1, or not written by `CheckpointManager`) pass."""
    stored = state.get("integrity")
    if not isinstance(stored, dict) or "sha256" not in stored:
        return
    if state_digest(state) != stored["sha256"]:
        raise CheckpointError(f"checkpoint '{path}' is damaged: its contents do not match the checksum written with "
                              f"it (a flipped bit or an incomplete copy); use an earlier checkpoint")


def position_of(state: dict[str, Any]) -> tuple[int, int]:
    """(epoch, batch) where a training state stands: the epoch in progress and the batches of it already done."""
    ts = state.get("train_state")
    if ts is None:  # an epoch-end state without the run layer's record (schema 1, or a bare state)
        return (int(state["epoch"]) + 1, 0) if isinstance(state.get("epoch"), int) else (0, 0)
    return int(ts.get("epoch", 0)), int(ts.get("batch", 0))


def upgrade_state(state: dict[str, Any]) -> dict[str, Any]:
    """A training checkpoint of schema version 1 (epoch-end checkpoints, each recipe's own keys for the best metric)
    rewritten in version 2's layout, so that runs started by an older version of the library resume."""
    if state.get("version", 1) >= SCHEMA_VERSION or state.get("format") not in TRAINING_FORMATS:
        return state
    if "engine" not in state or "epoch" not in state:
        raise CheckpointError("a version-1 checkpoint without 'engine' or 'epoch' cannot be resumed; start a new run "
                              "from its weights instead (checkpoint=... for fine-tuning)")
    fmt = state["format"]
    if fmt == "mae-train":
        best = {"name": "loss", "mode": "min", "value": state.get("best_loss"), "epoch": None}
    elif fmt == "mae-classifier":
        best = {"name": "top1", "mode": "max", "value": state.get("best_top1"), "epoch": state.get("best_epoch")}
    else:
        best = {"name": None, "mode": "max", "value": state.get("best"), "epoch": state.get("best_epoch")}
    renamed = {"loss": "epoch_loss", "train_loss": "epoch_loss", "seconds": "epoch_seconds"}
    history = [{renamed.get(k, k): v for k, v in h.items()} for h in state.get("history", [])]
    engine = dict(state["engine"])
    engine.setdefault("skipped_total", engine.pop("nonfinite_total", 0))
    upgraded = {k: v for k, v in state.items() if k not in ("best_loss", "best_top1", "best", "best_epoch", "epoch")}
    upgraded.update(version=SCHEMA_VERSION, kind={"mae-train": "pretrain", "mae-classifier": "classify",
                                                   "mae-detect": "detect", "mae-segment": "segment"}[fmt],
                    engine=engine, rng=state.get("rng"), config=state.get("config"), data=None, versions=None,
                    train_state={"epoch": int(state["epoch"]) + 1, "batch": 0, "history": history,
                                 "best": best, "partial": None, "skipped_epochs": []})
    return upgraded


# ---------------------------------------------------------------------------------------------------------------------
# a directory of checkpoints
# ---------------------------------------------------------------------------------------------------------------------

_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pth$")


class CheckpointManager:
    """Numbered epoch-end checkpoints ``checkpoint-{epoch:04d}.pth`` plus ``checkpoint-last.pth`` (the newest state,
    which may stand in the middle of an epoch) and ``checkpoint-best.pth``.

    `keep_last` numbered files are kept (None: all; 0: none, only last/best); last and best are never pruned. Every
    state written carries a SHA-256 digest (``integrity``) that loading for a resume verifies.
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

    def save(self, state: dict[str, Any], epoch: int | None, is_best: bool = False) -> Path:
        """Write a state; returns its path. ``epoch`` is the epoch it ends (a numbered file, linked as last), or None
        for a state in the middle of an epoch (written as last only).

        A state with a NaN or inf floating-point tensor is refused (TrainingError) and nothing is written, so the
        previous checkpoints stay the newest; so is any failed write (OutputError, e.g. a full disk).
        """
        bad = _first_nonfinite(state)
        if bad is not None:
            where = f"epoch {epoch}" if epoch is not None else "this step"
            raise TrainingError(f"refusing to save the checkpoint of {where}: '{bad}' holds NaN or inf (the weights "
                                f"diverged); the previous checkpoint in '{self.output_dir}' is kept; lower the "
                                f"learning rate or use --precision fp32")
        state = {**state, "integrity": None}
        if epoch is not None and "train_state" not in state:
            state.setdefault("epoch", epoch)
        state["integrity"] = {"sha256": state_digest(state)}
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

    def latest_valid(self) -> Path | None:
        """The newest checkpoint that loads and verifies, skipping (with a warning) damaged ones; None when none."""
        found = self.load_latest()
        return found[0] if found is not None else None

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """The newest valid checkpoint as (path, state, upgraded to the current schema), or None.

        ``checkpoint-last.pth`` is tried first; a numbered file standing later (a crash between writing it and
        updating last) wins over it, and the numbered files, newest first, are the fallback when last is missing,
        unreadable or fails its checksum. The DCP directories of a sharded run (`mae.train.dcp.newest_valid`) count
        too: the checkpoint standing furthest in the run wins (a run may switch between ddp and fsdp on resume).
        """
        from mae.train.dcp import newest_valid

        found = self._load_latest_file(map_location)
        sharded = newest_valid(self.output_dir)  # DCP directories of sharded (fsdp) runs: the newest verified one
        if sharded is None:
            return found
        if found is None or _standing(sharded[1]) > _standing(found[1]):
            return sharded
        return found

    def _load_latest_file(self, map_location: str | torch.device) -> tuple[Path, dict[str, Any]] | None:
        numbered = list(reversed(self.numbered()))  # newest first
        last = self._try_load(self.last_path, map_location) if self.last_path.is_file() else None
        if last is not None:
            here = position_of(last)
            for epoch, path in numbered:
                if (epoch + 1, 0) > here and (state := self._try_load(path, map_location)) is not None:
                    return path, state
            return self.last_path, last
        for _, path in numbered:
            if (state := self._try_load(path, map_location)) is not None:
                return path, state
        return None

    @staticmethod
    def _try_load(path: Path, map_location: str | torch.device) -> dict[str, Any] | None:
        try:
            return load_training_state(path, map_location)
        except CheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint '{path}': {e}", stacklevel=4)
            return None


def _is_dcp(path: Path) -> bool:
    from mae.train.dcp import is_dcp_checkpoint

    return is_dcp_checkpoint(path)


def _standing(state: dict[str, Any]) -> tuple[int, int, int]:
    """How far into the run a state stands: (epoch, batch, update)."""
    return (*position_of(state), int((state.get("engine") or {}).get("step", 0)))


def load_training_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint file read safely, verified against its digest and upgraded to the current schema. A DCP directory
    (sharded run) gives its verified schema keys without tensors: `mae.train.dcp.restore` loads those in place."""
    if Path(path).is_dir() and _is_dcp(Path(path)):
        from mae.train.dcp import read_meta

        return read_meta(path)
    state = safe_load(path, map_location)
    verify_state(state, path)
    return upgrade_state(state)


def nonfinite_keys(obj: Any, prefix: str = "") -> Iterator[str]:
    """The dotted keys of the floating-point tensors in `obj` (nested dicts / lists, in their order) with a NaN or
    inf."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            yield prefix or "<tensor>"
        return
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        yield from nonfinite_keys(value, f"{prefix}.{key}" if prefix else str(key))


def _first_nonfinite(obj: Any, prefix: str = "") -> str | None:
    """The dotted key of the first floating-point tensor in `obj` (nested dicts / lists) with a NaN or inf."""
    return next(nonfinite_keys(obj, prefix), None)


def refuse_nonfinite(obj: dict[str, Any], path: str | Path) -> None:
    """Raise CheckpointError when a checkpoint read from `path` holds NaN or inf, naming the first such tensor: the
    weights' (``model`` / ``state_dict`` / the top level) by key in state-dict order, then the rest of the state's (an
    EMA copy, optimizer moments) by dotted path. Every reader of weights goes through here (`safe_load`,
    `mae.interop.native.read_safetensors`), so no command runs on weights of a diverged run."""
    weights = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), dict)), obj)
    rest = {k: v for k, v in obj.items() if v is not weights} if weights is not obj else {}
    bad = [*nonfinite_keys(weights), *nonfinite_keys(rest)]
    if bad:
        count = "its only non-finite tensor" if len(bad) == 1 else f"the first of {len(bad)} non-finite tensors"
        raise CheckpointError(f"checkpoint '{path}' holds NaN/inf in '{bad[0]}' ({count}): the run that wrote it "
                              f"diverged; use an earlier checkpoint")


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
