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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
BLOCK_TO_HF = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
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
_ATTENTION = "attention.attention."


@dataclass(frozen=True)
class KeyLayout:
    """What differs between the transformers MAE models in their state_dict names; `to_hf_keys` / `from_hf_keys`
    do the rest. Block sub-keys are what follows ``<blocks>.<i>.``; a ``qkv`` tensor is handled by `split_qkv`
    (our leaf, tensor -> [(HF sub-key, tensor)]) and, reading, by `qkv_parts` (HF sub-key -> (group, part)),
    whose parts are joined per block and group by `join_qkv` (prefix, group, parts -> {our sub-key: tensor})."""

    model: str  # the transformers class, for messages
    encoder: str  # HF prefix of the encoder: "vit." / "videomae."
    top: Mapping[str, str]  # our top-level key -> HF key
    block_to_hf: Mapping[str, str]  # our block sub-module -> HF sub-module (qkv apart)
    block_from_hf: Mapping[str, str]  # HF block sub-module (every spelling read) -> ours (qkv parts apart)
    split_qkv: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]
    qkv_parts: Mapping[str, tuple[str, str]]
    join_qkv: Callable[[str, str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    encoder_blocks: str = r"encoder\.layer"  # regex of the HF encoder block list (after `encoder`)
    decoder_blocks: str = r"decoder\.decoder_layers"  # regex of the HF decoder block list
    passthrough: tuple[tuple[str, str], ...] = ()  # (our key prefix, HF key prefix): renamed as they are
    read_only: tuple[tuple[str, str], ...] = ()  # further (our prefix, HF prefix) pairs applied when reading
    any_leaf: bool = False  # reading, a known sub-module's tensors may have any name (not only weight / bias)

    @property
    def top_from_hf(self) -> dict[str, str]:
        return {v: k for k, v in self.top.items()}

    @property
    def block_pattern(self) -> re.Pattern[str]:
        return re.compile(rf"^(?:({re.escape(self.encoder)}(?:{self.encoder_blocks}))|(?:{self.decoder_blocks}))"
                          rf"\.(\d+)\.(.+)$")


def to_hf_keys(layout: KeyLayout, state_dict: Mapping[str, torch.Tensor] | torch.nn.Module
               ) -> dict[str, torch.Tensor]:
    """Our key names -> ``layout``'s HF names (see `to_hf_state_dict`). ``qkv`` pieces are copies; the other
    tensors are the input's own (detached)."""
    sd = state_dict.state_dict() if isinstance(state_dict, torch.nn.Module) else state_dict
    sd = select(sd, ("encoder", "decoder"), f"a transformers {layout.model} checkpoint")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        value = tensor.detach()
        if key in layout.top:
            out[layout.top[key]] = value
            continue
        m = re.match(r"^(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m:
            kind, i, sub, leaf = m.groups()
            prefix = f"{layout.encoder}encoder.layer.{i}." if kind == "blocks" else f"decoder.decoder_layers.{i}."
            if sub == "attn.qkv":
                for name, piece in layout.split_qkv(leaf, value):
                    out[f"{prefix}{name}"] = piece
                continue
            if sub in layout.block_to_hf:
                out[f"{prefix}{layout.block_to_hf[sub]}.{leaf}"] = value
                continue
        else:
            renamed = _rename_prefix(key, layout.passthrough, 0)
            if renamed is not None:
                out[renamed] = value
                continue
        raise CheckpointError(f"'{key}' has no counterpart in transformers' {layout.model}")
    return out


def from_hf_keys(layout: KeyLayout, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``layout``'s HF names -> ours (see `from_hf_state_dict`); keys without a counterpart are returned
    unchanged so that the loader can report them."""
    top, pattern = layout.top_from_hf, layout.block_pattern
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key in top:
            out[top[key]] = value
            continue
        m = pattern.match(key)
        if m:
            enc, i, sub = m.groups()
            prefix = f"blocks.{i}" if enc else f"decoder_blocks.{i}"
            module, _, leaf = sub.rpartition(".")
            if sub in layout.qkv_parts:
                group, part = layout.qkv_parts[sub]
                parts.setdefault((prefix, group), {})[part] = value
                continue
            if (layout.any_leaf or leaf in ("weight", "bias")) and module in layout.block_from_hf:
                out[f"{prefix}.{layout.block_from_hf[module]}.{leaf}"] = value
                continue
        renamed = _rename_prefix(key, layout.passthrough + layout.read_only, 1)
        out[key if renamed is None else renamed] = value  # unknown: reported by the loader
    for (prefix, group), p in parts.items():
        out.update((f"{prefix}.{sub}", t) for sub, t in layout.join_qkv(prefix, group, p).items())
    return out


def _rename_prefix(key: str, pairs: tuple[tuple[str, str], ...], side: int) -> str | None:
    """`key` with the first matching prefix of ``pairs[.][side]`` replaced by the other side's; None: no match."""
    for pair in pairs:
        if key.startswith(pair[side]):
            return pair[1 - side] + key[len(pair[side]):]
    return None


def _split_qkv(leaf: str, qkv: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """ViTMAE: ``qkv`` [3D, ...] -> query / key / value rows [0:D], [D:2D], [2D:3D], weight and bias alike."""
    return [(f"{_ATTENTION}{name}.{leaf}", chunk.clone())
            for name, chunk in zip(("query", "key", "value"), qkv.chunk(3, dim=0), strict=False)]


def _join_qkv(prefix: str, leaf: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if set(parts) != {"q", "k", "v"}:
        raise CheckpointError(f"{prefix}: the file has attention {'/'.join(sorted(parts))} {leaf} but not all of "
                              f"query, key and value")
    return {f"attn.qkv.{leaf}": torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)}


VIT_MAE_KEYS = KeyLayout(
    model="ViTMAEForPreTraining", encoder="vit.", top=_TOP_TO_HF, block_to_hf=BLOCK_TO_HF,
    block_from_hf={k: v for k, v in _BLOCK_FROM_HF.items() if v not in ("q", "k", "v")},
    split_qkv=_split_qkv,
    qkv_parts={f"{module}.{leaf}": (leaf, ref) for module, ref in _BLOCK_FROM_HF.items() if ref in ("q", "k", "v")
               for leaf in ("weight", "bias")},
    join_qkv=_join_qkv, encoder_blocks=r"encoder\.layer|layers",
    decoder_blocks=r"decoder\.(?:decoder_layers|decoder_encoder\.layer)",
    passthrough=(("mask_token", "decoder.mask_token"), ("decoder_", "decoder.decoder_")),
    read_only=(("pooler.", "vit.pooler."),),  # ViTModel's pooler: a classifier part, skipped by the loader
)


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
    return to_hf_keys(VIT_MAE_KEYS, state_dict)


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ViTMAEForPreTraining` / `ViTMAEModel` names (Hub layout, transformers 5.x on-disk or in-memory layout) ->
    reference names; query / key / value are concatenated back into ``qkv``. Keys with no MAE counterpart
    (``classifier.*`` of an HF classifier, ...) are returned unchanged so that the loader can report them."""
    sd = dict(state_dict)
    if not any(k.startswith("vit.") for k in sd) and any(k.startswith("embeddings.") for k in sd):
        sd = {f"vit.{k}" if not k.startswith("decoder.") else k: v for k, v in sd.items()}  # a bare ViTMAEModel
    return from_hf_keys(VIT_MAE_KEYS, sd)


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
    c, (image, patch, d, dd, mlp_ratio) = read_hf_config(hf, "vit_mae", VIT_MAE_KEYS.model, _HF_DEFAULTS,
                                                         "qkv_bias", "MAE")
    return MAEConfig(
        img_size=image, patch_size=patch, in_chans=int(c["num_channels"]), embed_dim=d,
        depth=int(c["num_hidden_layers"]), num_heads=int(c["num_attention_heads"]), mlp_ratio=mlp_ratio,
        decoder_embed_dim=dd, decoder_depth=int(c["decoder_num_hidden_layers"]),
        decoder_num_heads=int(c["decoder_num_attention_heads"]), norm_eps=float(c["layer_norm_eps"]),
        norm_pix_loss=bool(c["norm_pix_loss"]), mask_ratio=float(c["mask_ratio"]),
    )


def read_hf_config(hf: Mapping[str, Any], model_type: str, model: str, defaults: Mapping[str, Any], bias: str,
                   ours: str) -> tuple[dict[str, Any], tuple[Any, int, int, int, float]]:
    """A transformers MAE config dict (`model_type`, class `model`) with its missing fields taken from `defaults`,
    and its (image size, patch size, encoder width, decoder width, MLP ratio). CheckpointError for another model
    type, an activation other than gelu, no attention bias (the flag `bias`), non-square patches and MLP ratios
    that differ between encoder and decoder; `ours` names our model in messages."""
    found = hf.get("model_type", model_type)
    if found != model_type:
        raise CheckpointError(f"config.json is for a '{found}' model, expected '{model_type}' ({model})")
    c = {**defaults, **hf}
    if c["hidden_act"] != "gelu" or not c[bias]:
        raise CheckpointError(f"this {ours} implements hidden_act 'gelu' with {bias} true; the file has "
                              f"hidden_act '{c['hidden_act']}', {bias} {c[bias]}")
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
    return c, (image, int(patch), d, dd, mlp_ratio)


def model_config(state_dict: object, config: MAEConfig | None) -> MAEConfig:
    """`config`, or by default the model's own (`state_dict` being a model)."""
    if config is None:
        config = getattr(state_dict, "config", None)
        if not isinstance(config, MAEConfig):
            raise CheckpointError("writing a transformers directory needs the model's MAEConfig (pass config=)")
    return config


def write_hf_directory(directory: str | Path, tensors: Mapping[str, torch.Tensor], hf_config: dict[str, Any],
                       model: str) -> Path:
    """model.safetensors (HF-named `tensors`) and config.json (`hf_config`, given the tensors' ``dtype``) of a
    transformers `model` directory, each replaced atomically. Warns when the tensors have no decoder."""
    if not any(k.startswith("decoder.") for k in tensors):
        warnings.warn(f"writing an encoder-only transformers checkpoint: {model}.from_pretrained will "
                      "initialise the decoder itself and report its keys as missing", stacklevel=3)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    hf_config["dtype"] = str(dtypes.pop() if len(dtypes) == 1 else torch.float32).removeprefix("torch.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    replace_atomically(directory / HF_WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
    replace_atomically(directory / HF_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


def save_hf_pretrained(state_dict: Mapping[str, torch.Tensor] | torch.nn.Module, directory: str | Path,
                       config: MAEConfig | None = None, training: Mapping[str, Any] | None = None,
                       license: str = "unknown", mean: list[float] | None = None,
                       std: list[float] | None = None) -> Path:
    """Write a directory that ``ViTMAEForPreTraining.from_pretrained(directory)`` loads: model.safetensors in the
    Hub layout + config.json, a ``preprocessor_config.json`` (``AutoImageProcessor.from_pretrained(directory)``:
    our evaluation transform with `mean` / `std`) and a model card ``README.md`` (`training`: what is known of the
    pre-training, see `mae.interop.hub_metadata.run_facts`; `license`). ``config`` defaults to the model's own when
    a model is given."""
    config = model_config(state_dict, config)
    hf_config = hf_config_dict(config, dtype=None)  # validate before writing anything
    directory = write_hf_directory(directory, to_hf_state_dict(state_dict), hf_config, VIT_MAE_KEYS.model)
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
