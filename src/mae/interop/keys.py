"""Which part of a masked autoencoder a reference-style key belongs to, and small state_dict helpers.

The reference key names (identical to timm's `VisionTransformer` for the encoder) are this project's own
state_dict names, so they are the hub every converter maps to and from.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping

import torch

from mae.errors import excerpt

ENCODER_NAMES = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")
DECODER_NAMES = ("mask_token", "decoder_embed", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred")
# classifier parts of fine-tuned files: reference / timm (fc_norm, head), transformers (classifier, pooler)
HEAD_NAMES = ("fc_norm", "head", "classifier", "pooler")

_BLOCK = re.compile(r"^(blocks|decoder_blocks)\.(\d+)\.")


def _first(key: str) -> str:
    return key.split(".", 1)[0]


def part_of(key: str) -> str:
    """'encoder', 'decoder', 'head' or 'other' (e.g. this project's ``target.*`` buffers)."""
    first = _first(key)
    if first in ENCODER_NAMES:
        return "encoder"
    if first in DECODER_NAMES:
        return "decoder"
    if first in HEAD_NAMES:
        return "head"
    return "other"


def keys_of(state_dict: Iterable[str], part: str) -> list[str]:
    return [k for k in state_dict if part_of(k) == part]


def has_decoder(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(part_of(k) == "decoder" for k in state_dict)


def is_finetuned(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """A fine-tuned classifier: global-average-pool ``fc_norm`` (+ ``head``) and no final ``norm``."""
    return any(k.startswith("fc_norm.") for k in state_dict) and not any(k.startswith("norm.") for k in state_dict)


def block_count(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of transformer blocks under ``prefix`` ('blocks' or 'decoder_blocks'): 1 + the largest index."""
    indices = [int(m.group(2)) for k in state_dict if (m := _BLOCK.match(k)) and m.group(1) == prefix]
    return max(indices) + 1 if indices else 0


def carries_information(tensor: torch.Tensor) -> bool:
    """True unless the tensor is all zeros / False (e.g. an unfitted PCA basis)."""
    return bool(tensor.numel()) and bool(torch.count_nonzero(tensor.detach()).item())


def select(state_dict: Mapping[str, torch.Tensor], parts: tuple[str, ...], what: str) -> dict[str, torch.Tensor]:
    """Keep the keys of the given parts; warn about dropped tensors that hold anything but zeros."""
    kept = {k: v for k, v in state_dict.items() if part_of(k) in parts}
    lost = [k for k, v in state_dict.items() if k not in kept and carries_information(v)]
    if lost:
        warnings.warn(f"{what} has no place for {excerpt(lost)}: these tensors are not written", stacklevel=3)
    return kept


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Remove a wrapper prefix (DistributedDataParallel's ``module.``) when every key has it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def shape_str(t: torch.Tensor | torch.Size) -> str:
    shape = t.shape if isinstance(t, torch.Tensor) else t
    return "[" + ", ".join(str(s) for s in shape) + "]"


def short_list(keys: Iterable[str], n: int = 4) -> str:
    """'a, b, c, d (+N more)': `mae.errors.excerpt` of a key list, sorted."""
    return excerpt(sorted(keys), n)
