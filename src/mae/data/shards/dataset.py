"""Random access to the samples of a shard set: `ShardDataset` reads sample i by seeking to its bytes."""

from __future__ import annotations

import bisect
import io
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_jpeg

from mae.data.device_decode import EncodedJpeg
from mae.data.folders import DECODE_MODES, IMAGE_MODES, JPEG_EXTENSIONS, UNLABELED, ImageDataset, to_mode
from mae.data.shards.index import ShardSet, resolve_shards
from mae.data.shards.members import LABEL_EXTENSION, Sample, image_extension, parse_label, read_member_table
from mae.errors import DataError

_OPEN_FILES = 8  # open shard files per process (the reader moves through one or two shards at a time)
_TABLES = 64  # member tables kept per process


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
        if mode not in IMAGE_MODES:
            raise DataError(f"image mode '{mode}' is not supported; use one of {', '.join(IMAGE_MODES)}")
        if decode not in DECODE_MODES:
            raise DataError(f"image decoder '{decode}' is not supported for shards; use one of "
                            f"{', '.join(DECODE_MODES)}")
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
        ext = image_extension(sample)
        wanted = [sample[ext]] + ([sample[LABEL_EXTENSION]] if LABEL_EXTENSION in sample else [])  # type: ignore[index]  # a table holds only samples with an image member
        first, end = min(o for o, _ in wanted), max(o + n for o, n in wanted)
        try:
            span = self._read(shard, first, end - first)  # one read for the image and its label
            label = UNLABELED
            if LABEL_EXTENSION in sample:
                offset, size = sample[LABEL_EXTENSION]
                parsed = parse_label(span[offset - first:offset - first + size])
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
        if self.decode == "tensor" and f".{ext}" in JPEG_EXTENSIONS:
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
