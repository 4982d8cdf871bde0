"""Models: the masked autoencoder, its masking strategies, targets, position tables and registry."""

from mae.models.mae import MAEConfig, MaskedAutoencoderViT
from mae.models.registry import ARCHITECTURES, build_model, list_models, model_config

__all__ = ["ARCHITECTURES", "MAEConfig", "MaskedAutoencoderViT", "build_model", "list_models", "model_config"]
