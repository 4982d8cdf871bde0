"""Writing the files a user keeps (checkpoints, weights, exports, JSON and YAML sidecars): one atomic writer.

Every write goes to a temporary file next to the target, is flushed and fsynced, renamed over the target, and the
directory is fsynced, so a reader (or a crash, or a full disk) sees the old file or the new one, never half of one.
The file is created with mode ``0o666`` minus the process umask, like any ``open(path, "w")``: colleagues read what
the umask lets them read. Errors become one `OutputError` line that names the file, the reason and the fix.
Before any work, a command asks `check_new_file` / `check_output_folder` (a training run: `guard_folder` through
`mae.train.run_dir.guard_fresh_start`) whether it may write there: what the user already has is refused unless
``--overwrite``.

    write_json(out / "summary.json", summary)
    atomic_write(out / "checkpoint.pth", lambda f: torch.save(state, f))
    atomic_write_path(out / "model.safetensors", lambda tmp: save_file(tensors, tmp))  # libraries that take a path
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from mae.errors import MAEError, OutputError

__all__ = ["as_os_error", "atomic_write", "atomic_write_path", "check_new_file", "check_output_folder", "fix_for",
           "guard_folder", "is_stale_temporary", "reason_of", "write_json", "write_text"]

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a new binary file and put it at `path` atomically; returns `path`."""

    def through_handle(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return atomic_write_path(path, through_handle)


def atomic_write_path(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Like `atomic_write` for writers that take a file name (``safetensors.torch.save_file``, ``fig.savefig``):
    ``write(tmp)`` fills the temporary file, which is then made durable and renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL with mode 0o666: the kernel applies the umask (mkstemp would force 0o600)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = os.stat(tmp).st_mode & 0o777
        try:
            write(tmp)
        except OSError:
            raise
        except Exception as e:  # torch's zip writer and safetensors turn an OSError into their own
            cause = as_os_error(e, path)
            if cause is e:
                raise
            raise cause from e
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


# how writers that wrap an OSError in their own exception word it
_STRERRORS = {os.strerror(code): code for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                                                    errno.EIO, errno.EFBIG, errno.ENAMETOOLONG, errno.EMFILE)}
# torch.save's zip writer (PyTorchStreamWriter) reports a failed write by position or by its C++ source file
_ZIP_WRITER_FAILURE = re.compile(r"unexpected pos|inline_container|PytorchStreamWriter failed|file write failed")


def as_os_error(e: Exception, path: Path) -> Exception:
    """The OSError behind a library's own write error (`e` itself when there is none to find, i.e. a bug).

    ``torch.save`` on a full disk raises ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``
    and safetensors ``SafetensorError: ... No space left on device (os error 28)``: the errno is read from the text,
    or, for torch's zip writer, from the free space left where the file was being written.
    """
    text = str(e)
    match = re.search(r"\[Errno (\d+)\]|\(os error (\d+)\)", text)
    if match:
        code = int(match.group(1) or match.group(2))
        return OSError(code, os.strerror(code), str(path))
    for message, code in _STRERRORS.items():
        if message in text:
            return OSError(code, message, str(path))
    if _ZIP_WRITER_FAILURE.search(text):
        try:
            full = shutil.disk_usage(path.parent).free < (1 << 20)
        except OSError:
            full = False
        code = errno.ENOSPC if full else errno.EIO
        return OSError(code, os.strerror(code), str(path))
    return e


def reason_of(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def fix_for(e: OSError) -> str:
    """What the user can do about a failed write."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space or choose another --output-dir"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable or choose another --output-dir"
    if e.errno == errno.ENAMETOOLONG:
        return "choose a shorter path"
    if e.errno == errno.EMFILE:
        return "raise the limit of open files (ulimit -n) or lower data.num_workers"
    if e.errno == errno.ENOENT:
        return "check that the folder exists"
    return "check the output folder or choose another --output-dir"


# ---------------------------------------------------------------------------------------------------- existing outputs
def check_new_file(path: str | Path, overwrite: bool) -> None:
    """Before a command writes the file `path`: a file (or link) the user already has there is refused unless
    `overwrite`, when the atomic writer replaces it; a folder there is refused either way. Writes nothing."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"'{path}' is a folder; give the name of the file to write")
    if os.path.lexists(path) and not overwrite:
        raise OutputError(f"'{path}' already exists; pass --overwrite to replace it, or choose another path")


def guard_folder(path: Path, overwrite: bool, found: Callable[[Path], list[str]], refusal: Callable[[str], MAEError],
                 *, own: Callable[[Path], bool] | None = None, remove: bool = False) -> list[str]:
    """The one check before a command writes into the folder `path`: ``found(path)`` lists what is already there
    that counts (names, folders ending in "/"; nothing: go on). Without `overwrite` that is refused with
    ``refusal(shown)`` (`shown`: the first three names), changing nothing, unless ``own(path)`` recognises the folder
    as one the command wrote itself (and continues). With `overwrite`, the listed entries are removed when `remove`
    (a training run starts again) and otherwise left for the writer to replace by name. Returns what was removed."""
    entries = found(path)
    if not entries:
        return []
    if not overwrite:
        if own is not None and own(path):
            return []
        raise refusal(", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else ""))
    if not remove:
        return []
    for name in entries:
        entry = path / name.rstrip("/")
        if entry.is_dir() and not entry.is_symlink():  # a link to a folder (a DCP checkpoint's last / best) goes alone
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return entries


def check_output_folder(path: str | Path, command: str, overwrite: bool,
                        own: Callable[[Path], bool] | None = None) -> None:
    """Before ``mae <command>`` writes into the folder `path`. A file there is refused either way (a file is never
    replaced by a folder). A folder that holds anything besides stale temporaries of this writer counts as existing
    unless ``own(path)`` recognises it as one the command wrote itself (and continues); an existing folder is refused
    unless `overwrite`, which writes into it: files of the same names are replaced, nothing else is touched. Writes
    nothing."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError(f"'{path}' is a file; mae {command} writes a folder there: choose another path")

    def refusal(shown: str) -> OutputError:
        return OutputError(f"'{path}' already holds files that mae {command} did not write ({shown}); pass "
                           f"--overwrite to write into it (files of the same names are replaced, nothing else is "
                           f"touched), or choose another path")

    guard_folder(path, overwrite, _entries, refusal, own=own)


def _entries(path: Path) -> list[str]:
    """What a folder holds besides stale temporaries of the atomic writer, sorted; [] when there is no folder."""
    if not path.is_dir():
        return []
    try:
        return sorted(e.name for e in os.scandir(path) if not is_stale_temporary(path / e.name))
    except OSError as e:
        raise OutputError(f"cannot read the folder '{path}': {reason_of(e)}; {fix_for(e)}") from e


def config_has_keys(folder: Path, keys: set[str]) -> bool:
    """Whether ``folder/config.yaml`` is a mapping holding `keys`: how a command recognises a folder it wrote itself
    (the ``own`` of `check_output_folder`). Reads the YAML safely; anything unreadable is not the command's."""
    import yaml

    try:
        saved = yaml.safe_load((Path(folder) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and keys <= saved.keys()
