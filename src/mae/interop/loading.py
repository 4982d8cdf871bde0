"""One entry point for every checkpoint format: detect, convert to our (reference) key names, check, load.

Formats: ``mae`` (this project's safetensors file or directory, or a training checkpoint with its config),
``reference`` (the reference release's ``{'model': sd}`` ``.pth``), ``hf`` (a transformers ViTMAE or VideoMAE
directory or state_dict) and ``timm`` (a bare ViT encoder state_dict). Every ``.pth`` / ``.bin`` goes through
`mae.train.checkpoint.safe_load` (weights only; nothing in a file is ever executed). A released-weights name
(``official:mae_pretrain_vit_base``, ``hf:facebook/vit-mae-base``, ``timm:vit_base_patch16_224.mae``) reads as its
cached file (`mae.train.run_dir.released_weights`), with what the catalogue says of it (architecture, target) as hints.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mae.errors import CheckpointError, ConfigError
from mae.interop import huggingface as hf
from mae.interop import videomae_hf
from mae.interop.classifier_export import load_hf_classifier
from mae.interop.classifier_io import is_classifier_checkpoint
from mae.interop.infer import NAME_FIELDS, check_model_name, infer_config, pixel_target_overrides, registered_name
from mae.interop.keys import has_decoder, is_finetuned, part_of, short_list, strip_prefix
from mae.interop.native import (
    CONFIG_KEY,
    FORMAT_VALUE,
    WEIGHTS_NAME,
    read_safetensors,
    replace_atomically,
    save_state_dict,
)
from mae.interop.reference import hints_from_args, to_reference_checkpoint
from mae.interop.timm_vit import encoder_for_timm
from mae.models.loading import LoadReport, load_weights
from mae.models.mae import MAEConfig, MaskedAutoencoderViT
from mae.models.registry import ARCHITECTURES, model_config
from mae.train.checkpoint import atomic_save, safe_load
from mae.train.checkpoint_kinds import describe, kind_of_state
from mae.train.dcp import is_dcp_checkpoint
from mae.train.run_dir import released_weights, resolve_run
from mae.weights import ResolvedWeights

_log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("mae", "reference", "hf", "timm")
"""The weight-file formats read and written here (a training checkpoint's ``format`` tag is another thing:
`mae.train.checkpoint_formats`)."""
_ENCODER_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "norm_eps")
_ARCH_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "num_frames", "tubelet_size")


@dataclass
class Checkpoint:
    """A checkpoint read from disk: tensors under our key names, its format and whatever it says about itself."""

    state_dict: dict[str, torch.Tensor]
    format: str  # one of WEIGHT_FORMATS
    config: MAEConfig | None = None  # stored architecture (mae, hf with config.json); None: infer from shapes
    hints: dict[str, Any] = field(default_factory=dict)  # softer facts (reference args, timm architecture name)
    path: Path | None = None
    weights: ResolvedWeights | None = None  # the released weights it was named by (`mae.weights`), if any

    @property
    def label(self) -> str:
        where = f"{self.format} checkpoint '{self.path}'" if self.path else f"{self.format} checkpoint"
        return f"{self.weights.name} ({where})" if self.weights is not None else where

    @property
    def target(self) -> str | None:
        """The target the weights were trained to predict, when the file or its catalogue entry says (None: unknown;
        a file without a stored config or hints is not assumed to be 'pixel')."""
        entry = self.weights.entry if self.weights is not None else None
        if entry is not None and entry.target:
            return entry.target
        if self.config is not None:
            return self.config.target
        if "norm_pix_loss" in self.hints:
            return "norm_pixel" if self.hints["norm_pix_loss"] else "pixel"
        return None


# ---------------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported file or directory and detect its format (see the module docstring). A run directory gives
    the file `mae.train.run_dir.resolve_run` picks (its finished result, else its newest valid checkpoint); a
    released-weights name its cached file."""
    weights = released_weights(path)
    ckpt = _read_local(weights.path if weights is not None else Path(path))
    if weights is not None:
        _add_catalogue_hints(ckpt, weights)
    return ckpt


def _add_catalogue_hints(ckpt: Checkpoint, weights: ResolvedWeights) -> None:
    """What the catalogue says of released weights, as hints for files that store no config: the architecture (when
    its width is the file's: a name is never forced onto weights of another size) and the target."""
    ckpt.weights = weights
    entry = weights.entry
    if entry is None or ckpt.config is not None:
        return
    conv = ckpt.state_dict.get("patch_embed.proj.weight")
    arch = registered_name(entry.architecture)
    if arch is not None and conv is not None and model_config(arch).embed_dim == conv.shape[0]:
        ckpt.hints.setdefault("model_name", arch)
    if entry.target in ("pixel", "norm_pixel"):
        ckpt.hints.setdefault("norm_pix_loss", entry.target == "norm_pixel")


def _read_local(path: Path) -> Checkpoint:
    path = resolve_run(path) if path.exists() else path
    container: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    json_config: dict[str, Any] | None = None
    if path.is_dir() and not is_dcp_checkpoint(path):  # a DCP checkpoint (fsdp run) reads as a checkpoint file
        json_config = _read_json(path / hf.HF_CONFIG_NAME)
        tensors, metadata = _read_directory(path)
    elif not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path")
    elif path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path)
    else:
        container = safe_load(path, map_location="cpu")
        tensors = _unwrap(container, path)
    tensors = strip_prefix(tensors, "module.")

    if metadata.get("format") == FORMAT_VALUE and CONFIG_KEY in metadata:
        return Checkpoint(tensors, "mae", _stored_config(json.loads(metadata[CONFIG_KEY]), path), path=path)
    if isinstance(container.get("model_config"), dict):  # this project's pre-training checkpoint
        return Checkpoint(tensors, "mae", _stored_config(container["model_config"], path), path=path)
    if isinstance(container.get("classifier_config"), dict):  # this project's classifier: its encoder's fields
        encoder = {k: v for k, v in container["classifier_config"].items() if k in _ENCODER_FIELDS}
        return Checkpoint(tensors, "mae", MAEConfig(**encoder), path=path)
    if videomae_hf.is_videomae_state_dict(tensors) or (json_config or {}).get("model_type") == videomae_hf.MODEL_TYPE:
        config = videomae_hf.config_from_hf(json_config) if json_config and "model_type" in json_config else None
        return Checkpoint(videomae_hf.from_hf_state_dict(tensors, config), "hf", config, path=path)
    if hf.is_hf_state_dict(tensors) or (json_config or {}).get("model_type") == "vit_mae":
        config = hf.config_from_hf(json_config) if json_config and "model_type" in json_config else None
        return Checkpoint(hf.from_hf_state_dict(tensors), "hf", config, path=path)
    if any(part_of(k) in ("encoder", "decoder") for k in tensors):
        hints = hints_from_args(container.get("args"))
        if json_config and isinstance(json_config.get("architecture"), str):  # a timm hub directory
            hints.setdefault("model_name", json_config["architecture"])
        fmt = "reference" if "model" in container or has_decoder(tensors) else "timm"
        return Checkpoint(tensors, fmt, hints=hints, path=path)
    kind = kind_of_state(container) if container else None
    if kind is not None and kind.format is not None:  # e.g. a detection run's checkpoint: named, with what takes it
        raise CheckpointError(f"{kind.named(path)}; this command reads MAE or ViT encoder weights")
    raise CheckpointError(f"'{path}' is not a checkpoint format this library reads (keys: "
                          f"{short_list(tensors)}); expected an MAE safetensors file, a reference .pth, a "
                          f"transformers ViTMAE directory or a timm ViT state_dict")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{path}' is not valid JSON ({e})") from None
    return value if isinstance(value, dict) else None


def _read_directory(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if (path / WEIGHTS_NAME).is_file():
        return read_safetensors(path / WEIGHTS_NAME)
    index = _read_json(path / "model.safetensors.index.json")
    if index and isinstance(index.get("weight_map"), dict):  # a sharded transformers checkpoint
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            tensors.update(read_safetensors(path / shard)[0])
        return tensors, {}
    if (path / "pytorch_model.bin").is_file():
        return _unwrap(safe_load(path / "pytorch_model.bin", map_location="cpu"), path), {}
    raise CheckpointError(f"directory '{path}' holds no {WEIGHTS_NAME}, model.safetensors.index.json or "
                          f"pytorch_model.bin")


def _unwrap(obj: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded ``.pth``: under 'model' (reference), 'state_dict', or the dict itself."""
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"'{path}' holds no tensors under 'model', 'state_dict' or at the top level "
                              f"(top-level keys: {short_list(map(str, obj))})")
    return tensors


def _stored_config(values: dict[str, Any], path: Path) -> MAEConfig:
    known = {f.name for f in fields(MAEConfig)}
    extra = sorted(set(values) - known)
    if extra:
        warnings.warn(f"'{path}' stores config fields this version does not know: {', '.join(extra)} (ignored)",
                      stacklevel=3)
    return MAEConfig(**{k: v for k, v in values.items() if k in known})


def load_state_dict_any(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any] | None]:
    """``(state_dict in our key names, format, stored MAEConfig as a dict or None)`` for any supported file.

    The format is 'mae', 'reference', 'hf' or 'timm'; the config is None for files that store none (reference,
    timm, a bare transformers state_dict): `infer_config` rebuilds it from shapes.
    """
    ckpt = read_checkpoint(path)
    return ckpt.state_dict, ckpt.format, ckpt.config.to_dict() if ckpt.config is not None else None


@dataclass
class EncoderSource:
    """An encoder to start from: its architecture, its weights (our key names) and where they came from."""

    config: MAEConfig
    state_dict: dict[str, torch.Tensor]
    label: str  # for messages: where the weights came from
    format: str = ""
    weights: ResolvedWeights | None = None  # the released weights it was named by (`mae.weights`), if any

    @property
    def provenance(self) -> dict[str, Any] | None:
        """Name, source, checksum and licence of the released weights it came from (for config.yaml and model
        cards); None for a path."""
        return self.weights.provenance() if self.weights is not None else None


def read_encoder(path: str | Path, model_name: str | None = None, **overrides: Any) -> EncoderSource:
    """The encoder of any checkpoint the library reads -- a run directory, this project's files, the reference
    release, a transformers ViTMAE or ViT classifier directory, a timm state_dict -- with its architecture: the
    stored config, else the one `infer_config` rebuilds from the shapes, `model_name` and `overrides` (e.g. the
    ``num_heads`` of a non-standard width). Used by the classifiers, the transfer backbone and `load_model`."""
    weights = released_weights(path)
    path = resolve_run(weights.path if weights is not None else path)
    if path.is_dir() and (_read_json(path / hf.HF_CONFIG_NAME) or {}).get("model_type") == "vit":
        sd, ccfg, _ = load_hf_classifier(path)
        check_model_name(ccfg, model_name, f"'{path}'")
        config = MAEConfig(**{k: getattr(ccfg, k) for k in _ENCODER_FIELDS}).replace(**overrides)
        return EncoderSource(config, sd, f"transformers classifier '{path}'", "hf", weights)
    ckpt = _read_local(path)
    if weights is not None:
        _add_catalogue_hints(ckpt, weights)
    if ckpt.config is not None:
        check_model_name(ckpt.config, model_name, ckpt.label)
        config = ckpt.config.replace(**overrides) if overrides else ckpt.config
    else:
        with warnings.catch_warnings():  # the decoder's head count is a guess, and an encoder does not use it
            warnings.filterwarnings("ignore", message="decoder_num_heads=")
            config = infer_config(ckpt.state_dict, model_name, ckpt.hints, **overrides)
    return EncoderSource(config, ckpt.state_dict, ckpt.label, ckpt.format, weights)


# ---------------------------------------------------------------------------------------------------- checking
def model_label(config: MAEConfig) -> str:
    """The registered name of an architecture, or its main numbers when it is not registered."""
    mine = {k: getattr(config, k) for k in _ARCH_FIELDS}
    default = MAEConfig()
    for name, arch in ARCHITECTURES.items():
        theirs = {k: arch.get(k, getattr(default, k)) for k in _ARCH_FIELDS}
        if theirs == mine:
            return name
    return (f"the model (embed_dim {config.embed_dim}, depth {config.depth}, patch {config.patch_size}, img "
            f"{config.img_size}, decoder {config.decoder_embed_dim} x {config.decoder_depth})")


def _warn_gaps(report: LoadReport, sd: dict[str, torch.Tensor]) -> None:
    """The expected gaps of loading a file into an MAE, said once each (they change what the model computes)."""
    source = report.source
    if any(part_of(k) == "decoder" for k in report.missing):
        warnings.warn(f"{source} holds the encoder only: no decoder weights (a model loading it keeps its freshly "
                      f"initialised decoder)", stacklevel=4)
    targets = [k for k in report.missing if k.startswith("target.")]
    if targets:
        warnings.warn(f"{source} has no {short_list(targets)}: the model's target keeps its current buffers (e.g. "
                      f"an unfitted PCA basis)", stacklevel=4)
    heads = [k for k in report.skipped if part_of(k) == "head"]
    if heads:
        warnings.warn(f"{source}: skipped the classifier keys {short_list(heads)} (an MAE has no classifier)"
                      + ("; norm.* keeps its initialisation (a fine-tuned file has fc_norm instead)"
                         if is_finetuned(sd) else ""), stacklevel=4)


def _load_into(model: MaskedAutoencoderViT, ckpt: Checkpoint, strict_encoder: bool = True,
               chosen: frozenset[str] = frozenset()) -> LoadReport:
    """Load ``ckpt`` into ``model`` (`mae.models.loading.load_weights`, by the MAE's rules); warn about config
    fields that differ from the stored ones unless the caller ``chosen`` them on purpose (overrides)."""
    if ckpt.config is not None:
        differ = [f"{k} {getattr(ckpt.config, k)} in the file, {getattr(model.config, k)} in the model"
                  for k in ("num_heads", "decoder_num_heads", "norm_eps", "target")
                  if k not in chosen and getattr(ckpt.config, k) != getattr(model.config, k)]
        if differ:
            warnings.warn(f"{ckpt.label} was saved with another configuration: {'; '.join(differ)}", stacklevel=3)
    report = load_weights(model, ckpt.state_dict, source=ckpt.label, strict=strict_encoder, fmt=ckpt.format,
                          target=model_label(model.config),
                          source_grid=ckpt.config.grid_size if ckpt.config is not None else None)
    _warn_gaps(report, ckpt.state_dict)
    _log.info("loaded %d tensors from %s", len(report.loaded), ckpt.label)
    return report


def load_checkpoint(model: MaskedAutoencoderViT, path: str | Path | Checkpoint, strict_encoder: bool = True
                    ) -> LoadReport:
    """Load whatever of any supported checkpoint file, run directory or released-weights name fits ``model`` (as
    timm's ``load_checkpoint``: `read_checkpoint`, then `mae.models.loading.load_weights`); a `Checkpoint` already
    read is loaded as it is.

    Raises CheckpointError when the file is of another architecture (every shape mismatch counts, e.g.
    "blocks.0.attn.qkv.weight is [3072, 1024] in the file but [2304, 768] in the model") and, with
    ``strict_encoder``, when encoder keys are missing or the file has keys the model does not know. Expected gaps
    only warn: an encoder-only file leaves the decoder freshly initialised, a fine-tuned file's ``fc_norm`` /
    ``head`` are skipped (its encoder loads, ``norm`` keeps its initial values).
    """
    return _load_into(model, path if isinstance(path, Checkpoint) else read_checkpoint(path), strict_encoder)


def checkpoint_config(ckpt: Checkpoint, model_name: str | None = None, **overrides: Any) -> MAEConfig:
    """The architecture of a checkpoint read: its stored config, else the one `infer_config` rebuilds from the
    shapes, ``model_name`` and the file's (or its catalogue entry's) hints; ``overrides`` win over both."""
    return _resolve_config(ckpt, model_name, overrides)


def _resolve_config(ckpt: Checkpoint, model_name: str | None, overrides: dict[str, Any]) -> MAEConfig:
    overrides = pixel_target_overrides(overrides)
    if ckpt.config is not None:  # a name that contradicts it would build a model the weights do not fit
        check_model_name(ckpt.config, model_name, ckpt.label, strict=True,
                         fields=(*NAME_FIELDS, "decoder_embed_dim", "decoder_depth", "decoder_num_heads"))
        try:
            return MAEConfig(**{**ckpt.config.to_dict(), **overrides})
        except TypeError as e:
            raise ConfigError(f"bad override: {e}") from None
    return infer_config(ckpt.state_dict, model_name, ckpt.hints, **overrides)


def load_model(path: str | Path | Checkpoint, model_name: str | None = None, **overrides: Any
               ) -> MaskedAutoencoderViT:
    """Build the model a checkpoint (a path, a released-weights name, or a `Checkpoint` already read) describes and
    load it. The architecture comes from the stored config (this project's files, transformers directories), else
    from ``model_name`` / the catalogue's entry / the tensor shapes (`infer_config`); ``overrides`` change config
    fields (e.g. ``num_heads=`` for an unregistered reference file)."""
    return _model_of(path if isinstance(path, Checkpoint) else read_checkpoint(path), model_name, overrides)


def _model_of(ckpt: Checkpoint, model_name: str | None, overrides: dict[str, Any]) -> MaskedAutoencoderViT:
    model = MaskedAutoencoderViT(_resolve_config(ckpt, model_name, overrides))
    _load_into(model, ckpt, chosen=frozenset(pixel_target_overrides(overrides)))
    return model


# ---------------------------------------------------------------------------------------------------- convert
def convert(src: str | Path, dst: str | Path, to: str = "mae", model_name: str | None = None,
            **overrides: Any) -> Path:
    """Convert any supported checkpoint to ``to``: 'mae' (safetensors file or directory), 'reference' (``.pth``
    ``{'model': sd}``), 'hf' (a ``ViTMAEForPreTraining`` directory) or 'timm' (encoder state_dict, ``.pth`` or
    ``.safetensors``). Tensors are copied bit for bit. Files without a stored config get their architecture from
    ``model_name`` / ``overrides`` / the shapes. Returns the written path."""
    if to not in WEIGHT_FORMATS:
        raise ConfigError(f"unknown format '{to}' (valid: {', '.join(WEIGHT_FORMATS)})")
    ckpt = read_checkpoint(src)
    dst = Path(dst)
    sd = ckpt.state_dict
    if to == "timm":
        return _save_plain(encoder_for_timm(sd), dst)
    if to == "reference":
        if dst.suffix == ".safetensors":
            raise ConfigError(f"the reference format is a .pth file, got '{dst}'")
        return atomic_save(to_reference_checkpoint(sd), dst)
    if is_finetuned(sd):
        target = "transformers' ViTMAEForPreTraining" if to == "hf" else "an MAE"
        raise CheckpointError(f"{ckpt.label} is a fine-tuned classifier (fc_norm + head on average-pooled tokens, "
                              f"no final norm): {target} has no counterpart for it, and transformers' "
                              f"ViTForImageClassification pools the class token instead; convert it to 'timm' "
                              f"or 'reference' to keep it intact")
    config = _resolve_config(ckpt, model_name, overrides)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        shapes = MaskedAutoencoderViT(config)
    report = load_weights(shapes, sd, source=ckpt.label, check_only=True, target=model_label(config))
    if report.resized:
        raise ConfigError(f"{ckpt.label} has position tables of another grid than {model_label(config)}; convert "
                          f"without changing img_size (conversion copies tensors, it does not resize them)")
    _warn_gaps(report, sd)
    kept = {k: sd[k] for k in report.loaded}
    if to == "mae":
        if dst.suffix not in ("", ".safetensors"):
            raise ConfigError(f"the mae format is a .safetensors file or a directory, got '{dst}'")
        return save_state_dict(kept, config.to_dict(), dst)
    if videomae_hf.is_video_config(config):  # the one video MAE transformers has
        return videomae_hf.save_hf_pretrained(kept, dst, config)
    return hf.save_hf_pretrained(kept, dst, config)


def _save_plain(state_dict: dict[str, torch.Tensor], dst: Path) -> Path:
    """A bare state_dict: safetensors when ``dst`` ends in .safetensors, else ``torch.save``."""
    if dst.suffix == ".safetensors":
        tensors = {k: v.contiguous() for k, v in state_dict.items()}
        replace_atomically(dst, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        return dst
    return atomic_save(state_dict, dst)


def load_pretrained_model(path: str | Path) -> MaskedAutoencoderViT:
    """The pre-trained MAE of a run directory or of any checkpoint file the library reads, in eval mode: the one
    place where `mae embed`, `mae attention` and the ONNX export turn a path into a model (a classifier is refused,
    named for what it is)."""
    weights = released_weights(path)
    local = weights.path if weights is not None else Path(path).expanduser()
    if not local.exists():
        raise ConfigError(f"checkpoint '{local}' does not exist; pass a pre-training run directory, a checkpoint file "
                          f"or released weights (official:<file>, hf:<org/repo>, timm:<tag>)")
    if is_classifier_checkpoint(local):
        what = describe(local, fallback=f"'{path}' is a classifier (it has a head)")
        raise ConfigError(f"{what}; this command reads a pre-trained MAE encoder: pass the pre-training run or "
                          f"checkpoint the classifier started from")
    ckpt = _read_local(local)  # run directories go through the one resolver (mae.train.run_dir)
    if weights is not None:
        _add_catalogue_hints(ckpt, weights)
    return _model_of(ckpt, None, {}).eval()
