"""Resumes and signals checked against a run left alone (issue 23, item 7: tests that can fail).

1. A fine-tuning, linear-probing, detection or segmentation run stopped by a real SIGTERM (at the end of an epoch, or
   in the middle of one with gradient accumulation; fine-tuning also under bf16) and resumed with ``resume=auto``
   ends with exactly (torch.equal) the weights, optimizer state, EMA weights, RNG states (numpy's drives mixup /
   cutmix) and training record of the same run left alone.
2. ``mae prepare`` SIGKILLed (a real process) while a shard is half-written: the rerun removes the dead temporary and
   ends with the shard set of an uninterrupted run, continuing after the shards already finished.
3. Signals the rest of the suite never sends: SIGTERM in the middle of a checkpoint save (single file and DCP), SIGTERM
   to one rank of a 2-process torchrun job, and a second Ctrl-C while the stop's checkpoint is being written.

The signals are real (``os.kill``); only their timing is arranged, by wrapping a library call (a loss, a writer).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny import MODEL, RUN, micro_mae

from mae.cli import main
from mae.config import load_config
from mae.errors import Interrupted
from mae.train.checkpoint import load_training_state, safe_load
from mae.train.engine import Engine

TIMEOUT = 300  # seconds; a hung run fails the test instead of hanging it
TIMING = {"epoch_seconds", "eval_seconds", "images_per_sec", "train_seconds", "feature_seconds"}
"""Wall-clock facts in a run's record: the only entries a resumed run may differ in."""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _same(a: Any, b: Any, where: str) -> None:
    """`a` and `b` equal all the way down: tensors by torch.equal (and dtype), numbers and strings by ==, except the
    wall-clock entries and the epoch's mean loss, whose float64 running sum is added up in another order once an
    epoch is split by a resume (1e-12)."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        assert same, f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ: {sorted(set(a) ^ set(b), key=str)}"
        for key in a:
            if key not in TIMING:
                _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif where.endswith(("epoch_loss", "loss_sum")) and isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-12), f"{where}: {a!r} != {b!r}"
    else:
        both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
        assert a == b or both_nan, f"{where}: {a!r} != {b!r}"


def _assert_resumed_like_left_alone(full: dict, resumed: dict, parts: tuple[str, ...]) -> None:
    for part in parts:
        assert part in full, part
        _same(full[part], resumed[part], part)


RUN_STATE = ("model", "engine", "rng", "train_state")
"""Weights; optimizer state, scaler and update counters; every generator's state; position, history and best."""


def _sigterm_at(monkeypatch, micro_batch: int) -> None:
    """A real SIGTERM to this process in the forward of the `micro_batch`-th micro-batch of the run (counted over
    every epoch), as a scheduler's preemption lands in the middle of an update."""
    train_epoch, calls = Engine.train_epoch, [0]

    def signalled_epoch(self, loader, epoch, loss_fn, *args, **kwargs):
        def loss(module, batch):
            calls[0] += 1
            if calls[0] == micro_batch:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss_fn(module, batch)

        return train_epoch(self, loader, epoch, loss, *args, **kwargs)

    monkeypatch.setattr(Engine, "train_epoch", signalled_epoch)


def _stop_then_resume(monkeypatch, run, config_cls, preset, args: list[str], out: Path, micro_batch: int,
                      position: tuple[int, int]) -> None:
    """Run until a SIGTERM at `micro_batch` stops it (exit code 143, checkpoint at `position` = (epoch, batch)),
    then ``resume=auto`` to the end."""
    _sigterm_at(monkeypatch, micro_batch)
    with pytest.raises(Interrupted) as stopped:
        run(load_config(config_cls, preset, [*args, f"output_dir={out}"]))
    monkeypatch.undo()
    assert stopped.value.exit_code == 143
    ts = safe_load(out / "checkpoint-last.pth")["train_state"]
    assert (ts["epoch"], ts["batch"]) == position
    run(load_config(config_cls, preset, [*args, f"output_dir={out}", "resume=auto"]))


# ---------------------------------------------------------------------------------------------------------------------
# 1. resume of fine-tuning, linear probing, detection and segmentation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory) -> Path:
    from mae.interop import save_model

    return save_model(micro_mae(), tmp_path_factory.mktemp("ckpt") / "micro.safetensors")


FINETUNE = ["batch_size=16", "accum_iter=2", "data.train_limit=64", "data.val_limit=32", "data.num_workers=0",
            "progress=false", "log_every=1", "epochs=2", "optim.warmup_epochs=1", "ema=true", "ema_decay=0.9"]
"""4 micro-batches of 16 per epoch, 2 per update: 2 updates per epoch. Mixup 0.8 / cutmix 1.0 (drawn from numpy's
generator), RandAugment, random erasing and drop path are on, as by default, and an EMA of the weights is kept."""


class _LeftAlone(dict):
    """Runs left alone, made on first use: ``runs[key]`` is the output folder of ``make(key, folder)``."""

    def __init__(self, root: Path, make) -> None:
        super().__init__()
        self.root, self.make = root, make

    def __missing__(self, key: str) -> Path:
        out = self.root / key
        self.make(key, out)
        self[key] = out
        return out


@pytest.fixture(scope="module")
def finetune_left_alone(tmp_path_factory, micro_checkpoint) -> dict[str, Path]:
    """The fine-tuning run of `FINETUNE` left alone, by precision."""
    from mae.recipes.finetune import FinetuneConfig, run

    def make(precision: str, out: Path) -> None:
        run(load_config(FinetuneConfig, None, [f"checkpoint={micro_checkpoint}", *FINETUNE, f"precision={precision}",
                                               f"output_dir={out}"]))

    return _LeftAlone(tmp_path_factory.mktemp("finetune"), make)


@pytest.mark.parametrize("precision, micro_batch, position", [
    ("fp32", 3, (1, 0)),  # in the last update of epoch 0: stops at the epoch's end
    ("fp32", 5, (1, 2)),  # in the first update of epoch 1: stops in the middle of an accumulating epoch
    ("bf16", 5, (1, 2)),
], ids=["epoch-end", "mid-epoch-accum", "mid-epoch-accum-bf16"])
def test_finetune_stopped_and_resumed_equals_the_run_left_alone(micro_checkpoint, finetune_left_alone, tmp_path,
                                                                 monkeypatch, precision, micro_batch, position):
    """A SIGTERM, the checkpoint it writes (143), ``resume=auto``: weights, AdamW state, the EMA weights, the numpy
    generator that draws mixup / cutmix, torch's and python's generators, and the history and best top-1 equal those
    of the uninterrupted run."""
    from mae.recipes.finetune import FinetuneConfig, run

    full = finetune_left_alone[precision]
    args = [f"checkpoint={micro_checkpoint}", *FINETUNE, f"precision={precision}"]
    _stop_then_resume(monkeypatch, run, FinetuneConfig, None, args, tmp_path / "b", micro_batch, position)
    a, b = safe_load(full / "checkpoint-last.pth"), safe_load(tmp_path / "b" / "checkpoint-last.pth")
    assert a["engine"]["step"] == 4 and a["config"]["aug"]["mixup"] > 0 and a["config"]["aug"]["cutmix"] > 0
    _same(a["rng"]["numpy"], b["rng"]["numpy"], "rng.numpy (the mixup / cutmix draws)")
    _assert_resumed_like_left_alone(a, b, (*RUN_STATE, "model_ema"))


def test_linear_probe_on_cached_features_stopped_mid_epoch_resumes_to_the_run_left_alone(micro_checkpoint, tmp_path,
                                                                                         monkeypatch):
    """The cached-feature probe (its own batch iterator, which skips the batches done before the stop; LARS with
    momentum; a BatchNorm head with running statistics) stopped in the middle of epoch 1 and resumed equals the
    uninterrupted probe."""
    from mae.recipes.linprobe import LinprobeConfig, run

    args = [f"checkpoint={micro_checkpoint}", "batch_size=16", "data.train_limit=64", "data.val_limit=32",
            "data.num_workers=0", "precision=fp32", "progress=false", "log_every=1", "epochs=2",
            "optim.warmup_epochs=1", "aug.augment=none"]
    run(load_config(LinprobeConfig, None, [*args, f"output_dir={tmp_path / 'a'}"]))
    _stop_then_resume(monkeypatch, run, LinprobeConfig, None, args, tmp_path / "b", 6, (1, 2))
    a, b = safe_load(tmp_path / "a" / "checkpoint-last.pth"), safe_load(tmp_path / "b" / "checkpoint-last.pth")
    assert a["engine"]["optimizer"]["state"]  # momentum buffers to compare
    _assert_resumed_like_left_alone(a, b, RUN_STATE)


TRANSFER_ARCH = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2,
                 "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}
"""tests/test_transfer.py's tiny encoder."""


@pytest.fixture(scope="module")
def transfer_inputs(tmp_path_factory) -> tuple[Path, Path]:
    import mae
    from mae.interop import save_model
    from mae.transfer import generate_synthetic

    root = tmp_path_factory.mktemp("transfer")
    torch.manual_seed(0)
    checkpoint = save_model(mae.create_model("mae_vit_tiny_patch16", **TRANSFER_ARCH).eval(), root / "t.safetensors")
    generate_synthetic(root / "shapes", num_train=4, num_val=2, image_size=64, max_objects=3)
    return checkpoint, root / "shapes"


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_detection_and_segmentation_stopped_mid_epoch_resume_to_the_run_left_alone(transfer_inputs, tmp_path,
                                                                                   monkeypatch, task):
    """The smallest runs of tests/test_transfer.py (4 scenes, batch 2: 2 updates per epoch, evaluated every epoch)
    stopped by a SIGTERM in the first update of epoch 1 and resumed: weights, AdamW state, RNG states (flips, scale
    jitter, crops) and the record of box / mask AP or mIoU equal the uninterrupted run's."""
    from mae.presets import PRESETS_DIR

    checkpoint, shapes = transfer_inputs
    args = [f"data.path=synthetic:{shapes}", "data.synthetic.num_train=4", "data.synthetic.num_val=2",
            "data.synthetic.image_size=64", "data.synthetic.max_objects=3", "device=cpu", "precision=fp32",
            "progress=false", "num_workers=0", f"backbone.checkpoint={checkpoint}", "epochs=2", "batch_size=2",
            "eval_every=1"]
    if task == "detect":
        from mae.recipes.detect import DetectConfig as Config
        from mae.recipes.detect import run
        args += ["head.min_size=64", "head.max_size=64", "head.fpn_channels=16", "head.box_head_dim=32",
                 "head.mask_head_channels=8", "head.anchor_sizes=[8,16,32,64,128]"]
    else:
        from mae.recipes.segment import SegmentConfig as Config
        from mae.recipes.segment import run
        args += ["data.eval_scale=null", "data.crop_size=64", "data.scale=64", "head.channels=16",
                 "head.aux_channels=8", "optim.lr=1e-3"]
    preset = PRESETS_DIR / task / "synthetic_tiny.yaml"
    run(load_config(Config, preset, [*args, f"output_dir={tmp_path / 'a'}"]))
    _stop_then_resume(monkeypatch, run, Config, preset, args, tmp_path / "b", 3, (1, 1))
    a, b = safe_load(tmp_path / "a" / "checkpoint-last.pth"), safe_load(tmp_path / "b" / "checkpoint-last.pth")
    assert a["engine"]["step"] == 4
    _assert_resumed_like_left_alone(a, b, RUN_STATE)


# ---------------------------------------------------------------------------------------------------------------------
# 2. a killed `mae prepare`
# ---------------------------------------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_stopped(pid: int) -> None:
    """Until the kernel has stopped `pid` (state T in /proc), so that no system call of it is still under way."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "Tt":
            return
        time.sleep(0.0005)
    raise AssertionError(f"process {pid} did not stop")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads a process's state from /proc (Linux)")
def test_a_sigkilled_prepare_leaves_a_stale_temporary_that_the_rerun_removes_finishing_the_same_shards(tmp_path):
    """`mae prepare` (a process of its own) is frozen (SIGSTOP) once the temporary file of its third (or a later)
    shard exists, then SIGKILLed: the temporary stays (nothing in the process can clean up), no index.json is
    written. The rerun removes the dead temporary, keeps the two finished shards (not rewritten), and ends with the
    index and shard bytes of an uninterrupted run."""
    from PIL import Image

    from mae.data.shard_writer import PROGRESS_NAME, write_shards

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for label in ("a", "b"):
        (src / "train" / label).mkdir(parents=True)
        for i in range(48):  # noise, re-encoded to 64 px: 8 shards of 12 images, each a while in its temporary
            noise = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
            Image.fromarray(noise).save(src / "train" / label / f"{i}.jpg")
    settings = ["shard_size=12", "short_side=64", "progress=false"]
    clean = write_shards(src, tmp_path / "clean", shard_size=12, short_side=64, progress=False)
    assert len(clean["splits"]["train"]["shards"]) == 8

    dst = tmp_path / "dst"
    victim = subprocess.Popen([sys.executable, "-m", "mae", "prepare", str(src), str(dst), *settings], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, stale = time.monotonic() + TIMEOUT, []
    while victim.poll() is None and time.monotonic() < deadline:
        if list(dst.glob(".train-00000[2-6].tar.*.tmp")):
            victim.send_signal(signal.SIGSTOP)  # frozen: the temporary seen is still there when the kill lands
            _wait_stopped(victim.pid)
            stale = list(dst.glob(".train-00000[2-6].tar.*.tmp"))
            if stale:
                break
            victim.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL and stale, "prepare ended before a temporary shard was seen"
    assert str(victim.pid) in stale[0].name and not (dst / "index.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in dst.glob("train-*.tar")}
    assert {"train-000000.tar", "train-000001.tar"} <= set(finished)

    assert main(["prepare", str(src), str(dst), *settings]) == 0
    assert not [p.name for p in dst.iterdir() if p.name.endswith(".tmp")], "the dead temporary was left behind"
    index = json.loads((dst / "index.json").read_text())
    assert index["splits"] == clean["splits"]
    assert sorted(p.name for p in dst.iterdir()) == ["index.json", *(s["name"] for s in clean["splits"]["train"]
                                                                     ["shards"])]
    for shard in clean["splits"]["train"]["shards"]:
        assert _sha(dst / shard["name"]) == _sha(tmp_path / "clean" / shard["name"]), shard["name"]
    kept = {name: (dst / name).stat().st_mtime_ns for name in ("train-000000.tar", "train-000001.tar")}
    assert kept == {name: finished[name] for name in kept}  # continued after them, not redone
    assert not (dst / PROGRESS_NAME).exists()


# ---------------------------------------------------------------------------------------------------------------------
# 3. signals: during a checkpoint save, to one rank of torchrun, a second Ctrl-C
# ---------------------------------------------------------------------------------------------------------------------

PRETRAIN = [*MODEL, *RUN, "data.train_limit=128", "epochs=3", "save_every=1", "visualize=false"]
"""4 updates per epoch, a checkpoint at the end of each of 3 epochs."""
FSDP = "distributed.strategy=fsdp"  # DCP checkpoints, here on one process (a 1-rank mesh)


@pytest.fixture(scope="module")
def pretrain_left_alone(tmp_path_factory) -> dict[str, Path]:
    """The tiny pre-training run of `PRETRAIN` left alone, with single-file checkpoints ("file") or DCP ("dcp")."""
    from mae.recipes.pretrain import PretrainConfig, run

    def make(fmt: str, out: Path) -> None:
        run(load_config(PretrainConfig, None, [*PRETRAIN, *([FSDP] if fmt == "dcp" else []), f"output_dir={out}"]))

    return _LeftAlone(tmp_path_factory.mktemp("pretrain"), make)


def _tree_sha(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): _sha(p) for p in files}


def _last_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.strip().splitlines() if line.strip()]


def _final_state(out: Path, fmt: str, tmp: Path) -> dict:
    """The run's last checkpoint in the single-file layout (a DCP directory converted, optimizer included)."""
    if fmt == "file":
        return safe_load(out / "checkpoint-last.pth")
    from mae.train.dcp import dcp_to_file

    return safe_load(dcp_to_file(out / "checkpoint-last", tmp / f"{out.name}-last.pth"))


@pytest.mark.parametrize("fmt", ["file", "dcp"])
def test_sigterm_during_a_checkpoint_save_completes_it_stops_with_143_and_resumes_bit_exactly(
        pretrain_left_alone, tmp_path, monkeypatch, capsys, fmt):
    """A real SIGTERM lands while the epoch-1 checkpoint is being written (inside torch's zip writer, or while DCP
    writes the shard file): the save completes, the next update ends with a checkpoint and exit 143 and one line;
    the epoch-0 checkpoint is byte for byte what it was, the epoch-1 one verifies, no temporary is left, and
    ``--resume auto`` ends with the uninterrupted run's weights, optimizer state, RNG states and record."""
    out = tmp_path / "run"
    first, saving = out / ("checkpoint-0000.pth" if fmt == "file" else "checkpoint-0000"), {}

    def signal_now() -> None:
        saving["first"] = _tree_sha(first)
        os.kill(os.getpid(), signal.SIGTERM)
        saving["signalled"] = True

    if fmt == "file":
        real_save = torch.save

        class Signalling:  # the file torch.save writes into: the signal lands after its first chunk
            def __init__(self, f):
                self.f, self.writes = f, 0

            def write(self, data):
                self.writes += 1
                if self.writes == 2:
                    signal_now()
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

        def save(obj, f, *args, **kwargs):
            if Path(getattr(f, "name", "")).name.startswith(".checkpoint-0001.pth."):
                f = Signalling(f)
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    else:
        from torch.distributed.checkpoint import FileSystemWriter

        write_data = FileSystemWriter.write_data

        def signalled_write(self, plan, planner):
            if Path(self.path).name == ".checkpoint-0001.tmp":
                signal_now()
            return write_data(self, plan, planner)

        monkeypatch.setattr(FileSystemWriter, "write_data", signalled_write)

    code = main(["pretrain", *PRETRAIN, *([FSDP] if fmt == "dcp" else []), "--output-dir", str(out)])
    monkeypatch.undo()
    lines = _last_lines(capsys)
    assert saving.get("signalled") and code == 143, f"exit {code}: {lines[-3:]}"
    assert "stopped by SIGTERM" in lines[-1] and "--resume auto" in lines[-1]
    assert _tree_sha(first) == saving["first"]  # the previous checkpoint is intact
    second = out / ("checkpoint-0001.pth" if fmt == "file" else "checkpoint-0001")
    assert load_training_state(second)["train_state"]["epoch"] == 2  # complete, its digest verifies
    last = load_training_state(out / ("checkpoint-last.pth" if fmt == "file" else "checkpoint-last"))
    assert (last["train_state"]["epoch"], last["train_state"]["batch"]) == (2, 1)
    assert not list(out.rglob("*.tmp")), "a half-written file or directory was left"

    assert main(["pretrain", "--output-dir", str(out), "--resume", "auto"]) == 0
    full = _final_state(pretrain_left_alone[fmt], fmt, tmp_path)
    _assert_resumed_like_left_alone(full, _final_state(out, fmt, tmp_path), RUN_STATE)


_TWICE = textwrap.dedent('''
    import os, signal, sys
    from pathlib import Path

    import torch

    from mae.cli import main
    from mae.models.mae import MaskedAutoencoderViT

    at, calls = int(sys.argv.pop(1)), {"n": 0}
    loss, real_save = MaskedAutoencoderViT.forward_loss, torch.save

    def first_ctrl_c(self, *args, **kwargs):  # Ctrl-C in the middle of an update: finish it, save, stop
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(self, *args, **kwargs)

    class SecondCtrlC:  # ... and Ctrl-C again while that checkpoint is being written
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def save(obj, f, *args, **kwargs):
        if calls["n"] >= at:
            f = SecondCtrlC(f)
        return real_save(obj, f, *args, **kwargs)

    MaskedAutoencoderViT.forward_loss = first_ctrl_c
    torch.save = save
    sys.exit(main())
''')


@pytest.mark.slow
def test_a_second_ctrl_c_while_the_stop_checkpoint_is_written_exits_130_at_once_leaving_nothing_half_written(
        pretrain_left_alone, tmp_path):
    """Ctrl-C in update 6 asks for a graceful stop; a second Ctrl-C while that stop's checkpoint is being written
    (torch's zip writer turns the KeyboardInterrupt into a RuntimeError of its own) stops at once: exit 130, the
    last line `mae pretrain: interrupted`, no traceback, no temporary file, checkpoint-last.pth still the intact
    end-of-epoch-0 checkpoint, run.json 'interrupted'; ``--resume auto`` then ends bit-exactly as the run left
    alone."""
    script = tmp_path / "twice.py"
    script.write_text(_TWICE)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(script), "6", "pretrain", *PRETRAIN, f"output_dir={out}"], env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1] == "mae pretrain: interrupted" and "received SIGINT" in lines[-2]
    assert not list(out.rglob("*.tmp")), "a half-written file was left"
    assert _sha(out / "checkpoint-last.pth") == _sha(out / "checkpoint-0000.pth")
    ts = load_training_state(out / "checkpoint-last.pth")["train_state"]
    assert (ts["epoch"], ts["batch"]) == (1, 0)
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert main(["pretrain", "--output-dir", str(out), "--resume", "auto"]) == 0
    _assert_resumed_like_left_alone(safe_load(pretrain_left_alone["file"] / "checkpoint-last.pth"),
                                    safe_load(out / "checkpoint-last.pth"), RUN_STATE)


_ONE_RANK = textwrap.dedent('''
    import os, signal, sys

    from mae.cli import main
    from mae.models.mae import MaskedAutoencoderViT

    at, rank, calls = int(sys.argv.pop(1)), int(os.environ["RANK"]), {"n": 0}
    loss = MaskedAutoencoderViT.forward_loss

    def signalled(self, *args, **kwargs):  # SIGTERM to rank 1 only, in the middle of an update
        calls["n"] += 1
        if calls["n"] == at and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(self, *args, **kwargs)

    MaskedAutoencoderViT.forward_loss = signalled
    sys.exit(main())
''')


@pytest.mark.slow
def test_sigterm_to_one_rank_of_a_torchrun_job_stops_every_rank_at_one_checkpoint_that_resumes_bit_exactly(tmp_path):
    """2 gloo processes; rank 1 alone gets SIGTERM in update 3 (epoch 1, 2 updates an epoch). The ranks agree at the
    end of that update: rank 0 writes checkpoint-last.pth at (epoch 1, batch 1) and stops too (run.json
    'interrupted', not 'failed' as when a rank leaves early and the other's next collective breaks), no traceback;
    `torchrun ... --resume auto` ends with the weights, optimizer state, every rank's RNG state and the record of
    the same job left alone."""
    script = tmp_path / "one_rank.py"
    script.write_text(_ONE_RANK)
    args = [*MODEL, *[o for o in RUN if not o.startswith("batch_size")], "data.train_limit=64", "batch_size=16",
            "epochs=2", "save_every=1", "visualize=false"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    full, out = tmp_path / "full", tmp_path / "run"
    alone = subprocess.Popen([*torchrun, "-m", "mae", "pretrain", *args, f"output_dir={full}"], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped = subprocess.run([*torchrun, str(script), "3", "pretrain", *args, f"output_dir={out}"], env=_env(),
                             capture_output=True, text=True, timeout=TIMEOUT, check=False)
    log = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0, log[-3000:]
    # rank 1 exits with 143 and one line; torchrun then SIGTERMs the others, so rank 0 may die in its teardown
    assert "mae pretrain: stopped by SIGTERM after saving" in log and "exitcode  : 143" in log, log[-3000:]
    assert not [line for line in log.splitlines() if line.lstrip().startswith("File") and "/mae/" in line], log
    assert not (out / "summary.json").exists()  # (torchrun's own ChildFailedError report is not ours)
    ts = load_training_state(out / "checkpoint-last.pth")["train_state"]
    assert (ts["epoch"], ts["batch"]) == (1, 1)
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert not list(out.rglob("*.tmp"))
    alone_log, _ = alone.communicate(timeout=TIMEOUT)
    assert alone.returncode == 0, alone_log[-3000:]
    resumed = subprocess.run([*torchrun, "-m", "mae", "pretrain", "--output-dir", str(out), "--resume", "auto"],
                             env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    a, b = safe_load(full / "checkpoint-last.pth"), safe_load(out / "checkpoint-last.pth")
    assert len(a["rng"]) == 2  # one state per rank
    _assert_resumed_like_left_alone(a, b, RUN_STATE)
