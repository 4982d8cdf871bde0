"""The top-level API: `create_model`, a registered architecture with weights from any checkpoint the library reads."""

from __future__ import annotations

from pathlib import Path

from mae.interop import load_checkpoint
from mae.models.mae import MaskedAutoencoderViT
from mae.models.registry import build_model

__all__ = ["create_model"]


def create_model(name: str, checkpoint_path: str | Path | None = None, **overrides) -> MaskedAutoencoderViT:
    """A registered MAE (`mae.models.build_model`: freshly initialised, any config field overridden), with weights
    from ``checkpoint_path`` when given: its own safetensors or run directories, the reference ``.pth``, a Hugging
    Face directory, a timm encoder state_dict, or released weights by name (``official:mae_pretrain_vit_base``,
    ``hf:facebook/vit-mae-base``: fetched once, then cached) (`mae.interop.load_checkpoint` says what it skipped)."""
    model = build_model(name, **overrides)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    return model
