"""A small synthetic scene dataset for detection and segmentation that needs no download.

Each image is a crop of one of the photographs shipped with scikit-image / scikit-learn (`mae.data.builtin.PHOTOS`)
with 1..`max_objects` flat-coloured shapes painted on it: circle, square, triangle, cross and ring, at random
sizes, rotations and colours (the class is the shape, never the colour). Shapes may overlap a little; an instance
mask is the part of a shape left visible. Training scenes use the left 70% of each photo and validation scenes
the right 30%, so the splits share no background pixels. One call writes both formats:

    root/images/{training,validation}/000000.png        the images
    root/annotations/{training,validation}/000000.png   ADE20K-style label PNGs: 0 unlabelled (ignored),
                                                        1 background, 2.. the shapes
    root/coco/instances_{training,validation}.json      COCO instances: boxes, RLE masks, categories 1..5
    root/meta.json                                      the generation settings and class names

Everything is a pure function of the settings (seed included); `generate_synthetic` reuses a folder whose
meta.json matches and regenerates it otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mae.data.builtin import PHOTOS
from mae.errors import DataError
from mae.files import write_json

_log = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "cross", "ring")
"""Object classes, in category-id order (COCO category id = index + 1, label PNG value = index + 2)."""
SPLITS = ("training", "validation")
"""Split folder names (ADE20K's)."""
BACKGROUND_VALUE = 1
"""Label PNG value of background pixels; 0 is reserved for 'unlabelled' as in ADE20K."""
FORMAT_VERSION = 1

_VAL_FRACTION = 0.30  # right part of every photo kept for validation backgrounds (as builtin:photos)


@dataclass(frozen=True)
class SyntheticSpec:
    """The settings that fully determine a synthetic dataset."""

    num_train: int = 200
    num_val: int = 50
    image_size: int = 128
    max_objects: int = 4
    min_object: float = 0.15  # object diameter range, as a fraction of the image side
    max_object: float = 0.45
    seed: int = 0

    def validate(self) -> None:
        if self.num_train < 1 or self.num_val < 1:
            raise DataError(f"synthetic data needs at least 1 training and 1 validation image, got "
                            f"{self.num_train} and {self.num_val}")
        if self.image_size < 32:
            raise DataError(f"synthetic image_size must be at least 32 pixels, got {self.image_size}")
        if self.max_objects < 1:
            raise DataError(f"synthetic max_objects must be at least 1, got {self.max_objects}")
        if not 0.05 <= self.min_object <= self.max_object <= 0.9:
            raise DataError(f"synthetic object sizes must satisfy 0.05 <= min_object <= max_object <= 0.9, got "
                            f"{self.min_object}, {self.max_object}")


@dataclass(frozen=True)
class SyntheticDataset:
    """Paths of a generated dataset, in both formats."""

    root: Path

    def images(self, split: str) -> Path:
        return self.root / "images" / split

    def labels(self, split: str) -> Path:
        return self.root / "annotations" / split

    def coco(self, split: str) -> Path:
        return self.root / "coco" / f"instances_{split}.json"

    @property
    def segmentation_classes(self) -> list[str]:
        """Classes of the label PNGs after ADE20K's reduce-zero-label step (value v -> class v - 1)."""
        return ["background", *SHAPES]


# ---------------------------------------------------------------------------------------------------- photos
def _photos() -> list[np.ndarray]:
    """The packaged photographs as uint8 RGB arrays (read without importing scikit-image / scikit-learn)."""
    photos = []
    for package, relative in PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"synthetic scenes use photographs shipped with '{package}', which is not installed; "
                            f"pip install {package}")
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if not path.is_file():
            raise DataError(f"'{path}' is missing from the installed '{package}'; reinstall it")
        with Image.open(path) as f:
            photos.append(np.asarray(f.convert("RGB")))
    return photos


def _background(photos: list[np.ndarray], split: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of a random photo (from its split's part), resized to size x size, float RGB 0..255."""
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    x_lo, x_hi = (0, round(w * (1 - _VAL_FRACTION))) if split == "training" else (round(w * (1 - _VAL_FRACTION)), w)
    side = int(min(h, x_hi - x_lo) * rng.uniform(0.3, 1.0))
    x = int(rng.integers(x_lo, x_hi - side + 1))
    y = int(rng.integers(0, h - side + 1))
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.Resampling.BICUBIC)
    image = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return image


# ---------------------------------------------------------------------------------------------------- shapes
def shape_mask(kind: str, size: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Boolean [size, size] mask of one shape centred at (cx, cy) with circumradius ``radius``, rotated by ``angle``."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # coordinates in the shape's frame
    if kind == "circle":
        return dx**2 + dy**2 <= radius**2
    if kind == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= radius**2) & (d2 >= (0.55 * radius) ** 2)
    if kind == "square":
        half = radius / math.sqrt(2)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if kind == "triangle":  # equilateral: inside all three edges at distance radius / 2 from the centre
        inside = np.ones((size, size), dtype=bool)
        for k in range(3):
            a = 2 * math.pi * k / 3
            inside &= math.cos(a) * u + math.sin(a) * v <= radius / 2
        return inside
    if kind == "cross":
        arm = radius / 3.2
        return ((np.abs(u) <= radius) & (np.abs(v) <= arm)) | ((np.abs(u) <= arm) & (np.abs(v) <= radius))
    raise ValueError(f"unknown shape '{kind}' (valid: {', '.join(SHAPES)})")


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated random colour (HSV with saturation 0.5-1, value 0.45-1) as RGB 0..255."""
    h, s, v = rng.uniform(0, 1), rng.uniform(0.5, 1.0), rng.uniform(0.45, 1.0)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255


def render_scene(photos: list[np.ndarray], split: str, spec: SyntheticSpec, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    """One scene: (image uint8 [S, S, 3], label map uint8 [S, S], instances [(class index, visible mask)])."""
    size = spec.image_size
    image = _background(photos, split, size, rng)
    owner = np.full((size, size), -1, dtype=np.int64)  # which instance each pixel shows (-1: background)
    kinds: list[int] = []
    full_areas: list[int] = []
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        for _attempt in range(20):  # find a place that hides no earlier shape by more than a third
            kind = int(rng.integers(len(SHAPES)))
            radius = rng.uniform(spec.min_object, spec.max_object) * size / 2
            cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
            mask = shape_mask(SHAPES[kind], size, cx, cy, radius, rng.uniform(0, 2 * math.pi))
            if mask.sum() < 16:
                continue
            covered = np.bincount(owner[mask & (owner >= 0)], minlength=len(kinds))
            left = [full_areas[j] and (np.sum(owner == j) - covered[j]) / full_areas[j] for j in range(len(kinds))]
            if all(f >= 0.66 for f in left):
                break
        else:
            continue
        # flat colour with a gentle linear shading and a little noise, so shapes are not perfectly uniform
        shade = 1 + 0.25 * ((xs - 0.5) * rng.uniform(-1, 1) + (ys - 0.5) * rng.uniform(-1, 1))
        paint = _colour(rng)[None, None, :] * shade[..., None] + rng.normal(0, 6, (size, size, 3))
        image[mask] = paint[mask]
        owner[mask] = len(kinds)
        kinds.append(kind)
        full_areas.append(int(mask.sum()))
    labels = np.full((size, size), BACKGROUND_VALUE, dtype=np.uint8)
    instances = []
    for j, kind in enumerate(kinds):
        visible = owner == j
        labels[visible] = kind + 2
        instances.append((kind, visible))
    return np.clip(np.round(image), 0, 255).astype(np.uint8), labels, instances


# ---------------------------------------------------------------------------------------------------- writing
def _coco_annotation(ann_id: int, image_id: int, kind: int, mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils  # slow to import (matplotlib): only for COCO masks

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {"id": ann_id, "image_id": image_id, "category_id": kind + 1, "bbox": [x, y, w, h],
            "area": float(mask_utils.area(rle)), "iscrowd": 0,
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}}


def _write_split(root: Path, split: str, count: int, spec: SyntheticSpec, photos: list[np.ndarray]) -> None:
    data = SyntheticDataset(root)
    data.images(split).mkdir(parents=True, exist_ok=True)
    data.labels(split).mkdir(parents=True, exist_ok=True)
    data.coco(split).parent.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(count):
        rng = np.random.default_rng((spec.seed, SPLITS.index(split), i))  # one stream per image
        image, labels, instances = render_scene(photos, split, spec, rng)
        name = f"{i:06d}.png"
        Image.fromarray(image).save(data.images(split) / name)
        Image.fromarray(labels).save(data.labels(split) / name)
        images.append({"id": i + 1, "file_name": name, "width": spec.image_size, "height": spec.image_size})
        for kind, mask in instances:
            annotations.append(_coco_annotation(len(annotations) + 1, i + 1, kind, mask))
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPES)]
    coco = {"info": {"description": f"mae synthetic shapes, {split}"}, "images": images,
            "annotations": annotations, "categories": categories}
    write_json(data.coco(split), coco, indent=None)


def generate_synthetic(root: str | Path, spec: SyntheticSpec | None = None, overwrite: bool = False,
                       **settings) -> SyntheticDataset:
    """Write (or reuse) a synthetic scene dataset in ``root``, in COCO and ADE20K-style formats (module docstring).

    ``settings`` override `SyntheticSpec` fields (num_train, num_val, image_size, max_objects, seed, ...). A folder
    whose meta.json records the same settings is reused as is. A folder generated with other settings raises
    DataError (another run may be reading it) unless ``overwrite``, which replaces ``root/images``,
    ``root/annotations`` and ``root/coco``.
    """
    spec = SyntheticSpec(**{**(asdict(spec) if spec else {}), **settings})
    spec.validate()
    root = Path(root).expanduser()
    meta = {"format_version": FORMAT_VERSION, "spec": asdict(spec), "classes": list(SHAPES),
            "segmentation_classes": SyntheticDataset(root).segmentation_classes,
            "label_values": {"unlabelled": 0, "background": BACKGROUND_VALUE,
                             **{name: k + 2 for k, name in enumerate(SHAPES)}}}
    meta_path = root / "meta.json"
    if meta_path.is_file():
        try:
            stored = json.loads(meta_path.read_text())
        except ValueError:
            stored = None
        if stored == meta:
            _log.info("synthetic data: reusing %s", root)
            return SyntheticDataset(root)
        if not overwrite:
            theirs = stored.get("spec") if isinstance(stored, dict) else None
            raise DataError(f"'{root}' holds synthetic data generated with other settings ({theirs}, asked for "
                            f"{asdict(spec)}); use the same data.synthetic settings, another folder, or delete it")
    try:
        root.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # written last: a half-written folder is never reused
        for sub in ("images", "annotations", "coco"):
            shutil.rmtree(root / sub, ignore_errors=True)
        photos = _photos()
        for split, count in zip(SPLITS, (spec.num_train, spec.num_val), strict=True):
            _write_split(root, split, count, spec, photos)
        write_json(meta_path, meta, indent=1)
    except OSError as e:
        raise DataError(f"could not write synthetic data to '{root}': {e.strerror or e}") from e
    _log.info("synthetic data: wrote %d + %d scenes of %d px to %s", spec.num_train, spec.num_val, spec.image_size,
              root)
    return SyntheticDataset(root)


SYNTHETIC_PREFIX = "synthetic"


def synthetic_root(path: str, output_dir: str | Path) -> Path | None:
    """For a data path 'synthetic' (-> ``output_dir/synthetic``) or 'synthetic:<folder>', the folder to generate
    into; None for any other path."""
    if path == SYNTHETIC_PREFIX:
        return Path(output_dir) / "synthetic"
    if path.startswith(SYNTHETIC_PREFIX + ":"):
        folder = path[len(SYNTHETIC_PREFIX) + 1:]
        if not folder:
            raise DataError("'synthetic:' needs a folder after the colon, e.g. synthetic:runs/shapes")
        return Path(folder)
    return None
