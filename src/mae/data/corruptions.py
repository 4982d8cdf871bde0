"""The common corruptions of ImageNet-C (Hendrycks & Dietterich, 2019), and a writer of ImageNet-C-style folders.

`corrupt(image, name, severity, seed)` applies one of the 15 benchmark corruptions at severity 1-5. With the
`imagecorruptions` package installed (``pip install mae[robustness]``, the maintained ``imagecorruptions-imaug``
release of the benchmark's own code) all 15 are available and match the benchmark. Without it a documented subset
of 7 is built from scikit-image, NumPy and Pillow with the benchmark's severity constants: gaussian / shot / impulse
noise, brightness, contrast, pixelate, JPEG compression (`FALLBACK_CORRUPTIONS`); an mCE over that subset is not the
paper's number and says so.

`write_corrupted_folder(source, target)` turns any labelled validation set (class folders, split files or a
labelled built-in set) into the benchmark's layout,
``<target>/<corruption>/<severity>/<class>/<image>``, as the benchmark was made: resize the shorter side to 256,
centre crop 224 (scaled by ``image_size / 224``), corrupt, save as JPEG quality 85.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mae.data.datasets import build_dataset
from mae.errors import ConfigError, DataError
from mae.files import atomic_write

log = logging.getLogger("mae")

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
"""The 15 corruptions of the benchmark, in its order (noise, blur, weather, digital)."""
SEVERITIES = (1, 2, 3, 4, 5)
JPEG_QUALITY = 85
"""Quality of the benchmark's saved JPEG files."""
MIN_SIDE = 32
"""Smallest image side the corruptions take (the `imagecorruptions` package refuses smaller images)."""

# The benchmark's severity constants for the corruptions built without `imagecorruptions` (same values as its code).
_GAUSSIAN_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)
_SHOT_PHOTONS = (60, 25, 12, 5, 3)
_IMPULSE_AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)
_BRIGHTNESS_SHIFT = (0.1, 0.2, 0.3, 0.4, 0.5)
_CONTRAST_FACTOR = (0.4, 0.3, 0.2, 0.1, 0.05)
_PIXELATE_SCALE = (0.6, 0.5, 0.4, 0.3, 0.25)
_JPEG_CORRUPTION_QUALITY = (25, 18, 15, 10, 7)


def _noise_gaussian(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(x + rng.normal(scale=_GAUSSIAN_SIGMA[s - 1], size=x.shape), 0, 1)


def _noise_shot(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    photons = _SHOT_PHOTONS[s - 1]
    return np.clip(rng.poisson(x * photons) / photons, 0, 1)


def _noise_impulse(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    from skimage.util import random_noise  # slow to import: only these corruptions

    return random_noise(x, mode="s&p", rng=rng, amount=_IMPULSE_AMOUNT[s - 1])


def _brightness(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    from skimage.color import hsv2rgb, rgb2hsv  # slow to import: only this corruption

    hsv = rgb2hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + _BRIGHTNESS_SHIFT[s - 1], 0, 1)  # the value channel of HSV
    return hsv2rgb(hsv)


def _contrast(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - means) * _CONTRAST_FACTOR[s - 1] + means, 0, 1)


def _pixelate(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    image = Image.fromarray(np.uint8(np.round(x * 255)))
    w, h = image.size
    scale = _PIXELATE_SCALE[s - 1]
    small = image.resize((int(w * scale), int(h * scale)), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST), dtype=np.float64) / 255


def _jpeg(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(np.uint8(np.round(x * 255))).save(buffer, "JPEG", quality=_JPEG_CORRUPTION_QUALITY[s - 1])
    with Image.open(buffer) as f:
        return np.asarray(f.convert("RGB"), dtype=np.float64) / 255


_FALLBACK: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _noise_gaussian, "shot_noise": _noise_shot, "impulse_noise": _noise_impulse,
    "brightness": _brightness, "contrast": _contrast, "pixelate": _pixelate, "jpeg_compression": _jpeg}
FALLBACK_CORRUPTIONS = tuple(c for c in CORRUPTIONS if c in _FALLBACK)
"""What `corrupt` can do without the `imagecorruptions` package."""


def has_imagecorruptions() -> bool:
    """True when the `imagecorruptions` package (all 15 corruptions) can be imported."""
    try:
        import imagecorruptions  # noqa: F401
    except ImportError:
        return False
    return True


def available_corruptions() -> tuple[str, ...]:
    """The corruptions `corrupt` can apply here: all 15 with `imagecorruptions`, else `FALLBACK_CORRUPTIONS`."""
    return CORRUPTIONS if has_imagecorruptions() else FALLBACK_CORRUPTIONS


def check_corruptions(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` validated against what this installation can do (ConfigError naming the fix otherwise)."""
    available = available_corruptions()
    for name in names:
        if name not in CORRUPTIONS:
            raise ConfigError(f"'{name}' is not an ImageNet-C corruption; valid: {', '.join(CORRUPTIONS)}")
        if name not in available:
            raise ConfigError(f"corruption '{name}' needs the imagecorruptions package (pip install "
                              f"'mae[robustness]'); without it: {', '.join(available)}")
    return tuple(names)


def corrupt(image: Image.Image, name: str, severity: int, seed: int = 0) -> Image.Image:
    """``image`` (PIL, any mode; RGB is used) with corruption ``name`` at ``severity`` (1-5), reproducible from
    ``seed``. Both sides must be at least 32 px."""
    check_corruptions([name])
    if severity not in SEVERITIES:
        raise ConfigError(f"severity must be one of 1..5, got {severity}")
    rgb = np.asarray(image.convert("RGB"))  # uint8 [H, W, 3]
    if min(rgb.shape[:2]) < MIN_SIDE:
        raise DataError(f"image of {rgb.shape[1]}x{rgb.shape[0]} px is too small to corrupt; both sides need at "
                        f"least {MIN_SIDE} px (raise image_size)")
    if has_imagecorruptions():
        out = _corrupt_with_package(rgb, name, severity, seed)
    else:
        rng = np.random.default_rng(seed)
        out = np.uint8(np.round(np.clip(_FALLBACK[name](rgb / 255.0, severity, rng), 0, 1) * 255))
    return Image.fromarray(out)


def _corrupt_with_package(rgb: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """The benchmark's own corruption; its legacy global NumPy RNG is seeded for this call and restored after."""
    from imagecorruptions import corrupt as package_corrupt  # optional: checked by the caller

    kwargs = {"seed": seed} if name in ("glass_blur", "impulse_noise") else {}  # these two draw from their own seed
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return package_corrupt(rgb, severity=severity, corruption_name=name, **kwargs)
    finally:
        np.random.set_state(state)


def _benchmark_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size * 256 / 224`` (bicubic) and centre crop ``size``, as ImageNet-C was made."""
    image = TF.resize(image.convert("RGB"), round(size * 256 / 224), interpolation=InterpolationMode.BICUBIC)
    return TF.center_crop(image, [size, size])


def write_corrupted_folder(source: str | Path, target: str | Path, corruptions: Sequence[str] | None = None,
                           severities: Sequence[int] = SEVERITIES, image_size: int = 224, seed: int = 0,
                           limit_per_class: int | None = None, progress: Callable = lambda it: it) -> dict:
    """Write ``<target>/<corruption>/<severity>/<class>/<stem>.JPEG`` for every image of the validation split of
    ``source`` (a class-folder tree or its ``val`` sub-folder, split files, or a labelled ``builtin:`` set; ImageNet-C's
    layout); also ``<target>/clean/<class>/`` with the same crop, uncorrupted, for the clean-vs-corrupted gap. Each
    image's corruption is seeded from (seed, corruption, severity, its path), so a rerun writes the same files.
    ``limit_per_class`` keeps the first N images of each class. Returns counts and what was written."""
    corruptions = check_corruptions(corruptions or available_corruptions())
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise ConfigError(f"severities must be a non-empty subset of 1..5, got {list(severities)}")
    if image_size < MIN_SIDE:
        raise ConfigError(f"image_size must be at least {MIN_SIDE} px (the corruptions' minimum), got {image_size}")
    dataset = build_dataset(str(source), "val", mode="RGB", require_classes=True)
    classes = [str(c) for c in dataset.classes]  # type: ignore[attr-defined]  # ours, not torch's Dataset type
    root = Path(getattr(dataset, "root", source))
    samples = getattr(dataset, "samples", None)  # (path, label) for files; built-in sets have none
    names = [str(Path(path).relative_to(root).with_suffix("")) for path, _ in samples] if samples is not None else \
        [f"{i:06d}" for i in range(len(dataset))]  # type: ignore[arg-type]  # torch types no Dataset.__len__
    labels = [label for _, label in samples] if samples is not None else list(dataset.targets)  # type: ignore[attr-defined]  # ours, not torch's Dataset type
    order = _limited(labels, limit_per_class)
    target = Path(target)
    written = 0
    for i in progress(order):
        image, label = dataset[i]  # PIL, RGB (an unreadable file is skipped by the dataset's own rule)
        cls, stem = classes[label], Path(names[i]).name
        base = _benchmark_crop(image, image_size)
        _save(base, target / "clean" / cls / f"{stem}.JPEG")
        for name in corruptions:
            for severity in severities:
                image_seed = zlib.crc32(f"{seed}/{name}/{severity}/{names[i]}".encode())
                _save(corrupt(base, name, severity, image_seed),
                      target / name / str(severity) / cls / f"{stem}.JPEG")
                written += 1
    log.info("wrote %d corrupted images (%d source images x %d corruptions x %d severities) to %s", written,
             len(order), len(corruptions), len(severities), target)
    return {"output_dir": str(target), "images": len(order), "corruptions": list(corruptions),
            "severities": list(severities), "written": written, "complete": corruptions == CORRUPTIONS,
            "classes": len(classes)}


def _limited(labels: list[int], limit_per_class: int | None) -> list[int]:
    """Indices of the first ``limit_per_class`` items of each class (all of them for None)."""
    counts: dict[int, int] = {}
    kept = []
    for i, label in enumerate(labels):
        if limit_per_class is None or counts.get(label, 0) < limit_per_class:
            counts[label] = counts.get(label, 0) + 1
            kept.append(i)
    return kept


def _save(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda f: image.save(f, "JPEG", quality=JPEG_QUALITY, optimize=True))
