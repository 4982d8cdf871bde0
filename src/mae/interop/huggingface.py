"""Hugging Face transformers `ViTMAEForPreTraining`: state_dict key maps and config.json, both ways.

Writing uses the on-disk layout of the Hub checkpoints (``facebook/vit-mae-*``, transformers 4.x), which every
transformers release reads. Reading accepts that layout, the layout transformers 5.x ``save_pretrained`` writes
(decoder blocks under ``decoder.decoder_encoder.layer.j`` instead of ``decoder.decoder_layers.j``) and the 5.x
in-memory names (``vit.layers.i.attention.q_proj`` ...). transformers itself is never imported here.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mae.errors import CheckpointError
from mae.interop.hub_metadata import model_card, preprocessor_config, write_hub_metadata
from mae.interop.keys import select
from mae.interop.native import replace_atomically
from mae.models.mae import MAEConfig

HF_WEIGHTS_NAME = "model.safetensors"
HF_CONFIG_NAME = "config.json"

# reference block sub-key -> Hub sub-key (qkv is split separately)
_BLOCK_TO_HF = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_QKV_HF = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
# every spelling of a block sub-module seen in the wild -> reference sub-key ('q'/'k'/'v' are joined into qkv)
_BLOCK_FROM_HF = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
}
_TOP_TO_HF = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
}
_TOP_FROM_HF = {v: k for k, v in _TOP_TO_HF.items()}
_ENC_BLOCK = re.compile(r"^vit\.(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_DEC_BLOCK = re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)\.(weight|bias)$")

# ViTMAEConfig's own defaults, used for fields a config.json leaves out
_HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16, "num_channels": 3,
    "qkv_bias": True, "decoder_num_attention_heads": 16, "decoder_hidden_size": 512, "decoder_num_hidden_layers": 8,
    "decoder_intermediate_size": 2048, "mask_ratio": 0.75, "norm_pix_loss": False,
}


def is_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("vit.", "decoder.decoder_", "decoder.mask_token", "embeddings.patch_embeddings."))
               for k in state_dict)


# ---------------------------------------------------------------------------------------------------- state_dict
def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor] | torch.nn.Module) -> dict[str, torch.Tensor]:
    """Reference / our key names -> `ViTMAEForPreTraining` Hub names; ``qkv`` [3D, D] splits into query / key /
    value rows [0:D], [D:2D], [2D:3D]. Tensors without an HF counterpart (``target.*``) are dropped, with a
    warning if they hold anything. query / key / value are copies (safetensors refuses tensors that share
    memory); the other tensors are the input's own (detached), as in ``state_dict()``."""
    sd = state_dict.state_dict() if isinstance(state_dict, torch.nn.Module) else state_dict
    sd = select(sd, ("encoder", "decoder"), "a transformers ViTMAEForPreTraining checkpoint")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        value = tensor.detach()
        if key in _TOP_TO_HF:
            out[_TOP_TO_HF[key]] = value
            continue
        m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m:
            kind, i, sub, leaf = m.groups()
            prefix = f"vit.encoder.layer.{i}." if kind == "blocks" else f"decoder.decoder_layers.{i}."
            if sub == "attn.qkv":
                for name, chunk in zip(_QKV_HF, value.chunk(3, dim=0), strict=False):
                    out[f"{prefix}{name}.{leaf}"] = chunk.clone()
                continue
            if sub in _BLOCK_TO_HF:
                out[f"{prefix}{_BLOCK_TO_HF[sub]}.{leaf}"] = value
                continue
        elif key.startswith(("mask_token", "decoder_")):
            out[f"decoder.{key}"] = value
            continue
        raise CheckpointError(f"'{key}' has no counterpart in transformers' ViTMAEForPreTraining")
    return out


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ViTMAEForPreTraining` / `ViTMAEModel` names (Hub layout, transformers 5.x on-disk or in-memory layout) ->
    reference names; query / key / value are concatenated back into ``qkv``. Keys with no MAE counterpart
    (``classifier.*`` of an HF classifier, ...) are returned unchanged so that the loader can report them."""
    sd = dict(state_dict)
    if not any(k.startswith("vit.") for k in sd) and any(k.startswith("embeddings.") for k in sd):
        sd = {f"vit.{k}" if not k.startswith("decoder.") else k: v for k, v in sd.items()}  # a bare ViTMAEModel
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in _TOP_FROM_HF:
            out[_TOP_FROM_HF[key]] = value
            continue
        m_enc, m_dec = _ENC_BLOCK.match(key), _DEC_BLOCK.match(key)
        m = m_enc or m_dec
        if m and m.group(2) in _BLOCK_FROM_HF:
            i, sub, leaf = m.groups()
            prefix = f"blocks.{i}" if m_enc else f"decoder_blocks.{i}"
            ref = _BLOCK_FROM_HF[sub]
            if ref in ("q", "k", "v"):
                qkv.setdefault((prefix, leaf), {})[ref] = value
            else:
                out[f"{prefix}.{ref}.{leaf}"] = value
            continue
        if key.startswith("decoder.") and key[len("decoder."):].startswith(("mask_token", "decoder_")):
            out[key[len("decoder."):]] = value
            continue
        if key.startswith("vit.pooler."):  # ViTModel's pooler: a classifier part, skipped by the loader
            out[key[len("vit."):]] = value
            continue
        out[key] = value  # unknown: reported by the loader
    for (prefix, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{prefix}: the file has attention {'/'.join(sorted(parts))} {leaf} but not all of "
                                  f"query, key and value")
        out[f"{prefix}.attn.qkv.{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ---------------------------------------------------------------------------------------------------- config.json
def hf_config_dict(config: MAEConfig, dtype: torch.dtype | None = torch.float32) -> dict[str, Any]:
    """The ``config.json`` of `ViTMAEForPreTraining` for an MAE config.

    ``layer_norm_eps`` is written explicitly (ViTMAEConfig's default 1e-12 is not MAE's 1e-6). Raises
    CheckpointError for what ViTMAE cannot express: non-pixel targets, mask tokens in the encoder and non-square
    images (ViTMAEConfig accepts ``image_size: [H, W]``, but ViTMAEForPreTraining builds its decoder table for a
    square grid and its ``patchify`` takes square images only).
    """
    if config.target not in ("pixel", "norm_pixel"):
        raise CheckpointError(f"transformers' ViTMAEForPreTraining predicts pixels only; this model's target is "
                              f"'{config.target}' (valid for export: pixel, norm_pixel)")
    if config.mask_in_encoder:
        raise CheckpointError("transformers' ViTMAEForPreTraining has no mask tokens in the encoder "
                              "(mask_in_encoder=True cannot be exported)")
    if config.image_hw[0] != config.image_hw[1]:
        raise CheckpointError(f"transformers' ViTMAEForPreTraining supports square images only; this model's "
                              f"img_size is {config.image_hw[0]}x{config.image_hw[1]}")
    d, dd = config.embed_dim, config.decoder_embed_dim
    out = {
        "architectures": ["ViTMAEForPreTraining"],
        "model_type": "vit_mae",
        "hidden_size": d,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": int(d * config.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": config.norm_eps,
        "image_size": config.image_hw[0],
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": True,
        "decoder_num_attention_heads": config.decoder_num_heads,
        "decoder_hidden_size": dd,
        "decoder_num_hidden_layers": config.decoder_depth,
        "decoder_intermediate_size": int(dd * config.mlp_ratio),
        "mask_ratio": config.mask_ratio,
        "norm_pix_loss": config.norm_pix_loss,
    }
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
    return out


def config_from_hf(hf: Mapping[str, Any]) -> MAEConfig:
    """MAEConfig from a `ViTMAEConfig` dict (config.json); missing fields take ViTMAEConfig's defaults."""
    model_type = hf.get("model_type", "vit_mae")
    if model_type != "vit_mae":
        raise CheckpointError(f"config.json is for a '{model_type}' model, expected 'vit_mae' (ViTMAEForPreTraining)")
    c = {**_HF_DEFAULTS, **hf}
    if c["hidden_act"] != "gelu" or not c["qkv_bias"]:
        raise CheckpointError(f"this MAE implements hidden_act 'gelu' with qkv_bias true; the file has "
                              f"hidden_act '{c['hidden_act']}', qkv_bias {c['qkv_bias']}")
    patch = c["patch_size"]
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise CheckpointError(f"non-square patches {list(patch)} are not supported (patch_size must be one int)")
        patch = patch[0]
    image = c["image_size"]
    if isinstance(image, (list, tuple)):
        image = int(image[0]) if len(set(image)) == 1 else tuple(int(s) for s in image)
    d, dd = int(c["hidden_size"]), int(c["decoder_hidden_size"])
    mlp_ratio = c["intermediate_size"] / d
    if int(dd * mlp_ratio) != c["decoder_intermediate_size"] or int(d * mlp_ratio) != c["intermediate_size"]:
        raise CheckpointError(f"encoder MLP {c['intermediate_size']} / {d} and decoder MLP "
                              f"{c['decoder_intermediate_size']} / {dd} use different ratios; this MAE uses one "
                              f"mlp_ratio for both")
    return MAEConfig(
        img_size=image, patch_size=int(patch), in_chans=int(c["num_channels"]), embed_dim=d,
        depth=int(c["num_hidden_layers"]), num_heads=int(c["num_attention_heads"]), mlp_ratio=mlp_ratio,
        decoder_embed_dim=dd, decoder_depth=int(c["decoder_num_hidden_layers"]),
        decoder_num_heads=int(c["decoder_num_attention_heads"]), norm_eps=float(c["layer_norm_eps"]),
        norm_pix_loss=bool(c["norm_pix_loss"]), mask_ratio=float(c["mask_ratio"]),
    )


def save_hf_pretrained(state_dict: Mapping[str, torch.Tensor] | torch.nn.Module, directory: str | Path,
                       config: MAEConfig | None = None, training: Mapping[str, Any] | None = None,
                       license: str = "unknown", mean: list[float] | None = None,
                       std: list[float] | None = None) -> Path:
    """Write a directory that ``ViTMAEForPreTraining.from_pretrained(directory)`` loads: model.safetensors in the
    Hub layout + config.json, a ``preprocessor_config.json`` (``AutoImageProcessor.from_pretrained(directory)``:
    our evaluation transform with `mean` / `std`) and a model card ``README.md`` (`training`: what is known of the
    pre-training, see `mae.interop.hub_metadata.run_facts`; `license`). ``config`` defaults to the model's own when
    a model is given."""
    if config is None:
        config = getattr(state_dict, "config", None)
        if not isinstance(config, MAEConfig):
            raise CheckpointError("writing a transformers directory needs the model's MAEConfig (pass config=)")
    hf_config = hf_config_dict(config, dtype=None)  # validate before writing anything
    tensors = to_hf_state_dict(state_dict)
    if not any(k.startswith("decoder.") for k in tensors):
        warnings.warn("writing an encoder-only transformers checkpoint: ViTMAEForPreTraining.from_pretrained will "
                      "initialise the decoder itself and report its keys as missing", stacklevel=2)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    hf_config["dtype"] = str(dtypes.pop() if len(dtypes) == 1 else torch.float32).removeprefix("torch.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    replace_atomically(directory / HF_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
    replace_atomically(directory / HF_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    write_hf_metadata(directory, config, training, license, mean, std)
    return directory


def write_hf_metadata(directory: str | Path, config: MAEConfig, training: Mapping[str, Any] | None = None,
                      license: str = "unknown", mean: list[float] | None = None,
                      std: list[float] | None = None) -> None:
    """``preprocessor_config.json`` and the model card of an MAE transformers directory (`save_hf_pretrained`)."""
    h, w = config.image_hw
    architecture = {"model": "ViTMAEForPreTraining (encoder + decoder)", "image size": f"{h} x {w}",
                    "patch size": config.patch_size, "channels": config.in_chans,
                    "encoder": f"width {config.embed_dim}, depth {config.depth}, {config.num_heads} heads",
                    "decoder": f"width {config.decoder_embed_dim}, depth {config.decoder_depth}, "
                               f"{config.decoder_num_heads} heads",
                    "target": config.target, "mask ratio": config.mask_ratio}
    name = Path(directory).name
    usage = (f"from transformers import AutoImageProcessor, ViTMAEForPreTraining\n"
             f"processor = AutoImageProcessor.from_pretrained(\"{name}\")\n"
             f"model = ViTMAEForPreTraining.from_pretrained(\"{name}\")\n"
             f"outputs = model(**processor(images=image, return_tensors=\"pt\"))  # loss, logits, mask")
    card = model_card("MAE pre-trained ViT", architecture, usage, "image-feature-extraction", training, license)
    write_hub_metadata(directory, preprocessor_config(config.image_hw, config.in_chans, None, mean, std), card)
