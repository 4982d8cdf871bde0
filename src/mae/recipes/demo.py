"""``mae demo`` (what ``make demo`` runs): pre-train on the embedded MNIST digits, then judge the representation the
way the paper does (linear probe, fine-tuning, k-NN) next to the baselines it must beat (a randomly initialised
encoder, raw pixels, supervised training from scratch with the same budget), and write one self-contained report.

Outputs in ``output_dir`` (default runs/demo): the pre-training run itself (config.yaml, checkpoints,
model.safetensors, metrics.jsonl, loss.png, reconstructions.png), one sub-directory per evaluation, ``report.html``
and ``summary.json``.
"""

from __future__ import annotations

import html
import logging
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mae.config import load_config, save_config, to_dict
from mae.data import build_dataset, default_mean_std
from mae.errors import ConfigError, MAEError, ResumeConflictError
from mae.eval.classification import score_logits
from mae.files import write_json
from mae.interop import load_model
from mae.models import model_config
from mae.models.mae import config_fields
from mae.presets import resolve_preset
from mae.recipes import finetune, knn, linprobe, pretrain
from mae.recipes.common import run_distributed
from mae.recipes.linprobe import FeatureBatches, LinprobeConfig
from mae.train.distributed import DistInfo
from mae.train.optim import param_groups
from mae.train.run import Run
from mae.train.spec import TrainSpec, run_training
from mae.train.trainer import Best, TrainResult
from mae.version import __version__
from mae.viz.reconstruction import save_reconstructions
from mae.viz.report import Report, machine_info, plot_training_curves

log = logging.getLogger("mae")

CLI_FLAGS = {"--output-dir": "output_dir", "--device": "device"}


def _preset(name: str) -> str:
    """A shipped preset's name (e.g. 'pretrain/demo_mnist'), checked now; `load_config` finds its file from any
    working directory (`mae.presets.resolve_preset`)."""
    resolve_preset(name)  # a missing preset fails when the config is built, not after pre-training
    return name


@dataclass
class DemoConfig:
    output_dir: str = field(default="runs/demo", metadata={"help": "where the run, the report and summary go"})
    pretrain_config: str = field(default_factory=lambda: _preset("pretrain/demo_mnist"))
    linprobe_config: str = field(default_factory=lambda: _preset("linprobe/linprobe_mnist"))
    finetune_config: str = field(default_factory=lambda: _preset("finetune/finetune_mnist"))
    scratch_config: str = field(default_factory=lambda: _preset("finetune/scratch_mnist"))
    pretrain_overrides: list[str] = field(default_factory=list, metadata={"help": "e.g. ['epochs=5']"})
    eval_overrides: list[str] = field(default_factory=list, metadata={
        "help": "applied to every evaluation run (linprobe, finetune, scratch, knn), e.g. ['data.train_limit=500']"})
    probe_overrides: list[str] = field(default_factory=list, metadata={"help": "linear probes only, e.g. epochs"})
    finetune_overrides: list[str] = field(default_factory=list, metadata={"help": "fine-tune and scratch runs only"})
    mask_ratios: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.9], metadata={
        "help": "reconstruction grids (paper Figures 2 and 4)"})
    device: str = "auto"
    overwrite: bool = field(default=False, metadata={
        "help": "delete the stages of a previous demo in output_dir and run them again (default: a rerun continues "
                "or reuses the finished stages; settings that change what a stage computes are refused)"})

    RANGES: ClassVar[dict[str, str]] = {"mask_ratios": "[0, 1)"}

    def validate(self) -> None:
        if not self.mask_ratios:
            raise ConfigError("mask_ratios needs at least one ratio in [0, 1), e.g. mask_ratios=[0.75]")


_STAGES = {"pretrain": pretrain, "linprobe": linprobe, "knn": knn, "finetune": finetune}
"""The recipes the demo runs, by name."""


def _stage(module: str, cls: str, preset: str | None, overrides: list[str]) -> tuple[dict, float]:
    recipe = _STAGES[module]
    cfg = load_config(getattr(recipe, cls), preset, overrides)
    t0 = time.perf_counter()
    try:
        summary = recipe.run(cfg)
    except ResumeConflictError as e:  # a folder left by a demo of other settings (e.g. an older release's recipe)
        raise ConfigError(f"'{cfg.output_dir}' holds the {module} stage of an earlier demo made with other settings "
                          f"({e.changes}); add overwrite=true to run the demo again from the start there (its old "
                          f"stages are deleted), or give another --output-dir") from e
    return summary, time.perf_counter() - t0


def run(cfg: DemoConfig) -> dict:
    """Pre-train, evaluate, compare, report; returns the summary (also written to summary.json)."""
    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    # every stage is a run of its own: a rerun of the demo continues (or reuses) each finished stage
    common = [f"device={cfg.device}", "progress=false", "overwrite=true" if cfg.overwrite else "resume=auto"]
    pre, pre_seconds = _stage("pretrain", "PretrainConfig", cfg.pretrain_config,
                              [*cfg.pretrain_overrides, *common, f"output_dir={out}"])
    model_name = _pretrain_model_name(out)
    ev = [*cfg.eval_overrides, *common]
    probe = [*ev, *cfg.probe_overrides]
    ft = [*ev, *cfg.finetune_overrides]
    results: dict[str, tuple[dict, float]] = {
        "linprobe": _stage("linprobe", "LinprobeConfig", cfg.linprobe_config,
                           [*probe, f"checkpoint={out}", f"output_dir={out / 'linprobe'}"]),
        "random_init_linprobe": _stage("linprobe", "LinprobeConfig", cfg.linprobe_config,
                                       [*probe, "init=random", "checkpoint=null", f"model.name={model_name}",
                                        f"output_dir={out / 'linprobe_random_init'}"]),
        "knn": _stage("knn", "KnnConfig", None, [*_knn_overrides(ev), f"checkpoint={out}",
                                                 f"output_dir={out / 'knn'}"]),
        "random_init_knn": _stage("knn", "KnnConfig", None, [*_knn_overrides(ev), "init=random",
                                                             f"model.name={model_name}",
                                                             f"output_dir={out / 'knn_random_init'}"]),
        "finetune": _stage("finetune", "FinetuneConfig", cfg.finetune_config,
                           [*ft, f"checkpoint={out}", f"output_dir={out / 'finetune'}"]),
        "scratch": _stage("finetune", "FinetuneConfig", cfg.scratch_config,
                          [*ft, f"model.name={model_name}", f"output_dir={out / 'scratch'}"]),
    }
    t0 = time.perf_counter()
    raw = raw_pixel_probe(cfg.linprobe_config, [*probe, *common, f"output_dir={out / 'raw_pixels'}"])
    results["raw_pixels_linear"] = (raw, time.perf_counter() - t0)

    grids = _reconstructions(out, cfg.mask_ratios)
    summary = {
        "linprobe_top1": _top1(results["linprobe"][0]),
        "finetune_top1": _top1(results["finetune"][0]),
        "scratch_top1": _top1(results["scratch"][0]),
        "knn_top1": _top1(results["knn"][0]),
        "random_init_linprobe_top1": _top1(results["random_init_linprobe"][0]),
        "random_init_knn_top1": _top1(results["random_init_knn"][0]),
        "raw_pixels_linear_top1": _top1(results["raw_pixels_linear"][0]),
        "pretrain_first_epoch_loss": pre["first_epoch_loss"],
        "pretrain_last_epoch_loss": pre["last_epoch_loss"],
        "pretrain_seconds": pre_seconds,
        "seconds": {name: seconds for name, (_, seconds) in results.items()},
    }
    summary["checks"] = {
        "linprobe_beats_random_init": summary["linprobe_top1"] > summary["random_init_linprobe_top1"],
        "linprobe_beats_raw_pixels": summary["linprobe_top1"] > summary["raw_pixels_linear_top1"],
        "finetune_beats_scratch": summary["finetune_top1"] > summary["scratch_top1"],
        "loss_halved": pre["last_epoch_loss"] <= 0.5 * pre["first_epoch_loss"],
    }
    summary["total_seconds"] = time.perf_counter() - t_start
    write_json(out / "summary.json", {**summary, "pretrain": pre})
    report = _write_report(out, summary, grids, cfg.mask_ratios, cfg)
    return {**{k: v for k, v in summary.items() if k != "seconds"}, "report": str(report),
            "summary": str(out / "summary.json")}


def _top1(summary: dict) -> float:
    for key in ("best_top1", "top1"):
        if summary.get(key) is not None:
            return float(summary[key])
    raise ConfigError(f"an evaluation run returned no top-1: {sorted(summary)}")


def _knn_overrides(ev: list[str]) -> list[str]:
    """k-NN has no epochs or optimizer: pass on only the data and runtime overrides."""
    return [o for o in ev if o.split("=", 1)[0].split(".")[0] in ("data", "device", "precision", "seed")]


def _saved_config(out: Path) -> dict:
    return yaml.safe_load((out / "config.yaml").read_text())


def _pretrain_model_name(out: Path) -> str:
    return _saved_config(out)["model"]["name"]


# ------------------------------------------------------------------------------------------------ raw pixels
class _PixelProbe(nn.Module):
    """The probe's head (BatchNorm without affine + Linear, std 0.01) on raw pixels, flattened."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x.flatten(1)))


def raw_pixel_probe(linprobe_config: str, overrides: list[str]) -> dict:
    """A linear classifier on raw (normalised) pixels with the linear probe's head, optimizer and schedule, trained
    through the shared run layer (a run directory of its own): the floor a learned representation must clear."""
    cfg = load_config(LinprobeConfig, linprobe_config, overrides)
    return run_distributed(cfg.device, lambda dist: _raw_pixel_probe(cfg, dist))


def _raw_pixel_probe(cfg: LinprobeConfig, dist: DistInfo) -> dict:
    train = build_dataset(cfg.data.path, "train")
    val = build_dataset(cfg.data.path, "val")
    if not hasattr(train, "as_tensors"):
        raise ConfigError(f"the raw-pixel baseline needs an embedded dataset, not '{cfg.data.path}'")
    mean, std = default_mean_std(train.in_chans)  # type: ignore[attr-defined]  # ours, not torch's Dataset type
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)

    def pixels(ds) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = ds.as_tensors()
        return ((images.float() / 255 - m) / s).flatten(1), labels  # [N, C*H*W]

    (xt, yt), (xv, yv) = pixels(train), pixels(val)
    if cfg.data.train_limit:  # a seeded random subset: the embedded splits are ordered by class
        keep = torch.randperm(len(xt), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.data.train_limit]
        xt, yt = xt[keep], yt[keep]
    steps = max(1, len(xt) // cfg.batch_size)

    def build(run: Run) -> TrainSpec:
        probe = _PixelProbe(xt.shape[1], train.num_classes)  # type: ignore[attr-defined]  # ours, not torch's Dataset type
        o = cfg.optim

        @torch.no_grad()
        def evaluate(epoch: int) -> dict:
            probe.eval()
            result = score_logits(((probe(xv[i:i + 512]), yv[i:i + 512]) for i in range(0, len(xv), 512)),
                                  torch.device("cpu"))
            probe.train()
            return {"top1": result.top1}

        def summarize(result: TrainResult) -> dict:
            return {"best_top1": result.best["value"], "top1": result.history[-1]["top1"] if result.history else None,
                    "features": int(xt.shape[1])}

        return TrainSpec(model=probe, train_set=train, loader=FeatureBatches(xt, yt, cfg.batch_size, steps, cfg.seed),
                         loss_fn=lambda mod, b: F.cross_entropy(mod(b[0]), b[1]), param_groups=param_groups(probe, 0.0),
                         optimizer=o.name, optim={"base_lr": o.base_lr, "lr": o.lr, "warmup_epochs": o.warmup_epochs,
                                                  "momentum": o.momentum},
                         best=Best("top1", "max"), summarize=summarize, meta={"features": int(xt.shape[1])},
                         evaluate=evaluate)

    return run_training(cfg, dist, "classify", build)


# ------------------------------------------------------------------------------------------------ report
def _reconstructions(out: Path, ratios: list[float]) -> Path:
    saved = _saved_config(out)
    model = load_model(out)
    return save_reconstructions(model, saved["data"]["path"], out / "reconstructions_ratios.png", mask_ratios=ratios,
                                mean=saved["data"].get("mean"), std=saved["data"].get("std"), num_images=8)


def _write_report(out: Path, summary: dict, grids: Path, mask_ratios: list[float],
                  cfg: DemoConfig | None = None) -> Path:
    curves = plot_training_curves(out / "metrics.jsonl", out / "curves.png")
    provenance = report_provenance(out, cfg)
    report = Report(
        title="MAE demo: pre-training on 4,000 MNIST digits",
        intro=(f"A small MAE ({html.escape(_model_line(out))}) pre-trained with 75% random masking on the embedded "
               f"<code>builtin:mnist5k</code> training split, "
               f"then evaluated on its 1,000 held-out digits (the numbers describe the default recipe; overrides, "
               f"below, change them). Everything on this page was produced by "
               f"<code>{html.escape(provenance['command'])}</code> in {summary['total_seconds'] / 60:.1f} minutes."))
    report.add_text("Does it work?", check_lines(summary, _chance_level(out)))
    secs = summary["seconds"]
    rows = [
        ("MAE encoder, linear probe (class token, BN + linear, LARS)", summary["linprobe_top1"], secs["linprobe"]),
        ("random-init encoder, linear probe", summary["random_init_linprobe_top1"], secs["random_init_linprobe"]),
        ("raw pixels, linear probe", summary["raw_pixels_linear_top1"], secs["raw_pixels_linear"]),
        ("MAE encoder, k-NN (k = 20, cosine)", summary["knn_top1"], secs["knn"]),
        ("random-init encoder, k-NN", summary["random_init_knn_top1"], secs["random_init_knn"]),
        ("MAE, end-to-end fine-tuning", summary["finetune_top1"], secs["finetune"]),
        ("supervised from scratch, same budget", summary["scratch_top1"], secs["scratch"]),
    ]
    report.add_table("Accuracy on the 1,000 validation digits", ["protocol", "top-1 (%)", "seconds"], rows)
    report.add_image("Pre-training curves", curves,
                     f"masked-patch loss (normalised pixels) per update and the per-iteration lr schedule; "
                     f"epoch mean {summary['pretrain_first_epoch_loss']:.3f} -> "
                     f"{summary['pretrain_last_epoch_loss']:.3f} in {summary['pretrain_seconds']:.0f} s")
    ratios = ", ".join(f"{r:.0%}" for r in mask_ratios)
    report.add_image("Reconstructions (paper Figures 2 and 4)", grids,
                     f"held-out digits at {ratios} masking: masked input, reconstruction, reconstruction with the "
                     f"visible patches pasted back, original")
    report.add_table("How this page was made", ["", ""], [
        ("command", provenance["command"]), ("overrides", provenance["overrides"]),
        ("commit", provenance["commit"]), ("mae version", provenance["version"])])
    report.add_code("Resolved configuration", provenance["config"])
    info = machine_info()
    report.add_table("Machine", ["", "this run"], [(k, v) for k, v in info.items()])
    return report.write(out / "report.html")


def _model_line(out: Path) -> str:
    """The pre-trained architecture in words, from the run's config.yaml (the registered name and any field it sets)."""
    section = _saved_config(out)["model"]
    names = set(config_fields())
    c = model_config(section["name"], **{k: v for k, v in section.items() if k in names and v is not None})
    grid = " x ".join(map(str, c.grid_size))
    return (f"{section['name']}: ViT encoder {c.embed_dim} wide, {c.depth} blocks, MLP {c.mlp_ratio:g}x; decoder "
            f"{c.decoder_embed_dim} wide, {c.decoder_depth} blocks; {grid} patches of {c.patch_size} px")


def check_lines(summary: dict, chance: float | None) -> list[str]:
    """One line per check of `summary['checks']`: the claim, the measured numbers, what passing needs, the chance
    level, and the verdict (HTML; numbers only, nothing from the user)."""
    checks = summary["checks"]
    chance_text = f"; chance is {chance:.1f}%" if chance is not None else ""

    def verdict(ok: bool) -> str:
        return "<span class='ok'>pass</span>" if ok else "<span class='bad'>fail</span>"

    def versus(name: str, ours: float, theirs: float, key: str) -> str:
        return (f"{name}: {verdict(checks[key])}. MAE {ours:.1f}% against {theirs:.1f}% top-1; passing needs the MAE "
                f"number to be higher{chance_text}.")

    first, last = summary["pretrain_first_epoch_loss"], summary["pretrain_last_epoch_loss"]
    return [
        versus("MAE linear probe beats a randomly initialised encoder", summary["linprobe_top1"],
               summary["random_init_linprobe_top1"], "linprobe_beats_random_init"),
        versus("MAE linear probe beats a linear classifier on raw pixels", summary["linprobe_top1"],
               summary["raw_pixels_linear_top1"], "linprobe_beats_raw_pixels"),
        versus("Fine-tuning from MAE beats training from scratch with the same budget", summary["finetune_top1"],
               summary["scratch_top1"], "finetune_beats_scratch"),
        (f"Masked-patch loss of the last epoch is at most half of the first: {verdict(checks['loss_halved'])}. "
         f"Last epoch {last:.3f} against first {first:.3f}; passing needs at most {0.5 * first:.3f}."),
    ]


def _chance_level(out: Path) -> float | None:
    """100 / classes of the dataset the evaluations used (read from the linear probe's saved config)."""
    try:
        saved = yaml.safe_load((out / "linprobe" / "config.yaml").read_text()) or {}
        classes = getattr(build_dataset(saved["data"]["path"], "val"), "classes", None)
    except (OSError, KeyError, TypeError, yaml.YAMLError, MAEError):
        return None
    return 100.0 / len(classes) if classes else None


def report_provenance(out: Path, cfg: DemoConfig | None) -> dict[str, str]:
    """What the report says about how it was made: the command line (when run by the `mae` command), the
    overrides, the git commit of the source (when it is a checkout), the version, and the resolved configs (the
    demo's, when given, and the pre-training run's config.yaml)."""
    argv0 = Path(sys.argv[0]).name if sys.argv else ""
    if argv0 in ("mae", "__main__.py"):
        command = shlex.join(["mae", *sys.argv[1:]])
    else:
        command = "mae.recipes.demo.run(...) from Python"
    overrides: list[str] = []
    if cfg is not None:
        defaults = DemoConfig()
        shown = {k: v for k, v in to_dict(cfg).items() if v != to_dict(defaults).get(k)}
        overrides = [f"{k}=[{','.join(map(str, v))}]" if isinstance(v, list) else f"{k}={v}" for k, v in shown.items()]
    config_text = ""
    if cfg is not None:
        with tempfile.TemporaryDirectory() as tmp:
            config_text = save_config(cfg, Path(tmp) / "demo.yaml").read_text() + "\n"
    run_config = out / "config.yaml"
    if run_config.is_file():
        config_text += f"# pre-training run ({run_config})\n" + run_config.read_text()
    return {"command": command, "overrides": " ".join(overrides) or "none (the defaults)",
            "commit": source_commit(), "version": __version__, "config": config_text or "(not recorded)"}


def source_commit() -> str:
    """The git commit of the installed source tree ('+ uncommitted changes' when dirty), or why there is none."""
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
        if head.returncode != 0:
            return "not a git checkout"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "git not available"
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")
