"""timm `VisionTransformer` interop: the encoder's state_dict already uses timm's key names.

Recipe (strict loading, no head)::

    sd = mae.interop.encoder_for_timm(model)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)  # or **timm_vit_kwargs(cfg)
    vit.load_state_dict(sd, strict=True)
    vit.reset_classifier(1000)  # then add a fresh head for fine-tuning

A timm model built with a head (``num_classes > 0``) reports exactly ``head.weight`` / ``head.bias`` as missing
under ``strict=False``. A timm model with ``global_pool='avg'`` has ``fc_norm`` instead of ``norm`` (the
reference fine-tuning layout); build it with the default token pooling to load a pre-trained MAE encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from mae.interop.keys import part_of, select
from mae.models.mae import MAEConfig


def encoder_for_timm(state_dict: Mapping[str, torch.Tensor] | torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder under timm names (cls_token, pos_embed, patch_embed, blocks, norm; fc_norm / head too when the
    source is a fine-tuned classifier), detached but not copied. Decoder and mask token are left out: timm's ViT
    has no place for them."""
    sd = state_dict.state_dict() if isinstance(state_dict, torch.nn.Module) else state_dict
    encoder = {k: v for k, v in sd.items() if part_of(k) != "decoder"}
    kept = select(encoder, ("encoder", "head"), "a timm VisionTransformer")
    return {k: v.detach() for k, v in kept.items()}


def timm_vit_kwargs(config: MAEConfig, num_classes: int = 0) -> dict[str, Any]:
    """Keyword arguments of ``timm.models.vision_transformer.VisionTransformer`` (or ``timm.create_model``) for a
    ViT whose state_dict is exactly this MAE's encoder."""
    kwargs: dict[str, Any] = {
        "img_size": config.img_size, "patch_size": config.patch_size, "in_chans": config.in_chans,
        "embed_dim": config.embed_dim, "depth": config.depth, "num_heads": config.num_heads,
        "mlp_ratio": config.mlp_ratio, "qkv_bias": True, "class_token": True, "global_pool": "token",
        "num_classes": num_classes,
    }
    if config.norm_eps != 1e-6:  # timm's ViT default LayerNorm eps is 1e-6
        kwargs["norm_layer"] = partial(torch.nn.LayerNorm, eps=config.norm_eps)
    return kwargs
