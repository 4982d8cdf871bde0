"""Nothing of the user's is replaced or deleted (issue 23, item 4), through the real command line.

Every writer (convert, export, embed, attention, visualize, corrupt, prepare, sweep, bench) meets an output path that
already holds the user's file or folder: exit 2, exactly one line `mae CMD: error: ...` (the last on stderr, no
traceback) naming the path and --overwrite, and every byte and modification time of what was there unchanged. With
--overwrite a file is replaced, and a folder is written into without deleting anything the command did not write.
Also: `mae prepare` never deletes tar files it did not write (the found data loss), and `mae visualize` / `mae
attention` check their numbers and read a run's config.yaml safely before any work. One tiny pre-training run is
shared by the whole file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from faults import Result, check_failure
from PIL import Image
from tiny import MODEL, RUN

from mae.cli import main

TINY = [*MODEL, *RUN, "data.train_limit=64", "epochs=1", "visualize=false"]
SWEEP_PRETRAIN = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=32",
                  "model.decoder_depth=1", "model.decoder_num_heads=2", "data.train_limit=64", "data.num_workers=0",
                  "epochs=1", "batch_size=32", "visualize=false", "precision=fp32"]
SWEEP_EVAL = ["data.train_limit=64", "data.val_limit=32", "data.num_workers=0", "epochs=1", "batch_size=32",
              "precision=fp32"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny pre-training run (model.safetensors, checkpoint-last.pth, config.yaml)."""
    out = tmp_path_factory.mktemp("writers") / "run"
    assert main(["pretrain", *TINY, f"output_dir={out}"]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two class folders of three 40 x 40 RGB PNGs each."""
    root = tmp_path_factory.mktemp("images") / "photos"
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"img{i}.png")
    return root


def _state(path: Path) -> dict:
    """Every file at or under `path`, with its bytes and modification time (what 'unchanged' means here)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def _refused(capsys, argv: list[str], path: Path, *kept: Path) -> str:
    """`mae argv`: exit 2, one error line, the last on stderr, naming `path`, no traceback; `path` and `kept`
    are as they were. Returns the line."""
    before = {p: _state(p) for p in (path, *kept)}
    line = check_failure(Result(main(argv), "", capsys.readouterr().err), argv[0], mentions=(str(path),))
    assert {p: _state(p) for p in (path, *kept)} == before
    return line


def _users_file(path: Path) -> Path:
    path.write_bytes(b"the user's own file")
    return path


def _users_folder(path: Path, *names: str) -> Path:
    path.mkdir()
    for name in ("notes.txt", *names):
        (path / name).write_bytes(b"the user's own " + name.encode())
    return path


def _no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")], list(folder.rglob("*"))


# ---------------------------------------------------------------------------------------------------------------------
# file outputs
# ---------------------------------------------------------------------------------------------------------------------


def test_convert_refuses_an_existing_file_and_overwrite_replaces_it(run_dir, tmp_path, capsys):
    """`mae convert RUN FILE --to mae|reference` over the user's file: refused, unchanged; --overwrite replaces it
    with the converted weights (atomically: no temporary left)."""
    from mae.interop import read_checkpoint

    for to, name in (("mae", "mine.safetensors"), ("reference", "mine.pth")):
        dst = _users_file(tmp_path / name)
        line = _refused(capsys, ["convert", str(run_dir), str(dst), "--to", to], dst)
        assert "pass --overwrite to replace it" in line
        assert main(["convert", str(run_dir), str(dst), "--to", to, "--overwrite"]) == 0
        assert read_checkpoint(dst).state_dict["cls_token"].shape == (1, 1, 32)
    _no_temporaries(tmp_path)


def test_export_refuses_an_existing_file_and_overwrite_replaces_it(run_dir, tmp_path, capsys):
    """`mae export RUN --out FILE.onnx` over the user's file: refused; --overwrite writes the ONNX model there."""
    out = _users_file(tmp_path / "encoder.onnx")
    line = _refused(capsys, ["export", str(run_dir), "--to", "onnx", "--out", str(out)], out)
    assert "pass --overwrite to replace it" in line
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    assert main(["export", str(run_dir), "--out", str(out), "--overwrite", "--no-check"]) == 0
    assert onnx.load(str(out)).graph.input[0].name == "pixel_values"
    _no_temporaries(tmp_path)


def test_embed_refuses_an_existing_output_or_sidecar_and_overwrite_replaces_both(run_dir, images, tmp_path, capsys):
    """`mae embed RUN --out F.npy` writes F.npy and F.paths.txt: the user's file at either is refused (both left as
    they were); --overwrite replaces both."""
    out, paths = _users_file(tmp_path / "emb.npy"), _users_file(tmp_path / "emb.paths.txt")
    argv = ["embed", str(run_dir), "--data", str(images), "--out", str(out), "progress=false", "--device", "cpu"]
    line = _refused(capsys, argv, out, paths)
    assert "pass --overwrite to replace it" in line
    out.unlink()
    _refused(capsys, argv, paths)
    assert not out.exists()
    assert main([*argv, "--overwrite"]) == 0
    assert np.load(out).shape == (6, 32) and len(paths.read_text().splitlines()) == 6
    _no_temporaries(tmp_path)


def test_attention_refuses_an_existing_file_and_overwrite_replaces_it(run_dir, images, tmp_path, capsys):
    out = _users_file(tmp_path / "attention.png")
    argv = ["attention", str(run_dir), "--images", str(images / "class0"), "--out", str(out)]
    assert "pass --overwrite to replace it" in _refused(capsys, argv, out)
    assert main([*argv, "--overwrite"]) == 0
    assert Image.open(out).format == "PNG"


def test_visualize_refuses_an_existing_file_and_overwrite_replaces_it(run_dir, tmp_path, capsys):
    out = _users_file(tmp_path / "reconstructions.png")
    argv = ["visualize", str(run_dir), "--num-images", "2", "--out", str(out)]
    assert "pass --overwrite to replace it" in _refused(capsys, argv, out)
    assert main([*argv, "--overwrite"]) == 0
    assert Image.open(out).format == "PNG"


# ---------------------------------------------------------------------------------------------------------------------
# folder outputs
# ---------------------------------------------------------------------------------------------------------------------


def test_convert_to_hf_over_a_file_or_a_users_folder(run_dir, tmp_path, capsys):
    """The found bug: `mae convert X Y --to hf` with Y an existing file was a FileExistsError traceback; now one
    line, also with --overwrite (a file is never replaced by a folder). A folder with the user's files is refused;
    --overwrite writes the export into it: its same-named config.json is replaced, notes.txt is kept."""
    file = _users_file(tmp_path / "vit_hf")
    for extra in ([], ["--overwrite"]):
        _refused(capsys, ["convert", str(run_dir), str(file), "--to", "hf", *extra], file)
    folder = _users_folder(tmp_path / "hf_dir", "config.json")
    argv = ["convert", str(run_dir), str(folder), "--to", "hf"]
    assert "--overwrite" in _refused(capsys, argv, folder)
    assert main([*argv, "--overwrite"]) == 0
    assert (folder / "notes.txt").read_bytes() == b"the user's own notes.txt"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "vit_mae"
    assert (folder / "model.safetensors").is_file()
    _no_temporaries(tmp_path)


def test_convert_to_dcp_refuses_an_existing_folder_and_overwrite_replaces_a_dcp_checkpoint(run_dir, tmp_path,
                                                                                          capsys):
    """`mae convert CKPT.pth DIR --to dcp`: an existing checkpoint directory is refused; --overwrite replaces it
    whole (no temporary left). A folder holding the user's files is refused even with --overwrite, since a DCP
    checkpoint would have to replace the whole folder."""
    src = run_dir / "checkpoint-last.pth"
    dst = tmp_path / "dcp"
    assert main(["convert", str(src), str(dst), "--to", "dcp"]) == 0
    assert "pass --overwrite" in _refused(capsys, ["convert", str(src), str(dst), "--to", "dcp"], dst)
    before = _state(dst)
    assert main(["convert", str(src), str(dst), "--to", "dcp", "--overwrite"]) == 0
    after = _state(dst)
    assert after.keys() == before.keys() and all(after[k][1] >= before[k][1] for k in after)
    _no_temporaries(tmp_path)
    folder = _users_folder(tmp_path / "mine")
    _refused(capsys, ["convert", str(src), str(folder), "--to", "dcp", "--overwrite"], folder)


def test_corrupt_refuses_a_users_folder_and_overwrite_writes_into_it(images, tmp_path, capsys):
    """`mae corrupt --output-dir DIR` over a folder with the user's files: refused; --overwrite writes the tree
    into it and keeps the user's file; a rerun into its own folder needs no --overwrite."""
    out = _users_folder(tmp_path / "c")
    argv = ["corrupt", "--data", str(images), "--output-dir", str(out), "image_size=32", "corruptions=[contrast]",
            "severities=[1]"]
    assert "--overwrite" in _refused(capsys, argv, out)
    assert main([*argv, "--overwrite"]) == 0
    assert len(list((out / "contrast" / "1").rglob("*.JPEG"))) == 6
    assert (out / "notes.txt").read_bytes() == b"the user's own notes.txt"
    assert main(argv) == 0


def test_prepare_never_deletes_the_users_tar_files(images, tmp_path, capsys):
    """The found data loss: `mae prepare SRC DST` deleted `shard-000000.tar` and `old-000001.tar` that the user had in
    DST. Now such a folder (a shard set it did not write) is refused and left as it was; with --overwrite the shards
    are written next to the user's tar files, which keep every byte. A rerun with other settings into its own folder
    removes only its own shards that the new set no longer uses, not a tar the user added meanwhile."""
    dst = _users_folder(tmp_path / "dst", "shard-000000.tar", "old-000001.tar")
    argv = ["prepare", str(images), str(dst), "progress=false", "shard_size=2"]
    assert "--overwrite" in _refused(capsys, argv, dst)
    users = _state(dst)
    assert main([*argv, "--overwrite"]) == 0
    assert {k: v for k, v in _state(dst).items() if k in users} == users
    index = json.loads((dst / "index.json").read_text())
    assert [s["name"] for s in index["splits"]["train"]["shards"]] == [f"train-00000{i}.tar" for i in range(3)]
    added = _users_file(dst / "train-000007.tar")
    users.update(_state(added))
    assert main(["prepare", str(images), str(dst), "progress=false", "shard_size=6"]) == 0
    assert sorted(p.name for p in dst.glob("train-*.tar")) == ["train-000000.tar", "train-000007.tar"]
    assert {k: v for k, v in _state(dst).items() if k in users} == users


def test_sweep_refuses_a_users_folder_and_overwrite_writes_into_it(tmp_path, capsys):
    """`mae sweep --output-dir DIR` over a folder with the user's files: refused; --overwrite runs the row there,
    replaces the same-named results table and keeps the user's other file."""
    out = _users_folder(tmp_path / "sweep", "results.csv")
    argv = ["sweep", "--output-dir", str(out), "--device", "cpu", "grids=[mask_token]",
            "rows=['mask_token/encoder w/o mask token']", f"pretrain_overrides=[{','.join(SWEEP_PRETRAIN)}]",
            f"linprobe_overrides=[{','.join(SWEEP_EVAL)}]", f"finetune_overrides=[{','.join(SWEEP_EVAL)}]"]
    assert "--overwrite" in _refused(capsys, argv, out)
    assert main([*argv, "--overwrite"]) == 0
    assert "encoder w/o mask token" in (out / "results.csv").read_text()
    assert (out / "notes.txt").read_bytes() == b"the user's own notes.txt"


def test_bench_refuses_a_users_folder_and_overwrite_writes_into_it(tmp_path, capsys):
    """`mae bench --output-dir DIR` over a folder with the user's files: refused; --overwrite writes bench.json /
    bench.md there and keeps the user's file; a rerun into its own folder needs no --overwrite."""
    out = _users_folder(tmp_path / "bench", "bench.json")
    argv = ["bench", "--output-dir", str(out), "--suite", "table1c", "--device", "cpu"]
    assert "--overwrite" in _refused(capsys, argv, out)
    assert main([*argv, "--overwrite"]) == 0
    assert "table1c" in json.loads((out / "bench.json").read_text())["suites"]
    assert (out / "notes.txt").read_bytes() == b"the user's own notes.txt"
    assert main(argv) == 0


# ---------------------------------------------------------------------------------------------------------------------
# visualize / attention: their numbers and the run's config.yaml
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "extra", "fragment"), [
    ("visualize", ["--num-images", "0"], "--num-images"),
    ("visualize", ["--num-images", "-2"], "--num-images"),
    ("visualize", ["--mask-ratio", "1.0"], "--mask-ratio"),
    ("visualize", ["--mask-ratio", "0.5", "nan"], "--mask-ratio"),
    ("visualize", ["--mask-ratio", "-0.25"], "--mask-ratio"),
    ("attention", ["--num-images", "0"], "--num-images"),
])
def test_visualize_and_attention_check_their_numbers_first(run_dir, images, tmp_path, capsys, command, extra,
                                                           fragment):
    """`--num-images 0` was a ZeroDivisionError: numbers out of range are one line naming the flag, before any
    work (no output written)."""
    out = tmp_path / "out.png"
    argv = [command, str(run_dir), "--out", str(out), *extra]
    if command == "attention":
        argv += ["--images", str(images)]
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"mae {command}: error: ") and fragment in lines[0], err
    assert not out.exists()


def test_visualize_reads_a_python_tagged_config_yaml_as_one_error_and_runs_nothing(run_dir, tmp_path, capsys):
    """A run folder whose config.yaml carries a Python tag was a traceback: now one line naming the file, and the
    tag's command never runs."""
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(run_dir / "model.safetensors", folder / "model.safetensors")
    marker = tmp_path / "ran"
    (folder / "config.yaml").write_text(f'data: !!python/object/apply:os.system ["touch {marker}"]\n')
    rc = main(["visualize", str(folder / "model.safetensors"), "--out", str(tmp_path / "r.png")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("mae visualize: error: "), err
    assert str(folder / "config.yaml") in lines[0]
    assert not marker.exists() and not (tmp_path / "r.png").exists()
