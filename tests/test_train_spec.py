"""One recipe shape: every training recipe fills a `mae.train.spec.TrainSpec` and hands it to `run_training`, the one
place where a run is started, its engine and `Trainer` built, trained and finished, and where the resolved config
(config.yaml) is built. Config keys renamed before 0.1 are unknown keys, with the usual suggestion."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from mae.config import load_config
from mae.errors import ConfigError
from mae.recipes.common import run_distributed
from mae.train.checkpoint import safe_load
from mae.train.run import TrainFields
from mae.train.spec import TrainSpec, run_training
from mae.train.trainer import Best

RECIPES = Path(__file__).resolve().parents[1] / "src" / "mae" / "recipes"
RUN_LAYER_INSIDES = {"start_run", "Trainer", "build_engine", "data_facts"}
"""What only `mae.train.spec.run_training` uses to run a recipe."""


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mae.train"):
            names.update(alias.name for alias in node.names)
    return names


def test_no_recipe_starts_a_run_or_builds_a_trainer_itself():
    """No module of `mae.recipes` imports `start_run`, `Trainer`, `build_engine` or `data_facts`; the training
    recipes (pretrain, finetune, linprobe, detect / segment through transfer_run, the demo's raw-pixel probe) import
    `run_training` instead."""
    inside = {p.name: sorted(_imported_names(p) & RUN_LAYER_INSIDES) for p in sorted(RECIPES.glob("*.py"))}
    assert not {name: found for name, found in inside.items() if found}
    training = ("pretrain.py", "finetune.py", "linprobe.py", "transfer_run.py", "demo.py")
    assert all("run_training" in _imported_names(RECIPES / name) for name in training)


class _Batches:
    """Eight fixed batches of 4 points of a linear function, the same every epoch."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 3, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]])

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.skip = skip

    def __len__(self) -> int:
        return 8

    def __iter__(self):
        for i in range(self.skip, 8):
            yield self.x[4 * i:4 * i + 4], self.y[4 * i:4 * i + 4]


def test_run_training_builds_the_run_from_the_spec(tmp_path):
    """`run_training` builds the spec inside the started run, calls `on_start` once before the first update with the
    engine, `on_update` after every update, evaluates every epoch, saves the extra state by name and the meta in
    every checkpoint, records the config with the spec's resolved sections, and writes `summarize`'s summary with
    the spec's result file."""
    cfg = TrainFields(output_dir=str(tmp_path), epochs=2, batch_size=4, device="cpu", precision="fp32",
                      progress=False, save_every_minutes=0)
    seen: dict[str, list] = {"start": [], "updates": []}

    def build(run) -> TrainSpec:
        model = nn.Linear(3, 1)
        shadow = nn.Linear(3, 1)
        loader = _Batches()

        @torch.no_grad()
        def evaluate(epoch: int) -> dict:
            return {"score": float(-nn.functional.mse_loss(model(loader.x), loader.y))}

        return TrainSpec(model=model, train_set=list(range(32)), loader=loader,
                         loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]),
                         param_groups=[{"params": list(model.parameters()), "weight_decay": 0.0}],
                         optimizer="sgd", optim={"lr": 0.05}, best=Best("score", "max"),
                         summarize=lambda result: {"updates": result.updates, "best_path": result.best_path.name},
                         meta={"model_config": {"width": 3}}, resolved_sections={"model": {"width": 3}},
                         evaluate=evaluate, extra_state={"shadow": shadow},
                         on_update=lambda: seen["updates"].append(1),
                         on_start=lambda engine: seen["start"].append(engine.step))

    summary = run_distributed("cpu", lambda dist: run_training(cfg, dist, "classify", build))
    assert seen["start"] == [0]
    assert len(seen["updates"]) == 16
    assert summary["updates"] == 16 and summary["best_path"] == "checkpoint-best.pth"
    assert json.loads((tmp_path / "summary.json").read_text())["best"]["name"] == "score"
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"] == {"width": 3} and saved["device"] == "cpu" and saved["precision"] == "fp32"
    state = safe_load(tmp_path / "checkpoint-best.pth")
    assert state["model_config"] == {"width": 3} and "shadow" in state
    assert json.loads((tmp_path / "run.json").read_text())["result"] == "checkpoint-best.pth"


@pytest.mark.parametrize(("config", "old"), [
    ("mae.recipes.pretrain.PretrainConfig", "data.limit"), ("mae.recipes.detect.DetectConfig", "data.limit"),
    ("mae.recipes.segment.SegmentConfig", "data.limit"), ("mae.recipes.evaluate.EvaluateConfig", "img_size"),
    ("mae.recipes.evaluate.EvaluateConfig", "model_name")])
def test_a_key_renamed_before_0_1_is_an_unknown_key(config, old):
    """Keys renamed before the first release (data.limit, evaluate's img_size and model_name) are not read under
    their new names any more: an old key is refused like any unknown key, with a suggestion."""
    module, name = config.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigError, match=rf"^unknown config key '{old}'; did you mean '[a-z_.]+'\?$"):
        load_config(cls, None, [f"{old}=1"])
