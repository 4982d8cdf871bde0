"""The command line's own manners: --version, --debug anywhere, a fast --help that does not import torch, help texts
with descriptions and examples, `mae models` with no match, presets found by name from any working directory (and
packaged with the wheel), and `mae.load_classifier` as public API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mae.cli import _normalise_argv, build_parser, main
from mae.errors import ConfigError
from mae.presets import PRESETS_DIR, list_presets, resolve_preset

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def _run(*args: str, cwd: Path | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "mae", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV, cwd=cwd, check=False)


def test_version_and_help_do_not_import_torch():
    """`mae --version` prints the version and `mae --help` lists every command, both without importing torch (which
    is what made --help take seconds), matplotlib or the weights package (55 ms with hashlib, urllib, json)."""
    code = ("import sys\nfrom mae.cli import main\n"
            "for argv in (['--version'], ['--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "for slow in ('torch', 'matplotlib', 'mae.weights', 'huggingface_hub'):\n"
            "    assert slow not in sys.modules, slow + ' was imported'\n")
    done = _run(code=code)
    assert done.returncode == 0, done.stderr
    import mae

    assert f"mae {mae.__version__}" in done.stdout
    for command in ("pretrain", "embed", "attention", "export", "presets", "convert", "models", "visualize"):
        assert command in done.stdout


def test_importing_mae_is_lazy_and_load_classifier_is_public():
    """`import mae` loads no torch; `mae.create_model` and `mae.load_classifier` are there on first use."""
    done = _run(code="import sys, mae\nassert 'torch' not in sys.modules\n"
                     "from mae.interop.classifier_io import load_classifier\n"
                     "assert mae.load_classifier is load_classifier and callable(mae.create_model)\n"
                     "assert 'load_classifier' in dir(mae)\n")
    assert done.returncode == 0, done.stderr


def test_debug_is_accepted_after_the_command():
    """`mae pretrain batch_size=0 --debug` shows the traceback, like `mae --debug pretrain batch_size=0`; without it
    the error is one line."""
    late = _run("pretrain", "batch_size=0", "--debug")
    assert late.returncode != 0 and "Traceback" in late.stderr and "batch_size must be at least 1" in late.stderr
    assert _normalise_argv(["pretrain", "--debug", "epochs=1"]) == ["--debug", "pretrain", "epochs=1"]


def test_embed_takes_its_checkpoint_as_the_first_bare_argument():
    """`mae embed CKPT --data D --out F` is read as `checkpoint=CKPT`, wherever the flags stand; `mae prepare SRC DST`
    as `src=SRC dst=DST`."""
    assert _normalise_argv(["embed", "ck.pth", "--data", "d", "--out", "f.npy"]) == \
        ["embed", "checkpoint=ck.pth", "--data", "d", "--out", "f.npy"]
    assert _normalise_argv(["embed", "--data", "d", "ck.pth", "pool=mean"]) == \
        ["embed", "--data", "d", "checkpoint=ck.pth", "pool=mean"]
    assert _normalise_argv(["prepare", "photos", "out", "shard_size=30"]) == \
        ["prepare", "src=photos", "dst=out", "shard_size=30"]


def test_models_without_a_match_says_so_and_exits_2(capsys):
    """A pattern that matches nothing is a one-line error with close names and exit code 2 (it used to print
    nothing and exit 0)."""
    assert main(["models", "mae_vit_larg"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no registered architecture matches 'mae_vit_larg'" in err[0]
    assert "mae_vit_large_patch16" in err[0]
    assert main(["models", "*micro*"]) == 0 and "mae_vit_micro_patch4_28" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["visualize", "convert", "models", "attention", "export", "presets"])
def test_non_config_commands_have_a_description_examples_and_help_for_every_flag(command):
    """Each command's --help has a description, an examples section, and a help text for every flag."""
    parser = build_parser("")
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    assert sub.description and len(sub.description) > 40
    assert "examples:" in sub.epilog and f"mae {command}" in sub.epilog
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"


# ---------------------------------------------------------------------------------------------------- presets
def test_presets_are_found_by_name_with_or_without_folder_and_paths_still_work(tmp_path):
    """'vit_l_800ep', 'pretrain/vit_l_800ep', 'pretrain/vit_l_800ep.yaml' and the old 'configs/...' spelling name the
    same shipped file; an existing path is used as it is."""
    expected = PRESETS_DIR / "pretrain" / "vit_l_800ep.yaml"
    for name in ("vit_l_800ep", "pretrain/vit_l_800ep", "pretrain/vit_l_800ep.yaml",
                 "configs/pretrain/vit_l_800ep.yaml"):
        assert resolve_preset(name) == expected, name
    own = tmp_path / "mine.yaml"
    own.write_text("epochs: 3\n")
    assert resolve_preset(own) == own


def test_a_name_in_several_folders_is_taken_from_the_recipe_or_refused():
    """'vit_b' exists for finetune and linprobe: the recipe's folder decides; without one it is an error that
    lists both."""
    assert resolve_preset("vit_b", kind="linprobe") == PRESETS_DIR / "linprobe" / "vit_b.yaml"
    assert resolve_preset("vit_b", kind="finetune") == PRESETS_DIR / "finetune" / "vit_b.yaml"
    with pytest.raises(ConfigError, match="finetune/vit_b, linprobe/vit_b"):
        resolve_preset("vit_b")
    from mae.config import load_config
    from mae.recipes.linprobe import LinprobeConfig

    assert load_config(LinprobeConfig, "vit_b", ["checkpoint=x"]).optim.name == "lars"


def test_an_unknown_preset_is_one_line_with_close_names(capsys):
    """A typo gives the closest preset names and exit code 2."""
    assert main(["pretrain", "--config", "vit_l_80ep"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pretrain/vit_l_800ep" in err[0] and "does not exist" in err[0]


def test_presets_load_from_another_working_directory(tmp_path):
    """Outside the repository, `--config NAME` finds the shipped preset (the demo's and the sweep's defaults too)."""
    code = ("from mae.config import load_config\n"
            "from mae.recipes.pretrain import PretrainConfig\nfrom mae.recipes.sweep import SweepConfig\n"
            "from mae.recipes.demo import DemoConfig\n"
            "cfg = load_config(PretrainConfig, 'vit_l_800ep')\nassert cfg.model.name == 'mae_vit_large_patch16'\n"
            "sweep = load_config(SweepConfig)\nload_config(PretrainConfig, sweep.pretrain_config)\n"
            "load_config(PretrainConfig, DemoConfig().pretrain_config)\nprint('ok')\n")
    done = _run(code=code, cwd=tmp_path)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_every_preset_is_package_data():
    """pyproject's package-data patterns cover every shipped YAML, so a wheel / non-editable install has them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mae"]
    packaged = {p for pattern in patterns for p in (ROOT / "src" / "mae").glob(pattern)}
    shipped = set(PRESETS_DIR.rglob("*.yaml"))
    assert shipped and shipped <= packaged
    assert len(list_presets()) == len(shipped)


def test_device_mps_without_an_apple_gpu_is_one_line(capsys):
    """`--device mps` where MPS is absent: exit 2 and one line naming the device and the fix (no traceback); the
    CLI never chooses it for device=auto on such a machine."""
    import torch

    from mae.recipes.common import resolve_device

    if torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    assert main(["pretrain", "--device", "mps", "epochs=1", "--output-dir", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mps" in err[0] and "device=cpu" in err[0]
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_pretraining_logs_one_line_per_epoch_and_warns_about_a_warmup_longer_than_the_run(tmp_path, caplog):
    """Every epoch ends with one line (loss, lr, img/s, time, ETA) whatever the progress bar does, and a warm-up as
    long as the run (the default 40 epochs in a 2-epoch run) is said once, with the fix."""
    from tiny import MODEL, RUN

    args = [o for o in RUN if not o.startswith("optim.warmup_epochs")]
    with caplog.at_level("INFO", logger="mae"):
        assert main(["pretrain", *MODEL, *args, "epochs=2", "visualize=false", "--output-dir", str(tmp_path)]) == 0
    lines = [r.getMessage() for r in caplog.records]
    epoch_lines = [m for m in lines if m.startswith("epoch ")]
    assert len(epoch_lines) == 2 and epoch_lines[0].startswith("epoch 1/2: loss ") and "img/s" in epoch_lines[0]
    assert "ETA" in epoch_lines[0] and "ETA" not in epoch_lines[1]
    assert sum("never reaches its peak" in m and "optim.warmup_epochs" in m for m in lines) == 1


def test_a_non_square_model_pretrains_from_the_command_line(tmp_path):
    """model.img_size=[32,48] is accepted on the command line and pre-trains on a folder of photos (crops resized to
    32 x 48); config.yaml records the size as a list."""
    import yaml
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(16):
        Image.new("RGB", (60 + i, 40 + 2 * i), (10 * i, 100, 200)).save(photos / f"{i}.jpg")
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(photos), "--output-dir", str(out), "model.name=mae_vit_micro_patch4_28",
                 "model.in_chans=3", "model.img_size=[32,48]", "model.embed_dim=32", "model.depth=1",
                 "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1",
                 "model.decoder_num_heads=2", "epochs=1", "batch_size=8", "precision=fp32", "device=cpu",
                 "data.num_workers=0", "progress=false"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["img_size"] == [32, 48]
    assert (out / "reconstructions.png").is_file()
