"""Fixed 2-D sine-cosine position tables, as in the MAE reference, for any h x w patch grid.

The first half of the channels encodes the column (width) coordinate and the second half the row (height)
coordinate: the reference builds its grid with ``meshgrid(w, h)`` and encodes ``grid[0]`` first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
