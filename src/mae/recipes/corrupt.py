"""ImageNet-C-style folders from any validation set: ``run(CorruptConfig) -> summary`` (``mae corrupt``).

Writes ``output_dir/<corruption>/<severity>/<class>/<image>.JPEG`` (and ``output_dir/clean/``) from the class folders
of ``data``, the way ImageNet-C was made (resize 256, centre crop 224, corrupt, JPEG quality 85); see
`mae.data.corruptions`. Score it with ``mae evaluate protocol=imagenet-c --data output_dir``.

    mae corrupt --data /data/imagenet/val --output-dir /data/imagenet-c-mine
    mae corrupt --data builtin:photos ... corruptions=[gaussian_noise,contrast] severities=[1,3,5] image_size=64
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mae.data.corruptions import CORRUPTIONS, MIN_SIDE, SEVERITIES, check_corruptions, write_corrupted_folder
from mae.errors import ConfigError
from mae.files import check_output_folder, write_json

log = logging.getLogger("mae")

CLI_FLAGS = {"--data": "data", "--output-dir": "output_dir"}


@dataclass
class CorruptConfig:
    """Which validation set to corrupt, with what, and where to write it."""

    data: str = field(default="data/imagenet/val", metadata={
        "help": "a class-folder tree (<class>/<image>; its val/ sub-folder when it has one)"})
    output_dir: str = field(default="data/imagenet-c", metadata={
        "help": "where <corruption>/<severity>/<class>/ and clean/<class>/ are written"})
    corruptions: list[str] = field(default_factory=list, metadata={
        "help": f"subset of the 15 ({', '.join(CORRUPTIONS[:3])}, ...); empty: all this installation can do (all 15 "
                f"with the imagecorruptions package, else 7)"})
    severities: list[int] = field(default_factory=lambda: list(SEVERITIES), metadata={"help": "subset of 1..5"})
    image_size: int = field(default=224, metadata={
        "help": "side of the saved images (ImageNet-C: 224, cropped from a 256 resize; other sizes scale both)"})
    limit_per_class: int | None = field(default=None, metadata={"help": "only the first N images of each class"})
    seed: int = field(default=0, metadata={"help": "seeds every image's corruption (a rerun writes the same files)"})
    overwrite: bool = field(default=False, metadata={
        "help": "write into an output_dir that holds files mae corrupt did not write: images of the same names are "
                "replaced, no other file is touched; without it such a folder is refused"})

    def validate(self) -> None:
        check_corruptions(self.corruptions)
        if not self.severities or any(s not in SEVERITIES for s in self.severities):
            raise ConfigError(f"severities must be a non-empty subset of 1..5, got {self.severities}")
        if self.image_size < MIN_SIDE:
            raise ConfigError(f"image_size must be at least {MIN_SIDE} px (the corruptions' minimum), got "
                              f"{self.image_size}")
        if self.limit_per_class is not None and self.limit_per_class < 1:
            raise ConfigError(f"limit_per_class must be >= 1 (or null for all), got {self.limit_per_class}")


def _written_by_corrupt(folder: Path) -> bool:
    """A folder of an earlier `mae corrupt` (its corruptions.json): a rerun writes the same files into it."""
    try:
        record = json.loads((folder / "corruptions.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"corruptions", "severities", "written"} <= record.keys()


def run(cfg: CorruptConfig) -> dict:
    """Write the corrupted folder tree; returns counts and what was written."""
    check_output_folder(cfg.output_dir, "corrupt", cfg.overwrite, own=_written_by_corrupt)
    summary = write_corrupted_folder(cfg.data, cfg.output_dir, cfg.corruptions or None, cfg.severities,
                                     cfg.image_size, cfg.seed, cfg.limit_per_class)
    if not summary["complete"]:
        log.warning("%d of the 15 corruptions written: an mCE over them is not comparable with published values",
                    len(summary["corruptions"]))
    write_json(f"{cfg.output_dir}/corruptions.json", summary)
    return summary
