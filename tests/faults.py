"""The fault matrix's tools: real faults (a size-limited tmpfs, a read-only mount, real signals) and the one invariant
every cell checks.

Each cell runs the real CLI in a child process (`run_cli`), with its output on a file system the test mounted
(`small_disk`; CI runs as root here, elsewhere the cell skips and says why), and ends with `check_failure`:

* exit 2 for an error (128 + n for a signal), no traceback;
* exactly one error line on stderr, and it is the last line (`mae CMD: error: ...`, or `mae CMD: stopped ...` /
  `... interrupted` for a signal);
* no file the user had is changed or lost (`snapshot` before, `assert_unchanged` after);
* no half-written output: no temporary of the atomic writer left behind (`assert_no_partial`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TIMEOUT = 300
PAGE = 4096
NAN_TENSOR = "blocks.1.mlp.fc1.weight"


def pretrain_settings() -> list[str]:
    """The matrix's tiny pre-training run (128 digits, 2 epochs, a checkpoint each, reconstructions drawn)."""
    from tiny import MODEL, RUN

    return [*MODEL, *RUN, "data.train_limit=128", "epochs=2", "save_every=1", "visualize=true"]


def nan_copy(src: Path, dst: Path, key: str = NAN_TENSOR) -> Path:
    """`src` (a safetensors file) with one weight of `key` NaN, its metadata kept: a run that diverged."""
    import math

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(src)
    tensors[key].view(-1)[0] = math.nan
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.rc}\n--- stdout\n{self.out[-2000:]}\n--- stderr\n{self.err[-4000:]}"


def cli_env(**extra: str) -> dict[str, str]:
    """The child's environment: one thread (bit-identical numerics in every run), no stray launch variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mae", *args]


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = TIMEOUT) -> Result:
    proc = subprocess.run(cli(*args), capture_output=True, text=True, cwd=cwd, env=env or cli_env(), timeout=timeout,
                          check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def start_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=env or cli_env())


def wait_for(predicate, timeout: float = TIMEOUT, proc: subprocess.Popen | None = None) -> None:
    """Poll `predicate` until it holds; fails if `proc` ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the command ended (exit {proc.returncode}) before the fault could be injected:\n"
                        f"{err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the command to reach the point of the fault")
        time.sleep(0.05)


def check_failure(result: Result, command: str, rc: int = 2, mentions: tuple[str, ...] = ()) -> str:
    """The cell's invariant on the process: the exit code, no traceback, one error line and it is the last line.
    Returns that line; each of `mentions` must appear in it (case-insensitive)."""
    assert result.rc == rc, str(result)
    assert "Traceback" not in result.err and "Traceback" not in result.out, str(result)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert lines, str(result)
    last = lines[-1]
    if rc == 2:
        assert last.startswith(f"mae {command}: error: "), str(result)
    else:
        assert last.startswith(f"mae {command}: "), str(result)
    errors = [line for line in lines if line.startswith("mae ") and ": error: " in line]
    assert len(errors) == (1 if rc == 2 else 0), str(result)
    for word in mentions:
        assert word.lower() in last.lower(), f"{word!r} not in {last!r}"
    return last


def snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    """Every file under `roots` (or the file itself): its sha256 and mtime, to show later that none was touched."""
    seen: dict[str, tuple[str, int]] = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        for p in paths:
            seen[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return seen


def assert_unchanged(before: dict[str, tuple[str, int]]) -> None:
    for path, (digest, mtime) in before.items():
        p = Path(path)
        assert p.is_file(), f"the user's file {path} is gone"
        assert hashlib.sha256(p.read_bytes()).hexdigest() == digest, f"the user's file {path} was changed"
        assert p.stat().st_mtime_ns == mtime, f"the user's file {path} was rewritten"


def assert_no_partial(*roots: Path) -> None:
    """No temporary of the atomic writers (``.NAME.PID.HEX.tmp``, DCP's ``*.tmp`` folders) under `roots`."""
    for root in roots:
        if not root.exists():
            continue
        left = [str(p) for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
        assert not left, f"half-written output left behind: {left}"


def disk_usage(root: Path) -> int:
    """Bytes `root` takes on a tmpfs: whole pages per file, hard links once."""
    inodes: dict[int, int] = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            inodes[st.st_ino] = -(-st.st_size // PAGE) * PAGE
    return sum(inodes.values())


class SmallDisk:
    """A tmpfs mounted by the test: `path` is its root; `fill(free)` leaves `free` bytes, `grow()` ends the fault."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size

    def fill(self, free: int) -> None:
        """Take all but `free` bytes with a filler file (the disk another process filled up)."""
        filler = self.path / ".filler"
        usage = shutil.disk_usage(self.path)
        take = max(usage.free - max(free, 0), 0)
        with open(filler, "ab") as f:
            f.write(b"\0" * (take // PAGE * PAGE))

    def grow(self, size: int = 256 << 20) -> None:
        """The user frees space: the filler goes and the file system grows."""
        with contextlib.suppress(FileNotFoundError):
            (self.path / ".filler").unlink()
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def writable(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=True)


@contextlib.contextmanager
def small_disk(size: int = 64 << 20) -> Iterator[SmallDisk]:
    """A fresh tmpfs of `size` bytes, unmounted afterwards; skips the test where mounting is refused."""
    if sys.platform != "linux":
        pytest.skip("the fault matrix mounts a tmpfs: Linux only")
    root = Path(tempfile.mkdtemp(prefix="mae-disk-"))
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(root)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        root.rmdir()
        pytest.skip(f"cannot mount a tmpfs here (needs root: CI runs as root): {proc.stderr.strip()}")
    try:
        yield SmallDisk(root, size)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)
        with contextlib.suppress(OSError):
            root.rmdir()
