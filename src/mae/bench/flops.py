"""FLOPs of an MAE training step: an analytic count, and a measured one with ``torch.utils.flop_counter``.

Only matrix products are counted (linear layers, the patch convolution, the two attention products), as in
the usual MFU accounting: LayerNorm, GELU, softmax and the loss are a few percent of the work at most and no
hardware peak counts them. A multiply-add is 2 FLOPs. Training is 3x the forward pass (the backward pass
computes gradients of inputs and of weights, each as expensive as the forward product).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mae.models.mae import MAEConfig, MaskedAutoencoderViT
from mae.models.masking import num_kept
from mae.models.targets import build_target

TRAIN_FACTOR = 3  # forward + backward (grad of inputs + grad of weights)


@dataclass
class FlopBreakdown:
    """Forward FLOPs of one image, by part; ``train`` = 3 x ``forward``."""

    patch_embed: float
    encoder: float  # transformer blocks of the encoder (matmuls + attention)
    encoder_attention: float  # the attention products inside `encoder`
    decoder: float  # decoder_embed + decoder blocks + decoder_pred
    decoder_attention: float
    encoder_tokens: int  # tokens the encoder processes (1 + kept, or 1 + L with mask tokens in the encoder)
    decoder_tokens: int

    @property
    def forward(self) -> float:
        return self.patch_embed + self.encoder + self.decoder

    @property
    def train(self) -> float:
        return TRAIN_FACTOR * self.forward

    def to_dict(self) -> dict:
        return {**asdict(self), "forward": self.forward, "train": self.train}


def _block_flops(tokens: int, width: int, mlp_ratio: float) -> tuple[float, float]:
    """(all, attention-only) forward FLOPs of one pre-norm Transformer block over `tokens` tokens."""
    hidden = int(width * mlp_ratio)
    linear = 2 * tokens * (width * 3 * width + width * width + 2 * width * hidden)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * tokens * tokens * width  # q @ k^T and attn @ v over all heads
    return float(linear + attention), float(attention)


def mae_flops(cfg: MAEConfig, mask_ratio: float | None = None) -> FlopBreakdown:
    """Analytic forward FLOPs per image of `cfg` at `mask_ratio` (default: the config's).

    The MAE encoder runs on the class token + kept patches only; with ``mask_in_encoder`` (paper Table 1c) it runs
    on every patch, and the decoder then embeds all of them. The decoder always runs on 1 + L tokens.
    """
    ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
    grid, prefix = cfg.token_grid, int(cfg.cls_token)
    length = grid.num_tokens
    enc_tokens = prefix + (length if cfg.mask_in_encoder else num_kept(length, ratio))
    dec_tokens = prefix + length
    p, c = cfg.patch_size, cfg.in_chans
    patch_embed = 2.0 * grid.num_patches * grid.patch_dim() * cfg.embed_dim  # every channel once per place
    block, attn = _block_flops(enc_tokens, cfg.embed_dim, cfg.mlp_ratio)
    dblock, dattn = _block_flops(dec_tokens, cfg.decoder_embed_dim, cfg.mlp_ratio)
    target_dim = build_target(cfg.target, p, c, **cfg.target_options()).dim
    decoder = (2.0 * enc_tokens * cfg.embed_dim * cfg.decoder_embed_dim  # decoder_embed
               + cfg.decoder_depth * dblock
               + 2.0 * dec_tokens * cfg.decoder_embed_dim * target_dim)  # decoder_pred
    return FlopBreakdown(patch_embed=patch_embed, encoder=cfg.depth * block, encoder_attention=cfg.depth * attn,
                         decoder=decoder, decoder_attention=cfg.decoder_depth * dattn,
                         encoder_tokens=enc_tokens, decoder_tokens=dec_tokens)


def table1c_ratio(cfg: MAEConfig) -> dict:
    """Paper Table 1c: FLOPs of the encoder-with-mask-tokens variant over the MAE's, whole model (paper: 3.3x)."""
    mae = mae_flops(cfg.replace(mask_in_encoder=False))
    with_tokens = mae_flops(cfg.replace(mask_in_encoder=True))
    return {"mae_gflops": mae.forward / 1e9, "mask_tokens_gflops": with_tokens.forward / 1e9,
            "ratio": with_tokens.forward / mae.forward, "paper_ratio": 3.3,
            "encoder_ratio": with_tokens.encoder / mae.encoder}


# ---------------------------------------------------------------------------------------------------------------------
# measured with torch.utils.flop_counter
# ---------------------------------------------------------------------------------------------------------------------


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    # grad_v, grad_p (= grad_out @ v^T), grad_q, grad_k: four products of the forward's size
    return 2 * _sdpa_cpu_flops(query_shape, key_shape, value_shape)


def _counter() -> FlopCounterMode:
    """A FlopCounterMode that also knows the CPU flash-attention kernels (missing from torch's own table)."""
    aten = torch.ops.aten
    mapping: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def counted_flops(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float | None = None,
                  backward: bool = True) -> dict:
    """FLOPs per image of encoder + decoder (+ backward) on `imgs`, counted op by op by FlopCounterMode.

    Works on the meta device (no memory, no compute), so it can count ViT-L / ViT-H in tests. The loss is left
    out (a mean of squares: no matrix product), which also keeps autocast (unsupported on meta) out.
    """
    ratio = model.config.mask_ratio if mask_ratio is None else mask_ratio
    with _counter() as counter:
        latent, masking = model.forward_encoder(imgs, ratio)
        pred = model.forward_decoder(latent, masking)
        forward = counter.get_total_flops()
        if backward:
            pred.float().pow(2).mean().backward()
    total = counter.get_total_flops()
    n = imgs.shape[0]
    return {"forward": forward / n, "train": total / n,
            "by_op": {str(k): v / n for k, v in counter.get_flop_counts().get("Global", {}).items()}}
