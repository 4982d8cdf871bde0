"""Rebuild an `MAEConfig` from tensor shapes, for files that store no config (reference ``.pth``, timm).

Shapes give the widths, depths, patch size, channels, grid and MLP ratio. The number of attention heads is not
in any shape: it comes from a model name (the user's ``--model``, the reference ``args.model``, a timm
architecture name), else from the registry's width -> heads table (ViT-B 768 -> 12, ViT-L 1024 -> 16, ViT-H
1280 -> 16, decoder 512 -> 16, ...), else from the head_dim 64 (encoder) / 32 (decoder) rule, with a warning.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from mae.errors import CheckpointError, ConfigError
from mae.interop.keys import block_count, has_decoder, shape_str
from mae.models.mae import MAEConfig, config_fields
from mae.models.registry import ARCHITECTURES, model_config

_log = logging.getLogger(__name__)
_VIT_NAME = re.compile(r"vit_(tiny|small|base|large|huge)_patch(\d+)")


def registered_name(hint: str | None) -> str | None:
    """A registered model name for a hint such as 'mae_vit_large_patch16', 'vit_large_patch16' (reference
    fine-tuning args) or 'vit_base_patch16_224.mae' (timm); None when nothing matches."""
    if not hint:
        return None
    if hint in ARCHITECTURES:
        return hint
    m = _VIT_NAME.search(hint)
    if m:
        name = f"mae_vit_{m.group(1)}_patch{m.group(2)}"
        return name if name in ARCHITECTURES else None
    return None


def standard_heads(width: int, decoder: bool = False) -> tuple[int, str]:
    """Heads for a width, and where the number came from ('registry' or 'head_dim rule')."""
    dim_key, heads_key = ("decoder_embed_dim", "decoder_num_heads") if decoder else ("embed_dim", "num_heads")
    # the image architectures only: a clip model's decoder of the same width may have other heads (VideoMAE-L: 512 / 8)
    table = {a[dim_key]: a[heads_key] for a in ARCHITECTURES.values() if not a.get("num_frames")}
    if width in table:
        return table[width], "registry"
    head_dim = 32 if decoder else 64
    if width % head_dim == 0:
        return width // head_dim, "head_dim rule"
    raise CheckpointError(f"cannot tell the number of attention heads of a {width}-wide "
                          f"{'decoder' if decoder else 'encoder'}; pass a model name (--model) or "
                          f"{'decoder_num_heads' if decoder else 'num_heads'}=...")


def _grid(num_patches: int, patch: int, candidates: list[Any]) -> int | tuple[int, int]:
    """The image size whose patch grid has ``num_patches`` patches: a candidate if one fits, else a square."""
    for img in candidates:
        if img is None:
            continue
        h, w = (img, img) if isinstance(img, int) else tuple(img)
        if (h // patch) * (w // patch) == num_patches:
            return img if isinstance(img, int) else (h, w)
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise CheckpointError(f"the position table holds {num_patches} patches, not a square grid; pass "
                              f"img_size=(height, width)")
    return side * patch


def infer_config(state_dict: Mapping[str, torch.Tensor], model_name: str | None = None,
                 hints: Mapping[str, Any] | None = None, **overrides: Any) -> MAEConfig:
    """The MAE architecture of a state_dict in reference names. ``model_name`` (a registered name) supplies what
    shapes cannot (heads, eps); ``hints`` are softer (from a file's training args); ``overrides`` win over all. Long
    because it reads the fields one after the other in one pass, each rule next to the shapes it reads."""
    hints = dict(hints or {})
    unknown = sorted(set(overrides) - set(config_fields()))
    if unknown:
        raise ConfigError(f"unknown model field '{unknown[0]}' (valid: {', '.join(config_fields())})")
    overrides = pixel_target_overrides(overrides)
    base: dict[str, Any] = {}
    if model_name is not None:
        base = model_config(model_name).to_dict()  # ConfigError with suggestions for an unknown name
    elif (hinted := registered_name(hints.get("model_name"))) is not None:
        base = model_config(hinted).to_dict()
        model_name = hinted
    conv = state_dict.get("patch_embed.proj.weight")
    if conv is None or conv.dim() != 4:
        raise CheckpointError("no patch_embed.proj.weight [D, C, p, p] in the file: not a ViT / MAE checkpoint")
    width, in_chans, ph, pw = conv.shape
    if ph != pw:
        raise CheckpointError(f"non-square patches {ph}x{pw} are not supported")
    if model_name and base["embed_dim"] != width:
        raise CheckpointError(f"the file's encoder is {width} wide but {model_name} is {base['embed_dim']} wide "
                              f"(patch_embed.proj.weight is {shape_str(conv)}); pick a model name that fits")
    cfg: dict[str, Any] = {k: base[k] for k in ("norm_eps", "mask_ratio", "target") if k in base}
    cfg.update(embed_dim=width, in_chans=in_chans, patch_size=ph)
    cfg["depth"] = block_count(state_dict, "blocks")
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    if cfg["depth"] == 0 or fc1 is None:
        raise CheckpointError("the file holds no encoder blocks (blocks.0.*): not a ViT / MAE checkpoint")
    cfg["mlp_ratio"] = fc1.shape[0] / width
    pos = state_dict.get("pos_embed")
    if pos is not None:
        cfg["img_size"] = _grid(pos.shape[1] - 1, ph, [overrides.get("img_size"), base.get("img_size"),
                                                       hints.get("img_size")])
    else:
        cfg["img_size"] = overrides.get("img_size", base.get("img_size", hints.get("img_size", 224)))
    if "num_heads" not in overrides:
        if model_name:
            cfg["num_heads"] = base["num_heads"]
        else:
            cfg["num_heads"], source = standard_heads(width)
            _note(f"num_heads={cfg['num_heads']} for a {width}-wide encoder, from the {source}", source)

    if has_decoder(state_dict):
        dec = state_dict["decoder_embed.weight"]
        cfg["decoder_embed_dim"] = dec.shape[0]
        cfg["decoder_depth"] = block_count(state_dict, "decoder_blocks")
        dfc1 = state_dict.get("decoder_blocks.0.mlp.fc1.weight")
        if dfc1 is not None and dfc1.shape[0] != int(dec.shape[0] * cfg["mlp_ratio"]):
            raise CheckpointError(f"encoder and decoder MLPs use different ratios ({fc1.shape[0]}/{width} and "
                                  f"{dfc1.shape[0]}/{dec.shape[0]}); this MAE uses one mlp_ratio for both")
        if "decoder_num_heads" not in overrides:
            if model_name and base["decoder_embed_dim"] == dec.shape[0]:
                cfg["decoder_num_heads"] = base["decoder_num_heads"]
            else:
                cfg["decoder_num_heads"], source = standard_heads(dec.shape[0], decoder=True)
                _note(f"decoder_num_heads={cfg['decoder_num_heads']} for a {dec.shape[0]}-wide decoder, from the "
                      f"{source}", source)
        pred = state_dict["decoder_pred.weight"].shape[0]
        if "target" not in overrides:
            if pred == ph * ph * in_chans:
                norm_pix = bool(hints.get("norm_pix_loss", False))
                cfg["target"] = "norm_pixel" if norm_pix else "pixel"
            elif "target.components" in state_dict:
                cfg.update(target="pca", pca_components=pred)
            else:
                raise CheckpointError(f"the decoder predicts {pred} values per patch, not the {ph}x{ph}x{in_chans} "
                                      f"pixels; pass target=... (and its options) to say what it predicts")
    else:
        for key in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            if key in base:
                cfg[key] = base[key]
        if "target" not in overrides and hints.get("norm_pix_loss"):
            cfg["target"] = "norm_pixel"
        _log.info("no decoder in the file: decoder fields from %s", model_name or "the MAEConfig defaults")
    if "encoder_mask_token" in state_dict:
        cfg["mask_in_encoder"] = True
    if "mask_ratio" in hints:
        cfg["mask_ratio"] = float(hints["mask_ratio"])
    cfg.update(overrides)
    return MAEConfig(**cfg)


def pixel_target_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Make ``norm_pix_loss`` and ``target`` overrides agree, so that merging them over a stored config cannot keep
    the stored half: ``norm_pix_loss=False`` alone means target 'pixel', ``target='hog'`` alone means
    ``norm_pix_loss=False``."""
    out = dict(overrides)
    if "norm_pix_loss" in out and "target" not in out:
        out["target"] = "norm_pixel" if out["norm_pix_loss"] else "pixel"
    elif "target" in out and "norm_pix_loss" not in out:
        out["norm_pix_loss"] = out["target"] == "norm_pixel"
    return out


NAME_FIELDS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
"""What a registered model name fixes of an encoder (not img_size: a model runs at another resolution, resized)."""


def check_model_name(stored: Any, model_name: str | None, source: str, strict: bool = False,
                     fields: tuple[str, ...] = NAME_FIELDS) -> None:
    """A model name that contradicts the architecture a file stores (`stored`: its MAEConfig or ClassifierConfig)
    is a warning naming both, and the file's architecture is used (its weights fit no other); with `strict` (a
    converter, whose output would describe the wrong model) a ConfigError. Agreeing names and no name pass."""
    if model_name is None:
        return
    named = model_config(model_name)
    differ = [f"{k} {getattr(stored, k)} vs {getattr(named, k)}" for k in fields
              if getattr(stored, k) != getattr(named, k)]
    if not differ:
        return
    conflict = (f"the model name '{model_name}' contradicts the architecture stored in {source} ({', '.join(differ)}: "
                f"file vs name)")
    if strict:
        raise ConfigError(f"{conflict}; the file stores its own architecture: drop the model name (--model)")
    logging.getLogger("mae").warning("%s; using the file's architecture (drop the model name to silence this)",
                                     conflict)


def _note(message: str, source: str) -> None:
    if source == "registry":
        _log.info("%s (no model name given)", message)
    else:
        warnings.warn(f"{message}: shapes do not store the head count; pass a model name or the field to be sure",
                      stacklevel=3)
