"""Patch layout shared by the model, the targets and the pictures.

``patchify``: [N, C, h*p, w*p] -> [N, h*w, p*p*C], row-major over the grid, each patch flattened as
(row-in-patch, col-in-patch, channel), exactly the reference order.
"""

from __future__ import annotations

import torch

from mae.errors import InputError


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images [N, C, H, W] to patches [N, L, p*p*C]; H and W must be multiples of the patch size."""
    n, c, height, width = imgs.shape
    p = patch_size
    if height % p or width % p:
        raise InputError(f"image size {height}x{width} is not divisible by patch size {p}")
    h, w = height // p, width // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int], in_chans: int) -> torch.Tensor:
    """Patches [N, L, p*p*C] back to images [N, C, h*p, w*p] for an h x w grid."""
    n, length, dim = x.shape
    h, w = grid
    p = patch_size
    if length != h * w or dim != p * p * in_chans:
        raise InputError(f"patches {list(x.shape)} do not fit a {h}x{w} grid of {p}x{p}x{in_chans} patches")
    x = x.reshape(n, h, w, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, in_chans, h * p, w * p)
