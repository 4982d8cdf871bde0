"""Crashes and bad input: SIGKILL mid-run and mid-save then resume, non-finite losses, a full disk, unreadable
and odd images (also in DataLoader worker processes)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import MODEL, RUN
from torch import nn

from mae.cli import main
from mae.config import load_config
from mae.data import (
    AUGMENTATIONS,
    PlainFolderDataset,
    build_eval_transform,
    build_loader,
    build_transform,
    set_epoch,
    skipped_files,
)
from mae.errors import TrainingError
from mae.models import MaskedAutoencoderViT
from mae.recipes.pretrain import PretrainConfig, run
from mae.train.checkpoint import CheckpointManager, safe_load
from mae.train.engine import Engine, LRSchedule

TINY = [*MODEL, *RUN, "epochs=2", "save_every=1", "visualize=false"]
TIMEOUT = 300




def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in every run: bit-identical numerics


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mae", *args]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL and resume
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_auto_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    """A seeded CLI run killed with SIGKILL once two checkpoints exist, whose checkpoint-last.pth is then damaged,
    resumes with resume=auto from the newest valid checkpoint (warning about the damaged one) and ends with weights and
    optimizer state bit-identical (torch.equal) to the same run left alone: data order, crops and masks are pure
    functions of (seed, epoch, index) and the RNG states are restored. The uninterrupted run keeps the last 2 numbered
    checkpoints plus last and best (best = the lowest epoch loss)."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = [*TINY, "epochs=6", "keep_last=2"]
    alone = subprocess.Popen(_cli("pretrain", *args, f"output_dir={full}"), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_cli("pretrain", *args, f"output_dir={killed}"), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while not (killed / "checkpoint-0001.pth").exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL  # killed, not finished
    assert not (killed / "summary.json").exists() and not (killed / "checkpoint-0005.pth").exists()

    # damage checkpoint-last.pth as a torn write would (a new inode: its numbered twin stays intact); the newest
    # numbered file is complete (written by rename), even if the kill came before `last` was updated to it
    last = killed / "checkpoint-last.pth"
    epoch_at_kill = max(int(p.stem.split("-")[1]) for p in killed.glob("checkpoint-0*.pth"))
    torn = killed / "torn.tmp"
    torn.write_bytes(last.read_bytes()[:4000])
    os.replace(torn, last)

    resumed = subprocess.run(_cli("pretrain", *args, f"output_dir={killed}", "resume=auto"), check=False, env=_env(),
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping damaged checkpoint" in resumed.stderr and "checkpoint-last.pth" in resumed.stderr
    assert f"resumed from {killed / f'checkpoint-{epoch_at_kill:04d}.pth'} at epoch {epoch_at_kill + 2}/6" \
        in resumed.stderr
    assert alone.wait(timeout=TIMEOUT) == 0, alone.stderr.read()[-3000:]

    a, b = safe_load(full / "checkpoint-last.pth"), safe_load(killed / "checkpoint-last.pth")
    assert a["train_state"]["epoch"] == b["train_state"]["epoch"] == 6 and a["train_state"]["batch"] == 0
    assert a["engine"]["step"] == b["engine"]["step"] == 48
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["engine"]["optimizer"]["state"].values(), b["engine"]["optimizer"]["state"].values(),
                      strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)

    names = sorted(p.name for p in full.glob("checkpoint-*.pth"))
    assert names == ["checkpoint-0004.pth", "checkpoint-0005.pth", "checkpoint-best.pth", "checkpoint-last.pth"]
    losses = [h["epoch_loss"] for h in a["train_state"]["history"]]
    assert safe_load(full / "checkpoint-best.pth")["train_state"]["best"]["epoch"] == int(np.argmin(losses))


_SAVE_KILLER = textwrap.dedent('''
    import json, os, signal, sys
    import torch
    from mae.train import checkpoint, file_store

    def save_and_die(where, out):
        manager = checkpoint.CheckpointManager(out, keep_last=0 if where.endswith("only-last") else 2)
        manager.save({"w": torch.zeros(100_000)}, 0)

        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        if where.startswith("while-writing"):
            def half_written(obj, f, *args, **kwargs):
                f.write(b"PK\\x03\\x04" + bytes(50_000))  # the start of a zip archive, then the kill
                f.flush()
                die()
            torch.save = half_written
        elif where == "before-rename":
            file_store.os.replace = die  # the temporary file is complete and fsynced
        else:  # "before-last": the numbered file is in place, checkpoint-last.pth not yet updated
            file_store.os.link = die
        manager.save({"w": torch.ones(100_000)}, 1)

    status = {}
    for where in sys.argv[2:]:  # one forked child per kill point: torch is imported once
        pid = os.fork()
        if pid == 0:
            save_and_die(where, os.path.join(sys.argv[1], where))
            os._exit(0)
        status[where] = os.waitpid(pid, 0)[1]
    print(json.dumps({k: os.WTERMSIG(v) if os.WIFSIGNALED(v) else -1 for k, v in status.items()}))
''')


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """A process killed (SIGKILL) while writing a checkpoint (numbered + last, or keep_last=0: last only), after fsync
    but before the rename, or between the numbered file and checkpoint-last.pth leaves checkpoint-last.pth intact and
    a loadable newest checkpoint: the previous one (epoch 0), or for the last case the complete new numbered file
    (epoch 1). The next save removes the dead temporary file."""
    script = tmp_path / "killer.py"
    script.write_text(_SAVE_KILLER)
    cases = {"while-writing": 0, "while-writing-only-last": 0, "before-rename": 0, "before-last": 1}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), *cases], check=False, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == dict.fromkeys(cases, signal.SIGKILL)
    for where, expected_epoch in cases.items():
        out = tmp_path / where
        manager = CheckpointManager(out, keep_last=0 if where.endswith("only-last") else 2)
        assert safe_load(out / "checkpoint-last.pth")["epoch"] == 0, where  # never half-written
        _, state = manager.load_latest()
        assert state["epoch"] == expected_epoch, where
        assert torch.equal(state["w"], torch.full((100_000,), float(expected_epoch))), where
        if where != "before-last":
            assert list(out.glob(".checkpoint-*.tmp")), where  # the crash really happened inside the save
        manager.save({"w": torch.ones(3)}, 2)
        assert not list(out.glob(".*.tmp")), where


# ---------------------------------------------------------------------------------------------------------------------
# non-finite losses and weights
# ---------------------------------------------------------------------------------------------------------------------


class _Records:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log(self, row: dict) -> None:
        self.rows.append(row)


def _nan_engine(nan_at: set[int], max_nonfinite: int, fused: bool = False):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    records = _Records()
    engine = Engine(model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused), LRSchedule(0.1, 100, 0, 0.1),
                    max_nonfinite=max_nonfinite, show_progress=False, logger=records, log_every=1)
    assert engine.device_skip == fused  # fused AdamW skips on the device, the other one after a host read
    batches = [(torch.randn(5, 4), torch.randn(5, 1)) for _ in range(8)]
    before: list[list[torch.Tensor]] = []  # the weights when micro-batch i starts

    def loss_fn(m, batch):
        before.append([p.detach().clone() for p in m.parameters()])
        loss = ((m(batch[0]) - batch[1]) ** 2).mean()
        return loss * float("nan") if len(before) - 1 in nan_at else loss

    return engine, model, batches, loss_fn, before, records


@pytest.mark.parametrize("fused", [False, True], ids=["host-skip", "device-skip"])
def test_non_finite_losses_skip_their_update_are_counted_and_logged(caplog, fused):
    """NaN losses at micro-batches 2, 5 and 6 (max_nonfinite=3, never 3 in a row): those updates are skipped (weights
    unchanged across them; the schedule advances per window, as the reference's per-iteration schedule), each is
    counted in skipped_steps and logged with a warning, and the epoch loss is the mean of the finite losses; the same
    whether the skip is decided on the host or on the device (fused AdamW, no host read per update)."""
    engine, model, batches, loss_fn, before, records = _nan_engine({2, 5, 6}, max_nonfinite=3, fused=fused)
    with caplog.at_level(logging.WARNING, logger="mae"):
        stats = engine.train_epoch(batches, 0, loss_fn)
    assert engine.step == 8 and engine.nonfinite_total == stats.skipped_steps == 3
    after = [p.detach().clone() for p in model.parameters()]
    snapshots = [*before, after]
    for i in range(8):
        same = all(torch.equal(a, b) for a, b in zip(snapshots[i], snapshots[i + 1], strict=True))
        assert same == (i in (2, 5, 6)), i
    assert [r["skipped_steps"] for r in records.rows] == [0, 0, 1, 1, 1, 2, 3, 3]
    assert all(np.isnan(r["loss"]) == (i in (2, 5, 6)) for i, r in enumerate(records.rows))
    assert len([r for r in caplog.records if "non-finite loss" in r.getMessage()]) == 3
    assert np.isfinite(stats.loss)


def test_k_non_finite_losses_in_a_row_stop_with_a_clear_error_and_untouched_weights():
    """max_nonfinite=3 NaN losses in a row raise TrainingError naming the count and what to try; the weights are
    those before the first NaN step (no bad state is kept)."""
    engine, model, batches, loss_fn, before, _ = _nan_engine({1, 2, 3}, max_nonfinite=3)
    with pytest.raises(TrainingError, match=r"non-finite for 3 consecutive updates .*lower the learning rate"):
        engine.train_epoch(batches, 0, loss_fn)
    assert all(torch.equal(a, b) for a, b in zip(before[1], model.parameters(), strict=True))
    assert engine.step == 4 and engine.skipped_total == 3


def test_checkpoint_manager_refuses_a_state_with_nan_and_keeps_the_previous_one(tmp_path):
    """save() of a state with a NaN anywhere (weights or optimizer state) raises TrainingError naming the tensor and
    writes nothing; the previous checkpoint stays the newest."""
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save({"model": {"w": torch.ones(3)}}, 0)
    bad_weight = {"model": {"w": torch.tensor([1.0, float("nan"), 1.0])}}
    bad_moment = {"model": {"w": torch.ones(3)}, "engine": {"optimizer": {"state": {0: {"exp_avg": torch.tensor(
        [float("inf")])}}}}}
    for state, name in ((bad_weight, "model.w"), (bad_moment, "engine.optimizer.state.0.exp_avg")):
        with pytest.raises(TrainingError, match=f"'{name}' holds NaN or inf"):
            manager.save(state, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0000.pth", "checkpoint-last.pth"]
    assert manager.load_latest()[1]["epoch"] == 0


@pytest.mark.parametrize("fault", ["nan_losses", "nan_weights"])
def test_pretrain_cli_stops_on_divergence_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                          capsys, fault):
    """`mae pretrain` whose loss turns NaN in epoch 1 (from update 10 on): with max_nonfinite=3 it stops at the third
    NaN; with the weights themselves NaN and max_nonfinite=100 it reaches the save, which refuses them. Either way exit
    code 2, one line on stderr, and the epoch-0 checkpoint is the newest (finite) one."""
    calls = {"n": 0}
    forward_loss = MaskedAutoencoderViT.forward_loss

    def diverging(self, imgs, pred, mask):
        calls["n"] += 1
        if calls["n"] == 10 and fault == "nan_weights":
            self.mask_token.data.fill_(float("nan"))
        loss = forward_loss(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] >= 10 else loss

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", diverging)
    limit = "max_nonfinite=3" if fault == "nan_losses" else "max_nonfinite=100"
    rc = main(["pretrain", *TINY, limit, f"output_dir={tmp_path}"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2
    if fault == "nan_losses":
        assert "loss was non-finite for 3 consecutive updates" in line and calls["n"] == 12
    else:
        assert "refusing to save the checkpoint of epoch 1: 'model.mask_token' holds NaN" in line
    state = CheckpointManager(tmp_path).load_latest()[1]
    assert state["train_state"]["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "checkpoint-0001.pth").exists()


def test_disk_full_during_a_run_is_a_one_line_error_and_the_previous_checkpoint_survives(tmp_path, capsys):
    """The second checkpoint of a run meets a real full disk (a tmpfs with room for one checkpoint and a half):
    exit code 2, one line naming the file, the reason and the fix; checkpoint-last.pth still loads as the end of the
    first epoch, no temporary file is left, and once space is freed the run resumes."""
    from faults import PAGE, small_disk

    probe = tmp_path / "probe"
    assert main(["pretrain", *TINY, "epochs=1", f"output_dir={probe}"]) == 0
    size = (probe / "checkpoint-last.pth").stat().st_size
    capsys.readouterr()
    with small_disk() as disk:
        disk.fill(size + size // 2 + 16 * PAGE)  # the first checkpoint fits, the second's temporary file does not
        out = disk.path / "run"
        rc = main(["pretrain", *TINY, f"output_dir={out}"])
        line = _one_error_line(capsys.readouterr().err)
        assert rc == 2
        assert "could not write" in line and "checkpoint-0001.pth" in line, line
        assert "No space left on device" in line and "free some space or choose another --output-dir" in line
        assert safe_load(out / "checkpoint-last.pth")["train_state"]["epoch"] == 1  # the end of the first epoch
        assert not (out / "checkpoint-0001.pth").exists() and not list(out.glob(".*.tmp"))
        disk.grow()
        assert main(["pretrain", *TINY, f"output_dir={out}", "resume=auto"]) == 0
        assert safe_load(out / "checkpoint-last.pth")["train_state"]["epoch"] == 2


# ---------------------------------------------------------------------------------------------------------------------
# bad images
# ---------------------------------------------------------------------------------------------------------------------


def _odd_images(folder: Path, n_good: int = 6) -> list[str]:
    """Good images of every storage kind and size (tiny ones included) plus two unreadable files; returns the
    unreadable names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    kinds = [
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)),  # RGB
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)),  # grey
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).convert("P"),  # palette
        Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)),  # RGBA
        Image.fromarray(rng.integers(0, 65536, (24, 24), dtype=np.uint16)),  # 16-bit
        Image.new("L", (1, 1), 200),  # far smaller than the 28-pixel crop
        Image.new("RGB", (3, 90), (10, 20, 30)),  # thin
    ]
    for i in range(n_good):
        kinds[i % len(kinds)].save(folder / f"img{i:03d}.png")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    (folder / "img000_truncated.jpg").write_bytes(buffer.getvalue()[:500])
    (folder / "img001_garbage.png").write_bytes(b"not a png" * 30)
    return ["img000_truncated.jpg", "img001_garbage.png"]


def test_unreadable_files_met_in_worker_processes_are_counted_in_the_main_process(tmp_path):
    """With 2 DataLoader workers, the files the workers skipped are known to the main process after the epoch:
    num_skipped and skipped_files (through the loader's wrappers) name both unreadable files."""
    bad = _odd_images(tmp_path, n_good=10)
    dataset = PlainFolderDataset(tmp_path, transform=build_transform("none", 8, 1))
    loader = build_loader(dataset, batch_size=3, num_workers=2, seed=0)
    set_epoch(loader, 0)
    batches = list(loader)  # the workers warn (in their own processes)
    assert sum(len(b[0]) for b in batches) == 12  # every index still yields a sample (the next readable one)
    assert dataset.num_skipped == 2
    assert sorted(Path(p).name for p in skipped_files(loader.dataset)) == bad


def test_images_smaller_than_the_crop_or_very_thin_come_out_at_the_crop_size():
    """Every pre-training augmentation and the evaluation transform turn 1x1, 3x7 and 200x2 images (grey and RGB)
    into finite [C, 28, 28] tensors."""
    transforms = [(build_transform(name, 28, c), c) for name in AUGMENTATIONS for c in (1, 3)]
    transforms += [(build_eval_transform(28, c), c) for c in (1, 3)]
    for transform, channels in transforms:
        for size in ((1, 1), (3, 7), (200, 2)):
            for mode in ("L", "RGB"):
                out = transform(Image.new(mode, size, 128 if mode == "L" else (1, 2, 3)))
                assert out.shape == (channels, 28, 28) and torch.isfinite(out).all(), (size, mode)


def test_pretraining_on_a_messy_folder_converts_every_kind_and_reports_skipped_files(tmp_path, caplog):
    """Pre-training (2 loader workers) on a folder of RGB, grey, palette, RGBA, 16-bit, 1x1 and thin images plus a
    truncated JPEG and a garbage PNG runs to the end; the epoch-end warning and the summary count the 2 skipped
    files."""
    _odd_images(tmp_path / "images", n_good=30)
    cfg = load_config(PretrainConfig, None, [*TINY, f"data.path={tmp_path / 'images'}", "data.train_limit=null",
                                             "data.num_workers=2", "batch_size=8", "epochs=1",
                                             f"output_dir={tmp_path / 'run'}"])
    with caplog.at_level(logging.WARNING, logger="mae"):
        summary = run(cfg)
    assert summary["skipped_files"] == 2 and summary["updates"] == 32 // 8
    warned = [r.getMessage() for r in caplog.records if "unreadable image file" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("epoch 0: 2 unreadable image file(s) skipped")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_files"] == 2
