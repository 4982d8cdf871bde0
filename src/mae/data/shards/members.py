"""A shard's member table, read from its tar headers only: which samples it holds and where each member's bytes
are (webdataset's layout: consecutive members that share a key form one sample)."""

from __future__ import annotations

import os
import re
import tarfile
import warnings

from mae.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
"""Member extensions read as the sample's image (the first one present), as webdataset names them."""
LABEL_EXTENSION = "cls"
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # webdataset's key / extension split: up to the first dot

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
                    if m.group(1) != key and image_extension(current):  # the cut is past the previous sample: keep it
                        samples.append(current)
                    break
                if m.group(1) != key:
                    if image_extension(current):
                        samples.append(current)
                    key, current = m.group(1), {}
                current[m.group(2).lower()] = (member.offset_data, member.size)
    except (tarfile.ReadError, OSError, EOFError) as e:
        raise DataError(f"shard '{path}' is not a readable tar file ({e}); rerun mae prepare or remove it") from e
    if not truncated and image_extension(current):
        samples.append(current)
    if truncated:
        warnings.warn(f"shard '{path}' is truncated: reading the {len(samples)} complete samples before the cut",
                      stacklevel=2)
    return samples


def image_extension(sample: Sample) -> str | None:
    """The extension of the sample's image member (the first of `IMAGE_EXTENSIONS` it has), or None."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)


def read_label(path: str, sample: Sample) -> int | None:
    """The class index in the sample's ``.cls`` member, read from the shard at `path` (None: not a class index)."""
    offset, size = sample[LABEL_EXTENSION]
    with open(path, "rb") as f:
        f.seek(offset)
        return parse_label(f.read(size))


def parse_label(data: bytes) -> int | None:
    """A ``.cls`` member's bytes as a class index: a non-negative ASCII integer, else None."""
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return label if label >= 0 else None
