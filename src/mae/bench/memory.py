"""Memory per GPU of MAE pre-training before renting a cluster: `plan_memory` (an estimate from the architecture,
built on the meta device and run on fake tensors, so a ViT-6.5B plan costs no memory) and `measure_memory` (the
peak of real training steps on this machine, for checking the estimate).

Per rank, in bytes, for AdamW with fp32 master weights (every trainable parameter P, world size W):

- **parameters**: 4P (ddp), 4P/W (fsdp: this rank's shards).
- **gradients**: 4P; ddp with W > 1 adds its all-reduce buckets, another 4P (DistributedDataParallel copies the
  gradients into flat buckets); fsdp: 4P/W sharded plus, while a block's gradients are reduce-scattered, that block's
  full gradients.
- **optimizer**: 8P (ddp) or 8P/W (fsdp): AdamW's two moments.
- **gathered** (fsdp): the weights gathered for compute: the root unit (patch embedding, tokens, norms, heads: kept
  gathered through the step) plus two blocks (the one running and the next, prefetched), in the compute dtype (bf16
  with ``distributed.mixed_precision``); all blocks with ``reshard_after_forward=false``.
- **activations**: what autograd saves in the forward for the backward, counted exactly by running the forward on
  fake tensors (storages counted once); under activation checkpointing the block inputs plus one block recomputed
  during the backward. Autocast's bf16 copies of the weights count here too.

The peak is ``parameters + optimizer + buckets + max(activations + gathered, gradients + gathered block grads)``
plus a workspace of the largest saved tensor (the backward's gradient of it, in flight).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mae.bench.measure import PeakMemory
from mae.errors import ConfigError
from mae.models import model_config
from mae.models.mae import MAEConfig, MaskedAutoencoderViT
from mae.train.distributed import DistInfo, all_gather_objects
from mae.train.fsdp import DistributedSection, transformer_blocks
from mae.train.optim import param_groups
from mae.train.precision import autocast_context
from mae.train.run import Run, TrainFields
from mae.train.trainer import build_engine

__all__ = ["MemoryPlan", "activation_bytes", "measure_memory", "plan_memory"]

GIB = 2**30


@dataclass
class MemoryPlan:
    """The estimated memory of one rank (bytes), by kind, and the peak."""

    model_params: int  # parameters of the whole model
    strategy: str
    world_size: int
    batch_size: int  # per rank
    precision: str
    mixed_precision: bool
    grad_checkpointing: bool
    parameters: int
    gradients: int
    optimizer: int
    buckets: int  # ddp's gradient buckets
    gathered: int  # fsdp's gathered weights (and, during the backward, one block's full gradients)
    activations: int
    workspace: int
    peak: int

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        for key in ("parameters", "gradients", "optimizer", "buckets", "gathered", "activations", "workspace", "peak"):
            row[f"{key}_gib"] = row.pop(key) / GIB
        row["params_b"] = row.pop("model_params") / 1e9
        return row


def _fake_model(config: MAEConfig, dtype: torch.dtype = torch.float32) -> tuple[MaskedAutoencoderViT, Any]:
    """The model on fake tensors (shapes, dtypes and devices, no storage), with weights of `dtype`."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # torch internals: only the memory plan needs them

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with mode:
            model = MaskedAutoencoderViT(config)
    finally:
        torch.set_default_dtype(default)
    return model, mode


def activation_bytes(config: MAEConfig, batch_size: int, precision: str, grad_checkpointing: bool = False,
                     bf16_weights: bool = False) -> dict:
    """Bytes autograd saves for the backward in one training forward of `batch_size` images (fake tensors: nothing
    is computed), with the per-block numbers: {'total', 'largest', 'per_block', 'outside', 'block_inputs'}.
    `bf16_weights`: the weights themselves are bf16 (FSDP's mixed precision), so autocast makes no copies of them."""
    model, mode = _fake_model(config, torch.bfloat16 if bf16_weights else torch.float32)
    model.train()
    with mode:
        imgs = torch.randn(batch_size, config.in_chans, *config.image_hw)
        counts = _saved_tensors(model, lambda: model(imgs), precision)
    blocks = counts["blocks"]
    per_block = max(blocks.values(), default=0)
    outside = counts["outside"]
    if grad_checkpointing:  # each block keeps its input; one block is recomputed at a time in the backward
        total = outside + sum(counts["block_inputs"].values()) + per_block
    else:
        total = outside + sum(blocks.values())
    return {"total": total, "largest": counts["largest"], "per_block": per_block, "outside": outside,
            "block_inputs": sum(counts["block_inputs"].values())}


def _saved_tensors(model: nn.Module, forward: Callable[[], Any], precision: str) -> dict[str, Any]:
    """Run `forward` recording every tensor autograd saves (each storage once; the model's own weights left out),
    attributed to the Transformer block running when it was saved; also each block's input."""
    own = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    running: list[int | None] = [None]
    saved: dict[int, tuple[int, int | None]] = {}  # storage -> (bytes, block index or None)
    inputs: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in own and key not in saved:
            saved[key] = (storage.nbytes(), running[0])
        return t

    handles = []
    for i, block in enumerate(transformer_blocks(model)):
        def enter(module, args, i=i):
            running[0] = i
            inputs[i] = args[0].untyped_storage().nbytes()

        def leave(module, args, output):
            running[0] = None

        handles += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_context(precision, "cpu"):
            forward()
    finally:
        for h in handles:
            h.remove()
    blocks: dict[int, int] = {}
    for size, owner in saved.values():
        if owner is not None:
            blocks[owner] = blocks.get(owner, 0) + size
    return {"blocks": blocks, "outside": sum(size for size, owner in saved.values() if owner is None),
            "block_inputs": inputs, "largest": max((size for size, _ in saved.values()), default=0)}


def _unit_sizes(model: nn.Module) -> tuple[list[int], int]:
    """Parameters of each Transformer block (an FSDP unit) and of the rest (the root unit)."""
    blocks = [sum(p.numel() for p in b.parameters()) for b in transformer_blocks(model)]
    total = sum(p.numel() for p in model.parameters())
    return blocks, total - sum(blocks)


def plan_memory(config: MAEConfig, *, strategy: str, world_size: int, batch_size: int, precision: str = "bf16",
                mixed_precision: bool = False, grad_checkpointing: bool = False,
                reshard_after_forward: bool = True) -> MemoryPlan:
    """The estimated per-rank memory of pre-training `config` (see the module docstring)."""
    if strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"strategy '{strategy}' is not one of ddp, fsdp")
    if world_size < 1 or batch_size < 1:
        raise ConfigError(f"world_size and batch_size must be at least 1, got {world_size} and {batch_size}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision '{precision}' is not one of fp32, bf16, fp16")
    if mixed_precision and (strategy != "fsdp" or precision != "bf16"):
        raise ConfigError("mixed_precision applies to strategy fsdp with precision bf16")
    with torch.device("meta"):
        model = MaskedAutoencoderViT(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    blocks, root = _unit_sizes(model)
    acts = activation_bytes(config, batch_size, precision, grad_checkpointing, bf16_weights=mixed_precision)
    workspace = acts["largest"]
    if strategy == "ddp":
        params, grads, optim = 4 * total, 4 * trainable, 8 * trainable
        buckets = 4 * trainable if world_size > 1 else 0
        gathered = gathered_grads = 0
    else:
        shard = sum(_shard(n, world_size) for n in blocks) + _shard(root, world_size)
        params, grads, optim, buckets = 4 * shard, 4 * shard, 8 * shard, 0
        width = 2 if mixed_precision else 4
        biggest = max(blocks, default=0)
        if world_size == 1:
            gathered = gathered_grads = 0  # a 1-rank mesh gathers nothing: the shards are the whole tensors
        else:
            alive = sum(blocks) if not reshard_after_forward else 2 * biggest
            gathered = width * (root + alive)
            gathered_grads = 4 * biggest  # one block's full gradients before its reduce-scatter
    peak = params + optim + buckets + max(acts["total"] + gathered, grads + gathered + gathered_grads) + workspace
    return MemoryPlan(model_params=total, strategy=strategy, world_size=world_size, batch_size=batch_size,
                      precision=precision, mixed_precision=mixed_precision, grad_checkpointing=grad_checkpointing,
                      parameters=params, gradients=grads, optimizer=optim, buckets=buckets,
                      gathered=gathered + gathered_grads, activations=acts["total"], workspace=workspace, peak=peak)


def _shard(n: int, world_size: int) -> int:
    return math.ceil(n / world_size)


# ---------------------------------------------------------------------------------------------------- measuring
def _return_freed_memory_at_once(device: torch.device) -> None:
    """On CPU (glibc), serve every allocation of 128 KiB or more by its own mapping, returned to the system when
    freed: the process's peak resident memory then follows the peak of live tensors (what
    ``torch.cuda.max_memory_allocated`` counts on a GPU) instead of what the heap kept from earlier allocations.
    By default glibc raises this threshold up to 32 MiB as tensors are freed, and keeps freed chunks below it."""
    if device.type != "cpu":
        return
    # not glibc (OSError, AttributeError): the measurement includes the allocator's slack
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; setting it fixes the threshold


def measure_memory(config: MAEConfig, *, strategy: str, batch_size: int, precision: str, device: torch.device,
                   grad_checkpointing: bool = False, mixed_precision: bool = False, steps: int = 3,
                   seed: int = 0, warm_up: bool = True) -> dict[str, Any]:
    """Peak memory of this rank over `steps` real pre-training updates (`mae.train.trainer.build_engine`: the DDP wrap
    or FSDP sharding as ``mae pretrain`` does it) on a synthetic batch, from before the model is built
    (`mae.bench.measure.PeakMemory`; on CPU with freed memory returned at once, see
    `_return_freed_memory_at_once`). Every rank of the process group calls it."""
    if warm_up:  # first runs page in the library's code and set up its kernels: not the model's memory
        measure_memory(config, strategy=strategy, batch_size=1, precision=precision, device=device,
                       grad_checkpointing=grad_checkpointing, mixed_precision=mixed_precision, steps=1, seed=seed,
                       warm_up=False)
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=device, is_main=rank == 0)
    cfg = TrainFields(epochs=1, batch_size=batch_size, grad_checkpointing=grad_checkpointing, progress=False,
                      log_every=steps, precision=precision,
                      distributed=DistributedSection(strategy=strategy, mixed_precision=mixed_precision))
    cfg.validate()
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(cfg=cfg, kind="pretrain", format="mae-train", dist=info, device=device, precision=precision,
                  out=Path(tmp))
        g = torch.Generator().manual_seed(seed + rank)
        grid = config.num_patches
        batches = [(torch.randn(batch_size, config.in_chans, *config.image_hw, generator=g),
                    torch.rand(batch_size, grid, generator=g)) for _ in range(steps)]
        _return_freed_memory_at_once(device)
        meter = PeakMemory(device).start()
        torch.manual_seed(seed)
        model = MaskedAutoencoderViT(config).to(device)
        engine = build_engine(run, model, param_groups(model, 0.05), optimizer="adamw", updates_per_epoch=steps,
                              lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
            return m(b[0].to(device), noise=b[1].to(device))[0]

        engine.train_epoch(batches, 0, loss_fn, num_batches=steps)
        peak = meter.stop()
        del engine, model
    return {"strategy": strategy, "world_size": world, "rank": rank, "batch_size": batch_size, "precision": precision,
            "grad_checkpointing": grad_checkpointing, "mixed_precision": mixed_precision, "peak_bytes": peak,
            "method": meter.method, "steps": steps}


# ---------------------------------------------------------------------------------------------------- the suite
def suite_memory(models: list[str], strategies: list[str], world_sizes: list[int], batch_size: int, precision: str,
                 mixed_precision: bool, grad_checkpointing: list[bool], measure: list[str], measure_model: str,
                 measure_overrides: dict[str, Any], measure_batch: int, measure_precision: str,
                 device: torch.device) -> dict[str, Any]:
    """``mae bench --suite memory``: the plan of every (model, strategy, world size, checkpointing) and, for each
    strategy in `measure`, this machine's measured peak next to the plan of the same run (the process group's
    world size: start it with torchrun to measure several processes)."""
    rows = []
    for name in models:
        config = model_config(name)
        for strategy in strategies:
            for world in world_sizes:
                for ckpt in grad_checkpointing:
                    plan = plan_memory(config, strategy=strategy, world_size=world, batch_size=batch_size,
                                       precision=precision, mixed_precision=mixed_precision and strategy == "fsdp",
                                       grad_checkpointing=ckpt)
                    rows.append({"model": name, **plan.to_row()})
    checks = []
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_initialized() else 1
    config = model_config(measure_model, **measure_overrides)
    for strategy in measure:
        for ckpt in grad_checkpointing:
            measured = measure_memory(config, strategy=strategy, batch_size=measure_batch, precision=measure_precision,
                                      device=device, grad_checkpointing=ckpt)
            peaks = [measured["peak_bytes"]] if world == 1 else _gather(measured["peak_bytes"])
            plan = plan_memory(config, strategy=strategy, world_size=world, batch_size=measure_batch,
                               precision=measure_precision, grad_checkpointing=ckpt)
            worst = max((p for p in peaks if p is not None), default=None)
            checks.append({"model": measure_model, "strategy": strategy, "world_size": world,
                           "batch_size": measure_batch, "precision": measure_precision, "grad_checkpointing": ckpt,
                           "planned_mib": plan.peak / 2**20, "measured_mib": None if worst is None else worst / 2**20,
                           "measured_per_rank_mib": [None if p is None else p / 2**20 for p in peaks],
                           "plan_over_measured": None if not worst else plan.peak / worst,
                           "method": measured["method"], "params_m": plan.model_params / 1e6})
    return {"rows": rows, "checks": checks}


def _gather(value: Any) -> list[Any]:
    return all_gather_objects(value)
