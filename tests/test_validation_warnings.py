"""Validation before any work and the warnings a user needs (issue 23, items 2 and 5), through the real CLI.

Every float setting of every config command is finite and in its range when the config is loaded: a bad value on
the command line or in a YAML file is one line `mae CMD: error: ...` naming the key, the value and the valid range,
exit 2, before the output folder exists. A run that skipped non-finite updates, a k-NN whose k exceeds the training
set, and a data folder with entries the scan passed over each end with one warning saying so.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from faults import Result, check_failure
from PIL import Image
from tiny import MODEL, RUN

from mae.cli import CONFIG_COMMANDS, main

MICRO = "mae_vit_micro_patch4_28"
TINY = {
    "pretrain": [*MODEL, *RUN, "epochs=1", "data.train_limit=64", "visualize=false"],
    "finetune": ["init=scratch", f"model.name={MICRO}", "data.path=builtin:mnist5k", "data.train_limit=64",
                 "data.val_limit=32", "data.num_workers=0", "batch_size=32", "epochs=1", "precision=fp32",
                 "device=cpu", "progress=false"],
    "linprobe": ["init=random", f"model.name={MICRO}", "data.path=builtin:mnist5k", "data.train_limit=64",
                 "data.val_limit=32", "data.num_workers=0", "batch_size=32", "epochs=1", "precision=fp32",
                 "device=cpu", "progress=false"],
    "knn": ["init=random", f"model.name={MICRO}", "data.path=builtin:mnist5k", "data.train_limit=64",
            "data.val_limit=32", "data.num_workers=0", "precision=fp32", "device=cpu", "progress=false"],
    "evaluate": ["checkpoint=no-such-run", "data.path=builtin:mnist5k", "data.val_limit=32", "data.num_workers=0",
                 "precision=fp32", "device=cpu", "progress=false"],
    "detect": ["backbone.init=random", "backbone.model_name=mae_vit_tiny_patch16", "data.path=synthetic",
               "data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.image_size=64",
               "head.min_size=64", "head.max_size=64", "head.fpn_channels=16", "head.box_head_dim=32",
               "head.mask_head_channels=8", "head.anchor_sizes=[8,16,32,64,128]", "batch_size=2", "epochs=1",
               "num_workers=0", "precision=fp32", "device=cpu", "progress=false"],
    "segment": ["backbone.init=random", "backbone.model_name=mae_vit_tiny_patch16", "data.path=synthetic",
                "data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.image_size=64",
                "data.crop_size=64", "data.scale=64", "data.eval_scale=64", "test.crop=64", "test.stride=64",
                "head.channels=16", "head.aux_channels=8", "batch_size=2", "epochs=1", "num_workers=0",
                "precision=fp32", "device=cpu", "progress=false"],
}
"""Tiny settings of each command that pass validation and run (evaluate's checkpoint is a placeholder: no bad-number
case gets that far), so that only the bad value under test is wrong."""

NOT_FINITE = "is not a finite number"

# (command, key, value as typed, the valid range the error must state)
BAD_NUMBERS = [
    # the reported ones: tracebacks (nan) and a run that fails at its first checkpoint (inf)
    ("pretrain", "optim.lr", ".nan", "> 0"),
    ("pretrain", "optim.warmup_epochs", ".nan", ">= 0"),
    ("pretrain", "optim.weight_decay", "inf", ">= 0"),
    ("pretrain", "optim.base_lr", "-.inf", "> 0"),
    ("pretrain", "optim.base_lr", "0", "> 0"),
    ("pretrain", "optim.lr", "1e400", "> 0"),
    ("pretrain", "optim.min_lr", "-1e-3", ">= 0"),
    ("pretrain", "optim.betas", "[0.9,.nan]", "in [0, 1)"),
    ("pretrain", "optim.betas", "[0.9,1.0]", "in [0, 1)"),
    ("pretrain", "optim.clip_grad", "0", "> 0"),
    ("pretrain", "optim.clip_grad", ".inf", "> 0"),
    ("pretrain", "model.mask_ratio", "nan", "in [0, 1)"),
    ("pretrain", "model.mlp_ratio", "-2", "> 0"),
    ("pretrain", "save_every_minutes", ".nan", ">= 0"),
    ("pretrain", "data.std", "[0.0]", "> 0"),
    ("pretrain", "data.mean", "[.inf]", "finite"),
    ("finetune", "optim.lr", "-inf", "> 0"),
    ("finetune", "optim.layer_decay", ".nan", "in (0, 1]"),
    ("finetune", "optim.layer_decay", "1.5", "in (0, 1]"),
    ("finetune", "optim.weight_decay", "-0.1", ">= 0"),
    ("finetune", "optim.warmup_epochs", "-1", ">= 0"),
    ("finetune", "model.drop_path", "nan", "in [0, 1)"),
    ("finetune", "aug.mixup", ".nan", ">= 0"),
    ("finetune", "aug.cutmix", "inf", ">= 0"),
    ("finetune", "aug.smoothing", "1.0", "in [0, 1)"),
    ("finetune", "aug.reprob", "1.5", "in [0, 1]"),
    ("finetune", "aug.mixup_prob", "nan", "in [0, 1]"),
    ("finetune", "aug.scale", "[0.5,.nan]", "in (0, 1]"),
    ("finetune", "ema_decay", ".nan", "in [0, 1)"),
    ("finetune", "data.crop_pct", "0", "in (0, 1]"),
    ("linprobe", "optim.momentum", "1.0", "in [0, 1)"),
    ("linprobe", "optim.momentum", ".nan", "in [0, 1)"),
    ("linprobe", "optim.base_lr", ".nan", "> 0"),
    ("linprobe", "optim.weight_decay", "-.inf", ">= 0"),
    ("linprobe", "aug.hflip", "nan", "in [0, 1]"),
    ("knn", "temperature", "0", "> 0"),
    ("knn", "temperature", ".nan", "> 0"),
    ("knn", "temperature", "inf", "> 0"),
    ("knn", "data.val_fraction", ".nan", "in [0, 1)"),
    ("evaluate", "data.crop_pct", ".inf", "in (0, 1]"),
    ("evaluate", "data.val_fraction", "-0.1", "in [0, 1)"),
    ("evaluate", "data.std", "[.nan]", "> 0"),
    ("detect", "optim.lr", ".nan", "> 0"),
    ("detect", "optim.weight_decay", "inf", ">= 0"),
    ("detect", "optim.warmup_epochs", ".nan", ">= 0"),
    ("detect", "optim.clip_grad", "-1", "> 0"),
    ("detect", "optim.betas", "[1.0,0.999]", "in [0, 1)"),
    ("detect", "backbone.drop_path", "1.0", "in [0, 1)"),
    ("detect", "data.hflip", ".nan", "in [0, 1]"),
    ("detect", "head.aspect_ratios", "[0.5,0.0]", "> 0"),
    ("segment", "optim.lr", "0", "> 0"),
    ("segment", "optim.power", ".nan", "> 0"),
    ("segment", "optim.layer_decay", "inf", "in (0, 1]"),
    ("segment", "head.dropout", "1.0", "in [0, 1)"),
    ("segment", "head.aux_weight", ".nan", ">= 0"),
    ("segment", "data.ratio_range", "[0.5,.inf]", "> 0"),
    ("segment", "save_every_minutes", "-1", ">= 0"),
]


def _as_read(text: str) -> str:
    """How a float setting written as `text` is shown once read: '0' -> '0.0', '[0.9,1.0]' -> '[0.9, 1.0]'."""
    value = yaml.safe_load(text)
    return str([float(v) for v in value]) if isinstance(value, list) else str(float(value))


def _error_line(capsys, argv: list[str]) -> str:
    """Run `mae argv` in-process: exit 2, no traceback, and the last stderr line is the only error line."""
    return check_failure(Result(main(argv), "", capsys.readouterr().err), argv[0])


@pytest.mark.parametrize(("command", "key", "value", "valid"), BAD_NUMBERS,
                         ids=[f"{c}-{k}={v}" for c, k, v, _ in BAD_NUMBERS])
def test_a_bad_number_on_the_command_line_is_one_line_before_any_work(capsys, tmp_path, command, key, value, valid):
    """NaN, +-inf (also as 1e400) and out-of-range values of float settings stop every config command at load time:
    exit 2, one error line naming the key, the value and the valid range, and no output folder."""
    out = tmp_path / "out"
    line = _error_line(capsys, [command, *TINY[command], f"output_dir={out}", f"{key}={value}"])
    assert f"{key}" in line and valid in line, line
    if any(word in value for word in ("nan", "inf", "1e400")):
        assert NOT_FINITE in line and f"{key}=" in line, line
    else:
        assert f"got {_as_read(value)}" in line, line
    assert not out.exists()


@pytest.mark.parametrize(("command", "text", "key"), [
    ("pretrain", "optim:\n  lr: .nan\n", "optim.lr"),
    ("pretrain", "optim:\n  weight_decay: 1.0e+400\n", "optim.weight_decay"),
    ("pretrain", "optim:\n  clip_grad: 1e400\n", "optim.clip_grad"),
    ("finetune", "optim:\n  betas: [0.9, -.inf]\n", "optim.betas"),
    ("segment", "head:\n  aux_weight: .NaN\n", "head.aux_weight"),
])
def test_a_bad_number_in_a_config_file_is_caught_the_same_way(capsys, tmp_path, command, text, key):
    """`.nan`, `.inf` and `1e400` written in a YAML config file give the same one-line error as on the command
    line."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    line = _error_line(capsys, [command, "--config", str(path), *TINY[command], f"output_dir={out}"])
    assert f"{key}=" in line and NOT_FINITE in line, line
    assert not out.exists()


def test_every_float_setting_of_every_command_declares_its_range():
    """Each float field (or list of floats) of every config command has an entry in its section's RANGES: a new
    setting cannot slip in unchecked."""
    missing = []

    def walk(cls, prefix):
        ranges = {}
        for klass in reversed(cls.__mro__):
            ranges.update(vars(klass).get("RANGES", {}))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            sections = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(a)]
            if sections:
                walk(sections[0], f"{prefix}{f.name}.")
            elif f.init and "float" in str(hints[f.name]) and f.name not in ranges:
                missing.append(f"{prefix}{f.name}")

    for command, (_, path) in CONFIG_COMMANDS.items():
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        assert dataclasses.is_dataclass(cls)
        walk(cls, f"{command}: ")
    assert not missing, missing


# ---------------------------------------------------------------------------------------------------- warnings
def _warnings(caplog, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and fragment in r.getMessage()]


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_skipped_non_finite_updates_are_named_in_one_warning_at_the_end(tmp_path, monkeypatch, caplog, command):
    """A burst of non-finite losses shorter than max_nonfinite (updates 2 and 5 of 6, in epochs 1 and 3) ends with
    exit 0 and one warning at the end giving the count and the epochs (counted from 1), next to summary.json's
    count."""
    from mae.train import trainer as trainer_mod

    calls = {"n": 0}
    real_init = trainer_mod.Trainer.__init__

    def nan_on_2_and_5(self, run, *, loss_fn, **kwargs):
        def loss(module, batch):
            calls["n"] += 1
            value = loss_fn(module, batch)
            return value * float("nan") if calls["n"] in (2, 5) else value
        real_init(self, run, loss_fn=loss, **kwargs)

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", nan_on_2_and_5)
    out = tmp_path / "run"
    argv = [command, *TINY[command], "epochs=3", f"output_dir={out}"]
    if command == "finetune":
        argv += ["aug.rand_augment=null", "optim.warmup_epochs=0", "data.train_limit=64"]
    with caplog.at_level(logging.INFO, logger="mae"):
        assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_epochs"] == [0, 2]
    found = _warnings(caplog, "skipped for a non-finite loss (epochs")
    assert found == ["2 update(s) were skipped for a non-finite loss (epochs 1, 3); see summary.json"], found
    last = [r for r in caplog.records if r.levelno >= logging.WARNING][-1]
    assert last.getMessage() == found[0]  # at the end of the run, after everything else


def test_knn_with_k_larger_than_the_training_set_warns_once_with_the_k_used(tmp_path, caplog):
    """`mae knn k=50` on 16 training images runs with every image voting and says so in one warning naming k, the
    training set size and the k used; the summary records the k used."""
    out = tmp_path / "knn"
    with caplog.at_level(logging.INFO, logger="mae"):
        assert main(["knn", *TINY["knn"], "data.train_limit=16", "data.val_limit=8", "k=50",
                     f"output_dir={out}"]) == 0
    found = _warnings(caplog, "k=50")
    assert found == ["k=50 is larger than the training set (16 images): all 16 vote, so k=16 is used"], found
    assert json.loads((out / "summary.json").read_text())["k_used"] == 16


def _image_folder(root: Path, n: int = 39) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L").save(root / f"img{i:03d}.png")
    return root


def test_entries_passed_over_while_scanning_a_folder_are_counted_and_named(tmp_path, caplog):
    """A pre-training folder holding a dangling link, a link loop and a pipe named like images: the scan passes
    over them, one warning counts them and names them, and summary.json's skipped_files counts them (with a corrupt
    image met while loading)."""
    data = _image_folder(tmp_path / "images")
    (data / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (data / "loop.png").symlink_to(data / "loop.png")
    os.mkfifo(data / "pipe.png")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "run"
    argv = ["pretrain", *MODEL, *RUN, "epochs=1", "visualize=false", "batch_size=8", f"--data={data}",
            "model.in_chans=1", f"output_dir={out}"]
    argv = [a for a in argv if not a.startswith(("data.path=", "data.train_limit="))]
    with caplog.at_level(logging.INFO, logger="mae"):
        assert main(argv) == 0
    found = _warnings(caplog, "passed over while scanning")
    assert len(found) == 1, found
    for name, why in (("gone.png", "a dangling link"), ("loop.png", "unreadable"), ("pipe.png", "not a regular file")):
        assert f"'{name}' ({why}" in found[0], found[0]
    assert found[0].startswith(f"'{data}': 3 entries passed over while scanning"), found[0]
    assert json.loads((out / "summary.json").read_text())["skipped_files"] == 4


def test_a_class_folder_scan_warns_once_for_both_splits_and_knn_counts_what_it_passed_over(tmp_path, caplog):
    """`mae knn` on a class-folder tree without train/ and val/ (both splits are cut from one scan each) with a
    dangling class link at the top and a dangling image link in a class: one warning naming both, and summary.json's
    skipped_files is 2."""
    data = tmp_path / "classes"
    for label in ("a", "b"):
        _image_folder(data / label, n=8)
    (data / "b" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (data / "c").symlink_to(tmp_path / "moved-away")
    out = tmp_path / "knn"
    argv = ["knn", *[a for a in TINY["knn"] if not a.startswith("data.path=")], f"data.path={data}",
            "data.val_fraction=0.5", "k=4", f"output_dir={out}"]
    with caplog.at_level(logging.INFO, logger="mae"):
        assert main(argv) == 0
    found = _warnings(caplog, "passed over while scanning")
    assert found == [(f"'{data}': 2 entries passed over while scanning for images (counted as skipped_files in the "
                      "run's summary): 'c' (a dangling link), 'b/gone.png' (a dangling link)")], found
    assert json.loads((out / "summary.json").read_text())["skipped_files"] == 2
