"""The files next to exported weights that make a directory complete for the Hugging Face tools: a
``preprocessor_config.json`` (``AutoImageProcessor.from_pretrained(directory)``) and a model card ``README.md`` with
its metadata block (architecture, pre-training data and epochs when known, license).

The preprocessor repeats this project's evaluation transform (`mae.data.eval_preprocessing`): resize the shorter
side to ``img_size / crop_pct`` (bicubic), centre-crop ``img_size``, scale to [0, 1], normalise. transformers'
`CLIPImageProcessor` does exactly these steps (with ``do_convert_rgb`` off, so 1-channel models keep grey input);
its centre crop may sit one pixel off ours on images whose sides differ by an odd number.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mae.config import RUN_INFO_KEY
from mae.data.transforms import eval_preprocessing
from mae.files import write_text
from mae.weights import is_weights_name, resolve_weights

__all__ = ["PREPROCESSOR_NAME", "README_NAME", "WEIGHTS_KEY", "model_card", "preprocessor_config", "read_run_config",
           "recorded_weights", "run_facts", "weights_facts", "weights_licence", "write_hub_metadata"]

PREPROCESSOR_NAME = "preprocessor_config.json"
README_NAME = "README.md"
PAPER = "Masked Autoencoders Are Scalable Vision Learners (He et al., 2021), https://arxiv.org/abs/2111.06377"
WEIGHTS_KEY = "weights"
"""The key of the run record (config.yaml's ``_run``) under which a run started from released weights keeps their
provenance."""
LICENSE_NOTE = ("The license of these weights depends on their pre-training data and on the checkpoint they came "
                "from (the reference MAE release is CC-BY-NC 4.0); 'unknown' until you set it (`--license`).")


def preprocessor_config(img_size: int | Sequence[int], in_chans: int, crop_pct: float | None = None,
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> dict[str, Any]:
    """``preprocessor_config.json`` for transformers' `CLIPImageProcessor` equal to our evaluation transform."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    prep = eval_preprocessing(max(h, w), in_chans, crop_pct, mean, std)
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": prep["resize"]},
        "resample": 3,  # PIL.Image.BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": h, "width": w},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(prep["mean"]),
        "image_std": list(prep["std"]),
        "do_convert_rgb": False,  # a 1-channel model reads grey images
    }


def read_run_config(path: str | Path) -> dict[str, Any]:
    """The ``config.yaml`` of the run directory `path` (or of the run directory holding the file `path`); {} when
    there is none or it cannot be read, and for a released-weights name (it has no run directory)."""
    if _names_weights(path):
        return {}
    path = Path(path)
    config = (path if path.is_dir() else path.parent) / "config.yaml"
    if not config.is_file():
        return {}
    try:
        saved = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return saved if isinstance(saved, dict) else {}


def run_facts(path: str | Path, _depth: int = 0) -> dict[str, Any]:
    """What the training run of `path` says about itself, for a model card: its data and epochs (and, for a
    classification run, those of the pre-training it started from, when that run directory is still there), and the
    released weights it started from (name, source, checksum, licence); for a released-weights name, those; {}
    outside a run directory."""
    if _names_weights(path):
        return weights_facts(resolve_weights(str(path)).provenance())
    saved = read_run_config(path)
    if not saved:
        return {}
    model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    data = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    weights = recorded_weights(saved)
    if "init" in saved and "checkpoint" in saved:  # a classification run (finetune, linprobe): its facts, its source's
        facts = {"fine-tuning data": data.get("path"), "fine-tuning epochs": saved.get("epochs"),  # type: ignore[union-attr]  # a dict (isinstance above)
                 "encoder initialisation": saved.get("init")}
        source = saved.get("checkpoint")
        if weights is None and isinstance(source, str) and _depth < 2:  # released weights: recorded, not fetched again
            facts.update(run_facts(source, _depth + 1))
    else:
        facts = {"pre-training data": data.get("path"), "pre-training epochs": saved.get("epochs"),  # type: ignore[union-attr]  # a dict (isinstance above)
                 "mask ratio": model.get("mask_ratio"), "target": model.get("target")}  # type: ignore[union-attr]  # a dict (isinstance above)
        source = saved.get("init")
        if weights is None and isinstance(source, str) and source and _depth < 2:  # continued another run: its origin
            facts.update({k: v for k, v in run_facts(source, _depth + 1).items() if k.startswith("initial weights")})
    if weights is not None:
        facts.update(weights_facts(weights))
    return {k: v for k, v in facts.items() if v is not None}


def recorded_weights(saved: Mapping[str, Any]) -> dict[str, Any] | None:
    """The released weights a run started from, as its config.yaml records them (under the run record,
    ``_run: {weights: {name, source, checksum, licence}}``); None when it started from none."""
    record = saved.get(RUN_INFO_KEY)
    weights = record.get(WEIGHTS_KEY) if isinstance(record, Mapping) else None
    return dict(weights) if isinstance(weights, Mapping) else None


def weights_facts(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Released weights' provenance as model-card lines."""
    return {"initial weights": provenance.get("name"), "initial weights source": provenance.get("source"),
            "initial weights checksum": provenance.get("checksum"),
            "initial weights licence": provenance.get("licence")}


def weights_licence(path: str | Path) -> str | None:
    """The licence of the released weights `path` is or descends from (a name, or a run -- or the run of a file --
    that recorded them, followed through its ``checkpoint`` / ``init``), as a Hub licence id (``cc-by-nc-4.0``); None
    when none is known: an export of them carries it unless the user sets another."""
    licence = str(run_facts(path).get("initial weights licence") or "")
    return licence.lower() if licence and not licence.startswith("unknown") else None


def _names_weights(path: str | Path) -> bool:
    return is_weights_name(str(path)) and not Path(str(path)).expanduser().exists()


def model_card(title: str, architecture: Mapping[str, Any], usage: str, pipeline_tag: str,
               training: Mapping[str, Any] | None = None, license: str = "unknown",
               library: str = "transformers") -> str:
    """A model card: YAML metadata (library, pipeline tag, tags, license) and what the weights are."""
    meta = {"library_name": library, "pipeline_tag": pipeline_tag, "license": license,
            "tags": ["vision", "masked-autoencoder", "mae", pipeline_tag]}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {title}", "",
             f"Exported by the `mae` library ({PAPER}).", "", "## Architecture", ""]
    lines += [f"- {k}: {v}" for k, v in architecture.items()]
    lines += ["", "## Training", ""]
    training = dict(training or {})
    if training:
        lines += [f"- {k}: {v}" for k, v in training.items()]
    else:
        lines.append("- not recorded with these weights: pre-training data and epochs unknown")
    lines += ["", "## Usage", "", "```python", usage.strip(), "```", "", "## License", "",
              f"`{license}`." + ("" if license != "unknown" else f" {LICENSE_NOTE}"), ""]
    return "\n".join(lines)


def write_hub_metadata(directory: str | Path, preprocessor: Mapping[str, Any], card: str) -> None:
    """Write ``preprocessor_config.json`` and ``README.md`` into `directory` (atomically, `mae.files`)."""
    directory = Path(directory)
    write_text(directory / PREPROCESSOR_NAME, json.dumps(dict(preprocessor), indent=2, sort_keys=True) + "\n")
    write_text(directory / README_NAME, card)
