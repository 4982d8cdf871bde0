"""A run directory you can trust: never overwritten by accident, never shared by two runs, and read the same way by
every command.

* `guard_fresh_start` refuses to start a new run in a folder that holds a previous one (or clears it, with
  ``overwrite``): `mae.files.guard_folder`, the check of every command's output folder, told what a run's files are;
  `RunLock` is an OS file lock (``.lock``) held for the run's lifetime, released on any exit (the kernel drops it
  when the process dies, so a stale lock of a dead process is simply taken over).
* ``run.json`` says where the run stands: ``running``, ``interrupted`` (stopped by a signal after a checkpoint),
  ``failed`` or ``finished``, the newest checkpoint and the run's result file.
* `resolve_run` is the one rule for reading a run directory, used by every command that takes one (``mae
  visualize``, ``finetune --checkpoint``, ``convert``, ``evaluate``, ...): a finished run gives its result (the
  final ``model.safetensors`` of a pre-training, the best checkpoint of a classification or transfer run); a run
  that has not finished (still going, killed, interrupted, or extended by a resume) gives its newest valid
  checkpoint. A file is taken as it is. A released-weights name (``official:<file>``, ``hf:<org/repo>``,
  ``timm:<tag>``, `mae.weights`) is fetched once into the cache and read as the file or folder it gives
  (`released_weights`, `local_path`): every reader that starts here takes a name wherever it takes a path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mae.errors import CheckpointError, ConfigError, OutputError
from mae.files import fix_for, guard_folder, pid_alive, reason_of, write_json
from mae.train.checkpoint import load_latest
from mae.weights import ResolvedWeights, is_weights_name, resolve_weights

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["RUN_FILES", "RunLock", "guard_fresh_start", "local_path", "read_status", "released_weights", "resolve_run",
           "write_status"]

_log = logging.getLogger(__name__)

STATUS_NAME = "run.json"
LOCK_NAME = ".lock"
RUN_FILES = ("config.yaml", STATUS_NAME, "metrics.jsonl", "summary.json", "model.safetensors", "config_changes.jsonl",
             "param_groups.json", "metrics_final.json", "eval.json", "loss.png", "curves.png", "reconstructions.png")
"""Files a run writes at its top level (besides checkpoints and ``tensorboard/``); `guard_fresh_start` looks for
them and ``overwrite`` removes them (nothing else in the folder is touched)."""


def _previous_run_files(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    found = [name for name in RUN_FILES if (out / name).exists()]
    found += sorted(p.name for p in out.glob("checkpoint-*.pth"))
    found += sorted(f"{p.name}/" for p in out.glob("checkpoint-*") if p.is_dir())  # DCP checkpoints (fsdp runs)
    if (out / "tensorboard").is_dir():
        found.append("tensorboard/")
    return found


def guard_fresh_start(out: Path, overwrite: bool) -> None:
    """Before a new run (no resume) in `out`: refuse if it holds a previous run, or, with `overwrite`, remove that
    run's files (nothing else in the folder is touched). Refusing changes nothing on disk."""

    def refusal(shown: str) -> ConfigError:
        return ConfigError(f"'{out}' holds a previous run ({shown}); continue it with --resume auto, or choose a new "
                           f"--output-dir (--overwrite deletes that run and starts again)")

    removed = guard_folder(out, overwrite, _previous_run_files, refusal, remove=True)
    if removed:
        _log.warning("--overwrite: removed the previous run in '%s' (%d files)", out, len(removed))


class RunLock:
    """An exclusive lock on a run directory for this process's lifetime (``fcntl.flock`` on ``<dir>/.lock``).

    The file names its holder (pid, host, command, time); a second run on the folder is refused with that name. A
    lock file left by a dead process holds no lock (the kernel released it), so the next run takes it over. On file
    systems without working flock (some network mounts) acquiring may fail with an error naming the problem.
    """

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: str | Path, command: str = "") -> RunLock:
        directory = Path(directory)
        path = directory / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"cannot create the lock file '{path}': {e.strerror or e}; make the folder writable or "
                              f"choose another --output-dir") from e
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the directory guard still protects finished runs
            return cls(directory, fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(f"'{directory}' is in use by another run ({holder}); wait for it to end or choose "
                              f"another --output-dir") from None
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"cannot lock '{path}': {e.strerror or e} (the file system may not support locks); "
                              f"use a local --output-dir") from e
        previous = _read_holder(fd, parsed=True)
        if isinstance(previous, dict) and previous.get("pid") and previous.get("host") == socket.gethostname() \
                and previous["pid"] != os.getpid() and not pid_alive(int(previous["pid"])):
            _log.info("took over the lock of '%s' from process %s, which is no longer running", directory,
                      previous["pid"])
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or " ".join(sys.argv[:2]),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError as e:  # a full disk or quota: the lock is held, but the run could not write its first byte
            os.close(fd)
            raise OutputError(f"could not write '{path}': {reason_of(e)}; {fix_for(e)}") from e
        return cls(directory, fd)

    def release(self) -> None:
        """Give the lock up (also done by the kernel when the process exits, however it exits)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        with contextlib.suppress(OSError):
            os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int, parsed: bool = False) -> Any:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        info = json.loads(text) if text else {}
    except (OSError, ValueError):
        info = {}
    if parsed:
        return info
    if not info:
        return "a process that has not written its name yet"
    return f"process {info.get('pid')} on {info.get('host')}: {info.get('command', '?')}, since {info.get('since')}"


# ---------------------------------------------------------------------------------------------------- run.json
def write_status(out: Path, **fields: Any) -> None:
    """Update ``run.json`` (merged with what it holds)."""
    status = read_status(out) or {}
    status.update(fields, updated=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json(out / STATUS_NAME, status)


def read_status(out: Path) -> dict[str, Any] | None:
    path = Path(out) / STATUS_NAME
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------------------------------- reading a run
def is_run_dir(path: Path) -> bool:
    """A folder written by a training run of this library (not a Hugging Face or exported-model directory)."""
    return path.is_dir() and ((path / STATUS_NAME).is_file() or (path / "config.yaml").is_file()
                              or any(path.glob("checkpoint-*.pth"))) and not (path / "config.json").is_file()


def released_weights(path: str | Path) -> ResolvedWeights | None:
    """The released weights `path` names (`mae.weights.is_weights_name`), fetched into the cache on first use; None
    for anything else. A file or folder that exists under that spelling is a path, not a name."""
    text = str(path)
    if not is_weights_name(text) or Path(text).expanduser().exists():
        return None
    return resolve_weights(text)  # WeightsError (one line) for an unknown name or a failed download


def local_path(path: str | Path) -> Path:
    """Where `path` is on this machine: the cached file or folder of a released-weights name, else the path."""
    weights = released_weights(path)
    return weights.path if weights is not None else Path(path).expanduser()


def resolve_run(path: str | Path) -> Path:
    """The file to read for `path`: a file as it is; for a run directory, its finished result, else its newest valid
    checkpoint; for a released-weights name, its cached file (see the module docstring). Logs which file it took."""
    path = local_path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist; pass a run directory, a checkpoint file or released weights "
                              f"(official:<file>, hf:<org/repo>, timm:<tag>)")
    if not is_run_dir(path):
        return path
    status = read_status(path) or {}
    result = status.get("result")
    if status.get("status") == "finished" and result and ((path / result).is_file() or (path / result).is_dir()):
        _log.info("%s: using %s (the finished run's result)", path, result)
        return path / result
    found = load_latest(path)
    latest = found[0] if found is not None else None
    if latest is not None:
        why = f"the run is {status['status']}" if status.get("status") else "the newest checkpoint"
        _log.info("%s: using %s (%s)", path, latest.name, why)
        return latest
    for name in ("model.safetensors", "checkpoint-best.pth"):  # a result without a resumable checkpoint beside it
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"run directory '{path}' holds no checkpoint yet; let it train until its first checkpoint "
                          f"or pass a checkpoint file")
