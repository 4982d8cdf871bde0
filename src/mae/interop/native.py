"""This project's own checkpoint format: one ``.safetensors`` file with the weights (our = reference key names)
and the `MAEConfig` as JSON in the file's metadata (``format: mae``, ``mae_config: {...}``), or a directory
holding that file as ``model.safetensors`` plus a ``config.json`` copy of the config for humans.

safetensors holds tensors only, so loading runs no code; the stored config rebuilds the architecture.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mae.errors import CheckpointError
from mae.files import atomic_write_path
from mae.models.mae import MaskedAutoencoderViT
from mae.train.checkpoint import refuse_nonfinite
from mae.version import __version__

FORMAT_VALUE = "mae"
CONFIG_KEY = "mae_config"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def replace_atomically(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``: a reader sees
    the old file or the new one, never half of one (`mae.files.atomic_write_path`)."""
    atomic_write_path(path, lambda tmp: write(str(tmp)))


def save_model(model: MaskedAutoencoderViT, path: str | Path) -> Path:
    """Save weights + architecture. ``path`` ending in ``.safetensors``: one file; anything else: a directory with
    ``model.safetensors`` and ``config.json``. Returns the path of the safetensors file."""
    if not isinstance(model, MaskedAutoencoderViT):
        raise CheckpointError(f"save_model saves a MaskedAutoencoderViT, got {type(model).__name__}")
    path = Path(path)
    if path.suffix and path.suffix != ".safetensors":
        raise CheckpointError(f"save_model writes '.safetensors' files or directories, got '{path}'; for the "
                              f"reference '.pth' format use mae.interop.convert(..., to='reference')")
    return save_state_dict(model.state_dict(), model.config.to_dict(), path)


def save_state_dict(state_dict: dict[str, torch.Tensor], config: dict, path: str | Path) -> Path:
    """`save_model` for a state_dict (our key names) and an `MAEConfig.to_dict()` (`convert` builds no model)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    metadata = {"format": FORMAT_VALUE, CONFIG_KEY: json.dumps(config), "mae_version": __version__}
    file = path if path.suffix == ".safetensors" else path / WEIGHTS_NAME
    replace_atomically(file, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    if file is not path:
        text = json.dumps({"format": FORMAT_VALUE, **config}, indent=2) + "\n"
        replace_atomically(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return file


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; CheckpointError for a missing, truncated or corrupt one, or one
    holding NaN or inf (`mae.train.checkpoint.refuse_nonfinite`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            names = f.keys()
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint '{path}' is truncated or corrupt ({str(e).strip()[:200]}); "
                              f"use an earlier file or download it again") from None
    refuse_nonfinite(tensors, path)
    return tensors, metadata
