"""mae: Masked Autoencoders Are Scalable Vision Learners (He et al., 2021) in PyTorch.

    import mae
    model = mae.create_model("mae_vit_base_patch16", norm_pix_loss=True)
    loss, pred, mask = model(images, mask_ratio=0.75)
"""

from mae.errors import CheckpointError, ConfigError, DataError, InputError, MAEError
from mae.api import create_model
from mae.models import MAEConfig, MaskedAutoencoderViT, list_models, model_config

__version__ = "0.1.0"
__all__ = [
    "CheckpointError", "ConfigError", "DataError", "InputError", "MAEConfig", "MAEError", "MaskedAutoencoderViT",
    "create_model", "list_models", "model_config",
]
