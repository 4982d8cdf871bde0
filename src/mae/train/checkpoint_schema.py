"""The primitives every checkpoint reader and writer shares, whatever the backend: the schema version and keys, the
SHA-256 digest and its check, where a state stands in its run, the NaN / inf scan, the weights-only file reader and
the atomic writer. Nothing above this module is imported (only torch, safetensors, the standard library,
`mae.errors` and `mae.files`), so every layer may use it.

* `atomic_save` writes through `mae.files.atomic_write` (temporary file, fsync, rename, umask-respecting mode), so a
  reader sees either the old file or the new one, never half of one.
* `safe_load_file` uses ``torch.load(weights_only=True)``: tensors and plain containers only. Reference MAE
  checkpoints also pickle an ``argparse.Namespace`` under ``'args'``; that one class is allowed, nothing else.
* `stamp` / `verify_state`: a digest written with every training state and checked when it is read for a resume.
* `restore_model_state` restores a run's own weights into its module, naming the keys that do not fit (another
  architecture); loading weights of the model family by its rules is `mae.models.loading.load_weights`.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mae.errors import CheckpointError, excerpt, first_line
from mae.files import atomic_write

__all__ = ["SCHEMA_KEYS", "SCHEMA_VERSION", "atomic_save", "first_nonfinite", "nonfinite_keys", "peek_file",
           "position_of", "refuse_nonfinite", "restore_model_state", "safe_load_file", "stamp", "standing",
           "state_digest", "verify_state"]

SCHEMA_VERSION = 2
"""Version of the training-checkpoint layout the checkpoint stores write and resume (an older one is refused:
docs/checkpoints.md, "Which files are read")."""
SCHEMA_KEYS = ("format", "version", "kind", "model", "engine", "train_state", "rng", "config", "data", "versions",
               "integrity")
"""Keys every version-2 training checkpoint has; recipe-specific metadata (``model_config``, ``classifier_config``,
``class_names``, ``task``, ``model_ema``) sits next to them."""

# the only non-tensor class a reference checkpoint needs: its training arguments
_SAFE_GLOBALS: list[Any] = [argparse.Namespace]


# ---------------------------------------------------------------------------------------------------- writing
def atomic_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj)` to `path` atomically (`mae.files.atomic_write`): on any error the previous file at `path`
    is left untouched and an `OutputError` names the reason and the fix."""
    return atomic_write(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------------------------------- reading
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def safe_load_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a ``.pth``/``.pt`` (weights only) or ``.safetensors`` file without executing anything from it; a file
    holding NaN or inf is refused (`refuse_nonfinite`)."""
    path = Path(path)
    obj = _read_file(path, map_location)
    refuse_nonfinite(obj, path)
    return obj


def peek_file(path: str | Path) -> dict[str, Any]:
    """A ``.pth`` checkpoint memory-mapped, without the finiteness check: what the file says about itself (format,
    kind, configs) at the cost of reading its header. Nothing from the file is executed, as in `safe_load_file`."""
    return _read_file(Path(path), "cpu", mmap=True)


def _read_file(path: Path, map_location: str | torch.device, mmap: bool = False) -> dict[str, Any]:
    """What `safe_load_file` reads, before its finiteness check; ``mmap`` maps a ``.pth`` instead of reading it."""
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
            f"refused to load checkpoint '{path}': it is not a weights-only PyTorch file ({_torch_reason(e)}); only "
            "weights are loaded, re-save it with torch.save(state_dict)"
        ) from None
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            reason = e.strerror or str(e) or type(e).__name__
            raise CheckpointError(f"could not read checkpoint '{path}': {reason}; check its permissions") from None
        raise CheckpointError(
            f"checkpoint '{path}' is truncated or corrupt ({_torch_reason(e)}); use an earlier checkpoint or "
            "download it again"
        ) from None
    except Exception as e:  # noqa: BLE001 (the unpickler meets a file that is not a checkpoint with any error)
        raise CheckpointError(
            f"checkpoint '{path}' is truncated or corrupt, or not a PyTorch checkpoint at all ({_torch_reason(e)}); "
            "use an earlier checkpoint or download it again"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, expected a dict (a state dict)")
    return obj


def _load_safetensors(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    from safetensors import SafetensorError  # loaded only when a .safetensors file is read
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint '{path}' is truncated or corrupt ({_torch_reason(e)}); use an earlier file or download it "
            "again"
        ) from None


def _torch_reason(e: BaseException) -> str:
    """The specific reason in an exception message: torch wraps it in paragraphs of generic advice."""
    reason = first_line(e, _TORCH_ADVICE).split(". This is an internal miniz error")[0][:200]
    return f"{type(e).__name__}: {reason}" if reason else type(e).__name__


_TORCH_ADVICE = ("Weights only load failed", "In PyTorch", "(1)", "(2)", "Please file an issue",
                 "Check the documentation")
"""How the paragraphs of generic advice that torch wraps around a load error begin."""


# ---------------------------------------------------------------------------------------------------- integrity
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


def stamp(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with its digest written into its ``integrity`` entry (in place; an entry it already has keeps its
    place, a new one goes last), as every store writes it."""
    state["integrity"] = None
    state["integrity"] = {"sha256": state_digest(state)}
    return state


def verify_state(state: dict[str, Any], path: str | Path) -> None:
    """Raise CheckpointError when a checkpoint's stored digest does not match its contents (a damaged file).
    States without a digest (not written by a checkpoint store) pass."""
    stored = state.get("integrity")
    if not isinstance(stored, dict) or "sha256" not in stored:
        return
    if state_digest(state) != stored["sha256"]:
        raise CheckpointError(f"checkpoint '{path}' is damaged: its contents do not match the checksum written with "
                              f"it (a flipped bit or an incomplete copy); use an earlier checkpoint")


# ---------------------------------------------------------------------------------------------------- position
def position_of(state: dict[str, Any]) -> tuple[int, int]:
    """(epoch, batch) where a training state stands: the epoch in progress and the batches of it already done."""
    ts = state.get("train_state")
    if ts is None:  # a bare state saved at an epoch's end, without the run layer's record
        return (int(state["epoch"]) + 1, 0) if isinstance(state.get("epoch"), int) else (0, 0)
    return int(ts.get("epoch", 0)), int(ts.get("batch", 0))


def standing(state: dict[str, Any]) -> tuple[int, int, int]:
    """How far into the run a state stands: (epoch, batch, update); the newest checkpoint is the one furthest on."""
    return (*position_of(state), int((state.get("engine") or {}).get("step", 0)))


# ---------------------------------------------------------------------------------------------------- NaN / inf
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


def first_nonfinite(obj: Any, prefix: str = "") -> str | None:
    """The dotted key of the first floating-point tensor in `obj` (nested dicts / lists) with a NaN or inf."""
    return next(nonfinite_keys(obj, prefix), None)


def refuse_nonfinite(obj: dict[str, Any], path: str | Path) -> None:
    """Raise CheckpointError when a checkpoint read from `path` holds NaN or inf, naming the first such tensor: the
    weights' (``model`` / ``state_dict`` / the top level) by key in state-dict order, then the rest of the state's (an
    EMA copy, optimizer moments) by dotted path. Every reader of weights goes through here (`safe_load_file`,
    `mae.interop.native.read_safetensors`), so no command runs on weights of a diverged run."""
    weights = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), dict)), obj)
    rest = {k: v for k, v in obj.items() if v is not weights} if weights is not obj else {}
    bad = [*nonfinite_keys(weights), *nonfinite_keys(rest)]
    if bad:
        count = "its only non-finite tensor" if len(bad) == 1 else f"the first of {len(bad)} non-finite tensors"
        raise CheckpointError(f"checkpoint '{path}' holds NaN/inf in '{bad[0]}' ({count}): the run that wrote it "
                              f"diverged; use an earlier checkpoint")


# ---------------------------------------------------------------------------------------------------- into a module
def restore_model_state(module: torch.nn.Module, state_dict: dict[str, Any], source: str | Path) -> None:
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
            parts.append(f"missing from the file: {excerpt(missing)}")
        if unexpected:
            parts.append(f"not in the model: {excerpt(unexpected)}")
        raise CheckpointError(f"'{source}' does not fit the model (another architecture?): {'; '.join(parts)}; "
                              "use the model settings of the run that wrote it")
    module.load_state_dict(state_dict)


def _shape(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
