"""The fault matrix, the commands besides training: evaluate, detect, segment, visualize, embed, attention, export,
convert, prepare, corrupt and the demo, each x each fault that applies to it, through the real CLI in a child process,
on a real small disk (a tmpfs the test mounts), a real read-only mount and real signals.

Every cell checks the invariant of `faults.check_failure` (exit 2 or 128 + n, no traceback, one error line and it is
last), that no file the user had changed (`faults.assert_unchanged`) and that nothing half-written is left
(`faults.assert_no_partial`); a command that keeps state (prepare's shards, a transfer run's checkpoint, the demo's
stages) is rerun after the fault and must finish. The training commands' cells are in test_fault_matrix.py;
docs/robustness.md shows the matrix.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from faults import (
    NAN_TENSOR,
    PAGE,
    Result,
    assert_no_partial,
    assert_unchanged,
    check_failure,
    nan_copy,
    pretrain_settings,
    run_cli,
    small_disk,
    snapshot,
    start_cli,
    wait_for,
)
from tiny import RUN

pytestmark = pytest.mark.slow

PRETRAIN = pretrain_settings()
FINETUNE = [*RUN, "data.train_limit=128", "data.val_limit=64", "epochs=1", "save_every=1",
            "model.name=mae_vit_micro_patch4_28"]
EVALUATE = ["data.path=builtin:mnist5k", "data.val_limit=64", "data.num_workers=0", "device=cpu", "precision=fp32",
            "batch_size=64", "progress=false"]
SIGTERM = 128 + signal.SIGTERM


def _user_file(folder: Path, name: str = "notes.txt") -> Path:
    """A file of the user's on the disk of the fault, to show it is neither changed nor lost."""
    user = folder / name
    user.write_text("the user's own file on the same disk\n")
    return user


def _signalled(proc, command: str) -> str:
    out, err = proc.communicate(timeout=300)
    return check_failure(Result(proc.returncode, out, err), command, rc=SIGTERM)


def _wait_stderr(proc, text: str) -> None:
    """Read the child's stderr until a line holds `text` (the point of the fault)."""
    while True:
        line = proc.stderr.readline()
        if not line:
            proc.wait()
            pytest.fail(f"the command ended (exit {proc.returncode}) before printing {text!r}")
        if text in line:
            return


# ---------------------------------------------------------------------------------------------------------------------
# shared sources: a pre-training run, a fine-tuned classifier, their NaN copies, images, a tiny 32 px MAE for transfer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny pre-training run: the weights every weights-reading command reads."""
    out = tmp_path_factory.mktemp("tools-reference") / "run"
    result = run_cli("pretrain", *PRETRAIN, f"output_dir={out}")
    assert result.rc == 0, str(result)
    return out


@pytest.fixture(scope="module")
def nan_run(reference, tmp_path_factory):
    """The reference run with one NaN weight (its config.yaml kept, so the commands find its data)."""
    folder = tmp_path_factory.mktemp("tools-nan") / "run"
    nan_copy(reference / "model.safetensors", folder / "model.safetensors")
    (folder / "config.yaml").write_bytes((reference / "config.yaml").read_bytes())
    return folder


@pytest.fixture(scope="module")
def classifier(reference, tmp_path_factory):
    """A tiny fine-tuning run from the reference: the classifier of evaluate and of convert's classifier targets."""
    out = tmp_path_factory.mktemp("tools-classifier") / "run"
    result = run_cli("finetune", f"--checkpoint={reference / 'model.safetensors'}", *FINETUNE, f"output_dir={out}")
    assert result.rc == 0, str(result)
    return out


@pytest.fixture(scope="module")
def nan_classifier(classifier, tmp_path_factory):
    """The classifier exported for timm (FILE.safetensors + FILE.json), one weight NaN."""
    folder = tmp_path_factory.mktemp("tools-nan-classifier")
    good = folder / "good.safetensors"
    result = run_cli("convert", str(classifier), str(good), "--to", "timm")
    assert result.rc == 0, str(result)
    (folder / "nan.json").write_bytes((folder / "good.json").read_bytes())
    return nan_copy(good, folder / "nan.safetensors")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two class folders of 256 x 256 PNGs (smooth, so small on disk; big enough that re-encoding takes time)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tools-photos") / "photos"
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 256, dtype=np.float32)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(80):
            base = (ramp[None, :, None] * rng.uniform(0.2, 1, 3) + ramp[:, None, None] * rng.uniform(0, 0.8, 3)) / 2
            Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(root / cls / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def dcp_checkpoint(reference, tmp_path_factory):
    """The reference's training checkpoint as a DCP folder (the source of `convert --to checkpoint`)."""
    out = tmp_path_factory.mktemp("tools-dcp") / "checkpoint-0001"
    result = run_cli("convert", str(reference / "checkpoint-last.pth"), str(out), "--to", "dcp")
    assert result.rc == 0, str(result)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# visualize, attention, embed, export: files of one output each
# ---------------------------------------------------------------------------------------------------------------------

ONE_FILE = ("visualize", "attention", "embed", "export")


def _one_file_command(command: str, checkpoint: Path, out: Path, photos: Path, *extra: str) -> list[str]:
    if command == "visualize":
        return ["visualize", str(checkpoint), "--num-images", "2", "--out", str(out), *extra]
    if command == "attention":
        return ["attention", str(checkpoint), "--images", str(photos / "cat"), "--num-images", "2", "--out",
                str(out), *extra]
    if command == "embed":
        return ["embed", str(checkpoint), f"--data={photos / 'cat'}", f"out={out}", "device=cpu", "progress=false",
                *extra]
    if command == "export":
        return ["export", str(checkpoint), "--out", str(out), "--no-check", *extra]
    raise AssertionError(command)


def _suffix(command: str) -> str:
    return {"visualize": ".png", "attention": ".png", "embed": ".safetensors", "export": ".onnx"}[command]


def _needs(command: str) -> None:
    if command == "export":
        pytest.importorskip("onnx", reason="mae export --to onnx needs the onnx package")


@pytest.mark.parametrize("command", ONE_FILE)
def test_one_file_nan_weights(nan_run, photos, tmp_path, command):
    """Weights holding NaN: one line naming the tensor, and no output file."""
    _needs(command)
    out = tmp_path / f"out{_suffix(command)}"
    result = run_cli(*_one_file_command(command, nan_run, out, photos))
    check_failure(result, command, mentions=(NAN_TENSOR,))
    assert not out.exists()
    assert_no_partial(tmp_path)


@pytest.mark.parametrize("command", ["embed", "export"])  # visualize and attention: the same check, in cli.py
def test_one_file_existing_output(reference, photos, tmp_path, command):
    """An output that already exists: refused without --overwrite, the user's bytes and mtime unchanged."""
    _needs(command)
    out = tmp_path / f"mine{_suffix(command)}"
    out.write_bytes(b"the user's own file\n")
    before = snapshot(tmp_path)
    result = run_cli(*_one_file_command(command, reference, out, photos))
    check_failure(result, command, mentions=("--overwrite",))
    assert_unchanged(before)


@pytest.mark.parametrize("command", ONE_FILE)
def test_one_file_full_disk(reference, photos, command):
    """The output disk full: one line saying so; the user's file on that disk untouched, nothing half-written."""
    _needs(command)
    with small_disk(8 << 20) as disk:
        before = snapshot(_user_file(disk.path))
        disk.fill(0)
        out = disk.path / f"out{_suffix(command)}"
        result = run_cli(*_one_file_command(command, reference, out, photos))
        check_failure(result, command, mentions=("no space left",))
        assert_unchanged(before)
        assert_no_partial(disk.path)
        assert not out.exists()


@pytest.mark.parametrize("command", ["visualize", "embed"])  # the others: the same atomic writer
def test_one_file_read_only(reference, photos, command):
    _needs(command)
    with small_disk(1 << 20) as disk:
        disk.read_only()
        result = run_cli(*_one_file_command(command, reference, disk.path / f"out{_suffix(command)}", photos))
        check_failure(result, command, mentions=("read-only",))


@pytest.mark.parametrize(("command", "option", "named"), [
    ("visualize", ["--mask-ratio", "nan"], "--mask-ratio"),
    ("visualize", ["--num-images", "0"], "--num-images"),
    ("attention", ["--num-images", "0"], "--num-images"),
    ("embed", ["data.crop_pct=.nan"], "data.crop_pct"),
])
def test_one_file_bad_number(reference, photos, tmp_path, command, option, named):
    """A non-finite or out-of-range option: one line naming it, nothing written."""
    out = tmp_path / f"out{_suffix(command)}"
    args = _one_file_command(command, reference, out, photos)
    result = run_cli(*args, *option)
    check_failure(result, command, mentions=(named,))
    assert not out.exists()


def test_embed_sigterm(reference, tmp_path):
    """SIGTERM while embedding 5,000 digits: exit 143, one last line, no output file and no temporary."""
    out = tmp_path / "features.safetensors"
    proc = start_cli("embed", str(reference), "--data=builtin:mnist5k", f"out={out}", "device=cpu", "batch_size=1",
                     "progress=false")
    _wait_stderr(proc, "embedding")
    proc.send_signal(signal.SIGTERM)
    _signalled(proc, "embed")
    assert not out.exists()
    assert_no_partial(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------------------


def _evaluate(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", f"--checkpoint={checkpoint}", *EVALUATE, f"output_dir={out}", *extra]


def test_evaluate_nan_weights(nan_classifier, tmp_path):
    result = run_cli(*_evaluate(nan_classifier, tmp_path / "eval"))
    check_failure(result, "evaluate", mentions=(NAN_TENSOR,))
    assert not (tmp_path / "eval" / "summary.json").exists()


@pytest.mark.parametrize("when", ["start", "final"])
def test_evaluate_full_disk(classifier, when):
    """Full from the start, or with room for config.yaml and the metrics but not the plot and summary."""
    with small_disk(8 << 20) as disk:
        before = snapshot(_user_file(disk.path))
        disk.fill(0 if when == "start" else 3 * PAGE)
        out = disk.path / "eval"
        result = run_cli(*_evaluate(classifier, out))
        check_failure(result, "evaluate", mentions=("no space left",))
        assert_unchanged(before)
        assert_no_partial(disk.path)
        assert not (out / "summary.json").exists()


def test_evaluate_read_only(classifier):
    with small_disk(1 << 20) as disk:
        disk.read_only()
        result = run_cli(*_evaluate(classifier, disk.path / "eval"))
        check_failure(result, "evaluate", mentions=("read-only",))


def test_evaluate_existing_output(classifier, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": true}\n')
    (out / "results.csv").write_text("1,2\n")
    before = snapshot(out)
    result = run_cli(*_evaluate(classifier, out))
    check_failure(result, "evaluate", mentions=("--overwrite",))
    assert_unchanged(before)


@pytest.mark.parametrize(("setting", "named"), [("data.mean=[.nan]", "data.mean")])
def test_evaluate_bad_number(classifier, tmp_path, setting, named):
    out = tmp_path / "eval"
    result = run_cli(*_evaluate(classifier, out, setting))
    check_failure(result, "evaluate", mentions=(named,))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# convert: every target
# ---------------------------------------------------------------------------------------------------------------------

TARGETS = {  # --to: (source fixture, output name)
    "mae": ("reference", "out.safetensors"),
    "reference": ("reference", "out.pth"),
    "hf": ("reference", "out_hf"),
    "timm": ("classifier", "out_timm"),
    "checkpoint": ("dcp_checkpoint", "last.pth"),
    "dcp": ("reference", "checkpoint-0001"),
}


def _convert_source(request, target: str) -> Path:
    source = request.getfixturevalue(TARGETS[target][0])
    if target == "dcp":
        return source / "checkpoint-last.pth"
    return source / "model.safetensors" if target in ("mae", "reference", "hf") else source


@pytest.mark.parametrize("target", ["mae", "hf", "timm", "dcp"])  # reference, checkpoint: mae's file check
def test_convert_existing_output(request, tmp_path, target):
    """An output file or folder the user already has: refused without --overwrite, every byte and mtime kept."""
    src = _convert_source(request, target)
    dst = tmp_path / TARGETS[target][1]
    if dst.suffix:
        dst.write_bytes(b"the user's own file\n")
    else:
        dst.mkdir()
        (dst / "mine.txt").write_text("keep me\n")
    before = snapshot(tmp_path)
    result = run_cli("convert", str(src), str(dst), "--to", target)
    check_failure(result, "convert", mentions=("--overwrite",))
    assert_unchanged(before)


@pytest.mark.parametrize("target", list(TARGETS))
def test_convert_full_disk(request, target):
    """A disk with room for a little of the output: one line; no partial file or folder left, the user's file kept."""
    src = _convert_source(request, target)
    with small_disk(16 << 20) as disk:
        before = snapshot(_user_file(disk.path))
        disk.fill(8 * PAGE)
        dst = disk.path / TARGETS[target][1]
        result = run_cli("convert", str(src), str(dst), "--to", target)
        check_failure(result, "convert", mentions=("no space left",))
        assert_unchanged(before)
        assert_no_partial(disk.path)
        assert not dst.exists(), sorted(p.name for p in disk.path.rglob("*"))


@pytest.mark.parametrize("target", ["dcp"])
def test_convert_read_only(request, target):
    src = _convert_source(request, target)
    with small_disk(1 << 20) as disk:
        disk.read_only()
        result = run_cli("convert", str(src), str(disk.path / TARGETS[target][1]), "--to", target)
        check_failure(result, "convert", mentions=("read-only",))


@pytest.mark.parametrize("target", ["mae", "hf", "timm"])
def test_convert_nan_weights(nan_run, nan_classifier, tmp_path, target):
    """A pre-trained MAE (or, for timm, a classifier) holding NaN: one line naming the tensor, nothing written."""
    src = nan_classifier if target == "timm" else nan_run / "model.safetensors"
    dst = tmp_path / TARGETS[target][1]
    result = run_cli("convert", str(src), str(dst), "--to", target)
    check_failure(result, "convert", mentions=(NAN_TENSOR,))
    assert not dst.exists()
    assert_no_partial(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# prepare: shards
# ---------------------------------------------------------------------------------------------------------------------

PREPARE = ["shard_size=8", "short_side=64", "progress=false"]


def _prepare(src: Path, dst: Path, *extra: str) -> list[str]:
    return ["prepare", str(src), str(dst), *PREPARE, *extra]


@pytest.fixture(scope="module")
def shards(photos, tmp_path_factory):
    """The shard set of a run that met no fault: what every interrupted run, rerun, must end with."""
    dst = tmp_path_factory.mktemp("tools-shards") / "shards"
    result = run_cli(*_prepare(photos, dst))
    assert result.rc == 0, str(result)
    return dst


def _same_shards(a: Path, b: Path) -> None:
    """The same shard files, byte for byte, and an index listing the same shards."""
    tars = sorted(p.name for p in a.glob("*.tar"))
    assert tars == sorted(p.name for p in b.glob("*.tar"))
    for name in tars:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ia, ib = (json.loads((d / "index.json").read_text())["splits"] for d in (a, b))
    assert {k: v["shards"] for k, v in ia.items()} == {k: v["shards"] for k, v in ib.items()}


@pytest.mark.parametrize("when", ["start", "middle", "final"])
def test_prepare_full_disk_then_rerun(photos, shards, when):
    """Full at the start, after some shards, or at the last writes (the index): one line, nothing half-written, the
    user's file kept; once space is freed a rerun completes the same shard set."""
    tars = sorted(shards.glob("*.tar"))
    shard_pages = sum(-(-p.stat().st_size // PAGE) * PAGE for p in tars)
    free = {"start": 0, "middle": 3 * (shard_pages // len(tars)), "final": shard_pages}[when]
    with small_disk(16 << 20) as disk:
        before = snapshot(_user_file(disk.path))
        disk.fill(free)
        dst = disk.path / "shards"
        result = run_cli(*_prepare(photos, dst))
        check_failure(result, "prepare", mentions=("no space left",))
        assert_unchanged(before)
        assert_no_partial(disk.path)
        assert not (dst / "index.json").exists()
        if when == "middle":
            assert any(dst.glob("*.tar")), "the fault came before any shard"
        disk.grow()
        rerun = run_cli(*_prepare(photos, dst))
        assert rerun.rc == 0, str(rerun)
        _same_shards(dst, shards)
        assert_unchanged(before)


def test_prepare_read_only(photos):
    with small_disk(1 << 20) as disk:
        disk.read_only()
        result = run_cli(*_prepare(photos, disk.path / "shards"))
        check_failure(result, "prepare", mentions=("read-only",))


def test_prepare_existing_output(photos, tmp_path):
    """A folder of the user's tar files: refused without --overwrite, none of them touched."""
    dst = tmp_path / "shards"
    dst.mkdir()
    (dst / "train-000000.tar").write_bytes(b"the user's own shard\n")
    (dst / "old-000001.tar").write_bytes(b"another\n")
    before = snapshot(dst)
    result = run_cli(*_prepare(photos, dst))
    check_failure(result, "prepare", mentions=("--overwrite",))
    assert_unchanged(before)


@pytest.mark.parametrize(("setting", "named"), [("shard_mb=.nan", "shard_mb"), ("quality=101", "quality")])
def test_prepare_bad_number(photos, tmp_path, setting, named):
    dst = tmp_path / "shards"
    result = run_cli(*_prepare(photos, dst, setting))
    check_failure(result, "prepare", mentions=(named,))
    assert not dst.exists()


def test_prepare_sigterm_then_rerun(photos, shards, tmp_path):
    """SIGTERM after some shards: exit 143, one last line, no temporary left; a rerun completes the same shard set."""
    dst = tmp_path / "shards"
    proc = start_cli(*_prepare(photos, dst))
    wait_for(lambda: len(list(dst.glob("*.tar"))) >= 2, proc=proc)
    proc.send_signal(signal.SIGTERM)
    _signalled(proc, "prepare")
    assert_no_partial(dst)
    assert not (dst / "index.json").exists()
    rerun = run_cli(*_prepare(photos, dst))
    assert rerun.rc == 0, str(rerun)
    assert "continuing" in rerun.err
    _same_shards(dst, shards)


# ---------------------------------------------------------------------------------------------------------------------
# corrupt
# ---------------------------------------------------------------------------------------------------------------------

CORRUPT = ["image_size=32", "corruptions=[gaussian_noise,contrast]", "severities=[1,5]"]


def _corrupt(src: Path, out: Path, *extra: str) -> list[str]:
    return ["corrupt", f"--data={src}", f"--output-dir={out}", *CORRUPT, *extra]


@pytest.mark.parametrize("when", ["start", "middle"])
def test_corrupt_full_disk(photos, when):
    """Full at the start, or part-way through the folders: one line, no half-written image, the user's file kept."""
    with small_disk(16 << 20) as disk:
        before = snapshot(_user_file(disk.path))
        disk.fill(0 if when == "start" else 24 * PAGE)
        out = disk.path / "c"
        result = run_cli(*_corrupt(photos, out))
        check_failure(result, "corrupt", mentions=("no space left",))
        assert_unchanged(before)
        assert_no_partial(disk.path)
        assert not (out / "corruptions.json").exists()
        if when == "middle":
            assert any(out.rglob("*.JPEG")), "the fault came before any image"


def test_corrupt_read_only(photos):
    with small_disk(1 << 20) as disk:
        disk.read_only()
        result = run_cli(*_corrupt(photos, disk.path / "c"))
        check_failure(result, "corrupt", mentions=("read-only",))


def test_corrupt_existing_output(photos, tmp_path):
    out = tmp_path / "c"
    (out / "gaussian_noise" / "1" / "cat").mkdir(parents=True)
    (out / "gaussian_noise" / "1" / "cat" / "000.JPEG").write_bytes(b"the user's own image\n")
    before = snapshot(out)
    result = run_cli(*_corrupt(photos, out))
    check_failure(result, "corrupt", mentions=("--overwrite",))
    assert_unchanged(before)


@pytest.mark.parametrize(("setting", "named"), [("severities=[7]", "severities"), ("image_size=8", "image_size")])
def test_corrupt_bad_number(photos, tmp_path, setting, named):
    out = tmp_path / "c"
    result = run_cli(*_corrupt(photos, out, setting))
    check_failure(result, "corrupt", mentions=(named,))
    assert not out.exists()


def test_corrupt_sigterm(photos, tmp_path):
    """SIGTERM part-way: exit 143, one last line, no temporary image left behind."""
    out = tmp_path / "c"
    proc = start_cli("corrupt", f"--data={photos}", f"--output-dir={out}", "image_size=32", "severities=[1,2,3,4,5]")
    wait_for(lambda: out.is_dir() and sum(1 for _ in out.rglob("*.JPEG")) >= 10, proc=proc)
    proc.send_signal(signal.SIGTERM)
    _signalled(proc, "corrupt")
    assert_no_partial(out)
    assert not (out / "corruptions.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# detect and segment: a tiny 32 px MAE on synthetic scenes
# ---------------------------------------------------------------------------------------------------------------------

TRANSFER_ARCH = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2,
                 "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}
SYNTHETIC = ["data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.image_size=64",
             "data.synthetic.max_objects=3", "--device=cpu", "--precision=fp32", "progress=false", "num_workers=0",
             "batch_size=2"]
HEADS = {
    "detect": ["eval_every=1", "head.min_size=64", "head.max_size=64", "head.fpn_channels=16", "head.box_head_dim=32",
               "head.mask_head_channels=8", "head.anchor_sizes=[8,16,32,64,128]"],
    "segment": ["data.eval_scale=null", "eval_every=2", "data.crop_size=64", "data.scale=64", "head.channels=16",
                "head.aux_channels=8", "optim.lr=1e-3"],
}


@pytest.fixture(scope="module")
def transfer_sources(tmp_path_factory):
    """(the tiny MAE, its NaN copy, the synthetic scenes)."""
    import torch

    import mae
    from mae.interop import save_model
    from mae.transfer import generate_synthetic

    root = tmp_path_factory.mktemp("tools-transfer")
    torch.manual_seed(0)
    good = save_model(mae.create_model("mae_vit_tiny_patch16", **TRANSFER_ARCH), root / "tiny.safetensors")
    bad = nan_copy(good, root / "nan.safetensors")
    generate_synthetic(root / "shapes", num_train=4, num_val=2, image_size=64, max_objects=3)
    return good, bad, root / "shapes"


def _transfer(command: str, sources, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    from mae.presets import PRESETS_DIR

    return [command, "--config", str(PRESETS_DIR / command / "synthetic_tiny.yaml"), f"--checkpoint={checkpoint}",
            f"--data=synthetic:{sources[2]}", f"--output-dir={out}", "--epochs=2", *SYNTHETIC, *HEADS[command],
            *extra]


@pytest.mark.parametrize("command", ["detect", "segment"])
def test_transfer_nan_initial_weights(transfer_sources, tmp_path, command):
    out = tmp_path / "run"
    result = run_cli(*_transfer(command, transfer_sources, transfer_sources[1], out))
    check_failure(result, command, mentions=(NAN_TENSOR,))
    assert not (out / "checkpoint-last.pth").exists()


@pytest.mark.parametrize("command", ["segment"])  # detect: the same run layer
def test_transfer_full_disk_at_start(transfer_sources, command):
    with small_disk(8 << 20) as disk:
        before = snapshot(_user_file(disk.path))
        disk.fill(0)
        result = run_cli(*_transfer(command, transfer_sources, transfer_sources[0], disk.path / "run"))
        check_failure(result, command, mentions=("no space left",))
        assert_unchanged(before)
        assert_no_partial(disk.path)


@pytest.mark.parametrize("command", ["detect", "segment"])
def test_transfer_full_disk_at_checkpoint_resumes(transfer_sources, command):
    """Room for the run's small files but not its first checkpoint: one line, nothing half-written; once space is
    freed `resume=auto` finishes the run."""
    with small_disk(64 << 20) as disk:
        before = snapshot(_user_file(disk.path))
        disk.fill(64 * PAGE)
        out = disk.path / "run"
        args = _transfer(command, transfer_sources, transfer_sources[0], out)
        result = run_cli(*args)
        check_failure(result, command, mentions=("no space left",))
        assert_unchanged(before)
        assert_no_partial(disk.path)
        assert (out / "config.yaml").is_file()
        disk.grow()
        resumed = run_cli(*args, "resume=auto")
        assert resumed.rc == 0, str(resumed)
        assert (out / "summary.json").is_file()


@pytest.mark.parametrize("command", ["detect"])  # segment: the same run layer
def test_transfer_read_only(transfer_sources, command):
    with small_disk(1 << 20) as disk:
        disk.read_only()
        result = run_cli(*_transfer(command, transfer_sources, transfer_sources[0], disk.path / "run"))
        check_failure(result, command, mentions=("read-only",))


@pytest.mark.parametrize(("command", "setting"), [("detect", "optim.lr=.nan"), ("segment", "optim.weight_decay=inf")])
def test_transfer_bad_number(transfer_sources, tmp_path, command, setting):
    out = tmp_path / "run"
    result = run_cli(*_transfer(command, transfer_sources, transfer_sources[0], out, setting))
    check_failure(result, command, mentions=(setting.split("=")[0],))
    assert not out.exists()


@pytest.mark.parametrize("command", ["detect", "segment"])
def test_transfer_sigterm(transfer_sources, tmp_path, command):
    """SIGTERM during training: exit 143, one last line, nothing half-written."""
    out = tmp_path / "run"
    proc = start_cli(*_transfer(command, transfer_sources, transfer_sources[0], out, "--epochs=20"))
    wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0, proc=proc)
    proc.send_signal(signal.SIGTERM)
    _signalled(proc, command)
    assert_no_partial(out)


# ---------------------------------------------------------------------------------------------------------------------
# the demo's stages
# ---------------------------------------------------------------------------------------------------------------------

DEMO_PRETRAIN = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=32",
                 "model.decoder_depth=1", "model.decoder_num_heads=2", "data.train_limit=128", "data.num_workers=0",
                 "epochs=1", "batch_size=32", "save_every=1", "visualize=false", "precision=fp32"]
DEMO_EVAL = ["data.train_limit=128", "data.val_limit=64", "data.num_workers=0", "epochs=1", "batch_size=32",
             "precision=fp32"]
DEMO = ["device=cpu", f"pretrain_overrides=[{','.join(DEMO_PRETRAIN)}]", f"eval_overrides=[{','.join(DEMO_EVAL)}]",
        "mask_ratios=[0.75]"]


@pytest.mark.parametrize("setting", ["mask_ratios=[.nan]"])
def test_demo_bad_number(tmp_path, setting):
    out = tmp_path / "demo"
    result = run_cli("demo", f"--output-dir={out}", *DEMO, setting)
    check_failure(result, "demo", mentions=("mask_ratios",))
    assert not out.exists()


def test_demo_read_only():
    with small_disk(1 << 20) as disk:
        disk.read_only()
        result = run_cli("demo", f"--output-dir={disk.path / 'demo'}", *DEMO)
        check_failure(result, "demo", mentions=("read-only",))


@pytest.mark.parametrize("when", ["start", "stage"])
def test_demo_full_disk(when):
    """Full at the start, or during the evaluation stages after pre-training: one line, nothing half-written; once
    space is freed the rerun continues and writes the report."""
    with small_disk(64 << 20) as disk:
        before = snapshot(_user_file(disk.path))
        disk.fill(0 if when == "start" else 3 << 20)
        out = disk.path / "demo"
        result = run_cli("demo", f"--output-dir={out}", *DEMO)
        check_failure(result, "demo", mentions=("no space left",))
        assert_unchanged(before)
        assert_no_partial(disk.path)
        assert not (out / "report.html").exists()
        if when == "stage":
            assert (out / "model.safetensors").is_file(), "the fault came before the pre-training stage finished"
            disk.grow()
            rerun = run_cli("demo", f"--output-dir={out}", *DEMO)
            assert rerun.rc == 0, str(rerun)
            assert (out / "report.html").is_file()


def test_demo_sigterm(tmp_path):
    out = tmp_path / "demo"
    proc = start_cli("demo", f"--output-dir={out}", *DEMO)
    wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size > 0, proc=proc)
    proc.send_signal(signal.SIGTERM)
    _signalled(proc, "demo")
    assert_no_partial(out)
