"""Which images a picture is drawn for, one code path for every drawing command (`mae visualize`, `mae attention`):
images of a dataset's validation split (``--data FOLDER`` or ``builtin:<name>``) or image files given by name
(``--images a.png b.png``; a folder is searched recursively).

Either way each image is read in the model's mode (L for a grey model, RGB otherwise, whatever the file's own size
and mode) and goes through the transform the drawing command brings (its resize and crop to the model's input).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from mae.data import build_dataset, to_mode
from mae.data.folders import channel_mismatch, is_image_file
from mae.errors import ConfigError, DataError

__all__ = ["image_files", "pick_images"]


def pick_images(transform: Callable, in_chans: int, *, data: str | None = None,
                images: Sequence[str | Path] | None = None, num_images: int | None = 8,
                split: str = "val") -> tuple[torch.Tensor, list[str]]:
    """The model's inputs [N, C, H, W] (`transform` of each image) and a name for each row: at most `num_images`
    images (None: all), evenly spaced over `data`'s `split` (its training split when a folder has no validation
    split), or the image files `images` in the order given. Pass exactly one of `data` and `images`."""
    if num_images is not None and num_images < 1:
        raise ConfigError(f"num_images must be at least 1, got {num_images}")
    if (data is None) == (images is None):
        raise ConfigError("pass either a dataset (data) or image files (images) to draw, not "
                          f"{'both' if data is not None else 'neither'}")
    mode = "L" if in_chans == 1 else "RGB"
    if images is not None:
        files = image_files(images)[:num_images]
        read = [_read_image(f, mode) for f in files]
        note = next((note for _, note in read if note is not None), None)
        if note is not None:  # as a dataset says it, once
            logging.getLogger("mae").warning(note)
        return torch.stack([transform(image) for image, _ in read]), [str(f) for f in files]
    assert data is not None  # checked above; for the type checker
    try:
        dataset = build_dataset(data, split, transform=transform, mode=mode)
    except DataError:  # a folder without a val split: show training images
        if split == "train":
            raise
        dataset = build_dataset(data, "train", transform=transform, mode=mode)
    size = len(dataset)  # type: ignore[arg-type]  # torch types no Dataset.__len__
    if size == 0:
        raise DataError(f"dataset '{data}' holds no images to draw; pass another --data or --images FILE ...")
    count = size if num_images is None else min(num_images, size)
    step = max(1, size // count)
    picked = [i * step for i in range(count)]
    samples = getattr(dataset, "samples", None)  # an image folder's (path, label) list names its files
    names = [str(samples[i][0]) if samples is not None else f"{data} #{i}" for i in picked]
    return torch.stack([dataset[i][0] for i in picked]), names


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files `paths` names, a folder replaced by the image files below it (sorted); a path that does not exist
    is one line naming it."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"image '{p}' does not exist; pass image files or folders")
    if not files:
        raise DataError(f"no image files in {', '.join(map(str, paths))}; pass image files or folders that hold some")
    return files


def _read_image(path: Path, mode: str) -> tuple[Image.Image, str | None]:
    """The image file at `path` in `mode` ('L' or 'RGB'), and the note when its colour does not fit the model's
    channels; an unreadable file is one line naming it."""
    try:
        with Image.open(path) as opened:
            opened.load()
            note = channel_mismatch(opened, mode, f"'{path}'")
            image = to_mode(opened, mode)
            return (image.copy() if image is opened else image), note  # the pixels outlive the open file
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).replace(str(path), "").replace("''", "").split()) or type(e).__name__
        raise DataError(f"image '{path}' could not be read ({reason}); pass readable image files") from e
