"""The fault matrix, training commands: each command x each fault that applies to it, through the real CLI in a
child process, on a real small disk (a tmpfs the test mounts), a real read-only mount and real signals.

Every cell checks the invariant of `faults.check_failure` (exit 2 or 128 + n, no traceback, one error line and it is
last), that no file the user had changed (`faults.assert_unchanged`), that nothing half-written is left
(`faults.assert_no_partial`) and, where the run had written a checkpoint, that it resumes to the same weights as a run
that never failed. docs/robustness.md shows the matrix.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from faults import (
    NAN_TENSOR,
    assert_no_partial,
    assert_unchanged,
    check_failure,
    disk_usage,
    nan_copy,
    pretrain_settings,
    run_cli,
    small_disk,
    snapshot,
    start_cli,
    wait_for,
)
from safetensors.torch import load_file
from tiny import RUN

pytestmark = pytest.mark.slow

PRETRAIN = pretrain_settings()
TRAIN_CLASSIFIER = [*RUN, "data.train_limit=128", "data.val_limit=64", "epochs=2", "save_every=1",
                    "model.name=mae_vit_micro_patch4_28"]
KNN = ["data.path=builtin:mnist5k", "data.train_limit=128", "data.val_limit=64", "data.num_workers=0", "device=cpu",
       "precision=fp32", "batch_size=64", "progress=false"]


def _same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for key in x:
        assert x[key].equal(y[key]), f"{key} differs from the run that never failed"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A pre-training run that met no fault: its model is what every resumed run must reach; its checkpoint feeds the
    commands that read weights."""
    out = tmp_path_factory.mktemp("fault-reference") / "run"
    result = run_cli("pretrain", *PRETRAIN, f"output_dir={out}")
    assert result.rc == 0, str(result)
    return out


@pytest.fixture(scope="module")
def nan_checkpoint(reference, tmp_path_factory):
    """The reference's weights with one tensor NaN, its metadata kept: a run that diverged."""
    folder = tmp_path_factory.mktemp("nan") / "run"
    nan_copy(reference / "model.safetensors", folder / "model.safetensors")
    (folder / "config.yaml").write_bytes((reference / "config.yaml").read_bytes())
    return folder / "model.safetensors"


# ---------------------------------------------------------------------------------------------------------------------
# pretrain: every fault
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["start", "checkpoint", "final"])
def test_pretrain_full_disk(reference, when):
    """A disk that fills up at the start (the lock, config.yaml), at the first checkpoint, or at the final exports:
    one line, nothing half-written, and after space is freed `--resume auto` reaches the reference's weights."""
    usage = disk_usage(reference)
    checkpoint = (reference / "checkpoint-last.pth").stat().st_size
    free = {"start": 0, "checkpoint": checkpoint // 2, "final": usage - 3 * 4096}[when]
    with small_disk() as disk:
        user = disk.path / "notes.txt"
        user.write_text("the user's own file on the same disk\n")
        before = snapshot(user)
        disk.fill(free)
        out = disk.path / "run"
        result = run_cli("pretrain", *PRETRAIN, f"output_dir={out}")
        check_failure(result, "pretrain", mentions=("no space left", "free some space"))
        assert_unchanged(before)
        assert_no_partial(disk.path)
        if when != "start":
            assert (out / "config.yaml").is_file()
        disk.grow()
        resumed = run_cli("pretrain", *PRETRAIN, f"output_dir={out}", "resume=auto")
        assert resumed.rc == 0, str(resumed)
        _same_weights(out / "model.safetensors", reference / "model.safetensors")


def test_pretrain_read_only_output():
    """An output folder on a read-only file system: one line naming it, before any training."""
    with small_disk() as disk:
        (disk.path / "runs").mkdir()
        disk.read_only()
        result = run_cli("pretrain", *PRETRAIN, f"output_dir={disk.path / 'runs' / 'a'}")
        check_failure(result, "pretrain", mentions=("read-only",))


def test_pretrain_existing_output_is_kept(reference, tmp_path):
    """A folder that holds a finished run, or the user's own files: refused without --overwrite, nothing touched."""
    out = tmp_path / "run"
    (out / "mine").mkdir(parents=True)
    for name in ("model.safetensors", "checkpoint-last.pth", "config.yaml"):
        (out / name).write_bytes((reference / name).read_bytes())
    (out / "mine" / "data.csv").write_text("1,2,3\n")
    before = snapshot(out)
    result = run_cli("pretrain", *PRETRAIN, f"output_dir={out}")
    check_failure(result, "pretrain", mentions=("--overwrite",))
    assert_unchanged(before)


@pytest.mark.parametrize("setting", ["optim.lr=.nan", "optim.warmup_epochs=.nan", "optim.weight_decay=inf",
                                     "optim.base_lr=-1", "model.mask_ratio=1.5", "epochs=0"])
def test_pretrain_bad_number(tmp_path, setting):
    """An impossible or non-finite setting: one line naming it, before the output folder is made."""
    out = tmp_path / "run"
    result = run_cli("pretrain", *PRETRAIN, f"output_dir={out}", setting)
    check_failure(result, "pretrain", mentions=(setting.split("=")[0],))
    assert not out.exists()


def test_pretrain_sigterm_resumes(reference, tmp_path):
    """SIGTERM mid-run: a checkpoint, exit 143, one line; `--resume auto` reaches the reference's weights."""
    out = tmp_path / "run"
    proc = start_cli("pretrain", *PRETRAIN, f"output_dir={out}", "log_every=1")
    wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2,
             proc=proc)
    proc.send_signal(signal.SIGTERM)
    out_text, err = proc.communicate(timeout=300)
    from faults import Result

    check_failure(Result(proc.returncode, out_text, err), "pretrain", rc=128 + signal.SIGTERM)
    assert_no_partial(out)
    resumed = run_cli("pretrain", *PRETRAIN, f"output_dir={out}", "resume=auto")
    assert resumed.rc == 0, str(resumed)
    _same_weights(out / "model.safetensors", reference / "model.safetensors")


def test_stray_launch_environment(tmp_path):
    """WORLD_SIZE=2 left in the shell without MASTER_ADDR: one line that says what is missing, no traceback."""
    from faults import cli_env

    result = run_cli("pretrain", *PRETRAIN, f"output_dir={tmp_path / 'run'}", env=cli_env(WORLD_SIZE="2"))
    check_failure(result, "pretrain", mentions=("WORLD_SIZE=2", "MASTER_ADDR", "torchrun"))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# the commands that read weights: NaN weights, full disk, read-only output
# ---------------------------------------------------------------------------------------------------------------------


def _weights_command(command: str, checkpoint: Path, out: Path) -> list[str]:
    if command in ("finetune", "linprobe"):
        return [command, f"--checkpoint={checkpoint}", *TRAIN_CLASSIFIER, f"output_dir={out}"]
    if command == "knn":
        return ["knn", f"--checkpoint={checkpoint}", *KNN, f"output_dir={out}"]
    raise AssertionError(command)


@pytest.mark.parametrize("command", ["finetune", "linprobe", "knn"])
def test_nan_initial_weights(nan_checkpoint, tmp_path, command):
    """Initial weights holding NaN: one line naming the tensor, before any work; no output folder."""
    out = tmp_path / "run"
    result = run_cli(*_weights_command(command, nan_checkpoint, out))
    check_failure(result, command, mentions=(NAN_TENSOR,))
    assert not (out / "checkpoint-last.pth").exists()


@pytest.mark.parametrize("command", ["finetune", "linprobe", "knn"])
def test_weights_command_full_disk(reference, command):
    """The output disk full from the start: one line, the user's file on that disk untouched."""
    with small_disk() as disk:
        user = disk.path / "notes.txt"
        user.write_text("keep me\n")
        before = snapshot(user)
        disk.fill(0)
        result = run_cli(*_weights_command(command, reference / "model.safetensors", disk.path / "run"))
        check_failure(result, command, mentions=("no space left",))
        assert_unchanged(before)
        assert_no_partial(disk.path)


@pytest.mark.parametrize("command", ["finetune", "linprobe", "knn"])
def test_weights_command_read_only(reference, command):
    with small_disk() as disk:
        disk.read_only()
        result = run_cli(*_weights_command(command, reference / "model.safetensors", disk.path / "run"))
        check_failure(result, command, mentions=("read-only",))


@pytest.mark.parametrize("command", ["finetune", "linprobe"])
def test_classifier_checkpoint_full_disk_resumes(reference, command, tmp_path):
    """A classifier run whose disk fills at its first checkpoint: one line; after space is freed it resumes and ends
    where a run that never failed ends."""
    straight = tmp_path / "straight"
    assert run_cli(*_weights_command(command, reference / "model.safetensors", straight)).rc == 0
    checkpoint = (straight / "checkpoint-last.pth").stat().st_size
    with small_disk() as disk:
        disk.fill(checkpoint // 2)
        out = disk.path / "run"
        result = run_cli(*_weights_command(command, reference / "model.safetensors", out))
        check_failure(result, command, mentions=("no space left",))
        assert_no_partial(disk.path)
        disk.grow()
        resumed = run_cli(*_weights_command(command, reference / "model.safetensors", out), "resume=auto")
        assert resumed.rc == 0, str(resumed)
        a, b = (json.loads((d / "summary.json").read_text()) for d in (out, straight))
        assert a.get("top1", a.get("best_top1")) == b.get("top1", b.get("best_top1"))


def test_finetune_sigterm_one_line(reference, tmp_path):
    out = tmp_path / "run"
    proc = start_cli(*_weights_command("finetune", reference / "model.safetensors", out), "log_every=1")
    wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0, proc=proc)
    proc.send_signal(signal.SIGTERM)
    out_text, err = proc.communicate(timeout=300)
    from faults import Result

    check_failure(Result(proc.returncode, out_text, err), "finetune", rc=128 + signal.SIGTERM)
    assert_no_partial(out)
    assert (out / "checkpoint-last.pth").is_file()


def test_unmountable_is_a_skip_not_a_failure():
    """The matrix's own guard: where mounting is refused the cells skip with the reason (here it mounts)."""
    with small_disk(1 << 20) as disk:
        assert subprocess.run(["mountpoint", "-q", str(disk.path)], check=False).returncode == 0


@pytest.mark.parametrize("command", ["finetune", "linprobe", "knn"])
def test_weights_command_existing_output_is_kept(reference, tmp_path, command):
    """An output folder holding the user's files (and a run of its own): refused without --overwrite, untouched."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": true}\n')
    (out / "config.yaml").write_text("# the user's notes\n")
    before = snapshot(out)
    result = run_cli(*_weights_command(command, reference / "model.safetensors", out))
    check_failure(result, command, mentions=("--overwrite",))
    assert_unchanged(before)


@pytest.mark.parametrize(("command", "setting"), [("finetune", "optim.layer_decay=.nan"),
                                                  ("linprobe", "optim.weight_decay=-inf"),
                                                  ("knn", "temperature=0")])
def test_weights_command_bad_number(reference, tmp_path, command, setting):
    """A non-finite or out-of-range setting: one line naming it, before the output folder is made."""
    out = tmp_path / "run"
    result = run_cli(*_weights_command(command, reference / "model.safetensors", out), setting)
    check_failure(result, command, mentions=(setting.split("=")[0],))
    assert not out.exists()


@pytest.mark.parametrize("content", [b"root:x:0:0:root:/root:/bin/bash\n", b"", bytes(range(256)) * 8,
                                     b"PK\x03\x04" + bytes(100)])
def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, content):
    """A text file, an empty file, random bytes, a torn zip given as weights: one line naming the file, exit 2."""
    bad = tmp_path / "weights.pth"
    bad.write_bytes(content)
    result = run_cli("knn", f"--checkpoint={bad}", *KNN, f"output_dir={tmp_path / 'run'}")
    check_failure(result, "knn", mentions=(str(bad),))


def test_the_error_boundary_words_each_kind_of_exception():
    """`describe_error`: an OSError with and without a file name, a YAML error, a bug (exit 1, says --debug)."""
    import errno
    import os

    import yaml

    from mae.cli import describe_error

    line, code = describe_error(OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
    assert code == 2 and line.startswith("Too many open files; raise the limit"), line
    line, code = describe_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/a/x.pth"))
    assert code == 2 and line == ("No space left on device: '/runs/a/x.pth'; free some space or choose another "
                                  "--output-dir"), line
    with pytest.raises(yaml.YAMLError) as info:
        yaml.safe_load("a: [1\n")
    line, code = describe_error(info.value)
    assert code == 2 and line.startswith("could not read a YAML file") and "fix its syntax" in line, line
    line, code = describe_error(TypeError("unsupported operand"))
    assert code == 1 and "this is a bug in mae" in line and "--debug" in line, line
