"""Thin helpers over `torch.distributed` for runs started with torchrun (or as one plain process).

torchrun (single node, multi-node, or under SLURM's srun) sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; `init_distributed` joins that process group (nccl on GPUs, gloo on CPUs). The recipes wrap the model
in DistributedDataParallel, read a per-rank shard through `mae.data.build_loader(distributed=True)`, and only
rank 0 writes logs and checkpoints. See docs/robustness.md for launch commands.

`DistributedSection` is the ``distributed`` section of every training config (ddp or fsdp, `mae.train.fsdp`);
`on_main` runs a step on rank 0 and raises its error on every rank.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mae.errors import ConfigError, MAEError

__all__ = ["FSDP_INITS", "STRATEGIES", "DistInfo", "DistributedSection", "all_gather_objects", "all_reduce_mean",
           "barrier", "cleanup", "init_distributed", "is_main", "on_main"]

STRATEGIES = {"ddp": "file", "fsdp": "dcp"}
"""How a run spreads over its processes (`DistributedSection.strategy`), and the checkpoint store each one writes
(a key of `mae.train.checkpoint.STORES`): rank 0's single files, or every rank's shards in DCP directories."""
FSDP_INITS = ("auto", "full", "sharded")
"""How an fsdp run initialises its weights: `DistributedSection.init`."""


@dataclass
class DistributedSection:
    """How the model is spread over the processes of a run (torchrun); see docs/scale.md."""

    strategy: str = field(default="ddp", metadata={
        "help": "ddp: every process holds the whole model (DistributedDataParallel) | fsdp: parameters, gradients "
                "and optimizer state sharded over the processes (FSDP2), checkpoints as DCP directories"})
    init: str = field(default="auto", metadata={
        "help": "fsdp initial weights: full (as ddp: the whole model once per rank, then sharded) | sharded (built "
                "on the meta device, each shard initialised in place) | auto (full up to 1e9 parameters)"})
    mixed_precision: bool = field(default=False, metadata={
        "help": "fsdp: bf16 parameters and compute, fp32 gradient reduction and fp32 master weights (needs "
                "precision=bf16)"})
    reshard_after_forward: bool = field(default=True, metadata={
        "help": "fsdp: free each block's gathered weights after its forward (gathered again for backward); false "
                "keeps them until backward: less communication, more memory"})
    cpu_offload: bool = field(default=False, metadata={
        "help": "fsdp: keep parameter shards, gradients and optimizer state in host memory (GPU runs; the "
                "optimizer steps on the CPU)"})

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"distributed.strategy '{self.strategy}' is not one of {', '.join(STRATEGIES)}")
        if self.init not in FSDP_INITS:
            raise ConfigError(f"distributed.init '{self.init}' is not one of {', '.join(FSDP_INITS)}")
        if self.strategy != "fsdp":
            used = [name for name, on in (("mixed_precision", self.mixed_precision), ("cpu_offload", self.cpu_offload),
                                          ("init", self.init != "auto"),
                                          ("reshard_after_forward", not self.reshard_after_forward)) if on]
            if used:
                raise ConfigError(f"distributed.{used[0]} applies to distributed.strategy=fsdp only; set "
                                  f"distributed.strategy=fsdp or leave it at its default")


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
        check_launch_environment(rank, world_size, local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        except (RuntimeError, ValueError, OSError) as e:  # DistStoreError, DistNetworkError, a refused port ...
            first = " ".join(str(e).split())[:300]
            raise ConfigError(
                f"could not join the process group of {world_size} processes at "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({first}); start every process with "
                f"the same torchrun command, or unset {' '.join(_LAUNCH_VARS)} to run as one process"
            ) from e
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


# what torchrun (or srun + a launcher) sets for each process; a few of them left in a shell make a stray environment
_LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_launch_environment(rank: int, world_size: int, local_rank: int) -> None:
    """A one-line `ConfigError` for a partial or stray launch environment (e.g. ``WORLD_SIZE=2`` left in a shell
    without ``MASTER_ADDR``), before torch.distributed meets it with a traceback or waits for processes that never
    come."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if "RANK" not in os.environ:
        missing.insert(0, "RANK")
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world_size} asks for {world_size} processes but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: this is a partial launch environment (a variable left "
            f"in the shell?); launch with torchrun, or unset {' '.join(_LAUNCH_VARS)} to run as one process"
        )
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} is outside 0..{world_size - 1} (WORLD_SIZE={world_size}); launch with "
                          f"torchrun, or unset {' '.join(_LAUNCH_VARS)} to run as one process")
    if local_rank < 0 or local_rank > rank:
        raise ConfigError(f"LOCAL_RANK={local_rank} does not fit RANK={rank}: a process's rank on its node is at "
                          f"least 0 and at most its global rank; launch with torchrun")


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


def cleanup(wait_for_others: bool = False) -> None:
    """Leave the process group, if one was joined. With `wait_for_others` (a run that ended well on this rank) every
    rank first meets the others, so none tears its connections down while a peer still has collective work in flight
    (gloo then aborts the peer: "terminate called without an active exception"); a rank that failed leaves at once."""
    if not dist.is_initialized():
        return
    if wait_for_others:
        with contextlib.suppress(RuntimeError, ValueError, OSError):  # a peer that failed has already left
            dist.barrier()
    dist.destroy_process_group()


T = TypeVar("T")


def on_main(fn: Callable[[], T], dist_info: DistInfo) -> T | None:
    """Run ``fn()`` on rank 0 and give every rank its result; an `MAEError` there is raised on every rank (so that
    all processes stop with the same one-line error instead of hanging)."""
    outcome: Any = None
    if dist_info.is_main:
        try:
            outcome = ("ok", fn())
        except MAEError as e:
            outcome = ("error", e)
    shared = all_gather_objects(outcome)[0] if dist_info.world_size > 1 else outcome
    kind, value = shared
    if kind == "error":
        raise value
    return value if dist_info.is_main else None
