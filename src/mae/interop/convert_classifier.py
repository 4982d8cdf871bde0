"""``mae convert`` for classifiers: a fine-tuned or linear-probe checkpoint (this project's ``mae-classifier`` files,
their run directories, exported timm files, reference / timm fine-tuned state_dicts with a ``head``) goes to timm,
transformers or the reference layout with its head intact, a probe's BatchNorm + Linear folded into one Linear.

    convert_checkpoint("runs/linprobe", "probe_timm", to="timm")   # timm.create_model("local-dir:probe_timm", ...)

`convert_checkpoint` routes: classifiers here, pre-trained MAEs to `mae.interop.convert` (whose transformers
directories then get the run's facts in their model card).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mae.errors import ConfigError, OutputError
from mae.files import check_new_file, check_output_folder
from mae.interop.classifier_export import save_hf_classifier, save_timm_classifier, to_timm_classifier_state_dict
from mae.interop.classifier_io import is_classifier_checkpoint, load_classifier
from mae.interop.hub_metadata import read_run_config, run_facts, weights_licence
from mae.interop.huggingface import HF_CONFIG_NAME, config_from_hf, write_hf_metadata
from mae.interop.loading import convert
from mae.train.checkpoint import atomic_save
from mae.train.dcp import dcp_to_file, file_to_dcp, is_dcp_checkpoint
from mae.train.run_dir import is_run_dir, resolve_run

__all__ = ["convert_checkpoint", "convert_classifier", "run_preprocessing"]


def run_preprocessing(path: str | Path) -> dict[str, Any]:
    """The normalisation and crop of the run that wrote `path` (its ``config.yaml``'s ``data`` section): ``mean``,
    ``std``, ``crop_pct`` where it set them; {} outside a run directory."""
    data = read_run_config(Path(path)).get("data")
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in ("mean", "std", "crop_pct") if data.get(k) is not None}


def convert_classifier(src: str | Path, dst: str | Path, to: str, model_name: str | None = None,
                       license: str = "unknown") -> Path:
    """Write the classifier at `src` as `to`: 'timm' (a directory, or a .safetensors / .pth file with its .json),
    'hf' (`ViTForImageClassification` directory; class-token pooling only) or 'reference' (``{'model': sd}``)."""
    if to == "mae":
        raise ConfigError(f"'{src}' is a classifier; the mae format holds a pre-trained MAE (encoder + decoder): "
                          f"convert it to timm, hf or reference")
    if to not in ("timm", "hf", "reference"):
        raise ConfigError(f"unknown format '{to}' for a classifier (valid: timm, hf, reference)")
    model, config, names = load_classifier(src, model_name=model_name, strict_name=True)
    data = run_preprocessing(src)
    dst = Path(dst)
    if to == "timm":
        return save_timm_classifier(model, dst, config, class_names=names, training=run_facts(src), license=license,
                                    **data)
    if to == "hf":
        if dst.suffix:
            raise ConfigError(f"a transformers export is a directory, got '{dst}'; drop the suffix")
        return save_hf_classifier(model, dst, config, class_names=names, training=run_facts(src), license=license,
                                  **data)
    if dst.suffix == ".safetensors":
        raise ConfigError(f"the reference format is a .pth file, got '{dst}'")
    return atomic_save({"model": to_timm_classifier_state_dict(model)}, dst)


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, model_name: str | None = None,
                       license: str = "unknown", overwrite: bool = False) -> Path:
    """What ``mae convert`` does: training checkpoints between DCP directories (fsdp runs) and single files (``to``
    'dcp' / 'checkpoint', `mae.train.dcp`), classifiers through `convert_classifier`, everything else through
    `mae.interop.convert`; a transformers MAE directory gets a model card with the source run's facts. What the user
    already has at `dst` is refused unless `overwrite` (`_check_output`)."""
    if to in ("dcp", "checkpoint"):
        _check_output(Path(dst).expanduser(), to, classifier=False, overwrite=overwrite)
        return _convert_training_checkpoint(Path(src).expanduser(), Path(dst).expanduser(), to, overwrite)
    classifier = is_classifier_checkpoint(src) if to == "timm" else None  # what a timm export writes depends on it
    _check_output(Path(dst), to, bool(classifier), overwrite)
    outputs = [Path(dst).expanduser()] + ([Path(dst).expanduser().with_suffix(".json")] if to == "timm" else [])
    new = [p for p in outputs if not p.exists()]  # what this command creates, and only that, goes on a failure
    try:
        return _convert_weights(src, dst, to, classifier, model_name, license)
    except BaseException:  # a full disk, a signal: no half-written folder (hf, timm) or sidecar of this command left
        for path in new:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink(missing_ok=True)
        raise


def _convert_weights(src: str | Path, dst: str | Path, to: str, classifier: bool | None, model_name: str | None,
                     license: str) -> Path:
    if license == "unknown":  # released weights (or a run started from them) carry their own licence
        license = weights_licence(src) or license
    if classifier is None:
        classifier = is_classifier_checkpoint(src)
    if classifier:
        return convert_classifier(src, dst, to, model_name, license)
    out = convert(src, dst, to=to, model_name=model_name)
    written = json.loads((Path(out) / HF_CONFIG_NAME).read_text()) if to == "hf" else {}
    if written.get("model_type") == "vit_mae":  # a VideoMAE directory gets no card or preprocessor yet
        write_hf_metadata(out, config_from_hf(written), run_facts(src), license, **_run_mean_std(src))
    return out


def _check_output(dst: Path, to: str, classifier: bool, overwrite: bool) -> None:
    """Before any work: a file output (and a timm file's .json) over an existing file, or a folder output (hf, dcp,
    mae / timm without a suffix) over a folder that holds anything, is refused unless `overwrite`; a file is never
    replaced by a folder. A DCP checkpoint replaces its folder whole, so `overwrite` applies to an earlier one only."""
    if not (to in ("hf", "dcp") or (to in ("mae", "timm") and not dst.suffix and (classifier or to == "mae"))):
        check_new_file(dst, overwrite)
        if to == "timm" and classifier:
            check_new_file(dst.with_suffix(".json"), overwrite)
        return
    if to == "dcp" and overwrite and dst.is_dir() and any(dst.iterdir()) and not is_dcp_checkpoint(dst):
        raise OutputError(f"'{dst}' holds files that are not a DCP checkpoint, and a DCP checkpoint replaces its "
                          f"folder whole; choose another path")
    check_output_folder(dst, "convert", overwrite)


def _convert_training_checkpoint(src: Path, dst: Path, to: str, overwrite: bool = False) -> Path:
    """A training checkpoint (the whole run state, resumable) from one layout to the other."""
    if is_run_dir(src):
        raise ConfigError(f"'{src}' is a run directory; convert one of its checkpoints (e.g. {src}/checkpoint-last or "
                          f"{src}/checkpoint-last.pth)")
    if to == "checkpoint":
        if not is_dcp_checkpoint(resolve_run(src)):
            raise ConfigError(f"--to checkpoint turns a DCP checkpoint directory (of an fsdp run) into one .pth file; "
                              f"'{src}' is not one")
        if dst.suffix != ".pth":
            raise ConfigError(f"a single-file training checkpoint is a .pth file, got '{dst}'")
        return dcp_to_file(src, dst)
    if is_dcp_checkpoint(src):
        raise ConfigError(f"'{src}' is already a DCP checkpoint; --to checkpoint makes a single file of it")
    return file_to_dcp(src, dst, overwrite=overwrite)


def _run_mean_std(path: str | Path) -> dict[str, Any]:
    data = run_preprocessing(path)
    return {k: data[k] for k in ("mean", "std") if k in data}
