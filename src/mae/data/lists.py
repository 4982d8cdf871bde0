"""Labelled datasets described by split files instead of class folders: iNaturalist's COCO-like JSON and Places'
``path label`` lists (paper Table 6, appendix A.5).

- iNaturalist 2017 / 2018 / 2019 (``train2018.json``, ``val2018.json``, ...): ``images`` (``id``, ``file_name``
  relative to the dataset root), ``annotations`` (``image_id``, ``category_id``), ``categories`` (``id``,
  ``name``). Labels are the categories in increasing ``id`` order; class names are the category names.
- Places205 / Places365 (``train_places205.csv``, ``places365_train_standard.txt``, ``places365_val.txt``, ...):
  one ``<relative path> <label>`` line per image. The images live under the list's folder or one of its
  sub-folders (Places365: ``data_256/`` for training, ``val_256/`` for validation), found from the first entry.
  Class names come from a ``categories*.txt`` next to the list (``/a/airfield 0`` lines), else the label numbers.

`find_split_file(root, split)` picks a split's file in a dataset folder: the one JSON / list file whose name contains
the split ('train'; 'val'). A path with ``{split}`` in it names the files directly
(``/data/inat/{split}2018.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from mae.data.folders import _ImageFiles, is_image_file
from mae.errors import DataError

LIST_SUFFIXES = (".txt", ".csv")
SPLIT_WORDS = {"train": ("train",), "val": ("val",)}
IGNORED_WORDS = ("categor", "test", "readme", "license")
"""Files next to the split files that are never a split (class names, test sets without labels)."""


def find_split_file(root: Path, split: str) -> Path | None:
    """The JSON / list file of ``split`` directly in ``root``, None when it has none; DataError when several fit."""
    words = SPLIT_WORDS.get(split, (split,))
    candidates = sorted(
        p for p in root.iterdir()
        if p.is_file() and p.suffix.lower() in (".json", *LIST_SUFFIXES) and not p.name.startswith(".")
        and any(w in p.name.lower() for w in words) and not any(w in p.name.lower() for w in IGNORED_WORDS)
        and not (split == "val" and "train" in p.name.lower()) and _looks_like_split(p))
    if len(candidates) > 1:
        raise DataError(f"'{root}' has several {split} split files ({', '.join(p.name for p in candidates)}); name "
                        f"one per split with data.path='{root}/<name with {{split}}>' or move the others away")
    return candidates[0] if candidates else None


def _looks_like_split(path: Path) -> bool:
    """A JSON file, or a list whose first line is '<image path> <integer label>' (so stray notes are not read)."""
    if path.suffix.lower() == ".json":
        return True
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
    except (OSError, UnicodeDecodeError):
        return False
    fields = first.replace(",", " ").split()
    return len(fields) == 2 and fields[1].isdigit() and is_image_file(fields[0])


def split_dataset(path: Path, transform: Callable | None = None, mode: str = "RGB", strict: bool = False,
                  decode: str = "pil") -> _ImageFiles:
    """The dataset of one split file: iNaturalist JSON (``.json``) or a Places list (``.txt`` / ``.csv``)."""
    if not path.is_file():
        raise DataError(f"split file '{path}' does not exist; check data.path")
    if path.suffix.lower() == ".json":
        return INatJsonDataset(path, transform, mode, strict, decode)
    return FileListDataset(path, transform, mode, strict, decode)


class INatJsonDataset(_ImageFiles):
    """One split of an iNaturalist-style JSON (COCO-like ``images`` / ``annotations`` / ``categories``); image paths
    are relative to the JSON's folder."""

    def __init__(self, path: str | os.PathLike, transform: Callable | None = None, mode: str = "RGB",
                 strict: bool = False, decode: str = "pil"):
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read iNaturalist JSON '{path}': {e}") from None
        missing = [k for k in ("images", "annotations", "categories") if k not in data]
        if missing:
            raise DataError(f"'{path}' lacks {', '.join(missing)}; an iNaturalist split has 'images', 'annotations' "
                            f"and 'categories'")
        categories = sorted(data["categories"], key=lambda c: c["id"])
        label_of = {c["id"]: i for i, c in enumerate(categories)}
        category_of = {a["image_id"]: a["category_id"] for a in data["annotations"]}
        root = path.parent
        samples = []
        for image in data["images"]:
            if image["id"] not in category_of:
                raise DataError(f"'{path}': image {image['id']} ({image['file_name']}) has no annotation")
            category = category_of[image["id"]]
            if category not in label_of:
                raise DataError(f"'{path}': category {category} of image {image['id']} is not in 'categories'")
            samples.append((str(root / image["file_name"]), label_of[category]))
        if not samples:
            raise DataError(f"'{path}' lists no images")
        classes = [str(c.get("name", c["id"])) for c in categories]
        super().__init__(root, samples, classes, transform, mode, strict, False, decode)


class FileListDataset(_ImageFiles):
    """One split of a ``<relative path> <label>`` list (Places205 / Places365); labels are integers from 0."""

    def __init__(self, path: str | os.PathLike, transform: Callable | None = None, mode: str = "RGB",
                 strict: bool = False, decode: str = "pil"):
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise DataError(f"cannot read image list '{path}': {e.strerror or e}") from None
        entries = []
        for number, line in enumerate(lines, 1):
            fields = line.replace(",", " ").split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].isdigit():
                raise DataError(f"'{path}' line {number}: '{line.strip()}' is not '<relative path> <label>'")
            entries.append((fields[0].lstrip("/"), int(fields[1])))
        if not entries:
            raise DataError(f"image list '{path}' has no entries")
        root = _image_root(path.parent, entries[0][0], path)
        classes = _class_names(path.parent, max(label for _, label in entries) + 1)
        samples = [(str(root / rel), label) for rel, label in entries]
        super().__init__(root, samples, classes, transform, mode, strict, False, decode)


def _image_root(folder: Path, first: str, path: Path) -> Path:
    """The folder the list's paths are relative to: the list's own, else the sub-folder that holds its first entry."""
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (candidate / first).is_file():
            return candidate
    raise DataError(f"the images of '{path}' are not under '{folder}' or its sub-folders (looked for '{first}'); "
                    f"put the list next to the image folder")


def _class_names(folder: Path, count: int) -> list[str]:
    """Names from a ``categories*.txt`` (``<name> <label>`` lines, Places' format), else the label numbers."""
    files = sorted(folder.glob("categor*.txt"))
    if files:
        names: dict[int, str] = {}
        for line in files[0].read_text(encoding="utf-8").splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[1].isdigit():
                names[int(fields[1])] = fields[0].lstrip("/")
        if len(names) >= count and all(i in names for i in range(len(names))):
            return [names[i] for i in range(len(names))]
    return [str(i) for i in range(count)]
