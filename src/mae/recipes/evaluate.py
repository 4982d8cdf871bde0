"""Evaluation of a classifier: ``run(EvaluateConfig) -> summary`` (``mae evaluate``).

Top-1 / top-5 of a fine-tuned or probed classifier (a run directory, one of its checkpoints, an exported timm file,
a `ViTForImageClassification` directory or a timm / reference fine-tuned state_dict) on a labelled dataset, at its
own resolution or another one (``img_size``: position table interpolated, bicubic). Writes
``per_class_accuracy.csv``, ``confusion.png``, ``metrics.jsonl`` and ``summary.json``.

A class-subset mapping (``class_map=FILE``) evaluates on a dataset whose classes are a subset of the model's (e.g.
the 200-class ImageNet-R / ImageNet-A folders against a 1000-class model): the logits are restricted to the mapped
classes. The file has one line per dataset class, either ``<model class>`` (lines in the sorted order of the
dataset's class folders) or ``<folder name> <model class>``; a model class is an index or a class name stored with
the checkpoint. Blank lines and ``#`` comments are ignored. ``class_map=imagenet-a`` and ``class_map=imagenet-r``
name the lists shipped with the package (`CLASS_LISTS`: the WordNet ids of the 200 classes each covers and their
ImageNet-1K indices, as published with the datasets); with them the dataset must hold exactly those 200 class
folders, as the benchmarks do, so the logits are restricted to the same 200 classes as in the published protocol.

``protocol=imagenet-c`` scores an ImageNet-C tree (``data.path/<corruption>/<severity>/<class>/...``, e.g. one made
by `mae corrupt`): top-1 error per corruption and severity, the Corruption Errors normalised by AlexNet's and their
mean, the mCE of the paper's Table 13 (`mae.eval.imagenet_c`); with ``clean_data`` (or a ``clean/`` folder next to
the corruptions) also the clean error and the clean-vs-corrupted gap. Writes ``imagenet_c.csv``, ``imagenet_c.md``,
``metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from mae.config import save_config
from mae.errors import ConfigError, DataError
from mae.eval.classification import eval_loader, evaluate
from mae.eval.imagenet_c import (
    corruption_folders,
    corruption_report,
    report_csv,
    report_markdown,
    summary_fields,
)
from mae.files import atomic_write_path, check_output_folder, config_has_keys, write_json, write_text
from mae.interop.classifier_io import load_classifier
from mae.models import model_config
from mae.recipes.classify_common import ClassifyData, eval_transform, labelled_dataset, square_side
from mae.recipes.common import prepare_output_dir, run_distributed, weights_record
from mae.train.distributed import DistInfo
from mae.train.metrics_log import MetricsLogger
from mae.train.precision import resolve_precision
from mae.train.run import RunFields
from mae.train.run_dir import released_weights

log = logging.getLogger("mae")

CLI_FLAGS = {"--data": "data.path", "--output-dir": "output_dir", "--checkpoint": "checkpoint",
             "--class-map": "class_map", "--precision": "precision", "--device": "device"}
PROTOCOLS = ("top1", "imagenet-c")
CLASS_LISTS = {"imagenet-a": "imagenet_a.txt", "imagenet-r": "imagenet_r.txt"}
"""Class maps shipped in ``mae/data/class_lists/``, accepted by name as ``class_map=imagenet-a`` / ``imagenet-r``."""


@dataclass
class EvalModel:
    """The classifier's resolution and, for files that store no config, its architecture."""

    name: str | None = field(default=None, metadata={
        "help": "registered architecture for state_dicts without a config (gives the head count)"})
    img_size: int | None = field(default=None, metadata={"help": "evaluate at another resolution (bicubic pos. table)"})

    def validate(self) -> None:
        if self.img_size is not None and self.img_size < 1:
            raise ConfigError(f"model.img_size must be positive, got {self.img_size}")
        if self.name is not None:
            model_config(self.name)  # unknown names raise with a suggestion


@dataclass
class EvaluateConfig(RunFields):
    """What to evaluate, on which images."""

    output_dir: str = field(default="runs/evaluate", metadata={"help": "CSV, PNG, metrics and summary go here"})
    model: EvalModel = field(default_factory=EvalModel)

    checkpoint: str | None = field(default=None, metadata={
        "help": "a finetune / linprobe run directory or checkpoint, an exported timm file, a transformers "
                "ViTForImageClassification directory, a timm / reference fine-tuned state_dict, or released weights by "
                "name (official:mae_finetuned_vit_base: ImageNet-1k class names included) (required)"})
    data: ClassifyData = field(default_factory=lambda: ClassifyData(val_fraction=0.0), metadata={
        "help": "the images to score; a folder without val/ is scored whole (data.val_fraction=0)"})
    protocol: str = field(default="top1", metadata={
        "help": "top1 (one labelled folder) | imagenet-c (data.path holds <corruption>/<severity>/<class>/: mCE)"})
    clean_data: str | None = field(default=None, metadata={
        "help": "imagenet-c: the clean validation folder, for the clean-vs-corrupted gap (default: data.path/clean "
                "when present)"})
    split: str = field(default="val", metadata={"help": "train | val (a folder's val/ sub-folder, else the folder)"})
    class_map: str | None = field(default=None, metadata={
        "help": "imagenet-a | imagenet-r (the shipped 200-class lists) or a file mapping each dataset class to a "
                "model class (index or name), one line per class"})
    use_ema: bool | None = field(default=None, metadata={
        "help": "use the run's EMA weights (default: when they scored best)"})
    batch_size: int = field(default=128, metadata={"help": "images per forward pass"})
    overwrite: bool = field(default=False, metadata={
        "help": "write into an output_dir that holds files mae evaluate did not write: files of the same names are "
                "replaced, nothing else is touched; without it such a folder is refused"})

    def validate(self) -> None:
        super().validate()
        if not self.checkpoint:
            raise ConfigError("evaluate needs checkpoint=<run directory or classifier checkpoint> (or --checkpoint)")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol '{self.protocol}' is not one of {', '.join(PROTOCOLS)}")
        if self.class_map is not None and not Path(self.class_map).expanduser().exists() \
                and _named_list(self.class_map) is None:
            raise ConfigError(f"class_map '{self.class_map}' is neither a file nor a shipped list "
                              f"({', '.join(CLASS_LISTS)})")
        if self.split not in ("train", "val"):
            raise ConfigError(f"split '{self.split}' is not one of train, val")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")


def _named_list(name: str | Path) -> str | None:
    """The shipped list's key for ``imagenet-a`` / ``imagenet_r`` / ``ImageNet-R`` (any case, - or _), else None."""
    key = str(name).strip().lower().replace("_", "-")
    return key if key in CLASS_LISTS else None


def class_list_path(name: str) -> Path:
    """The file of a shipped class list (`CLASS_LISTS`), inside the installed package."""
    key = _named_list(name)
    if key is None:
        raise ConfigError(f"no shipped class list '{name}'; valid: {', '.join(CLASS_LISTS)}")
    return Path(str(resources.files("mae.data").joinpath("class_lists", CLASS_LISTS[key])))  # type: ignore[call-arg]  # an installed package: a pathlib.Path, whose joinpath takes several parts


def read_class_map(path: str | Path, dataset_classes: Sequence[str], model_classes: Sequence[str] | None,
                   num_model_classes: int) -> torch.Tensor:
    """Model class index of each dataset class, from a class-map file or a shipped list's name (see the module
    docstring)."""
    named = _named_list(path) if not Path(path).expanduser().exists() else None
    path = class_list_path(named) if named else Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read class map '{path}': {e.strerror or e}") from None
    rows = [ln.split("#", 1)[0].split() for ln in lines]
    rows = [r for r in rows if r]
    if any(len(r) > 2 for r in rows):
        bad = next(r for r in rows if len(r) > 2)
        raise DataError(f"class map '{path}': line '{' '.join(bad)}' has more than two fields; write "
                        f"'<model class>' or '<folder name> <model class>' per line")
    if named and sorted(dataset_classes) != sorted(r[0] for r in rows):
        listed = {r[0] for r in rows}
        missing, extra = sorted(listed - set(dataset_classes)), sorted(set(dataset_classes) - listed)
        raise DataError(f"class_map={named} covers {len(listed)} classes but the dataset has {len(dataset_classes)} "
                        f"class folders ({len(missing)} listed ones missing, e.g. {missing[:2]}; {len(extra)} not "
                        f"listed, e.g. {extra[:2]}); give the {named} folder with its {len(listed)} WordNet-id "
                        f"folders, or a class_map file for a subset")
    if rows and all(len(r) == 2 for r in rows):
        by_folder = dict(rows)
        missing = [c for c in dataset_classes if c not in by_folder]
        if missing:
            raise DataError(f"class map '{path}' has no line for the dataset class(es) {missing[:4]}; add "
                            f"'<folder name> <model class>' lines for them")
        targets = [by_folder[c] for c in dataset_classes]
    elif all(len(r) == 1 for r in rows):
        if len(rows) != len(dataset_classes):
            raise DataError(f"class map '{path}' has {len(rows)} lines but the dataset has {len(dataset_classes)} "
                            f"classes; write one line per class folder, in sorted folder order")
        targets = [r[0] for r in rows]
    else:
        raise DataError(f"class map '{path}' mixes one-field and two-field lines; use one form throughout")
    names = {n: i for i, n in enumerate(model_classes or [])}
    index = []
    for target in targets:
        if target.lstrip("-").isdigit():
            i = int(target)
        elif target in names:
            i = names[target]
        else:
            raise DataError(f"class map '{path}': '{target}' is neither a class index nor a class name of the model"
                            + (f" (names: {', '.join(list(names)[:5])}, ...)" if names else " (it stores no names)"))
        if not 0 <= i < num_model_classes:
            raise DataError(f"class map '{path}': class index {i} is outside the model's 0..{num_model_classes - 1}")
        index.append(i)
    if len(set(index)) != len(index):
        raise DataError(f"class map '{path}' maps two dataset classes to the same model class")
    return torch.tensor(index, dtype=torch.long)


def class_index_for(dataset_classes: Sequence[str], model_classes: Sequence[str] | None, num_model_classes: int,
                    class_map: str | None = None) -> torch.Tensor | None:
    """How dataset classes map to model outputs: a class-map file, else by the stored class names, else identity
    (None) when the counts agree."""
    if class_map:
        return read_class_map(class_map, dataset_classes, model_classes, num_model_classes)
    if model_classes and list(dataset_classes) == list(model_classes):
        return None
    if model_classes and set(dataset_classes) <= set(model_classes):
        names = {n: i for i, n in enumerate(model_classes)}
        return torch.tensor([names[c] for c in dataset_classes], dtype=torch.long)
    if len(dataset_classes) == num_model_classes:
        return None
    raise DataError(f"the dataset has {len(dataset_classes)} classes and the model {num_model_classes}, and the class "
                    f"names do not tell how they match; pass class_map=<file> (one model class per dataset class)")


def save_confusion_png(confusion: torch.Tensor, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (true class down, predicted class across)."""
    from matplotlib.figure import Figure  # heavy to import: loaded only when a figure is drawn

    cm = confusion.double()
    rates = cm / cm.sum(dim=1, keepdim=True).clamp_min(1)
    n = len(class_names)
    side = min(max(4.0, 0.35 * n + 2), 16.0)
    fig = Figure(figsize=(side, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 40:
        ax.set_xticks(range(n), labels=list(class_names), rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels=list(class_names), fontsize=7)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    if cm[i, j] > 0:
                        ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,  # type: ignore[arg-type]  # matplotlib formats any value as text
                                color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return atomic_write_path(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def write_per_class_csv(confusion: torch.Tensor, class_names: Sequence[str], model_index: Sequence[int],
                        path: Path) -> Path:
    """One row per dataset class: its name, model class index, images, correct (top-1) and accuracy in percent."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["class", "model_class", "images", "correct", "top1"])
    for i, name in enumerate(class_names):
        total = int(confusion[i].sum())
        correct = int(confusion[i, i])
        writer.writerow([name, int(model_index[i]), total, correct, f"{100.0 * correct / total:.2f}" if total else ""])
    return write_text(path, buffer.getvalue())


def _written_by_evaluate(folder: Path) -> bool:
    """A folder of an earlier `mae evaluate` (its config.yaml): a rerun writes the same files into it."""
    return config_has_keys(folder, {"checkpoint", "protocol", "class_map"})


def _weights(checkpoint: str | None) -> dict[str, Any]:
    """The provenance of the released weights `checkpoint` names (name, source, checksum, licence), as the summary
    and config.yaml's run record keep it; {} for a path. Read from the cache `load_classifier` filled."""
    weights = released_weights(checkpoint) if checkpoint else None
    return weights.provenance() if weights is not None else {}


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate a classifier; returns top-1 / top-5 and the paths of what it wrote."""
    check_output_folder(cfg.output_dir, "evaluate", cfg.overwrite, own=_written_by_evaluate)
    return run_distributed(cfg.device, lambda dist: _run(cfg, dist))


def _run(cfg: EvaluateConfig, dist: DistInfo) -> dict[str, Any]:
    if cfg.protocol == "imagenet-c":
        return _run_imagenet_c(cfg, dist)
    device = dist.device
    precision = resolve_precision(cfg.precision, device)
    out = prepare_output_dir(cfg.output_dir)
    t0 = time.perf_counter()
    model, ccfg, names = load_classifier(cfg.checkpoint, img_size=cfg.model.img_size, use_ema=cfg.use_ema,  # type: ignore[arg-type]  # validate() requires it
                                         model_name=cfg.model.name)
    model.to(device)
    tf = eval_transform(cfg.data, square_side(ccfg), ccfg.in_chans)
    limit = cfg.data.val_limit if cfg.split == "val" else cfg.data.train_limit
    dataset, classes = labelled_dataset(cfg.data, cfg.split, tf, ccfg.in_chans, limit)
    index = class_index_for(classes, names, ccfg.num_classes, cfg.class_map)
    loader = eval_loader(dataset, cfg.batch_size, cfg.data.num_workers, dist)
    result = evaluate(model, loader, device, precision, class_index=index, confusion_classes=len(classes))
    seconds = time.perf_counter() - t0
    model_index = index.tolist() if index is not None else list(range(len(classes)))
    many = len(classes) > 5  # top-5 of 5 classes or fewer is always 100%: not shown
    summary: dict[str, Any] = {
        "top1": result.top1, **({"top5": result.top5} if many else {}), "best_top1": result.top1, "loss": result.loss,
        "images": result.count, "classes": len(classes), "model_classes": ccfg.num_classes,
        "img_size": ccfg.img_size if isinstance(ccfg.img_size, int) else list(ccfg.img_size),
        "checkpoint": str(cfg.checkpoint), "seconds": seconds, "output_dir": str(out)}
    weights = _weights(cfg.checkpoint)
    if weights:
        summary["weights"] = weights
    if dist.is_main:
        save_config(cfg, out / "config.yaml", run_info=weights_record(weights))
        assert result.confusion is not None
        summary["per_class_csv"] = str(write_per_class_csv(result.confusion, classes, model_index,
                                                           out / "per_class_accuracy.csv"))
        summary["confusion_png"] = str(save_confusion_png(
            result.confusion, classes, out / "confusion.png",
            title=f"{Path(str(cfg.checkpoint)).name}: top-1 {result.top1:.2f}%"))
        with MetricsLogger(out, tensorboard=False) as logger:
            logger.log({"epoch": 0, "step": 0, "top1": result.top1, **({"top5": result.top5} if many else {}),
                        "loss": result.loss, "images": result.count})
        write_json(out / "summary.json", summary)
    log.info("top-1 %.2f%%%s on %d images (%d classes)", result.top1,
             f", top-5 {result.top5:.2f}%" if many else "", result.count, len(classes))
    return summary


def _run_imagenet_c(cfg: EvaluateConfig, dist: DistInfo) -> dict[str, Any]:
    """Score every ``<corruption>/<severity>`` folder of ``data.path`` (and the clean set), then CE / mCE."""
    device = dist.device
    precision = resolve_precision(cfg.precision, device)
    out = prepare_output_dir(cfg.output_dir)
    t0 = time.perf_counter()
    folders = corruption_folders(cfg.data.path)
    model, ccfg, names = load_classifier(cfg.checkpoint, img_size=cfg.model.img_size, use_ema=cfg.use_ema,  # type: ignore[arg-type]  # validate() requires it
                                         model_name=cfg.model.name)
    model.to(device)
    tf = eval_transform(cfg.data, square_side(ccfg), ccfg.in_chans)
    index, reference_classes = None, None

    def top1_error(folder: Path | str, what: str) -> tuple[float, int]:
        nonlocal index, reference_classes
        data = dataclasses.replace(cfg.data, path=str(folder))
        dataset, classes = labelled_dataset(data, "val", tf, ccfg.in_chans, cfg.data.val_limit)
        if reference_classes is None:
            reference_classes = classes
            index = class_index_for(classes, names, ccfg.num_classes, cfg.class_map)
        elif classes != reference_classes:
            raise DataError(f"'{folder}' ({what}) has other class folders than '{first}' ({len(classes)} vs "
                            f"{len(reference_classes)}); every corruption and severity needs the same classes")
        result = evaluate(model, eval_loader(dataset, cfg.batch_size, cfg.data.num_workers, dist), device, precision,
                          class_index=index)
        log.info("%s: top-1 %.2f%% on %d images", what, result.top1, result.count)
        return 100.0 - result.top1, result.count

    first = next(iter(next(iter(folders.values())).values()))
    errors: dict[str, dict[int, float]] = {}
    images: dict[str, dict[int, int]] = {}
    for name, by_severity in folders.items():
        for severity, folder in by_severity.items():
            error, count = top1_error(folder, f"{name} severity {severity}")
            errors.setdefault(name, {})[severity] = error
            images.setdefault(name, {})[severity] = count
    clean = cfg.clean_data or (str(Path(cfg.data.path) / "clean") if (Path(cfg.data.path) / "clean").is_dir()
                               else None)
    clean_error = top1_error(clean, "clean")[0] if clean else None
    report = corruption_report(errors, clean_error, images)
    summary: dict[str, Any] = {
        "protocol": "imagenet-c", **summary_fields(report), "clean_data": clean,
        "images": sum(sum(v.values()) for v in images.values()), "classes": len(reference_classes or []),
        "checkpoint": str(cfg.checkpoint), "seconds": time.perf_counter() - t0, "output_dir": str(out)}
    weights = _weights(cfg.checkpoint)
    if weights:
        summary["weights"] = weights
    if dist.is_main:
        save_config(cfg, out / "config.yaml", run_info=weights_record(weights))
        summary["csv"] = str(write_text(out / "imagenet_c.csv", report_csv(report)))
        summary["markdown"] = str(write_text(out / "imagenet_c.md", report_markdown(
            report, f"ImageNet-C: {Path(str(cfg.checkpoint)).name}")))
        with MetricsLogger(out, tensorboard=False) as logger:
            logger.log({"epoch": 0, "step": 0, "mCE": report.mce, "mean_corrupted_error": report.mean_error,
                        **({"clean_error": clean_error} if clean_error is not None else {})})
        write_json(out / "summary.json", summary)
    log.info("ImageNet-C: mCE %.2f over %d corruption(s)%s", report.mce, len(report.ce),
             "" if report.complete else " (a subset: not comparable with published values)")
    return summary
