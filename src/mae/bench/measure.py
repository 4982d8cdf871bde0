"""What a benchmark records besides step times: peak memory, the device's peak matmul FLOP/s, and the machine.

Peak memory. CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the model was built
(weights, gradients, optimizer state, activations, workspace of the caching allocator's live blocks). CPU: the
rise of the process's resident set, ``VmHWM`` of ``/proc/self/status`` after resetting it through
``/proc/self/clear_refs`` (Linux), minus ``VmRSS`` before the model was built (after ``gc`` and ``malloc_trim``
returned freed memory). It counts the same things plus allocator slack; it is the memory the operating system
had to give the run. Elsewhere CPU memory is not measured (reported as null).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import re
import statistics
import time
from functools import cache
from pathlib import Path
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of what runs between ``start()`` and ``stop()`` (bytes above the level at ``start()``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM-VmRSS"
        self._base: int | None = None

    def start(self) -> PeakMemory:
        _trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        rss = _status_kib("VmRSS")
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            rss = None
        self._base = None if rss is None else rss * 1024
        return self

    def stop(self) -> int | None:
        if self._base is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        hwm = _status_kib("VmHWM")
        return None if hwm is None else max(0, hwm * 1024 - self._base)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> dict:
    """Achievable FLOP/s of one large square matrix product of `dtype` on `device` (median of `repeats`).

    This is the denominator of the model-FLOPs utilisation: a measured peak rather than a datasheet number, so
    the MFU says how close the model gets to what this machine's matmul library actually delivers.
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:  # the first two set up the library's kernels
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {"dtype": str(dtype).replace("torch.", ""), "size": size, "seconds": seconds,
            "flops_per_s": 2.0 * size**3 / seconds}


@cache
def cpu_model_name() -> str:
    """The CPU's model name as ``lscpu`` prints it (from /proc/cpuinfo), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other processes on the machine skew CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device) -> dict:
    """The machine a result was measured on: CPU, cores, threads, device, library versions."""
    info: dict[str, Any] = {
            "cpu": cpu_model_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": str(device), "load_average": load_average(), "python": platform.python_version(),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")
                    if k in os.environ}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def available_memory() -> int | None:
    """Bytes the kernel says a new process could use (MemAvailable), or None off Linux."""
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None
