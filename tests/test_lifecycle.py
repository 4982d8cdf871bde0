"""The life of a run (issue [lifecycle]): a run folder is never overwritten or shared by accident, `--resume auto`
alone continues a run exactly, a resume that would change what the run computes is refused, signals and crashes
cost at most the work since the last (step) checkpoint, damaged checkpoints are detected, files follow the umask,
and the engine computes what a plain PyTorch loop computes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from tiny import MODEL, RUN

from mae.cli import main
from mae.config import load_config
from mae.interop import load_checkpoint
from mae.models.mae import MAEConfig, MaskedAutoencoderViT
from mae.recipes.pretrain import PretrainConfig, run
from mae.train.checkpoint import CheckpointManager, safe_load
from mae.train.engine import Engine, LRSchedule
from mae.train.run_dir import RunLock

ARGS = [*MODEL, *RUN, "epochs=3", "save_every=1", "visualize=false"]  # 8 updates per epoch
TIMEOUT = 300


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mae", *args]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip() and "WARNING" not in line]
    assert "Traceback" not in err and len(lines) >= 1, err
    return lines[-1]


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every visible file under `folder`: size and SHA-256 (the lock file, which names its holder, is left out)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return safe_load(path)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _steps(out: Path) -> list[int]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r and "epoch_loss" not in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: the 3-epoch tiny run left alone, through the real CLI in its own process."""
    out = tmp_path_factory.mktemp("full")
    done = subprocess.run(_cli("pretrain", *ARGS, f"output_dir={out}"), env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# a run directory you can trust
# ---------------------------------------------------------------------------------------------------------------------


def test_a_rerun_without_resume_is_refused_and_nothing_changes_on_disk(tmp_path, capsys):
    """`mae pretrain` into a finished run's folder without --resume exits 2 with one line naming the two ways on, and
    leaves every file as it was; --overwrite starts a clean run (one run's metrics, not two mixed)."""
    args = ["pretrain", *ARGS, "epochs=1", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    before = _snapshot(tmp_path)
    assert main(args) == 2
    line = _error_line(capsys)
    assert "holds a previous run" in line and "--resume auto" in line and "--output-dir" in line
    assert _snapshot(tmp_path) == before
    assert main([*args, "--overwrite"]) == 0
    assert _steps(tmp_path) == list(range(1, 9))


def test_a_second_run_on_a_locked_folder_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys, caplog):
    """While another process holds the run's lock, a run on the folder exits 2 naming that process; once it died
    (SIGKILL: no clean-up at all), the next run takes the lock over and trains."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from mae.train.run_dir import RunLock
        RunLock.acquire({str(tmp_path)!r}, "mae pretrain (test holder)")
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "locked"
    try:
        assert main(["pretrain", *ARGS, "epochs=1", "--output-dir", str(tmp_path)]) == 2
        line = _error_line(capsys)
        assert "in use by another run" in line and f"process {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level("INFO", logger="mae"):
        assert main(["pretrain", *ARGS, "epochs=1", "--output-dir", str(tmp_path)]) == 0
    assert any("no longer running" in r.getMessage() and str(holder.pid) in r.getMessage() for r in caplog.records)


def test_the_lock_is_held_for_the_run_and_released_after(tmp_path):
    """RunLock: a second acquire on the same folder fails while the first is held (even from this process), and
    succeeds once it is released."""
    first = RunLock.acquire(tmp_path, "test")
    with pytest.raises(Exception, match="in use by another run"):
        RunLock.acquire(tmp_path, "test")
    first.release()
    RunLock.acquire(tmp_path, "test").release()


def test_config_yaml_holds_resolved_values_the_command_and_the_versions(tmp_path):
    """config.yaml records every model field (not null), the precision and device actually used (not 'auto'), the
    command line and the versions of mae, torch, timm and Python; it alone rebuilds the run's config."""
    import yaml

    assert main(["pretrain", *ARGS, "epochs=1", "precision=auto", "device=auto", "--output-dir", str(tmp_path)]) == 0
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert all(v is not None for v in saved["model"].values()) and saved["model"]["embed_dim"] == 32
    assert saved["model"]["img_size"] == 28 and saved["model"]["mask_ratio"] == 0.75
    assert saved["precision"] in ("bf16", "fp32") and saved["device"] == "cpu"
    assert "pretrain" in saved["_run"]["command"] and "model.embed_dim=32" in saved["_run"]["command"]
    assert set(saved["_run"]["versions"]) == {"mae", "torch", "timm", "python"}
    cfg = load_config(PretrainConfig, tmp_path / "config.yaml")
    assert cfg.model.depth == 2 and cfg.epochs == 1 and cfg.resume is None


# ---------------------------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------------------------


def _start_and_kill(out: Path, until, *extra: str) -> None:
    """Start the tiny run through the CLI in its own process and SIGKILL it once `until(out)` holds."""
    victim = subprocess.Popen(_cli("pretrain", *ARGS, *extra, f"output_dir={out}"), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while not until(out) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run ended before it could be killed"


def _resume_alone(out: Path) -> subprocess.CompletedProcess:
    """`mae pretrain --output-dir OUT --resume auto` and nothing else: the run's own config.yaml is the base."""
    return subprocess.run(_cli("pretrain", "--output-dir", str(out), "--resume", "auto"), env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


@pytest.mark.slow
def test_resume_auto_alone_continues_a_killed_run_bit_exactly(uninterrupted, tmp_path):
    """A run SIGKILLed after its first checkpoint, resumed with `--resume auto` and no other argument, ends with the
    uninterrupted run's weights (torch.equal); metrics.jsonl has every update once, in order."""
    out = tmp_path / "killed"
    _start_and_kill(out, lambda o: (o / "checkpoint-0000.pth").exists())
    resumed = _resume_alone(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    _assert_same_weights(uninterrupted / "checkpoint-last.pth", out / "checkpoint-last.pth")
    assert _steps(out) == list(range(1, 25))


@pytest.mark.slow
def test_resume_auto_alone_after_a_kill_before_the_first_checkpoint_restarts_the_same_run(uninterrupted, tmp_path):
    """Killed before any checkpoint (only config.yaml and a few metrics lines exist), `--resume auto` alone restarts
    the run with its own config (not 800 epochs of the default ViT-B) and ends with the uninterrupted weights."""
    out = tmp_path / "early"
    _start_and_kill(out, lambda o: (o / "metrics.jsonl").is_file() and (o / "metrics.jsonl").stat().st_size > 0,
                    "save_every=3", "save_every_minutes=0")
    assert not list(out.glob("checkpoint-*.pth"))
    resumed = _resume_alone(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "no checkpoint" in resumed.stderr and "mae_vit_micro_patch4_28" in resumed.stderr
    _assert_same_weights(uninterrupted / "checkpoint-last.pth", out / "checkpoint-last.pth")
    assert _steps(out) == list(range(1, 25))


def test_resume_refuses_a_changed_batch_size_or_dataset_naming_each_field(tmp_path, capsys):
    """A resume with another batch size, another data subset or a data folder whose files changed is refused with
    one line naming each change, and nothing on disk changes; --allow-config-change goes on and records it."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(64):
        Image.new("L", (28, 28), i * 3).save(images / f"{i:03d}.png")
    out = tmp_path / "run"
    base = ["pretrain", *ARGS, "epochs=1", f"--data={images}", "data.train_limit=null", "--output-dir", str(out)]
    assert main(base) == 0
    before = _snapshot(out)
    resume = ["pretrain", "--output-dir", str(out), "--resume", "auto"]
    assert main([*resume, "batch_size=16"]) == 2
    assert "effective batch 32 -> 16" in _error_line(capsys)
    assert main([*resume, "data.train_limit=32"]) == 2
    assert "data.train_limit None -> 32" in _error_line(capsys)
    Image.new("L", (28, 28), 255).save(images / "new.png")
    assert main([*resume, "epochs=2"]) == 2
    line = _error_line(capsys)
    assert "epochs 1 -> 2" in line and "training images 64 -> 65" in line and "training data (file list)" in line
    assert _snapshot(out) == before
    assert main([*resume, "epochs=2", "--allow-config-change"]) == 0
    recorded = json.loads((out / "config_changes.jsonl").read_text().splitlines()[-1])
    assert set(recorded["changes"]) == {"epochs", "training images", "training data (file list)"}


def test_a_checkpoint_of_the_old_schema_is_refused_with_one_line_naming_its_version_and_the_fix(tmp_path, capsys):
    """A training checkpoint of schema 1 (before the shared run layer: 'epoch', 'best_loss', no 'version', no digest;
    no user has one) is not resumed: `--resume auto` and `--resume FILE` exit 2 with one line naming the version and
    what to do, and its weights still load as the start of a new run."""
    old = tmp_path / "old"
    run(load_config(PretrainConfig, None, [*ARGS, "epochs=1", f"output_dir={old}"]))
    state = safe_load(old / "checkpoint-0000.pth")
    v1 = {"format": "mae-train", "model": state["model"], "epoch": 0, "rng": state["rng"],
          "engine": {"step": state["engine"]["step"], "nonfinite_total": 0,
                     "optimizer": state["engine"]["optimizer"], "scaler": state["engine"]["scaler"]},
          "model_config": state["model_config"], "config": state["config"], "best_loss": 1.0}
    for p in old.glob("checkpoint-*.pth"):
        p.unlink()
    torch.save(v1, old / "checkpoint-last.pth")
    before = _snapshot(old)
    for resume in ("auto", str(old / "checkpoint-last.pth")):
        assert main(["pretrain", *ARGS, "epochs=2", "--output-dir", str(old), "--resume", resume]) == 2
        line = _error_line(capsys)
        assert "schema version 1" in line and "no longer resumes" in line, line
        assert f"checkpoint={old / 'checkpoint-last.pth'}" in line, line
    assert _snapshot(old) == before
    model = MaskedAutoencoderViT(MAEConfig(**state["model_config"]))
    load_checkpoint(model, old / "checkpoint-last.pth")
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------------
# signals and step checkpoints
# ---------------------------------------------------------------------------------------------------------------------

_SIGNAL_AT = textwrap.dedent('''
    import os, signal, sys
    from mae.cli import main
    from mae.models.mae import MaskedAutoencoderViT

    at, signum, group = int(sys.argv[1]), getattr(signal, sys.argv[2]), sys.argv[3] == "group"
    calls = {"n": 0}
    loss = MaskedAutoencoderViT.forward_loss

    def signalled(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:  # what SLURM / Kubernetes / Ctrl-C do, in the middle of an update
            if group:  # the whole process group, DataLoader workers included (a terminal, slurmstepd)
                os.killpg(os.getpgid(0), signum)
            else:
                os.kill(os.getpid(), signum)
        return loss(self, *args, **kwargs)

    MaskedAutoencoderViT.forward_loss = signalled
    sys.exit(main(sys.argv[4:]))
''')


@pytest.mark.slow
@pytest.mark.parametrize("name, code, target, workers", [
    ("SIGTERM", 143, "process", 0), ("SIGUSR1", 138, "process", 0), ("SIGINT", 130, "process", 0),
    ("SIGTERM", 143, "group", 2)])
def test_a_signal_mid_epoch_saves_exits_with_its_code_and_the_resumed_run_is_bit_identical(
        uninterrupted, tmp_path, name, code, target, workers):
    """A signal during update 13 (epoch 1, update 5 of 8) to the training process, or to its whole process group
    with 2 DataLoader workers (they ignore it): the update finishes, checkpoint-last.pth is written at epoch 1,
    batch 5, the process exits with 128 + the signal number and one line saying how to continue; the resumed run
    ends bit-identical to the uninterrupted one."""
    script = tmp_path / "signal_at.py"
    script.write_text(_SIGNAL_AT)
    out = tmp_path / "run"
    stopped = subprocess.run([sys.executable, str(script), "13", name, target, "pretrain", *ARGS,
                              f"data.num_workers={workers}", f"output_dir={out}"], env=_env(), capture_output=True,
                             text=True, timeout=TIMEOUT, check=False, start_new_session=True)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    last_line = stopped.stderr.strip().splitlines()[-1]
    assert f"stopped by {name}" in last_line and "--resume auto" in last_line
    ts = safe_load(out / "checkpoint-last.pth")["train_state"]
    assert (ts["epoch"], ts["batch"]) == (1, 5)
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    resumed = _resume_alone(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(uninterrupted / "checkpoint-last.pth", out / "checkpoint-last.pth")
    assert _steps(out) == list(range(1, 25))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mid_epoch_step_checkpoint_resumes_bit_identically(tmp_path, monkeypatch, workers):
    """save_every_steps=3 writes checkpoints inside epochs; a crash at update 11 loses only updates 10-11: the run
    resumed from the step-9 checkpoint (epoch 1, batch 1) ends with the weights and optimizer state of the
    uninterrupted run, with 0 and with 2 loader workers."""
    common = [*ARGS, f"data.num_workers={workers}", "save_every_steps=3"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    run(load_config(PretrainConfig, None, [*common, f"output_dir={full}"]))
    loss, calls = MaskedAutoencoderViT.forward_loss, {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 11:
            raise RuntimeError("simulated crash")
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(load_config(PretrainConfig, None, [*common, f"output_dir={crashed}"]))
    monkeypatch.undo()
    ts = safe_load(crashed / "checkpoint-last.pth")["train_state"]
    assert (ts["epoch"], ts["batch"]) == (1, 1)
    run(load_config(PretrainConfig, None, [*common, f"output_dir={crashed}", "resume=auto"]))
    _assert_same_weights(full / "checkpoint-last.pth", crashed / "checkpoint-last.pth")
    a, b = safe_load(full / "checkpoint-last.pth"), safe_load(crashed / "checkpoint-last.pth")
    for sa, sb in zip(a["engine"]["optimizer"]["state"].values(), b["engine"]["optimizer"]["state"].values(),
                      strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["train_state"]["history"] == b["train_state"]["history"] or all(
        x["epoch_loss"] == y["epoch_loss"]
        for x, y in zip(a["train_state"]["history"], b["train_state"]["history"], strict=False))


# ---------------------------------------------------------------------------------------------------------------------
# integrity and file modes
# ---------------------------------------------------------------------------------------------------------------------


def _flip_a_bit_in_the_largest_tensor(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor stored in a torch zip checkpoint, in place."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


def test_a_flipped_bit_in_the_newest_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    """One flipped bit in the newest checkpoint (and so in checkpoint-last.pth, its hard link) fails its SHA-256
    digest: loading warns, falls back to the previous epoch's checkpoint, and the resumed run redoes the lost epoch
    and ends with the original final weights."""
    out = tmp_path / "run"
    run(load_config(PretrainConfig, None, [*ARGS, f"output_dir={out}", "keep_last=3"]))
    original = _weights(out / "checkpoint-0002.pth")
    _flip_a_bit_in_the_largest_tensor(out / "checkpoint-0002.pth")
    assert torch.load(out / "checkpoint-0002.pth", weights_only=True)  # torch itself does not notice
    with pytest.warns(UserWarning, match="checkpoint-0002.pth.*damaged.*checksum"):
        path, state = CheckpointManager(out).load_latest()
    assert path.name == "checkpoint-0001.pth" and state["train_state"]["epoch"] == 2
    with pytest.warns(UserWarning, match="damaged"):
        run(load_config(PretrainConfig, None, [*ARGS, f"output_dir={out}", "keep_last=3", "resume=auto"]))
    final = _weights(out / "checkpoint-last.pth")
    assert all(torch.equal(original[k], final[k]) for k in original)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_a_run_writes_follow_the_umask(tmp_path, umask):
    """Checkpoints, the safetensors export, config.yaml, metrics, summary, status and plots get mode 0o666 minus the
    umask (0o644 / 0o600), like any file the user's tools write."""
    old = os.umask(umask)
    try:
        run(load_config(PretrainConfig, None, [*ARGS, "epochs=1", f"output_dir={tmp_path}"]))
    finally:
        os.umask(old)
    for name in ("checkpoint-0000.pth", "checkpoint-last.pth", "model.safetensors", "config.yaml", "metrics.jsonl",
                 "summary.json", "run.json", "loss.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ---------------------------------------------------------------------------------------------------------------------
# the engine's hot path
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("accum", [1, 2])
def test_the_engine_computes_exactly_what_a_plain_pytorch_loop_computes(fused, accum):
    """The engine (losses kept on the device, read at log steps; the skip decided on the device for fused AdamW)
    gives the same logged losses and bit-identical weights as the textbook loop: forward, loss / accum, backward,
    step every `accum` micro-batches, lr set per update."""
    from tiny import micro_mae

    torch.manual_seed(1)
    batches = [(torch.randn(8, 1, 28, 28), torch.rand(8, 49)) for _ in range(8)]
    schedule = LRSchedule(1e-3, total_steps=8 // accum, warmup_steps=1)

    def loss_of(model, batch):
        return model(batch[0], 0.75, noise=batch[1])[0]

    plain = micro_mae(seed=0)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=fused)
    expected = []
    for step in range(8 // accum):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        window = 0.0
        for i in range(accum):
            loss = loss_of(plain, batches[step * accum + i])
            window += loss.item()
            (loss / accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        expected.append(window / accum)

    model = micro_mae(seed=0)

    class Records:
        def __init__(self):
            self.rows = []

        def log(self, row):
            self.rows.append(row)

    records = Records()
    engine = Engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), fused=fused), schedule,
                    accum_iter=accum, show_progress=False, logger=records, log_every=1)
    engine.train_epoch(batches, 0, loss_of)
    assert engine.device_skip == fused
    assert [r["loss"] for r in records.rows] == pytest.approx(expected, rel=1e-7)
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_engine_reads_the_device_only_at_log_steps(monkeypatch):
    """With fused AdamW and log_every=4, a 8-update epoch reads device values (Tensor.item / tolist / float) at the
    two log steps and the epoch end only: no host synchronisation per micro-batch or per update."""
    from tiny import micro_mae

    model = micro_mae(seed=0)
    engine = Engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), LRSchedule(1e-3, 8, 0),
                    show_progress=False, log_every=4)
    batches = [(torch.randn(4, 1, 28, 28), torch.rand(4, 49)) for _ in range(8)]
    reads = {"n": 0}
    for name in ("item", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            reads["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    engine.train_epoch(batches, 0, lambda m, b: m(b[0], 0.75, noise=b[1])[0])
    monkeypatch.undo()
    assert 0 < reads["n"] <= 12  # a handful per log step (loss, counters) and at the end, independent of the updates


# ---------------------------------------------------------------------------------------------------------------------
# a hostile environment
# ---------------------------------------------------------------------------------------------------------------------


def test_a_full_disk_at_the_first_log_line_or_the_final_export_is_one_line_and_keeps_the_checkpoints(
        tmp_path, capsys):
    """A real full disk (a tmpfs) when the run writes its first files, or when it writes the final exports after its
    last checkpoint: exit code 2, one line naming the file, the reason and the fix; the checkpoint written before is
    intact and the run resumes once space is freed."""
    from faults import PAGE, disk_usage, small_disk

    probe = tmp_path / "probe"
    assert main(["pretrain", *ARGS, "epochs=1", "--output-dir", str(probe)]) == 0
    capsys.readouterr()
    exports = sum(-(-(probe / name).stat().st_size // PAGE) * PAGE for name in ("model.safetensors",))
    with small_disk() as disk:
        disk.fill(0)
        assert main(["pretrain", *ARGS, "epochs=1", "--output-dir", str(disk.path / "a")]) == 2
        line = _error_line(capsys)
        assert "No space left on device" in line and "free some space" in line and str(disk.path / "a") in line
    with small_disk() as disk:
        # everything up to the checkpoint fits, the final model.safetensors does not
        disk.fill(disk_usage(probe) - exports - 2 * PAGE)
        out = disk.path / "b"
        assert main(["pretrain", *ARGS, "epochs=1", "--output-dir", str(out)]) == 2
        line = _error_line(capsys)
        assert "No space left on device" in line and "could not write" in line, line
        assert safe_load(out / "checkpoint-last.pth")["train_state"]["epoch"] == 1
        disk.grow()
        assert main(["pretrain", *ARGS, "epochs=1", "--output-dir", str(out), "resume=auto"]) == 0
        assert json.loads((out / "run.json").read_text())["status"] == "finished"
        assert (out / "model.safetensors").is_file()


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path, capsys):
    """A --output-dir below a regular file (what a read-only or missing mount also gives: the folder cannot be
    made): exit code 2, one line naming the folder and the fix."""
    (tmp_path / "file").write_text("x")
    assert main(["pretrain", *ARGS, "epochs=1", "--output-dir", str(tmp_path / "file" / "run")]) == 2
    line = _error_line(capsys)
    assert "cannot create output directory" in line and "--output-dir" in line


def test_pipes_link_loops_and_crafted_headers_in_a_data_folder_neither_hang_nor_exhaust_memory(tmp_path, capsys,
                                                                                             caplog):
    """A data folder holding a named pipe called like an image, a link back to its parent (a loop) and a PNG whose
    header claims 100000 x 100000 pixels: the pipe is passed over when listing, the loop is followed at most once
    (no folder is listed twice), the crafted image is skipped with a warning when read (never decoded), and training
    runs to the end."""
    import struct
    import zlib

    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(40):
        Image.new("L", (28, 28), i * 5).save(folder / "sub" / f"{i:02d}.png")
    os.mkfifo(folder / "pipe.jpg")
    os.symlink(folder, folder / "sub" / "loop")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)  # 10 G pixels of 8-bit grey
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                      + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    from mae.data import build_dataset

    dataset = build_dataset(str(folder), mode="L")
    assert len(dataset) == 41  # 40 images and the crafted one; no pipe, nothing twice through the loop
    with caplog.at_level("WARNING", logger="mae"), \
            pytest.warns(UserWarning, match="bomb.png.*(exceeds limit|100000 x 100000)"):
        assert main(["pretrain", *ARGS, "epochs=1", f"--data={folder}", "data.train_limit=null", "batch_size=8",
                     "--output-dir", str(tmp_path / "run")]) == 0
    assert "skipped_files: 2" in capsys.readouterr().out  # the crafted image (read) and the pipe (passed over)
    assert any("bomb.png" in r.getMessage() for r in caplog.records)
    assert any("pipe.jpg' (not a regular file)" in r.getMessage() for r in caplog.records)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_training_step_does_not_synchronise_with_the_host_on_cuda():
    """On a GPU with fused AdamW, the synchronisations CUDA reports (torch.cuda.set_sync_debug_mode) during an epoch
    are the same for 4 and for 12 updates: they come from the epoch's end (the loss and counters read once), none
    from the updates themselves."""
    import warnings

    from tiny import micro_mae

    def syncs(updates: int) -> int:
        model = micro_mae(seed=0).cuda()
        engine = Engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True),
                        LRSchedule(1e-3, updates, 0), device="cuda", show_progress=False, log_every=10_000)
        batches = [(torch.randn(8, 1, 28, 28, device="cuda"), torch.rand(8, 49, device="cuda"))
                   for _ in range(updates)]
        loss = lambda m, b: m(b[0], 0.75, noise=b[1])[0]  # noqa: E731
        engine.train_epoch(batches[:1], 0, loss)  # warm-up: first-call allocations and lazy initialisations
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.train_epoch(batches, 1, loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(4) == syncs(12)
