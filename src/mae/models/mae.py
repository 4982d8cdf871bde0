"""The masked autoencoder: a ViT encoder that sees only visible patches and a light decoder that fills in the
rest (He et al., 2021). One readable file; the Transformer blocks and the patch embedding are timm's, so the
encoder's state_dict uses the reference / timm key names and loads into ``timm.create_model("vit_*")``.

Shapes: N batch, C channels, p patch size, h x w patch grid, L = h*w patches, D encoder width, d decoder width,
K kept patches per sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from mae.errors import ConfigError, InputError
from mae.models import masking as masking_lib
from mae.models.patches import patchify, unpatchify
from mae.models.pos_embed import sincos_2d
from mae.models.targets import build_target, target_names


@dataclass
class MAEConfig:
    """Every architecture field of a masked autoencoder; `create_model` overrides any of them by keyword."""

    img_size: int | tuple[int, int] = 224  # int for square images, (H, W) otherwise
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_eps: float = 1e-6
    target: str = "pixel"  # pixel | norm_pixel | pca | hog | any registered target
    norm_pix_loss: bool = False  # the reference's switch; True turns target "pixel" into "norm_pixel"
    mask_strategy: str = "random"  # random | block | grid
    mask_min_block: int = masking_lib.BEIT_MIN_BLOCK  # block strategy: fewest patches per block (BEiT: 16)
    mask_ratio: float = 0.75  # used when forward() gets no ratio
    mask_in_encoder: bool = False  # ablation (Table 1c): mask tokens go through the encoder
    pca_components: int = 96
    hog_bins: int = 9

    def __post_init__(self) -> None:
        if isinstance(self.img_size, (list, tuple)):
            self.img_size = tuple(int(s) for s in self.img_size)  # type: ignore[assignment]  # a tuple of two ints after the check below
            if len(self.img_size) != 2:  # type: ignore[arg-type]  # a tuple here
                raise ConfigError(f"img_size must be an int or (height, width), got {self.img_size}")
        # norm_pix_loss is the reference's name for target="norm_pixel"; after this the two always agree
        if self.norm_pix_loss and self.target not in ("pixel", "norm_pixel"):
            raise ConfigError(f"norm_pix_loss=True conflicts with target '{self.target}'; set only one of them")
        if self.norm_pix_loss and self.target == "pixel":
            self.target = "norm_pixel"
        self.norm_pix_loss = self.target == "norm_pixel"
        self.validate()

    def replace(self, **changes) -> MAEConfig:
        """A copy with some fields changed; a changed ``target`` or ``norm_pix_loss`` wins over the stored other."""
        base = self.to_dict()
        if "target" in changes and "norm_pix_loss" not in changes:
            base["norm_pix_loss"] = False
        elif "norm_pix_loss" in changes and "target" not in changes and base["target"] in ("pixel", "norm_pixel"):
            base["target"] = "norm_pixel" if changes["norm_pix_loss"] else "pixel"
        return MAEConfig(**{**base, **changes})

    @property
    def image_hw(self) -> tuple[int, int]:
        return (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)  # type: ignore[return-value]  # two items (__post_init__)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.image_hw[0] // self.patch_size, self.image_hw[1] // self.patch_size

    def validate(self) -> None:
        h, w = self.image_hw
        if self.patch_size <= 0 or h % self.patch_size or w % self.patch_size:
            raise ConfigError(f"img_size {h}x{w} is not divisible by patch_size {self.patch_size}; "
                              f"pick a patch size that divides both sides")
        for dim, heads, what in ((self.embed_dim, self.num_heads, ""), (self.decoder_embed_dim,
                                                                        self.decoder_num_heads, "decoder_")):
            if heads <= 0 or dim % heads:
                raise ConfigError(f"{what}embed_dim {dim} is not divisible by {what}num_heads {heads}")
            if dim % 4:
                raise ConfigError(f"{what}embed_dim must be divisible by 4 for 2-D sin-cos positions, got {dim}")
        if self.mask_strategy not in masking_lib.MASK_STRATEGIES:
            raise ConfigError(f"unknown mask_strategy '{self.mask_strategy}' "
                              f"(valid: {', '.join(masking_lib.MASK_STRATEGIES)})")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.mask_min_block < 1:
            raise ConfigError(f"mask_min_block must be at least 1 patch, got {self.mask_min_block}")
        if self.target not in target_names():
            build_target(self.target, self.patch_size, self.in_chans)  # raises with a suggestion
        if self.depth < 1 or self.decoder_depth < 0:
            raise ConfigError(f"depth must be >= 1 and decoder_depth >= 0, got {self.depth}, {self.decoder_depth}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size) if isinstance(self.img_size, tuple) else self.img_size
        return d


def config_fields() -> list[str]:
    return [f.name for f in fields(MAEConfig)]


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``): state_dicts are unchanged, and
    ``scaled_dot_product_attention`` picks the flash / memory-efficient kernels on GPU.

    On CPU the attention product runs in fp32 even under bf16 autocast: PyTorch's CPU flash-attention kernel is
    2-10x slower in bf16 than in fp32 at ViT head sizes (its backward above all); the matmuls around it stay bf16.
    Used by the MAE and by the classifiers built on its encoder (`build_classifier`).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, **_norm_and_scale_args):
        super().__init__()
        if qk_norm or dim % num_heads:
            raise ConfigError(f"attention of width {dim} with {num_heads} heads (qk_norm={qk_norm}) is not supported; "
                              "the width must divide into the heads and qk_norm must be off")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [N, heads, T, dim / heads]
        drop = self.attn_drop if self.training else 0.0
        if q.device.type == "cpu" and q.dtype != torch.float32:
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                     dropout_p=drop, is_causal=is_causal).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, is_causal=is_causal)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(n, length, dim)))  # [N, T, D]


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a ViT backbone. ``forward(imgs)`` returns ``(loss, pred, mask)`` like the reference:
    pred [N, L, target_dim], mask [N, L] with 1 for removed patches."""

    def __init__(self, config: MAEConfig | None = None, **kwargs):
        super().__init__()
        cfg = config.replace(**kwargs) if config is not None else MAEConfig(**kwargs)
        self.config = cfg
        self.patch_size, self.in_chans = cfg.patch_size, cfg.in_chans
        self.grid_size = cfg.grid_size
        num_patches = self.grid_size[0] * self.grid_size[1]
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        block = partial(Block, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, norm_layer=norm_layer, attn_layer=Attention)  # type: ignore[arg-type]  # timm calls norm_layer(dim): a partial works
        self.grad_checkpointing = False

        # encoder
        self.patch_embed = PatchEmbed(cfg.image_hw, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.embed_dim), requires_grad=False)  # fixed
        self.blocks = nn.ModuleList([block(cfg.embed_dim, cfg.num_heads) for _ in range(cfg.depth)])
        self.norm = norm_layer(cfg.embed_dim)
        if cfg.mask_in_encoder:
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

        # decoder
        self.target = build_target(cfg.target, cfg.patch_size, cfg.in_chans,
                                   pca_components=cfg.pca_components, hog_bins=cfg.hog_bins)
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        if not cfg.mask_in_encoder:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [block(cfg.decoder_embed_dim, cfg.decoder_num_heads) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = norm_layer(cfg.decoder_embed_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, self.target.dim)
        self.initialize_weights()

    # ---------------------------------------------------------------- initialisation (the reference's)
    def initialize_weights(self) -> None:
        """Sin-cos tables; xavier-uniform Linear and patch conv (as a [out, in*p*p] matrix); tokens N(0, 0.02).

        As in the reference, the patch conv's bias keeps PyTorch's default initialisation.
        """
        _copy_full(self.pos_embed, sincos_2d(self.pos_embed.shape[-1], self.grid_size))
        _copy_full(self.decoder_pos_embed, sincos_2d(self.decoder_pos_embed.shape[-1], self.grid_size))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for name in ("mask_token", "encoder_mask_token"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=0.02)
        for name, child in self.named_children():
            if name != "target":  # a target may hold a user's pretrained tokenizer: never re-initialise it
                child.apply(init_linear_and_norm)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter and buffer in place: for a model built on the meta device and materialised with
        ``to_empty``, also when its parameters are FSDP shards (`mae.train.fsdp`). PyTorch's default for the patch
        conv (whose bias the reference keeps), then `initialize_weights`; the target is built again (only a target
        without fitted or loaded state can be: pixel, norm_pixel, hog)."""
        cfg = self.config
        fresh = build_target(cfg.target, cfg.patch_size, cfg.in_chans, pca_components=cfg.pca_components,
                             hog_bins=cfg.hog_bins)
        if any(True for _ in fresh.parameters()) or fresh.state_dict():
            raise ConfigError(f"target '{cfg.target}' holds fitted or loaded state, which a model built on the meta "
                              f"device lacks; use distributed.init=full")
        self.target = fresh.to(self.cls_token.device)
        self.patch_embed.proj.reset_parameters()
        self.initialize_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass: less memory for large models, ~30% more compute."""
        self.grad_checkpointing = enable

    # ---------------------------------------------------------------- patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C]."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]."""
        return unpatchify(x, self.patch_size, self.grid_size, self.in_chans)

    def _check_input(self, imgs: torch.Tensor) -> None:
        expected = (self.in_chans, *self.config.image_hw)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise InputError(f"expected images [N, {expected[0]}, {expected[1]}, {expected[2]}] "
                             f"(in_chans x height x width of this model), got {list(imgs.shape)}")

    # ---------------------------------------------------------------- masking
    def make_masking(self, n: int, mask_ratio: float, noise: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None, device: torch.device | str = "cpu") -> masking_lib.Masking:
        """Masking for a batch: from an explicit ``mask`` [N, L], else the model's strategy (``noise`` [N, L]
        drives the random strategy, which makes the shuffle reproducible)."""
        if mask is None and self.config.mask_strategy == "random":
            return masking_lib.random_masking(n, self.grid_size, mask_ratio, device, noise)  # compiles, no break
        return self._host_masking(n, mask_ratio, noise, mask, device)

    @torch.compiler.disable
    def _host_masking(self, n: int, mask_ratio: float, noise: torch.Tensor | None, mask: torch.Tensor | None,
                      device: torch.device | str) -> masking_lib.Masking:
        """Masks built with Python loops and host syncs (block, grid, explicit): run eagerly under torch.compile,
        one graph break instead of one per loop iteration (and no recompilation per batch)."""
        if mask is not None:
            return masking_lib.masking_from_mask(mask.to(device), noise)
        strategy = self.config.mask_strategy
        if strategy == "block":
            return masking_lib.block_masking(n, self.grid_size, mask_ratio, device,
                                             min_block=self.config.mask_min_block)
        return masking_lib.grid_masking(n, self.grid_size, device)

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    # ---------------------------------------------------------------- encoder / decoder
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None,
                        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, masking_lib.Masking]:
        """Encode the visible patches: latent [N, 1+K, D] (or [N, 1+L, D] with mask tokens in the encoder)."""
        self._check_input(imgs)
        x = self.patch_embed(imgs)  # [N, L, D]
        n, _, dim = x.shape
        m = self.make_masking(n, mask_ratio, noise, mask, x.device)
        if self.config.mask_in_encoder:
            removed = m.mask.unsqueeze(-1).bool()  # [N, L, 1]
            x = torch.where(removed, self.encoder_mask_token.to(x.dtype), x)
            x = x + self.pos_embed[:, 1:, :]
        else:
            x = x + self.pos_embed[:, 1:, :]
            x = torch.gather(x, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # [N, K, D], no copy of indices
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(n, -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = self._run_blocks(self.blocks, x)
        return self.norm(x), m

    def forward_decoder(self, latent: torch.Tensor, m: masking_lib.Masking) -> torch.Tensor:
        """Predict every patch's target: [N, L, target_dim] (class token dropped)."""
        x = self.decoder_embed(latent)  # [N, 1+K, d]
        if not self.config.mask_in_encoder:
            n, length = m.ids_restore.shape
            mask_tokens = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)  # [N, L-K, d]
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, d] in shuffle order
            x_ = torch.gather(x_, 1, m.ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
            x = torch.cat([x[:, :1, :], x_], dim=1)  # [N, 1+L, d]
        x = x + self.decoder_pos_embed
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean per-patch loss over removed patches only (predictions on kept patches do not count)."""
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            return self.target.loss(pred, self.target(imgs.float()), mask)

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, encode, decode, score: returns ``(loss, pred [N, L, target_dim], mask [N, L])``."""
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        latent, m = self.forward_encoder(imgs, ratio, noise, mask)
        pred = self.forward_decoder(latent, m)
        return self.forward_loss(imgs, pred, m.mask), pred, m.mask

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None,
                    mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel-space reconstruction [N, C, H, W] and the mask [N, L]. For normalised-pixel models each predicted
        patch is un-normalised with that patch's own mean and variance from the input (as the reference's demo)."""
        _, pred, m = self(imgs, mask_ratio, noise, mask)
        if self.config.target == "norm_pixel":
            target = self.patchify(imgs.float())
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred.float() * (var + 1e-6) ** 0.5 + mean
        elif self.config.target != "pixel":
            raise InputError(f"a model trained on '{self.config.target}' targets predicts no pixels to show")
        return self.unpatchify(pred.float()), m

    # ---------------------------------------------------------------- features
    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder on the whole image, no masking: [N, 1+L, D], equal to timm's ``forward_features``."""
        self._check_input(imgs)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = self._run_blocks(self.blocks, torch.cat([cls, x], dim=1))
        return self.norm(x)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm / reference key names (no decoder, no mask tokens)."""
        prefixes = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
        return {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style parameter groups: stem, then one group per encoder block."""
        return {"stem": r"^cls_token|^pos_embed|^patch_embed", "blocks": r"^blocks\.(\d+)"}


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """``param.copy_(full)``; when `param` is a sharded DTensor (FSDP), each rank copies its own part of `full`."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)  # type: ignore[attr-defined]  # a DTensor (hasattr above)
    param.data.copy_(full)


def init_linear_and_norm(module: nn.Module) -> None:
    """The reference initialisation of one module: xavier-uniform Linear with zero bias, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
