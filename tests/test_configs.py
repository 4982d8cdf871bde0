"""Every shipped YAML preset loads into its recipe's config dataclass and passes validation."""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import pytest
import yaml

from mae.config import load_config, to_dict
from mae.errors import ConfigError
from mae.presets import PRESETS_DIR

CONFIGS = PRESETS_DIR
# configs/<folder>/ -> the recipe config class that reads it
CLASSES = {
    "pretrain": "mae.recipes.pretrain.PretrainConfig",
    "finetune": "mae.recipes.finetune.FinetuneConfig",
    "linprobe": "mae.recipes.linprobe.LinprobeConfig",
    "detect": "mae.recipes.detect.DetectConfig",
    "segment": "mae.recipes.segment.SegmentConfig",
    "sweep": "mae.recipes.sweep.SweepConfig",
    "evaluate": "mae.recipes.evaluate.EvaluateConfig",
}
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml"))
# what a user adds on the command line to a preset that leaves the weights to start from open (--checkpoint)
COMMAND_LINE = {"finetune": ["checkpoint=weights.pth"], "evaluate": ["checkpoint=weights.pth"],
                "linprobe": ["checkpoint=weights.pth"], "detect": ["backbone.checkpoint=weights.pth"],
                "segment": ["backbone.checkpoint=weights.pth"]}


def _class_for(path: Path):
    folder = path.relative_to(CONFIGS).parts[0]
    module, _, name = CLASSES[folder].rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_config_folder_has_a_reader():
    """No preset folder is left without a config class (a new folder must be added to CLASSES)."""
    assert PRESETS, "no presets found"
    assert {p.relative_to(CONFIGS).parts[0] for p in PRESETS} <= set(CLASSES)


@pytest.mark.parametrize("path", PRESETS, ids=[str(p.relative_to(CONFIGS)) for p in PRESETS])
def test_preset_loads_and_validates(path, monkeypatch):
    """The preset parses, every key is known, every value has the right type and passes validate() (given the
    checkpoint a user passes on the command line when the preset leaves it open), and every value the file sets is
    the loaded config's value (nothing dropped, moved or left at its default), on a machine with CPUs enough for its
    worker count (a smaller one lowers it: tests/test_preset_workers.py)."""
    from mae import threads

    monkeypatch.setattr(threads, "usable_cpus", lambda: 64)
    cls = _class_for(path)
    try:
        cfg = load_config(cls, path)
    except ConfigError as e:  # only a missing start checkpoint may be left to the command line
        assert "checkpoint" in str(e), e
        cfg = load_config(cls, path, COMMAND_LINE[path.relative_to(CONFIGS).parts[0]])
    written = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(written, dict) and written, "an empty preset"
    mismatches = _differences(written, to_dict(cfg))
    assert not mismatches, mismatches


def _differences(written, loaded, where: str = "") -> list[str]:
    """Where a value the YAML sets differs from the loaded config's (a key the config lacks included); a number
    written as text ("1e-3": YAML reads it as a string) counts as that number."""
    if isinstance(written, dict):
        if not isinstance(loaded, dict):
            return [f"{where}: a section in the file, {loaded!r} in the config"]
        return [d for k, v in written.items() for d in (
            _differences(v, loaded[k], f"{where}{k}.") if k in loaded else [f"{where}{k}: not in the config"])]
    if isinstance(written, list) and isinstance(loaded, list) and len(written) == len(loaded):
        return [d for i, (a, b) in enumerate(zip(written, loaded, strict=True))
                for d in _differences(a, b, f"{where}{i}.")]
    if isinstance(written, str) and isinstance(loaded, (int, float)) and not isinstance(loaded, bool):
        with contextlib.suppress(ValueError):
            written = float(written)
    same = written is loaded if isinstance(written, bool) or isinstance(loaded, bool) else written == loaded
    return [] if same else [f"{where.rstrip('.')}: {written!r} in the file, {loaded!r} loaded"]


def test_paper_pretraining_presets_match_table_8():
    """ViT-B/L/H presets: effective batch 4096 on 8 processes, base lr 1.5e-4, wd 0.05, betas (0.9, 0.95),
    40 warm-up epochs, 75% masking, random-resized crops."""
    from mae.recipes.pretrain import PretrainConfig

    for path in sorted((CONFIGS / "pretrain").glob("vit_*ep.yaml")):
        cfg = load_config(PretrainConfig, path)
        assert cfg.batch_size * cfg.accum_iter * 8 == 4096, path.name
        assert (cfg.optim.base_lr, cfg.optim.weight_decay, tuple(cfg.optim.betas)) == (1.5e-4, 0.05, (0.9, 0.95))
        assert cfg.optim.warmup_epochs == 40 and cfg.model.mask_ratio == 0.75 and cfg.data.augment == "rrc"
        assert cfg.epochs == int(path.stem.split("_")[-1].removesuffix("ep"))


def test_finetune_presets_ship_the_paper_and_the_release_recipes():
    """Table 9 presets (vit_{b,l,h}) and the release's (vit_{b,l,h}_release) differ exactly where the release did:
    ViT-B base lr 5e-4 + layer decay 0.65, drop path 0.2 (L) / 0.3 (H); each file names the numbers it reproduces.
    The 448-px ViT-H preset fine-tunes at 448 and evaluates with crop fraction 1.0 (resize 448, crop 448)."""
    from mae.recipes.evaluate import EvaluateConfig
    from mae.recipes.finetune import FinetuneConfig

    def load(name):
        return load_config(FinetuneConfig, CONFIGS / "finetune" / name, ["checkpoint=x"])

    recipes = {"b": ((1e-3, 0.75, 0.1), (5e-4, 0.65, 0.1)), "l": ((1e-3, 0.75, 0.1), (1e-3, 0.75, 0.2)),
               "h": ((1e-3, 0.75, 0.2), (1e-3, 0.75, 0.3))}
    for size, (paper, release) in recipes.items():
        for name, want, quoted in ((f"vit_{size}.yaml", paper, "Table 9"),
                                   (f"vit_{size}_release.yaml", release, "Reproduces the release")):
            cfg = load(name)
            assert (cfg.optim.base_lr, cfg.optim.layer_decay, cfg.model.drop_path) == want, name
            assert cfg.batch_size * cfg.accum_iter * (1024 // (cfg.batch_size * cfg.accum_iter)) == 1024
            assert quoted in (CONFIGS / "finetune" / name).read_text()
    h448 = load("vit_h_448.yaml")
    assert (h448.model.img_size, h448.data.crop_pct, h448.model.drop_path) == (448, 1.0, 0.3)
    ev = load_config(EvaluateConfig, CONFIGS / "evaluate" / "vit_h_448.yaml", ["checkpoint=x"])
    assert (ev.model.img_size, ev.data.crop_pct) == (448, 1.0)
