"""Seeding and the random-number state of python, numpy and torch, stored so that a resumed run draws the same numbers.

The captured state holds only tensors, ints, floats, strings and None, so it goes into a checkpoint that loads
with ``torch.load(weights_only=True)``. The state is per process: in a multi-process run each rank has its own
(seeded with seed + rank), so save every rank's state, or reseed on resume, rather than restoring rank 0's
state everywhere (which would give every rank the same masks and augmentations).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from mae.errors import ConfigError

__all__ = ["capture_rng_state", "restore_rng_state", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy's global generator and torch (CPU and every CUDA device)."""
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def capture_rng_state() -> dict[str, Any]:
    """The current state of every generator `seed_everything` seeds, as weights-only-loadable data."""
    version, internal, gauss_next = random.getstate()
    key, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "key": key,
            "state": torch.from_numpy(keys.astype(np.int64)),  # type: ignore[union-attr]  # legacy=True gives the (str, uint32 array, ...) tuple
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: under DDP every rank owns one GPU and must not touch the others
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back to a state from `capture_rng_state` (missing parts are left as they are)."""
    if "python" in state:
        py = state["python"]
        internal = tuple(int(v) for v in py["state"].tolist())
        random.setstate((int(py["version"]), internal, py["gauss_next"]))
    if "numpy" in state:
        npy = state["numpy"]
        keys = npy["state"].numpy().astype(np.uint32)
        np.random.set_state((npy["key"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
