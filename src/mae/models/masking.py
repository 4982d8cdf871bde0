"""Mask strategies: which tokens each sample keeps, behind one registry like the targets.

Every strategy removes the same number of tokens in every sample, so a batch of visible tokens stays a dense
[N, len_keep, D] tensor. A mask is 1 for removed tokens and 0 for kept ones, in token order ((g, t, h, w), see
`mae.models.grid`).

`random` follows the reference exactly: ``ids_shuffle = argsort(noise)``, the first ``int(L * (1 - r))`` are kept
(small noise = keep); over all tokens of a clip it is MAE-ST's space-time agnostic masking, over all tokens of a
grouped signal SatMAE's independent masking. The others build a binary mask and turn it into the same
``ids_shuffle`` / ``ids_restore`` form, so the encoder and decoder code paths are shared. On a grid with leading
axes (time, channel groups) the spatial strategies draw one mask over (h, w) and share it along them:

- ``block``: BEiT's rectangles (paper Table 1f); ``grid``: keep one patch of every 2 x 2 cell (Table 1f);
- ``tube``: VideoMAE's tube masking, ``int(r * h * w)`` places removed, the same in every frame;
- ``consistent``: SatMAE's ``--spatial_mask``, ``int(h * w * (1 - r))`` places kept, the same in every group and
  frame (the count rule of ``random``);
- ``frame``: MAE-ST's frame masking, whole time steps removed, ``int(t * (1 - r))`` kept.

A new strategy is one function and a `register_mask_strategy` call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mae.errors import ConfigError, InputError, unknown_choice
from mae.models.grid import TokenGrid


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
    n: int, grid: tuple[int, ...], mask_ratio: float, device: torch.device | str = "cpu",
    noise: torch.Tensor | None = None,
) -> Masking:
    """Per-sample uniform random masking over every token of a grid of any shape (the MAE default)."""
    length = math.prod(grid)
    if noise is None:
        noise = torch.rand(n, length, device=device)  # [N, L] in [0, 1)
    elif noise.shape != (n, length):
        raise InputError(f"noise must have shape [N, L] = [{n}, {length}], got {list(noise.shape)}")
    return masking_from_noise(noise, num_kept(length, mask_ratio))


BEIT_MIN_BLOCK = 16
"""Fewest patches a block covers in BEiT's pre-training scripts (``min_mask_patches_per_block``), the default of the
block strategy (the paper's Table 1f row); blocks on grids much smaller than 14 x 14 may want a smaller one."""
RESTARTS = 50
"""Fresh draws of a whole mask before `block_rectangles` gives up (a draw can corner itself: 24 of 25 patches
removed with no rectangle of 16 that adds exactly one more)."""


def block_rectangles(
    grid: tuple[int, int],
    num_masked: int,
    generator: torch.Generator | None = None,
    min_block: int = BEIT_MIN_BLOCK,
    max_block: int | None = None,
    min_aspect: float = 0.3,
) -> list[tuple[int, int, int, int]]:
    """The rectangles ``(top, left, height, width)`` of one BEiT-style block mask that removes exactly
    ``num_masked`` patches of an h x w grid; every rectangle covers at least ``min_block`` patches.

    Each block draws an area uniform in [min_block, max(min_block, min(max_block, still to remove))] and a
    log-uniform aspect ratio in [min_aspect, 1 / min_aspect] (BEiT's sampling); a draw is kept when it removes
    between 1 and the number still to remove (blocks may overlap earlier ones, which is how the last ones land the
    count exactly). After 100 failed draws in a row the block is picked uniformly among every rectangle of at least
    ``min_block`` patches that fits the remaining count; a draw that corners itself (no such rectangle) starts over,
    so the count is always exact.
    """
    h, w = grid
    if not 0 <= num_masked <= h * w:
        raise InputError(f"cannot remove {num_masked} of {h * w} patches")
    if min_block < 1:
        raise InputError(f"min_block must be at least 1 patch, got {min_block}")
    if num_masked and (num_masked < min_block or min_block > h * w):
        raise InputError(f"block masking cannot remove {num_masked} of {h * w} patches in blocks of at least "
                         f"{min_block}; lower the minimum block (mask_min_block) or raise the mask ratio")
    for _ in range(RESTARTS):
        rects = _draw_blocks(grid, num_masked, generator, min_block, max_block or num_masked, min_aspect)
        if rects is not None:
            return rects
    raise InputError(f"block masking found no way to remove exactly {num_masked} of {h * w} patches in blocks of at "
                     f"least {min_block} after {RESTARTS} tries; lower the minimum block (mask_min_block)")


def _draw_blocks(grid: tuple[int, int], num_masked: int, generator: torch.Generator | None, min_block: int,
                 max_block: int, min_aspect: float) -> list[tuple[int, int, int, int]] | None:
    """One attempt of `block_rectangles`; None when the blocks drawn so far leave no rectangle that fits."""
    h, w = grid
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = torch.zeros(h, w, dtype=torch.bool)
    rects: list[tuple[int, int, int, int]] = []
    count, failures = 0, 0

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    def randint(hi: int) -> int:
        return int(torch.randint(hi, (), generator=generator).item())

    while count < num_masked:
        remaining = num_masked - count
        rect = None
        if failures < 100:
            area = uniform(min_block, max(min_block, min(max_block, remaining)))
            aspect = math.exp(uniform(*log_aspect))
            bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if min_block <= bh * bw and 1 <= bh <= h and 1 <= bw <= w:
                top, left = randint(h - bh + 1), randint(w - bw + 1)
                new = int((~mask[top:top + bh, left:left + bw]).sum())
                if 0 < new <= remaining:
                    rect = (top, left, bh, bw)
            failures = 0 if rect is not None else failures + 1
        else:
            rect = _any_fitting_rectangle(mask, remaining, min_block, generator)
            failures = 0
            if rect is None:
                return None
        if rect is not None:
            top, left, bh, bw = rect
            count += int((~mask[top:top + bh, left:left + bw]).sum())
            mask[top:top + bh, left:left + bw] = True
            rects.append(rect)
    return rects


def _any_fitting_rectangle(mask: torch.Tensor, remaining: int, min_block: int,
                           generator: torch.Generator | None) -> tuple[int, int, int, int] | None:
    """A rectangle of at least ``min_block`` cells holding between 1 and ``remaining`` unmasked cells, uniform over
    all such rectangles (counted with an integral image), or None when there is none."""
    h, w = mask.shape
    free = torch.zeros(h + 1, w + 1, dtype=torch.long)
    free[1:, 1:] = (~mask).long().cumsum(0).cumsum(1)  # free[i, j] = unmasked cells in [0, i) x [0, j)
    candidates = []
    for bh in range(1, h + 1):
        for bw in range(max(1, -(-min_block // bh)), w + 1):
            new = free[bh:, bw:] - free[:-bh, bw:] - free[bh:, :-bw] + free[:-bh, :-bw]  # [h-bh+1, w-bw+1]
            tops, lefts = ((new > 0) & (new <= remaining)).nonzero(as_tuple=True)
            candidates += [(int(t), int(left), bh, bw) for t, left in zip(tops, lefts, strict=True)]
    if not candidates:
        return None
    return candidates[int(torch.randint(len(candidates), (), generator=generator).item())]


def block_mask(
    grid: tuple[int, int],
    num_masked: int,
    generator: torch.Generator | None = None,
    min_block: int = BEIT_MIN_BLOCK,
    max_block: int | None = None,
    min_aspect: float = 0.3,
) -> torch.Tensor:
    """One BEiT-style block mask [h, w] (bool, True = removed) with exactly ``num_masked`` patches removed, built from
    rectangles of at least ``min_block`` patches each (see `block_rectangles`)."""
    mask = torch.zeros(grid, dtype=torch.bool)
    for top, left, bh, bw in block_rectangles(grid, num_masked, generator, min_block, max_block, min_aspect):
        mask[top:top + bh, left:left + bw] = True
    return mask


def block_masking(
    n: int, grid: tuple[int, int], mask_ratio: float, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None, min_block: int = BEIT_MIN_BLOCK,
) -> Masking:
    """Block-wise masking (BEiT): each sample removes ``L - int(L * (1 - r))`` patches in rectangles of at least
    ``min_block`` patches."""
    length = grid[0] * grid[1]
    num_masked = length - num_kept(length, mask_ratio)
    masks = torch.stack([block_mask(grid, num_masked, generator, min_block).flatten() for _ in range(n)])  # [N, L]
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


def _tiled(n: int, grid: TokenGrid, spatial_masks: torch.Tensor, device: torch.device | str) -> Masking:
    """Masking from one spatial mask per sample [N, h*w] (1 = removed), shared along the leading axes."""
    leading = grid.num_tokens // spatial_masks.shape[1]
    return masking_from_mask(spatial_masks.float().repeat(1, leading).to(device))


def _first_slice_noise(noise: torch.Tensor | None, n: int, grid: TokenGrid, count: int, stride: int,
                       generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """Noise [N, count] that ranks places (or frames): every `stride`-th entry of the token noise when given (the
    first frame's places, or each frame's first place), else fresh uniform noise."""
    if noise is None:
        return torch.rand(n, count, generator=generator).to(device)
    if noise.shape != (n, grid.num_tokens):
        raise InputError(f"noise must have shape [N, L] = [{n}, {grid.num_tokens}], got {list(noise.shape)}")
    return noise[:, : count * stride : stride]


def _mask_by_rank(noise: torch.Tensor, num_removed: int) -> torch.Tensor:
    """[N, M] binary masks removing the `num_removed` entries of highest noise in each row."""
    ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return (ranks >= noise.shape[1] - num_removed).float()


def _random(grid: TokenGrid, n: int, ratio: float, device: torch.device | str, noise: torch.Tensor | None = None,
            generator: torch.Generator | None = None, **options: object) -> Masking:
    return random_masking(n, (grid.num_tokens,), ratio, device, noise)


def _block(grid: TokenGrid, n: int, ratio: float, device: torch.device | str, noise: torch.Tensor | None = None,
           generator: torch.Generator | None = None, min_block: int = BEIT_MIN_BLOCK, **options: object) -> Masking:
    places = math.prod(grid.spatial)
    num_masked = places - num_kept(places, ratio)
    masks = torch.stack([block_mask(grid.spatial, num_masked, generator, min_block).flatten() for _ in range(n)])
    return _tiled(n, grid, masks, device)


def _grid(grid: TokenGrid, n: int, ratio: float, device: torch.device | str, noise: torch.Tensor | None = None,
          generator: torch.Generator | None = None, **options: object) -> Masking:
    return _tiled(n, grid, grid_mask(grid.spatial).flatten().unsqueeze(0).expand(n, -1), device)


def _tube(grid: TokenGrid, n: int, ratio: float, device: torch.device | str, noise: torch.Tensor | None = None,
          generator: torch.Generator | None = None, **options: object) -> Masking:
    places = math.prod(grid.spatial)
    ranked = _first_slice_noise(noise, n, grid, places, 1, generator, device)
    return _tiled(n, grid, _mask_by_rank(ranked, int(ratio * places)), device)


def _consistent(grid: TokenGrid, n: int, ratio: float, device: torch.device | str, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, **options: object) -> Masking:
    places = math.prod(grid.spatial)
    ranked = _first_slice_noise(noise, n, grid, places, 1, generator, device)
    return _tiled(n, grid, _mask_by_rank(ranked, places - num_kept(places, ratio)), device)


def _frame(grid: TokenGrid, n: int, ratio: float, device: torch.device | str, noise: torch.Tensor | None = None,
           generator: torch.Generator | None = None, **options: object) -> Masking:
    if not grid.has_time:
        raise ConfigError("frame masking removes whole time steps: it needs a grid with a time axis")
    frames, places = grid.grid[0], math.prod(grid.spatial)
    ranked = _first_slice_noise(noise, n, grid, frames, places, generator, device)
    removed = _mask_by_rank(ranked, frames - num_kept(frames, ratio))  # [N, t]
    per_token = removed.repeat_interleave(places, dim=1).repeat(1, grid.num_groups)  # [N, g*t*h*w]
    return masking_from_mask(per_token.to(device))


MaskStrategy = Callable[..., Masking]
"""``strategy(grid, n, mask_ratio, device, noise=None, generator=None, **options) -> Masking``."""

_STRATEGIES: dict[str, MaskStrategy] = {
    "random": _random, "block": _block, "grid": _grid, "tube": _tube, "consistent": _consistent, "frame": _frame,
}
MASK_STRATEGIES = tuple(_STRATEGIES)  # the built-in names, in the order of the docs


def register_mask_strategy(name: str, strategy: MaskStrategy) -> None:
    """Make ``mask_strategy=name`` available to every model."""
    _STRATEGIES[name] = strategy


def mask_strategy_names() -> list[str]:
    return list(_STRATEGIES)


def mask_strategy(name: str) -> MaskStrategy:
    if name not in _STRATEGIES:
        raise unknown_choice("mask_strategy", name, _STRATEGIES)
    return _STRATEGIES[name]


def make_masking(name: str, grid: TokenGrid, n: int, mask_ratio: float, device: torch.device | str = "cpu",
                 noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 **options: object) -> Masking:
    """The masking of a batch of `n` samples by a registered strategy."""
    if not 0.0 <= mask_ratio < 1.0:
        raise InputError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return mask_strategy(name)(grid, n, mask_ratio, device, noise=noise, generator=generator, **options)
