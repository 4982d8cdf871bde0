"""`mae sweep` on a two-config grid, and the demo's raw-pixel baseline (the full demo runs in `make demo`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mae.config import load_config
from mae.errors import ConfigError
from mae.recipes.sweep import GRIDS, SweepConfig, _key, _series, run

TINY_PRETRAIN = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=32",
                 "model.decoder_depth=1", "model.decoder_num_heads=2", "data.train_limit=128", "data.num_workers=0",
                 "epochs=1", "batch_size=32", "save_every=1", "visualize=false", "precision=fp32"]
TINY_EVAL = ["data.train_limit=128", "data.val_limit=64", "data.num_workers=0", "epochs=1", "batch_size=32",
             "precision=fp32"]


def test_sweep_runs_a_two_config_grid_and_resumes(tmp_path):
    """The mask-token grid (Table 1c) pre-trains both rows, probes and fine-tunes each, writes CSV + Markdown +
    plot; a second call reuses every finished stage instead of running it again."""
    cfg = load_config(SweepConfig, None, [
        "grids=[mask_token]", f"output_dir={tmp_path}", "device=cpu",
        f"pretrain_overrides=[{','.join(TINY_PRETRAIN)}]", f"linprobe_overrides=[{','.join(TINY_EVAL)}]",
        f"finetune_overrides=[{','.join(TINY_EVAL)}]"])
    summary = run(cfg)
    rows = list(csv.DictReader(Path(summary["results_csv"]).read_text().splitlines()))
    assert [r["row"] for r in rows] == ["encoder w/o mask token", "encoder w/ mask token"]
    for r in rows:
        assert "error" not in r or not r["error"], r.get("error")
        assert 0 <= float(r["linprobe_top1"]) <= 100 and 0 <= float(r["finetune_top1"]) <= 100
        assert float(r["seconds_per_epoch"]) > 0
    assert "mask token" in Path(summary["results_md"]).read_text()
    assert all(Path(p).is_file() for p in summary["plots"])

    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")}
    assert len(stamps) == 6  # 2 pre-trainings x (pretrain, linprobe, finetune)
    run(cfg)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")} == stamps


def test_sweep_draws_figure_6_from_the_mask_sampling_grid(tmp_path):
    """Random and grid masking rows: both are probed, and the sweep draws their masks and reconstructions side by
    side (paper Figure 6)."""
    cfg = load_config(SweepConfig, None, [
        "grids=[mask_sampling]", "rows=['mask_sampling/random 75%','mask_sampling/grid 75%']",
        f"output_dir={tmp_path}", "device=cpu", f"pretrain_overrides=[{','.join(TINY_PRETRAIN)}]",
        f"linprobe_overrides=[{','.join(TINY_EVAL)}]", f"finetune_overrides=[{','.join(TINY_EVAL)}]"])
    summary = run(cfg)
    figure = tmp_path / "mask_sampling_figure6.png"
    assert str(figure) in summary["plots"] and figure.stat().st_size > 10_000
    rows = list(csv.DictReader(Path(summary["results_csv"]).read_text().splitlines()))
    assert [r["row"] for r in rows] == ["random 75%", "grid 75%"] and all(r["linprobe_top1"] for r in rows)


def test_sweep_rejects_an_unknown_grid():
    """A misspelt grid name is a config error naming the valid grids; 'all' and a single grid need no brackets."""
    with pytest.raises(ConfigError, match="mask_ratio"):
        load_config(SweepConfig, None, ["grids=[mask_ratios]"])
    with pytest.raises(ConfigError, match="mask_ratio"):
        load_config(SweepConfig, None, ["grids=mask_ratios"])
    assert load_config(SweepConfig, None, ["grids=all"]).grid_names() == \
        load_config(SweepConfig, None, ["grids=[all]"]).grid_names() == list(GRIDS)
    assert load_config(SweepConfig, None, ["grids=target"]).grid_names() == ["target"]


def test_sweep_runs_only_the_chosen_rows(tmp_path):
    """rows=[grid/label] restricts the grids to those rows; rows of different grids that resolve to the same
    pre-training config (each grid's default) share one run; a misspelt row is refused with a suggestion."""
    cfg = load_config(SweepConfig, None, [
        "grids=[mask_ratio,target]", "rows=['mask_ratio/75%','target/pixel (w/ norm)']", f"output_dir={tmp_path}",
        "device=cpu",
        f"pretrain_overrides=[{','.join(TINY_PRETRAIN)}]", f"linprobe_overrides=[{','.join(TINY_EVAL)}]",
        f"finetune_overrides=[{','.join(TINY_EVAL)}]"])
    rows = list(csv.DictReader(Path(run(cfg)["results_csv"]).read_text().splitlines()))
    assert [r["row"] for r in rows] == ["75%", "pixel (w/ norm)"]
    assert rows[0]["pretrain_dir"] == rows[1]["pretrain_dir"] and len(list((tmp_path / "pretrain").iterdir())) == 1
    # spelt out explicitly, the default strategy and ratio are still the same run
    assert _key("pretrain/demo_mnist", ["model.mask_strategy=random", "model.mask_ratio=0.75"]) == \
        _key("pretrain/demo_mnist", ["epochs=40"])
    assert _key("pretrain/demo_mnist", ["model.mask_ratio=0.5"]) != \
        _key("pretrain/demo_mnist", [])
    with pytest.raises(ConfigError, match="did you mean 'mask_ratio/50%'"):
        load_config(SweepConfig, None, ["grids=[mask_ratio]", "rows=[mask_ratio/50]"])


def test_sweep_table_accumulates_rows_run_in_pieces(tmp_path):
    """Calls that run different rows into one output directory build one table, in grid order; running a row
    again replaces it instead of adding a duplicate."""
    common = ["grids=[mask_ratio]", f"output_dir={tmp_path}", "device=cpu",
              f"pretrain_overrides=[{','.join(TINY_PRETRAIN)}]", f"linprobe_overrides=[{','.join(TINY_EVAL)}]",
              f"finetune_overrides=[{','.join(TINY_EVAL)}]"]
    run(load_config(SweepConfig, None, [*common, "rows=['mask_ratio/75%']"]))
    summary = run(load_config(SweepConfig, None, [*common, "rows=['mask_ratio/50%']"]))
    run(load_config(SweepConfig, None, [*common, "rows=['mask_ratio/75%']"]))
    rows = list(csv.DictReader(Path(summary["results_csv"]).read_text().splitlines()))
    assert [(r["row"], r["seed"]) for r in rows] == [("50%", "0"), ("75%", "0")]
    assert all(float(r["linprobe_top1"]) >= 0 and float(r["pretrain_loss"]) > 0 for r in rows)
    assert "| 50% | 0 |" in (tmp_path / "results.md").read_text()


def test_sweep_partial_grid_tunes_the_last_blocks(tmp_path):
    """The Figure 9 grid fine-tunes the last MLP / 1 / 2 / 4 / 6 blocks of one pre-trained encoder, each its own
    stage (the MLP-only stage clears the preset's trainable_blocks); k = 0 is the linear probe, run by `mae linprobe`
    into the row's linprobe stage."""
    cfg = load_config(SweepConfig, None, [
        "grids=[partial]", f"output_dir={tmp_path}", "device=cpu",
        f"pretrain_overrides=[{','.join([*TINY_PRETRAIN, 'model.depth=6'])}]",
        f"finetune_overrides=[{','.join(TINY_EVAL)}]"])
    (row,) = csv.DictReader(Path(run(cfg)["results_csv"]).read_text().splitlines())
    assert not row.get("error"), row["error"]
    for k in ("0", "mlp", "1", "2", "4", "6"):
        assert 0 <= float(row[f"partial_{k}_top1"]) <= 100
    probe = json.loads((Path(row["pretrain_dir"]) / "linprobe" / "summary.json").read_text())
    assert probe["protocol"].startswith("linear probe") and float(row["partial_0_top1"]) == probe["best_top1"]
    assert not (Path(row["pretrain_dir"]) / "partial_0").exists()
    assert (tmp_path / "partial.png").is_file()


def test_sweep_plots_seed_means_and_figure_9_over_tuned_blocks():
    """A grid's plot averages seeds per row, one curve per evaluation; the partial fine-tuning grid is drawn like
    paper Figure 9: x is the number of tuned blocks, one curve per row."""
    rows = [{"row": "30%", "seed": 0, "linprobe_top1": 80.0, "finetune_top1": 90.0},
            {"row": "30%", "seed": 1, "linprobe_top1": 82.0, "finetune_top1": None},
            {"row": "75%", "seed": 0, "linprobe_top1": 70.0, "finetune_top1": 91.0}]
    assert _series(rows) == (["30%", "75%"], {"linprobe": [81.0, 70.0], "finetune": [90.0, 91.0]})
    partial = [{"row": "default", "seed": s, "partial_0_top1": 60.0 + s, "partial_mlp_top1": 70.0,
                "partial_1_top1": 80.0} for s in (0, 1)]
    assert _series(partial) == (["0", "mlp", "1"], {"default": [60.5, 70.0, 80.0]})


def test_raw_pixel_baseline_learns_digits(tmp_path):
    """The demo's raw-pixel linear classifier (the probe's BN + linear head on pixels) is far above chance on
    MNIST after a few epochs: a floor the learned representation is compared against."""
    from mae.recipes.demo import _preset, raw_pixel_probe

    result = raw_pixel_probe(_preset("linprobe/linprobe_mnist.yaml"), [
        "epochs=20", "optim.warmup_epochs=1", "optim.name=sgd", "optim.lr=0.5", "data.train_limit=1000",
        f"output_dir={tmp_path}", "progress=false"])
    assert result["features"] == 28 * 28
    assert result["best_top1"] > 70


def test_a_demo_folder_of_other_settings_is_refused_with_the_demo_s_own_fix(tmp_path):
    """A demo rerun into a folder whose pre-training stage was made with other settings (an older release's recipe)
    stops before training with one error naming the changed settings and `overwrite=true`; nothing is overwritten."""
    from mae.recipes.demo import _stage

    out = tmp_path / "demo"
    common = [*TINY_PRETRAIN, "model.name=mae_vit_micro_patch4_28", "device=cpu", "progress=false", "resume=auto",
              f"output_dir={out}"]
    _stage("pretrain", "PretrainConfig", "pretrain/demo_mnist", common)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigError, match=r"model\.depth 2 -> 3.*overwrite=true") as caught:
        _stage("pretrain", "PretrainConfig", "pretrain/demo_mnist", [*common, "model.depth=3"])
    assert "--allow-config-change" not in str(caught.value)
    assert sorted(p.name for p in out.iterdir()) == before
