"""The data layer's guards: a class-folder tree without train/ and val/ gets a seeded, class-stratified validation
hold-out (so "val" accuracy is not measured on training images), and colour / grey conversions are said once."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from mae.data import build_dataset, has_split_folders, holdout_split
from mae.recipes.classify_common import ClassifyData, labelled_dataset


def _class_tree(root, counts: dict[str, int], size=(28, 28), colour=False):
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (*size, 3) if colour else size
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def test_holdout_split_is_stratified_disjoint_deterministic_and_keeps_a_training_image_per_class():
    """Per class: round(fraction * n) (at least 1, at most n - 1) images to val; the same lists on every call, other
    lists for another seed; a class of one image stays in train."""
    targets = [0] * 20 + [1] * 7 + [2] * 2 + [3]
    train, val = holdout_split(targets, 0.1)
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(len(targets)))
    per_class = {c: sum(targets[i] == c for i in val) for c in range(4)}
    assert per_class == {0: 2, 1: 1, 2: 1, 3: 0}
    assert holdout_split(targets, 0.1) == (train, val)
    assert holdout_split(targets, 0.1, seed=1) != (train, val)
    assert {targets[i] for i in train} == {0, 1, 2, 3}


def test_a_folder_without_val_gives_disjoint_train_and_val_splits_and_says_so(tmp_path, caplog):
    """labelled_dataset on a tree without train/ and val/: val is 10% of each class, train the rest, no image in
    both, the same on every call, and one log line says so; data.val_fraction=0 restores the old behaviour."""
    root = _class_tree(tmp_path / "tree", {"cat": 30, "dog": 20})
    data = ClassifyData(path=str(root), num_workers=0)
    with caplog.at_level(logging.INFO):
        train, classes = labelled_dataset(data, "train", None, 1)
        val, _ = labelled_dataset(data, "val", None, 1)
    assert classes == ["cat", "dog"] and (len(train), len(val)) == (45, 5)
    files = train.dataset.samples
    train_files = {files[i][0] for i in train.indices}
    val_files = {files[i][0] for i in val.indices}
    assert train_files.isdisjoint(val_files) and len(train_files | val_files) == 50
    assert sorted(files[i][1] for i in val.indices) == [0, 0, 0, 1, 1]
    assert labelled_dataset(data, "val", None, 1)[0].indices == val.indices
    assert sum("held out for validation" in r.getMessage() for r in caplog.records) == 1
    everything = ClassifyData(path=str(root), num_workers=0, val_fraction=0.0)
    assert len(labelled_dataset(everything, "val", None, 1)[0]) == 50


def test_an_explicit_val_folder_wins_over_the_holdout(tmp_path):
    """With train/ and val/ sub-folders the splits are those folders, whole."""
    _class_tree(tmp_path / "d" / "train", {"a": 6, "b": 6})
    _class_tree(tmp_path / "d" / "val", {"a": 2, "b": 3})
    assert has_split_folders(str(tmp_path / "d")) and not has_split_folders(str(tmp_path / "d" / "train"))
    data = ClassifyData(path=str(tmp_path / "d"), num_workers=0)
    assert len(labelled_dataset(data, "train", None, 1)[0]) == 12
    assert len(labelled_dataset(data, "val", None, 1)[0]) == 5


def test_knn_on_a_folder_without_val_no_longer_finds_each_image_as_its_own_neighbour(tmp_path):
    """`mae knn k=1` on class folders of random noise (nothing to learn): with the hold-out its top-1 is far from
    100%; scoring the training images themselves (data.val_fraction=0, the old behaviour) gives 100%, each image
    being its own nearest neighbour."""
    from mae.cli import main
    from mae.interop import save_model
    from mae.models import build_model

    root = _class_tree(tmp_path / "noise", {"a": 30, "b": 30, "c": 30})
    torch.manual_seed(0)
    save_model(build_model("mae_vit_micro_patch4_28", embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                            decoder_depth=1, decoder_num_heads=2), tmp_path / "tiny.safetensors")
    import json

    common = ["knn", "--checkpoint", str(tmp_path / "tiny.safetensors"), "--data", str(root), "--device", "cpu",
              "--precision", "fp32", "k=1", "data.num_workers=0", "data.val_fraction=0.2"]
    assert main([*common, "--output-dir", str(tmp_path / "held")]) == 0
    held = json.loads((tmp_path / "held" / "summary.json").read_text())
    assert held["val_images"] == 18 and held["train_images"] == 72 and held["top1"] < 90
    assert main([*common[:-1], "data.val_fraction=0", "--output-dir", str(tmp_path / "same")]) == 0
    assert json.loads((tmp_path / "same" / "summary.json").read_text())["top1"] == 100.0


@pytest.mark.parametrize("decode", ["pil", "tensor"])
def test_colour_images_for_a_grey_model_are_warned_about_once(tmp_path, caplog, decode):
    """A 1-channel dataset of RGB files logs one warning naming the fix (model.in_chans=3), however many images are
    read; grey files for a 3-channel model get the opposite warning; matching files get none."""
    colour = tmp_path / "colour"
    colour.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(colour / f"{i}.jpg")
    with caplog.at_level(logging.WARNING):
        grey_reader = build_dataset(str(colour), mode="L", decode=decode)
        for i in range(len(grey_reader)):
            grey_reader[i]
        colour_reader = build_dataset(str(colour), mode="RGB", decode=decode)
        for i in range(len(colour_reader)):
            colour_reader[i]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "converted to grey" in warnings[0] and "model.in_chans=3" in warnings[0]
    caplog.clear()
    grey = tmp_path / "grey"
    grey.mkdir()
    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(grey / "0.png")
    with caplog.at_level(logging.WARNING):
        build_dataset(str(grey), mode="RGB")[0]
    assert [r.getMessage() for r in caplog.records if "model.in_chans=1" in r.getMessage()]


def test_builtin_colour_photos_for_a_grey_model_are_warned_about(caplog):
    """builtin:photos (colour) read as 1-channel says so (once per process: the cache is cleared first, as another
    test may have read it that way already)."""
    from mae.data.builtin import _warn_conversion

    _warn_conversion.cache_clear()
    with caplog.at_level(logging.WARNING):
        build_dataset("builtin:photos", "val", mode="L")
    assert any("builtin:photos holds colour images" in r.getMessage() for r in caplog.records)
