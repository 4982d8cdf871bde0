"""The top-level API: `create_model` with weights from any checkpoint the library reads."""

from __future__ import annotations

from pathlib import Path

from mae.interop import load_weights_into
from mae.models import registry
from mae.models.mae import MaskedAutoencoderViT

__all__ = ["create_model"]


def create_model(name: str, checkpoint_path: str | Path | None = None, **overrides) -> MaskedAutoencoderViT:
    """Build a registered MAE (`mae.models.create_model`), optionally loading weights from any checkpoint the
    library reads: its own safetensors or run directories, the reference ``.pth``, a Hugging Face directory, a timm
    encoder state_dict (`mae.interop.load_weights_into` says what it skipped)."""
    model = registry.create_model(name, **overrides)
    if checkpoint_path is not None:
        load_weights_into(model, checkpoint_path)
    return model
