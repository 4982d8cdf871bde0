"""Hugging Face transformers `VideoMAEForPreTraining`: state_dict key maps and config.json, both ways.

Our VideoMAE is a configuration of the one masked autoencoder (`mae.models.registry`, ``mae_videomae_vit_*``): 1-D
sin-cos positions without a class token, query / value biases only (the key third of our ``qkv.bias`` is zero), no
bias in ``decoder_embed`` (HF's ``encoder_to_decoder``) and VideoMAE's per-tubelet, per-channel target. Writing uses
the Hub layout (``MCG-NJU/videomae-*``: ``attention.attention.q_bias`` / ``v_bias``), which transformers 4.x reads
as it is and 5.x renames on load; reading also accepts 5.x names (``query.bias`` / ``value.bias``). HF keeps its
position tables out of the state_dict; ours are regenerated from the config. transformers is never imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mae.errors import CheckpointError
from mae.interop.huggingface import (
    BLOCK_TO_HF,
    KeyLayout,
    from_hf_keys,
    model_config,
    read_hf_config,
    to_hf_keys,
    write_hf_directory,
)
from mae.models.mae import MAEConfig
from mae.models.pos_embed import sinusoid_table

MODEL_TYPE = "videomae"
HF_WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"
TARGETS = {True: "videomae_norm_pixel", False: "videomae_pixel"}  # norm_pix_loss -> our target
DECODER_NORM_EPS = 1e-5  # HF's decoder.norm is a default nn.LayerNorm

_TOP_TO_HF = {
    "patch_embed.proj.weight": "videomae.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "videomae.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "videomae.layernorm.weight",
    "norm.bias": "videomae.layernorm.bias",
    "decoder_embed.weight": "encoder_to_decoder.weight",
    "mask_token": "mask_token",
    "decoder_norm.weight": "decoder.norm.weight",
    "decoder_norm.bias": "decoder.norm.bias",
    "decoder_pred.weight": "decoder.head.weight",
    "decoder_pred.bias": "decoder.head.bias",
}
_ATTENTION = "attention.attention."
_FIXED_TABLES = ("pos_embed", "decoder_pos_embed")

# VideoMAEConfig's own defaults (transformers 5.25), for the fields a config.json leaves out
_HF_DEFAULTS: dict[str, Any] = {
    "image_size": 224, "patch_size": 16, "num_channels": 3, "num_frames": 16, "tubelet_size": 2, "hidden_size": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
    "layer_norm_eps": 1e-12, "qv_bias": True, "use_mean_pooling": True, "decoder_num_attention_heads": 6,
    "decoder_hidden_size": 384, "decoder_num_hidden_layers": 4, "decoder_intermediate_size": 1536,
    "norm_pix_loss": True,
}


def _split_qkv(leaf: str, qkv: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``qkv.weight`` -> query / key / value rows; ``qkv.bias`` -> ``q_bias``, ``v_bias`` (its key third is zero)."""
    q, k, v = qkv.chunk(3, dim=0)
    if leaf == "weight":
        return [(f"{_ATTENTION}{name}.weight", t.clone()) for name, t in zip(("query", "key", "value"), (q, k, v),
                                                                                strict=True)]
    return [(f"{_ATTENTION}q_bias", q.clone()), (f"{_ATTENTION}v_bias", v.clone())]


def _join_qkv(prefix: str, _group: str, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Query / key / value weights (all three) and q / v biases (both or neither) -> ``qkv``, zero key bias."""
    if {"qw", "kw", "vw"} - set(p):
        raise CheckpointError(f"{prefix}: the file has attention {'/'.join(sorted(p))} but not all of the query, "
                              f"key and value weights")
    out = {"attn.qkv.weight": torch.cat([p["qw"], p["kw"], p["vw"]], dim=0)}
    if "qb" in p or "vb" in p:
        if {"qb", "vb"} - set(p):
            raise CheckpointError(f"{prefix}: the file has one of q_bias / v_bias but not both")
        out["attn.qkv.bias"] = torch.cat([p["qb"], torch.zeros_like(p["qb"]), p["vb"]], dim=0)
    return out


VIDEOMAE_KEYS = KeyLayout(
    model="VideoMAEForPreTraining", encoder="videomae.", top=_TOP_TO_HF, block_to_hf=BLOCK_TO_HF,
    block_from_hf={v: k for k, v in BLOCK_TO_HF.items()}, split_qkv=_split_qkv,
    qkv_parts={f"{_ATTENTION}{sub}": ("", part) for sub, part in (
        ("query.weight", "qw"), ("key.weight", "kw"), ("value.weight", "vw"), ("q_bias", "qb"), ("query.bias", "qb"),
        ("v_bias", "vb"), ("value.bias", "vb"))},
    join_qkv=_join_qkv, any_leaf=True,
)


def is_videomae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("videomae.", "encoder_to_decoder.")) for k in state_dict)


def is_video_config(config: MAEConfig) -> bool:
    """A clip model: written for transformers as a VideoMAE (the only video MAE transformers has)."""
    return config.token_grid.has_time


# ---------------------------------------------------------------------------------------------------- state_dict
def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor] | torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our key names -> `VideoMAEForPreTraining` Hub names. ``qkv.weight`` [3D, D] splits into query / key / value
    rows; ``qkv.bias`` into ``q_bias`` and ``v_bias`` (its key third, which our VideoMAE holds at zero, has no HF
    counterpart). The fixed position tables are dropped (HF builds its own); so are ``target.*`` buffers."""
    sd = state_dict.state_dict() if isinstance(state_dict, torch.nn.Module) else state_dict
    sd = {k: v for k, v in sd.items() if k not in _FIXED_TABLES}
    return to_hf_keys(VIDEOMAE_KEYS, sd)


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor], config: MAEConfig | None = None
                       ) -> dict[str, torch.Tensor]:
    """`VideoMAEForPreTraining` names (Hub ``q_bias`` / ``v_bias`` or 5.x ``query.bias`` / ``value.bias``) -> ours;
    query / key / value join into ``qkv`` with a zero key bias. With ``config``, the fixed 1-D sin-cos position
    tables (which HF does not store) are added. Keys without a counterpart pass through for the loader to report."""
    out = from_hf_keys(VIDEOMAE_KEYS, state_dict)
    if config is not None:
        tokens = config.token_grid.num_tokens
        out["pos_embed"] = sinusoid_table(config.embed_dim, tokens)
        out["decoder_pos_embed"] = sinusoid_table(config.decoder_embed_dim, tokens)
    return out


# ---------------------------------------------------------------------------------------------------- config.json
def _export_problems(config: MAEConfig) -> list[str]:
    """What `VideoMAEForPreTraining` cannot express about a config (empty: it can)."""
    checks = [
        (config.token_grid.has_time, "it takes clips (num_frames > 0)"),
        (not config.channel_groups, "it has no channel groups"),
        (config.pos_embed_type == "sincos_1d", "its positions are one fixed 1-D table (pos_embed_type sincos_1d)"),
        (not config.cls_token, "it has no class token (cls_token false)"),
        (not config.attn_k_bias, "it has query / value biases only (attn_k_bias false)"),
        (not config.decoder_embed_bias, "its encoder_to_decoder has no bias (decoder_embed_bias false)"),
        (config.target in TARGETS.values(), f"its target is videomae_(norm_)pixel, not '{config.target}'"),
        (config.decoder_norm_eps == DECODER_NORM_EPS, f"its decoder's final LayerNorm has eps {DECODER_NORM_EPS}"),
        (not config.mask_in_encoder, "it has no mask tokens in the encoder"),
        (config.image_hw[0] == config.image_hw[1], "it takes square frames"),
    ]
    return [what for ok, what in checks if not ok]


def hf_config_dict(config: MAEConfig) -> dict[str, Any]:
    """The ``config.json`` of `VideoMAEForPreTraining` for an MAE config; CheckpointError naming what it cannot
    express (see `_export_problems`)."""
    problems = _export_problems(config)
    if problems:
        raise CheckpointError(f"transformers' VideoMAEForPreTraining cannot hold this model: {'; '.join(problems)}")
    d, dd = config.embed_dim, config.decoder_embed_dim
    return {
        "architectures": ["VideoMAEForPreTraining"],
        "model_type": MODEL_TYPE,
        "image_size": config.image_hw[0], "patch_size": config.patch_size, "num_channels": config.in_chans,
        "num_frames": config.num_frames, "tubelet_size": config.tubelet_size,
        "hidden_size": d, "num_hidden_layers": config.depth, "num_attention_heads": config.num_heads,
        "intermediate_size": int(d * config.mlp_ratio), "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": config.norm_eps,
        "qv_bias": True, "use_mean_pooling": not config.encoder_norm,
        "decoder_num_attention_heads": config.decoder_num_heads, "decoder_hidden_size": dd,
        "decoder_num_hidden_layers": config.decoder_depth, "decoder_intermediate_size": int(dd * config.mlp_ratio),
        "norm_pix_loss": config.target == TARGETS[True],
    }


def config_from_hf(hf: Mapping[str, Any]) -> MAEConfig:
    """MAEConfig from a `VideoMAEConfig` dict (config.json); missing fields take VideoMAEConfig's defaults."""
    c, (image, patch, d, dd, mlp_ratio) = read_hf_config(hf, MODEL_TYPE, VIDEOMAE_KEYS.model, _HF_DEFAULTS,
                                                         "qv_bias", "VideoMAE")
    return MAEConfig(
        img_size=image, patch_size=patch, in_chans=int(c["num_channels"]), num_frames=int(c["num_frames"]),
        tubelet_size=int(c["tubelet_size"]), embed_dim=d, depth=int(c["num_hidden_layers"]),
        num_heads=int(c["num_attention_heads"]), mlp_ratio=mlp_ratio, decoder_embed_dim=dd,
        decoder_depth=int(c["decoder_num_hidden_layers"]), decoder_num_heads=int(c["decoder_num_attention_heads"]),
        norm_eps=float(c["layer_norm_eps"]), decoder_norm_eps=DECODER_NORM_EPS,
        target=TARGETS[bool(c["norm_pix_loss"])], pos_embed_type="sincos_1d", cls_token=False,
        attn_k_bias=False, encoder_norm=not c["use_mean_pooling"], decoder_embed_bias=False,
        mask_strategy="tube", mask_ratio=0.9,
    )


def save_hf_pretrained(state_dict: Mapping[str, torch.Tensor] | torch.nn.Module, directory: str | Path,
                       config: MAEConfig | None = None) -> Path:
    """Write a directory that ``VideoMAEForPreTraining.from_pretrained(directory)`` loads: model.safetensors in the
    Hub layout and config.json. ``config`` defaults to the model's own when a model is given."""
    config = model_config(state_dict, config)
    hf_config = hf_config_dict(config)  # validate before writing anything
    return write_hf_directory(directory, to_hf_state_dict(state_dict), hf_config, VIDEOMAE_KEYS.model)
