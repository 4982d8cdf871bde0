"""`builtin:moving_mnist`: clips of MNIST digits bouncing inside the frame, labelled by the direction of motion.

The recipe of Srivastava et al. (2015), made small for a CPU demo: digits from `builtin:mnist5k` (resized to half the
frame side) start at a random place and move at a constant speed, reflecting off the borders. The label is the
initial direction of the first digit, one of four diagonals, so a single frame cannot tell it: only the motion does.

Every item is a pure function of (seed, split, index); train clips draw their digits from the train split of
`builtin:mnist5k` and val clips from its val split, so the two share no digit image. The image transforms take PIL
images, not clips: `transform` here takes the clip tensor `[C, T, H, W]` (float in [0, 1]); `ClipNormalize` is the
minimal one, with the grey defaults of the image sets (mean 0.5, std 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mae.data.builtin import SPLIT_SEED, SPLITS, _mnist5k
from mae.data.folders import ImageDataset
from mae.data.transforms import GRAY_MEAN, GRAY_STD
from mae.errors import DataError

DIRECTIONS = ("up-left", "up-right", "down-left", "down-right")
"""Class names in label order; 'up' is towards row 0."""
_SIGNS = ((-1, -1), (-1, 1), (1, -1), (1, 1))  # (row, column) sign of the velocity of each class
_ANGLE = (math.radians(30), math.radians(60))  # angle from the row axis, drawn per clip: both components move
CLIP_MODES = ("L", "RGB")


@dataclass(frozen=True)
class ClipPlan:
    """Everything one clip is drawn from: digit rows in the split's pool, their top-left corners per frame, label."""

    digits: tuple[int, ...]
    positions: np.ndarray  # [T, D, 2] int (row, column) of each digit's top-left corner
    label: int


def bounce(start: np.ndarray, velocity: np.ndarray, frames: int, room: int) -> np.ndarray:
    """Positions [T, 2] (rounded to pixels) of a point moving at `velocity` px/frame inside [0, room], reflecting."""
    t = np.arange(frames, dtype=np.float64)[:, None]  # [T, 1]
    free = start[None, :] + t * velocity[None, :]  # [T, 2] unfolded path
    folded = np.mod(free, 2 * room)
    folded = np.where(folded > room, 2 * room - folded, folded)  # reflection = folding the unfolded path
    return np.rint(folded).astype(np.int64)


def render(digits: list[np.ndarray], positions: np.ndarray, size: int) -> np.ndarray:
    """Frames uint8 [T, size, size]: each digit (uint8 [s, s]) pasted at its positions [T, D, 2], overlaps by max."""
    frames = np.zeros((positions.shape[0], size, size), dtype=np.uint8)
    for t in range(positions.shape[0]):
        for d, digit in enumerate(digits):
            r, c = positions[t, d]
            s = digit.shape[0]
            np.maximum(frames[t, r:r + s, c:c + s], digit, out=frames[t, r:r + s, c:c + s])
    return frames


class ClipNormalize:
    """`(clip - mean) / std` per channel of a clip `[C, T, H, W]`; the clip counterpart of the image Normalize."""

    def __init__(self, mean: tuple[float, ...] = GRAY_MEAN, std: tuple[float, ...] = GRAY_STD):
        self.mean = torch.tensor(mean).view(-1, 1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1, 1)

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        return (clip - self.mean) / self.std


class MovingMNIST(ImageDataset):
    """Deterministic Moving-MNIST clips; items are `(clip float [C, T, H, W] in [0, 1], label)` before `transform`.

    Args:
        split: 'train' or 'val' (digits from the matching split of `builtin:mnist5k`).
        transform: applied to the clip tensor (e.g. `ClipNormalize()`); not a PIL image transform.
        mode: 'L' (1 channel, native) or 'RGB' (the grey clip copied into 3 channels).
        size: frame side in pixels (digits are resized to half of it); 16..64.
        frames: clip length T.
        digits: digits per clip (the label follows the first).
        speed: pixels per frame, constant within a clip.
        length: clips in the split; default 4,000 train / 1,000 val, like `builtin:mnist5k`.
        seed: with (split, index), fixes every clip.
    """

    name = "moving_mnist"
    classes = DIRECTIONS
    native_mode = "L"

    def __init__(self, split: str = "train", transform: Callable | None = None, mode: str | None = None,
                 size: int = 32, frames: int = 16, digits: int = 1, speed: float = 2.5, length: int | None = None,
                 seed: int = SPLIT_SEED):
        if split not in SPLITS:
            raise DataError(f"split '{split}' of builtin:{self.name} does not exist; use one of {', '.join(SPLITS)}")
        if mode is not None and mode not in CLIP_MODES:
            raise DataError(f"clip mode '{mode}' is not supported by builtin:{self.name}; use one of "
                            f"{', '.join(CLIP_MODES)} (or None)")
        if not 16 <= size <= 64:
            raise DataError(f"builtin:{self.name} frame size {size} is out of range; use 16..64 (default 32)")
        if frames < 2 or digits < 1:
            raise DataError(f"builtin:{self.name} needs frames >= 2 and digits >= 1, got frames={frames}, "
                            f"digits={digits}; the label needs at least two frames to be seen")
        self.digit_size = size // 2
        self.room = size - self.digit_size
        if not 0 < speed <= self.room / 2:
            raise DataError(f"builtin:{self.name} speed {speed} px/frame is out of range; use (0, {self.room / 2}] "
                            f"for frame size {size}")
        self.split, self.transform, self.mode = split, transform, mode or self.native_mode
        self.size, self.frames, self.digits, self.speed, self.seed = size, frames, digits, speed, seed
        self.length = length if length is not None else (4000 if split == "train" else 1000)
        self._pool = _mnist5k()[split][0]  # uint8 [N, 28, 28], read-only

    def __len__(self) -> int:
        return self.length

    def plan(self, index: int) -> ClipPlan:
        """Digits, positions and label of clip `index`, from its own generator (seed, split, index) alone."""
        if not 0 <= index < self.length:
            raise IndexError(f"clip {index} is out of range for builtin:{self.name} {self.split} of {self.length}")
        rng = np.random.default_rng((self.seed, SPLITS.index(self.split), index))
        label = int(rng.integers(len(DIRECTIONS)))
        rows = tuple(int(r) for r in rng.integers(len(self._pool), size=self.digits))  # independent of the label
        paths = []
        for d in range(self.digits):
            sign = np.array(_SIGNS[label if d == 0 else int(rng.integers(len(DIRECTIONS)))], dtype=np.float64)
            angle = rng.uniform(*_ANGLE)
            velocity = sign * self.speed * np.array([math.cos(angle), math.sin(angle)])  # (row, column) px/frame
            # Start where the first step does not reach a border, so the first two frames already show the label.
            lo = np.maximum(0.0, -velocity)
            hi = self.room - np.maximum(0.0, velocity)
            paths.append(bounce(rng.uniform(lo, hi), velocity, self.frames, self.room))
        return ClipPlan(rows, np.stack(paths, axis=1), label)  # positions [T, D, 2]

    def _digit(self, row: int) -> np.ndarray:
        image = Image.fromarray(self._pool[row]).resize((self.digit_size, self.digit_size), Image.Resampling.BILINEAR)
        return np.asarray(image)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        plan = self.plan(index)
        frames = render([self._digit(r) for r in plan.digits], plan.positions, self.size)  # uint8 [T, H, W]
        clip = torch.from_numpy(frames).float().div_(255).unsqueeze(0)  # [1, T, H, W]
        if self.mode == "RGB":
            clip = clip.expand(3, -1, -1, -1).contiguous()
        if self.transform is not None:
            clip = self.transform(clip)
        return clip, plan.label

    def __repr__(self) -> str:
        return (f"MovingMNIST(split={self.split!r}, n={len(self)}, size={self.size}, frames={self.frames}, "
                f"digits={self.digits}, mode={self.mode!r})")


CLIP_DATASETS: dict[str, type[MovingMNIST]] = {MovingMNIST.name: MovingMNIST}
"""Built-in clip datasets by name; `build_dataset('builtin:<name>')` builds one (items are clips, not images)."""
