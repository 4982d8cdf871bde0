"""Pieces every recipe shares: device choice, output directory, the model section of a config."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from mae.errors import ConfigError
from mae.interop.hub_metadata import WEIGHTS_KEY
from mae.models import model_config
from mae.train.distributed import DistInfo, cleanup, init_distributed
from mae.train.precision import PRECISIONS

log = logging.getLogger("mae")
T = TypeVar("T")


@dataclass
class ModelSection:
    """A registered architecture plus optional overrides of its fields (unset = the architecture's value)."""

    name: str = field(default="mae_vit_base_patch16", metadata={"help": "registered model name (see `mae models`)"})
    img_size: int | tuple[int, int] | None = field(default=None, metadata={
        "help": "image side in pixels, or [height, width]"})
    patch_size: int | None = None
    in_chans: int | None = field(default=None, metadata={"help": "1 grey, 3 RGB"})
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    norm_eps: float | None = field(default=None, metadata={"help": "LayerNorm epsilon (reference: 1e-6)"})
    target: str | None = field(default=None, metadata={"help": "pixel | norm_pixel | pca | hog"})
    norm_pix_loss: bool | None = field(default=None, metadata={"help": "reference switch for target=norm_pixel"})
    mask_strategy: str | None = field(default=None, metadata={
        "help": "random | block | grid | tube | consistent | frame"})
    mask_min_block: int | None = field(default=None, metadata={
        "help": "block masking: fewest patches per block (BEiT: 16)"})
    mask_ratio: float | None = field(default=None, metadata={"help": "fraction of patches removed (paper: 0.75)"})
    mask_in_encoder: bool | None = field(default=None, metadata={"help": "ablation: mask tokens in the encoder"})
    pca_components: int | None = None
    hog_bins: int | None = None
    num_frames: int | None = field(default=None, metadata={
        "help": "frames per clip or time series: input [N, C, T, H, W] (0: images [N, C, H, W])"})
    tubelet_size: int | None = field(default=None, metadata={"help": "frames per token (MAE-ST, VideoMAE: 2)"})
    channel_groups: list[list[int]] | None = field(default=None, metadata={
        "help": "channel indices per token group (SatMAE), e.g. [[0,1,2],[3,4,5]] ([]: none)"})
    pos_embed_type: str | None = field(default=None, metadata={
        "help": "sincos | sincos_1d | separable | learned"})
    cls_token: bool | None = field(default=None, metadata={"help": "a class token in front of the tokens"})
    attn_k_bias: bool | None = field(default=None, metadata={
        "help": "a bias on the attention keys (false: query and value biases only, VideoMAE)"})
    encoder_norm: bool | None = field(default=None, metadata={"help": "a LayerNorm after the encoder blocks"})
    decoder_embed_bias: bool | None = field(default=None, metadata={
        "help": "a bias in the encoder-to-decoder projection (VideoMAE: false)"})
    decoder_norm_eps: float | None = field(default=None, metadata={
        "help": "eps of the decoder's final LayerNorm (default: norm_eps; HF VideoMAE: 1e-5)"})

    RANGES: ClassVar[dict[str, str]] = {"mlp_ratio": "> 0", "mask_ratio": "[0, 1)", "norm_eps": "> 0",
                                        "decoder_norm_eps": "> 0"}

    def overrides(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "name" and v is not None}

    def resolved(self, config: Any) -> dict[str, Any]:
        """This section with every field set to the value the built model has (`config`: its `MAEConfig`): what
        config.yaml records, so that the file alone rebuilds the same architecture."""
        values = config.to_dict()
        if values.get("decoder_norm_eps") is None:  # unset means the encoder's eps: record the value it has
            values["decoder_norm_eps"] = values["norm_eps"]
        return {"name": self.name, **{f.name: values[f.name] for f in fields(self) if f.name != "name"}}

    def validate(self) -> None:
        model_config(self.name, **self.overrides())  # raises ConfigError naming the bad field


def mps_available() -> bool:
    """Apple-silicon GPU (Metal) present and usable by this torch build."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, then Apple's MPS, else the CPU; a named device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device '{name}' is not a valid torch device; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use device=cpu")
    if device.type == "mps" and not mps_available():
        raise ConfigError(f"device '{name}' requested but this machine has no usable Apple GPU (MPS); use "
                          f"device=cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device '{name}' is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def prepare_output_dir(path: str) -> Path:
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output directory '{path}': {e.strerror}; choose another --output-dir") from e
    return out


def require_at_least(obj: object, names: tuple[str, ...], minimum: int = 1, prefix: str = "") -> None:
    """Raise a ConfigError naming the first of ``names`` whose value is below ``minimum`` (None means unset)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{prefix}{name} must be at least {minimum}, got {value}")


def require_precision(value: str) -> None:
    if value not in PRECISIONS:
        raise ConfigError(f"precision '{value}' is not one of {', '.join(PRECISIONS)}")


def run_distributed(device: str, body: Callable[[DistInfo], T]) -> T:
    """Join torchrun's process group (or run as one process) on ``device``, run ``body(dist)``, always leave the
    group: the entry point every training and evaluation recipe shares."""
    dist = init_distributed(resolve_device(device))
    try:
        result = body(dist)
    except BaseException:
        cleanup()
        raise
    cleanup(wait_for_others=True)
    return result


def weights_record(weights: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run record's entry for the released weights a run started from (name, source, checksum, licence): what
    config.yaml keeps under ``_run`` and model cards read back (`mae.interop.hub_metadata.recorded_weights`)."""
    if not weights:
        return {}
    log.info("weights: %s (%s, licence %s, checksum %s)", weights.get("name"), weights.get("source"),
             weights.get("licence"), weights.get("checksum"))
    return {WEIGHTS_KEY: dict(weights)}
