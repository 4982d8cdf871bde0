"""Converting an image folder into tar shards: ``run(PrepareConfig) -> summary`` (``mae prepare``).

    mae prepare --src /data/imagenet --dst /data/imagenet-shards short_side=320 workers=8
    mae pretrain --data shards:/data/imagenet-shards ...

One shard set per split (``train/`` and ``val/`` sub-folders, or the whole folder as ``train``), in the webdataset
layout, and ``index.json`` (shards, sample counts, class names, settings, skipped files). A rerun with the same
source and settings continues after the last finished shard, or does nothing if all are done. See
`mae.data.shard_writer` and docs/data.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from mae.data.shard_writer import write_shards
from mae.data.shards import INDEX_NAME
from mae.errors import ConfigError

CLI_FLAGS = {"--src": "src", "--dst": "dst", "--workers": "workers"}


@dataclass
class PrepareConfig:
    """Settings of ``mae prepare``: where from, where to, and how the shards are cut and encoded."""

    src: str = field(metadata={"help": "image folder: class sub-folders (optionally under train/ and val/) or any "
                                       "tree of images"})
    dst: str = field(metadata={"help": "folder for <split>-000000.tar ... and index.json"})
    shard_size: int = field(default=1000, metadata={"help": "samples per shard (at most)"})
    shard_mb: float | None = field(default=None, metadata={
        "help": "also close a shard once its images reach this many MB (null: by shard_size only)"})
    short_side: int | None = field(default=None, metadata={
        "help": "re-encode images whose shorter side is longer than this (e.g. 320) down to it; null keeps sizes"})
    quality: int = field(default=95, metadata={"help": "JPEG quality of re-encoded images (others are copied)"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle the sample order before sharding (class-mixed "
                                                          "shards)"})
    seed: int = field(default=0, metadata={"help": "seed of that shuffle"})
    workers: int = field(default=0, metadata={"help": "processes that decode and re-encode (0: this process)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    overwrite: bool = field(default=False, metadata={
        "help": "write into a dst that holds files mae prepare did not write (e.g. another shard set): files of the "
                "same names are replaced, no other file is touched; without it such a dst is refused"})

    RANGES: ClassVar[dict[str, str]] = {"shard_mb": "> 0"}

    def validate(self) -> None:
        if self.shard_size < 1:
            raise ConfigError(f"shard_size must be at least 1, got {self.shard_size}")
        if self.short_side is not None and self.short_side < 1:
            raise ConfigError(f"short_side must be at least 1 px or null, got {self.short_side}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"quality must be in [1, 100], got {self.quality}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")


def run(cfg: PrepareConfig) -> dict:
    """Write the shards and index of `cfg.src` into `cfg.dst`; returns a summary (counts, skipped files, index)."""
    index = write_shards(cfg.src, cfg.dst, shard_size=cfg.shard_size, shard_mb=cfg.shard_mb,
                         short_side=cfg.short_side, quality=cfg.quality, shuffle=cfg.shuffle, seed=cfg.seed,
                         workers=cfg.workers, progress=cfg.progress, overwrite=cfg.overwrite)
    summary: dict = {"index": str(Path(cfg.dst).expanduser() / INDEX_NAME)}
    for name, entry in index["splits"].items():
        summary[f"{name}_samples"] = entry["samples"]
        summary[f"{name}_shards"] = len(entry["shards"])
        summary[f"{name}_classes"] = len(entry["classes"])
        summary[f"{name}_reencoded"] = entry.get("reencoded", 0)
    summary["skipped_files"] = sum(entry["skipped"] for entry in index["splits"].values())
    if index.get("up_to_date"):
        summary["up_to_date"] = True
    else:
        summary["seconds"] = index["made_by"]["seconds"]
    return summary
