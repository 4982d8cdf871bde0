"""The commands that draw pictures (`mae visualize`, `mae attention`) choose their images the same way: `--data
FOLDER` (a dataset's validation images) or `--images FILE...` (one's own files, of any size and mode), never both,
with the same help and the same one-line errors, through one code path (`mae.viz.images.pick_images`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import micro_mae

from mae.cli import build_parser, main
from mae.interop import save_model

DRAWING = ("visualize", "attention")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny grey MAE checkpoint (no run folder around it) and pictures of other sizes and modes: an RGB photo, an
    RGBA PNG and a grey JPEG, also as a plain folder."""
    root = tmp_path_factory.mktemp("pictures")
    model = micro_mae()
    save_model(model, root / "mae.safetensors")
    rng = np.random.default_rng(0)
    photos = root / "photos"
    photos.mkdir()
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(photos / "a.png")
    Image.fromarray(rng.integers(0, 255, (41, 33, 4), dtype=np.uint8), "RGBA").save(photos / "b.png")
    Image.fromarray(rng.integers(0, 255, (28, 50), dtype=np.uint8)).save(photos / "c.jpg")
    return root, model.eval()


def _one_error_line(capsys, argv: list[str]) -> str:
    """Run `mae argv`; assert exit 2 and exactly one stderr line, `mae CMD: error: ...`, without a traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"mae {argv[0]}: error: ")
    return lines[0]


def test_visualize_draws_the_given_image_files(tiny, tmp_path, capsys):
    """`mae visualize CKPT --images a.png b.png` writes a grid with one row per file (the same picture size as two
    dataset rows), from the files converted to the model's grey input exactly as the dataset path converts them."""
    from mae.data import build_eval_transform
    from mae.viz.reconstruction import load_images

    root, model = tiny
    a, b = root / "photos" / "a.png", root / "photos" / "b.png"
    out = tmp_path / "mine.png"
    assert main(["visualize", str(root / "mae.safetensors"), "--images", str(a), str(b), "--out", str(out)]) == 0
    assert f"reconstructions: {out}" in capsys.readouterr().out
    two_rows = tmp_path / "dataset.png"
    assert main(["visualize", str(root / "mae.safetensors"), "--data", "builtin:mnist5k", "--num-images", "2",
                 "--out", str(two_rows)]) == 0
    assert Image.open(out).size == Image.open(two_rows).size
    imgs = load_images(None, model, images=[a, b])
    tf = build_eval_transform(28, 1, crop_pct=1.0)
    assert imgs.shape == (2, 1, 28, 28)
    torch.testing.assert_close(imgs[0], tf(Image.open(a).convert("L")))


def test_attention_draws_a_dataset_folder(tiny, tmp_path, capsys):
    """`mae attention CKPT --data FOLDER` draws the folder's images (all three here, sorted, named by file), as
    `--images FOLDER` would."""
    from mae.viz.attention import load_image_files

    root, _ = tiny
    out = tmp_path / "attn.png"
    assert main(["attention", str(root / "mae.safetensors"), "--data", str(root / "photos"), "--out", str(out)]) == 0
    assert f"attention maps: {out}" in capsys.readouterr().out
    assert Image.open(out).size[0] > 300
    inputs, shown, names = load_image_files(None, 28, 1, data=str(root / "photos"))
    by_file, _, file_names = load_image_files([root / "photos"], 28, 1)
    assert [n.rsplit("/", 1)[-1] for n in names] == ["a.png", "b.png", "c.jpg"] == \
        [n.rsplit("/", 1)[-1] for n in file_names]
    torch.testing.assert_close(inputs, by_file)
    assert shown.min() >= 0 and shown.max() <= 1


def test_attention_defaults_to_the_runs_own_dataset(tiny, tmp_path):
    """With neither flag, `mae attention RUN/model.safetensors` draws the dataset of the run's config.yaml, as
    `mae visualize` does."""
    from mae.config import load_config, save_config
    from mae.recipes.pretrain import PretrainConfig

    root, _ = tiny
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes((root / "mae.safetensors").read_bytes())
    save_config(load_config(PretrainConfig, None, [f"data.path={root / 'photos'}"]), run / "config.yaml")
    for command in DRAWING:
        out = tmp_path / f"{command}.png"
        assert main([command, str(run / "model.safetensors"), "--num-images", "2", "--out", str(out)]) == 0
        assert out.is_file()


@pytest.mark.parametrize("command", DRAWING)
def test_a_missing_or_unreadable_image_is_one_line_naming_the_file(tiny, tmp_path, capsys, command):
    """`--images` with a file that does not exist, or one that is not an image, stops with one line naming that
    file (exit 2) and writes nothing."""
    root, _ = tiny
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    out = tmp_path / "out.png"
    for bad, says in ((tmp_path / "missing.png", "does not exist"), (broken, "could not be read")):
        line = _one_error_line(capsys, [command, str(root / "mae.safetensors"), "--images",
                                        str(root / "photos" / "a.png"), str(bad), "--out", str(out)])
        assert f"image '{bad}' {says}" in line
        assert not out.exists()


@pytest.mark.parametrize("command", DRAWING)
def test_data_and_images_together_or_neither_is_one_line(tiny, tmp_path, capsys, command):
    """Both `--data` and `--images` is refused in one line naming both; neither, for a checkpoint outside a run
    folder, is one line naming the two ways to choose."""
    root, _ = tiny
    ckpt, out = str(root / "mae.safetensors"), str(tmp_path / "out.png")
    line = _one_error_line(capsys, [command, ckpt, "--data", str(root / "photos"), "--images",
                                    str(root / "photos" / "a.png"), "--out", out])
    assert "--data and --images" in line and "pass one of them" in line
    line = _one_error_line(capsys, [command, ckpt, "--out", out])
    assert "--data" in line and "--images" in line


def test_the_drawing_commands_have_the_same_image_flags():
    """--data and --images read the same (help, metavar, number of values) on every drawing command."""
    parser = build_parser("")
    commands = next(a for a in parser._actions if a.dest == "command").choices

    def flags(command: str) -> dict[str, tuple]:
        return {a.option_strings[0]: (a.help, a.metavar, a.nargs) for a in commands[command]._actions
                if a.option_strings and a.option_strings[0] in ("--data", "--images")}

    assert flags("visualize") == flags("attention") and set(flags("visualize")) == {"--data", "--images"}
