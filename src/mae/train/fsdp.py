"""Model-scale training: the strategies of the ``distributed`` section of every training config
(`mae.train.distributed.DistributedSection`), fully sharded data parallelism (FSDP2,
``torch.distributed.fsdp.fully_shard``) or DDP, applied by `mae.train.trainer.build_engine` (`distribute`,
`replicate`).

    distributed.strategy=ddp    every process holds the whole model, optimizer state and gradients (DDP)
    distributed.strategy=fsdp   each of W processes holds 1/W of them; a Transformer block's full weights exist
                                only while that block runs (gathered before, freed after)

Under fsdp every Transformer block (``timm.models.vision_transformer.Block``: the MAE's encoder and decoder blocks,
a classifier's blocks, a transfer backbone's blocks) is one FSDP unit and the rest of the model (patch embedding,
tokens, position tables, norms, heads) the root unit. Activation checkpointing (``grad_checkpointing=true``)
recomputes each block inside its unit. One process with fsdp shards over a 1-rank mesh (same code, nothing saved:
useful to test a config or resume a sharded checkpoint on one machine).

Initial weights (``distributed.init``):

- ``full``: every rank builds the whole model on its device exactly as a DDP run does, rank 0's weights are
  broadcast (as DDP's wrap does), then each rank keeps its shard. The run starts from the same weights as a DDP or
  one-process run of the same seed. Needs the whole model in memory once per rank.
- ``sharded``: the model is built on the meta device (no memory), sharded, then materialised shard by shard
  (``to_empty``) and initialised in place by the model's own ``init_weights`` (sin-cos tables, xavier-uniform,
  tokens N(0, 0.02), ...): no rank ever holds more than its shard. Same distributions as ``full``, other values
  (each rank draws its shard from its own generator on CPU; on CUDA from DTensor's shared generator).
- ``auto``: ``full`` up to `FULL_INIT_MAX_PARAMS` parameters, ``sharded`` above (a fixed size, not the machine's
  memory, so the same config starts from the same weights everywhere).

Checkpoints of fsdp runs are `torch.distributed.checkpoint` directories written by every rank (`mae.train.dcp`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mae.errors import ConfigError
from mae.train.distributed import STRATEGIES, DistributedSection
from mae.train.run import Run

__all__ = ["FULL_INIT_MAX_PARAMS", "DistributedSection", "apply_fsdp", "build_for_strategy", "checkpoint_backend",
           "distribute", "full_state_dict", "is_sharded", "replicate", "transformer_blocks"]

_log = logging.getLogger(__name__)

FULL_INIT_MAX_PARAMS = 1_000_000_000
"""``distributed.init=auto`` builds models up to this many parameters in full (the DDP run's weights) and larger ones
on the meta device, shard by shard."""


def is_sharded(run: Run) -> bool:
    """True when the run trains with FSDP (and writes DCP checkpoints)."""
    section = getattr(run.cfg, "distributed", None)
    return section is not None and section.strategy == "fsdp"


def checkpoint_backend(run: Run) -> str:
    """The checkpoint store the run writes (`mae.train.distributed.STRATEGIES`): DCP directories under fsdp."""
    section = getattr(run.cfg, "distributed", None)
    return STRATEGIES[section.strategy if section is not None else "ddp"]


def distribute(run: Run, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spread `model` over the run's processes before its optimizer is built: fsdp shards it in place and returns
    `groups` over the shards (`apply_fsdp`); ddp keeps it whole (`replicate` wraps what the engine trains)."""
    return apply_fsdp(run, model, groups) if is_sharded(run) else groups


def replicate(run: Run, module: nn.Module) -> nn.Module:
    """What the engine trains: `module` in DistributedDataParallel under ddp with several processes; as it is in one
    process or under fsdp (already sharded by `distribute`)."""
    if run.dist.world_size > 1 and not is_sharded(run):
        return DistributedDataParallel(module, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return module


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks of a model (timm's ``Block``, which the MAE, the classifiers and the transfer backbone
    all use), outermost first: the FSDP units."""
    from timm.models.vision_transformer import Block

    return [m for m in model.modules() if isinstance(m, Block)]


# ---------------------------------------------------------------------------------------------------- building
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def build_for_strategy(run: Run, build: Callable[[], ModuleT]) -> ModuleT:
    """The recipe's model, ready for `build_engine`: ``build()`` on the run's device, or on the meta device when
    fsdp initialises it shard by shard (``distributed.init``; `apply_fsdp` then materialises it)."""
    if is_sharded(run) and _init_of(run, build) == "sharded":
        with torch.device("meta"):
            return build()
    return build().to(run.device)


def _init_of(run: Run, build: Callable[[], nn.Module]) -> str:
    init = run.cfg.distributed.init
    if init != "auto":
        return init
    with torch.device("meta"):
        count = sum(p.numel() for p in build().parameters())
    chosen = "full" if count <= FULL_INIT_MAX_PARAMS else "sharded"
    if run.dist.is_main:
        _log.info("distributed.init=auto: %s initialisation (%.1f M parameters; sharded above %.0f M)", chosen,
                  count / 1e6, FULL_INIT_MAX_PARAMS / 1e6)
    return chosen


def _ensure_process_group(run: Run) -> None:
    """FSDP needs a process group, also in a one-process run (a 1-rank group that needs no rendezvous)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if run.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def apply_fsdp(run: Run, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shard `model` in place (blocks, then the root), materialise it if it was built on the meta device, and return
    `groups` (from `mae.train.optim.param_groups`) over the sharded parameters, for the optimizer.

    `model` is the module whose weights the run saves (a wrapper such as `PartiallyFrozen` around it needs nothing).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    section = run.cfg.distributed
    device = run.device
    if section.cpu_offload and device.type != "cuda":
        raise ConfigError(f"distributed.cpu_offload=true moves shards from the GPU to host memory; this run is on "
                          f"{device.type}, where they already are: set distributed.cpu_offload=false")
    if section.mixed_precision and run.precision != "bf16":
        raise ConfigError(f"distributed.mixed_precision=true computes in bf16, but the run's precision is "
                          f"{run.precision}; set precision=bf16 (or turn distributed.mixed_precision off)")
    _ensure_process_group(run)
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta and device.type == "cpu":
        # DTensor has no shared RNG on CPU (it says so in a warning): each rank draws its own shard, as documented
        warnings.filterwarnings("ignore", message=".*random operators may not have complete support on cpu")
    if not on_meta and dist.get_world_size() > 1:
        with torch.no_grad():  # the DDP run's weights: rank 0's, as DistributedDataParallel's wrap broadcasts them
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)
    # The MAE returns its prediction as a view of the decoder's output; nothing in this library changes it in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in groups]
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": section.reshard_after_forward}
    if section.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError(f"distributed.strategy=fsdp shards Transformer blocks, and {type(model).__name__} has none; "
                          f"use distributed.strategy=ddp")
    for block in blocks:
        if section.mixed_precision:
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard(block, **options)
    if section.mixed_precision:  # the root's inputs keep their dtype: the masking noise is sorted, bf16 would tie
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                    cast_forward_inputs=False)
    fully_shard(model, **options)
    if on_meta:
        if not hasattr(model, "init_weights"):
            raise ConfigError(f"{type(model).__name__} cannot be built on the meta device (it has no init_weights); "
                              f"use distributed.init=full")
        model.to_empty(device="cpu" if section.cpu_offload else device)
        with torch.no_grad():
            model.init_weights()  # type: ignore[operator]  # Module.__getattr__ gives Tensor | Module
    params = dict(model.named_parameters())
    if run.dist.is_main:
        local = sum(p.to_local().numel() for p in params.values())  # type: ignore[attr-defined]  # fully_shard made every parameter a DTensor
        _log.info("fsdp: %d blocks + root sharded over %d process(es) (%s init%s); %.3g M of %.3g M parameters on "
                  "this rank", len(blocks), dist.get_world_size(), "sharded" if on_meta else "full",
                  ", bf16 compute" if section.mixed_precision else "", local / 1e6,
                  sum(p.numel() for p in params.values()) / 1e6)
    return [{**g, "params": [params[n] for n in ns]} for g, ns in zip(groups, group_names, strict=True)]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0's CPU (None on the other ranks); a collective under fsdp (every rank calls
    it). A module that is not sharded gives its own state dict."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    main = not dist.is_initialized() or dist.get_rank() == 0
    if not isinstance(model, FSDPModule):
        return model.state_dict() if main else None
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if main else None  # type: ignore[return-value]  # a full state dict holds tensors only
