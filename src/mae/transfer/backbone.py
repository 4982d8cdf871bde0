"""A multi-scale backbone from a plain ViT encoder, for detection and segmentation (paper appendix A.3 / A.4).

A ViT produces one map at the patch stride (16 for ViT-B/L). `ViTPyramid` takes the outputs of four of its blocks
and resamples them to strides 4, 8, 16 and 32 (transposed convolutions up, max-pooling down), the maps an FPN or
UperNet expects. Which blocks: the last of each of 4 equal groups (``feature_blocks="quarters"``, paper A.3's
detection backbone), or BEiT's semantic-segmentation choice (``"beit"``: blocks 3, 5, 7, 11 of ViT-B and 7, 11, 15,
23 of ViT-L, 0-based), or any ``out_indices``; ``pyramid="simple"`` builds the four maps from the last block only.
The maps are LayerNorm-ed (``feature_norm="layernorm"``) or taken raw (``"none"``, BEiT's), and the two stride-4
transposed convolutions have a LayerNorm or a BatchNorm (BEiT's; SyncBatchNorm under DDP) + GELU between them.
The encoder keys are the MAE encoder's (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.i`` as
timm's Block, ``norm``), so any checkpoint the library reads loads with only the new modules missing:
``rel_pos_bias.*`` (optional relative position bias, zero at the start), ``out_norms.*`` and ``resample.*``.

Shapes: N batch, D width, p patch size, h x w patch grid, L = h*w.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from mae.errors import ConfigError
from mae.interop import read_encoder
from mae.models import model_config
from mae.models.loading import LoadReport, WeightRules, load_weights, register_weight_rules
from mae.models.mae import MAEConfig, init_linear_and_norm
from mae.models.pos_embed import resize_pos_embed, sincos_2d
from mae.train.optim import default_layer_id, param_groups

_log = logging.getLogger(__name__)

PYRAMIDS = ("multiscale", "simple")
FEATURE_BLOCKS = ("quarters", "beit")
"""Rules for the blocks that feed a multiscale pyramid (see `out_indices`)."""
FEATURE_NORMS = ("layernorm", "none")
DECONV_NORMS = ("layernorm", "batchnorm")
ARCH_FIELDS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "norm_eps")
"""`MAEConfig` fields that decide the encoder's shapes (`encoder_arch`)."""


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class RelativePositionBias(nn.Module):
    """A learned bias per head for every (query, key) pair, indexed by their relative grid offset, plus three
    entries for the class token (class->patch, patch->class, class->class).

    The table has BEiT's layout: ``[(2h-1)*(2w-1) + 3, heads]``, row ``(dy + h-1) * (2w-1) + (dx + w-1)``, so a
    BEiT ``blocks.i.attn.relative_position_bias_table`` maps to ``rel_pos_bias.i.relative_position_bias_table``.
    Initialised at zero (paper A.4), so a fresh bias leaves the pre-trained attention unchanged. On another grid the
    offset part is resized bicubically.
    """

    def __init__(self, num_heads: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = tuple(grid)
        h, w = self.grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1) + 3, num_heads))

    def _table_for(self, grid: tuple[int, int]) -> torch.Tensor:
        table = self.relative_position_bias_table
        if grid == self.grid:
            return table
        (h0, w0), (h, w) = self.grid, grid
        offsets, cls = table[:-3], table[-3:]
        img = offsets.t().reshape(1, -1, 2 * h0 - 1, 2 * w0 - 1)  # [1, heads, 2h0-1, 2w0-1]
        img = F.interpolate(img, size=(2 * h - 1, 2 * w - 1), mode="bicubic", align_corners=False)
        return torch.cat([img.reshape(table.shape[1], -1).t(), cls], dim=0)

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        """The additive attention bias ``[1, heads, 1+L, 1+L]`` for an h x w grid (class token first)."""
        h, w = grid
        table = self._table_for(tuple(grid))  # type: ignore[arg-type]  # grid: two ints
        n_offsets = table.shape[0] - 3
        index = _relative_index(h, w, table.device)  # [1+L, 1+L]
        index[0, 1:], index[1:, 0], index[0, 0] = n_offsets, n_offsets + 1, n_offsets + 2
        bias = table[index.reshape(-1)].reshape(1 + h * w, 1 + h * w, -1)  # [1+L, 1+L, heads]
        return bias.permute(2, 0, 1).unsqueeze(0).contiguous()


def _relative_index(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Row of the offset table for each (query, key) pair of an h x w grid, in a [1+L, 1+L] tensor."""
    rows = torch.arange(h, device=device).repeat_interleave(w)  # [L]
    cols = torch.arange(w, device=device).repeat(h)
    dy = rows[:, None] - rows[None, :] + h - 1  # [L, L] in 0..2h-2
    dx = cols[:, None] - cols[None, :] + w - 1
    index = torch.zeros(1 + h * w, 1 + h * w, dtype=torch.long, device=device)
    index[1:, 1:] = dy * (2 * w - 1) + dx
    return index


def _resampler(dim: int, factor: float, norm_eps: float, deconv_norm: str = "layernorm") -> nn.Module:
    """Turn a map at the patch stride into one at ``factor`` x that stride (a power of two): 2x2 max-pooling per
    halving, a 2x2 stride-2 transposed convolution per doubling (LayerNorm or BatchNorm, then GELU, between two of
    them)."""
    steps = round(math.log2(factor))
    if steps >= 0:
        return nn.Sequential(*[nn.MaxPool2d(2) for _ in range(steps)]) if steps else nn.Identity()
    layers: list[nn.Module] = []
    for i in range(-steps):
        if i:
            norm = LayerNorm2d(dim, eps=norm_eps) if deconv_norm == "layernorm" else nn.BatchNorm2d(dim)
            layers += [norm, nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class ViTPyramid(nn.Module):
    """ViT encoder -> four feature maps at ``strides`` (default 4, 8, 16, 32), as torchvision's detection models and
    `UperNetHead` take them: ``forward(images) -> OrderedDict('0': [N, D, H/4, W/4], ..., '3': [N, D, H/32, W/32])``.

    Args:
        img_size: the resolution the position table is stored for (the fine-tuning resolution); other input sizes
            work too (the table is resized bicubically on the fly).
        pyramid: 'multiscale' (four blocks feed the four maps) or 'simple' (all four maps from the last block).
        strides: output strides; each divided by the patch size must be a power of two.
        rel_pos_bias: add a relative position bias to every block's attention, initialised at zero (paper A.4).
        drop_path_rate: stochastic depth, rising linearly over the blocks to this value.
        feature_blocks: 'quarters' (the last block of each of 4 equal groups, paper A.3) or 'beit' (BEiT's
            segmentation blocks, see `out_indices`); ignored when ``out_indices`` is given.
        out_indices: the four blocks (0-based, increasing) whose outputs feed the maps, fine to coarse.
        feature_norm: 'layernorm' (a new LayerNorm on each map but the last, which gets the pre-trained final
            norm) or 'none' (the block outputs as they are, BEiT's segmentation backbone).
        deconv_norm: 'layernorm' or 'batchnorm' (BEiT's) between the two transposed convolutions of the stride-4 map.
        learnable_pos_embed: train the absolute position table (BEiT's segmentation code does) instead of keeping
            the loaded sin-cos table fixed.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-6, pyramid: str = "multiscale", strides: Sequence[int] = (4, 8, 16, 32),
                 rel_pos_bias: bool = False, drop_path_rate: float = 0.0, feature_blocks: str = "quarters",
                 out_indices: Sequence[int] | None = None, feature_norm: str = "layernorm",
                 deconv_norm: str = "layernorm", learnable_pos_embed: bool = False):
        super().__init__()
        self.img_size = _pair(img_size)
        check_pyramid(pyramid, depth, patch_size, strides, self.img_size)
        check_pyramid_options(depth, pyramid, feature_blocks, out_indices, feature_norm, deconv_norm)
        self.feature_blocks, self.feature_norm, self.deconv_norm = feature_blocks, feature_norm, deconv_norm
        self.patch_size, self.embed_dim, self.depth = patch_size, embed_dim, depth
        self.pyramid, self.strides = pyramid, tuple(int(s) for s in strides)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.out_channels = embed_dim
        """Channels of every output map (what an FPN's ``in_channels_list`` needs)."""
        self.feature_names = [str(i) for i in range(len(self.strides))]
        self.grad_checkpointing = False

        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim),
                                      requires_grad=learnable_pos_embed)  # fixed sin-cos unless learnable
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer, drop_path=rate)  # type: ignore[arg-type]  # timm calls norm_layer(dim): a partial works
            for rate in rates])
        self.norm = norm_layer(embed_dim)  # the pre-trained final norm, on the last block's output
        self.rel_pos_bias = (nn.ModuleList([RelativePositionBias(num_heads, self.grid_size) for _ in range(depth)])
                             if rel_pos_bias else None)
        # feature_norm=layernorm: the first three maps get a fresh LayerNorm each so that the four have comparable
        # scales (the last one keeps the pre-trained `norm`); none: the raw block outputs (BEiT)
        self.out_indices = tuple(out_indices) if out_indices is not None and pyramid == "multiscale" else \
            default_out_indices(depth, pyramid, feature_blocks)
        self.out_norms = nn.ModuleList([norm_layer(embed_dim) for _ in self.out_indices[:-1]]
                                       if feature_norm == "layernorm" else [])
        self.resample = nn.ModuleList([_resampler(embed_dim, s / patch_size, norm_eps, deconv_norm)
                                       for s in self.strides])
        self.init_weights()

    # ---------------------------------------------------------------- initialisation
    def init_weights(self) -> None:
        """The MAE encoder's initialisation (sin-cos positions, xavier-uniform linears and patch conv, tokens
        N(0, 0.02)) plus zero relative position bias: a randomly initialised backbone of the same family."""
        self.pos_embed.data.copy_(sincos_2d(self.embed_dim, self.grid_size))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_linear_and_norm)
        if self.rel_pos_bias is not None:
            for rpb in self.rel_pos_bias:
                nn.init.zeros_(rpb.relative_position_bias_table)  # type: ignore[arg-type]  # Module.__getattr__ gives Tensor | Module

    def no_weight_decay(self) -> set[str]:
        """Parameters never decayed (as the reference's fine-tuning: tokens, positions, relative bias tables)."""
        return {"cls_token", "pos_embed", "rel_pos_bias.*"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (less memory, one more forward pass of each block)."""
        self.grad_checkpointing = enable

    # ---------------------------------------------------------------- forward
    def position_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table [1, 1+h*w, D] for a grid: the stored one, or it resized bicubically."""
        return resize_pos_embed(self.pos_embed, self.grid_size, grid)

    def forward_tokens(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Run the encoder; the token maps [N, D, h, w] after the blocks in `out_indices` (normalised), and the grid.

        Inputs whose sides are not multiples of the patch size are zero-padded at the bottom / right.
        """
        n, _, height, width = images.shape
        p = self.patch_size
        pad_h, pad_w = -height % p, -width % p
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        grid = ((height + pad_h) // p, (width + pad_w) // p)
        pos = self.position_table(grid).to(images.dtype)  # [1, 1+L, D]
        x = self.patch_embed(images) + pos[:, 1:]  # [N, L, D]
        cls = (self.cls_token + pos[:, :1]).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1)  # [N, 1+L, D]
        maps: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            bias = self.rel_pos_bias[i](grid).to(x.dtype) if self.rel_pos_bias is not None else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask=bias, use_reentrant=False)
            else:
                x = block(x, attn_mask=bias)
            if i in self.out_indices:
                k = self.out_indices.index(i)
                tokens = x[:, 1:]  # [N, L, D], class token dropped
                if self.feature_norm == "layernorm":
                    tokens = (self.norm if k == len(self.out_indices) - 1 else self.out_norms[k])(tokens)
                maps.append(tokens.transpose(1, 2).reshape(n, self.embed_dim, *grid))  # [N, D, h, w]
        return maps, grid

    def pyramid_options(self) -> dict[str, Any]:
        """The constructor arguments beyond the architecture and `backbone_spec`'s that rebuild this pyramid."""
        return {"out_indices": list(self.out_indices) if self.pyramid == "multiscale" else None,
                "feature_norm": self.feature_norm, "deconv_norm": self.deconv_norm,
                "learnable_pos_embed": self.pos_embed.requires_grad}

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """[N, C, H, W] -> {'0': stride strides[0], ..., '3': stride strides[3]}, each [N, D, H/s, W/s]."""
        maps, _ = self.forward_tokens(images)
        if self.pyramid == "simple":
            maps = maps * len(self.strides)
        return OrderedDict((name, op(m)) for name, op, m in zip(self.feature_names, self.resample, maps, strict=False))


# The modules an MAE checkpoint does not have keep their initialisation (`mae.models.loading.load_weights`).
register_weight_rules(ViTPyramid, WeightRules(new_prefixes=("rel_pos_bias.", "out_norms.", "resample.")))


def default_out_indices(depth: int, pyramid: str, feature_blocks: str = "quarters") -> tuple[int, ...]:
    """Blocks whose outputs feed the pyramid (0-based): only the last one ('simple'); the last of each of 4 equal
    groups ('quarters': 2, 5, 8, 11 for 12 blocks); or BEiT's segmentation blocks ('beit': the ends of the first
    third, half, two thirds and all of the blocks: 3, 5, 7, 11 for ViT-B, 7, 11, 15, 23 for ViT-L)."""
    if pyramid == "simple":
        return (depth - 1,)
    if feature_blocks == "beit":
        return tuple(round(depth * f) - 1 for f in (1 / 3, 1 / 2, 2 / 3, 1))
    return tuple(round(depth * (k + 1) / 4) - 1 for k in range(4))


def check_pyramid_options(depth: int, pyramid: str, feature_blocks: str, out_indices: Sequence[int] | None,
                          feature_norm: str, deconv_norm: str) -> None:
    """Raise ConfigError for block choices and norms a `ViTPyramid` cannot build."""
    if feature_blocks not in FEATURE_BLOCKS:
        raise ConfigError(f"feature_blocks '{feature_blocks}' is not one of {', '.join(FEATURE_BLOCKS)}")
    if feature_norm not in FEATURE_NORMS:
        raise ConfigError(f"feature_norm '{feature_norm}' is not one of {', '.join(FEATURE_NORMS)}")
    if deconv_norm not in DECONV_NORMS:
        raise ConfigError(f"deconv_norm '{deconv_norm}' is not one of {', '.join(DECONV_NORMS)}")
    if out_indices is not None and pyramid == "multiscale":
        idx = list(out_indices)
        if len(idx) != 4 or idx != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= depth:
            raise ConfigError(f"out_indices must be 4 increasing block indices in 0..{depth - 1}, got {idx}")


def check_pyramid(pyramid: str, depth: int, patch_size: int, strides: Sequence[int],
                  img_size: tuple[int, int] | None = None) -> None:
    """Raise ConfigError for settings a `ViTPyramid` cannot build."""
    if pyramid not in PYRAMIDS:
        raise ConfigError(f"pyramid '{pyramid}' is not one of {', '.join(PYRAMIDS)}")
    if pyramid == "multiscale" and depth < 4:
        raise ConfigError(f"the multiscale pyramid splits the blocks into 4 groups; depth {depth} is fewer than 4 "
                          f"blocks (use pyramid=simple)")
    if len(strides) != 4 or sorted(strides) != list(strides):
        raise ConfigError(f"strides must be 4 increasing values (e.g. [4, 8, 16, 32]), got {list(strides)}")
    for s in strides:
        ratio = math.log2(s / patch_size) if s > 0 else 0.5
        if ratio != round(ratio):
            raise ConfigError(f"stride {s} is not the patch size {patch_size} times a power of two; pick strides "
                              f"such as {[patch_size // 4 or 1, patch_size // 2 or 1, patch_size, patch_size * 2]}")
    if img_size is not None and (img_size[0] % patch_size or img_size[1] % patch_size):
        raise ConfigError(f"img_size {img_size[0]}x{img_size[1]} is not a multiple of the patch size {patch_size}")


# ---------------------------------------------------------------------------------------------------- loading
def encoder_arch(config: MAEConfig) -> dict[str, Any]:
    """The `ViTPyramid` keyword arguments that fix an MAE encoder's shapes."""
    return {k: getattr(config, k) for k in ARCH_FIELDS}


def build_backbone(checkpoint: str | Path | None = None, *, model_name: str | None = None, pretrained: bool = True,
                   img_size: int | Sequence[int] | None = None, arch_overrides: Mapping[str, Any] | None = None,
                   **pyramid_kwargs: Any) -> tuple[ViTPyramid, LoadReport | None]:
    """A `ViTPyramid` with the architecture of ``checkpoint`` (any format or run directory the library reads) or of
    the registered ``model_name``, with the checkpoint's encoder weights unless ``pretrained=False`` (then randomly
    initialised the MAE way: the "random init" baseline of the same architecture).

    ``img_size`` is the fine-tuning resolution (default: the checkpoint's); ``arch_overrides`` change `ARCH_FIELDS`
    (e.g. ``num_heads`` for a reference file of a non-standard width); ``pyramid_kwargs`` go to `ViTPyramid`
    (pyramid, strides, rel_pos_bias, drop_path_rate). Returns the backbone and what was loaded (None if nothing).
    """
    if checkpoint is None and model_name is None:
        raise ConfigError("a backbone needs a checkpoint or a registered model name (see `mae models`)")
    if checkpoint is None and pretrained:
        raise ConfigError("pretrained=True needs a checkpoint; give one, or use random initialisation")
    overrides = dict(arch_overrides or {})
    unknown = sorted(set(overrides) - set(ARCH_FIELDS))
    if unknown:
        raise ConfigError(f"unknown architecture field '{unknown[0]}' (valid: {', '.join(ARCH_FIELDS)})")
    source = None
    if checkpoint is not None:
        source = read_encoder(checkpoint, model_name, **overrides)
        config = source.config
    else:
        config = model_config(model_name, **overrides)  # type: ignore[arg-type]  # checked above: a model_name without a checkpoint
    backbone = ViTPyramid(img_size=img_size if img_size is not None else config.image_hw, **encoder_arch(config),
                          **pyramid_kwargs)
    if not pretrained or source is None:
        return backbone, None
    # the MAE encoder by the family's rules: the pyramid's new modules start fresh, decoder and classifier keys are
    # not used, a position table of another grid is resized bicubically; another architecture raises
    report = load_weights(backbone, source.state_dict, source=source.label, source_grid=config.grid_size)
    if any(k.startswith("norm.") for k in report.missing):
        warnings.warn(f"{source.label} is a fine-tuned classifier (fc_norm, no final norm): the backbone's last norm "
                      f"keeps its initialisation", stacklevel=2)
    _log.info("backbone: %s", report.describe())
    return backbone, report


# ---------------------------------------------------------------------------------------------------- lr decay
_REL_POS = re.compile(r"^rel_pos_bias\.(\d+)\.")


def backbone_layer_id(prefix: str = "") -> Callable[[str, int], int]:
    """A ``layer_id_fn`` for `mae.train.optim.param_groups` on a model holding a `ViTPyramid` at ``prefix``
    (e.g. 'backbone.body.'): stem 0, ``blocks.i`` and its relative position bias i + 1, everything else (the
    final norm, the pyramid's new layers, FPN and heads) num_layers + 1, i.e. the full lr."""

    def layer_id(name: str, num_layers: int) -> int:
        if not name.startswith(prefix):
            return num_layers + 1
        rest = name[len(prefix):]
        match = _REL_POS.match(rest)
        if match:
            return int(match.group(1)) + 1
        return default_layer_id(rest, num_layers)

    return layer_id


def backbone_param_groups(model: nn.Module, backbone: ViTPyramid, prefix: str, weight_decay: float,
                          layer_decay: float | None) -> list[dict[str, Any]]:
    """Parameter groups of a whole task model: layer-wise lr decay over the backbone's blocks (scale
    ``decay ** (depth + 1 - layer_id)``), no weight decay for biases, norms, tokens, positions and bias tables."""
    skip = [prefix + name for name in backbone.no_weight_decay()]
    return param_groups(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay,
                        num_layers=backbone.depth, layer_id_fn=backbone_layer_id(prefix))
