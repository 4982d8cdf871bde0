"""`builtin:moving_mnist`: deterministic clips whose label is the direction of motion, which no single frame shows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mae.data import ClipNormalize, MovingMNIST, build_dataset, list_builtin
from mae.data.builtin import _mnist5k
from mae.data.moving_mnist import DIRECTIONS, bounce, render
from mae.errors import DataError

SIGNS = {0: (-1, -1), 1: (-1, 1), 2: (1, -1), 3: (1, 1)}  # label -> (row, column) sign of the motion


@pytest.fixture(scope="module")
def train() -> MovingMNIST:
    return MovingMNIST("train", length=200)


def centroid(frame: torch.Tensor) -> np.ndarray:
    """(row, column) intensity centroid of a frame [H, W]."""
    f = frame.double().numpy()
    rows, cols = np.indices(f.shape)
    return np.array([(rows * f).sum(), (cols * f).sum()]) / f.sum()


def test_dispatch_and_shapes(train: MovingMNIST) -> None:
    """build_dataset names it; items are float clips [1, T, H, W] in [0, 1]; a loader batches them [N, C, T, H, W]."""
    ds = build_dataset("builtin:moving_mnist", "val", clips=True)
    assert isinstance(ds, MovingMNIST) and len(ds) == 1000 and ds.num_classes == 4 and ds.in_chans == 1
    assert "builtin:moving_mnist" in list_builtin(clips=True) and "builtin:moving_mnist" not in list_builtin()
    clip, label = train[0]
    assert clip.shape == (1, 16, 32, 32) and clip.dtype == torch.float32 and label in range(4)
    assert clip.min() >= 0 and clip.max() <= 1 and clip.max() > 0.5
    batch, labels = next(iter(DataLoader(train, batch_size=4)))
    assert batch.shape == (4, 1, 16, 32, 32) and labels.shape == (4,)
    small = MovingMNIST("train", size=16, frames=8, digits=2, speed=2.0, mode="RGB", length=3)
    assert small[2][0].shape == (3, 8, 16, 16)
    normalized, _ = MovingMNIST("train", transform=ClipNormalize(), length=1)[0]
    assert torch.allclose(normalized, (clip - 0.5) / 0.5) and normalized.min() == -1
    with pytest.raises(DataError, match="moving_mnist"):
        build_dataset("builtin:moving_mnis")


def test_deterministic(train: MovingMNIST) -> None:
    """The same (seed, split, index) gives the same clip, in any order and any instance; another seed another clip."""
    a, la = train[7]
    b, lb = MovingMNIST("train", length=200)[7]
    assert torch.equal(a, b) and la == lb
    assert not torch.equal(a, MovingMNIST("train", length=200, seed=1)[7][0])
    assert not torch.equal(a, train[8][0])


def test_digits_stay_in_frame(train: MovingMNIST) -> None:
    """Every digit is whole in every frame: the total ink of a frame is the ink of the digit."""
    for i in range(0, 200, 10):
        plan = train.plan(i)
        pos = plan.positions
        assert pos.min() >= 0 and pos.max() <= train.room
        clip, _ = train[i]
        ink = clip[0].sum(dim=(1, 2))  # [T]
        assert torch.allclose(ink, ink[0].expand_as(ink), rtol=1e-5)


def test_label_is_motion_direction(train: MovingMNIST) -> None:
    """The centroid shift from frame 0 to frame 1 has the signs of the label's direction, for every clip."""
    for i in range(200):
        clip, label = train[i]
        shift = centroid(clip[0, 1]) - centroid(clip[0, 0])
        assert tuple(np.sign(np.round(shift, 6)).astype(int)) == SIGNS[label], (i, shift, label)


def test_classes_balanced(train: MovingMNIST) -> None:
    counts = np.bincount([train.plan(i).label for i in range(200)], minlength=4)
    assert len(counts) == len(DIRECTIONS) and counts.min() >= 30, counts


def test_first_frame_does_not_tell_the_label(train: MovingMNIST) -> None:
    """One digit at one place, moving two ways: equal first frames, different motions; and labels ignore digit class."""
    digit = np.asarray(train._digit(0))
    start = np.array([8.0, 8.0])
    up_left = render([digit], bounce(start, np.array([-2.0, -2.0]), 4, train.room)[:, None], 32)
    down_right = render([digit], bounce(start, np.array([2.0, 2.0]), 4, train.room)[:, None], 32)
    assert np.array_equal(up_left[0], down_right[0]) and not np.array_equal(up_left[1], down_right[1])
    # Every digit class comes with more than one direction: the digit does not give the label away.
    digit_labels = _mnist5k()["train"][1]
    seen: dict[int, set[int]] = {}
    for i in range(200):
        plan = train.plan(i)
        seen.setdefault(int(digit_labels[plan.digits[0]]), set()).add(plan.label)
    assert len(seen) == 10 and all(len(s) >= 2 for s in seen.values()), seen


def test_train_val_disjoint_digits() -> None:
    """Train clips use train-split MNIST digits, val clips val-split ones; no digit image is in both pools."""
    train_pool, val_pool = _mnist5k()["train"][0], _mnist5k()["val"][0]
    assert not {im.tobytes() for im in train_pool} & {im.tobytes() for im in val_pool}
    train, val = MovingMNIST("train", length=50), MovingMNIST("val", length=50)
    assert train._pool is train_pool and val._pool is val_pool
    for i in range(50):
        assert max(val.plan(i).digits) < len(val_pool) and max(train.plan(i).digits) < len(train_pool)


def test_bad_options() -> None:
    with pytest.raises(DataError, match="frame size"):
        MovingMNIST(size=100)
    with pytest.raises(DataError, match="split"):
        MovingMNIST("test")
    with pytest.raises(DataError, match="speed"):
        MovingMNIST(speed=20)


def test_an_image_command_refuses_the_clips_with_one_line(tmp_path, capsys) -> None:
    """The image recipes read images: `mae pretrain --data builtin:moving_mnist` is one error line naming the clips
    and the image datasets to use instead (exit 2), not a failure inside an image transform."""
    from tiny import MODEL, RUN

    from mae.cli import main

    with pytest.raises(DataError, match="video clips"):
        build_dataset("builtin:moving_mnist", "train")
    code = main(["pretrain", *MODEL, *RUN, "epochs=1", "--data", "builtin:moving_mnist",
                 "--output-dir", str(tmp_path / "run")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(err) == 1 and "video clips" in err[0] and "builtin:mnist5k" in err[0], err
