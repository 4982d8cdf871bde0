"""Where the class token looks: the attention of the class token in the encoder's last block, per head and averaged
over heads, drawn over each image (``mae attention CHECKPOINT --images ... --out FILE.png``).

The weights are recomputed from the block's own parameters, not read from inside timm: a forward pre-hook on the
last block's ``attn`` module keeps its input x [N, 1+L, D]; ``softmax(q k^T / sqrt(d_head))`` of the class token's
query against every key (``q, k`` from the module's ``qkv`` Linear) is what that module computes before weighting the
values. Nothing in timm or in the model is patched.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mae.data import build_eval_transform, default_mean_std
from mae.errors import ConfigError
from mae.files import atomic_write_path
from mae.viz.images import pick_images

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["cls_attention", "draw_attention", "load_image_files", "save_attention_maps"]


@torch.no_grad()
def cls_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The class token's attention weights in the last block: [N, heads, 1+L] (index 0 is the class token itself,
    then the patches in raster order); each row sums to 1. `model` is an MAE (``forward_features``, no masking) or a
    timm ViT classifier."""
    blocks = getattr(model, "blocks", None)
    if not blocks:
        raise ConfigError(f"{type(model).__name__} has no transformer blocks; pass an MAE or a ViT classifier")
    attn = blocks[-1].attn
    captured: dict[str, torch.Tensor] = {}

    def keep_input(module: nn.Module, args: tuple) -> None:
        captured["x"] = args[0]

    handle = attn.register_forward_pre_hook(keep_input)
    try:
        model.forward_features(images)  # type: ignore[operator]  # Module.__getattr__ gives Tensor | Module
    finally:
        handle.remove()
    x = captured["x"]  # [N, T, D]
    n, length, dim = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(n, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)  # [3, N, H, T, d]
    q, k = qkv[0], qkv[1]
    q = getattr(attn, "q_norm", nn.Identity())(q)  # timm's qk-norm option (Identity unless enabled)
    k = getattr(attn, "k_norm", nn.Identity())(k)
    scores = (q[:, :, :1] @ k.transpose(-2, -1)) * (dim // heads) ** -0.5  # [N, H, 1, T]
    return scores.float().softmax(dim=-1)[:, :, 0]  # [N, H, T]


def _patch_maps(weights: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Patch weights [N, H, 1+L] -> maps [N, H, height, width] (class token dropped, nearest upsampling), each scaled
    to its own maximum for display."""
    n, heads, _ = weights.shape
    maps = weights[:, :, 1:].reshape(n, heads, *grid)
    maps = maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return F.interpolate(maps, size=size, mode="nearest")


def draw_attention(model: nn.Module, images: torch.Tensor, display: torch.Tensor | None = None,
                   names: Sequence[str] | None = None) -> Figure:
    """A figure with one row per image: the image, then the class token's attention of each head, then the mean
    over heads, drawn over the image. `images` are the model's normalised inputs [N, C, H, W]; `display` the same
    images in [0, 1] to draw under the maps (default: `images` rescaled per image)."""
    weights = cls_attention(model, images)  # [N, H, 1+L]
    n, heads, tokens = weights.shape
    h, w = images.shape[-2:]
    patch: int = getattr(model, "patch_size", None) or model.patch_embed.patch_size[0]  # type: ignore[index, union-attr, assignment]  # Module.__getattr__ gives Tensor | Module
    grid = (h // patch, w // patch)
    if grid[0] * grid[1] != tokens - 1:
        raise ConfigError(f"{tokens - 1} patch tokens do not make a {grid[0]}x{grid[1]} grid")
    per_head = _patch_maps(weights, grid, (h, w))  # [N, H, h, w]
    mean = _patch_maps(weights.mean(dim=1, keepdim=True), grid, (h, w))[:, 0]  # [N, h, w]
    if display is None:
        lo = images.amin(dim=(1, 2, 3), keepdim=True)
        display = (images - lo) / (images.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-12)
    display = display.detach().float().cpu()
    columns = ["image", *[f"head {i + 1}" for i in range(heads)], "mean of heads"]
    # matplotlib takes 0.6 s to import: loaded when a picture is drawn, not by every command that can draw one;
    # a bare Figure renders with Agg and leaves pyplot's global state alone
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.5 * len(columns), 1.5 * n + 0.8), layout="constrained")
    axes = fig.subplots(n, len(columns), squeeze=False)
    for row in range(n):
        picture = display[row].permute(1, 2, 0).numpy()
        grey = picture[..., 0] if picture.shape[-1] == 1 else picture.mean(-1)
        maps = [None, *per_head[row].cpu(), mean[row].cpu()]
        for col, (label, heat) in enumerate(zip(columns, maps, strict=True)):
            ax = axes[row][col]
            if heat is None:
                ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
                ax.imshow(heat.numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=11)
            if col == 0 and names is not None:
                ax.set_ylabel(textwrap.shorten(Path(names[row]).name, width=18), fontsize=8)
    title = "class-token attention of the last block (brighter = more weight; each map scaled to its maximum)"
    fig.suptitle(textwrap.fill(title, width=int(11 * len(columns))), fontsize=11)
    return fig


def load_image_files(paths: Sequence[str | Path] | None, img_size: int, in_chans: int, limit: int | None = None,
                     crop_pct: float | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None,
                     data: str | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images (files, or folders searched recursively; or, instead, the validation split of the dataset `data`) as
    the model's inputs [N, C, S, S], the same in [0, 1] for display, and their names."""
    default_mean, default_std = default_mean_std(in_chans)
    mean, std = mean or default_mean, std or default_std
    transform = build_eval_transform(img_size, in_chans, crop_pct, mean, std)
    inputs, names = pick_images(transform, in_chans, data=data, images=paths, num_images=limit)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return inputs, (inputs * s + m).clamp(0, 1), names  # display: the same pixels, un-normalised


def save_attention_maps(model: nn.Module, image_paths: Sequence[str | Path] | None, out: str | Path,
                        limit: int | None = 8, data: str | None = None, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None) -> Path:
    """Draw `draw_attention` for image files (or, instead, the validation split of the dataset `data`) with the
    model's input size and write the PNG at `out`."""
    config = getattr(model, "config", None) or getattr(model, "classifier_config", None)
    h, w = config.image_hw  # type: ignore[union-attr]  # models drawn here have a config (AttributeError as before otherwise)
    if h != w:
        raise ConfigError(f"the image transform makes square images; this model's img_size is {h}x{w}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out '{out}' must be a .png file")
    inputs, shown, names = load_image_files(image_paths, h, config.in_chans, limit, mean=mean, std=std,  # type: ignore[union-attr]  # as above
                                            data=data)
    fig = draw_attention(model, inputs, shown, names)
    return atomic_write_path(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
