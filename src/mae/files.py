"""Writing the files a user keeps (checkpoints, weights, exports, JSON and YAML sidecars): one atomic writer.

Every write goes to a temporary file next to the target, is flushed and fsynced, renamed over the target, and the
directory is fsynced, so a reader (or a crash, or a full disk) sees the old file or the new one, never half of one.
The file is created with mode ``0o666`` minus the process umask, like any ``open(path, "w")``: colleagues read what
the umask lets them read. Errors become one `OutputError` line that names the file, the reason and the fix.

    write_json(out / "summary.json", summary)
    atomic_write(out / "checkpoint.pth", lambda f: torch.save(state, f))
    atomic_write_path(out / "model.safetensors", lambda tmp: save_file(tensors, tmp))  # libraries that take a path
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from mae.errors import OutputError

__all__ = ["atomic_write", "atomic_write_path", "fix_for", "is_stale_temporary", "reason_of", "write_json",
           "write_text"]

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a new binary file and put it at `path` atomically; returns `path`."""

    def through_handle(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return atomic_write_path(path, through_handle)


def atomic_write_path(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Like `atomic_write` for writers that take a file name (``safetensors.torch.save_file``, ``fig.savefig``):
    ``write(tmp)`` fills the temporary file, which is then made durable and renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL with mode 0o666: the kernel applies the umask (mkstemp would force 0o600)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that replaced the file (safetensors does) made it 0o600
            os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise OutputError(f"could not write '{path}': {reason_of(e)}; {fix_for(e)}") from e
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """`text` (UTF-8) at `path`, atomically."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """`obj` as JSON at `path`, atomically (numbers that JSON lacks, e.g. numpy scalars, are written as floats)."""
    return write_text(path, json.dumps(obj, indent=indent, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX; directories cannot be opened this way on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_stale_temporary(path: Path) -> bool:
    """True for a temporary file of `atomic_write` whose writing process is gone (safe to delete)."""
    parts = path.name.split(".")
    if not (path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX) and len(parts) >= 4):
        return False
    try:
        pid = int(parts[-3])
    except ValueError:
        return True  # an older writer's temporary without a pid
    return not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def reason_of(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def fix_for(e: OSError) -> str:
    """What the user can do about a failed write."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space or choose another --output-dir"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable or choose another --output-dir"
    return "check the output folder or choose another --output-dir"
