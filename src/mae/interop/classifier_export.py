"""Export a fine-tuned classifier to timm and to transformers' `ViTForImageClassification`, and read it back.

- timm: the classifier *is* a timm ``VisionTransformer``; the export is its state_dict (a linear probe's
  BatchNorm + Linear head folded into one Linear) with timm's own ``config.json`` (written by timm's
  ``save_config_for_hf``: ``architecture``, ``model_args``, ``pretrained_cfg`` with input size, mean / std,
  interpolation, crop and label names). A directory loads with ``timm.create_model("local-dir:DIR",
  pretrained=True)``; a single file ``NAME.safetensors`` gets ``NAME.json`` (the model arguments plus
  ``pretrained_cfg``) and loads with ``timm.create_model(cfg["pretrained_cfg"]["architecture"], pretrained=True,
  pretrained_cfg_overlay={"file": "NAME.safetensors"}, **cfg)``. Both load strictly.
- transformers: only class-token pooled classifiers. ``ViTForImageClassification`` classifies the class token after
  the final LayerNorm; a mean-pool + ``fc_norm`` classifier has no exact counterpart there, so it raises
  CheckpointError instead of converting lossily. Written in the on-disk layout that ``save_pretrained`` writes
  (``vit.encoder.layer.i.attention.attention.query`` ..., ``vit.layernorm``, ``classifier``), with a
  ``preprocessor_config.json`` and a model card.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mae.data.transforms import eval_preprocessing
from mae.errors import CheckpointError
from mae.files import atomic_write_path, write_json
from mae.interop.hub_metadata import model_card, preprocessor_config, write_hub_metadata
from mae.interop.huggingface import HF_CONFIG_NAME, HF_WEIGHTS_NAME, from_hf_state_dict, to_hf_state_dict
from mae.interop.keys import part_of
from mae.interop.native import read_safetensors, replace_atomically
from mae.models.classifier import ClassifierConfig, fold_bn_head
from mae.train.checkpoint import atomic_save

__all__ = [
    "hf_classifier_config", "load_hf_classifier", "save_hf_classifier", "save_timm_classifier",
    "timm_architecture", "timm_classifier_kwargs", "timm_export_config", "to_hf_classifier_state_dict",
    "to_timm_classifier_state_dict",
]

TIMM_WEIGHTS_NAME = "model.safetensors"
TIMM_CONFIG_NAME = "config.json"
# (width, depth, heads) -> timm's ViT size name
_VIT_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large",
              (1280, 32, 16): "huge"}
_FALLBACK_ARCHITECTURE = "vit_base_patch16_224"


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


# ---------------------------------------------------------------------------------------------------- timm
def timm_architecture(config: ClassifierConfig) -> str:
    """The timm registry name of this ViT when timm has it (``vit_base_patch16_224`` ...), else a generic ViT name:
    the exported ``model_args`` set every architecture field, so the name only picks timm's defaults."""
    import timm  # heavy (about a second): only the timm export needs it

    size = _VIT_SIZES.get((config.embed_dim, config.depth, config.num_heads))
    h, w = config.image_hw
    if size is not None and h == w:
        for name in (f"vit_{size}_patch{config.patch_size}_{h}", f"vit_{size}_patch{config.patch_size}_224"):
            if timm.is_model(name):
                return name
    return _FALLBACK_ARCHITECTURE


def _timm_model_args(config: ClassifierConfig) -> dict[str, Any]:
    """JSON-ready ``create_model`` keyword arguments (timm records them as the model's ``model_args``)."""
    if config.norm_eps != 1e-6:
        raise CheckpointError(f"this classifier uses LayerNorm eps {config.norm_eps:g}; timm's config.json can only "
                              f"describe its ViT default 1e-6 (a norm_layer object is not JSON); export it to 'hf' "
                              f"instead, or rebuild it with norm_eps 1e-6")
    kwargs = timm_classifier_kwargs(config)
    kwargs["fc_norm"] = config.uses_fc_norm  # explicit: timm's None default would be left out of model_args
    h, w = config.image_hw
    kwargs["img_size"] = h if h == w else [h, w]
    return kwargs


def timm_export_config(model_or_config: torch.nn.Module | ClassifierConfig,
                       class_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, crop_pct: float | None = None,
                       state_dict: Mapping[str, torch.Tensor] | None = None,
                       training: Mapping[str, Any] | None = None, license: str = "unknown") -> dict[str, Any]:
    """timm's ``config.json`` for the exported classifier, written by timm itself (``save_config_for_hf``) from a
    shapes-only timm model: ``architecture``, ``num_classes``, ``label_names``, ``model_args`` and a
    ``pretrained_cfg`` with our evaluation preprocessing (mean / std default to ImageNet's for RGB, 0.5 for grey;
    crop_pct to 0.875, 1.0 for images of 32 px or less), the `license` when known and the `training` facts
    (`mae.interop.hub_metadata.run_facts`: data, epochs, the released weights it started from) as its ``notes``,
    fields timm's ``PretrainedCfg`` has. With `state_dict`, its keys and shapes must equal the timm model's
    (strict)."""
    import timm  # heavy (about a second): only the timm export needs it
    from timm.models._hub import save_config_for_hf

    config = model_or_config if isinstance(model_or_config, ClassifierConfig) else _config_of(model_or_config, None)
    args = _timm_model_args(config)
    h, w = config.image_hw
    prep = eval_preprocessing(max(h, w), config.in_chans, crop_pct, mean, std)
    architecture = timm_architecture(config)
    pretrained_cfg = {
        "architecture": architecture, "tag": "mae", "input_size": (config.in_chans, h, w),
        "fixed_input_size": True, "interpolation": prep["interpolation"], "crop_pct": prep["crop_pct"],
        "crop_mode": prep["crop_mode"], "mean": prep["mean"], "std": prep["std"], "num_classes": config.num_classes,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "paper_name": "Masked Autoencoders Are Scalable Vision Learners", "paper_ids": "arXiv:2111.06377",
        **({"license": license} if license and license != "unknown" else {}),
        **({"notes": tuple(f"{k}: {v}" for k, v in training.items())} if training else {}),
    }
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        vit = timm.create_model(architecture, pretrained=False, pretrained_cfg=pretrained_cfg, **args)
    if state_dict is not None:
        theirs = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in state_dict.items()}
        if theirs != ours:
            bad = sorted(set(theirs) ^ set(ours)) or [k for k in theirs if theirs[k] != ours[k]]
            raise CheckpointError(f"the classifier does not match timm's {architecture} with {args}: "
                                  f"{', '.join(bad[:4])}")
    if class_names is not None and len(class_names) != config.num_classes:
        raise CheckpointError(f"{len(class_names)} class names for a {config.num_classes}-class head")
    model_config = {"label_names": [str(n) for n in class_names]} if class_names else None
    data_config = {k: prep[k] for k in ("mean", "std", "crop_pct", "interpolation", "crop_mode")}
    data_config["input_size"] = (config.in_chans, h, w)
    with tempfile.TemporaryDirectory() as tmp:
        save_config_for_hf(vit, str(Path(tmp) / TIMM_CONFIG_NAME), model_config=model_config,
                           data_config=data_config)
        return json.loads((Path(tmp) / TIMM_CONFIG_NAME).read_text())


def save_timm_classifier(model: torch.nn.Module, path: str | Path, config: ClassifierConfig | None = None,
                         class_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None, crop_pct: float | None = None,
                         training: Mapping[str, Any] | None = None, license: str = "unknown") -> Path:
    """Write the classifier for timm; returns `path`.

    - `path` without a suffix: a directory in timm's own layout, ``config.json`` + ``model.safetensors``:
      ``timm.create_model("local-dir:PATH", pretrained=True)``.
    - ``NAME.safetensors`` or ``NAME.pth``: that file and ``NAME.json`` = the ``create_model`` keyword arguments plus
      ``pretrained_cfg``: ``timm.create_model(cfg["pretrained_cfg"]["architecture"], pretrained=True,
      pretrained_cfg_overlay={"file": "NAME.safetensors"}, **cfg)``.

    `class_names`, `mean`, `std`, `crop_pct`, `license` and the `training` facts go into timm's ``pretrained_cfg``
    (see `timm_export_config`), as `save_hf_classifier` puts them in its model card.
    """
    config = _config_of(model, config)
    path = Path(path)
    tensors = {k: v.cpu().contiguous() for k, v in to_timm_classifier_state_dict(model).items()}
    hub = timm_export_config(config, class_names, mean, std, crop_pct, state_dict=tensors, training=training,
                             license=license)
    if not path.suffix:
        _save_tensors(tensors, path / TIMM_WEIGHTS_NAME)
        write_json(path / TIMM_CONFIG_NAME, hub)
        return path
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise CheckpointError(f"a timm export is a directory, a .safetensors or a .pth file, got '{path}'")
    _save_tensors(tensors, path)
    flat = dict(hub["model_args"])
    flat["pretrained_cfg"] = {"architecture": hub["architecture"], **hub["pretrained_cfg"]}
    if hub.get("label_names"):
        flat["pretrained_cfg"]["label_names"] = hub["label_names"]
    write_json(path.with_suffix(".json"), flat)
    return path


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        return atomic_write_path(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return atomic_save(tensors, path)


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
                       class_names: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, crop_pct: float | None = None,
                       training: Mapping[str, Any] | None = None, license: str = "unknown") -> Path:
    """Write a directory that ``ViTForImageClassification.from_pretrained(directory)`` loads with every key, with a
    ``preprocessor_config.json`` (``AutoImageProcessor.from_pretrained(directory)``: our evaluation transform, with
    `mean` / `std` / `crop_pct`) and a model card (`training`: what is known of the pre-training, see
    `mae.interop.hub_metadata.run_facts`)."""
    config = _config_of(model, config)
    hf_config = hf_classifier_config(config, class_names)  # validates before writing anything
    tensors = {k: v.cpu().contiguous() for k, v in to_hf_classifier_state_dict(model, config).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    replace_atomically(directory / HF_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
    replace_atomically(directory / HF_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    h, w = config.image_hw
    architecture = {"model": "ViTForImageClassification (class-token pooling)",
                    "image size": f"{h} x {w}", "patch size": config.patch_size, "channels": config.in_chans,
                    "width": config.embed_dim, "depth": config.depth, "heads": config.num_heads,
                    "classes": config.num_classes}
    usage = (f"from transformers import AutoImageProcessor, ViTForImageClassification\n"
             f"processor = AutoImageProcessor.from_pretrained(\"{directory.name}\")\n"
             f"model = ViTForImageClassification.from_pretrained(\"{directory.name}\")\n"
             f"logits = model(**processor(images=image, return_tensors=\"pt\")).logits")
    card = model_card("MAE fine-tuned ViT classifier", architecture, usage, "image-classification", training,
                      license)
    write_hub_metadata(directory, preprocessor_config(config.img_size, config.in_chans, crop_pct, mean, std), card)
    return directory


def load_hf_classifier(directory: str | Path) -> tuple[dict[str, torch.Tensor], ClassifierConfig, list[str]]:
    """Read a `ViTForImageClassification` directory: (state_dict under timm names, its config, class names)."""
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
