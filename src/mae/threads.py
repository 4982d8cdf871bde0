"""How many threads a `mae` process should use, decided before torch starts its thread pools.

On a shared machine the defaults hurt: OpenMP threads spin while they wait (``OMP_WAIT_POLICY=active``), so a run
next to one busy process slows down far more than its share, and the thread count follows the machine's cores even
when a container's CPU quota, the process's CPU affinity or torchrun's several processes per node leave fewer. The
CLI (not the library: it never changes a caller's process) calls `configure` first thing, and only fills in what the
user did not set:

- ``OMP_WAIT_POLICY=PASSIVE`` when other processes keep at least half a CPU busy (`busy_cpus`, sampled over 0.1 s
  from /proc/stat as the command starts): waiting threads then sleep instead of spinning against the neighbour.
  On a quiet machine OpenMP's own policy stays (spinning briefly is faster there). The measurements behind both
  choices are in docs/benchmarks.md, "Per CPU kind".
- ``OMP_NUM_THREADS`` = the CPUs this process may use (`usable_cpus`) divided by the processes torchrun starts on
  this node (``LOCAL_WORLD_SIZE``), at least 1.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["busy_cpus", "configure", "default_workers", "max_workers", "usable_cpus"]


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers, SLURM)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_quota() -> int | None:
    """The CPU quota of the cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), rounded up; None when unlimited."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return math.ceil(int(text[0]) / int(text[1]))
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return math.ceil(quota / period)
    except (OSError, ValueError):
        pass
    return None


def _local_processes(environ: MutableMapping[str, str]) -> int:
    try:
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def busy_cpus(window: float = 0.1) -> float:
    """How many CPUs other processes keep busy, sampled from /proc/stat over `window` seconds (this process sleeps
    meanwhile); 0.0 where /proc/stat cannot be read."""
    import time

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(window)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    total = total1 - total0
    return 0.0 if total <= 0 else (os.cpu_count() or 1) * (total - (idle1 - idle0)) / total


def configure(environ: MutableMapping[str, str] | None = None, busy: float | None = None) -> dict[str, str]:
    """Fill in ``OMP_WAIT_POLICY`` and ``OMP_NUM_THREADS`` where unset (see the module docstring); returns what it
    set. Call it before torch is imported: OpenMP reads them once, when its first thread pool starts. `busy` is the
    CPUs other processes use (default: sampled now)."""
    environ = os.environ if environ is None else environ
    chosen: dict[str, str] = {}
    if "OMP_WAIT_POLICY" not in environ and (busy_cpus() if busy is None else busy) >= 0.5:
        chosen["OMP_WAIT_POLICY"] = "PASSIVE"
    if "OMP_NUM_THREADS" not in environ:
        chosen["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // _local_processes(environ)))
    environ.update(chosen)
    return chosen


def max_workers(environ: MutableMapping[str, str] | None = None) -> int:
    """The most DataLoader workers this machine allows a process: the usable CPUs of this process's share of the
    node, less one for the training thread (0 on a 1-CPU share). A shipped preset's larger value is lowered to
    `default_workers` (`mae.config.load_config`); a value the user sets is kept."""
    environ = os.environ if environ is None else environ
    return max(0, usable_cpus() // _local_processes(environ) - 1)


def default_workers(environ: MutableMapping[str, str] | None = None) -> int:
    """DataLoader workers per process when the config leaves it to us: `max_workers`, at most 8 (0 on a 1-CPU
    share: load in the main process)."""
    return min(8, max_workers(environ))
