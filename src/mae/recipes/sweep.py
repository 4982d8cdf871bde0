"""Ablation sweeps: ``run(SweepConfig)`` pre-trains every config of named grids, evaluates each with the linear
probe and fine-tuning (or partial fine-tuning), and writes one results table (CSV + Markdown) and plots.

The grids reproduce, at CPU scale, the directions of paper Table 1 and Figures 5, 7 and 9. Every stage of every
run writes ``summary.json`` in its own directory; a stage whose summary exists is not run again, so an interrupted
sweep resumes where it stopped. Identical pre-training configs (the default appears in most grids) run once.
The results table of an output directory accumulates: a call that runs some rows (or another seed) replaces those
rows and keeps the rest, so a study can be run in pieces. An output directory holding files that no sweep wrote is
refused unless ``overwrite`` (then it is written into; nothing of the user's is deleted).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from mae.config import load_config
from mae.errors import ConfigError, MAEError
from mae.files import atomic_write_path, check_output_folder, write_json, write_text
from mae.interop import load_model
from mae.models import model_config
from mae.recipes.pretrain import PretrainConfig
from mae.viz.reconstruction import draw_mask_sampling, load_images

log = logging.getLogger("mae")

CLI_FLAGS = {"--output-dir": "output_dir", "--grids": "grids", "--device": "device"}

# grid name -> (x-axis label, [(row label, pre-training overrides, evaluation stages)])
# An evaluation stage is "linprobe", "finetune", or "partial:K" / "partial:mlp" (paper Figure 9); "partial:0" is the
# linear probe (`mae linprobe`, the same stage as "linprobe"), as in the paper.
STANDARD = ("linprobe", "finetune")
GRIDS: dict[str, tuple[str, list[tuple[str, list[str], tuple[str, ...]]]]] = {
    "mask_ratio": ("mask ratio (Figure 5)", [
        (f"{r}%", [f"model.mask_ratio={r / 100}"], STANDARD) for r in (10, 20, 30, 40, 50, 60, 70, 75, 80, 90)]),
    "decoder_depth": ("decoder depth (Table 1a)", [
        (str(d), [f"model.decoder_depth={d}"], STANDARD) for d in (1, 2, 4, 8)]),
    "decoder_width": ("decoder width (Table 1b)", [
        (str(w), [f"model.decoder_embed_dim={w}"], STANDARD) for w in (32, 64, 128, 256)]),
    "mask_token": ("mask token (Table 1c)", [
        ("encoder w/o mask token", [], STANDARD),
        ("encoder w/ mask token", ["model.mask_in_encoder=true"], STANDARD)]),
    "target": ("reconstruction target (Table 1d)", [
        ("pixel (w/o norm)", ["model.target=pixel"], STANDARD),
        ("pixel (w/ norm)", ["model.target=norm_pixel"], STANDARD),
        ("PCA", ["model.target=pca", "model.pca_components=8"], STANDARD),
        ("HOG", ["model.target=hog"], STANDARD)]),
    "augmentation": ("data augmentation (Table 1e)", [
        ("none", ["data.augment=none"], STANDARD),
        ("crop, fixed size", ["data.augment=fixed_crop"], STANDARD),
        ("crop, rand size", ["data.augment=rrc"], STANDARD),
        ("crop + color jit", ["data.augment=rrc_jitter"], STANDARD)]),
    "mask_sampling": ("mask sampling (Table 1f)", [
        ("random 75%", ["model.mask_strategy=random", "model.mask_ratio=0.75"], STANDARD),
        ("block 50%", ["model.mask_strategy=block", "model.mask_ratio=0.5"], STANDARD),
        ("block 75%", ["model.mask_strategy=block", "model.mask_ratio=0.75"], STANDARD),
        ("grid 75%", ["model.mask_strategy=grid", "model.mask_ratio=0.75"], STANDARD)]),
    "schedule": ("pre-training epochs (Figure 7)", [
        (str(e), [f"epochs={e}"], STANDARD) for e in (5, 10, 20, 40)]),
    "partial": ("fine-tuned blocks (Figure 9)", [
        ("default", [], ("partial:0", "partial:mlp", "partial:1", "partial:2", "partial:4", "partial:6"))]),
}


@dataclass
class SweepConfig:
    """Which grids to run and the presets each stage starts from (then the per-row overrides)."""

    grids: list[str] | str = field(default_factory=lambda: ["mask_ratio"], metadata={
        "help": f"grid names ({', '.join(GRIDS)}) or all; one grid may be written without brackets"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "one run per seed for every row"})
    rows: list[str] = field(default_factory=list, metadata={
        "help": "only these rows, as grid/label (e.g. ['mask_ratio/50%', 'target/HOG']); empty: every row"})
    pretrain_config: str = field(default="pretrain/micro_mnist", metadata={
        "help": "pre-training preset: a shipped preset's name or a YAML file"})
    pretrain_overrides: list[str] = field(default_factory=list, metadata={"help": "applied to every pre-training"})
    linprobe_config: str = "linprobe/linprobe_mnist"
    linprobe_overrides: list[str] = field(default_factory=list)
    finetune_config: str = "finetune/finetune_mnist"
    finetune_overrides: list[str] = field(default_factory=list)
    partial_config: str = "finetune/partial_mnist"
    device: str = "auto"
    output_dir: str = "runs/sweep"
    overwrite: bool = field(default=False, metadata={
        "help": "write into an output_dir that holds files mae sweep did not write: files of the same names (e.g. "
                "results.csv) are replaced, no other file is touched; without it such a folder is refused"})

    def grid_names(self) -> list[str]:
        grids = [self.grids] if isinstance(self.grids, str) else list(self.grids)
        return list(GRIDS) if grids == ["all"] else grids

    def validate(self) -> None:
        unknown = [g for g in self.grid_names() if g not in GRIDS]
        if unknown:
            raise ConfigError(f"unknown grid '{unknown[0]}'; valid: {', '.join(GRIDS)} or all")
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        known = {f"{g}/{label}" for g in self.grid_names() for label, _, _ in GRIDS[g][1]}
        for wanted in self.rows:
            if wanted not in known:
                close = difflib.get_close_matches(wanted, sorted(known), n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ConfigError(f"row '{wanted}' is not in the grids {self.grid_names()}; {hint}rows are written "
                                  "grid/label, e.g. mask_ratio/50%")


def _key(preset: str, overrides: list[str]) -> str:
    """A pre-training's directory name: a hash of its resolved config, with the model resolved to the full
    architecture, so rows that spell the same config differently (each grid's default, an explicit
    ``model.mask_strategy=random``) share one run."""
    cfg = load_config(PretrainConfig, preset, overrides)
    resolved = dataclasses.asdict(cfg)
    resolved["model"] = model_config(cfg.model.name, **cfg.model.overrides()).to_dict()
    if resolved["model"]["mask_strategy"] != "block":  # no effect on the run: keep the keys of sweeps made before it
        resolved["model"].pop("mask_min_block", None)
    resolved.pop("output_dir", None)
    return hashlib.sha1(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _stage(kind: str, preset: str, overrides: list[str], out: Path) -> dict:
    """Run one pre-training / evaluation stage in this process, or read its summary if it already finished."""
    done = out / "summary.json"
    if done.exists():
        return json.loads(done.read_text())
    module = {"pretrain": "pretrain", "linprobe": "linprobe", "finetune": "finetune"}[kind]
    recipe = __import__(f"mae.recipes.{module}", fromlist=["run"])
    cls = {"pretrain": "PretrainConfig", "linprobe": "LinprobeConfig", "finetune": "FinetuneConfig"}[kind]
    extra = ["resume=auto"]  # an interrupted stage continues from its checkpoint (a finished one is reused)
    cfg = load_config(getattr(recipe, cls), preset, [*overrides, f"output_dir={out}", "progress=false", *extra])
    t0 = time.perf_counter()
    summary = recipe.run(cfg)
    summary["stage_seconds"] = time.perf_counter() - t0
    write_json(done, summary)
    return summary


def _top1(summary: dict) -> float | None:
    for key in ("best_top1", "top1", "val_top1"):
        if summary.get(key) is not None:
            return float(summary[key])
    return None


def _written_by_sweep(out: Path) -> bool:
    """A folder of an earlier sweep (which this one continues): its results table, or, for a sweep stopped in its
    first row, only pre-training folders named by `_key`."""
    try:
        with open(out / "results.csv", newline="") as f:
            if next(csv.reader(f), [])[:4] == ["grid", "axis", "row", "seed"]:
                return True
    except (OSError, UnicodeDecodeError, csv.Error):
        pass
    runs = sorted(p.name for p in (out / "pretrain").glob("*")) if (out / "pretrain").is_dir() else []
    entries = sorted(p.name for p in out.iterdir())
    return bool(runs) and entries == ["pretrain"] and all(re.fullmatch(r"[0-9a-f]{10}", name) for name in runs)


def run(cfg: SweepConfig) -> dict:
    """Run the grids; returns the paths of the results table and plots."""
    out = Path(cfg.output_dir)
    check_output_folder(out, "sweep", cfg.overwrite, own=_written_by_sweep)
    out.mkdir(parents=True, exist_ok=True)
    earlier = _read_table(out)
    rows: list[dict] = []
    for grid in cfg.grid_names():
        axis, entries = GRIDS[grid]
        for label, overrides, stages in entries:
            if cfg.rows and f"{grid}/{label}" not in cfg.rows:
                continue
            for seed in cfg.seeds:
                pre_overrides = [*cfg.pretrain_overrides, *overrides, f"seed={seed}", f"device={cfg.device}"]
                pre_dir = out / "pretrain" / _key(cfg.pretrain_config, pre_overrides)
                row = {"grid": grid, "axis": axis, "row": label, "seed": seed, "pretrain_dir": str(pre_dir)}
                try:
                    pre = _stage("pretrain", cfg.pretrain_config, pre_overrides, pre_dir)
                    row["pretrain_loss"] = pre.get("last_epoch_loss")
                    row["pretrain_seconds"] = pre.get("train_seconds")
                    row["seconds_per_epoch"] = pre["train_seconds"] / pre["epochs"] if pre.get("epochs") else None
                    checkpoint = pre.get("model_path", str(pre_dir / "model.safetensors"))
                    for stage in stages:
                        row[_column(stage)] = _evaluate(cfg, stage, checkpoint, seed, pre_dir)
                except MAEError as e:  # record and go on: one bad row must not cost the sweep
                    log.error("sweep %s / %s / seed %d failed: %s", grid, label, seed, e)
                    row["error"] = str(e)
                rows.append(row)
                _write_tables(out, _merge(earlier, rows))  # after every row: an interrupted sweep keeps its table
    rows = _merge(earlier, rows)
    if not (out / "results.csv").exists():  # nothing ran and there was no earlier table
        _write_tables(out, rows)
    plots = _plot(out, rows)
    figure6 = _mask_sampling_figure(out, rows)
    if figure6:
        plots.append(figure6)
    return {"results_csv": str(out / "results.csv"), "results_md": str(out / "results.md"), "plots": plots,
            "rows": len(rows)}


def _column(stage: str) -> str:
    if stage.startswith("partial:"):
        return f"partial_{stage.split(':')[1]}_top1"
    return f"{stage}_top1"


def _evaluate(cfg: SweepConfig, stage: str, checkpoint: str, seed: int, pre_dir: Path) -> float | None:
    common = [f"checkpoint={checkpoint}", f"seed={seed}", f"device={cfg.device}"]
    if stage == "linprobe":
        summary = _stage("linprobe", cfg.linprobe_config, [*cfg.linprobe_overrides, *common], pre_dir / "linprobe")
    elif stage == "finetune":
        summary = _stage("finetune", cfg.finetune_config, [*cfg.finetune_overrides, *common], pre_dir / "finetune")
    elif stage == "partial:0":  # Figure 9's k = 0 is the linear probe protocol: the row's linprobe stage, shared
        summary = _stage("linprobe", cfg.linprobe_config, [*cfg.linprobe_overrides, *common], pre_dir / "linprobe")
    else:
        which = stage.split(":")[1]
        extra = ["trainable_blocks=null", "mlp_only=true"] if which == "mlp" else [f"trainable_blocks={int(which)}"]
        summary = _stage("finetune", cfg.partial_config, [*cfg.finetune_overrides, *common, *extra],
                         pre_dir / f"partial_{which}")
    return _top1(summary)


_NUMERIC = ("_top1", "_loss", "_seconds", "seconds_per_epoch")  # results.csv columns read back as numbers


def _read_table(out: Path) -> list[dict]:
    """The rows of an earlier call's results.csv in this output directory (numbers parsed back), or none."""
    path = out / "results.csv"
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: dict = {}
            for k, v in r.items():
                if v in ("", None):
                    continue
                try:
                    row[k] = int(v) if k == "seed" else float(v) if k.endswith(_NUMERIC) else v
                except ValueError:
                    row[k] = v
            if row.get("grid") in GRIDS:
                rows.append(row)
    return rows


def _merge(earlier: list[dict], new: list[dict]) -> list[dict]:
    """Earlier rows not run again, plus the new ones, in grid order, then row order within the grid, then seed."""
    fresh = {(r["grid"], r["row"], r["seed"]) for r in new}
    merged = [r for r in earlier if (r["grid"], r["row"], r["seed"]) not in fresh] + list(new)
    order = {(g, label): i for i, (g, label) in enumerate((g, label) for g in GRIDS for label, _, _ in GRIDS[g][1])}
    return sorted(merged, key=lambda r: (order.get((r["grid"], r["row"]), len(order)), r["seed"]))


def _write_tables(out: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "results.csv", table.getvalue())
    lines = []
    for grid in dict.fromkeys(r["grid"] for r in rows):
        part = [r for r in rows if r["grid"] == grid]
        shown = [c for c in columns if c.endswith("_top1") and any(c in r for r in part)]
        lines += [f"### {part[0]['axis']}", "",
                  "| " + " | ".join(["setting", "seed", "loss", "s/epoch", *shown]) + " |",
                  "|" + "---|" * (4 + len(shown))]
        for r in part:
            cells = [r["row"], str(r["seed"]), _fmt(r.get("pretrain_loss"), 4), _fmt(r.get("seconds_per_epoch"), 1),
                     *(_fmt(r.get(c), 1) for c in shown)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    write_text(out / "results.md", "\n".join(lines))


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mean(values: list) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _mask_sampling_figure(out: Path, rows: list[dict]) -> str | None:
    """Paper Figure 6 from the mask-sampling grid's models (one seed): each strategy's masks and reconstructions."""
    done = {r["row"]: r for r in rows if r["grid"] == "mask_sampling" and not r.get("error")}
    if not done:
        return None
    models = [(label, load_model(str(Path(r["pretrain_dir"]) / "model.safetensors"))) for label, r in done.items()]
    data = load_config(PretrainConfig, Path(next(iter(done.values()))["pretrain_dir"]) / "config.yaml").data
    images = load_images(data.path, models[0][1], num_images=6, mean=data.mean, std=data.std)
    return str(draw_mask_sampling(models, images, out / "mask_sampling_figure6.png", data.mean, data.std))


def _series(part: list[dict]) -> tuple[list[str], dict[str, list[float]]]:
    """One grid's plot data: x tick labels and, per curve, the seed-mean top-1 at each tick. Usually x is the
    grid's rows and there is a curve per evaluation; for partial fine-tuning (Figure 9) x is the number of tuned
    blocks and there is a curve per row."""
    columns = [c for c in dict.fromkeys(k for r in part for k in r) if c.endswith("_top1")]
    labels = list(dict.fromkeys(r["row"] for r in part))
    if columns and all(c.startswith("partial_") for c in columns):
        ticks = [c.removeprefix("partial_").removesuffix("_top1") for c in columns]
        return ticks, {label: [_mean([r.get(c) for r in part if r["row"] == label]) for c in columns]
                       for label in labels}
    return labels, {c.removesuffix("_top1"): [_mean([r.get(c) for r in part if r["row"] == label]) for label in labels]
                    for c in columns}


def _plot(out: Path, rows: list[dict]) -> list[str]:
    import matplotlib  # slow to import: loaded only when the sweep draws its plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for grid in dict.fromkeys(r["grid"] for r in rows):
        part = [r for r in rows if r["grid"] == grid]
        ticks, series = _series(part)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(ticks) + 2), 3.2))
        for name, means in series.items():
            ax.plot(range(len(ticks)), means, marker="o", label=name)
        ax.set_xticks(range(len(ticks)), ticks, rotation=30 if len(ticks) > 5 else 0, fontsize=8)
        ax.set_xlabel(part[0]["axis"])
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{grid}.png"
        atomic_write_path(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"))  # type: ignore[misc]  # a default-argument lambda binds this figure
        plt.close(fig)
        paths.append(str(path))
    return paths
