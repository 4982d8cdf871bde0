"""Export a fine-tuned classifier to timm and to transformers' `ViTForImageClassification`, and read it back.

- timm: the classifier *is* a timm ``VisionTransformer``; the export is its state_dict (a linear probe's
  BatchNorm + Linear head folded into one Linear) and loads with ``strict=True`` into
  ``VisionTransformer(**timm_classifier_kwargs(cfg))`` -- ``global_pool='avg'`` (with ``fc_norm``) or ``'token'``.
- transformers: only class-token pooled classifiers. ``ViTForImageClassification`` classifies the class token after
  the final LayerNorm; a mean-pool + ``fc_norm`` classifier has no exact counterpart there, so it raises
  CheckpointError instead of converting lossily. Written in the on-disk layout that ``save_pretrained`` writes
  (``vit.encoder.layer.i.attention.attention.query`` ..., ``vit.layernorm``, ``classifier``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mae.errors import CheckpointError
from mae.interop.huggingface import from_hf_state_dict, to_hf_state_dict
from mae.interop.keys import part_of
from mae.models.classifier import ClassifierConfig, fold_bn_head

__all__ = [
    "hf_classifier_config", "load_hf_classifier", "save_hf_classifier", "save_timm_classifier",
    "timm_classifier_kwargs", "to_hf_classifier_state_dict", "to_timm_classifier_state_dict",
]

HF_WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"


def _config_of(model: torch.nn.Module | None, config: ClassifierConfig | None) -> ClassifierConfig:
    config = config if config is not None else getattr(model, "classifier_config", None)
    if not isinstance(config, ClassifierConfig):
        raise CheckpointError("exporting a classifier needs its ClassifierConfig: build it with "
                              "mae.models.classifier.build_classifier or pass config=")
    return config


def _state_of(model_or_sd: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else dict(model_or_sd)
    return {k.removeprefix("module."): v.detach() for k, v in sd.items()}


def timm_classifier_kwargs(config: ClassifierConfig) -> dict[str, Any]:
    """``VisionTransformer`` / ``timm.create_model`` keyword arguments of the exported model (a Linear head)."""
    kwargs = config.timm_kwargs()
    kwargs.pop("drop_path_rate")  # a training setting, not part of the architecture
    return kwargs


def to_timm_classifier_state_dict(model_or_sd: torch.nn.Module | Mapping[str, torch.Tensor]
                                  ) -> dict[str, torch.Tensor]:
    """The classifier's state_dict for timm: unchanged names, a BatchNorm + Linear probe head folded into one Linear."""
    return fold_bn_head(_state_of(model_or_sd))


def save_timm_classifier(model: torch.nn.Module, path: str | Path, config: ClassifierConfig | None = None) -> Path:
    """Write the timm state_dict (``.safetensors`` or ``.pth``) and, next to it, ``<name>.json`` with the
    ``VisionTransformer`` keyword arguments that load it with ``strict=True``."""
    config = _config_of(model, config)
    path = Path(path)
    tensors = {k: v.cpu().contiguous() for k, v in to_timm_classifier_state_dict(model).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        from mae.interop.native import replace_atomically

        replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    else:
        from mae.train.checkpoint import atomic_save

        atomic_save(tensors, path)
    kwargs = timm_classifier_kwargs(config)
    kwargs.pop("norm_layer", None)
    kwargs["norm_eps"] = config.norm_eps
    path.with_suffix(".json").write_text(json.dumps(kwargs, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- transformers
def _check_hf(config: ClassifierConfig) -> None:
    if config.global_pool != "token" or config.uses_fc_norm:
        raise CheckpointError(
            f"this classifier pools with global_pool='{config.global_pool}'"
            f"{' + fc_norm' if config.uses_fc_norm else ''}; transformers' ViTForImageClassification classifies the "
            f"class token after the final norm and has no mean-pool + fc_norm equivalent: export it to timm instead, "
            f"or fine-tune with model.global_pool=token for a transformers model")
    if config.num_classes < 1:
        raise CheckpointError("this model has no classification head (num_classes=0); nothing to export to "
                              "ViTForImageClassification")


def hf_classifier_config(config: ClassifierConfig, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``config.json`` of `ViTForImageClassification` for a class-token pooled classifier."""
    _check_hf(config)
    names = list(class_names) if class_names is not None else [f"LABEL_{i}" for i in range(config.num_classes)]
    if len(names) != config.num_classes:
        raise CheckpointError(f"{len(names)} class names for a {config.num_classes}-class head")
    h, w = config.image_hw
    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": int(config.embed_dim * config.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": config.norm_eps,  # ViTConfig's default is 1e-12; MAE uses 1e-6
        "image_size": h if h == w else [h, w],
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": True,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
        "dtype": "float32",
    }


def to_hf_classifier_state_dict(model_or_sd: torch.nn.Module | Mapping[str, torch.Tensor],
                                config: ClassifierConfig | None = None) -> dict[str, torch.Tensor]:
    """Classifier state_dict -> `ViTForImageClassification` on-disk names (encoder as `to_hf_state_dict`, the head as
    ``classifier.*``)."""
    model = model_or_sd if isinstance(model_or_sd, torch.nn.Module) else None
    _check_hf(_config_of(model, config))
    sd = to_timm_classifier_state_dict(model_or_sd)
    out = to_hf_state_dict({k: v for k, v in sd.items() if part_of(k) == "encoder"})
    out["classifier.weight"], out["classifier.bias"] = sd["head.weight"], sd["head.bias"]
    return out


def save_hf_classifier(model: torch.nn.Module, directory: str | Path, config: ClassifierConfig | None = None,
                       class_names: Sequence[str] | None = None) -> Path:
    """Write a directory that ``ViTForImageClassification.from_pretrained(directory)`` loads with every key."""
    from safetensors.torch import save_file

    from mae.interop.native import replace_atomically

    config = _config_of(model, config)
    hf_config = hf_classifier_config(config, class_names)  # validates before writing anything
    tensors = {k: v.cpu().contiguous() for k, v in to_hf_classifier_state_dict(model, config).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    replace_atomically(directory / HF_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
    replace_atomically(directory / HF_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


def load_hf_classifier(directory: str | Path) -> tuple[dict[str, torch.Tensor], ClassifierConfig, list[str]]:
    """Read a `ViTForImageClassification` directory: (state_dict under timm names, its config, class names)."""
    from mae.interop.native import read_safetensors

    directory = Path(directory)
    try:
        hf = json.loads((directory / HF_CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{directory}' has no readable {HF_CONFIG_NAME} ({e})") from None
    if hf.get("model_type") != "vit":
        raise CheckpointError(f"'{directory}' holds a '{hf.get('model_type')}' model, expected 'vit' "
                              f"(ViTForImageClassification)")
    tensors, _ = read_safetensors(directory / HF_WEIGHTS_NAME)
    sd = from_hf_state_dict(tensors)
    if "classifier.weight" not in sd:
        raise CheckpointError(f"'{directory}' has no classifier.* weights: not a ViTForImageClassification")
    sd["head.weight"], sd["head.bias"] = sd.pop("classifier.weight"), sd.pop("classifier.bias")
    image = hf.get("image_size", 224)
    patch = hf.get("patch_size", 16)
    d = int(hf.get("hidden_size", 768))
    num_classes = sd["head.weight"].shape[0]
    config = ClassifierConfig(
        img_size=tuple(image) if isinstance(image, list) else int(image), patch_size=int(patch),
        in_chans=int(hf.get("num_channels", 3)), embed_dim=d, depth=int(hf.get("num_hidden_layers", 12)),
        num_heads=int(hf.get("num_attention_heads", 12)), mlp_ratio=int(hf.get("intermediate_size", 4 * d)) / d,
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)), num_classes=num_classes, global_pool="token")
    id2label = hf.get("id2label") or {}
    names = [str(id2label.get(str(i), i)) for i in range(num_classes)]
    return sd, config, names
