"""Bad input through the command line: every user error is exactly one line on stderr and exit code 2 (no
traceback unless --debug), for configs, data folders and checkpoint files; no checkpoint can run code."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import MODEL, RUN

from mae.cli import main
from mae.models import build_model

TINY = [*MODEL, *RUN, "data.train_limit=64", "epochs=1", "visualize=false"]




def _error_line(capsys, argv: list[str]) -> str:
    """Run `mae argv` in-process; assert exit code 2 and exactly one stderr line, without a traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"mae {argv[0]}: error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "fragments"), [
    (["optim.base_lrr=1e-3"], ["unknown config key 'optim.base_lrr'", "did you mean 'optim.base_lr'?"]),
    (["batch_sise=8"], ["unknown config key 'batch_sise'", "did you mean 'batch_size'?"]),
    (["epochs=ten"], ["epochs: expected int, got 'ten'"]),
    (["optim.betas=[0.9]"], ["optim.betas: expected 2 values"]),
    (["model.mask_ratio=1.0"], ["mask_ratio must be in [0, 1), got 1.0"]),
    (["batch_size=0"], ["batch_size must be at least 1, got 0"]),
    (["model.patch_size=5"], ["img_size 224x224 is not divisible by patch_size 5"]),
    (["precision=fp8"], ["precision 'fp8' is not one of"]),
    (["data.augment=crop"], ["data.augment 'crop' is not one of"]),
])
def test_config_errors_are_one_line_naming_the_key_and_what_is_valid(capsys, tmp_path, overrides, fragments):
    """Unknown keys (with the closest valid key), wrong types and impossible values (mask ratio 1, batch 0, a patch
    size that does not divide the image) stop `mae pretrain` before any work: exit 2, one line."""
    line = _error_line(capsys, ["pretrain", f"output_dir={tmp_path}", *overrides])
    for fragment in fragments:
        assert fragment in line
    assert not (tmp_path / "config.yaml").exists()


def test_config_file_errors_name_the_file_and_the_key(capsys, tmp_path):
    """A YAML file with an unknown key or broken syntax, and a missing file, are one-line errors naming the file."""
    (tmp_path / "typo.yaml").write_text("optim:\n  warmup_epoch: 5\n")
    assert "did you mean 'optim.warmup_epochs'?" in _error_line(capsys, ["pretrain", "--config",
                                                                        str(tmp_path / "typo.yaml")])
    (tmp_path / "broken.yaml").write_text("epochs: [1, 2\n")
    assert "is not valid YAML" in _error_line(capsys, ["pretrain", "--config", str(tmp_path / "broken.yaml")])
    assert "does not exist" in _error_line(capsys, ["pretrain", "--config", str(tmp_path / "nope.yaml")])


def test_the_real_process_exits_2_with_one_line_and_debug_shows_the_traceback():
    """`python -m mae pretrain batch_size=0` exits with code 2 and one stderr line; with --debug the same error
    shows its traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain = subprocess.run([sys.executable, "-m", "mae", "pretrain", "batch_size=0"], check=False, env=env,
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2
    assert plain.stderr.strip() == "mae pretrain: error: batch_size must be at least 1, got 0"
    debug = subprocess.run([sys.executable, "-m", "mae", "--debug", "pretrain", "batch_size=0"], check=False, env=env,
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert "ConfigError: batch_size must be at least 1, got 0" in debug.stderr


# ---------------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------------


def test_data_folder_errors_are_one_line(capsys, tmp_path):
    """A missing folder, an empty folder, a folder without images, and a folder of images where class folders are
    needed (fine-tuning) each give one line saying what is wrong and what is expected."""
    assert "does not exist" in _error_line(capsys, ["pretrain", *TINY, "--data", str(tmp_path / "nowhere"),
                                                    f"output_dir={tmp_path / 'o1'}"])
    (tmp_path / "empty").mkdir()
    line = _error_line(capsys, ["pretrain", *TINY, "--data", str(tmp_path / "empty"), f"output_dir={tmp_path / 'o2'}"])
    assert "holds no image files; accepted extensions" in line
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no images")
    assert "holds no image files" in _error_line(capsys, ["pretrain", *TINY, "--data", str(tmp_path / "docs"),
                                                          f"output_dir={tmp_path / 'o3'}"])
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(flat / f"{i}.png")
    line = _error_line(capsys, ["finetune", "init=scratch", "model.name=mae_vit_micro_patch4_28", "device=cpu",
                                "--data", str(flat), f"output_dir={tmp_path / 'o4'}"])
    assert "has images but no class sub-folders" in line and "<class name>" in line


def test_strict_data_fails_at_once_naming_the_file_also_from_a_loader_worker(capsys, tmp_path):
    """data.strict=true with a corrupt JPEG read by a DataLoader worker process: one line naming the file (the
    worker's traceback that PyTorch wraps around the error is not shown), exit code 2."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    (folder / "3_cut.jpg").write_bytes(buffer.getvalue()[:400])
    line = _error_line(capsys, ["pretrain", *TINY, "--data", str(folder), "data.train_limit=null", "data.strict=true",
                                "data.num_workers=1", "batch_size=4", f"output_dir={tmp_path / 'run'}"])
    assert f"image file '{folder / '3_cut.jpg'}' is corrupt or unreadable" in line
    assert "DataLoader worker" not in line


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a directory: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_no_command_runs_code_from_a_checkpoint_file(capsys, tmp_path):
    """A .pth whose pickle would create a directory is refused by `mae pretrain --resume FILE`, by
    `mae visualize FILE` (one line each, exit 2) and skipped by `resume=auto` in the run directory; the directory
    never appears. The payload is live: an unsafe torch.load does create it."""
    marker = tmp_path / "pwned"
    model = build_model("mae_vit_micro_patch4_28", embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                         decoder_depth=1, decoder_num_heads=2)
    evil = {"format": "mae-train", "model": model.state_dict(), "epoch": 0, "x": _Payload(marker)}
    torch.save(evil, tmp_path / "evil.pth")
    line = _error_line(capsys, ["pretrain", *TINY, "--resume", str(tmp_path / "evil.pth"),
                                f"output_dir={tmp_path / 'run'}"])
    assert "refused to load checkpoint" in line and "only weights are loaded" in line
    line = _error_line(capsys, ["visualize", str(tmp_path / "evil.pth"), "--data", "builtin:mnist5k",
                                "--out", str(tmp_path / "r.png")])
    assert "refused to load checkpoint" in line
    run_dir = tmp_path / "auto"
    run_dir.mkdir()
    torch.save(evil, run_dir / "checkpoint-last.pth")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint .*refused"):
        assert main(["pretrain", *TINY, "resume=auto", f"output_dir={run_dir}"]) == 0
    assert not marker.exists()
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_truncated_and_other_architecture_checkpoints_are_named_as_such(capsys, tmp_path):
    """Through the CLI, a cut-off checkpoint says it is truncated (pretrain --resume and visualize), and a training
    checkpoint of another architecture names the mismatched keys with both shapes."""
    other = build_model("mae_vit_micro_patch4_28", embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32,
                         decoder_depth=1, decoder_num_heads=2)
    # a bare training checkpoint (no stored config to compare) of another width
    torch.save({"format": "mae-train", "version": 2, "kind": "pretrain", "model": other.state_dict(), "epoch": 0,
                "engine": {}}, tmp_path / "other.pth")
    line = _error_line(capsys, ["pretrain", *TINY, "--resume", str(tmp_path / "other.pth"),
                                f"output_dir={tmp_path / 'run'}"])
    assert "does not fit the model" in line
    assert "cls_token is [1, 1, 64] in the file but [1, 1, 32] in the model" in line

    data = (tmp_path / "other.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    for argv in (["pretrain", *TINY, "--resume", str(tmp_path / "cut.pth"), f"output_dir={tmp_path / 'run'}"],
                 ["visualize", str(tmp_path / "cut.pth"), "--data", "builtin:mnist5k",
                  "--out", str(tmp_path / "r.png")]):
        line = _error_line(capsys, argv)
        assert f"checkpoint '{tmp_path / 'cut.pth'}' is truncated or corrupt" in line
