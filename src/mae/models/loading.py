"""One way to load MAE / ViT weights into any module of the family: the masked autoencoder, a classifier built on
its encoder, or the detection / segmentation backbone. One function, one set of rules, one report, as timm's
``build_model_with_cfg`` with a per-model filter: each kind of module registers what is its own (`WeightRules`,
`register_weight_rules`, next to its class) and `load_weights` applies the rules below to it.

The state dict comes in this project's (= the reference's = timm's) key names; `mae.interop` converts other formats
(and reads files) before calling `load_weights`. The rules, whatever the target module:

* A file key the module has no place for is skipped when it belongs to another part of the family (a decoder,
  the mask token, a target's buffers, a classifier head, the final norm a mean-pooling classifier does not use);
  any other unknown key, or a shape that differs (another architecture), raises CheckpointError naming them.
* A module key the file lacks is left at its initial value when it belongs to the module's new parts (its rules'
  ``new_prefixes``: a classifier's head, a backbone's pyramid) or optional parts (``optional_prefixes``: a target's
  buffers), to the decoder of an encoder-only file, or is the final ``norm`` when the file is a fine-tuned
  classifier (which has ``fc_norm`` instead); any other missing key raises (the file is not a complete encoder of
  this architecture), unless ``strict=False``.
* A position table of another grid (another resolution) is regenerated exactly when it is a fixed sin-cos table
  and the module keeps fixed tables (its rules' ``fixed_tables``), else resized by 2-D bicubic interpolation, as
  the reference does when fine-tuning at another resolution.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mae.errors import CheckpointError, excerpt
from mae.models.pos_embed import resize_pos_embed, sincos_2d

__all__ = ["LoadReport", "WeightRules", "grid_of", "load_weights", "register_weight_rules", "weight_rules"]

_OTHER_PARTS = re.compile(r"^(decoder_|mask_token$|encoder_mask_token$|target\.|head\.|head_drop\.|fc_norm\.|"
                          r"classifier\.|pooler\.)")
"""Keys of the family that a given module may have no place for."""
_DECODER = re.compile(r"^(decoder_|mask_token$)")


@dataclass(frozen=True)
class WeightRules:
    """What a kind of module takes from a file of the family (its per-model filter)."""

    new_prefixes: tuple[str, ...] = ()
    """Key prefixes of the module's own new parts (a classifier's head, a backbone's pyramid): never taken from the
    file (a file's own head is skipped), left at their initial values."""
    optional_prefixes: tuple[str, ...] = ()
    """Module keys loaded when the file has them and left as they are otherwise (a target's fitted buffers)."""
    fixed_tables: tuple[str, ...] = ()
    """Position-table keys the module keeps as fixed sin-cos tables (regenerated for a new grid, not resized)."""


_RULES: dict[type, WeightRules] = {}


def register_weight_rules(cls: type[nn.Module], rules: WeightRules) -> None:
    """Make `rules` those of every module of class `cls` (and its subclasses): done next to the class."""
    _RULES[cls] = rules


def weight_rules(module: nn.Module) -> WeightRules:
    """The rules registered for the module's class or its nearest base class; none (every key is the file's) else."""
    return next((_RULES[cls] for cls in type(module).__mro__ if cls in _RULES), WeightRules())


@dataclass
class LoadReport:
    """What `load_weights` did."""

    source: str  # where the weights came from, for messages
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # module keys left at their initial values
    skipped: list[str] = field(default_factory=list)  # file keys not used
    resized: list[str] = field(default_factory=list)  # position tables resized or regenerated for another grid
    format: str = ""  # the file's format (mae, reference, hf, timm), when known

    def describe(self) -> str:
        """One line: what was loaded, left new, not used and resized."""
        parts = [f"loaded {len(self.loaded)} tensors from {self.source}",
                 f"new: {excerpt(_roots(self.missing)) or '-'}", f"not used: {excerpt(_roots(self.skipped)) or '-'}"]
        if self.resized:
            parts.append(f"resized to this grid: {', '.join(self.resized)}")
        return "; ".join(parts)


def _roots(keys: Sequence[str]) -> list[str]:
    """Module-level names of keys ('blocks.0.x' -> 'blocks.0'), deduplicated, in order."""
    seen: dict[str, None] = {}
    for k in keys:
        seen[".".join(k.split(".")[:2]) if k.startswith(("blocks.", "decoder_blocks.")) else k.split(".")[0]] = None
    return list(seen)


def grid_of(num_patches: int, hint: tuple[int, ...] | None = None, source: str = "the checkpoint") -> tuple[int, int]:
    """The (h, w) patch grid of a position table with `num_patches` rows: a 2-D `hint` when it fits, else a
    square (tables of clips are not resized)."""
    if hint is not None and len(hint) == 2 and hint[0] * hint[1] == num_patches:
        return hint[0], hint[1]
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise CheckpointError(f"{source}: the position table has {num_patches} patches, not a square grid, and no "
                              f"stored config gives its shape; pass the source img_size=(H, W)")
    return side, side


def _is_finetuned(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("fc_norm.") for k in sd) and not any(k.startswith("norm.") for k in sd)


def _grid_of_module(module: nn.Module, key: str) -> tuple[int, ...] | None:
    owner = getattr(module, "patch_embed", None)
    grid = getattr(owner, "grid_size", None) or getattr(module, "grid_size", None)
    return tuple(grid) if grid is not None else None


def load_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "the checkpoint",
                 source_grid: tuple[int, ...] | None = None, strict: bool = True, fmt: str = "",
                 check_only: bool = False, target: str = "the model") -> LoadReport:
    """Load what fits of `state_dict` into `module` by the rules of the module docstring and the module's own
    `weight_rules`; returns the report.

    Args:
        source: how messages name the file.
        source_grid: the file's patch grid (from its stored config), for non-square position tables.
        strict: raise (rather than load what fits) when encoder keys are missing or unknown keys are present.
        check_only: apply the rules and report, but copy nothing (e.g. into a model on the meta device).
        target: how messages name the module (e.g. its registered architecture).
    """
    rules = weight_rules(module)
    new_prefixes, optional_prefixes, fixed_tables = rules.new_prefixes, rules.optional_prefixes, rules.fixed_tables
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(new_prefixes)}
    report = LoadReport(source=source, format=fmt)
    finetuned = _is_finetuned(sd)
    unknown = [k for k in sd if k not in own and not _OTHER_PARTS.match(k) and not k.startswith("norm.")
               and not k.startswith(new_prefixes)]
    mismatched = [f"{k} is {list(sd[k].shape)} in the file but {list(v.shape)} in the model"
                  for k, v in own.items() if k in sd and not k.endswith("pos_embed") and sd[k].shape != v.shape]
    if mismatched:
        more = f" (+{len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        raise CheckpointError(f"{source} does not fit {target}: {'; '.join(mismatched[:3])}{more}; it is a checkpoint "
                              f"of another architecture: use the model settings of the run that wrote it")
    load = {k: v for k, v in sd.items() if k in own}
    report.skipped = [k for k in sd if k not in own]
    for key in [k for k in load if k.endswith("pos_embed")]:
        src, dst = load[key], own[key]
        if src.shape == dst.shape:
            continue
        if src.dim() != 3 or src.shape[-1] != dst.shape[-1]:
            raise CheckpointError(f"{source}: {key} is {list(src.shape)} in the file but {list(dst.shape)} in the "
                                  f"model (another width?)")
        prefix = 1  # the class-token slot
        old = grid_of(src.shape[1] - prefix, source_grid, source)
        new = grid_of(dst.shape[1] - prefix, _grid_of_module(module, key), source)
        if key in fixed_tables and torch.allclose(src.float(), sincos_2d(src.shape[-1], old), atol=1e-5):
            load[key] = sincos_2d(src.shape[-1], new).to(src.dtype)
        else:
            load[key] = resize_pos_embed(src, old, new)
        report.resized.append(key)
    missing = [k for k in module.state_dict() if k not in load]
    encoder_only = not any(_DECODER.match(k) for k in sd)
    expected = [k for k in missing if k.startswith((*new_prefixes, *optional_prefixes))
                or (encoder_only and _DECODER.match(k)) or (finetuned and k.startswith("norm."))]
    bad_missing = [k for k in missing if k not in expected]
    if strict and (bad_missing or unknown):
        parts = []
        if bad_missing:
            parts.append(f"missing from the file: {excerpt(bad_missing)}")
        if unknown:
            parts.append(f"not known to the model: {excerpt(unknown)}")
        raise CheckpointError(f"{source} does not fit {target}: {'; '.join(parts)}; is it a checkpoint of another "
                              f"model?")
    if bad_missing or unknown:
        warnings.warn(f"{source}: loaded what matches; not in the file: {excerpt(bad_missing) or '-'}; ignored: "
                      f"{excerpt(unknown) or '-'}", stacklevel=3)
    if not check_only:
        module.load_state_dict(load, strict=False)
    report.loaded, report.missing = sorted(load), missing
    return report
