"""mae: Masked Autoencoders Are Scalable Vision Learners (He et al., 2021) in PyTorch.

    import mae
    model = mae.create_model("mae_vit_base_patch16", norm_pix_loss=True)
    loss, pred, mask = model(images, mask_ratio=0.75)
    classifier, config, class_names = mae.load_classifier("runs/finetune")

Importing ``mae`` is cheap: the names below that need torch are imported on first use (module ``__getattr__``), so
``mae --help`` and ``mae --version`` start without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mae.errors import CheckpointError, ConfigError, DataError, InputError, MAEError
from mae.version import __version__ as __version__  # a re-export: `mae.__version__`

# public name -> module that defines it (imported lazily)
_LAZY = {
    "MAEConfig": "mae.models",
    "MaskedAutoencoderViT": "mae.models",
    "create_model": "mae.api",
    "list_models": "mae.models",
    "model_config": "mae.models",
    "load_classifier": "mae.interop.classifier_io",
}

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "InputError", "MAEConfig", "MAEError", "MaskedAutoencoderViT",
    "create_model", "list_models", "load_classifier", "model_config",
]

if TYPE_CHECKING:
    from mae.api import create_model
    from mae.interop.classifier_io import load_classifier
    from mae.models import MAEConfig, MaskedAutoencoderViT, list_models, model_config


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mae' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
