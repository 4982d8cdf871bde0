"""mae.data: built-in datasets, folder readers, transforms and loaders."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae.data import (
    AUGMENTATIONS,
    ClassFolderDataset,
    Digits,
    MNIST5k,
    Photos,
    PlainFolderDataset,
    build_dataset,
    build_eval_transform,
    build_loader,
    build_transform,
    builtin,
    list_builtin,
    set_epoch,
)
from mae.errors import ConfigError, DataError

# ---------------------------------------------------------------- built-in datasets

def test_stratified_split_is_a_disjoint_cover_with_per_class_counts():
    """The split helper puts round(n_class * fraction) of every class in val, the rest in train, no index twice."""
    labels = np.repeat(np.arange(3), [10, 20, 5])
    train, val = builtin.stratified_split(labels, val_fraction=0.2, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[val]).tolist() == [2, 4, 1]


def test_mnist5k_is_4000_1000_stratified_and_the_same_every_time():
    """mnist5k: 4,000 / 1,000 images, 400 / 100 per class, 28x28 'L' images; rebuilding (even after re-seeding the
    global RNGs) gives the identical split."""
    train, val = MNIST5k("train"), MNIST5k("val")
    assert (len(train), len(val)) == (4000, 1000)
    assert np.bincount(train.targets).tolist() == [400] * 10
    assert np.bincount(val.targets).tolist() == [100] * 10
    assert (train.num_classes, train.in_chans, train.image_size) == (10, 1, 28)
    image, label = val[0]
    assert image.mode == "L" and image.size == (28, 28) and label == val.targets[0]
    x_before, y_before = val.as_tensors()

    builtin._mnist5k.cache_clear()
    torch.manual_seed(123)
    np.random.seed(123)
    x_after, y_after = MNIST5k("val").as_tensors()
    assert torch.equal(x_before, x_after) and torch.equal(y_before, y_after)
    assert x_before.shape == (1000, 1, 28, 28) and x_before.dtype == torch.uint8 and x_before.max() == 255


def test_train_and_val_images_do_not_overlap():
    """No MNIST image of the val split is also in the train split (the split is by index, not by sampling)."""
    x_train, _ = MNIST5k("train").as_tensors()
    x_val, _ = MNIST5k("val").as_tensors()
    train_rows = {row.tobytes() for row in x_train.flatten(1).numpy()}
    assert not any(row.tobytes() in train_rows for row in x_val.flatten(1).numpy())


def test_digits_split_is_stratified_80_20_and_scaled_to_uint8():
    """digits: 1,438 / 359 8x8 images with every class ~20% in val, pixel values scaled from 0..16 to 0..255."""
    train, val = Digits("train"), Digits("val")
    assert (len(train), len(val)) == (1438, 359)
    counts_train, counts_val = np.bincount(train.targets), np.bincount(val.targets)
    assert np.all(np.abs(counts_val / (counts_train + counts_val) - 0.2) < 0.01)
    x, _ = val.as_tensors()
    assert x.shape == (359, 1, 8, 8) and x.max() == 255 and x.min() == 0
    assert torch.equal(x, Digits("val").as_tensors()[0])


def test_photos_are_64px_rgb_crops_balanced_over_17_photos_and_deterministic():
    """photos: 2,040 / 510 RGB 64x64 crops, 120 / 30 per source photo, and regenerating the crops gives the same
    pixels."""
    train, val = Photos("train"), Photos("val")
    assert (len(train), len(val)) == (2040, 510)
    assert train.num_classes == 17 and np.bincount(train.targets).tolist() == [120] * 17
    assert np.bincount(val.targets).tolist() == [30] * 17
    image, _ = val[0]
    assert image.mode == "RGB" and image.size == (64, 64)
    first = Photos("val", val_per_photo=3).as_tensors()[0]
    builtin._photo_crops.cache_clear()
    assert torch.equal(first, Photos("val", val_per_photo=3).as_tensors()[0])
    assert first.shape == (51, 3, 64, 64) and first.float().std() > 10  # real image content, not a blank


def test_builtin_mode_conversion_matches_as_tensors():
    """A mode override converts both the PIL items and `as_tensors` the same way (grey<->RGB), and sets in_chans."""
    grey_photos = Photos("val", mode="L", val_per_photo=2)
    x, _ = grey_photos.as_tensors()
    assert grey_photos.in_chans == 1 and x.shape[1] == 1
    assert np.array_equal(np.asarray(grey_photos[5][0]), x[5, 0].numpy())
    rgb_digits = Digits("val", mode="RGB")
    x, _ = rgb_digits.as_tensors()
    assert rgb_digits.in_chans == 3 and np.array_equal(np.asarray(rgb_digits[7][0]), x[7].permute(1, 2, 0).numpy())


def test_build_dataset_builtin_and_unknown_name_suggestion():
    """`builtin:<name>` builds the dataset; an unknown name raises DataError suggesting the close match and listing
    the valid names; a bad split is refused."""
    assert isinstance(build_dataset("builtin:digits", split="val"), Digits)
    assert list_builtin() == ["builtin:mnist5k", "builtin:digits", "builtin:photos"]
    with pytest.raises(DataError, match=r"did you mean 'builtin:mnist5k'.*builtin:photos"):
        build_dataset("builtin:mnist")
    with pytest.raises(DataError, match="split 'test'"):
        build_dataset("builtin:digits", split="test")


# ---------------------------------------------------------------- transforms

@pytest.mark.parametrize("name", AUGMENTATIONS)
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("source", [("L", (5, 7)), ("RGB", (300, 200)), ("RGB", (20, 20))])
def test_augmentations_give_normalised_float_tensors_of_the_crop_size(name, in_chans, source):
    """Every augmentation turns a grey or RGB image, also one smaller than the crop, into float [C, 32, 32]."""
    mode, size = source
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    torch.manual_seed(0)  # the crop and the jitter draw from torch's RNG: a dark enough draw would leave no value > 0
    out = build_transform(name, img_size=32, in_chans=in_chans)(image)
    assert out.shape == (in_chans, 32, 32) and out.dtype == torch.float32
    assert out.min() < 0 < out.max()  # normalised, not in [0, 1]


def test_transform_normalises_with_imagenet_stats_for_rgb_and_half_for_grey():
    """A white image maps to (1 - mean) / std: ImageNet stats for 3 channels, 0.5 / 0.5 for one, or the given ones."""
    white = Image.new("L", (10, 10), 255)
    rgb = build_transform("none", 8, in_chans=3)(white)[:, 0, 0]
    assert torch.allclose(rgb, (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
    assert torch.allclose(build_transform("none", 8, in_chans=1)(white), torch.ones(1, 8, 8))
    custom = build_transform("none", 8, in_chans=1, mean=[0.1307], std=[0.3081])(white)
    assert torch.allclose(custom, torch.full((1, 8, 8), (1 - 0.1307) / 0.3081))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_the_one_step_finish_equals_torchvisions_four_modules_bit_for_bit(mode, in_chans):
    """`ToNormalizedTensor` (channels, to image, to float, normalise in one call) gives exactly what v2.RGB /
    v2.Grayscale + ToImage + ToDtype(scale) + Normalize give, for PIL images of every mode and for uint8 tensors."""
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    from mae.data.transforms import ToNormalizedTensor, default_mean_std

    mean, std = default_mean_std(in_chans)
    modules = v2.Compose([v2.RGB() if in_chans == 3 else v2.Grayscale(num_output_channels=1), v2.ToImage(),
                          v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    pixels = np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    for source in (image, TF.pil_to_tensor(image.convert("L" if mode in ("L", "1") else "RGB"))):
        ours = ToNormalizedTensor(in_chans, mean, std)(source)
        assert type(ours) is torch.Tensor and torch.equal(ours, modules(source).as_subclass(torch.Tensor))


def test_eval_transform_centre_crops_after_resizing_by_crop_pct():
    """The eval transform resizes the shorter side to size / crop_pct then centre crops: a 1-px border around a
    56-px image's centre 48 px disappears with crop_pct=0.875 but not with crop_pct=1."""
    pixels = np.zeros((56, 56), dtype=np.uint8)
    pixels[:4], pixels[-4:], pixels[:, :4], pixels[:, -4:] = 255, 255, 255, 255  # white frame, 4 px wide
    image = Image.fromarray(pixels)
    cropped = build_eval_transform(48, in_chans=1, crop_pct=0.875)(image)
    resized = build_eval_transform(48, in_chans=1, crop_pct=1.0)(image)
    assert cropped.shape == resized.shape == (1, 48, 48)
    assert cropped[0, 0, 24] < 0 < resized[0, 0, 24]  # the frame is cut off only with crop_pct < 1
    assert build_eval_transform(8, in_chans=3)(Image.new("L", (3, 3))).shape == (3, 8, 8)


def test_eval_at_448_resizes_to_448_and_crops_all_of_it_as_the_release():
    """Above 224 px the default crop fraction is 1.0 (the release: resize 448, crop 448), at 224 it is 0.875
    (resize 256, crop 224): the 448-px output equals a bicubic resize of the shorter side to 448 plus a centre crop
    of 448, and differs from the old resize-to-512 pipeline; a 224-px eval still resizes to 256."""
    from torchvision.transforms import v2

    from mae.data.transforms import default_crop_pct

    assert (default_crop_pct(448), default_crop_pct(224), default_crop_pct(256), default_crop_pct(28)) == (
        1.0, 0.875, 1.0, 1.0)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (500, 600, 3), dtype=np.uint8))  # 600 wide, 500 high
    ours = build_eval_transform(448, in_chans=3)(image)
    sizes = [t.size for t in build_eval_transform(448, in_chans=3).transforms if isinstance(t, v2.Resize)]
    assert sizes == [[448]] and ours.shape == (3, 448, 448)
    release = build_eval_transform(448, in_chans=3, crop_pct=1.0)(image)
    old = build_eval_transform(448, in_chans=3, crop_pct=448 / 512)(image)
    assert torch.equal(ours, release) and not torch.allclose(ours, old)
    assert [t.size for t in build_eval_transform(224, in_chans=3).transforms if isinstance(t, v2.Resize)] == [[256]]


def test_unknown_augmentation_and_bad_channels_raise_config_error():
    """An unknown augmentation name lists the valid ones; in_chans other than 1 or 3 and a mean of the wrong length
    are refused."""
    with pytest.raises(ConfigError, match=r"unknown augmentation 'rrc_jiter'.*rrc_jitter"):
        build_transform("rrc_jiter", 32, 3)
    with pytest.raises(ConfigError, match="in_chans=2"):
        build_transform("rrc", 32, 2)
    with pytest.raises(ConfigError, match="need 3 value"):
        build_transform("rrc", 32, 3, mean=[0.5], std=[0.5])


# ---------------------------------------------------------------- folders

def _save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _make_images(folder: Path) -> None:
    """One image of every storage kind, each a solid colour whose 8-bit RGB value the tests know."""
    _save(folder / "rgb.png", Image.new("RGB", (6, 4), (200, 10, 30)))
    _save(folder / "grey.png", Image.new("L", (6, 4), 77))
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 10, 120, 250] + [0] * 762)
    _save(folder / "palette.png", palette)
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[:, :3] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent
    _save(folder / "rgba.png", Image.fromarray(rgba))
    sixteen = np.full((4, 6), 65535, dtype=np.uint16)
    sixteen[:, 3:] = 32896  # 0x8080 -> 128
    _save(folder / "sixteen.png", Image.fromarray(sixteen))
    _save(folder / "sub" / "deeper" / "photo.jpg", Image.new("RGB", (40, 30), (0, 128, 0)), quality=95)
    (folder / "notes.txt").write_text("not an image")
    (folder / "._rgb.png").write_bytes(b"macOS metadata, hidden")


def _make_corrupt(folder: Path) -> None:
    (folder / "truncated.jpg").write_bytes(_jpeg_bytes()[:600])
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 20)


def _by_name(dataset) -> dict[str, tuple[Image.Image, int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {Path(path).name: dataset[i] for i, (path, _) in enumerate(dataset.samples)}


def test_plain_folder_converts_every_storage_kind_to_8bit_rgb_and_grey(tmp_path):
    """Grey, palette, RGBA (composited on white) and 16-bit PNGs and a nested JPEG all read as 8-bit RGB or L with
    the right values (16-bit scaled, not clipped); non-image and hidden files are ignored; labels are -1."""
    _make_images(tmp_path)
    rgb = PlainFolderDataset(tmp_path, mode="RGB")
    assert len(rgb) == 6 and set(rgb.targets) == {-1} and rgb.num_classes == 0
    items = _by_name(rgb)
    assert all(image.mode == "RGB" for image, _ in items.values())
    assert items["rgb.png"][0].getpixel((0, 0)) == (200, 10, 30)
    assert items["grey.png"][0].getpixel((0, 0)) == (77, 77, 77)
    assert items["palette.png"][0].getpixel((0, 0)) == (10, 120, 250)
    assert items["rgba.png"][0].getpixel((0, 0)) == (255, 0, 0)
    assert items["rgba.png"][0].getpixel((5, 0)) == (255, 255, 255)
    assert items["sixteen.png"][0].getpixel((0, 0)) == (255, 255, 255)
    assert items["sixteen.png"][0].getpixel((5, 0)) == (128, 128, 128)
    assert items["photo.jpg"][0].size == (40, 30)

    grey = _by_name(PlainFolderDataset(tmp_path, mode="L"))
    assert all(image.mode == "L" for image, _ in grey.values())
    assert grey["sixteen.png"][0].getpixel((5, 0)) == 128
    assert grey["grey.png"][0].getpixel((0, 0)) == 77


def test_corrupt_files_are_skipped_with_a_warning_counted_and_replaced_by_the_next_image(tmp_path):
    """A truncated JPEG and a garbage .jpg each warn once naming the file, are listed in bad_files, and their index
    returns the next readable sample (the same one every time)."""
    _make_images(tmp_path)
    _make_corrupt(tmp_path)
    dataset = PlainFolderDataset(tmp_path)
    assert len(dataset) == 8
    with pytest.warns(UserWarning) as caught:
        items = [dataset[i] for i in range(len(dataset))]
    messages = " ".join(str(w.message) for w in caught)
    assert "truncated.jpg" in messages and "garbage.jpg" in messages
    assert dataset.num_skipped == 2
    assert sorted(Path(p).name for p in dataset.bad_files) == ["garbage.jpg", "truncated.jpg"]

    names = [Path(p).name for p, _ in dataset.samples]
    bad = names.index("garbage.jpg")
    assert names[bad + 1] == "grey.png"
    assert np.array_equal(np.asarray(items[bad][0]), np.asarray(items[bad + 1][0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file already reported does not warn again
        assert np.array_equal(np.asarray(dataset[bad][0]), np.asarray(items[bad][0]))


def test_strict_mode_raises_naming_the_corrupt_file(tmp_path):
    """strict=True turns the first unreadable file into a DataError that names it."""
    _make_corrupt(tmp_path)
    dataset = PlainFolderDataset(tmp_path, strict=True)
    names = [Path(p).name for p, _ in dataset.samples]
    with pytest.raises(DataError, match=r"truncated.jpg"):
        dataset[names.index("truncated.jpg")]
    with pytest.raises(DataError, match=r"garbage.jpg"):
        build_dataset(str(tmp_path), strict=True, require_classes=False)[names.index("garbage.jpg")]


def test_verify_drops_corrupt_files_up_front(tmp_path):
    """verify=True decodes every file at construction: the bad ones are counted and never indexed."""
    _make_images(tmp_path)
    _make_corrupt(tmp_path)
    with pytest.warns(UserWarning) as caught:
        dataset = PlainFolderDataset(tmp_path, verify=True)
    assert len(caught) == 2 and len(dataset) == 6 and dataset.num_skipped == 2
    assert "truncated.jpg" not in " ".join(Path(p).name for p, _ in dataset.samples)


def test_class_folders_give_sorted_class_labels_and_skip_hidden_folders(tmp_path):
    """root/<class>/** is read with ImageFolder semantics: sorted class names, images of nested folders included,
    hidden folders (.ipynb_checkpoints) are not classes; build_dataset detects the layout."""
    _make_images(tmp_path / "zebra")
    _save(tmp_path / "ant" / "a.png", Image.new("RGB", (5, 5)))
    _save(tmp_path / ".ipynb_checkpoints" / "b.png", Image.new("RGB", (5, 5)))
    dataset = build_dataset(str(tmp_path), mode="L")
    assert isinstance(dataset, ClassFolderDataset)
    assert dataset.classes == ["ant", "zebra"] and dataset.in_chans == 1
    assert np.bincount(dataset.targets).tolist() == [1, 6]
    assert dataset[0][0].mode == "L" and dataset[0][1] == 0


def test_build_dataset_reads_split_sub_folders_and_plain_trees(tmp_path):
    """A folder with train/ and val/ reads the split's sub-folder; a tree whose sub-folders hold no images directly
    is a plain recursive folder; a val split missing next to a train/ folder is an error, not a leak."""
    _save(tmp_path / "both" / "train" / "cat" / "1.png", Image.new("RGB", (5, 5)))
    _save(tmp_path / "both" / "val" / "cat" / "2.png", Image.new("RGB", (5, 5)))
    _save(tmp_path / "both" / "val" / "dog" / "3.png", Image.new("RGB", (5, 5)))
    assert len(build_dataset(str(tmp_path / "both"), split="train")) == 1
    val = build_dataset(str(tmp_path / "both"), split="val")
    assert len(val) == 2 and val.classes == ["cat", "dog"]

    _save(tmp_path / "plain" / "2020" / "jan" / "1.png", Image.new("RGB", (5, 5)))
    _save(tmp_path / "plain" / "top.png", Image.new("RGB", (5, 5)))
    plain = build_dataset(str(tmp_path / "plain"), split="val")
    assert isinstance(plain, PlainFolderDataset) and len(plain) == 2

    _save(tmp_path / "only_train" / "train" / "cat" / "1.png", Image.new("RGB", (5, 5)))
    with pytest.raises(DataError, match="no 'val' sub-folder"):
        build_dataset(str(tmp_path / "only_train"), split="val")


def test_folder_errors_name_the_path_and_the_fix(tmp_path):
    """Missing path, a file given as folder, an empty folder, a folder without images (message lists the
    extensions) and images without class folders when classes are required all raise DataError."""
    with pytest.raises(DataError, match=r"data path '.*nowhere' does not exist"):
        build_dataset(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="does not exist"):
        ClassFolderDataset(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="is a file, not a folder"):
        build_dataset(str(tmp_path / "file.png"))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"'.*empty' holds no image files; accepted extensions: .*\.jpg"):
        build_dataset(str(empty))
    (empty / "readme.md").write_text("no images here")
    (empty / "sub").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        PlainFolderDataset(empty)
    with pytest.raises(DataError, match="holds no image files"):
        ClassFolderDataset(empty)

    flat = tmp_path / "flat"
    _save(flat / "a.png", Image.new("RGB", (5, 5)))
    with pytest.raises(DataError, match=r"'.*flat' has images but no class sub-folders.*<class name>"):
        build_dataset(str(flat), require_classes=True)
    assert len(build_dataset(str(flat))) == 1  # without the requirement it is a plain folder


# ---------------------------------------------------------------- loaders

class _Indices(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 50

    def __getitem__(self, index: int) -> int:
        return index


def _order(loader) -> list[int]:
    return torch.cat(list(loader)).tolist()


def test_loader_order_is_a_pure_function_of_seed_and_epoch():
    """Two loaders with the same seed give the same order for the same epoch, whatever happened before; epochs and
    seeds change the order; shuffle=False is sequential; drop_last drops the partial batch."""
    a, b = build_loader(_Indices(), batch_size=8, seed=1), build_loader(_Indices(), batch_size=8, seed=1)
    set_epoch(a, 0)
    epoch0 = _order(a)
    set_epoch(a, 1)
    epoch1 = _order(a)
    set_epoch(b, 1)
    torch.manual_seed(999)  # the global RNG plays no part
    assert _order(b) == epoch1
    set_epoch(a, 0)
    assert _order(a) == epoch0
    assert epoch0 != epoch1 and sorted(epoch0) == list(range(50))
    c = build_loader(_Indices(), batch_size=8, seed=2)
    set_epoch(c, 0)
    assert _order(c) != epoch0
    assert _order(build_loader(_Indices(), batch_size=8, shuffle=False)) == list(range(50))
    assert len(list(build_loader(_Indices(), batch_size=8, drop_last=True))) == 6


def test_a_batch_fetched_at_once_equals_its_samples_fetched_one_by_one_and_leaves_the_callers_generators():
    """The loader asks `SeededDataset` for a whole batch: each sample still gets its own seeds (the same crops and
    mask noise as one at a time), and the caller's torch / python / numpy generators are as they were."""
    import random

    from mae.data import SeededDataset, WithMaskNoise

    data = SeededDataset(WithMaskNoise(build_dataset("builtin:digits", "train", transform=build_transform(
        "rrc", 8, 1)), num_patches=4))
    keys = [(3, 11), (0, 12), (3, 13)]
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    batch = data.__getitems__(keys)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    for (image, noise), key in zip(batch, keys, strict=True):
        one_image, one_noise = data[key]
        assert torch.equal(image, one_image) and torch.equal(noise, one_noise)
    assert not torch.equal(batch[0][0], batch[2][0])  # same index, other seed: another crop


def test_fixed_embedded_items_are_memoized_identically_and_everything_else_is_left_alone(tmp_path):
    """The embedded digits under the deterministic 'none' augmentation are transformed once: every later read
    returns the same item, equal to a fresh read; the fingerprint sees through the wrapper. A random augmentation,
    a folder, or a set too big for the memory cap are not wrapped."""
    from mae.data import MemoizedDataset, fingerprint, memoize_if_fixed

    plain = build_dataset("builtin:digits", "train", transform=build_transform("none", 8, 1))
    memo = memoize_if_fixed(plain, "none", item_bytes=4 * 8 * 8)
    assert isinstance(memo, MemoizedDataset) and len(memo) == len(plain)
    first = memo[5]
    assert memo[5] is first and torch.equal(first[0], plain[5][0]) and first[1] == plain[5][1]
    assert fingerprint(memo) == fingerprint(plain)
    random_crops = build_dataset("builtin:digits", "train", transform=build_transform("rrc", 8, 1))
    assert memoize_if_fixed(random_crops, "rrc", item_bytes=256) is random_crops
    assert memoize_if_fixed(plain, "none", item_bytes=2**30) is plain
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    folder = build_dataset(str(tmp_path), "train", transform=build_transform("none", 8, 1))
    assert memoize_if_fixed(folder, "none", item_bytes=256) is folder


def test_loader_with_workers_keeps_the_order_and_persistent_workers():
    """With worker processes the order per (seed, epoch) is the same as in the main process, and the workers
    persist across epochs."""
    with_workers = build_loader(_Indices(), batch_size=8, seed=3, num_workers=2)
    in_process = build_loader(_Indices(), batch_size=8, seed=3)
    assert with_workers.persistent_workers and with_workers.prefetch_factor == 4
    for epoch in (0, 1):
        set_epoch(with_workers, epoch)
        set_epoch(in_process, epoch)
        assert _order(with_workers) == _order(in_process)


def test_loader_refuses_distributed_without_process_group_and_empty_datasets():
    """distributed=True without torch.distributed initialised is a ConfigError, as is batch_size 0."""
    with pytest.raises(ConfigError, match="init_process_group"):
        build_loader(_Indices(), batch_size=8, distributed=True)
    with pytest.raises(ConfigError, match="batch_size=0"):
        build_loader(_Indices(), batch_size=0)


def test_tensor_decoding_of_jpegs_matches_pil_and_keeps_the_skip_rules(tmp_path):
    """decode='tensor' reads JPEGs with torchvision.io as uint8 tensors: after the same transform they agree with
    PIL's to JPEG-decoder precision; PNGs still go through PIL (alpha on white); corrupt JPEGs are still skipped with
    a warning, or raise with strict=True; unknown decoders are refused."""
    rng = np.random.default_rng(0)
    for i in range(3):
        smooth = np.kron(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8), np.ones((6, 6, 1), dtype=np.uint8))
        _save(tmp_path / f"photo{i}.jpg", Image.fromarray(smooth), quality=95)
    _make_images(tmp_path / "kinds")
    (tmp_path / "bad").mkdir()
    _make_corrupt(tmp_path / "bad")
    transform = build_transform("none", 32, 3)
    pil = PlainFolderDataset(tmp_path, transform=transform)
    fast = PlainFolderDataset(tmp_path, transform=transform, decode="tensor")
    assert [p for p, _ in pil.samples] == [p for p, _ in fast.samples]
    with pytest.warns(UserWarning, match="skipping corrupt"):
        pairs = [(pil[i][0], fast[i][0]) for i in range(len(pil))]
    assert {Path(p).name for p in fast.bad_files} == {"truncated.jpg", "garbage.jpg"}
    for a, b in pairs:
        assert a.shape == b.shape == (3, 32, 32) and b.dtype == torch.float32
        assert (a - b).abs().max() < 0.1  # [-2, 2.6] after ImageNet normalisation: within a few 8-bit levels
    raw = PlainFolderDataset(tmp_path / "kinds", decode="tensor")
    items = _by_name(raw)
    assert items["photo.jpg"][0].shape == (3, 30, 40) and items["photo.jpg"][0].dtype == torch.uint8
    assert items["rgba.png"][0].getpixel((5, 0)) == (255, 255, 255)
    grey = _by_name(PlainFolderDataset(tmp_path / "kinds", mode="L", decode="tensor"))
    assert grey["photo.jpg"][0].shape == (1, 30, 40)
    with pytest.raises(DataError, match=r"garbage.jpg' is corrupt"):  # the first in sorted order
        strict = PlainFolderDataset(tmp_path / "bad", strict=True, decode="tensor")
        [strict[i] for i in range(len(strict))]
    with pytest.raises(DataError, match="decoder 'nvjpeg' is not supported"):
        PlainFolderDataset(tmp_path, decode="nvjpeg")
    via_spec = _by_name(build_dataset(str(tmp_path / "kinds"), decode="tensor"))  # the folder spec passes it on
    photo = via_spec["photo.jpg"][0]
    assert set(via_spec) == set(items) and isinstance(photo, torch.Tensor) and photo.dtype == torch.uint8
    assert all(isinstance(image, Image.Image) for name, (image, _) in via_spec.items() if name != "photo.jpg")
