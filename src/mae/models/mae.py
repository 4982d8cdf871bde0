"""The masked autoencoder: a ViT encoder that sees only visible patches and a light decoder that fills in the
rest (He et al., 2021). One readable file; the Transformer blocks and the patch embedding are timm's, so the
encoder's state_dict uses the reference / timm key names and loads into ``timm.create_model("vit_*")``.

The model works on a token grid (`mae.models.grid`): an image [N, C, H, W] of p x p patches, a clip or time series
[N, C, T, H, W] of u x p x p tubelets, optionally with channel groups. Its position table, mask strategy and target
come from registries (`pos_embed`, `masking`, `targets`); nothing here tests the number of axes.

Shapes: N batch, C channels, p patch size, L tokens (h*w for an image), P prefix tokens (1 with the class token,
else 0), D encoder width, d decoder width, K kept tokens per sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from mae.errors import ConfigError, InputError
from mae.models import masking as masking_lib
from mae.models.grid import TokenGrid, embedding_convs, patch_embedding
from mae.models.loading import WeightRules, register_weight_rules
from mae.models.pos_embed import position_table
from mae.models.targets import build_target, target_names


@dataclass
class MAEConfig:
    """Every architecture field of a masked autoencoder; `build_model` overrides any of them by keyword."""

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
    mask_strategy: str = "random"  # random | block | grid | tube | consistent | frame | any registered strategy
    mask_min_block: int = masking_lib.BEIT_MIN_BLOCK  # block strategy: fewest patches per block (BEiT: 16)
    mask_ratio: float = 0.75  # used when forward() gets no ratio
    mask_in_encoder: bool = False  # ablation (Table 1c): mask tokens go through the encoder
    pca_components: int = 96
    hog_bins: int = 9
    num_frames: int = 0  # 0: images [N, C, H, W]; T >= 1: clips / time series [N, C, T, H, W]
    tubelet_size: int = 1  # frames per token along time (MAE-ST, VideoMAE: 2; Prithvi: 1)
    channel_groups: list[list[int]] = field(default_factory=list)  # channels per token group (SatMAE); []: none
    pos_embed_type: str = "sincos"  # sincos | sincos_1d | separable | learned | any registered table
    cls_token: bool = True  # a class token in front of the tokens (VideoMAE has none)
    attn_k_bias: bool = True  # False: biases on query and value only (VideoMAE); the key third of qkv.bias stays 0
    encoder_norm: bool = True  # a LayerNorm after the encoder blocks (HF VideoMAE with use_mean_pooling has none)
    decoder_embed_bias: bool = True  # a bias in the encoder-to-decoder projection (VideoMAE has none)
    decoder_norm_eps: float | None = None  # eps of the decoder's final LayerNorm; None: norm_eps (HF VideoMAE: 1e-5)

    def __post_init__(self) -> None:
        self.channel_groups = [[int(c) for c in group] for group in self.channel_groups or []]
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
    def token_grid(self) -> TokenGrid:
        """How the input is cut into tokens (`mae.models.grid.TokenGrid`)."""
        p = self.patch_size
        time = (self.num_frames,) if self.num_frames else ()
        tubelet = (self.tubelet_size,) if self.num_frames else ()
        groups = tuple(tuple(g) for g in self.channel_groups)
        return TokenGrid((*time, *self.image_hw), (*tubelet, p, p), self.in_chans, groups)

    @property
    def grid_size(self) -> tuple[int, ...]:
        """Patches per axis: (h, w) for images, (t, h, w) for clips and time series."""
        return self.token_grid.grid

    @property
    def num_patches(self) -> int:
        """Tokens per sample (every channel group's), the length of a mask or of the masking noise."""
        return self.token_grid.num_tokens

    def validate(self) -> None:
        h, w = self.image_hw
        if self.patch_size <= 0 or h % self.patch_size or w % self.patch_size:
            raise ConfigError(f"img_size {h}x{w} is not divisible by patch_size {self.patch_size}; "
                              f"pick a patch size that divides both sides")
        if self.num_frames < 0:
            raise ConfigError(f"num_frames must be 0 (images) or the frames of a clip, got {self.num_frames}")
        if not self.num_frames and self.tubelet_size != 1:
            raise ConfigError(f"tubelet_size {self.tubelet_size} needs clips: set num_frames (images have no time)")
        grid = self.token_grid  # raises on a time extent the tubelet does not divide, or bad channel groups
        table = position_table(self.pos_embed_type)
        for dim, heads, what in ((self.embed_dim, self.num_heads, ""), (self.decoder_embed_dim,
                                                                        self.decoder_num_heads, "decoder_")):
            if heads <= 0 or dim % heads:
                raise ConfigError(f"{what}embed_dim {dim} is not divisible by {what}num_heads {heads}")
            if self.pos_embed_type == "sincos" and not grid.has_time and dim % 4:
                raise ConfigError(f"{what}embed_dim must be divisible by 4 for 2-D sin-cos positions, got {dim}")
            table.shapes(grid, dim, self.cls_token)  # raises when the table does not fit this grid
            if table.fixed is not None and (grid.has_time or self.pos_embed_type != "sincos"):
                table.fixed(grid, dim, self.cls_token)  # raises on a width the fixed table cannot split
        masking_lib.mask_strategy(self.mask_strategy)  # raises naming the valid ones
        if self.mask_strategy == "frame" and not grid.has_time:
            raise ConfigError("mask_strategy 'frame' removes whole time steps: it needs clips (set num_frames)")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.mask_min_block < 1:
            raise ConfigError(f"mask_min_block must be at least 1 patch, got {self.mask_min_block}")
        if self.target not in target_names():
            build_target(self.target, self.patch_size, self.in_chans)  # raises with a suggestion
        if len({len(g) for g in self.channel_groups}) > 1:
            sizes = [len(g) for g in self.channel_groups]
            raise ConfigError(f"channel groups of different sizes {sizes} need one prediction head per group, which "
                              f"this model does not have; use groups of equal size")
        if self.decoder_norm_eps is not None and not self.decoder_norm_eps > 0:
            raise ConfigError(f"decoder_norm_eps must be > 0 (or unset: norm_eps), got {self.decoder_norm_eps}")
        if self.depth < 1 or self.decoder_depth < 0:
            raise ConfigError(f"depth must be >= 1 and decoder_depth >= 0, got {self.depth}, {self.decoder_depth}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(self.img_size) if isinstance(self.img_size, tuple) else self.img_size
        return d

    def target_options(self) -> dict:
        """The keyword arguments `build_target` takes from this config."""
        return {"pca_components": self.pca_components, "hog_bins": self.hog_bins, "grid": self.token_grid}


def config_fields() -> list[str]:
    return [f.name for f in fields(MAEConfig)]


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``): state_dicts are unchanged, and
    ``scaled_dot_product_attention`` picks the flash / memory-efficient kernels on GPU.

    On CPU the attention product runs in fp32 even under bf16 autocast: PyTorch's CPU flash-attention kernel is
    several times slower in bf16 than in fp32 at ViT head sizes, its backward above all (docs/benchmarks.md, "What
    made the difference"); the matmuls around it stay bf16.
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

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, D] -> [N, T, 3D]: queries, keys and values side by side."""
        return self.qkv(x)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.project_qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [N, heads, T, dim / heads]
        drop = self.attn_drop if self.training else 0.0
        if q.device.type == "cpu" and q.dtype != torch.float32:
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                     dropout_p=drop, is_causal=is_causal).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, is_causal=is_causal)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(n, length, dim)))  # [N, T, D]


class QVBiasAttention(Attention):
    """VideoMAE's attention: biases on the query and the value, none on the key. timm's ``qkv.bias`` keeps its key
    and shape (the encoder still loads into timm's ViT); its key third is replaced by zeros in the forward pass, so
    no gradient reaches it. (A key bias adds the same number to every score of a query, which the softmax removes:
    this is exactness, not a different model.)"""

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.qkv.bias
        if bias is None:
            return self.qkv(x)
        dim = bias.shape[0] // 3
        return F.linear(x, self.qkv.weight, torch.cat([bias[:dim], torch.zeros_like(bias[dim:2 * dim]),
                                                       bias[2 * dim:]]))


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder with a ViT backbone. ``forward(x)`` returns ``(loss, pred, mask)`` like the reference:
    pred [N, L, target_dim], mask [N, L] with 1 for removed tokens (token order of `mae.models.grid`)."""

    def __init__(self, config: MAEConfig | None = None, **kwargs):
        super().__init__()
        cfg = config.replace(**kwargs) if config is not None else MAEConfig(**kwargs)
        self.config = cfg
        self.patch_size, self.in_chans = cfg.patch_size, cfg.in_chans
        self.token_grid = grid = cfg.token_grid
        self.grid_size = grid.grid
        self.num_prefix_tokens = int(cfg.cls_token)
        self.positions = position_table(cfg.pos_embed_type)
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        attention = Attention if cfg.attn_k_bias else QVBiasAttention
        block = partial(Block, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, norm_layer=norm_layer, attn_layer=attention)  # type: ignore[arg-type]  # timm calls norm_layer(dim): a partial works
        self.grad_checkpointing = False

        # encoder
        self.patch_embed = patch_embedding(grid, cfg.embed_dim)
        if cfg.cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self._add_position_table("pos_embed", cfg.embed_dim)
        self.blocks = nn.ModuleList([block(cfg.embed_dim, cfg.num_heads) for _ in range(cfg.depth)])
        self.norm = norm_layer(cfg.embed_dim) if cfg.encoder_norm else nn.Identity()
        if cfg.mask_in_encoder:
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

        # decoder
        self.target = build_target(cfg.target, cfg.patch_size, cfg.in_chans, **cfg.target_options())
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim, bias=cfg.decoder_embed_bias)
        if not cfg.mask_in_encoder:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self._add_position_table("decoder_pos_embed", cfg.decoder_embed_dim)
        self.decoder_blocks = nn.ModuleList(
            [block(cfg.decoder_embed_dim, cfg.decoder_num_heads) for _ in range(cfg.decoder_depth)])
        decoder_eps = cfg.norm_eps if cfg.decoder_norm_eps is None else cfg.decoder_norm_eps
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=decoder_eps)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, self.target.dim)
        self.initialize_weights()

    # ---------------------------------------------------------------- position tables
    def _add_position_table(self, prefix: str, dim: int) -> None:
        """Register the parameters of this model's kind of position table as ``prefix`` + suffix (``pos_embed``
        for one whole table, ``pos_embed_spatial`` / ``_temporal`` / ``_class`` for separable ones); fixed tables
        are parameters without gradient, as in the reference, so their keys are in the state_dict."""
        for suffix, shape in self.positions.shapes(self.token_grid, dim, self.config.cls_token).items():
            setattr(self, prefix + suffix, nn.Parameter(torch.zeros(shape), requires_grad=self.positions.learned))

    def _position_params(self, prefix: str) -> dict[str, torch.Tensor]:
        dim = self.config.embed_dim if prefix == "pos_embed" else self.config.decoder_embed_dim
        return {suffix: getattr(self, prefix + suffix)
                for suffix in self.positions.shapes(self.token_grid, dim, self.config.cls_token)}

    def position_embedding(self, decoder: bool = False) -> torch.Tensor:
        """The encoder's (or decoder's) position table [1, P + L, width], the class token's row first."""
        prefix = "decoder_pos_embed" if decoder else "pos_embed"
        return self.positions.combine(self._position_params(prefix), self.token_grid, self.config.cls_token)

    # ---------------------------------------------------------------- initialisation (the reference's)
    def initialize_weights(self) -> None:
        """Position tables (fixed sin-cos, or learned N(0, 0.02) truncated at 2); xavier-uniform Linear and patch
        conv (as a [out, in*prod(patch)] matrix); tokens N(0, 0.02).

        As in the reference, the patch conv's bias keeps PyTorch's default initialisation.
        """
        for prefix in ("pos_embed", "decoder_pos_embed"):
            params = self._position_params(prefix)
            width = next(iter(params.values())).shape[-1]
            fixed = self.positions.fixed(self.token_grid, width, self.config.cls_token) if self.positions.fixed else {}
            for suffix, param in params.items():
                if suffix in fixed:
                    _copy_full(param, fixed[suffix])
                else:
                    nn.init.trunc_normal_(param, std=0.02)
        for conv in embedding_convs(self.patch_embed):
            w = conv.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.config.cls_token:
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
        fresh = build_target(cfg.target, cfg.patch_size, cfg.in_chans, **cfg.target_options())
        if any(True for _ in fresh.parameters()) or fresh.state_dict():
            raise ConfigError(f"target '{cfg.target}' holds fitted or loaded state, which a model built on the meta "
                              f"device lacks; use distributed.init=full")
        self.target = fresh.to(self.decoder_embed.weight.device)
        for conv in embedding_convs(self.patch_embed):
            conv.reset_parameters()
        self.initialize_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass: less memory for large models, for one more forward pass
        of each block."""
        self.grad_checkpointing = enable

    # ---------------------------------------------------------------- patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C] (clips: [N, C, T, H, W] -> [N, L, u*p*p*C])."""
        return self.token_grid.patchify(imgs)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W] (clips: [N, L, u*p*p*C] -> [N, C, T, H, W])."""
        return self.token_grid.unpatchify(x)

    def _check_input(self, imgs: torch.Tensor) -> None:
        if self.token_grid.has_time or self.token_grid.channel_groups:
            self.token_grid.check_input(imgs)
            return
        expected = (self.in_chans, *self.config.image_hw)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise InputError(f"expected images [N, {expected[0]}, {expected[1]}, {expected[2]}] "
                             f"(in_chans x height x width of this model), got {list(imgs.shape)}")

    # ---------------------------------------------------------------- masking
    def make_masking(self, n: int, mask_ratio: float, noise: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None, device: torch.device | str = "cpu") -> masking_lib.Masking:
        """Masking for a batch: from an explicit ``mask`` [N, L] (True / 1 = removed, as Hugging Face's
        ``bool_masked_pos``), else the model's strategy (``noise`` [N, L] drives the random strategy, which makes the
        shuffle reproducible, and ranks the places of the tube, consistent and frame strategies)."""
        if mask is None and self.config.mask_strategy == "random":
            return masking_lib.random_masking(n, (self.token_grid.num_tokens,), mask_ratio, device, noise)  # compiles
        return self._host_masking(n, mask_ratio, noise, mask, device)

    @torch.compiler.disable
    def _host_masking(self, n: int, mask_ratio: float, noise: torch.Tensor | None, mask: torch.Tensor | None,
                      device: torch.device | str) -> masking_lib.Masking:
        """Masks built with Python loops and host syncs (block, grid, explicit, ...): run eagerly under
        torch.compile, one graph break instead of one per loop iteration (and no recompilation per batch)."""
        if mask is not None:
            if mask.shape != (n, self.token_grid.num_tokens):
                raise InputError(f"mask must have shape [N, L] = [{n}, {self.token_grid.num_tokens}] (True = removed, "
                                 f"tokens in {self.token_grid.token_shape} order), got {list(mask.shape)}")
            return masking_lib.masking_from_mask(mask.to(device), noise)
        return masking_lib.make_masking(self.config.mask_strategy, self.token_grid, n, mask_ratio, device, noise,
                                        min_block=self.config.mask_min_block)

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
        """Encode the visible tokens: latent [N, P+K, D] (or [N, P+L, D] with mask tokens in the encoder)."""
        self._check_input(imgs)
        x = self.patch_embed(imgs)  # [N, L, D]
        n, _, dim = x.shape
        m = self.make_masking(n, mask_ratio, noise, mask, x.device)
        pos, prefix = self.position_embedding(), self.num_prefix_tokens  # [1, P+L, D]
        if self.config.mask_in_encoder:
            removed = m.mask.unsqueeze(-1).bool()  # [N, L, 1]
            x = torch.where(removed, self.encoder_mask_token.to(x.dtype), x)
            x = x + pos[:, prefix:, :]
        else:
            x = x + pos[:, prefix:, :]
            x = torch.gather(x, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # [N, K, D], no copy of indices
        x = self._prepend_class_token(x, pos)
        x = self._run_blocks(self.blocks, x)
        return self.norm(x), m

    def _prepend_class_token(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[N, M, D] -> [N, P+M, D]: the class token with its position in front (nothing without one)."""
        if not self.num_prefix_tokens:
            return x
        cls = (self.cls_token + pos[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_decoder(self, latent: torch.Tensor, m: masking_lib.Masking) -> torch.Tensor:
        """Predict every token's target: [N, L, target_dim] (class token dropped)."""
        x = self.decoder_embed(latent)  # [N, P+K, d]
        prefix = self.num_prefix_tokens
        if not self.config.mask_in_encoder:
            n, length = m.ids_restore.shape
            mask_tokens = self.mask_token.to(x.dtype).expand(n, length + prefix - x.shape[1], -1)  # [N, L-K, d]
            x_ = torch.cat([x[:, prefix:, :], mask_tokens], dim=1)  # [N, L, d] in shuffle order
            x_ = torch.gather(x_, 1, m.ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # unshuffle
            x = torch.cat([x[:, :prefix, :], x_], dim=1) if prefix else x_  # [N, P+L, d]
        x = x + self.position_embedding(decoder=True)
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, prefix:, :]

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
        """Pixel-space reconstruction [N, C, H, W] (clips [N, C, T, H, W]) and the mask [N, L]. For
        normalised-pixel models each predicted patch is un-normalised with that patch's own mean and variance from the
        input (as the reference's demo)."""
        _, pred, m = self(imgs, mask_ratio, noise, mask)
        if self.token_grid.channel_groups:
            raise InputError("reconstructing a signal with channel groups is not supported: its tokens are per group")
        if self.config.target == "norm_pixel":
            target = self.patchify(imgs.float())
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred.float() * (var + 1e-6) ** 0.5 + mean
        elif self.config.target != "pixel":
            raise InputError(f"a model trained on '{self.config.target}' targets predicts no pixels to show")
        return self.unpatchify(pred.float()), m

    # ---------------------------------------------------------------- features
    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder on the whole input, no masking: [N, P+L, D], equal to timm's ``forward_features``."""
        self._check_input(imgs)
        pos = self.position_embedding()
        x = self.patch_embed(imgs) + pos[:, self.num_prefix_tokens:, :]
        x = self._run_blocks(self.blocks, self._prepend_class_token(x, pos))
        return self.norm(x)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm / reference key names (no decoder, no mask tokens)."""
        prefixes = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
        return {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style parameter groups: stem, then one group per encoder block."""
        return {"stem": r"^cls_token|^pos_embed|^patch_embed", "blocks": r"^blocks\.(\d+)"}


# Loading weights into an MAE (`mae.models.loading.load_weights`): a target's fitted buffers load when the file has
# them, and the fixed sin-cos tables are regenerated, not resized, for another grid.
register_weight_rules(MaskedAutoencoderViT, WeightRules(optional_prefixes=("target.",),
                                                      fixed_tables=("pos_embed", "decoder_pos_embed")))


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
