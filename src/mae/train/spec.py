"""A training recipe as one value: `TrainSpec` holds what a recipe builds (model, data, loss, optimizer settings,
evaluation, the best metric, extra state, what its checkpoints carry), and `run_training` is the one place where a
run is started, its engine and `Trainer` built, trained and finished, as torchtitan's ``TrainSpec``: recipes differ
in what they build, never in how it runs.

    def run(cfg: PretrainConfig) -> dict:
        return run_distributed(cfg.device, lambda dist: run_training(cfg, dist, "pretrain",
                                                                     lambda run: build_spec(cfg, run)))

The spec is built inside the started run (`build(run)`): the model needs the run's device and strategy, the data its
process rank, a fitted target its resume state. The kind (the checkpoint format, `mae.train.checkpoint_formats`) is
`run_training`'s argument, not the spec's: the run refuses a checkpoint of another kind before anything is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mae.config import to_dict
from mae.train.distributed import DistInfo
from mae.train.engine import Engine
from mae.train.run import Run, TrainFields, start_run
from mae.train.trainer import Best, Trainer, TrainResult, build_engine, data_facts

__all__ = ["TrainSpec", "resolved_config", "run_training"]


@dataclass
class TrainSpec:
    """What a training recipe builds for the run layer; `run_training` turns it into a run."""

    model: nn.Module  # whose weights are saved and restored (not a DDP / compile wrapper)
    train_set: Any  # its size and file list are checked on resume (`data_facts`)
    loader: Any  # the training loader: ``len(loader)`` batches per epoch per process
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]  # ``loss_fn(module, batch) -> loss``
    param_groups: list[dict[str, Any]]  # the optimizer's groups (`mae.train.optim.param_groups`)
    optimizer: str  # adamw | lars | sgd
    optim: dict[str, Any]  # `build_engine`'s lr keywords: base_lr, lr, warmup_epochs, min_lr, betas, ...
    best: Best  # the metric of checkpoint-best.pth
    summarize: Callable[[TrainResult], dict[str, Any]]  # after training: the summary (and exports, pictures)
    meta: dict[str, Any] = field(default_factory=dict)  # in every checkpoint: how to rebuild the model
    resolved_sections: dict[str, Any] = field(default_factory=dict)
    """Config sections the run resolves, over the config's own (e.g. the model with every field set)."""
    evaluate: Callable[[int], dict[str, Any]] | None = None  # ``evaluate(epoch) -> metrics``
    eval_every: int = 1
    save_on_best: bool = True  # False: the best is picked among the epochs saved anyway (large checkpoints)
    on_epoch_end: Callable[[int, dict], dict | None] | None = None  # extra metrics of an epoch (e.g. a k-NN monitor)
    extra_state: dict[str, nn.Module] = field(default_factory=dict)  # saved next to the model (e.g. an EMA)
    on_update: Callable[[], None] | None = None  # after every applied update (e.g. the EMA's step)
    train_module: nn.Module | None = None  # what the engine calls, if not `model` (e.g. a `PartiallyFrozen`)
    checkpointing: nn.Module | None = None  # what grad_checkpointing=true applies to, if not `model`
    schedule: Callable[[float, int], Callable[[int], float]] | None = None  # replaces the warm-up + cosine
    on_start: Callable[[Engine], None] | None = None  # before the first epoch: the start-up line, side files
    result_file: str | None = "checkpoint-best.pth"  # the run's result, as status.json names it
    run_info: dict[str, Any] = field(default_factory=dict)
    """Facts for config.yaml's run record (``_run``, beside the command line and versions), e.g. the provenance of the
    released weights the run started from; a record, not a setting (`mae.config.load_config` skips it)."""


def resolved_config(cfg: TrainFields, run: Run, sections: dict[str, Any]) -> dict[str, Any]:
    """The resolved config config.yaml records (and resumes compare): the config with the run's precision and device
    and the `sections` the recipe resolved."""
    return {**to_dict(cfg), "precision": run.precision, "device": run.device.type, **sections}


def run_training(cfg: TrainFields, dist: DistInfo, kind: str, build: Callable[[Run], TrainSpec]) -> dict[str, Any]:
    """Start a run of `kind` (`mae.train.run.start_run`), let the recipe `build` its spec in it, train it with the
    `Trainer` and finish it; returns the summary (also in summary.json)."""
    with start_run(cfg, dist, kind=kind) as run:
        spec = build(run)
        engine = build_engine(run, spec.model, spec.param_groups, optimizer=spec.optimizer,
                              updates_per_epoch=len(spec.loader) // cfg.accum_iter, train_module=spec.train_module,
                              checkpointing=spec.checkpointing, schedule=spec.schedule, **spec.optim)
        if spec.on_update is not None:
            engine.on_update = spec.on_update
        trainer = Trainer(run, model=spec.model, engine=engine, loader=spec.loader, loss_fn=spec.loss_fn,
                          best=spec.best, resolved=resolved_config(cfg, run, spec.resolved_sections),
                          data=data_facts(spec.train_set, run, len(spec.loader)), meta=spec.meta,
                          evaluate=spec.evaluate, eval_every=spec.eval_every, save_on_best=spec.save_on_best,
                          on_epoch_end=spec.on_epoch_end, extra_state=spec.extra_state, run_info=spec.run_info)
        if spec.on_start is not None:
            spec.on_start(engine)
        result = trainer.fit()
        return trainer.finish(spec.summarize(result), spec.result_file)
