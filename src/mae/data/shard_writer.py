"""Writing an image folder as tar shards in the webdataset layout (what ``mae prepare`` runs).

Each split of the source (its ``train/`` and ``val/`` sub-folders, or the whole folder as ``train``; class
sub-folders or any tree of images) becomes ``<split>-000000.tar``, ``<split>-000001.tar``, ... in the destination:
sample ``<key>.jpg`` (the image) and, with classes, ``<key>.cls`` (its class index as ASCII text), the key being the
sample's position in the split's shuffled order (so shards are class-mixed). JPEGs that need no change are copied
byte for byte; other images, and those whose shorter side exceeds `short_side`, are re-encoded as JPEG.

Crash safety: every shard is written to a temporary file and renamed (`mae.files`), a progress file records the
finished shards, and ``index.json`` is written last: a killed run never leaves an index that lists a missing or
half-written shard, and running it again with the same source and settings continues after the last finished
shard (other settings, or a changed source, rewrite the shards from the start).

Nothing of the user's is deleted: a destination that holds files this writer did not put there (another shard set,
anything else) is refused unless ``overwrite``, and even then only files of the same names are replaced. The progress
file, written before the first shard, lists every shard this writer made in the folder; only those, once no longer in
the index, and its own stale temporaries are ever removed.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mae.data.datasets import SPLIT_FOLDERS, build_dataset  # the folder rules of the loaders, not a second copy
from mae.data.folders import GREY_MODES, ClassFolderDataset, to_mode
from mae.data.shards.index import INDEX_NAME
from mae.errors import ConfigError, DataError, OutputError
from mae.files import atomic_write_path, check_output_folder, fsync_dir, is_stale_temporary, write_json
from mae.version import __version__

__all__ = ["PROGRESS_NAME", "SourceSplit", "encode_image", "list_source", "write_shards"]

log = logging.getLogger("mae")

PROGRESS_NAME = ".prepare-progress.json"
INDEX_VERSION = 1
_SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<number>\d{6})\.tar$")
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.\d+\.[0-9a-f]{8}\.tmp$")  # `mae.files.atomic_write_path`'s names


@dataclass
class SourceSplit:
    """One split of the source folder: image paths with labels (-1 without classes) and the class names."""

    name: str
    root: Path
    samples: list[tuple[str, int]]
    classes: list[str]

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def list_source(src: str | Path) -> list[SourceSplit]:
    """The splits of `src`: its ``train`` / ``val`` sub-folders (any of the names `build_dataset` reads), or else
    the whole folder as ``train``. Reads directory listings only."""
    root = Path(src).expanduser()
    if not root.exists():
        raise DataError(f"source folder '{src}' does not exist; give an image folder (class sub-folders, or any "
                        "tree of images)")
    if not root.is_dir():
        raise DataError(f"source '{src}' is a file, not a folder; give the folder that holds the images")
    present = [split for split, names in SPLIT_FOLDERS.items() if any((root / n).is_dir() for n in names)]
    if present:
        known = {n for names in SPLIT_FOLDERS.values() for n in names}
        ignored = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
                         and e.name not in known)
        if ignored:
            log.info("source '%s': reading the split folders %s; not the other folders %s", root,
                     ", ".join(present), ", ".join(ignored))
    splits = []
    for split in present or ["train"]:
        dataset = build_dataset(str(root), split)
        labelled = isinstance(dataset, ClassFolderDataset)
        splits.append(SourceSplit(split, Path(dataset.root), list(dataset.samples),  # type: ignore[attr-defined]  # ours, not torch's Dataset type
                                  list(dataset.classes) if labelled else []))  # type: ignore[attr-defined]  # ours, not torch's Dataset type
    return splits


def encode_image(path: str, short_side: int | None, quality: int) -> tuple[bytes | None, str, bool]:
    """``(JPEG bytes, '', re-encoded?)`` for an image file, or ``(None, reason, False)`` if it does not decode.

    A JPEG in RGB or grey whose shorter side is within `short_side` is kept byte for byte; anything else is
    converted to 8-bit RGB or grey (`to_mode`), downscaled (bicubic) so that its shorter side is `short_side`, and
    saved as JPEG at `quality`.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as image:
            image.load()  # a full decode: a truncated or corrupt file fails here
            width, height = image.size
            too_big = short_side is not None and min(width, height) > short_side
            if image.format == "JPEG" and image.mode in ("RGB", "L") and not too_big:
                return raw, "", False
            out = to_mode(image, "L" if image.mode in GREY_MODES else "RGB")
        if too_big:
            if width <= height:
                size = (short_side, max(1, round(height * short_side / width)))
            else:
                size = (max(1, round(width * short_side / height)), short_side)
            out = out.resize(size, Image.Resampling.BICUBIC)  # type: ignore[arg-type]  # too_big: short_side is set
        buffer = io.BytesIO()
        out.save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue(), "", True
    except Image.UnidentifiedImageError:
        return None, "not an image format PIL reads", False
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        return None, f"{type(e).__name__}: {e}", False


def _encode_task(task: tuple[str, int | None, int]) -> tuple[bytes | None, str, bool]:
    return encode_image(*task)


def _fingerprint(splits: list[SourceSplit], settings: dict) -> str:
    """What the shards depend on: the settings, and each source file's name, size, time and label."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for split in splits:
        digest.update(f"\0split {split.name} {split.classes}".encode())
        for path, label in split.samples:
            try:
                st = os.stat(path)
                stamp = f"{st.st_size} {st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            digest.update(f"\0{os.path.relpath(path, split.root)} {stamp} {label}".encode())
    return digest.hexdigest()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputError(f"could not remove '{path}': {e.strerror or e}; make the folder writable") from e
    fsync_dir(path.parent)


def _made_by_prepare(index: dict | None) -> bool:
    made_by = (index or {}).get("made_by")
    return isinstance(made_by, dict) and made_by.get("tool") == "mae prepare"


def _written_here(dst: Path) -> bool:
    """Whether `dst` is a folder this writer made: its progress file, or an index it wrote."""
    return (dst / PROGRESS_NAME).is_file() or _made_by_prepare(_read_json(dst / INDEX_NAME))


def _shard_names(record: dict | None) -> set[str]:
    """The shard names an index or a progress file lists."""
    splits = (record or {}).get("splits")
    if not isinstance(splits, dict):
        return set()
    return {str(s.get("name")) for entry in splits.values() if isinstance(entry, dict)
            for s in entry.get("shards", []) if isinstance(s, dict)}


def _own_temporary(path: Path) -> bool:
    """A temporary file of this writer (of a shard, the index or the progress file) whose process is gone."""
    match = _TEMPORARY.match(path.name)
    return match is not None and (_SHARD_NAME.match(match["target"]) is not None
                                 or match["target"] in (INDEX_NAME, PROGRESS_NAME)) and is_stale_temporary(path)


def _finished_shards(dst: Path, entry: dict) -> list[dict]:
    """The progress file's shards that are still on disk with their recorded size, up to the first that is not."""
    kept = []
    for shard in entry.get("shards", []):
        path = dst / str(shard.get("name", ""))
        if not path.is_file() or path.stat().st_size != shard.get("bytes"):
            break
        kept.append(shard)
    return kept


def write_shards(src: str | Path, dst: str | Path, *, shard_size: int = 1000, shard_mb: float | None = None,
                 short_side: int | None = None, quality: int = 95, shuffle: bool = True, seed: int = 0,
                 workers: int = 0, progress: bool = True, overwrite: bool = False,
                 on_split: Callable[[str, int], None] | None = None) -> dict:
    """Write the shards of every split of `src` into `dst`, then ``index.json``; returns the index.

    A shard closes at `shard_size` samples, or once it holds `shard_mb` MB of images (whichever comes first).
    `workers` processes decode and re-encode (0: this process). Corrupt source images are skipped and counted
    (``skipped`` / ``skipped_files`` per split in the index). See the module docstring for reruns, and for
    `overwrite` (a `dst` holding files this writer did not make is refused without it). Long because it is one
    resumable sequence (check the destination, pick up the progress file, write each split, write the index) whose
    steps share the progress state.
    """
    if shard_size < 1:
        raise ConfigError(f"shard_size={shard_size} must be at least 1 sample")
    if shard_mb is not None and shard_mb <= 0:
        raise ConfigError(f"shard_mb={shard_mb} must be positive (or null for shard_size only)")
    if short_side is not None and short_side < 1:
        raise ConfigError(f"short_side={short_side} must be at least 1 px (or null to keep the sizes)")
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality={quality} must be in [1, 100] (JPEG quality when re-encoding)")
    if workers < 0:
        raise ConfigError(f"workers={workers} must be 0 (this process) or more")
    started = time.perf_counter()
    dst = Path(dst).expanduser()
    if dst.resolve().is_relative_to(Path(src).expanduser().resolve()):
        raise ConfigError(f"destination '{dst}' is inside the source '{src}' (it would become a class or a split "
                          "of its own data); choose a folder outside it")
    splits = list_source(src)
    if dst.exists() and not dst.is_dir():
        raise OutputError(f"destination '{dst}' is a file; give a folder for the shards")
    check_output_folder(dst, "prepare", overwrite, own=_written_here)
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create '{dst}': {e.strerror or e}; choose another destination") from e
    settings = {"shard_size": shard_size, "shard_mb": shard_mb, "short_side": short_side, "quality": quality,
                "shuffle": shuffle, "seed": seed, "version": INDEX_VERSION}
    fingerprint = _fingerprint(splits, settings)
    index_path, progress_path = dst / INDEX_NAME, dst / PROGRESS_NAME

    old_index = _read_json(index_path)
    own_index = _made_by_prepare(old_index)  # an index.json of someone else's is replaced at the end, never deleted
    if own_index and old_index.get("fingerprint") == fingerprint and all(  # type: ignore[union-attr]  # own_index: a dict
            _finished_shards(dst, entry) == entry.get("shards") for entry in old_index.get("splits", {}).values()):  # type: ignore[union-attr]  # as above
        log.info("shards in '%s' are up to date (same source and settings); nothing to do", dst)
        return {**old_index, "up_to_date": True}  # type: ignore[dict-item]  # as above
    state = _read_json(progress_path)
    # the shards this writer made here, by its progress file and its index: the only tar files it may ever delete
    owned = {str(n) for n in (state or {}).get("owned", [])} | _shard_names(state)
    owned |= _shard_names(old_index) if own_index else set()
    if state is None or state.get("fingerprint") != fingerprint:
        state = {"fingerprint": fingerprint, "splits": {}}
    elif state["splits"]:
        log.info("continuing the shards in '%s' after the last finished shard", dst)
    state["owned"] = sorted(owned)
    write_json(progress_path, state)  # before any shard: the folder is recognisably this writer's, with its shards
    if own_index:
        _unlink(index_path)  # from here on no index lists shards that are about to change
    for stale in dst.glob(".*.tmp"):
        if _own_temporary(stale):
            _unlink(stale)

    context = multiprocessing.get_context()
    pool = context.Pool(workers) if workers > 0 else None
    try:
        index_splits = {}
        for split in splits:
            index_splits[split.name] = _write_split(split, dst, state, progress_path, pool, shard_size=shard_size,
                                                    shard_mb=shard_mb, short_side=short_side, quality=quality,
                                                    shuffle=shuffle, seed=seed, progress=progress)
            if on_split is not None:
                on_split(split.name, index_splits[split.name]["samples"])
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    listed = {s["name"] for entry in index_splits.values() for s in entry["shards"]}
    for name in sorted(set(state["owned"]) - listed):  # its own shards of an earlier set, under names now unused
        if _SHARD_NAME.match(name):
            _unlink(dst / name)
    index = {
        "format": "webdataset",
        "layout": "<key>.jpg (image) and, with classes, <key>.cls (class index as ASCII text)",
        "version": INDEX_VERSION,
        "splits": index_splits,
        "made_by": {"tool": "mae prepare", "mae_version": __version__, "src": str(Path(src).expanduser().resolve()),
                    **settings, "workers": workers,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "seconds": round(time.perf_counter() - started, 1)},
        "fingerprint": fingerprint,
    }
    write_json(index_path, index)
    _unlink(progress_path)
    return index


def _write_split(split: SourceSplit, dst: Path, state: dict, progress_path: Path, pool, *, shard_size: int,
                 shard_mb: float | None, short_side: int | None, quality: int, shuffle: bool, seed: int,
                 progress: bool) -> dict:
    """Write (or finish) one split's shards; returns its index entry."""
    order = np.arange(len(split.samples))
    if shuffle:  # class-mixed shards; one permutation per split, fixed by the seed
        order = np.random.default_rng([seed & 0xFFFF_FFFF, zlib.crc32(split.name.encode())]).permutation(len(order))
    entry = state["splits"].get(split.name, {})
    shards = _finished_shards(dst, entry)
    start = shards[-1]["end"] if shards else 0
    skipped = [s for s in entry.get("skipped_files", []) if s["position"] < start] if shards else []
    reencoded = int(entry.get("reencoded", 0)) if shards else 0
    width = max(6, len(str(len(order) - 1)))

    tasks = [(split.samples[i][0], short_side, quality) for i in order[start:].tolist()]
    results = pool.imap(_encode_task, tasks, chunksize=8) if pool is not None else map(_encode_task, tasks)
    bar = tqdm(total=len(order), initial=start, desc=f"prepare {split.name}", unit="img", disable=not progress,
               mininterval=1.0, dynamic_ncols=True, leave=False)

    def good_items() -> Iterator[tuple[int, bytes]]:
        nonlocal reencoded
        for position, (data, reason, was_reencoded) in enumerate(results, start):
            bar.update(1)
            if data is None:
                path = split.samples[order[position]][0]
                log.warning("skipping corrupt or unreadable image '%s': %s", path, reason)
                skipped.append({"position": position, "file": os.path.relpath(path, split.root), "reason": reason})
                continue
            reencoded += was_reencoded
            yield position, data

    items = good_items()
    shard_bytes = None if shard_mb is None else shard_mb * 1e6
    try:
        first = next(items, None)
        while first is not None:
            name = f"{split.name}-{len(shards):06d}.tar"
            written: dict = {}

            def fill(tmp: Path, item=first, written=written) -> None:
                count, size = 0, 0
                with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                    while item is not None:
                        position, data = item
                        key = f"{position:0{width}d}"
                        _add_member(tar, f"{key}.jpg", data)
                        if split.labelled:
                            label = split.samples[order[position]][1]
                            _add_member(tar, f"{key}.cls", str(label).encode("ascii"))
                        count, size, written["end"] = count + 1, size + len(data), position + 1
                        if count >= shard_size or (shard_bytes is not None and size >= shard_bytes):
                            break
                        item = next(items, None)
                written["samples"] = count

            if name not in state["owned"]:  # recorded before it exists: a run killed in between still knows it
                state["owned"].append(name)
                write_json(progress_path, state)
            atomic_write_path(dst / name, fill)
            shards.append({"name": name, "samples": written["samples"], "bytes": (dst / name).stat().st_size,
                           "start": shards[-1]["end"] if shards else 0, "end": written["end"]})
            state["splits"][split.name] = {"shards": shards, "skipped_files": skipped, "reencoded": reencoded}
            write_json(progress_path, state)
            first = next(items, None)
    finally:
        bar.close()
    state["splits"][split.name] = {"shards": shards, "skipped_files": skipped, "reencoded": reencoded}
    total = sum(s["samples"] for s in shards)
    if total == 0:
        raise DataError(f"no image of '{split.root}' ({split.name}) could be read ({len(skipped)} corrupt files)")
    return {"shards": [{"name": s["name"], "samples": s["samples"], "bytes": s["bytes"]} for s in shards],
            "samples": total, "classes": split.classes, "labelled": split.labelled, "reencoded": reencoded,
            "skipped": len(skipped), "skipped_files": [s["file"] for s in skipped]}
