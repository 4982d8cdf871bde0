"""The token grid: how a signal is cut into tokens, for every signal the masked autoencoder reads.

An image [N, C, H, W] cut into p x p patches is one case; a clip or a satellite time series [N, C, T, H, W] cut into
u x p x p tubelets is another, a log-mel spectrogram (one channel, a non-square grid) a third. Optional channel
groups (SatMAE's multispectral model) give every group of bands its own tokens at every place of the grid.

Token order: groups outermost, then the grid axes row-major: (g, t, h, w) -- the order of Hugging Face's
``bool_masked_pos`` for video. A patch vector lists its pixels axis by axis, channel last: (p, q, c) for an image
(the reference MAE's order), (u, p, q, c) for a tubelet (MAE-ST, VideoMAE, Prithvi).

The model, the masking strategies, the targets and the pictures read this spec and never test ``ndim`` themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.layers import PatchEmbed
from torch import nn

from mae.errors import ConfigError, InputError


@dataclass(frozen=True)
class TokenGrid:
    """A signal of ``in_chans`` channels and extent ``size`` per axis, cut into patches of extent ``patch``.

    ``frames_axis``: the input carries an explicit time axis ([N, C, T, H, W]) even when T is 1 (Prithvi); an
    image has none ([N, C, H, W]). ``channel_groups``: channel indices per group; empty = every token sees every
    channel.
    """

    size: tuple[int, ...]  # (H, W) or (T, H, W)
    patch: tuple[int, ...]  # (p, p) or (u, p, p)
    in_chans: int
    channel_groups: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if len(self.size) not in (2, 3) or len(self.patch) != len(self.size):
            raise ConfigError(f"a token grid has 2 axes (height, width) or 3 (time, height, width) with a patch "
                              f"extent per axis, got size {list(self.size)} and patch {list(self.patch)}")
        for axis, (extent, p) in enumerate(zip(self.size, self.patch, strict=True)):
            if p <= 0 or extent <= 0 or extent % p:
                what = self.axes[axis]
                raise ConfigError(f"the input's {what} extent {extent} is not divisible by the patch's {p}; "
                                  f"pick a patch (or tubelet) size that divides it")
        if self.in_chans < 1:
            raise ConfigError(f"in_chans must be at least 1, got {self.in_chans}")
        if self.channel_groups:
            flat = [c for group in self.channel_groups for c in group]
            if not all(self.channel_groups) or sorted(flat) != sorted(set(flat)) or \
                    not all(0 <= c < self.in_chans for c in flat):
                raise ConfigError(f"channel_groups {[list(g) for g in self.channel_groups]} must be non-empty groups "
                                  f"of distinct channel indices in [0, {self.in_chans})")

    # ------------------------------------------------------------ shape
    @property
    def axes(self) -> tuple[str, ...]:
        return ("height", "width") if len(self.size) == 2 else ("time", "height", "width")

    @property
    def has_time(self) -> bool:
        """The input carries a time axis: [N, C, T, H, W]."""
        return len(self.size) == 3

    @property
    def grid(self) -> tuple[int, ...]:
        """Patches per axis: (h, w) or (t, h, w)."""
        return tuple(s // p for s, p in zip(self.size, self.patch, strict=True))

    @property
    def spatial(self) -> tuple[int, int]:
        """Patches per spatial axis (h, w)."""
        return self.grid[-2], self.grid[-1]

    @property
    def num_groups(self) -> int:
        return max(1, len(self.channel_groups))

    @property
    def num_patches(self) -> int:
        """Places on the grid (t*h*w); each holds one token per channel group."""
        return math.prod(self.grid)

    @property
    def num_tokens(self) -> int:
        """Tokens of one sample: groups x places."""
        return self.num_groups * self.num_patches

    @property
    def token_shape(self) -> tuple[int, ...]:
        """The shape a mask over one sample's tokens has before flattening: (g, t, h, w) without the axes of 1
        that an image or an ungrouped signal lacks."""
        return ((self.num_groups,) if self.channel_groups else ()) + self.grid

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample: (C, H, W) or (C, T, H, W)."""
        return (self.in_chans, *self.size)

    def group_channels(self, group: int | None = None) -> int:
        if group is None or not self.channel_groups:
            return self.in_chans
        return len(self.channel_groups[group])

    def patch_dim(self, group: int | None = None) -> int:
        """Values in one patch vector (of one channel group)."""
        return math.prod(self.patch) * self.group_channels(group)

    def check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.input_shape or x.dim() != len(self.input_shape) + 1:
            names = "C, T, H, W" if self.has_time else "C, H, W"
            raise InputError(f"expected input [N, {', '.join(map(str, self.input_shape))}] ({names} of this model), "
                             f"got {list(x.shape)}")

    # ------------------------------------------------------------ patches
    def patchify(self, x: torch.Tensor, group: int | None = None) -> torch.Tensor:
        """[N, C, *size] -> [N, L, prod(patch) * C]: places row-major over the grid, each patch vector axis by axis
        with the channel last. ``group``: only that channel group's channels."""
        if group is not None and self.channel_groups:
            x = x[:, list(self.channel_groups[group])]
        n, c = x.shape[:2]
        if tuple(x.shape[2:]) != self.size:
            raise InputError(f"input {list(x.shape)} does not have the extent {list(self.size)} of this token grid")
        k = len(self.size)
        split = [d for g, p in zip(self.grid, self.patch, strict=True) for d in (g, p)]
        x = x.reshape(n, c, *split)  # [N, C, g0, p0, g1, p1, ...]
        order = [0, *range(2, 2 + 2 * k, 2), *range(3, 3 + 2 * k, 2), 1]  # N, grid axes, patch axes, C
        return x.permute(order).reshape(n, self.num_patches, math.prod(self.patch) * c)

    def unpatchify(self, x: torch.Tensor, group: int | None = None) -> torch.Tensor:
        """[N, L, prod(patch) * C] -> [N, C, *size], the inverse of `patchify`."""
        c = self.group_channels(group)
        n, length, dim = x.shape
        if length != self.num_patches or dim != math.prod(self.patch) * c:
            raise InputError(f"patches {list(x.shape)} do not fit a {'x'.join(map(str, self.grid))} grid of "
                             f"{'x'.join(map(str, self.patch))}x{c} patches")
        k = len(self.size)
        x = x.reshape(n, *self.grid, *self.patch, c)  # [N, g0, g1, ..., p0, p1, ..., C]
        order = [0, 2 * k + 1] + [a for i in range(k) for a in (1 + i, 1 + k + i)]  # N, C, g0, p0, g1, p1, ...
        return x.permute(order).reshape(n, c, *self.size)

    def expand_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A token mask [N, L] (one group) as a pixel mask [N, 1, *size]: each patch's value over its pixels."""
        x = mask.reshape(mask.shape[0], *self.grid)
        for axis, p in enumerate(self.patch):
            x = x.repeat_interleave(p, dim=1 + axis)
        return x.unsqueeze(1)


class TubeletEmbed(nn.Module):
    """Tubelets [N, C, T, H, W] -> tokens [N, t*h*w, D] with one Conv3d whose kernel and stride are the tubelet
    (``proj``, the key name of timm's 2-D ``PatchEmbed``, MAE-ST's and Prithvi's checkpoints)."""

    def __init__(self, patch: tuple[int, int, int], in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, D, t, h, w] -> [N, L, D]


class GroupedEmbed(nn.Module):
    """One patch embedding per channel group (SatMAE's multispectral model): [N, C, ...] -> [N, G*L, D], groups
    outermost. ``embeds.{g}`` embeds the channels of group g."""

    def __init__(self, grid: TokenGrid, embed_dim: int):
        super().__init__()
        self.groups = grid.channel_groups
        self.embeds = nn.ModuleList([patch_embedding(grid, embed_dim, len(g)) for g in grid.channel_groups])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([embed(x[:, list(g)]) for g, embed in zip(self.groups, self.embeds, strict=True)], dim=1)


def patch_embedding(grid: TokenGrid, embed_dim: int, in_chans: int | None = None) -> nn.Module:
    """The patch embedding of a grid: timm's ``PatchEmbed`` for 2-D patches (the reference's module and keys), a
    Conv3d for tubelets, one of either per channel group."""
    if grid.channel_groups and in_chans is None:
        return GroupedEmbed(grid, embed_dim)
    chans = grid.in_chans if in_chans is None else in_chans
    if grid.has_time:
        return TubeletEmbed(grid.patch, chans, embed_dim)  # type: ignore[arg-type]  # three extents (has_time)
    return PatchEmbed(grid.size, grid.patch, chans, embed_dim)  # type: ignore[arg-type]  # two extents here


def embedding_convs(embed: nn.Module) -> list[nn.Conv2d | nn.Conv3d]:
    """The convolutions of a patch embedding (one, or one per group), for initialisation."""
    return [m for m in embed.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
