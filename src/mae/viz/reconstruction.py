"""Reconstruction grids like paper Figures 2 and 4: masked input | reconstruction | reconstruction with the
visible patches pasted back, for each mask ratio, then the original."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mae.data import build_eval_transform, build_transform, default_mean_std
from mae.files import atomic_write_path
from mae.models import MaskedAutoencoderViT
from mae.viz.images import pick_images

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x.float().cpu() * s + m).clamp(0, 1)


@torch.no_grad()
def reconstruction_panels(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """Normalised-space tensors [N, C, H, W]: 'masked' (removed patches zeroed), 'recon', 'pasted'."""
    model.eval()
    device = next(model.parameters()).device
    imgs = imgs.to(device)
    n, length = imgs.shape[0], model.token_grid.num_tokens
    noise = torch.rand(n, length, generator=torch.Generator().manual_seed(seed)).to(device)
    recon, mask = model.reconstruct(imgs, mask_ratio, noise=noise)
    pixel_mask = model.token_grid.expand_mask(mask)  # [N, 1, H, W] (clips [N, 1, T, H, W]), 1 = removed
    return {"masked": imgs * (1 - pixel_mask), "recon": recon, "pasted": imgs * (1 - pixel_mask) + recon * pixel_mask,
            "pixel_mask": pixel_mask}


def _masked_input(panels: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The masked input in [0, 1] with the removed patches shown grey."""
    hole = panels["pixel_mask"].cpu()
    return _denormalize(panels["masked"], mean, std) * (1 - hole) + 0.5 * hole


def reconstruction_columns(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratios: Sequence[float] = (0.75,),
                           mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                           seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """The grid's (label, images in [0, 1]) columns: per mask ratio the masked input, the reconstruction and the
    reconstruction with the visible patches pasted back; then the originals."""
    default_mean, default_std = default_mean_std(model.in_chans)
    mean, std = mean or default_mean, std or default_std
    columns: list[tuple[str, torch.Tensor]] = []
    for ratio in mask_ratios:
        panels = reconstruction_panels(model, imgs, ratio, seed)
        columns += [(f"{ratio:.0%} masked", _masked_input(panels, mean, std)),
                    ("recon-\nstruction", _denormalize(panels["recon"], mean, std)),
                    ("+ visible\npatches", _denormalize(panels["pasted"], mean, std))]
    columns.append(("original", _denormalize(imgs, mean, std)))
    return columns


def draw_reconstructions(model: MaskedAutoencoderViT, imgs: torch.Tensor, out: str | Path,
                         mask_ratios: Sequence[float] = (0.75,), mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None, seed: int = 0, title: str | None = None) -> Path:
    """Write the grid PNG for a batch of normalised images [N, C, H, W]; returns the path."""
    columns = reconstruction_columns(model, imgs, mask_ratios, mean, std, seed)
    if title is None:
        title = "MAE reconstructions"
        if model.config.target == "norm_pixel":
            title += (" of a normalised-pixel model: each predicted patch is un-normalised with that patch's own mean "
                      "and variance")
    return _save_grid(columns, title, out)


LABEL_FONTSIZE = 12
"""Column labels in points: readable when the report shrinks a 10-column grid to the page width."""


def grid_figure(columns: Sequence[tuple[str, torch.Tensor]], title: str) -> Figure:
    """One row per image, one labelled column per (name, images [N, C, H, W] in [0, 1]) pair. Labels are at most
    two short lines (wrapped at 12 characters) in `LABEL_FONTSIZE` points, so that they stay apart and legible."""
    n = columns[0][1].shape[0]
    side = 1.35  # inches per panel
    # matplotlib takes 0.6 s to import: loaded when a picture is drawn, not by every command that can draw one;
    # a bare Figure renders with Agg and leaves pyplot's global state alone
    from matplotlib.figure import Figure

    fig = Figure(figsize=(side * len(columns), side * n + 1.0), layout="constrained")
    axes = fig.subplots(n, len(columns), squeeze=False)
    for col, (name, batch) in enumerate(columns):
        for row in range(n):
            ax = axes[row][col]
            img = batch[row].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img[..., :3], cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                label = "\n".join(textwrap.fill(part, width=12) for part in name.split("\n"))
                ax.set_title(label, fontsize=LABEL_FONTSIZE)
    fig.suptitle(textwrap.fill(title, width=int(11 * len(columns))), fontsize=LABEL_FONTSIZE)
    return fig


def _save_grid(columns: Sequence[tuple[str, torch.Tensor]], title: str, out: str | Path) -> Path:
    """`grid_figure` saved as a PNG at `out` (atomically)."""
    fig = grid_figure(columns, title)
    return atomic_write_path(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def load_images(data: str | None, model: MaskedAutoencoderViT, num_images: int = 8, split: str = "val",
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                images: Sequence[str | Path] | None = None) -> torch.Tensor:
    """The first ``num_images`` of a dataset's split, or of the image files `images` (instead of `data`), resized and
    centre-cropped to the model's input."""
    h, w = model.config.image_hw
    transform = (build_eval_transform(h, model.in_chans, crop_pct=1.0, mean=mean, std=std) if h == w
                 else build_transform("none", (h, w), model.in_chans, mean, std))  # resize, centre crop to H x W
    return pick_images(transform, model.in_chans, data=data, images=images, num_images=num_images, split=split)[0]


def save_reconstructions(model: MaskedAutoencoderViT, data: str | None, out: str | Path,
                         mask_ratios: Sequence[float] = (0.75,), num_images: int = 8,
                         mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                         seed: int = 0, images: Sequence[str | Path] | None = None) -> Path:
    """Reconstruction grid for the first images of ``data``'s validation split, or of the image files `images`."""
    imgs = load_images(data, model, num_images, mean=mean, std=std, images=images)
    return draw_reconstructions(model, imgs, out, mask_ratios, mean, std, seed)


@torch.no_grad()
def draw_mask_sampling(models: Sequence[tuple[str, MaskedAutoencoderViT]], imgs: torch.Tensor, out: str | Path,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       seed: int = 0) -> Path:
    """Paper Figure 6: for each (label, model) pair, the image masked by that model's own strategy (random, block,
    grid) at its own ratio, and the model's reconstruction with the visible patches pasted back; originals last."""
    first = models[0][1]
    default_mean, default_std = default_mean_std(first.in_chans)
    mean, std = mean or default_mean, std or default_std
    columns: list[tuple[str, torch.Tensor]] = []
    for label, model in models:
        torch.manual_seed(seed)  # block masking draws from torch's RNG: the same masks every time
        panels = reconstruction_panels(model, imgs, model.config.mask_ratio, seed)
        columns += [(label, _masked_input(panels, mean, std)),
                    ("reconstruction", _denormalize(panels["pasted"], mean, std))]
    columns.append(("original", _denormalize(imgs, mean, std)))
    return _save_grid(columns, "Mask sampling strategies (paper Figure 6): masked input and reconstruction (visible "
                      "patches pasted back) of the model pre-trained with each", out)
