"""Parameter groups (weight-decay exclusion, layer-wise lr decay) and the optimizers the recipes use.

Each group is a plain dict that torch optimizers accept as is: ``params``, ``param_names`` (so a run can dump
``param_groups.json``), ``weight_decay`` and ``lr_scale`` (read by `mae.train.schedule.apply_lr`).
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import torch
from timm.optim import Lars
from torch import nn

from mae.errors import ConfigError

__all__ = ["OPTIMIZERS", "build_optimizer", "default_layer_id", "param_groups"]

OPTIMIZERS = ("adamw", "sgd", "lars")

_STEM_PREFIXES = ("cls_token", "pos_embed", "patch_embed", "mask_token")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def default_layer_id(name: str, num_layers: int) -> int:
    """Layer id for lr decay: stem (tokens, position and patch embedding) 0, ``blocks.i`` i + 1, the rest L + 1."""
    if name.startswith(_STEM_PREFIXES):
        return 0
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_weight_decay_list: Collection[str] = (),
    layer_decay: float | None = None,
    num_layers: int | None = None,
    layer_id_fn: Callable[[str, int], int] | None = None,
) -> list[dict[str, Any]]:
    """Trainable parameters grouped by (layer id, decay or not).

    Biases, 1-D parameters (norms, tokens of shape [D]), the names in ``model.no_weight_decay()`` and names
    matching `no_weight_decay_list` (exact names or fnmatch patterns) get weight decay 0. With `layer_decay`,
    each group's ``lr_scale`` is ``layer_decay ** (num_layers + 1 - layer_id)``; `layer_id_fn(name, num_layers)`
    replaces `default_layer_id`. Frozen parameters are left out.
    """
    skip = set(no_weight_decay_list)
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())  # type: ignore[operator]  # Module.__getattr__ gives Tensor | Module
    if layer_decay is not None:
        if num_layers is None:
            raise ConfigError("layer_decay needs num_layers (the encoder depth); pass num_layers=len(model.blocks)")
        if not 0.0 < layer_decay <= 1.0:
            raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay}")
    layer_id_fn = layer_id_fn or default_layer_id

    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or _matches(name, skip)
        layer_id = 0
        lr_scale = 1.0
        if layer_decay is not None:
            assert num_layers is not None
            layer_id = layer_id_fn(name, num_layers)
            lr_scale = layer_decay ** (num_layers + 1 - layer_id)
        group = groups.setdefault(
            (layer_id, no_decay),
            {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": lr_scale,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def build_optimizer(
    groups: Sequence[dict[str, Any]] | Iterable[nn.Parameter],
    name: str = "adamw",
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    momentum: float = 0.9,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """An optimizer over `groups` (from `param_groups`, or plain parameters).

    ``adamw``: torch AdamW, fused kernels when every parameter is on CUDA or the CPU, foreach otherwise (`fused` forces
    either). ``sgd``: torch SGD with `momentum`. ``lars``: timm's LARS (the linear-probing optimizer), adapting
    the step of matrices only and never decaying 1-D parameters, as the MAE reference does. A group's own
    ``weight_decay`` wins over the `weight_decay` argument.
    """
    groups = [dict(g) for g in _as_groups(groups)]
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ConfigError("the optimizer got no trainable parameters; check which parameters are frozen")
    if fused is None:  # fused kernels: CUDA, and CPU from torch 2.4 (where foreach is the slowest choice)
        devices = {p.device.type for p in params}
        fused = all(p.is_floating_point() for p in params) and (
            devices == {"cuda"} or (devices == {"cpu"} and _has_cpu_fused_adamw()))
    impl: dict[str, bool] = {"fused": True} if fused else {"foreach": True}

    key = name.lower()
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, **impl)
    if key == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **impl)
    if key == "lars":
        return Lars(_split_for_lars(groups, weight_decay), lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


@functools.cache
def _has_cpu_fused_adamw() -> bool:
    """Whether this torch has the fused AdamW kernel for CPU tensors (added in torch 2.4); probed once."""
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    except RuntimeError:
        return False
    return True


def _as_groups(groups: Sequence[dict[str, Any]] | Iterable[nn.Parameter]) -> list[dict[str, Any]]:
    items = list(groups)
    if items and all(isinstance(g, dict) for g in items):
        return items  # type: ignore[return-value]  # all(isinstance(g, dict)) above
    return [{"params": items}]


def _split_for_lars(groups: list[dict[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """Split each group into matrices (LARS trust ratio on) and 1-D parameters (plain momentum SGD, no decay).

    timm's Lars adapts every parameter of a group or none (``always_adapt``); the reference LARS adapts and decays
    only parameters with ``ndim > 1``, so this puts each kind in its own group.
    """
    out: list[dict[str, Any]] = []
    for group in groups:
        names = group.get("param_names")
        for is_matrix in (True, False):
            keep = [i for i, p in enumerate(group["params"]) if (p.ndim > 1) == is_matrix]
            if not keep:
                continue
            part = dict(group)
            part["params"] = [group["params"][i] for i in keep]
            if names is not None:
                part["param_names"] = [names[i] for i in keep]
            part["always_adapt"] = is_matrix
            part["weight_decay"] = group.get("weight_decay", weight_decay) if is_matrix else 0.0
            out.append(part)
    return out
