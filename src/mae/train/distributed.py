"""Thin helpers over `torch.distributed` for runs started with torchrun (or as one plain process).

torchrun (single node, multi-node, or under SLURM's srun) sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; `init_distributed` joins that process group (nccl on GPUs, gloo on CPUs). The recipes wrap the model
in DistributedDataParallel, read a per-rank shard through `mae.data.build_loader(distributed=True)`, and only
rank 0 writes logs and checkpoints. See docs/robustness.md for launch commands.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mae.errors import ConfigError

__all__ = ["DistInfo", "all_gather_objects", "all_reduce_mean", "barrier", "cleanup", "init_distributed", "is_main"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run: its global rank, the number of processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK, or run as one process.

    The backend is nccl on CUDA and gloo on CPU. `device` forces a device type (e.g. "cpu" on a GPU machine);
    by default each process takes ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                                  f"start at most that many processes per node (torchrun --nproc_per_node)")
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer; launch with torchrun") from None


def is_main() -> bool:
    """True on rank 0, and in a run without a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single-process run)."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":  # name this rank's GPU, or NCCL guesses (and may pick GPU 0 for every rank)
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all processes, as a new floating-point tensor (the input is left unchanged)."""
    out = tensor.detach().clone()
    if not out.is_floating_point():
        out = out.float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """`obj` of every process, in rank order (``[obj]`` in a single-process run); a collective: call it on all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
