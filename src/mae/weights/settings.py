"""Where released weights are cached and how they are fetched, read from the environment at each call (never at
import: a test or a launcher may set them late).

``MAE_HOME`` (default ``$XDG_CACHE_HOME/mae``, else ``~/.cache/mae``) holds the official files under
``official/<folder>/<file>.pth``; ``MAE_WEIGHTS_MIRROR`` replaces ``https://dl.fbaipublicfiles.com``;
``MAE_DOWNLOAD_TIMEOUT`` (seconds, default 60) bounds every wait on the network; ``MAE_OFFLINE=1`` or
``HF_HUB_OFFLINE=1`` forbids the network. Hub downloads go through huggingface_hub's own cache (``HF_HOME``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mae.errors import WeightsError

__all__ = ["DEFAULT_MIRROR", "cache_home", "download_timeout", "is_offline", "mirror", "official_path"]

DEFAULT_MIRROR = "https://dl.fbaipublicfiles.com"
DEFAULT_TIMEOUT_S = 60.0
_TRUE = ("1", "true", "yes", "on")


def cache_home() -> Path:
    """``$MAE_HOME``, else ``$XDG_CACHE_HOME/mae``, else ``~/.cache/mae``."""
    home = os.environ.get("MAE_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mae"


def official_path(location: str) -> Path:
    """Where an official file (``pretrain/mae_pretrain_vit_base.pth``) is cached."""
    return cache_home() / "official" / location


def mirror() -> str:
    """The base URL the official release is fetched from (``MAE_WEIGHTS_MIRROR``), without a trailing slash."""
    return (os.environ.get("MAE_WEIGHTS_MIRROR") or DEFAULT_MIRROR).rstrip("/")


def official_url(location: str) -> str:
    return f"{mirror()}/mae/{location}"


def is_offline() -> bool:
    """``MAE_OFFLINE`` or ``HF_HUB_OFFLINE`` set to 1 / true / yes / on: no network at all."""
    return any(os.environ.get(key, "").strip().lower() in _TRUE for key in ("MAE_OFFLINE", "HF_HUB_OFFLINE"))


def offline_variable() -> str:
    """The variable that made this process offline, for messages."""
    return next((key for key in ("MAE_OFFLINE", "HF_HUB_OFFLINE")
                 if os.environ.get(key, "").strip().lower() in _TRUE), "MAE_OFFLINE")


def download_timeout() -> float:
    """``MAE_DOWNLOAD_TIMEOUT`` in seconds (default 60): the longest wait for a connection or for the next bytes."""
    text = os.environ.get("MAE_DOWNLOAD_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise WeightsError(f"MAE_DOWNLOAD_TIMEOUT must be a positive number of seconds, got '{text}'; unset it for "
                           f"the default {DEFAULT_TIMEOUT_S:g}")
    return value
