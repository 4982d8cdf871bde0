"""Pre-training augmentations of the MAE paper (Table 1e) and the evaluation transform, for PIL images.

Each transform takes a PIL image of any size (smaller than the crop is fine: it is upsampled) in mode 'L' or 'RGB'
and returns a float tensor [in_chans, img_size, img_size] normalised by mean / std. Grey images become RGB by
replicating the channel; RGB images become grey by ITU-R 601-2 luma.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import PIL.Image
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from mae.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)
"""Default for one channel: maps [0, 1] to [-1, 1] whatever the data (dataset statistics such as MNIST's
0.1307 / 0.3081 fit only that dataset; pass them as mean / std when wanted)."""

AUGMENTATIONS = ("rrc", "fixed_crop", "none", "rrc_jitter")
"""Names accepted by `build_transform`; 'rrc' is the paper's default."""
RRC_SCALE = (0.2, 1.0)
FIXED_CROP_PCT = 0.875
BICUBIC = InterpolationMode.BICUBIC


def default_mean_std(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for 3 channels, (0.5,) / (0.5,) for 1."""
    _check_chans(in_chans)
    return (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else (GRAY_MEAN, GRAY_STD)


def _check_chans(in_chans: int) -> None:
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans={in_chans} is not supported by the image transforms; use 1 (grey) or 3 (RGB)")


def _finish(in_chans: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> list[Callable]:
    """Channel conversion, then PIL -> float tensor in [0, 1] -> normalised (one `ToNormalizedTensor`)."""
    default_mean, default_std = default_mean_std(in_chans)
    mean = tuple(default_mean if mean is None else mean)
    std = tuple(default_std if std is None else std)
    if len(mean) != in_chans or len(std) != in_chans:
        raise ConfigError(f"mean {mean} and std {std} need {in_chans} value(s) each, one per input channel")
    return [ToNormalizedTensor(in_chans, mean, std)]


class ToNormalizedTensor:
    """``v2.RGB()`` or ``v2.Grayscale(1)``, ``v2.ToImage()``, ``v2.ToDtype(float32, scale=True)`` and
    ``v2.Normalize(mean, std)`` in one step: a PIL image or a uint8 tensor [C, H, W] -> a plain float tensor
    [in_chans, H, W], through the same torchvision kernels, so the values are identical bit for bit. It skips the four
    modules' per-call overhead and the tv_tensors wrapper (the time per digit: docs/benchmarks.md, "The demo's
    recipe")."""

    def __init__(self, in_chans: int, mean: Sequence[float], std: Sequence[float]):
        self.in_chans, self.mean, self.std = in_chans, list(mean), list(std)

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, PIL.Image.Image):
            mode = "RGB" if self.in_chans == 3 else "L"
            image = TF.pil_to_tensor(image if image.mode == mode else image.convert(mode))
        else:
            image = image.as_subclass(torch.Tensor)
            if self.in_chans == 3:
                image = TF.grayscale_to_rgb_image(image)
            elif image.shape[-3] != 1:
                image = TF.rgb_to_grayscale_image(image, num_output_channels=1)
        return TF.normalize_image(TF.to_dtype_image(image, torch.float32, scale=True), mean=self.mean, std=self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_chans={self.in_chans}, mean={tuple(self.mean)}, std={tuple(self.std)})"


def resize_size(img_size: int, crop_pct: float) -> int:
    """Shorter side to resize to before a centre / random crop of `img_size` (224 / 0.875 = 256)."""
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"crop_pct={crop_pct} must be in (0, 1]; 0.875 resizes 224-px crops from 256 px")
    return max(img_size, round(img_size / crop_pct))


def build_transform(name: str, img_size: int | tuple[int, int], in_chans: int, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> Callable:
    """The pre-training augmentation `name` (one of `AUGMENTATIONS`), PIL image -> [in_chans, H, W] with
    ``img_size`` = H = W, or (H, W) for non-square models (the crops are then resized to H x W).

    - rrc: RandomResizedCrop(scale=(0.2, 1), bicubic) + horizontal flip (the paper's default)
    - fixed_crop: resize the shorter side to img_size / 0.875, random crop + horizontal flip
    - none: resize the shorter side to img_size, centre crop
    - rrc_jitter: rrc + ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)
    mean / std default to ImageNet's for 3 channels and (0.5,) / (0.5,) for 1.
    """
    flip = v2.RandomHorizontalFlip()
    size = tuple(img_size) if isinstance(img_size, (list, tuple)) else (img_size, img_size)
    longer = max(size)  # the shorter image side is resized to this, so that an H x W crop fits
    rrc = v2.RandomResizedCrop(size, scale=RRC_SCALE, interpolation=BICUBIC)
    geometry: dict[str, list[Callable]] = {
        "rrc": [rrc, flip],
        "fixed_crop": [v2.Resize(resize_size(longer, FIXED_CROP_PCT), interpolation=BICUBIC),
                       v2.RandomCrop(size), flip],
        "none": [v2.Resize(longer, interpolation=BICUBIC), v2.CenterCrop(size)],
        "rrc_jitter": [rrc, flip, v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)],
    }
    if name not in geometry:
        raise ConfigError(f"unknown augmentation '{name}'; valid: {', '.join(AUGMENTATIONS)}")
    return v2.Compose(geometry[name] + _finish(in_chans, mean, std))


def default_crop_pct(img_size: int) -> float:
    """The evaluation crop fraction for `img_size`: 0.875 (224 / 256) from 33 to 224 px, as the reference release;
    1.0 above 224 px (the release resizes to the input size itself, e.g. 448, and crops all of it); 1.0 up to 32 px,
    where cutting the border would lose a large part of a digit or object."""
    return FIXED_CROP_PCT if 32 < img_size <= 224 else 1.0


def eval_preprocessing(img_size: int, in_chans: int, crop_pct: float | None = None,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> dict:
    """What `build_eval_transform` does, as numbers for other libraries' configs (timm's pretrained_cfg,
    transformers' preprocessor_config.json): input size, the shorter side it resizes to, crop_pct, mean, std."""
    _check_chans(in_chans)
    crop_pct = default_crop_pct(img_size) if crop_pct is None else crop_pct
    default_mean, default_std = default_mean_std(in_chans)
    return {"input_size": (in_chans, img_size, img_size), "resize": resize_size(img_size, crop_pct),
            "crop_pct": crop_pct, "interpolation": "bicubic", "crop_mode": "center",
            "mean": tuple(default_mean if mean is None else mean), "std": tuple(default_std if std is None else std)}


def build_eval_transform(img_size: int, in_chans: int, crop_pct: float | None = None,
                         mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Callable:
    """Evaluation transform: resize the shorter side to img_size / crop_pct (bicubic), then centre crop img_size.

    crop_pct=None picks `default_crop_pct`: the reference release's 0.875 up to 224 px (resize 256, crop 224) and 1.0
    above (resize 448, crop 448), and 1.0 for tiny images.
    """
    if crop_pct is None:
        crop_pct = default_crop_pct(img_size)
    geometry = [v2.Resize(resize_size(img_size, crop_pct), interpolation=BICUBIC), v2.CenterCrop(img_size)]
    return v2.Compose(geometry + _finish(in_chans, mean, std))


PROBE_SCALE = (0.08, 1.0)
PROBE_RATIO = (3 / 4, 4 / 3)


class SingleDrawResizedCrop:
    """Random-resized crop drawn once, without torchvision's retry loop: the TF / TPU crop the reference release's
    linear probe uses (after BYOL's TF code).

    One area fraction uniform in ``scale`` and one log-uniform aspect ratio in ``ratio`` give the crop's width and
    height (rounded), each clamped to the image; the corner is uniform over the positions where the crop fits. The
    crop is resized to ``size`` x ``size`` (bicubic). torchvision's `RandomResizedCrop` instead redraws up to 10 times
    until the crop fits, then falls back to a centre crop, so the two differ on crops that overflow the image.
    """

    def __init__(self, size: int, scale: Sequence[float] = PROBE_SCALE, ratio: Sequence[float] = PROBE_RATIO,
                 interpolation: InterpolationMode = BICUBIC):
        if not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"crop scale {list(scale)} and ratio {list(ratio)} must be increasing and positive")
        self.size, self.scale, self.ratio, self.interpolation = size, tuple(scale), tuple(ratio), interpolation

    @staticmethod
    def params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
        """``(top, left, crop height, crop width)`` from exactly four draws of torch's global RNG (area, aspect,
        top, left), whatever the image."""
        u = torch.rand(2)  # area fraction, log-aspect position
        target_area = height * width * (scale[0] + (scale[1] - scale[0]) * float(u[0]))
        log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
        aspect = math.exp(log_lo + (log_hi - log_lo) * float(u[1]))
        w = min(round(math.sqrt(target_area * aspect)), width)
        h = min(round(math.sqrt(target_area / aspect)), height)
        top = int(torch.randint(0, height - h + 1, ()))
        left = int(torch.randint(0, width - w + 1, ()))
        return top, left, h, w

    def __call__(self, image):
        height, width = TF.get_size(image)
        top, left, h, w = self.params(height, width, self.scale, self.ratio)
        return TF.resized_crop(image, top, left, h, w, [self.size, self.size], interpolation=self.interpolation,
                               antialias=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})"


def build_probe_transform(img_size: int, in_chans: int, scale: Sequence[float] = PROBE_SCALE, hflip: float = 0.5,
                          mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Callable:
    """The linear probe's training augmentation, as the reference release: `SingleDrawResizedCrop` (bicubic, no
    retry loop) + horizontal flip, then normalisation."""
    steps: list[Callable] = [SingleDrawResizedCrop(img_size, scale)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    return v2.Compose(steps + _finish(in_chans, mean, std))
