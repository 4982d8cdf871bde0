"""Decoding JPEGs on the training device (`data.decode=nvjpeg`): the pieces run on any device, so they are checked
here on the CPU against the CPU pipeline; the end-to-end CUDA run skips without a GPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae.config import load_config
from mae.data import PlainFolderDataset, WithMaskNoise, build_loader, build_transform, set_epoch
from mae.data.device_decode import CropPlan, DeviceDecoder, collate_encoded
from mae.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mae.errors import ConfigError, DataError
from mae.recipes.pretrain import PretrainConfig, run


def _photos(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # smooth colour waves of varied size and aspect (half-pixel shifts barely change them)
        h, w = 30 + 4 * i, 44 - 2 * i
        y, x = np.mgrid[0:h, 0:w] / 12.0
        waves = [np.sin(x + i), np.cos(y - i), np.sin(x + y)]
        image = np.stack([127.5 + 120 * c for c in waves], axis=-1).astype(np.uint8)
        Image.fromarray(image).save(folder / f"p{i}.jpg", quality=95)
    return folder


def _batch(folder: Path, augment: str, epoch: int = 0, seed: int = 0, device_side: bool = True) -> torch.Tensor:
    if device_side:
        dataset = PlainFolderDataset(folder, transform=CropPlan(augment), decode="encoded")
    else:
        dataset = PlainFolderDataset(folder, transform=build_transform(augment, 32, 3), decode="tensor")
    loader = build_loader(WithMaskNoise(dataset, 16), batch_size=len(dataset), shuffle=False, seed=seed,
                          collate_fn=collate_encoded if device_side else None)
    set_epoch(loader, epoch)
    images, noise = next(iter(loader))
    assert noise.shape == (len(dataset), 16)
    return DeviceDecoder("cpu", 32, IMAGENET_MEAN, IMAGENET_STD)(images) if device_side else images


def test_device_decoding_matches_the_cpu_pipeline(tmp_path):
    """Centre crops decoded by `DeviceDecoder` equal the CPU pipeline's (resize + centre crop) to resampling
    precision; random-resized crops are a pure function of (seed, epoch) and change with the epoch."""
    folder = _photos(tmp_path / "jpegs")
    device, cpu = _batch(folder, "none"), _batch(folder, "none", device_side=False)
    assert device.shape == cpu.shape == (6, 3, 32, 32) and device.dtype == torch.float32
    assert (device - cpu).abs().mean() < 0.05 and (device - cpu).abs().max() < 0.6  # [-2.1, 2.6] normalised
    first, again = _batch(folder, "rrc", epoch=3), _batch(folder, "rrc", epoch=3)
    assert torch.equal(first, again) and not torch.equal(first, _batch(folder, "rrc", epoch=4))


def test_device_decoding_refuses_what_it_cannot_read(tmp_path):
    """A non-JPEG in the folder is refused up front; a file that is not a JPEG at all is skipped with a warning
    like any unreadable image; a truncated JPEG fails the batch with a one-line DataError naming the fix."""
    folder = _photos(tmp_path / "mixed", n=2)
    Image.new("RGB", (8, 8)).save(folder / "x.png")
    with pytest.raises(DataError, match=r"x.png' is not one"):
        PlainFolderDataset(folder, decode="encoded")
    folder = _photos(tmp_path / "bad", n=2)
    (folder / "garbage.jpg").write_bytes(b"not a jpeg" * 30)
    dataset = PlainFolderDataset(folder, transform=CropPlan("none"), decode="encoded")
    with pytest.warns(UserWarning, match="garbage.jpg"):
        [dataset[i] for i in range(len(dataset))]
    data = (folder / "p0.jpg").read_bytes()
    (folder / "p1.jpg").write_bytes(data[: data.index(b"\xff\xda") + 20])  # headers intact, scan data cut
    items = [PlainFolderDataset(folder, transform=CropPlan("none"), decode="encoded")[i][0] for i in (1, 2)]
    batch = collate_encoded([(item, torch.zeros(4)) for item in items])[0]
    with pytest.raises(DataError, match=r"could not be decoded on cpu.*data.decode=tensor"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DeviceDecoder("cpu", 32, IMAGENET_MEAN, IMAGENET_STD)(batch)


def test_nvjpeg_config_errors(tmp_path):
    """nvjpeg needs JPEG files (not an embedded dataset), rrc or none, and a CUDA device."""
    with pytest.raises(ConfigError, match="embedded array dataset"):
        load_config(PretrainConfig, None, ["data.decode=nvjpeg", "data.path=builtin:photos"])
    with pytest.raises(ConfigError, match="rrc or none"):
        load_config(PretrainConfig, None, ["data.decode=nvjpeg", "data.augment=fixed_crop", "data.path=x"])
    if not torch.cuda.is_available():
        cfg = load_config(PretrainConfig, None, [
            "data.decode=nvjpeg", f"data.path={_photos(tmp_path / 'j')}", "device=cpu",
            "model.name=mae_vit_tiny_patch16", f"output_dir={tmp_path / 'run'}"])
        with pytest.raises(ConfigError, match="CUDA GPU"):
            run(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pretrain_with_nvjpeg_on_cuda(tmp_path):
    """One epoch of pre-training with the batch decoded on the GPU; the loss is finite and the run completes."""
    folder = _photos(tmp_path / "jpegs", n=8)
    cfg = load_config(PretrainConfig, None, [
        "data.decode=nvjpeg", f"data.path={folder}", "data.num_workers=0", "device=cuda", "epochs=1",
        "batch_size=4", "model.name=mae_vit_micro_patch4_28", "model.in_chans=3", "model.img_size=32",
        f"output_dir={tmp_path / 'run'}", "progress=false", "visualize=false"])
    summary = run(cfg)
    assert np.isfinite(summary["last_epoch_loss"])
