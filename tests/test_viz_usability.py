"""Figures and the demo report: a run with one logged point still draws it, the reconstruction grid's column
labels stay legible and apart, and the demo report says how it was made and why each check passed or failed."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mae.models import build_model


def _count_colour(png, rgb, tol=40) -> int:
    """Pixels of `png` within `tol` of colour `rgb`."""
    arr = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(arr - np.array(rgb)).sum(-1) < tol).sum())


TAB_BLUE, TAB_ORANGE = (31, 119, 180), (255, 127, 14)


@pytest.fixture
def one_point_run(tmp_path):
    """A metrics.jsonl as a 1-epoch run with one logged update writes it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 0.8, "lr": 1e-4}) + "\n"
                    + json.dumps({"step": 1, "epoch": 0, "epoch_loss": 0.8, "top1": 12.5}) + "\n")
    return path


def test_plot_curves_draws_a_single_point(one_point_run, tmp_path):
    """`plot_curves` (loss.png / curves.png) with one value per key shows it: blue marker pixels in every panel's
    colour (a bare line through one point draws none)."""
    from mae.train.metrics_log import plot_curves

    out = plot_curves(one_point_run, tmp_path / "loss.png", keys=("loss", "lr", "top1"))
    assert _count_colour(out, TAB_BLUE) > 3 * 10


def test_report_training_curves_draw_a_single_point(one_point_run, tmp_path):
    """The report's loss / lr figure draws each one-point series with a marker (the lr panel, which has no legend,
    shows orange marker pixels in the PNG)."""
    from mae.viz.report import plot_training_curves, training_curves_figure

    fig = training_curves_figure(one_point_run)
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 3 and all(len(line.get_xdata()) == 1 and line.get_marker() not in (None, "None", "")
                                   for line in lines)
    out = plot_training_curves(one_point_run, tmp_path / "curves.png")
    right = Image.open(out).crop((Image.open(out).width // 2, 0, Image.open(out).width, Image.open(out).height))
    right.save(tmp_path / "lr_panel.png")
    assert _count_colour(tmp_path / "lr_panel.png", TAB_ORANGE) > 10


def test_reconstruction_column_labels_are_legible_and_do_not_overlap():
    """The labels of the real 10-column grid (3 mask ratios) are at least 11 pt, at most two lines, and their
    rendered boxes do not touch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from mae.viz.reconstruction import LABEL_FONTSIZE, grid_figure, reconstruction_columns

    torch.manual_seed(0)
    model = build_model("mae_vit_micro_patch4_28", embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                         decoder_depth=1, decoder_num_heads=2)
    columns = reconstruction_columns(model, torch.randn(2, 1, 28, 28), (0.5, 0.75, 0.9))
    fig = grid_figure(columns, "MAE reconstructions of a normalised-pixel model: each predicted patch is "
                               "un-normalised with that patch's own mean and variance")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    titled = [ax for ax in fig.axes if ax.get_title()]
    boxes = [ax.title.get_window_extent(canvas.get_renderer()) for ax in titled]
    assert len(boxes) == 10 and LABEL_FONTSIZE >= 11
    assert all(ax.title.get_fontsize() >= 11 and ax.get_title().count("\n") <= 1 for ax in titled)
    for left, right in itertools.pairwise(boxes):
        assert left.x1 < right.x0, "column labels overlap"


def _fake_demo_run(out):
    """The files `_write_report` reads: metrics.jsonl, a reconstruction grid, the probe's and the run's config."""
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) + "\n"
                                               for s in range(1, 5)))
    Image.new("RGB", (40, 20), "white").save(out / "grid.png")
    (out / "linprobe").mkdir()
    (out / "linprobe" / "config.yaml").write_text("data:\n  path: builtin:mnist5k\n")
    (out / "config.yaml").write_text("epochs: 1\nmodel:\n  name: mae_vit_nano_patch4_28\n  depth: 3\n")
    seconds = dict.fromkeys(["linprobe", "random_init_linprobe", "raw_pixels_linear", "knn", "random_init_knn",
                             "finetune", "scratch"], 1.0)
    summary = {"linprobe_top1": 91.5, "random_init_linprobe_top1": 70.25, "raw_pixels_linear_top1": 93.0,
               "finetune_top1": 92.0, "scratch_top1": 20.0, "knn_top1": 90.0, "random_init_knn_top1": 60.0,
               "pretrain_first_epoch_loss": 0.9, "pretrain_last_epoch_loss": 0.5, "pretrain_seconds": 3.0,
               "total_seconds": 60.0, "seconds": seconds}
    summary["checks"] = {"linprobe_beats_random_init": True, "linprobe_beats_raw_pixels": False,
                         "finetune_beats_scratch": True, "loss_halved": False}
    return summary


def test_demo_report_shows_the_command_overrides_commit_config_and_the_numbers_behind_each_check(tmp_path,
                                                                                                  monkeypatch):
    """Run as `mae demo ... pretrain_overrides=[epochs=1]`, the report names that command (not `make demo`), the
    overrides, a commit line and the resolved configs, and each check gives both numbers, what passing needs and the
    10% chance level of the 10 digit classes."""
    from mae.config import load_config
    from mae.recipes.demo import DemoConfig, _write_report

    out = tmp_path / "demo"
    summary = _fake_demo_run(out)
    monkeypatch.setattr("sys.argv", ["/venv/bin/mae", "demo", "--output-dir", str(out),
                                     "pretrain_overrides=[epochs=1]"])
    cfg = load_config(DemoConfig, None, [f"output_dir={out}", "pretrain_overrides=[epochs=1]"])
    page = _write_report(out, summary, out / "grid.png", [0.75], cfg).read_text()
    assert "make demo" not in page
    assert f"mae demo --output-dir {out} &#x27;pretrain_overrides=[epochs=1]&#x27;" in page
    assert f"<td>overrides</td><td>output_dir={out} pretrain_overrides=[epochs=1]</td>" in page
    assert "commit" in page and ("not a git checkout" in page or len(page.split("commit")[1]) > 40)
    assert "pretrain_config: pretrain/demo_mnist" in page and "name: mae_vit_nano_patch4_28" in page
    assert ("A small MAE (mae_vit_nano_patch4_28: ViT encoder 128 wide, 3 blocks, MLP 2x; decoder 64 wide, 2 blocks; "
            "7 x 7 patches of 4 px)") in page  # the architecture the run's config.yaml describes, overrides included
    assert "MAE 91.5% against 70.2% top-1" in page and "chance is 10.0%" in page
    assert "MAE 91.5% against 93.0% top-1" in page and "<span class='bad'>fail</span>" in page
    assert "Last epoch 0.500 against first 0.900; passing needs at most 0.450" in page
