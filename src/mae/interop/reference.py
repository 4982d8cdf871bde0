"""The reference release's ``.pth`` files: ``{'model': state_dict, ...}`` with the reference key names.

"pretrain" files hold the encoder only, "full"/"visualize" files encoder + decoder, fine-tuned files the encoder
with ``fc_norm.*`` / ``head.*`` instead of ``norm.*``. Files written by the reference training code also hold
'optimizer', 'epoch', 'scaler' and the training arguments as an ``argparse.Namespace`` under 'args'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mae.interop.keys import part_of, select


def to_reference_checkpoint(state_dict: Mapping[str, torch.Tensor] | torch.nn.Module,
                            encoder_only: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """``{'model': sd}`` with reference key names, ready for ``torch.save``. Our extra tensors (``target.*``
    buffers such as a PCA basis) have no reference counterpart and are dropped, with a warning if they hold
    anything; ``encoder_only=True`` writes a "pretrain"-style file (no decoder). Tensors are the input's own
    (detached, not copied), as in ``state_dict()``."""
    sd = state_dict.state_dict() if isinstance(state_dict, torch.nn.Module) else state_dict
    if encoder_only:
        sd = {k: v for k, v in sd.items() if part_of(k) != "decoder"}
    kept = select(sd, ("encoder", "decoder", "head"), "the reference checkpoint format")
    return {"model": {k: v.detach() for k, v in kept.items()}}


def hints_from_args(args: Any) -> dict[str, Any]:
    """What the reference training arguments say about the architecture: model name, norm_pix_loss, input size,
    mask ratio (any may be absent)."""
    hints: dict[str, Any] = {}
    if args is None:
        return hints
    get = args.get if isinstance(args, Mapping) else (lambda k, d=None: getattr(args, k, d))
    if isinstance(get("model"), str):
        hints["model_name"] = get("model")
    for key, hint in (("norm_pix_loss", "norm_pix_loss"), ("mask_ratio", "mask_ratio"), ("input_size", "img_size")):
        value = get(key)
        if isinstance(value, (bool, int, float)):
            hints[hint] = value
    return hints
