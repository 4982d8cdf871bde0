"""Stored reference loss curves: the first logged per-update losses of seeded tiny runs of pre-training,
fine-tuning and linear probing, with the settings and library versions that produced them.

A change in semantics (masking, initialisation, data order, augmentation seeding, schedule, the engine) moves a
curve, and its test fails. Regenerate deliberately, when a change is meant to move one:

    python tests/reference_curves.py            # all three
    python tests/reference_curves.py finetune   # one
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny import PRETRAIN, micro_mae

DATA = Path(__file__).parent / "data"
CLASSIFY = ["data.path=builtin:mnist5k", "data.train_limit=256", "data.val_limit=64", "data.num_workers=0",
            "batch_size=32", "epochs=1", "precision=fp32", "device=cpu", "log_every=1", "progress=false", "seed=0"]
SETTINGS = {
    "pretrain": ("mae.recipes.pretrain.PretrainConfig", PRETRAIN, 12),
    "finetune": ("mae.recipes.finetune.FinetuneConfig", [*CLASSIFY, "optim.warmup_epochs=0.5"], 8),
    "linprobe": ("mae.recipes.linprobe.LinprobeConfig", [*CLASSIFY, "optim.warmup_epochs=0.5"], 8),
}
"""name -> (config class, overrides, number of logged losses compared)"""


def path_of(name: str) -> Path:
    return DATA / f"{name}_reference_loss.json"


def step_losses(run_dir: Path) -> list[list]:
    """[step, loss] of the per-update records of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [[r["step"], r["loss"]] for r in rows if "loss" in r and "epoch_loss" not in r]


def run_curve(name: str, out: Path) -> list[list]:
    """Run the named tiny run in `out`; returns its first logged [step, loss] pairs."""
    from mae.config import load_config
    from mae.interop import save_model

    cls_path, overrides, count = SETTINGS[name]
    module, cls_name = cls_path.rsplit(".", 1)
    recipe = __import__(module, fromlist=["run"])
    extra = [f"output_dir={out / 'run'}"]
    if name != "pretrain":
        extra.append(f"checkpoint={save_model(micro_mae(seed=0), out / 'mae.safetensors')}")
    recipe.run(load_config(getattr(recipe, cls_name), None, [*overrides, *extra]))
    return step_losses(out / "run")[:count]


def check(name: str, losses: list[list]) -> None:
    """Assert `losses` equal the stored curve (steps exactly, losses to 1e-4 relative: CPU kinds round differently)."""
    reference = json.loads(path_of(name).read_text())["losses"]
    assert [s for s, _ in losses] == [s for s, _ in reference]
    for (_, got), (_, want) in zip(losses, reference, strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def write(name: str) -> Path:
    import timm
    import torch

    import mae

    with tempfile.TemporaryDirectory() as d:
        losses = run_curve(name, Path(d))
    record = {"command": f"python tests/reference_curves.py {name}", "overrides": SETTINGS[name][1],
              "versions": {"mae": mae.__version__, "torch": str(torch.__version__), "timm": timm.__version__,
                           "python": platform.python_version()},
              "machine": platform.processor() or platform.machine(), "losses": losses}
    path_of(name).write_text(json.dumps(record, indent=1) + "\n")
    return path_of(name)


if __name__ == "__main__":
    for name in sys.argv[1:] or list(SETTINGS):
        print(f"wrote {write(name)}")
