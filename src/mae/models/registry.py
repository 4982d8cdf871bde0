"""Named architectures, timm style: ``build_model(name, **overrides)`` builds one with fresh weights. This layer
imports nothing above it; the public ``mae.create_model(name, checkpoint_path=...)`` is `build_model` plus weights
from any format (`mae.interop.load_checkpoint`)."""

from __future__ import annotations

import difflib
import fnmatch

from mae.errors import ConfigError
from mae.models.mae import MAEConfig, MaskedAutoencoderViT, config_fields

# Encoder widths of the ViT family (ViT-Tiny/Small as in DeiT; Base/Large/Huge as in the paper; 2B and 6.5B for FSDP).
_ENCODERS = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "huge": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
    # Beyond the paper, for model-scale runs (distributed.strategy=fsdp): ViT-2B (1.9 B encoder parameters) and
    # ViT-6.5B (6.4 B), MLP 4x wide (10240 / 16384), meant for patch 14.
    "2b": {"embed_dim": 2560, "depth": 24, "num_heads": 32},
    "6.5b": {"embed_dim": 4096, "depth": 32, "num_heads": 32},
}
_PAPER_DECODER = {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}
# Named decoder variants of paper Table 1a/1b: suffix -> decoder fields.
_DECODERS = {
    "": _PAPER_DECODER,
    "_dec512d8b": _PAPER_DECODER,
    "_dec512d1b": {"decoder_embed_dim": 512, "decoder_depth": 1, "decoder_num_heads": 16},
    "_dec512d2b": {"decoder_embed_dim": 512, "decoder_depth": 2, "decoder_num_heads": 16},
    "_dec512d4b": {"decoder_embed_dim": 512, "decoder_depth": 4, "decoder_num_heads": 16},
    "_dec256d8b": {"decoder_embed_dim": 256, "decoder_depth": 8, "decoder_num_heads": 8},
}

ARCHITECTURES: dict[str, dict] = {
    f"mae_vit_{size}_patch{patch}{suffix}": dict(patch_size=patch, img_size=224, **enc, **dec)
    for size, enc in _ENCODERS.items()
    for patch in (16, 14)
    for suffix, dec in _DECODERS.items()
}
# A model small enough to pre-train on a laptop CPU in minutes (28 x 28 grayscale digits, 7 x 7 patches of 4).
ARCHITECTURES["mae_vit_micro_patch4_28"] = {
    "img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 128, "depth": 6, "num_heads": 4,
    "decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4,
}
# The CPU demo's model (`make demo`): the micro model with 4 encoder blocks instead of 6 and MLPs 2x wide instead of
# 4x: fewer FLOPs, a faster step, and after the same 40 epochs as good a linear probe (the figures, with two seeds:
# docs/benchmarks.md, "The demo's recipe").
ARCHITECTURES["mae_vit_nano_patch4_28"] = {
    "img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0,
    "decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4,
}

# VideoMAE (Tong et al., 2022) on this core, as Hugging Face's VideoMAEForPreTraining computes it: 16 frames of 224^2 in
# 2 x 16 x 16 tubelets, one fixed 1-D sin-cos table over all tokens (encoder and decoder), no class token, tube masking
# at 90%, a decoder half as wide with 4 blocks, no bias in the encoder-to-decoder projection, query / value biases
# only, LayerNorm eps 1e-12 (the decoder's final one 1e-5), and VideoMAE's per-tubelet, per-channel target.
_VIDEOMAE = {"num_frames": 16, "tubelet_size": 2, "img_size": 224, "patch_size": 16, "pos_embed_type": "sincos_1d",
             "cls_token": False, "mask_strategy": "tube", "mask_ratio": 0.9, "attn_k_bias": False,
             "decoder_embed_bias": False, "norm_eps": 1e-12, "decoder_norm_eps": 1e-5, "decoder_depth": 4,
             "target": "videomae_norm_pixel"}
for _size in ("base", "large", "huge"):
    _enc = _ENCODERS[_size]
    ARCHITECTURES[f"mae_videomae_vit_{_size}_patch16_t16"] = {
        **_VIDEOMAE, **_enc, "decoder_embed_dim": _enc["embed_dim"] // 2, "decoder_num_heads": _enc["num_heads"] // 2}
# Its CPU-size sibling for tests: 8 frames of 32 x 32, 2 x 8 x 8 tubelets (4 x 4 x 4 = 64 tokens).
ARCHITECTURES["mae_videomae_vit_micro_patch8_t8"] = {
    **_VIDEOMAE, "num_frames": 8, "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4,
    "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}


# MAE-ST (Feichtenhofer et al., 2022, "Masked Autoencoders As Spatiotemporal Learners") on this core: 16 frames of
# 224^2 in 2 x 16 x 16 tubelets (8 x 14 x 14 = 1568 tokens), separable learned positions (a spatial table tiled over
# time plus a temporal table repeated over space, and the class token's own row; the decoder has its own), random
# masking over all space-time tokens at 90%, a 512-wide decoder of 4 blocks (its PRETRAIN.md; the code's default is
# 8), LayerNorm eps 1e-6, and its target: one frame per tubelet, normalised per patch (`maest_norm_pixel`).
_MAEST = {"num_frames": 16, "tubelet_size": 2, "img_size": 224, "patch_size": 16, "pos_embed_type": "separable",
          "cls_token": True, "mask_strategy": "random", "mask_ratio": 0.9, "norm_eps": 1e-6,
          "decoder_embed_dim": 512, "decoder_depth": 4, "decoder_num_heads": 16, "target": "maest_norm_pixel"}
for _size in ("base", "large", "huge"):
    ARCHITECTURES[f"mae_maest_vit_{_size}_patch16_t16"] = {**_MAEST, **_ENCODERS[_size]}
# Its CPU-size sibling for tests: 8 frames of 32 x 32, 2 x 8 x 8 tubelets (4 x 4 x 4 = 64 tokens).
ARCHITECTURES["mae_maest_vit_micro_patch8_t8"] = {
    **_MAEST, "num_frames": 8, "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4,
    "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, e.g. ``list_models('*large*')``."""
    return sorted(n for n in ARCHITECTURES if fnmatch.fnmatch(n, pattern))


def model_config(name: str, **overrides) -> MAEConfig:
    """The architecture config of a registered name, with any field overridden."""
    if name not in ARCHITECTURES:
        close = difflib.get_close_matches(name, ARCHITECTURES, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `mae models` for the list"
        raise ConfigError(f"unknown model '{name}'{hint}")
    unknown = sorted(set(overrides) - set(config_fields()))
    if unknown:
        close = difflib.get_close_matches(unknown[0], config_fields(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (valid: {', '.join(config_fields())})"
        raise ConfigError(f"unknown model field '{unknown[0]}'{hint}")
    return MAEConfig(**ARCHITECTURES[name]).replace(**overrides)


def build_model(name: str, **overrides) -> MaskedAutoencoderViT:
    """A registered MAE with freshly initialised weights (what ``mae.create_model`` builds before it loads a
    checkpoint)."""
    if "checkpoint_path" in overrides:
        raise ConfigError("build_model builds fresh weights; load a checkpoint with "
                          "mae.create_model(name, checkpoint_path=...)")
    return MaskedAutoencoderViT(model_config(name, **overrides))
