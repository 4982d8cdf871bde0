"""Readers that do not trust what they load, through the real command line (issue 23, items 2, 3 and 5):

* weights holding NaN / inf are refused by every command that uses weights, naming the file and the first
  non-finite tensor in state-dict order;
* a checkpoint of another kind (pre-training, fine-tuning, linear probe, encoder-only, MAE weights, DCP directory,
  detection) is named for what it is, with the command that takes it, before any config-key error;
* a model name that contradicts the architecture a checkpoint stores is a warning (the file's architecture is
  used) or, for `mae convert`, an error.

Every error case checks the CLI's promise: exit code 2, no traceback, exactly one ``mae CMD: error:`` line and it is
the last line on stderr. One tiny pre-training, fine-tuning and linear-probing run (a few seconds each) feed all cases.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import MODEL, RUN

from mae.cli import main

FIRST_BAD = "blocks.0.attn.qkv.weight"
POISONED = (FIRST_BAD, "blocks.1.mlp.fc2.weight", "blocks.1.norm2.weight")
"""The tensors the NaN copies poison; the first one in state-dict (and file) order is FIRST_BAD."""
CLASSIFY = ["data.path=builtin:mnist5k", "data.train_limit=64", "data.val_limit=32", "data.num_workers=0",
            "batch_size=32", "epochs=1", "precision=fp32", "device=cpu", "progress=false", "seed=0"]
LARGE = "mae_vit_large_patch16"


def _run(recipe: str, cls_name: str, overrides: list[str]) -> None:
    from mae.config import load_config

    module = __import__(f"mae.recipes.{recipe}", fromlist=["run"])
    module.run(load_config(getattr(module, cls_name), None, overrides))


def _poison(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, float("nan")) if k in POISONED else v for k, v in state_dict.items()}


def _nan_safetensors(src: Path, dst: Path) -> Path:
    """A copy of a safetensors file with NaN in the POISONED tensors; its metadata (format, stored config) kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
    save_file(_poison(load_file(src)), dst, metadata=metadata)
    return dst


def _nan_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of a training checkpoint with NaN in the POISONED weights and a valid digest (it verifies)."""
    from mae.train.checkpoint import state_digest

    state = torch.load(src, map_location="cpu", weights_only=True)
    state["model"] = _poison(state["model"])
    state["integrity"] = {"sha256": state_digest(state)}
    torch.save(state, dst)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny runs, NaN copies of their files, a folder of images, an encoder-only file, a DCP directory of the
    pre-training checkpoint and a detection checkpoint."""
    root = tmp_path_factory.mktemp("trust")
    pre, ft, lp = root / "pre", root / "ft", root / "lp"
    _run("pretrain", "PretrainConfig", [*MODEL, *RUN, "data.train_limit=64", "epochs=1", "visualize=false",
                                        f"output_dir={pre}"])
    _run("finetune", "FinetuneConfig", [*CLASSIFY, f"checkpoint={pre}", f"output_dir={ft}"])
    _run("linprobe", "LinprobeConfig", [*CLASSIFY, f"checkpoint={pre}", f"output_dir={lp}"])
    nan = root / "nan"
    (nan / "pre").mkdir(parents=True)
    (nan / "ft").mkdir()
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(images / f"digit{i}.png")
    from mae.interop import convert

    encoder = convert(pre / "model.safetensors", root / "encoder.safetensors", to="timm")
    from mae.train.dcp import file_to_dcp

    dcp = file_to_dcp(pre / "checkpoint-last.pth", root / "pre-dcp")
    state = torch.load(ft / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    detect = root / "detect.pth"
    torch.save({"format": "mae-detect", "version": 2, "kind": "detect", "task": {"classes": ["shape"]},
                "model": {f"backbone.{k}": v for k, v in state["model"].items()}}, detect)
    return {"pre": pre, "ft": ft, "lp": lp, "images": images, "encoder": encoder, "dcp": dcp, "detect": detect,
            "nan_model": _nan_safetensors(pre / "model.safetensors", nan / "pre" / "model.safetensors"),
            "nan_pre": _nan_checkpoint(pre / "checkpoint-last.pth", nan / "pre" / "checkpoint-last.pth"),
            "nan_ft": _nan_checkpoint(ft / "checkpoint-best.pth", nan / "ft" / "checkpoint-best.pth")}


def _one_error(capsys, argv: list[str], *fragments: str) -> str:
    """Run `mae argv` in-process: exit code 2, no traceback, exactly one `mae CMD: error:` line, last on stderr, and
    holding every fragment. Returns that line."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"mae {argv[0]}: error: ")]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------------------------------
# non-finite weights
# ---------------------------------------------------------------------------------------------------------------------

DATA = ["data.num_workers=0", "device=cpu", "progress=false"]
SHAPES = ["data.synthetic.num_train=2", "data.synthetic.num_val=1", "data.synthetic.image_size=64",
          "data.synthetic.max_objects=1", "num_workers=0", "device=cpu", "progress=false", "epochs=1", "batch_size=2"]
NAN_COMMANDS = {
    "knn": lambda f, t: ["knn", f"checkpoint={f['nan_model']}", "data.path=builtin:mnist5k", "data.train_limit=32",
                         "data.val_limit=16", *DATA, f"output_dir={t}"],
    "visualize": lambda f, t: ["visualize", str(f["nan_model"]), "--data", "builtin:mnist5k", "--num-images", "2",
                               "--out", str(t / "recon.png")],
    "visualize-run-checkpoint": lambda f, t: ["visualize", str(f["nan_pre"]), "--data", "builtin:mnist5k",
                                              "--num-images", "2", "--out", str(t / "recon.png")],
    "embed": lambda f, t: ["embed", str(f["nan_model"]), "--data", str(f["images"]), "--out",
                           str(t / "e.safetensors"), "--device", "cpu", "progress=false"],
    "attention": lambda f, t: ["attention", str(f["nan_model"]), "--images", str(f["images"]), "--out",
                               str(t / "a.png")],
    "evaluate": lambda f, t: ["evaluate", f"checkpoint={f['nan_ft']}", "data.path=builtin:mnist5k",
                              "data.val_limit=16", "data.num_workers=0", "device=cpu", f"output_dir={t}"],
    "export-classifier": lambda f, t: ["export", str(f["nan_ft"]), "--out", str(t / "c.onnx"), "--no-check"],
    "export-encoder": lambda f, t: ["export", str(f["nan_model"]), "--out", str(t / "e.onnx"), "--no-check"],
    "convert": lambda f, t: ["convert", str(f["nan_model"]), str(t / "ref.pth"), "--to", "reference"],
    "convert-classifier": lambda f, t: ["convert", str(f["nan_ft"]), str(t / "cls"), "--to", "timm"],
    "convert-to-dcp": lambda f, t: ["convert", str(f["nan_pre"]), str(t / "dcp"), "--to", "dcp"],
    "finetune": lambda f, t: ["finetune", f"checkpoint={f['nan_pre']}", *CLASSIFY, f"output_dir={t}"],
    "linprobe": lambda f, t: ["linprobe", f"checkpoint={f['nan_model']}", *CLASSIFY, f"output_dir={t}"],
    "detect": lambda f, t: ["detect", "--checkpoint", str(f["nan_model"]), f"--data=synthetic:{t / 'shapes'}",
                            "backbone.pyramid=simple", *SHAPES, f"output_dir={t / 'run'}"],
    "segment": lambda f, t: ["segment", "--checkpoint", str(f["nan_model"]), f"--data=synthetic:{t / 'shapes'}",
                             "backbone.pyramid=simple", *SHAPES, f"output_dir={t / 'run'}"],
}


@pytest.mark.parametrize("case", list(NAN_COMMANDS))
def test_every_command_refuses_nan_weights_naming_the_file_and_the_first_bad_tensor(files, tmp_path, capsys, case):
    """A checkpoint whose weights hold NaN (a valid digest, or a safetensors file with its metadata) is one error
    line naming the file and the first non-finite tensor with the count, for every command that reads weights:
    knn, visualize, embed, attention, evaluate, export, convert and the initial weights of finetune / linprobe /
    detect / segment. No output (picture, model, checkpoint) is written."""
    argv = NAN_COMMANDS[case](files, tmp_path)
    line = _one_error(capsys, argv, f"holds NaN/inf in '{FIRST_BAD}'", "the first of 3 non-finite tensors",
                      "use an earlier checkpoint")
    assert "/nan/" in line  # names the file
    written = [p for p in tmp_path.rglob("*") if p.suffix in (".png", ".onnx", ".pth", ".safetensors")
               and "shapes" not in p.relative_to(tmp_path).parts]  # the synthetic data detect / segment make
    assert not written


def test_resume_skips_a_nan_checkpoint_of_a_run_and_refuses_it_named(files, tmp_path, capsys):
    """Resuming a run directory whose checkpoint-last.pth holds NaN (with a valid digest) falls back to the earlier
    numbered checkpoint, as for a damaged file; passing that file itself is one error line naming the tensor."""
    from mae.train.checkpoint import CheckpointManager

    run = tmp_path / "run"
    shutil.copytree(files["pre"], run)
    _nan_checkpoint(run / "checkpoint-0000.pth", run / "checkpoint-last.pth")
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint .*'{FIRST_BAD}'"):
        path, state = CheckpointManager(run).load_latest()
    assert path.name == "checkpoint-0000.pth" and torch.isfinite(state["model"][FIRST_BAD]).all()
    (run / "checkpoint-0000.pth").unlink()
    _one_error(capsys, ["pretrain", "--resume", str(run / "checkpoint-last.pth"), "epochs=2", f"output_dir={run}"],
               f"holds NaN/inf in '{FIRST_BAD}'")


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints of another kind
# ---------------------------------------------------------------------------------------------------------------------

KIND_CASES = {
    "pretrain-resume-finetune-file": (
        lambda f, t: ["pretrain", "--resume", str(f["ft"] / "checkpoint-last.pth"), f"output_dir={t}"],
        ["is a fine-tuning checkpoint (mae finetune)", "mae finetune --resume"]),
    "pretrain-resume-finetune-run": (
        lambda f, t: ["pretrain", "--resume", str(f["ft"]), f"output_dir={t}"],
        ["is a fine-tuning run directory (mae finetune)", "mae finetune --resume"]),
    "pretrain-resume-weights": (
        lambda f, t: ["pretrain", "--resume", str(f["pre"] / "model.safetensors"), f"output_dir={t}"],
        ["pre-trained MAE weights", "no training state"]),
    "pretrain-resume-encoder": (
        lambda f, t: ["pretrain", "--resume", str(f["encoder"]), f"output_dir={t}"],
        ["encoder-only weights", "no training state"]),
    "finetune-resume-pretrain": (
        lambda f, t: ["finetune", "--resume", str(f["pre"] / "checkpoint-last.pth"), f"output_dir={t}"],
        ["is a pre-training checkpoint (mae pretrain)", "mae pretrain --resume", "checkpoint="]),
    "finetune-resume-auto-in-a-pretrain-run": (
        lambda f, t: ["finetune", "--resume", "auto", f"output_dir={f['pre']}"],
        ["is a pre-training run directory (mae pretrain)", "mae pretrain --resume"]),
    "finetune-resume-pretrain-dcp": (
        lambda f, t: ["finetune", "--resume", str(f["dcp"]), f"output_dir={t}"],
        ["DCP checkpoint", "pre-training", "mae pretrain --resume"]),
    "finetune-resume-linprobe": (
        lambda f, t: ["finetune", "--resume", str(f["lp"] / "checkpoint-last.pth"), f"output_dir={t}"],
        ["is a linear-probe checkpoint (mae linprobe)", "mae linprobe --resume"]),
    "linprobe-resume-finetune-run": (
        lambda f, t: ["linprobe", "--resume", str(f["ft"]), f"output_dir={t}"],
        ["is a fine-tuning run directory (mae finetune)", "mae finetune --resume"]),
    "linprobe-resume-finetune-config": (  # --config given: the check in the run layer, after the config loads
        lambda f, t: ["linprobe", "--config", str(f["lp"] / "config.yaml"), "--resume",
                      str(f["ft"] / "checkpoint-last.pth"), f"output_dir={t}"],
        ["is a fine-tuning checkpoint (mae finetune)", "mae finetune --resume"]),
    "visualize-finetune": (
        lambda f, t: ["visualize", str(f["ft"] / "checkpoint-best.pth"), "--out", str(t / "r.png")],
        ["is a fine-tuning checkpoint (mae finetune)", "decoder"]),
    "visualize-encoder": (
        lambda f, t: ["visualize", str(f["encoder"]), "--data", "builtin:mnist5k", "--out", str(t / "r.png")],
        ["encoder-only weights", "decoder"]),
    "embed-linprobe": (
        lambda f, t: ["embed", str(f["lp"]), "--data", str(f["images"]), "--out", str(t / "e.npy")],
        ["is a linear-probe run directory (mae linprobe)", "mae evaluate"]),
    "evaluate-pretrain": (
        lambda f, t: ["evaluate", f"checkpoint={f['pre'] / 'checkpoint-last.pth'}", "data.path=builtin:mnist5k",
                      f"output_dir={t}"],
        ["is a pre-training checkpoint (mae pretrain)", "no classifier head"]),
    "knn-detect": (
        lambda f, t: ["knn", f"checkpoint={f['detect']}", "data.path=builtin:mnist5k", *DATA, f"output_dir={t}"],
        ["is a detection checkpoint (mae detect)"]),
    "segment-evaluate-finetune": (
        lambda f, t: ["segment", "mode=evaluate", f"weights={f['ft']}", f"--data=synthetic:{t / 'shapes'}",
                      *SHAPES, f"output_dir={t}"],
        ["is a fine-tuning checkpoint (mae finetune)", "mae segment"]),
}


@pytest.mark.parametrize("case", list(KIND_CASES))
def test_a_checkpoint_of_another_kind_is_named_with_the_command_that_takes_it(files, tmp_path, capsys, case):
    """`--resume` and every weights reader name a file of another kind for what it is (pre-training, fine-tuning,
    linear probe, DCP directory, MAE weights, encoder-only, detection) and say which command takes it, in one line;
    for `--resume` of another run's file this comes before the config keys of that run's config.yaml are read."""
    argv, fragments = KIND_CASES[case]
    line = _one_error(capsys, argv(files, tmp_path), *fragments)
    assert "unknown config key" not in line


# ---------------------------------------------------------------------------------------------------------------------
# a model name that contradicts the checkpoint
# ---------------------------------------------------------------------------------------------------------------------

def _warned(caplog, *fragments: str) -> None:
    found = [r.getMessage() for r in caplog.records if r.name == "mae" and r.levelno == logging.WARNING
             and all(f in r.getMessage() for f in fragments)]
    assert len(found) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("case", ["knn", "evaluate", "export"])
def test_a_contradicting_model_name_is_one_warning_naming_both(files, tmp_path, capsys, caplog, case):
    """`model.name` (knn, evaluate) or `--model` (export) naming another architecture than the one the checkpoint
    stores: the command runs with the file's architecture, and one warning names the model name and the file."""
    argv = {"knn": ["knn", f"checkpoint={files['pre'] / 'model.safetensors'}", f"model.name={LARGE}",
                    "data.path=builtin:mnist5k", "data.train_limit=32", "data.val_limit=16", *DATA,
                    f"output_dir={tmp_path}"],
            "evaluate": ["evaluate", f"checkpoint={files['ft'] / 'checkpoint-best.pth'}", f"model.name={LARGE}",
                         "data.path=builtin:mnist5k", "data.val_limit=16", "data.num_workers=0", "device=cpu",
                         f"output_dir={tmp_path}"],
            "export": ["export", str(files["ft"] / "checkpoint-best.pth"), "--model", LARGE, "--out",
                       str(tmp_path / "c.onnx"), "--no-check"]}[case]
    with caplog.at_level(logging.WARNING, logger="mae"):
        assert main(argv) == 0, capsys.readouterr().err
    _warned(caplog, LARGE, "contradicts", "ft" if case != "knn" else "model.safetensors", "embed_dim 32")


@pytest.mark.parametrize("source", ["model", "classifier"])
def test_convert_with_a_contradicting_model_is_an_error_naming_both(files, tmp_path, capsys, source):
    """`mae convert --model NAME` for a file that stores another architecture stops with one line naming both
    (the converted file would otherwise describe the wrong model, or silently not be NAME); nothing is written."""
    src = files["pre"] / "model.safetensors" if source == "model" else files["ft"] / "checkpoint-best.pth"
    to = "mae" if source == "model" else "reference"
    dst = tmp_path / ("out.safetensors" if source == "model" else "out.pth")
    _one_error(capsys, ["convert", str(src), str(dst), "--to", to, "--model", LARGE], LARGE, "contradicts",
               str(src), "drop the model name (--model)")
    assert not dst.exists()
