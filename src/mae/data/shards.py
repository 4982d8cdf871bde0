"""Reading tar shards in the webdataset layout (``--data shards:DIR``) with an exact, resumable epoch plan.

A shard is a plain tar file; a sample is the run of consecutive members that share a key (``000123.jpg`` and
``000123.cls``: the image, and the class index as ASCII text), as webdataset writes and reads them. ``mae prepare``
writes the shards and an ``index.json`` (shards, sample counts, class names per split); see `mae.data.shard_writer`.

Why not the ``webdataset`` package for reading: its pipeline is a stream, and by its own documentation it cannot
restart exactly in the middle of an epoch. Here the epoch is planned up front, from the sample counts, as a list
of global sample indices per rank and batch, and each sample is read by seeking to its bytes (the member table of
a shard comes from its tar headers, read once per process). So:

- the order is a pure function of (seed, epoch): a shuffled shard order, a cyclic shift of the resulting stream,
  and a bounded shuffle buffer, all drawn from a generator seeded by (seed, epoch) (the buffer is simulated on
  indices, so no byte is read to know the order);
- ranks take equal contiguous runs of that stream (rank r of R: positions r*M ... (r+1)*M - 1, M = K x batch), so
  every sample is seen at most once per epoch and every rank runs the same K batches;
- ``set_epoch(epoch, skip=k)`` starts at batch k without reading, let alone decoding, batches 0 ... k-1;
- each sample's augmentation and masking noise come from RNGs (torch, ``random``, numpy) seeded by a hash of
  (seed, epoch, global sample index), as `SeededDataset` + `WithMaskNoise` do for folders: batch j holds the same
  pixels with 0 or N DataLoader workers, and after a resume.

Shards must be files (local or a network file system): the reader seeks. The bounded shuffle buffer keeps reads
local: at any time a worker reads from the one or two shards around its place in the stream.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import math
import os
import re
import tarfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_jpeg

from mae.data.device_decode import EncodedJpeg
from mae.data.folders import UNLABELED, ImageDataset, to_mode
from mae.errors import ConfigError, DataError

__all__ = ["INDEX_NAME", "SHARDS_PREFIX", "ShardDataset", "ShardLoader", "ShardSet", "build_shard_dataset",
           "build_shard_loader", "expand_braces", "is_shard_spec", "plan_epoch", "resolve_shards"]

log = logging.getLogger("mae")

SHARDS_PREFIX = "shards:"
INDEX_NAME = "index.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
"""Member extensions read as the sample's image (the first one present), as webdataset names them."""
LABEL_EXTENSION = "cls"
JPEG_EXTENSIONS = ("jpg", "jpeg")
DECODERS = ("tensor", "pil", "encoded")
MODES = ("RGB", "L")
DEFAULT_BUFFER = 1000
"""Samples in the shuffle buffer (webdataset's usual ``shuffle(1000)``)."""
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # webdataset's key / extension split: up to the first dot
_OPEN_FILES = 8  # open shard files per process (the reader moves through one or two shards at a time)
_TABLES = 64  # member tables kept per process


def is_shard_spec(spec: str) -> bool:
    """True for ``shards:...`` data specs."""
    return isinstance(spec, str) and spec.startswith(SHARDS_PREFIX)


# ---------------------------------------------------------------------------------------------------------------------
# which shards: an index.json, or a brace pattern
# ---------------------------------------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``a-{000..002}.tar`` -> a-000.tar a-001.tar a-002.tar; ``{x,y}``; several groups.

    Numeric ranges keep the zero padding of their first bound.
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise DataError(f"shard pattern '{pattern}' has a '}}' without '{{'")
        return [pattern]
    depth, end = 0, -1
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            end = i
            break
    if end < 0:
        raise DataError(f"shard pattern '{pattern}' has a '{{' without its '}}'")
    body, head, tail = pattern[start + 1:end], pattern[:start], pattern[end + 1:]
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        a, b = numeric.groups()
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        choices = [str(n).zfill(width) for n in range(lo, hi + step, step)]
    elif "," in body:
        choices = _split_top_level(body)
    else:
        raise DataError(f"shard pattern '{pattern}': '{{{body}}}' is neither a range like {{000000..000099}} "
                        "nor a list like {a,b}")
    return [out for choice in choices for out in expand_braces(head + choice + tail)]


def _split_top_level(body: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in body:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split: paths, sample counts (from the index, or counted), class names."""

    spec: str
    split: str
    paths: tuple[str, ...]
    counts: tuple[int, ...]
    classes: tuple[str, ...] = ()
    labelled: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def starts(self) -> list[int]:
        """Global index of each shard's first sample (index order)."""
        return [0, *np.cumsum(self.counts)[:-1].tolist()]


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"shard index '{path}' is unreadable or not JSON ({e}); rerun mae prepare") from e
    if not isinstance(index, dict) or not isinstance(index.get("splits"), dict):
        raise DataError(f"shard index '{path}' has no 'splits' table; it was not written by mae prepare")
    return index


def _split_entry(index: dict, path: Path, split: str) -> dict:
    splits = index["splits"]
    if split not in splits:
        raise DataError(f"shard index '{path}' has no '{split}' split; it has: {', '.join(splits) or 'none'}")
    entry = splits[split]
    try:
        [(str(s["name"]), int(s["samples"])) for s in entry["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"shard index '{path}': split '{split}' has no valid shard list ({e}); rerun mae prepare"
                        ) from e
    return entry


def resolve_shards(spec: str, split: str = "train") -> ShardSet:
    """The shards that `spec` names for `split`, with their sample counts.

    `spec` is ``shards:DIR`` (a folder with ``index.json``, which may list several splits), ``shards:FILE.tar`` or a
    brace pattern ``shards:/data/train-{000000..000099}.tar``. A pattern (or a single file) is one set of shards,
    read as the train split; its counts come from an ``index.json`` beside the shards that lists them, or else
    from reading their tar headers once.
    """
    rest = spec[len(SHARDS_PREFIX):] if is_shard_spec(spec) else spec
    if not rest:
        raise DataError("empty shard spec 'shards:'; give shards:DIR (a folder with index.json) or a pattern like "
                        "shards:/data/train-{000000..000099}.tar")
    if "://" in rest or rest.startswith("pipe:"):
        raise DataError(f"shard spec '{spec}': only files are read (the reader seeks); copy or mount the shards "
                        "locally")
    if "{" not in rest and "}" not in rest and Path(rest).expanduser().is_dir():
        root = Path(rest).expanduser()
        index_path = root / INDEX_NAME
        if not index_path.is_file():
            raise DataError(f"shard folder '{root}' has no {INDEX_NAME}; write one with 'mae prepare', or name the "
                            f"shards with a pattern like shards:{root}/train-{{000000..000009}}.tar")
        entry = _split_entry(_read_index(index_path), index_path, split)
        paths = tuple(str(root / s["name"]) for s in entry["shards"])
        counts = tuple(int(s["samples"]) for s in entry["shards"])
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"shard index '{index_path}' lists {len(missing)} missing shard(s), first "
                            f"'{missing[0]}'; rerun mae prepare")
        return _checked(ShardSet(spec, split, paths, counts, tuple(entry.get("classes") or ()),
                                 bool(entry.get("labelled", bool(entry.get("classes"))))))
    if split != "train":
        raise DataError(f"shard pattern '{spec}' names one set of shards (read as the train split); for the "
                        f"'{split}' split give the folder with {INDEX_NAME} (mae prepare writes one per split)")
    paths = tuple(str(Path(p).expanduser()) for p in expand_braces(rest))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"shard pattern '{spec}': {len(missing)} of {len(paths)} shard file(s) do not exist, first "
                        f"'{missing[0]}'")
    known = _counts_from_nearby_index(paths)
    if known is not None:
        counts, classes, labelled = known
    else:
        log.info("shards: no %s beside %s lists them; counting samples from their tar headers", INDEX_NAME, rest)
        tables = [read_member_table(p) for p in paths]
        counts = tuple(len(t) for t in tables)
        labels = [_read_label(p, sample) for p, t in zip(paths, tables, strict=True) for sample in t
                  if LABEL_EXTENSION in sample]
        labelled = bool(labels) and all(label is not None for label in labels)
        classes = tuple(str(i) for i in range(max(labels) + 1)) if labelled else ()  # type: ignore[type-var, operator]  # labelled: no label is None
    return _checked(ShardSet(spec, split, paths, counts, classes, labelled))


def _counts_from_nearby_index(paths: Sequence[str]) -> tuple[tuple[int, ...], tuple[str, ...], bool] | None:
    """Counts from an index.json in the shards' folder, when it lists every one of them (in one split)."""
    folder = Path(paths[0]).parent
    index_path = folder / INDEX_NAME
    if not index_path.is_file() or any(Path(p).parent != folder for p in paths):
        return None
    try:
        index = _read_index(index_path)
    except DataError:
        return None
    for entry in index["splits"].values():
        table = {s.get("name"): s.get("samples") for s in entry.get("shards", []) if isinstance(s, dict)}
        if all(Path(p).name in table for p in paths):
            classes = tuple(entry.get("classes") or ())
            return (tuple(int(table[Path(p).name]) for p in paths), classes,  # type: ignore[arg-type]  # every listed shard has its sample count
                    bool(entry.get("labelled", bool(classes))))
    return None


def _checked(shards: ShardSet) -> ShardSet:
    if not shards.paths:
        raise DataError(f"shard spec '{shards.spec}' names no shards")
    if shards.total == 0:
        raise DataError(f"shards of '{shards.spec}' ({shards.split}) hold no samples")
    return shards


# ---------------------------------------------------------------------------------------------------------------------
# a shard's member table, from its tar headers
# ---------------------------------------------------------------------------------------------------------------------

Sample = dict[str, tuple[int, int]]
"""A sample's members: extension -> (byte offset of the data in the tar file, size)."""


def read_member_table(path: str) -> list[Sample]:
    """The samples of a tar shard in order (consecutive members with one key; those with an image member), from
    the tar headers only: data is skipped by seeking. A truncated shard gives the complete samples before the cut
    (with a warning; a sample whose members may be cut off is dropped, never read without its label); a file that
    is not a tar raises DataError."""
    samples: list[Sample] = []
    size = os.path.getsize(path)
    key: str | None = None
    current: Sample = {}
    truncated = False
    try:
        with tarfile.open(path, mode="r:") as tar:
            while True:
                try:
                    member = tar.next()
                except (tarfile.ReadError, EOFError, OSError):
                    truncated = True
                    break
                if member is None:
                    break
                if not member.isfile():
                    continue
                m = _MEMBER.match(member.name)
                if m is None:
                    continue
                if member.offset_data + member.size > size:
                    truncated = True
                    if m.group(1) != key and _image_ext(current):  # the cut is past the previous sample: keep it
                        samples.append(current)
                    break
                if m.group(1) != key:
                    if _image_ext(current):
                        samples.append(current)
                    key, current = m.group(1), {}
                current[m.group(2).lower()] = (member.offset_data, member.size)
    except (tarfile.ReadError, OSError, EOFError) as e:
        raise DataError(f"shard '{path}' is not a readable tar file ({e}); rerun mae prepare or remove it") from e
    if not truncated and _image_ext(current):
        samples.append(current)
    if truncated:
        warnings.warn(f"shard '{path}' is truncated: reading the {len(samples)} complete samples before the cut",
                      stacklevel=2)
    return samples


def _image_ext(sample: Sample) -> str | None:
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)


def _read_label(path: str, sample: Sample) -> int | None:
    offset, size = sample[LABEL_EXTENSION]
    with open(path, "rb") as f:
        f.seek(offset)
        return _parse_label(f.read(size))


def _parse_label(data: bytes) -> int | None:
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return label if label >= 0 else None


# ---------------------------------------------------------------------------------------------------------------------
# random access to samples
# ---------------------------------------------------------------------------------------------------------------------


class ShardDataset(ImageDataset):
    """Sample i of a shard set (global index, index order) as ``(image, label)``; label -1 without ``.cls`` members.

    A member that does not decode (or a sample lost to a truncated shard) is skipped with a warning and replaced by
    the next readable sample, so an index always gives the same item; `strict=True` raises instead. Skips are
    flagged in shared memory: `num_skipped` / `unreadable_files()` count what DataLoader workers met too.

    Args:
        shards: from `resolve_shards`.
        transform: applied to the decoded image (uint8 `tv_tensors.Image` for JPEGs with decode='tensor', else PIL).
        mode: 'RGB' or 'L'.
        decode: 'tensor' (torchvision.io for JPEG members, PIL for others), 'pil', or 'encoded' (JPEG bytes and size,
            for decoding on the GPU, see `mae.data.device_decode`).
        strict: raise DataError at the first unreadable sample.
    """

    def __init__(self, shards: ShardSet, transform: Callable | None = None, mode: str = "RGB",
                 decode: str = "tensor", strict: bool = False):
        if mode not in MODES:
            raise DataError(f"image mode '{mode}' is not supported; use one of {', '.join(MODES)}")
        if decode not in DECODERS:
            raise DataError(f"image decoder '{decode}' is not supported for shards; use one of {', '.join(DECODERS)}")
        self.shards, self.transform, self.mode, self.decode, self.strict = shards, transform, mode, decode, strict
        self.starts = shards.starts
        self.classes = list(shards.classes)
        self.bad_samples: list[int] = []
        """Unreadable samples met so far by this process."""
        self._unreadable = torch.zeros(shards.total, dtype=torch.uint8).share_memory_()
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._files: OrderedDict[int, io.BufferedReader] = OrderedDict()
        self._tables: OrderedDict[int, list[Sample]] = OrderedDict()

    def __getstate__(self) -> dict:  # open files and tables stay in their process (spawned workers rebuild them)
        state = self.__dict__.copy()
        state["_files"], state["_tables"] = OrderedDict(), OrderedDict()
        return state

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable samples met so far by any process."""
        return int(self._unreadable.sum())

    def unreadable_files(self) -> list[str]:
        """``shard.tar[position]`` of each sample skipped so far, in any process (worker processes included)."""
        return [self.describe(i) for i in self._unreadable.nonzero().flatten().tolist()]

    def describe(self, index: int) -> str:
        shard, position = self.locate(index)
        return f"{self.shards.paths[shard]}[{position}]"

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, position in the shard) of global sample `index`."""
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def __len__(self) -> int:
        return self.shards.total

    def __getitem__(self, index: int) -> tuple[object, int]:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"sample {index} is out of range for {n} samples")
        for offset in range(n):  # an unreadable sample is replaced by the next readable one: deterministic
            i = (index + offset) % n
            item = self._load(i)
            if item is not None:
                image, label = item
                return (self.transform(image) if self.transform is not None else image), label
            self._unreadable[i] = 1
        raise DataError(f"no sample of the shards of '{self.shards.spec}' could be read")

    # reading -----------------------------------------------------------------------------------------------------

    def _table(self, shard: int) -> list[Sample]:
        if os.getpid() != self._pid:  # a forked worker: never share file offsets with the parent
            self._reset_process_state()
        table = self._tables.get(shard)
        if table is None:
            table = read_member_table(self.shards.paths[shard])
            expected = self.shards.counts[shard]
            if len(table) != expected:
                warnings.warn(f"shard '{self.shards.paths[shard]}' holds {len(table)} samples, its index says "
                              f"{expected}; the missing ones are skipped", stacklevel=3)
            self._tables[shard] = table
            if len(self._tables) > _TABLES:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(shard)
        return table

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        f = self._files.get(shard)
        if f is None:
            f = open(self.shards.paths[shard], "rb")  # noqa: SIM115 (kept open in the LRU cache, closed on eviction)
            self._files[shard] = f
            if len(self._files) > _OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes")
        return data

    def _load(self, index: int) -> tuple[object, int] | None:
        shard, position = self.locate(index)
        table = self._table(shard)
        if position >= len(table):
            self._unreadable_sample(index, ValueError("missing from its shard"))
            return None
        sample = table[position]
        ext = _image_ext(sample)
        wanted = [sample[ext]] + ([sample[LABEL_EXTENSION]] if LABEL_EXTENSION in sample else [])  # type: ignore[index]  # a table holds only samples with an image member
        first, end = min(o for o, _ in wanted), max(o + n for o, n in wanted)
        try:
            span = self._read(shard, first, end - first)  # one read for the image and its label
            label = UNLABELED
            if LABEL_EXTENSION in sample:
                offset, size = sample[LABEL_EXTENSION]
                parsed = _parse_label(span[offset - first:offset - first + size])
                if parsed is None:
                    raise ValueError("its .cls member is not a class index")
                label = parsed
            offset, size = sample[ext]  # type: ignore[index]  # as above
            return self._decode(span[offset - first:offset - first + size], ext), label  # type: ignore[arg-type]  # as above
        except (OSError, ValueError, SyntaxError, EOFError, RuntimeError) as e:  # what the decoders raise for bad data
            self._unreadable_sample(index, e)
            return None

    def _decode(self, data: bytes, ext: str) -> object:
        if self.decode == "encoded":
            with Image.open(io.BytesIO(data)) as f:  # the header only: size, and whether it is a JPEG at all
                if f.format != "JPEG":
                    raise ValueError(f"a {f.format} image; decoding on the GPU reads JPEGs only")
                width, height = f.size
            return EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), height, width)
        if self.decode == "tensor" and ext in JPEG_EXTENSIONS:
            try:
                read_mode = ImageReadMode.GRAY if self.mode == "L" else ImageReadMode.RGB
                return tv_tensors.Image(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                                    mode=read_mode))  # uint8 [C, H, W]
            except RuntimeError:
                pass  # not a JPEG libjpeg-turbo takes: PIL decides, with the usual skip / strict rules
        with Image.open(io.BytesIO(data)) as f:
            f.load()  # decode now: a truncated image fails here, not inside a transform
            return to_mode(f, self.mode)

    def _unreadable_sample(self, index: int, e: Exception) -> None:
        where = self.describe(index)
        if self.strict:
            raise DataError(f"sample {where} is corrupt or unreadable ({e}); rerun mae prepare, or pass "
                            "strict=False to skip such samples") from e
        if index not in self.bad_samples:
            self.bad_samples.append(index)
            warnings.warn(f"skipping corrupt or unreadable sample {where}: {e}", stacklevel=4)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(spec='{self.shards.spec}', split={self.shards.split!r}, n={len(self)}, "
                f"shards={len(self.shards.paths)}, classes={self.num_classes}, skipped={self.num_skipped})")


def build_shard_dataset(spec: str, split: str = "train", transform: Callable | None = None, mode: str = "RGB",
                        decode: str = "tensor", strict: bool = False) -> ShardDataset:
    """A map-style `ShardDataset` of `spec`'s `split` (random access: any sampler works, e.g. evaluation loaders)."""
    return ShardDataset(resolve_shards(spec, split), transform=transform, mode=mode, decode=decode, strict=strict)


# ---------------------------------------------------------------------------------------------------------------------
# the epoch plan
# ---------------------------------------------------------------------------------------------------------------------


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


class _PlanBatches(Sampler[list[tuple[int, int]]]):
    """Batches of ``(global index, sample seed)`` keys of the current (epoch, skip): the loader's batch sampler."""

    def __init__(self, counts: Sequence[int], *, batch_size: int, seed: int, rank: int, world_size: int,
                 shuffle: bool, drop_last: bool, buffer_size: int):
        self.counts, self.batch_size, self.seed = tuple(counts), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.drop_last, self.buffer_size = shuffle, drop_last, buffer_size
        self.epoch, self.skip = 0, 0
        self._cache: tuple[int, np.ndarray] | None = None

    def indices(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, plan_epoch(self.counts, seed=self.seed, epoch=epoch, rank=self.rank,
                                             world_size=self.world_size, batch_size=self.batch_size,
                                             shuffle=self.shuffle, drop_last=self.drop_last,
                                             buffer_size=self.buffer_size))
        return self._cache[1]

    def num_batches(self) -> int:
        return math.ceil(len(self.indices(self.epoch)) / self.batch_size)

    def __iter__(self):
        from mae.data import sample_seed

        indices, epoch = self.indices(self.epoch), self.epoch
        for start in range(self.skip * self.batch_size, len(indices), self.batch_size):
            yield [(i, sample_seed(self.seed, epoch, i)) for i in indices[start:start + self.batch_size].tolist()]

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.skip)


class ShardLoader:
    """Batches of one rank's share of each epoch of a shard set, resumable at any batch.

    ``set_epoch(epoch, skip=k)`` selects the epoch (its order is a pure function of (seed, epoch), see `plan_epoch`)
    and skips this rank's first k batches without reading them; iterating then yields batches k, k+1, ... of that
    epoch, bit-identical to the uninterrupted pass, with any number of workers. The selection holds for every pass
    until the next `set_epoch`.

    ``len(loader)`` is the number of batches in the *full* epoch (the same on every rank with drop_last), whatever
    `skip` is; `remaining` is what the next pass yields. `dataset` is the `ShardDataset` (for `skipped_files`).
    Batches: ``(images [N, C, H, W], noise [N, L])`` with `num_patches`, else ``(images, labels)``.
    """

    def __init__(self, dataset: ShardDataset, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, num_patches: int | None = None, shuffle: bool = True, drop_last: bool = True,
                 buffer_size: int = DEFAULT_BUFFER, collate_fn: Callable | None = None):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        if num_workers < 0:
            raise ConfigError(f"num_workers={num_workers} must be 0 (load in the main process) or more")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} and world_size={world_size}: need world_size >= 1 and "
                              "0 <= rank < world_size")
        if buffer_size < 0:
            raise ConfigError(f"buffer_size={buffer_size} must be >= 0 (0 or 1: no shuffle buffer)")
        if num_patches is not None and num_patches < 1:
            raise ConfigError(f"num_patches={num_patches} must be at least 1 (or None for (image, label) batches)")
        total = len(dataset)
        batches = batches_per_rank(total, batch_size, world_size, drop_last)
        if batches == 0:
            raise ConfigError(f"{total} samples in '{dataset.shards.spec}' ({dataset.shards.split}) are fewer than "
                              f"one batch of {batch_size} for each of {world_size} rank(s); lower batch_size")
        if drop_last:
            log.info("shards: %d samples in %d shard(s); %d rank(s) x %d batches of %d per epoch; %d sample(s) left "
                     "out of each epoch (a different run of samples each epoch)", total, len(dataset.shards.paths),
                     world_size, batches, batch_size, total - world_size * batches * batch_size)
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        self.rank, self.world_size = rank, world_size
        self.batch_sampler = _PlanBatches(dataset.shards.counts, batch_size=batch_size, seed=seed, rank=rank,
                                          world_size=world_size, shuffle=shuffle, drop_last=drop_last,
                                          buffer_size=buffer_size)
        self._batches = batches
        from mae.data import SeededDataset, WithMaskNoise, ignore_stop_signals  # the folders' seeding, noise, workers

        self.loader = DataLoader(
            SeededDataset(WithMaskNoise(dataset, num_patches) if num_patches is not None else dataset),
            batch_sampler=self.batch_sampler,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
            collate_fn=collate_fn,
            # the workers' base seed comes from here, not from the global RNG: iterating leaves the caller's
            # RNG states untouched (every sample is reseeded anyway)
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=ignore_stop_signals,
        )

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch

    @property
    def skip(self) -> int:
        return self.batch_sampler.skip

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Make the next pass read `epoch`, starting at this rank's batch `skip` (0: the whole epoch)."""
        if not 0 <= skip <= len(self):
            raise ConfigError(f"skip={skip} batches is not in [0, {len(self)}] (batches per epoch on this rank)")
        self.batch_sampler.epoch, self.batch_sampler.skip = epoch, skip

    @property
    def remaining(self) -> int:
        """Batches the next pass yields (``len(self) - skip``; without drop_last, this rank's own count)."""
        return len(self.batch_sampler)

    def __len__(self) -> int:
        return self._batches

    def __iter__(self):
        return iter(self.loader)

    def __repr__(self) -> str:
        return (f"ShardLoader({self.dataset!r}, batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
                f"workers={self.num_workers}, batches={len(self)})")


def build_shard_loader(spec: str, *, transform: Callable | None, batch_size: int, seed: int = 0, rank: int = 0,
                       world_size: int = 1, num_workers: int = 0, num_patches: int | None = None, mode: str = "RGB",
                       decode: str = "tensor", split: str = "train", shuffle: bool = True, drop_last: bool = True,
                       buffer_size: int = DEFAULT_BUFFER, strict: bool = False,
                       collate_fn: Callable | None = None) -> ShardLoader:
    """The loader of ``shards:DIR`` (or a brace pattern) for one rank of `world_size`; see `ShardLoader`.

    Pre-training: pass `num_patches` (L) for ``(images, noise [N, L])`` batches; classification: leave it None for
    ``(images, labels)``. Training keeps shuffle and drop_last (every rank the same number of batches); evaluation
    passes ``shuffle=False, drop_last=False`` (every sample once; ranks may differ by one batch).
    Call ``loader.set_epoch(epoch)`` (or `mae.data.set_epoch`) before each epoch, with ``skip`` to resume inside one.
    """
    dataset = build_shard_dataset(spec, split, transform=transform, mode=mode, decode=decode, strict=strict)
    return ShardLoader(dataset, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                       num_workers=num_workers, num_patches=num_patches, shuffle=shuffle, drop_last=drop_last,
                       buffer_size=buffer_size, collate_fn=collate_fn)
