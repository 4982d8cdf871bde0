"""Masking strategies: kept counts, the shuffle / restore pair, the binary mask, and each strategy's pattern."""

from __future__ import annotations

import pytest
import torch

from mae.errors import InputError
from mae.models import masking as M

GRIDS = [(14, 14), (3, 5), (6, 4)]
IMAGE_STRATEGIES = ("random", "block", "grid")  # the paper's (Table 1f); the others: test_token_grid.py


def _make(strategy: str, n: int, grid: tuple[int, int], ratio: float, seed: int = 0) -> M.Masking:
    torch.manual_seed(seed)
    if strategy == "random":
        return M.random_masking(n, grid, ratio)
    if strategy == "block":
        return M.block_masking(n, grid, ratio, generator=torch.Generator().manual_seed(seed), min_block=1)
    return M.grid_masking(n, grid)


def _expected_kept(strategy: str, grid: tuple[int, int], ratio: float) -> int:
    h, w = grid
    if strategy == "grid":
        return ((h + 1) // 2) * ((w + 1) // 2)  # one patch per (possibly partial) 2x2 cell
    return int(h * w * (1 - ratio))


def _adjacent_removed_pairs(mask_hw: torch.Tensor) -> int:
    """Number of 4-neighbour pairs of cells that are both removed."""
    m = mask_hw.float()
    return int((m[1:, :] * m[:-1, :]).sum() + (m[:, 1:] * m[:, :-1]).sum())


# ------------------------------------------------------------------ invariants shared by all strategies
@pytest.mark.parametrize("strategy", IMAGE_STRATEGIES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.6])
def test_kept_count_is_exact_in_every_sample(strategy, grid, ratio):
    """Every sample keeps int(L * (1 - ratio)) patches (random, block) or one per 2x2 cell (grid)."""
    m = _make(strategy, 6, grid, ratio)
    length = grid[0] * grid[1]
    k = _expected_kept(strategy, grid, ratio)
    assert m.mask.shape == (6, length)
    assert m.ids_keep.shape == (6, k)
    assert m.ids_restore.shape == (6, length)
    assert torch.equal((m.mask == 0).sum(1), torch.full((6,), k))


@pytest.mark.parametrize("strategy", IMAGE_STRATEGIES)
@pytest.mark.parametrize("grid", GRIDS)
def test_ids_restore_inverts_the_shuffle(strategy, grid):
    """ids_restore is a permutation that undoes the shuffle whose first K entries are ids_keep:
    gathering shuffle-ordered data with ids_restore gives back the original patch order."""
    n, length = 5, grid[0] * grid[1]
    m = _make(strategy, n, grid, 0.75, seed=3)
    # ids_restore must be a permutation of 0..L-1 in every row
    assert torch.equal(m.ids_restore.sort(1).values, torch.arange(length).expand(n, -1))
    ids_shuffle = torch.argsort(m.ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, : m.ids_keep.shape[1]], m.ids_keep)
    data = torch.randn(n, length, 3)
    shuffled = torch.gather(data, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, 3))
    restored = torch.gather(shuffled, 1, m.ids_restore.unsqueeze(-1).expand(-1, -1, 3))
    assert torch.equal(restored, data)


@pytest.mark.parametrize("strategy", IMAGE_STRATEGIES)
@pytest.mark.parametrize("grid", GRIDS)
def test_mask_is_one_exactly_at_removed_positions(strategy, grid):
    """mask is binary float, 0 at the positions listed in ids_keep and 1 everywhere else (patch order)."""
    n, length = 4, grid[0] * grid[1]
    m = _make(strategy, n, grid, 0.75, seed=5)
    assert m.mask.dtype.is_floating_point
    assert set(m.mask.unique().tolist()) <= {0.0, 1.0}
    expected = torch.ones(n, length)
    expected.scatter_(1, m.ids_keep, 0.0)
    assert torch.equal(m.mask, expected)
    # the kept ids are distinct
    assert all(len(set(row.tolist())) == len(row) for row in m.ids_keep)


# ------------------------------------------------------------------ random
def test_random_masking_follows_the_noise():
    """Small noise = kept: with noise increasing along the patches, exactly the first K patches are kept,
    in that order, and ids_restore is the identity."""
    length, ratio = 20, 0.75
    k = int(length * (1 - ratio))
    noise = torch.arange(length, dtype=torch.float32).div(length).expand(2, -1).contiguous()
    m = M.random_masking(2, (4, 5), ratio, noise=noise)
    assert torch.equal(m.ids_keep, torch.arange(k).expand(2, -1))
    assert torch.equal(m.ids_restore, torch.arange(length).expand(2, -1))
    assert torch.equal(m.mask[0], torch.cat([torch.zeros(k), torch.ones(length - k)]))


def test_random_masking_is_an_independent_argsort_of_the_noise():
    """For random noise, ids_keep are the K smallest-noise patches in ascending noise order, and the same
    noise always gives the same masking."""
    torch.manual_seed(0)
    noise = torch.rand(3, 49)
    m1 = M.random_masking(3, (7, 7), 0.75, noise=noise)
    m2 = M.random_masking(3, (7, 7), 0.75, noise=noise.clone())
    assert torch.equal(m1.ids_keep, m2.ids_keep) and torch.equal(m1.mask, m2.mask)
    k = int(49 * 0.25)
    for i in range(3):
        order = sorted(range(49), key=lambda j: noise[i, j].item())
        assert m1.ids_keep[i].tolist() == order[:k]
        assert sorted(m1.mask[i].nonzero().flatten().tolist()) == sorted(order[k:])


def test_random_masking_differs_between_samples():
    """Each sample of a batch gets its own random mask (per-sample noise, not one mask for the batch)."""
    torch.manual_seed(0)
    m = M.random_masking(8, (14, 14), 0.75)
    assert len({tuple(row.tolist()) for row in m.mask}) == 8


def test_random_masking_rejects_noise_of_wrong_shape():
    """A noise tensor that is not [N, L] is refused with a message giving both shapes."""
    with pytest.raises(InputError, match=r"\[2, 16\]"):
        M.random_masking(2, (4, 4), 0.75, noise=torch.rand(2, 15))


def test_ratio_zero_keeps_everything():
    """mask_ratio 0 keeps all L patches and the mask is all zeros."""
    m = M.random_masking(2, (3, 3), 0.0)
    assert m.ids_keep.shape == (2, 9) and m.mask.sum() == 0


# ------------------------------------------------------------------ num_kept
@pytest.mark.parametrize("length,ratio,expected", [(196, 0.75, 49), (196, 0.5, 98), (256, 0.75, 64), (15, 0.6, 6),
                                                   (196, 0.9, 19), (10, 0.0, 10)])
def test_num_kept_uses_the_reference_rule(length, ratio, expected):
    """num_kept = int(L * (1 - ratio)) (truncation, as the reference)."""
    assert M.num_kept(length, ratio) == expected


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_num_kept_rejects_ratios_outside_0_1(ratio):
    """A ratio that would keep no patch (>= 1) or is negative raises InputError naming the value."""
    with pytest.raises(InputError, match=str(ratio)):
        M.num_kept(196, ratio)


# ------------------------------------------------------------------ masking_from_mask
def test_masking_from_mask_rejects_unequal_counts():
    """Samples that remove different numbers of patches cannot form a dense batch: InputError with the counts."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    with pytest.raises(InputError, match=r"\[2\.0, 1\.0\]"):
        M.masking_from_mask(mask)


def test_masking_from_mask_keeps_the_given_mask_and_orders_kept_by_noise():
    """The mask passes through unchanged; kept patches come first, ordered by the noise when noise is given,
    else by patch order."""
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0]])
    m = M.masking_from_mask(mask)
    assert torch.equal(m.mask, mask)
    assert m.ids_keep.tolist() == [[1, 3, 4]]
    noise = torch.tensor([[0.5, 0.9, 0.1, 0.2, 0.4, 0.0]])
    m = M.masking_from_mask(mask, noise)
    assert m.ids_keep.tolist() == [[3, 4, 1]]
    assert torch.argsort(m.ids_restore, dim=1).tolist() == [[3, 4, 1, 5, 2, 0]]


def test_masking_from_mask_keeps_only_unmasked_patches_for_any_noise():
    """Whatever real-valued noise orders the patches, ids_keep holds exactly the patches with mask == 0."""
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0, 0.0, 1.0]])
    noise = torch.tensor([[4.6, -0.9, -6.5, 1.7, -3.3, -4.2], [1.2, 2.5, -2.2, -1.2, -1.8, 0.5]])
    m = M.masking_from_mask(mask, noise)
    for i in range(2):
        assert sorted(m.ids_keep[i].tolist()) == (mask[i] == 0).nonzero().flatten().tolist()


# ------------------------------------------------------------------ block
@pytest.mark.parametrize("grid,num_masked", [((14, 14), 98), ((14, 14), 147), ((3, 5), 9), ((7, 4), 1), ((5, 5), 25),
                                             ((4, 4), 0)])
def test_block_mask_removes_exactly_the_requested_count(grid, num_masked):
    """block_mask returns a bool [h, w] mask with exactly num_masked True cells, for many draws."""
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        m = M.block_mask(grid, num_masked, g, min_block=min(16, max(num_masked, 1)))
        assert m.shape == grid and m.dtype == torch.bool
        assert int(m.sum()) == num_masked


def test_block_mask_rejects_impossible_counts():
    """Asking to remove more patches than the grid holds (or a negative number) raises InputError."""
    with pytest.raises(InputError, match="17"):
        M.block_mask((4, 4), 17)
    with pytest.raises(InputError):
        M.block_mask((4, 4), -1)


@pytest.mark.parametrize("side", [3, 4])
def test_block_mask_single_block_is_one_rectangle(side):
    """When the first block covers the whole target (area fixed to side^2, aspect fixed to 1), the mask is one
    contiguous side x side square: its bounding box holds exactly the removed cells."""
    g = torch.Generator().manual_seed(side)
    for _ in range(5):
        m = M.block_mask((8, 8), side * side, g, min_block=side * side, max_block=side * side, min_aspect=1.0)
        rows, cols = m.nonzero(as_tuple=True)
        height = int(rows.max() - rows.min()) + 1
        width = int(cols.max() - cols.min()) + 1
        assert (height, width) == (side, side)
        assert bool(m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all())


@pytest.mark.parametrize("grid,num_masked,min_block", [((14, 14), 98, 16), ((14, 14), 147, 16), ((7, 7), 25, 16),
                                                        ((7, 7), 37, 16), ((14, 14), 98, 30)])
def test_block_masks_have_no_block_under_the_minimum(grid, num_masked, min_block):
    """Every rectangle of a block mask covers at least min_block patches (BEiT's 16 by default), the rectangles
    together remove exactly num_masked patches, and the mask is their union; 40 draws each."""
    g = torch.Generator().manual_seed(3)
    for _ in range(40):
        rects = M.block_rectangles(grid, num_masked, g, min_block=min_block)
        assert rects and all(bh * bw >= min_block for _, _, bh, bw in rects)
        union = torch.zeros(grid, dtype=torch.bool)
        for top, left, bh, bw in rects:
            assert top >= 0 and top + bh <= grid[0] and left >= 0 and left + bw <= grid[1]
            union[top:top + bh, left:left + bw] = True
        assert int(union.sum()) == num_masked


def test_block_mask_default_minimum_is_beits_16_and_refuses_fewer_patches():
    """The default minimum block is 16 patches (BEiT's scripts); removing fewer patches than one block raises an
    InputError that names the minimum and the setting to lower."""
    assert M.BEIT_MIN_BLOCK == 16
    assert M.block_mask((14, 14), 16, torch.Generator().manual_seed(0)).sum() == 16
    with pytest.raises(InputError, match=r"at least 16.*mask_min_block"):
        M.block_mask((4, 4), 12)


def test_block_mask_is_reproducible_with_a_generator():
    """The same generator seed gives the same block mask; another seed gives another one."""
    a = M.block_mask((14, 14), 98, torch.Generator().manual_seed(7))
    b = M.block_mask((14, 14), 98, torch.Generator().manual_seed(7))
    c = M.block_mask((14, 14), 98, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("ratio,factor", [(0.5, 1.4), (0.75, 1.12)])
def test_block_masks_are_spatially_clustered(ratio, factor):
    """Block masks remove patches in clumps: on 14x14 the mean number of removed-removed 4-neighbour pairs is
    clearly above that of random masks with the same count (random: ~90 at 50%, block: ~160)."""
    grid, n = (14, 14), 30
    torch.manual_seed(0)
    block = M.block_masking(n, grid, ratio, generator=torch.Generator().manual_seed(0)).mask
    rand = M.random_masking(n, grid, ratio).mask
    assert torch.equal(block.sum(1), rand.sum(1))  # same counts, so the comparison is fair
    block_adj = sum(_adjacent_removed_pairs(row.view(grid)) for row in block) / n
    rand_adj = sum(_adjacent_removed_pairs(row.view(grid)) for row in rand) / n
    assert block_adj > factor * rand_adj


def test_block_masking_differs_between_samples():
    """Each sample draws its own blocks."""
    m = M.block_masking(6, (14, 14), 0.5, generator=torch.Generator().manual_seed(1))
    assert len({tuple(row.tolist()) for row in m.mask}) == 6


# ------------------------------------------------------------------ grid
def test_grid_mask_keeps_top_left_of_each_2x2_cell():
    """The grid pattern keeps exactly the patches at (even row, even column); checked cell by cell."""
    h, w = 6, 8
    m = M.grid_mask((h, w))
    for r in range(h):
        for c in range(w):
            assert bool(m[r, c]) == (r % 2 == 1 or c % 2 == 1), (r, c)


@pytest.mark.parametrize("grid", [(14, 14), (2, 2), (4, 6)])
def test_grid_masking_removes_75_percent_on_even_grids(grid):
    """On even grids the grid strategy removes exactly 3/4 of the patches, the same pattern in every sample."""
    m = M.grid_masking(3, grid)
    length = grid[0] * grid[1]
    assert torch.equal(m.mask.sum(1), torch.full((3,), 0.75 * length))
    assert torch.equal(m.mask[0], m.mask[2])
    assert torch.equal(m.mask[0], M.grid_mask(grid).flatten().float())


def test_grid_masking_on_odd_grid_keeps_one_per_partial_cell():
    """On a 5x5 grid the kept patches are the 3x3 lattice of even coordinates: 9 kept, 16 removed."""
    m = M.grid_masking(1, (5, 5))
    kept = sorted(m.ids_keep[0].tolist())
    assert kept == [r * 5 + c for r in (0, 2, 4) for c in (0, 2, 4)]
