"""Mixed precision: pick bf16 / fp16 / fp32 for a device, and the matching autocast context and grad scaler."""

from __future__ import annotations

import contextlib
import functools
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from mae.errors import ConfigError

__all__ = ["PRECISIONS", "autocast_context", "cpu_has_fast_bf16", "make_grad_scaler", "resolve_precision"]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device | str) -> str:
    """``'bf16'``, ``'fp16'`` or ``'fp32'`` for `device`; ``'auto'`` picks bf16 where the hardware runs it natively.

    'auto' is bf16 on CUDA devices that support it and on CPUs with AVX-512 BF16 or AMX, fp32 elsewhere.
    """
    device = torch.device(device)
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if device.type == "cpu":
            return "bf16" if cpu_has_fast_bf16() else "fp32"
        return "fp32"
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("precision 'fp16' is not supported on CPU; use precision=bf16 or precision=fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16; use precision=fp16 or fp32")
    return name


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX) and ATen runs its AVX-512 kernels, so bf16
    autocast is actually faster. Where ATen dispatches to AVX2 or plainer kernels (an older CPU, or
    ``ATEN_CPU_CAPABILITY=avx2``) bf16 is emulated there whatever the CPU flags say: fp32."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if "AMX" in capability:
        return True
    if "AVX512" not in capability:
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume no, fp32 is always correct
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def autocast_context(precision: str, device: torch.device | str) -> AbstractContextManager:
    """``torch.autocast`` in bf16/fp16 for `precision`, or a no-op context for fp32."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _DTYPES:
        raise ConfigError(f"precision {precision!r} is not resolved; pass it through resolve_precision() first")
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def make_grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """A loss scaler that is active only for fp16 (bf16 and fp32 do not underflow the way fp16 does)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
