"""Image classifiers on an MAE encoder: timm's `VisionTransformer`, built to match the encoder, plus the loading,
freezing and head rules of the paper's fine-tuning, partial fine-tuning and linear-probing protocols.

The classifier is a stock ``timm.models.vision_transformer.VisionTransformer`` (its state_dict uses the reference /
timm key names, so an MAE encoder loads into it by name and it exports to timm with ``strict=True``):

- ``global_pool='avg'`` (the paper's fine-tuning): mean of the patch tokens, then a new LayerNorm ``fc_norm``; the
  pre-trained final ``norm`` is not used (timm's avg-pool model has ``norm = Identity``), as in the reference.
- ``global_pool='token'``: the class token after the pre-trained final ``norm`` (the linear probe's feature).
- ``head='bn_linear'``: the linear probe's ``BatchNorm1d(affine=False, eps=1e-6)`` + Linear.

    cfg = ClassifierConfig.from_mae(mae_model.config, num_classes=10)
    model = build_classifier(cfg)
    report = load_encoder_into(model, mae_model.state_dict(), mae_model.config)  # head.*, fc_norm.* missing
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mae.errors import CheckpointError, ConfigError
from mae.models.loading import LoadReport, WeightRules, load_weights, register_weight_rules
from mae.models.mae import Attention, MAEConfig

__all__ = [
    "GLOBAL_POOLS", "HEADS", "ClassifierConfig", "LoadReport", "PartiallyFrozen", "build_classifier",
    "fold_bn_head", "freeze_for", "init_head", "load_encoder_into", "trainable_prefixes",
]

GLOBAL_POOLS = ("avg", "token")
HEADS = ("linear", "bn_linear")


@dataclass
class ClassifierConfig:
    """Architecture of a classifier: the encoder's fields (as in `MAEConfig`) plus pooling, head and drop path."""

    img_size: int | tuple[int, int] = 224  # int for square images, (H, W) otherwise
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    num_classes: int = 1000  # 0: no head, the model returns pooled features
    global_pool: str = "avg"  # avg | token
    fc_norm: bool | None = None  # None: timm's default (a new LayerNorm after avg pooling, none for token)
    head: str = "linear"  # linear | bn_linear (the linear probe's BatchNorm1d(affine=False) + Linear)
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.img_size, (list, tuple)):
            self.img_size = tuple(int(s) for s in self.img_size)  # type: ignore[assignment]  # a tuple of two ints after the check below
            if len(self.img_size) != 2:  # type: ignore[arg-type]  # a tuple here
                raise ConfigError(f"img_size must be an int or (height, width), got {self.img_size}")
            if self.img_size[0] == self.img_size[1]:  # type: ignore[index]  # a tuple here
                self.img_size = self.img_size[0]  # type: ignore[index]  # a tuple here
        self.validate()

    @classmethod
    def from_mae(cls, config: MAEConfig, **overrides: Any) -> ClassifierConfig:
        """The classifier for an MAE's encoder; `overrides` set any field (e.g. ``img_size=448``, ``num_classes``)."""
        encoder = {k: getattr(config, k) for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth",
                                                   "num_heads", "mlp_ratio", "norm_eps")}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**encoder, **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClassifierConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointError(f"classifier config has unknown fields {unknown}; was it written by a newer version?")
        return cls(**values)

    @property
    def image_hw(self) -> tuple[int, int]:
        return (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)  # type: ignore[return-value]  # two items (__post_init__)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.image_hw[0] // self.patch_size, self.image_hw[1] // self.patch_size

    @property
    def uses_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    def validate(self) -> None:
        h, w = self.image_hw
        if self.patch_size <= 0 or h % self.patch_size or w % self.patch_size:
            raise ConfigError(f"img_size {h}x{w} is not divisible by patch_size {self.patch_size}; "
                              f"pick an image size that is a multiple of the patch size")
        if self.num_heads <= 0 or self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"global_pool '{self.global_pool}' is not one of {', '.join(GLOBAL_POOLS)}")
        if self.head not in HEADS:
            raise ConfigError(f"head '{self.head}' is not one of {', '.join(HEADS)}")
        if self.num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["img_size"] = list(self.img_size) if isinstance(self.img_size, tuple) else self.img_size
        return d

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``VisionTransformer`` / ``timm.create_model('vit_*', ...)`` for this architecture
        (with a plain Linear head: a ``bn_linear`` head is folded into one for export, see `fold_bn_head`)."""
        kwargs: dict[str, Any] = {
            "img_size": self.img_size, "patch_size": self.patch_size, "in_chans": self.in_chans,
            "embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio, "qkv_bias": True, "class_token": True, "global_pool": self.global_pool,
            "fc_norm": self.fc_norm, "num_classes": self.num_classes, "drop_path_rate": self.drop_path_rate,
        }
        if self.norm_eps != 1e-6:  # timm's ViT default
            kwargs["norm_layer"] = partial(nn.LayerNorm, eps=self.norm_eps)
        return kwargs


def init_head(model: VisionTransformer, std: float) -> None:
    """Trunc-normal(std) weight and zero bias for the last Linear of the head (2e-5 fine-tuning, 0.01 probe)."""
    linear = model.head[-1] if isinstance(model.head, nn.Sequential) else model.head
    if isinstance(linear, nn.Linear):
        nn.init.trunc_normal_(linear.weight, std=std)
        nn.init.zeros_(linear.bias)


def build_classifier(config: ClassifierConfig, head_init_std: float = 2e-5) -> VisionTransformer:
    """A timm ViT classifier for `config`, head initialised trunc-normal(`head_init_std`), bias 0.

    The encoder weights keep timm's initialisation until `load_encoder_into` replaces them. The config is kept as
    ``model.classifier_config`` for saving and export.
    """
    model = VisionTransformer(**config.timm_kwargs(), attn_layer=Attention)  # timm's names; fp32 attention on CPU
    if config.head == "bn_linear" and config.num_classes > 0:
        # the linear probe (paper Table 10): a BatchNorm without affine parameters normalises the frozen features
        model.head = nn.Sequential(nn.BatchNorm1d(config.embed_dim, affine=False, eps=1e-6),  # type: ignore[assignment]  # timm types head as Linear | Identity; any module works
                                   nn.Linear(config.embed_dim, config.num_classes))
    init_head(model, head_init_std)
    model.classifier_config = config  # type: ignore[assignment]  # Module.__getattr__ gives Tensor | Module
    return model


# ------------------------------------------------------------------------------------------------ loading an encoder
CLASSIFIER_NEW_PARTS = ("head.", "fc_norm.")
"""What a classifier adds to an encoder: never taken from a file, initialised fresh."""
register_weight_rules(VisionTransformer, WeightRules(new_prefixes=CLASSIFIER_NEW_PARTS))


def load_encoder_into(model: VisionTransformer, state_dict: dict[str, torch.Tensor],
                      source_config: MAEConfig | ClassifierConfig | None = None,
                      source: str = "the checkpoint") -> LoadReport:
    """`load_weights` into a classifier, with the patch grid of the encoder's config: as the reference fine-tuning
    does, ``head.*`` and, with average pooling, ``fc_norm.*`` start fresh (a file's own head is never loaded); the
    file's decoder, mask token and, with average pooling, its final ``norm.*`` are not used; a position table of
    another grid is resized by 2-D bicubic interpolation."""
    return load_weights(model, state_dict, source=source,
                        source_grid=source_config.grid_size if source_config is not None else None)


# ------------------------------------------------------------------------------------------------ freezing
def trainable_prefixes(depth: int, trainable_blocks: int | None = None, mlp_only: bool = False,
                       head_only: bool = False) -> tuple[str, ...] | None:
    """Module names that train under a protocol; None means everything trains.

    - full fine-tuning: None
    - ``trainable_blocks=k`` (paper section 4.3): the last k blocks + final norm / fc_norm + head (k=0, the head only,
      is what `mae linprobe` trains; the fine-tuning recipe refuses it)
      (linear probing)
    - ``mlp_only``: the MLP sub-block of the last block (its norm2, mlp, layer scale, drop path) + norms + head
    - ``head_only``: the head only (linear probing)
    """
    tail = ("norm", "fc_norm", "head_drop", "head")
    if head_only:
        return ("head_drop", "head")
    if mlp_only:
        if trainable_blocks is not None:
            raise ConfigError("set either trainable_blocks or mlp_only, not both")
        last = f"blocks.{depth - 1}"
        return tuple(f"{last}.{m}" for m in ("norm2", "mlp", "ls2", "drop_path2")) + tail
    if trainable_blocks is None:
        return None
    if not 0 <= trainable_blocks <= depth:
        raise ConfigError(f"trainable_blocks must be between 0 and the depth {depth}, got {trainable_blocks}")
    if trainable_blocks == 0:
        return ("head_drop", "head")
    return tuple(f"blocks.{i}" for i in range(depth - trainable_blocks, depth)) + tail


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze_for(model: nn.Module, prefixes: tuple[str, ...] | None) -> list[str]:
    """Set ``requires_grad`` from `prefixes` (None: all trainable); returns the names of the frozen modules, i.e.
    the top-most modules that hold no trainable part (they are kept in eval mode by `PartiallyFrozen`)."""
    if prefixes is None:
        model.requires_grad_(True)
        return []
    for name, param in model.named_parameters():
        param.requires_grad_(_under(name, prefixes))
    frozen: list[str] = []
    for name, _ in model.named_modules():
        if not name or _under(name, prefixes) or any(p.startswith(name + ".") for p in prefixes):
            continue  # the root, a trainable module, or an ancestor of one
        if any(name.startswith(f + ".") for f in frozen):
            continue  # inside a frozen module already listed
        frozen.append(name)
    return frozen


class PartiallyFrozen(nn.Module):
    """Wraps a classifier whose frozen parts must stay in eval mode while the rest trains (no dropout or drop path
    in frozen blocks, as when they were pre-trained). ``train()`` switches the trainable parts only."""

    def __init__(self, model: nn.Module, prefixes: tuple[str, ...] | None):
        super().__init__()
        self.model = model
        self.frozen_modules = freeze_for(model, prefixes)

    def train(self, mode: bool = True) -> PartiallyFrozen:
        super().train(mode)
        if mode:
            modules = dict(self.model.named_modules())
            for name in self.frozen_modules:
                modules[name].eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# ------------------------------------------------------------------------------------------------ export helpers
def fold_bn_head(state_dict: dict[str, torch.Tensor], eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """The state_dict of a ``bn_linear`` head rewritten as one Linear ``head.{weight,bias}``: an affine-free
    BatchNorm in eval mode is ``(x - mean) / sqrt(var + eps)``, which the Linear absorbs (paper appendix A.1)."""
    if "head.1.weight" not in state_dict:
        return dict(state_dict)
    out = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    mean, var = state_dict["head.0.running_mean"].double(), state_dict["head.0.running_var"].double()
    weight, bias = state_dict["head.1.weight"], state_dict["head.1.bias"]
    scale = (var + eps).rsqrt()  # [D]
    folded = weight.double() * scale  # [C, D]
    out["head.weight"] = folded.to(weight.dtype)
    out["head.bias"] = (bias.double() - folded @ mean).to(bias.dtype)
    return out
