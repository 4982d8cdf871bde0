"""Mask generators: which patches each sample keeps.

Every strategy removes the same number of patches in every sample, so a batch of visible tokens stays a
dense [N, len_keep, D] tensor. A mask is 1 for removed patches and 0 for kept ones, in patch order.

`random` follows the reference exactly: ``ids_shuffle = argsort(noise)``, the first ``int(L * (1 - r))``
are kept (small noise = keep). `block` and `grid` produce a binary mask first and turn it into the same
``ids_shuffle`` / ``ids_restore`` form, so the encoder and decoder code paths are shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mae.errors import InputError

MASK_STRATEGIES = ("random", "block", "grid")


@dataclass
class Masking:
    """The outcome of masking a batch: enough to gather visible tokens and to undo the shuffle."""

    ids_keep: torch.Tensor  # [N, len_keep] indices of kept patches, in shuffle order
    ids_restore: torch.Tensor  # [N, L] inverse permutation of ids_shuffle
    mask: torch.Tensor  # [N, L] float, 1 = removed, in original patch order


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per sample by the reference rule ``int(L * (1 - mask_ratio))``."""
    if not 0.0 <= mask_ratio < 1.0:
        raise InputError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1 - mask_ratio))


def masking_from_noise(noise: torch.Tensor, len_keep: int) -> Masking:
    """Reference random masking driven by ``noise`` [N, L]: keep the len_keep patches with the smallest noise."""
    n, length = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to patch order
    return Masking(ids_keep=ids_shuffle[:, :len_keep], ids_restore=ids_restore, mask=mask)


def masking_from_mask(mask: torch.Tensor, noise: torch.Tensor | None = None) -> Masking:
    """Turn a binary mask [N, L] (1 = removed, same count per row) into the shuffle form.

    Kept patches come first; within kept and within removed patches the order follows ``noise`` when given,
    else the patch order.
    """
    mask = mask.float()
    removed = mask.sum(1)
    if not torch.all(removed == removed[0]):
        raise InputError(f"every sample must remove the same number of patches, got counts {removed.tolist()}")
    len_keep = mask.shape[1] - int(removed[0].item())
    order = torch.argsort(noise, dim=1) if noise is not None else torch.arange(mask.shape[1], device=mask.device)
    order = order.expand_as(mask)  # patches by ascending noise (or in patch order)
    ids_shuffle = order.gather(1, torch.argsort(mask.gather(1, order), dim=1, stable=True))  # kept first
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return Masking(ids_keep=ids_shuffle[:, :len_keep], ids_restore=ids_restore, mask=mask)


def random_masking(
    n: int, grid: tuple[int, int], mask_ratio: float, device: torch.device | str = "cpu", noise: torch.Tensor | None = None
) -> Masking:
    """Per-sample uniform random masking (the MAE default)."""
    length = grid[0] * grid[1]
    if noise is None:
        noise = torch.rand(n, length, device=device)  # [N, L] in [0, 1)
    elif noise.shape != (n, length):
        raise InputError(f"noise must have shape [N, L] = [{n}, {length}], got {list(noise.shape)}")
    return masking_from_noise(noise, num_kept(length, mask_ratio))


def block_mask(
    grid: tuple[int, int],
    num_masked: int,
    generator: torch.Generator | None = None,
    min_area: int = 4,
    max_area: int | None = None,
    min_aspect: float = 0.3,
) -> torch.Tensor:
    """One BEiT-style block mask [h, w] (bool, True = removed) with exactly ``num_masked`` patches removed.

    Rectangles of random area and log-uniform aspect ratio are added until the target is reached; a
    rectangle that would overshoot is redrawn smaller, so the count is exact and every block is a rectangle.
    """
    h, w = grid
    if not 0 <= num_masked <= h * w:
        raise InputError(f"cannot remove {num_masked} of {h * w} patches")
    max_area = max_area or num_masked
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = torch.zeros(h, w, dtype=torch.bool)
    count = 0

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    def randint(hi: int) -> int:
        return int(torch.randint(hi, (), generator=generator).item())

    attempts = 0
    while count < num_masked:
        remaining = num_masked - count
        attempts += 1
        lo_area = min(min_area, remaining) if attempts < 100 else 1  # shrink blocks if stuck near the end
        area = uniform(lo_area, max(lo_area, min(max_area, remaining)))
        aspect = math.exp(uniform(*log_aspect))
        bh = max(1, min(h, int(round(math.sqrt(area * aspect)))))
        bw = max(1, min(w, int(round(math.sqrt(area / aspect)))))
        top, left = randint(h - bh + 1), randint(w - bw + 1)
        new = (~mask[top : top + bh, left : left + bw]).sum().item()
        if 0 < new <= remaining:
            mask[top : top + bh, left : left + bw] = True
            count += new
            attempts = 0
    return mask


def block_masking(
    n: int, grid: tuple[int, int], mask_ratio: float, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Masking:
    """Block-wise masking (BEiT): each sample removes ``L - int(L * (1 - r))`` patches in rectangles."""
    length = grid[0] * grid[1]
    num_masked = length - num_kept(length, mask_ratio)
    masks = torch.stack([block_mask(grid, num_masked, generator).flatten() for _ in range(n)])  # [N, L]
    return masking_from_mask(masks.to(device))


def grid_mask(grid: tuple[int, int]) -> torch.Tensor:
    """The grid pattern [h, w] (bool, True = removed): keep the top-left patch of every 2 x 2 cell."""
    h, w = grid
    rows = torch.arange(h).reshape(-1, 1)
    cols = torch.arange(w).reshape(1, -1)
    return ~((rows % 2 == 0) & (cols % 2 == 0))


def grid_masking(n: int, grid: tuple[int, int], device: torch.device | str = "cpu") -> Masking:
    """Grid-wise masking: the same regular pattern for every sample (75% removed on even grids)."""
    mask = grid_mask(grid).flatten().float().to(device)
    return masking_from_mask(mask.unsqueeze(0).expand(n, -1))
