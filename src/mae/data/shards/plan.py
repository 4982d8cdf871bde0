"""The epoch plan of a shard set: which global sample indices each rank reads in each epoch, in which order, as a
pure function of (seed, epoch), drawn without reading a byte."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mae.errors import ConfigError

DEFAULT_BUFFER = 1000
"""Samples in the shuffle buffer (webdataset's usual ``shuffle(1000)``)."""


def batches_per_rank(total: int, batch_size: int, world_size: int, drop_last: bool = True) -> int:
    """Batches each rank runs per epoch: ``total // (world_size x batch_size)`` with drop_last (all ranks equal);
    without it the largest rank's ``ceil(ceil(total / world_size) / batch_size)``."""
    if drop_last:
        return total // (world_size * batch_size)
    return math.ceil(math.ceil(total / world_size) / batch_size)


def plan_epoch(counts: Sequence[int], *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
               shuffle: bool = True, drop_last: bool = True, buffer_size: int = DEFAULT_BUFFER) -> np.ndarray:
    """Global sample indices that `rank` reads in `epoch`, in order; batch j is
    ``[j * batch_size, (j+1) * batch_size)``.

    With shuffle, from a generator seeded by (seed, epoch): the shards in a random order, the concatenated stream
    shifted cyclically by a random offset, rank r's contiguous run of ``M = K x batch_size`` positions (K =
    `batches_per_rank`), then a shuffle buffer of `buffer_size` over that run (seeded by (seed, epoch, rank)).
    With drop_last the ``total - world_size x M`` positions after the last rank's run are not read this epoch: a
    contiguous run that starts at a different random place each epoch (so no sample is left out every epoch).
    Without shuffle the stream is the index order; without drop_last every sample is read once, rank r taking the
    r-th of `world_size` near-equal contiguous parts (sizes differ by at most one sample, so the ranks' batch counts
    can differ by one: for evaluation, not for DDP training).
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
    counts = np.asarray(counts, dtype=np.int64)  # type: ignore[assignment]  # the Sequence argument as an int64 array
    total = int(counts.sum())  # type: ignore[attr-defined]  # an array (above)
    rng = np.random.default_rng([seed & 0xFFFF_FFFF, epoch, 0x5A4D])  # entropy (seed, epoch, purpose)
    order = rng.permutation(len(counts)) if shuffle else np.arange(len(counts))
    shift = int(rng.integers(total)) if shuffle else 0
    if drop_last:
        per_rank = batches_per_rank(total, batch_size, world_size) * batch_size
        first, last = rank * per_rank, (rank + 1) * per_rank
    else:
        first, last = rank * total // world_size, (rank + 1) * total // world_size
    positions = (np.arange(first, last, dtype=np.int64) + shift) % total  # positions in the shard-ordered stream
    ordered_counts = counts[order]  # type: ignore[call-overload]  # an array (above)
    ordered_ends = np.cumsum(ordered_counts)
    slot = np.searchsorted(ordered_ends, positions, side="right")  # which shard of the shuffled order
    within = positions - (ordered_ends[slot] - ordered_counts[slot])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    indices = starts[order[slot]] + within
    if shuffle and buffer_size > 1:
        indices = _buffer_shuffle(indices, buffer_size, np.random.default_rng([seed & 0xFFFF_FFFF, epoch, rank, 0xB0F]))
    return indices


def _buffer_shuffle(stream: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """What a shuffle buffer of `size` outputs for `stream`: fill it, then for each new item emit a random slot and
    put the item there; at the end emit the rest in random order."""
    if len(stream) <= size:
        return stream[rng.permutation(len(stream))]
    buffer = stream[:size].tolist()
    slots = rng.integers(0, size, size=len(stream) - size).tolist()
    out = []
    for item, j in zip(stream[size:].tolist(), slots, strict=True):
        out.append(buffer[j])
        buffer[j] = item
    out.extend(buffer[i] for i in rng.permutation(size).tolist())
    return np.asarray(out, dtype=np.int64)
