"""Classifier files: what a finetune / linprobe checkpoint holds (`classifier_state`), reading any classifier back
(`load_classifier`: run directories, their checkpoints, timm and transformers exports, fine-tuned state_dicts) and
telling a classifier from a pre-trained MAE (`is_classifier_checkpoint`).

It lives in interop, the layer that reads every checkpoint format, so that the exporters and converters read
classifiers without reaching up into the recipes that write them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from mae.errors import CheckpointError
from mae.interop.classifier_export import load_hf_classifier
from mae.interop.infer import check_model_name, infer_config
from mae.interop.keys import short_list
from mae.interop.native import read_safetensors
from mae.models.classifier import ClassifierConfig, build_classifier
from mae.models.pos_embed import resize_pos_embed
from mae.train.checkpoint import safe_load
from mae.train.checkpoint_formats import FORMAT_BY_KIND
from mae.train.checkpoint_kinds import describe
from mae.train.dcp import is_dcp_checkpoint, read_meta
from mae.train.run_dir import is_run_dir, local_path, released_weights, resolve_run
from mae.weights import ResolvedWeights

__all__ = ["CLASSIFIER_FORMAT", "classifier_state", "imagenet_class_names", "is_classifier_checkpoint",
           "load_classifier", "released_class_names"]

CLASSIFIER_FORMAT = FORMAT_BY_KIND["classify"]
"""The ``format`` entry of the checkpoints of the classification recipes (finetune, linprobe)."""


def classifier_state(model: nn.Module, classifier_config: ClassifierConfig, class_names: list[str],
                     **extra: Any) -> dict[str, Any]:
    """The dict a classifier checkpoint holds (weights-only loadable): weights, architecture, class names."""
    return {"format": CLASSIFIER_FORMAT, "model": model.state_dict(), "classifier_config": classifier_config.to_dict(),
            "class_names": list(class_names), **extra}


def load_classifier(path: str | Path, img_size: int | tuple[int, int] | None = None, use_ema: bool | None = None,
                    model_name: str | None = None, strict_name: bool = False
                    ) -> tuple[nn.Module, ClassifierConfig, list[str] | None]:
    """A classifier from a finetune / linprobe run directory (`resolve_run`: its best checkpoint once finished, else
    its newest), one of their checkpoints, an exported timm file (with its ``.json``), a `ViTForImageClassification`
    directory, or a timm / reference fine-tuned state_dict (``fc_norm`` + ``head``). ``img_size`` rebuilds it at
    another resolution (the position table is interpolated, bicubic). ``use_ema`` None takes the EMA weights of a run
    checkpoint when they were the best. ``model_name`` picks the architecture of files that store none; one that
    contradicts a stored architecture is a warning (`mae.interop.infer.check_model_name`), or an error with
    ``strict_name``. A released-weights name (``official:mae_finetuned_vit_base``) reads as its cached file; a
    1000-class release comes with the ImageNet-1k class names (`imagenet_class_names`). Returns (model in eval mode,
    its config, class names or None)."""
    weights = released_weights(path)
    path = resolve_run(weights.path if weights is not None else path)
    names: list[str] | None = None
    config: ClassifierConfig | None
    if path.is_dir() and (path / "config.json").is_file():
        sd, config, names = load_hf_classifier(path)
    else:
        config = None
        if path.suffix == ".safetensors":
            sd, _ = read_safetensors(path)
            sidecar = path.with_suffix(".json")
            if sidecar.is_file():
                kwargs = json.loads(sidecar.read_text())
                config = ClassifierConfig(
                    img_size=kwargs["img_size"], patch_size=kwargs["patch_size"], in_chans=kwargs["in_chans"],
                    embed_dim=kwargs["embed_dim"], depth=kwargs["depth"], num_heads=kwargs["num_heads"],
                    mlp_ratio=kwargs["mlp_ratio"], norm_eps=kwargs.get("norm_eps", 1e-6),
                    num_classes=kwargs["num_classes"], global_pool=kwargs["global_pool"], fc_norm=kwargs["fc_norm"])
        else:
            state = safe_load(path)
            if state.get("format") == CLASSIFIER_FORMAT:
                config = ClassifierConfig.from_dict(state["classifier_config"])
                names = state.get("class_names")
                if use_ema is None:  # the best checkpoint's own record says whether its EMA weights were the best
                    best = (state.get("train_state") or {}).get("best") or {}
                    use_ema = bool(best.get("ema", state.get("best_is_ema")))
                key = "model_ema" if use_ema else "model"
                if state.get(key) is None:
                    raise CheckpointError(f"'{path}' holds no EMA weights (the run had ema=false); use use_ema=false")
                sd = state[key]
            else:
                sd = state.get("model", state.get("state_dict", state))
                sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        if config is None:
            config = _infer_classifier_config(sd, path, model_name)
            model_name = None  # it chose the architecture: nothing to contradict
    if names is None and weights is not None:
        names = released_class_names(weights, config.num_classes)
    check_model_name(config, model_name, f"'{path}'", strict=strict_name)
    stored_grid = config.grid_size
    if img_size is not None:
        config = ClassifierConfig.from_dict({**config.to_dict(), "img_size": img_size})
    model = build_classifier(config)
    if "pos_embed" in sd and tuple(stored_grid) != tuple(config.grid_size):
        sd = {**sd, "pos_embed": resize_pos_embed(sd["pos_embed"], stored_grid, config.grid_size)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"'{path}' does not fit the classifier it describes: missing {short_list(missing)}; "
                              f"unexpected {short_list(unexpected)}")
    return model.eval(), config, names


def released_class_names(weights: ResolvedWeights, num_classes: int) -> list[str] | None:
    """The class names of a released classifier: the ImageNet-1k WordNet ids (the class folder names of ImageNet,
    so `mae evaluate` matches them to an ImageNet val folder by name) for a 1000-class head; else None."""
    entry = weights.entry
    if num_classes == 1000 and (entry is None or entry.num_classes == 1000):
        return imagenet_class_names()
    return None


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class ids in the order of the released classifiers' outputs, as timm ships them."""
    from timm.data import ImageNetInfo  # timm is slow to import: only a released classifier needs its class list

    return [str(n) for n in ImageNetInfo("imagenet-1k").label_names()]


def _infer_classifier_config(sd: dict[str, torch.Tensor], path: Path, model_name: str | None) -> ClassifierConfig:
    if "head.weight" not in sd and "head.1.weight" not in sd:
        raise CheckpointError(f"{describe(path)}: it has no classifier head (head.weight); fine-tune it first "
                              f"(mae finetune) or probe it (mae linprobe / mae knn)")
    encoder = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    mae_config = infer_config(encoder, model_name)
    bn = "head.1.weight" in sd
    return ClassifierConfig.from_mae(mae_config, num_classes=sd["head.1.weight" if bn else "head.weight"].shape[0],
                                     global_pool="avg" if "fc_norm.weight" in sd else "token",
                                     head="bn_linear" if bn else "linear")


def is_classifier_checkpoint(path: str | Path) -> bool:
    """True for a classifier: a ``mae-classifier`` checkpoint or its run directory, a transformers
    ``ViTForImageClassification`` directory, or weights with a ``head.*`` (timm / reference fine-tuned files); a
    released-weights name is looked at in its cached file."""
    path = local_path(path)
    if is_run_dir(path):
        try:
            path = resolve_run(path)  # the one rule for what a run directory means
        except CheckpointError:
            return False  # no checkpoint yet: the MAE loader reports it
    if is_dcp_checkpoint(path):  # a sharded run's checkpoint: its format says
        try:
            return read_meta(path).get("format") == CLASSIFIER_FORMAT
        except CheckpointError:
            return False  # damaged: the MAE loader reports it
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            try:
                return json.loads(config.read_text()).get("model_type") == "vit"
            except (OSError, ValueError):
                return False
        return False
    if not path.is_file():
        return False
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return _has_head(f.keys())
        except (SafetensorError, OSError, RuntimeError, ValueError):
            return False  # unreadable: the MAE loader reports it
    try:
        state = safe_load(path)
    except CheckpointError:
        return False  # unreadable: the MAE loader reports it
    if not isinstance(state, dict):
        return False
    if state.get("format") == CLASSIFIER_FORMAT:
        return True
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    return _has_head(k for k, v in state.items() if isinstance(v, torch.Tensor))


def _has_head(keys: Iterable[Any]) -> bool:
    return any(str(k).removeprefix("module.").startswith("head.") for k in keys)
