"""What the decoder predicts for each removed patch (paper Table 1d), behind one pluggable interface.

A target maps images [N, C, H, W] (or clips [N, C, T, H, W]: the pixel and PCA targets cut any token grid,
`mae.models.grid`) to per-patch targets [N, L, dim] and scores predictions on removed patches only. Built in:
``pixel``, ``norm_pixel`` (per-patch mean / unbiased variance + 1e-6, the reference's ``norm_pix_loss``),
``videomae_pixel`` / ``videomae_norm_pixel`` (VideoMAE's: ImageNet-un-normalised, per tubelet and channel),
``maest_pixel`` / ``maest_norm_pixel`` (MAE-ST's: one sampled frame per tubelet, normalised per patch), ``pca``
(coefficients on the top-k principal components of training patches, fitted from data and stored in the
checkpoint) and ``hog`` (histograms of oriented gradients, as in MaskFeat). Tokenizer targets (BEiT's dVAE) plug
in through `TokenTarget` with a tokenizer the user supplies, or any other target through `register_target`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mae.errors import ConfigError, InputError, unknown_choice
from mae.models.grid import TokenGrid
from mae.models.patches import patchify


def _patches(imgs: torch.Tensor, patch_size: int, grid: TokenGrid | None) -> torch.Tensor:
    """[N, L, patch_dim] patch vectors: the token grid's patches (groups outermost) when given, else 2-D ones."""
    if grid is None:
        return patchify(imgs, patch_size)
    if grid.channel_groups:
        return torch.cat([grid.patchify(imgs, g) for g in range(grid.num_groups)], dim=1)
    return grid.patchify(imgs)


class Target(nn.Module, abc.ABC):
    """Base class: per-patch targets and a loss averaged over removed patches."""

    dim: int  # width of one patch's target; the decoder's prediction head has this many outputs

    @abc.abstractmethod
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] -> per-patch targets [N, L, dim] (or token ids [N, L])."""

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over removed patches (mask == 1) only."""
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [N, L]
        return (per_patch * mask).sum() / mask.sum()


class PixelTarget(Target):
    """Raw pixels of each patch, optionally normalised by the patch's own mean and unbiased variance."""

    def __init__(self, patch_size: int, in_chans: int, normalize: bool = False, eps: float = 1e-6,
                 grid: TokenGrid | None = None):
        super().__init__()
        self.patch_size, self.normalize, self.eps, self.grid = patch_size, normalize, eps, grid
        self.dim = grid.patch_dim(0 if grid.channel_groups else None) if grid else patch_size * patch_size * in_chans

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        target = _patches(imgs, self.patch_size, self.grid)  # [N, L, p*p*C]
        if self.normalize:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the reference
            target = (target - mean) / (var + self.eps) ** 0.5
        return target


IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
"""The ImageNet statistics VideoMAE's target undoes (the input's normalisation; `mae.data.transforms` has the same
numbers, and models may not import data)."""


class VideoMAEPixelTarget(Target):
    """VideoMAE's target (its ``engine_for_pretraining`` and Hugging Face's ``VideoMAEForPreTraining``): the input
    un-normalised to [0, 1] with the ImageNet mean / std (RGB inputs only), patch vectors in the grid's (u, p, q, c)
    order and, with ``normalize``, each tubelet normalised per channel over its u*p*q pixels by the mean and the
    unbiased std + ``eps`` (std + eps, not the square root of var + eps as in ``norm_pixel``)."""

    def __init__(self, grid: TokenGrid | None, normalize: bool, eps: float = 1e-6):
        super().__init__()
        if grid is None or grid.channel_groups:
            raise ConfigError("the videomae targets need the model's token grid without channel groups; use pixel or "
                              "norm_pixel for grouped channels")
        if not normalize and grid.in_chans != 3:
            raise ConfigError(f"the videomae_pixel target un-normalises ImageNet RGB; with in_chans={grid.in_chans} "
                              f"use videomae_norm_pixel or pixel")
        self.grid, self.normalize, self.eps = grid, normalize, eps
        self.dim = grid.patch_dim()

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs
        if self.grid.in_chans == 3:  # as the references: only RGB input is un-normalised
            shape = (1, 3) + (1,) * (x.dim() - 2)
            mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=x.device, dtype=x.dtype).view(shape)
            std = torch.tensor(IMAGENET_DEFAULT_STD, device=x.device, dtype=x.dtype).view(shape)
            x = x * std + mean  # [N, C, (T,) H, W] in [0, 1]
        target = self.grid.patchify(x)  # [N, L, u*p*p*C], channel last
        if not self.normalize:
            return target
        n, length, dim = target.shape
        per_channel = target.reshape(n, length, dim // self.grid.in_chans, self.grid.in_chans)  # [N, L, u*p*p, C]
        mean = per_channel.mean(dim=-2, keepdim=True)
        std = per_channel.var(dim=-2, unbiased=True, keepdim=True).sqrt()
        return ((per_channel - mean) / (std + self.eps)).reshape(n, length, dim)


def maest_target_frames(num_frames: int, time_tokens: int) -> torch.Tensor:
    """The frames MAE-ST predicts, one per time step of the token grid: ``linspace(0, T-1, t)`` rounded down
    ([0, 2, 4, 6, 8, 10, 12, 15] for 16 frames in tubelets of 2: the last is the second frame of its tubelet)."""
    return torch.linspace(0, num_frames - 1, time_tokens, dtype=torch.float32).long()


class MAESTPixelTarget(Target):
    """MAE-ST's target (Feichtenhofer et al., 2022): of each tubelet only one frame, picked by
    `maest_target_frames`, so a token's target is that frame's p x q patch, (u=1, p, q, c) with the channel last, and
    the decoder predicts p*q*C values, not the whole tubelet. With ``normalize``, each patch vector is normalised by
    its own mean and unbiased variance, (var + eps) ** 0.5, on the input as it comes (already normalised)."""

    def __init__(self, grid: TokenGrid | None, normalize: bool, eps: float = 1e-6):
        super().__init__()
        if grid is None or not grid.has_time or grid.channel_groups:
            raise ConfigError("the maest targets need a clip's token grid (num_frames > 0) without channel groups; use "
                              "pixel or norm_pixel for images and grouped channels")
        self.grid, self.normalize, self.eps = grid, normalize, eps
        # one frame per token: t frames of H x W cut into 1 x p x q patches, in the model's token order
        self.frame_grid = TokenGrid((grid.grid[0], *grid.size[1:]), (1, *grid.patch[1:]), grid.in_chans)
        self.dim = self.frame_grid.patch_dim()  # p*q*C

    def frames(self) -> torch.Tensor:
        """The input frames the targets are cut from, one per time step of the grid."""
        return maest_target_frames(self.grid.size[0], self.grid.grid[0])

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs[:, :, self.frames().to(imgs.device)]  # [N, C, t, H, W]
        target = self.frame_grid.patchify(x)  # [N, t*h*w, p*q*C], tokens in the model's (t, h, w) order
        if self.normalize:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the image reference
            target = (target - mean) / (var + self.eps) ** 0.5
        return target


class PCATarget(Target):
    """Coefficients of each (centred) patch on the top-k principal components of training patches.

    The basis lives in buffers, so it travels with the checkpoint. Fit it once with `fit` before training.
    """

    def __init__(self, patch_size: int, in_chans: int, num_components: int = 96, grid: TokenGrid | None = None):
        super().__init__()
        patch_dim = grid.patch_dim(0 if grid.channel_groups else None) if grid else patch_size * patch_size * in_chans
        if not 0 < num_components <= patch_dim:
            raise ConfigError(f"pca_components must be in [1, {patch_dim}] for {patch_size}x{patch_size}x{in_chans}"
                              f" patches, got {num_components}")
        self.patch_size, self.dim, self.grid = patch_size, num_components, grid
        self.mean: torch.Tensor  # buffers, declared for the type checker
        self.components: torch.Tensor
        self.fitted: torch.Tensor
        self.register_buffer("mean", torch.zeros(patch_dim))
        self.register_buffer("components", torch.zeros(num_components, patch_dim))  # rows: principal axes
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> torch.Tensor:
        """Fit the basis from image batches [N, C, H, W]; returns the explained-variance ratio of the k axes."""
        total, s1, s2 = 0, None, None
        for imgs in batches:
            patches = _patches(imgs.float(), self.patch_size, self.grid).reshape(-1, self.mean.numel()).double()
            s1 = patches.sum(0) if s1 is None else s1 + patches.sum(0)
            s2 = patches.T @ patches if s2 is None else s2 + patches.T @ patches
            total += patches.shape[0]
        if total < 2:
            raise InputError("PCA target needs at least two patches to fit")
        mean: torch.Tensor = s1 / total  # type: ignore[operator, assignment]  # s1, s2 are set: total >= 2 here
        cov = (s2 - total * torch.outer(mean, mean)) / (total - 1)  # type: ignore[operator]  # as above
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(eigvals, descending=True)[: self.dim]
        self.mean.copy_(mean.float())
        self.components.copy_(eigvecs[:, order].T.float())
        self.fitted.fill_(True)
        return eigvals[order].sum() / eigvals.clamp_min(0).sum()

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            raise InputError("the PCA target has no basis yet: call model.target.fit(batches) before training")
        patches = _patches(imgs, self.patch_size, self.grid).float()  # [N, L, P]
        return (patches - self.mean) @ self.components.T  # [N, L, k]


class HOGTarget(Target):
    """Histograms of oriented gradients per patch (MaskFeat): per channel, unsigned orientation bins over
    cells, magnitude-weighted, L2-normalised per patch and channel."""

    def __init__(self, patch_size: int, in_chans: int, bins: int = 9, cell_size: int | None = None,
                 grid: TokenGrid | None = None):
        super().__init__()
        if grid is not None and (grid.has_time or grid.channel_groups):
            raise ConfigError("the hog target is defined on 2-D images; use pixel, norm_pixel or pca for clips and "
                              "grouped channels")
        cell = cell_size or max(1, patch_size // 2)
        if patch_size % cell:
            raise ConfigError(f"hog cell_size {cell} must divide the patch size {patch_size}")
        self.patch_size, self.in_chans, self.bins, self.cell = patch_size, in_chans, bins, cell
        self.cells_per_patch = patch_size // cell
        self.dim = in_chans * bins * self.cells_per_patch**2
        kernel = torch.tensor([-1.0, 0.0, 1.0])
        self.kx: torch.Tensor  # buffers, declared for the type checker
        self.ky: torch.Tensor
        self.register_buffer("kx", kernel.reshape(1, 1, 1, 3).repeat(in_chans, 1, 1, 1), persistent=False)
        self.register_buffer("ky", kernel.reshape(1, 1, 3, 1).repeat(in_chans, 1, 1, 1), persistent=False)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs.float()
        n, c, height, width = x.shape
        gx = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="reflect"), self.kx, groups=c)  # [N, C, H, W]
        gy = F.conv2d(F.pad(x, (0, 0, 1, 1), mode="reflect"), self.ky, groups=c)
        magnitude = torch.sqrt(gx**2 + gy**2)
        angle = torch.remainder(torch.atan2(gy, gx), math.pi)  # unsigned orientation in [0, pi)
        index = (angle / math.pi * self.bins).long().clamp_(max=self.bins - 1)
        hist = torch.zeros(n, c, self.bins, height, width, device=x.device)
        hist.scatter_(2, index.unsqueeze(2), magnitude.unsqueeze(2))
        hist = F.avg_pool2d(hist.flatten(1, 2), self.cell, self.cell) * self.cell**2  # sum per cell
        h, w, k = height // self.patch_size, width // self.patch_size, self.cells_per_patch
        hist = hist.reshape(n, c, self.bins, h, k, w, k).permute(0, 3, 5, 1, 4, 6, 2)  # [N, h, w, C, k, k, bins]
        hist = hist.reshape(n, h * w, c, k * k * self.bins)
        hist = F.normalize(hist, dim=-1)  # per patch and channel
        return hist.reshape(n, h * w, self.dim)


class TokenTarget(Target):
    """Discrete tokens from a user-supplied tokenizer (e.g. BEiT's dVAE), scored by cross-entropy.

    ``tokenizer(imgs)`` must return token ids [N, L] in [0, vocab_size); its weights are frozen.
    """

    def __init__(self, tokenizer: nn.Module | Callable[[torch.Tensor], torch.Tensor], vocab_size: int):
        super().__init__()
        self.tokenizer, self.dim = tokenizer, vocab_size
        if isinstance(tokenizer, nn.Module):
            tokenizer.requires_grad_(False)

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        tokens = self.tokenizer(imgs)
        if tokens.dtype not in (torch.int32, torch.int64) or tokens.dim() != 2:
            raise InputError(f"tokenizer must return integer token ids [N, L], got {tokens.dtype} {list(tokens.shape)}")
        return tokens.long()

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_patch = F.cross_entropy(pred.float().flatten(0, 1), target.flatten(), reduction="none")
        return (per_patch.view_as(mask) * mask).sum() / mask.sum()


TargetFactory = Callable[..., Target]
_TARGETS: dict[str, TargetFactory] = {
    "pixel": lambda patch_size, in_chans, grid=None, **kw: PixelTarget(patch_size, in_chans, False, grid=grid),
    "norm_pixel": lambda patch_size, in_chans, grid=None, **kw: PixelTarget(patch_size, in_chans, True, grid=grid),
    "pca": lambda patch_size, in_chans, pca_components=96, grid=None, **kw: PCATarget(patch_size, in_chans,
                                                                                     pca_components, grid),
    "hog": lambda patch_size, in_chans, hog_bins=9, grid=None, **kw: HOGTarget(patch_size, in_chans, hog_bins,
                                                                              grid=grid),
    "videomae_pixel": lambda patch_size, in_chans, grid=None, **kw: VideoMAEPixelTarget(grid, normalize=False),
    "videomae_norm_pixel": lambda patch_size, in_chans, grid=None, **kw: VideoMAEPixelTarget(grid, normalize=True),
    "maest_pixel": lambda patch_size, in_chans, grid=None, **kw: MAESTPixelTarget(grid, normalize=False),
    "maest_norm_pixel": lambda patch_size, in_chans, grid=None, **kw: MAESTPixelTarget(grid, normalize=True),
}


def register_target(name: str, factory: TargetFactory) -> None:
    """Make ``target=name`` available to `create_model`; ``factory(patch_size=, in_chans=, grid=, **cfg)`` builds
    it (``grid``: the model's `TokenGrid`, for targets that cut clips or grouped channels)."""
    _TARGETS[name] = factory


def target_names() -> list[str]:
    return sorted(_TARGETS)


def build_target(name: str, patch_size: int, in_chans: int, **options) -> Target:
    """Build a registered target by name; unknown names get the closest valid one suggested."""
    if name not in _TARGETS:
        raise unknown_choice("target", name, _TARGETS)
    return _TARGETS[name](patch_size=patch_size, in_chans=in_chans, **options)
