"""Position tables for a token grid, behind one registry like the targets and the mask strategies.

``sincos`` on a 2-D grid is the MAE reference's fixed table: the first half of the channels encodes the column
(width) coordinate and the second half the row (height) coordinate (the reference builds its grid with
``meshgrid(w, h)`` and encodes ``grid[0]`` first). On a 3-D grid it splits the channels across the axes as Prithvi
does: width 6/16, height 6/16, time 4/16, concatenated in that order. ``sincos_1d`` is VideoMAE's one table over all
tokens (sin and cos interleaved), ``separable`` MAE-ST's learned spatial table tiled over time plus a learned
temporal table repeated over space, ``learned`` one learned table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mae.errors import ConfigError, unknown_choice
from mae.models.grid import TokenGrid


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos table [len(positions), dim] for 1-D positions: sin of all frequencies, then cos."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    out = positions.double().reshape(-1, 1) * omega.reshape(1, -1)  # [M, dim/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [M, dim]


def sincos_2d(dim: int, grid_size: int | tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed table [1, (1 if cls_token) + h*w, dim] in float32; the class-token row is all zeros.

    Rows follow the patch order of ``patchify`` (row-major over an h x w grid).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {dim}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows = torch.arange(h).repeat_interleave(w)  # [h*w]: row index of each patch
    cols = torch.arange(w).repeat(h)  # [h*w]: column index of each patch
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # [h*w, dim]
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float().unsqueeze(0)


def sincos_3d(dim: int, grid: tuple[int, int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed table [1, (1 if cls_token) + t*h*w, dim] in float32 for a (t, h, w) grid, rows in (t, h, w) order: the
    channels split width 6/16, height 6/16, time 4/16, each part a `sincos_1d` table (Prithvi's layout)."""
    if dim % 16:
        raise ConfigError(f"3-D sin-cos positions need a width divisible by 16, got {dim}")
    t, h, w = grid
    times, rows, cols = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    part = dim // 16
    table = torch.cat([sincos_1d(6 * part, cols.flatten()), sincos_1d(6 * part, rows.flatten()),
                       sincos_1d(4 * part, times.flatten())], dim=1)  # [t*h*w, dim]
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float().unsqueeze(0)


def sinusoid_table(dim: int, length: int, cls_token: bool = False) -> torch.Tensor:
    """The Transformer's 1-D table [1, (1 if cls_token) + length, dim] (VideoMAE's, over all tokens): channel j of
    position i is ``i / 10000**(2 * (j // 2) / dim)``, sine on even channels and cosine on odd ones."""
    exponent = 2 * (torch.arange(dim) // 2).double() / dim
    angles = torch.arange(length).double().reshape(-1, 1) / torch.pow(10000.0, exponent).reshape(1, -1)
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angles), torch.cos(angles))  # [length, dim]
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float().unsqueeze(0)


@dataclass(frozen=True)
class PositionTable:
    """How one kind of position table is made.

    ``shapes(grid, dim, cls)`` names the model's parameters (suffixes of ``pos_embed`` / ``decoder_pos_embed``)
    and their shapes; ``fixed(grid, dim, cls)`` gives their values when the table is not learned (learned ones start
    truncated-normal, std 0.02); ``combine(params, grid, cls)`` makes the table [1, prefix + tokens, dim], rows in
    token order (the class token's row first).
    """

    learned: bool
    shapes: Callable[[TokenGrid, int, bool], dict[str, tuple[int, ...]]]
    combine: Callable[[dict[str, torch.Tensor], TokenGrid, bool], torch.Tensor]
    fixed: Callable[[TokenGrid, int, bool], dict[str, torch.Tensor]] | None = None


def _whole(grid: TokenGrid, dim: int, cls: bool) -> dict[str, tuple[int, ...]]:
    return {"": (1, int(cls) + grid.num_tokens, dim)}


def _as_is(params: dict[str, torch.Tensor], grid: TokenGrid, cls: bool) -> torch.Tensor:
    return params[""]


def _sincos(grid: TokenGrid, dim: int, cls: bool) -> dict[str, torch.Tensor]:
    if grid.has_time:
        table = sincos_3d(dim, grid.grid, cls_token=False)  # type: ignore[arg-type]  # three axes (has_time)
    else:
        if dim % 4:
            raise ConfigError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
        table = sincos_2d(dim, grid.spatial, cls_token=False)
    table = table.repeat(1, grid.num_groups, 1)  # every channel group at a place shares its position
    return {"": torch.cat([torch.zeros(1, 1, dim), table], dim=1) if cls else table}


def _separable_shapes(grid: TokenGrid, dim: int, cls: bool) -> dict[str, tuple[int, ...]]:
    if not grid.has_time or grid.channel_groups:
        raise ConfigError("separable positions (learned space + time, MAE-ST) need a grid with a time axis and no "
                          "channel groups; use sincos for images")
    h, w = grid.spatial
    shapes: dict[str, tuple[int, ...]] = {"_spatial": (1, h * w, dim), "_temporal": (1, grid.grid[0], dim)}
    return {**shapes, "_class": (1, 1, dim)} if cls else shapes


def _separable(params: dict[str, torch.Tensor], grid: TokenGrid, cls: bool) -> torch.Tensor:
    spatial, temporal = params["_spatial"], params["_temporal"]  # [1, h*w, D], [1, t, D]
    table = spatial.repeat(1, temporal.shape[1], 1) + temporal.repeat_interleave(spatial.shape[1], dim=1)
    return torch.cat([params["_class"], table], dim=1) if cls else table  # [1, prefix + t*h*w, D]


POSITION_TABLES: dict[str, PositionTable] = {
    "sincos": PositionTable(learned=False, shapes=_whole, combine=_as_is, fixed=_sincos),
    "sincos_1d": PositionTable(learned=False, shapes=_whole, combine=_as_is,
                               fixed=lambda grid, dim, cls: {"": sinusoid_table(dim, grid.num_tokens, cls)}),
    "separable": PositionTable(learned=True, shapes=_separable_shapes, combine=_separable),
    "learned": PositionTable(learned=True, shapes=_whole, combine=_as_is),
}


def register_position_table(name: str, kind: PositionTable) -> None:
    """Make ``pos_embed_type=name`` available to every model."""
    POSITION_TABLES[name] = kind


def position_table(name: str) -> PositionTable:
    if name not in POSITION_TABLES:
        raise unknown_choice("pos_embed_type", name, POSITION_TABLES)
    return POSITION_TABLES[name]


def resize_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Bicubic 2-D interpolation of a [1, prefix + h*w, D] table to a new grid, prefix rows copied.

    This is how a model pre-trained at one resolution is fine-tuned or evaluated at another.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    if grid.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"position table has {grid.shape[1]} grid rows, expected {old_grid[0]}x{old_grid[1]}")
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # [1, D, h, w]
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
