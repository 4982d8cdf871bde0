"""The checkpoint store interface (`mae.train.checkpoint_store.CheckpointStore`) and both of its backends: one
``.pth`` file per checkpoint (`FileStore`) and one DCP directory per checkpoint (`DCPStore`), used through
`CheckpointManager` as the trainer uses them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from mae.errors import ConfigError, TrainingError
from mae.train.checkpoint import STORES, CheckpointManager, load_latest, load_training_state, store_for
from mae.train.checkpoint_store import CheckpointStore, TrainingParts, run_record
from mae.train.dcp import DCPStore
from mae.train.engine import Engine
from mae.train.file_store import FileStore

BACKENDS = ("file", "dcp")


def _parts(seed: int) -> TrainingParts:
    """A tiny model with an AdamW engine after one update (so the optimizer has moments to save) and an extra module."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = Engine(model, optimizer, lambda step: 1e-2, show_progress=False)
    model(torch.randn(5, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    ema = nn.Linear(2, 2)
    return TrainingParts(model, engine, {"model_ema": ema})


def _record(epoch: int, batch: int = 0) -> dict:
    return run_record(format="mae-train", kind="pretrain", train_state={"epoch": epoch, "batch": batch},
                      rng=None, config={"epochs": 9}, data={}, versions={}, meta={"model_config": {"depth": 2}})


def _save(manager: CheckpointManager, parts: TrainingParts, epoch_end: int | None, position: tuple[int, int],
          is_best: bool = False) -> Path:
    parts.engine.step = 10 * position[0] + position[1]
    with warnings.catch_warnings():  # DCP in one process without a process group says so, every time
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        path = manager.save(_record(*position), epoch_end, is_best=is_best, parts=parts)
    assert path is not None
    return path


def _assert_same(a: TrainingParts, b: TrainingParts) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert torch.equal(a.extra["model_ema"].weight, b.extra["model_ema"].weight)
    moments_a, moments_b = a.engine.optimizer.state_dict()["state"], b.engine.optimizer.state_dict()["state"]
    assert moments_a.keys() == moments_b.keys()
    for key in moments_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments_a[key][name], moments_b[key][name]), (key, name)
    assert a.engine.step == b.engine.step


def test_the_backends_are_registered_stores():
    """Every registered backend implements the interface; a manager refuses a backend nobody registered."""
    assert dict(STORES) == {"file": FileStore, "dcp": DCPStore}
    assert all(issubclass(store, CheckpointStore) for store in STORES.values())
    with pytest.raises(ConfigError, match="unknown checkpoint backend 'zip'"):
        CheckpointManager("x", backend="zip")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_store_saves_named_states_and_restores_them_bit_exactly_with_last_and_best(tmp_path, backend):
    """Saving the epoch-end states of epochs 0 and 1 (the first the best), then a mid-epoch one: last names the
    newest, best the first, numbered ones are pruned to keep_last; the newest valid one is the mid-epoch state and
    restores model, optimizer moments, engine counters and the extra module exactly into fresh objects."""
    manager = CheckpointManager(tmp_path, keep_last=1, backend=backend)
    parts = _parts(0)
    first = _save(manager, parts, 0, (1, 0), is_best=True)
    _save(manager, parts, 1, (2, 0))
    parts.model[0].weight.data += 1  # the mid-epoch state differs from the epoch ends
    mid = _save(manager, parts, None, (2, 3))
    assert first == manager.path_for(0) and manager.path_for(1).exists()
    assert load_training_state(manager.last_path)["train_state"] == {"epoch": 2, "batch": 3}
    assert load_training_state(manager.best_path)["train_state"] == {"epoch": 1, "batch": 0}
    # keep_last=1: of the numbered ones only epoch 1's is left, but for what best still names (a DCP link's target)
    assert not first.exists() or first.resolve() == manager.best_path.resolve()

    path, state = manager.load_latest()
    assert path.resolve() == mid.resolve() and state["train_state"] == {"epoch": 2, "batch": 3}
    assert state["format"] == "mae-train" and state["model_config"] == {"depth": 2}
    fresh = _parts(1)
    manager.restore(path, state, fresh)
    _assert_same(parts, fresh)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_store_passes_over_a_damaged_newest_checkpoint(tmp_path, backend):
    """When the newest checkpoint is truncated (a file cut short, a DCP shard cut short), the newest valid one is the
    one before it, with a warning naming the damaged one; when every one is damaged there is none."""
    manager = CheckpointManager(tmp_path, keep_last=None, backend=backend)
    parts = _parts(0)
    older = _save(manager, parts, 0, (1, 0))
    newer = _save(manager, parts, 1, (2, 0))
    victims = [newer, manager.last_path] if backend == "file" else [next(newer.glob("*.distcp"))]
    for victim in victims:
        victim.write_bytes(victim.read_bytes()[:-20])
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        path, state = manager.load_latest()
    assert path == older and state["train_state"]["epoch"] == 1
    victim = older if backend == "file" else next(older.glob("*.distcp"))
    victim.write_bytes(victim.read_bytes()[:-20])
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert manager.load_latest() is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_store_refuses_a_state_with_nan_and_keeps_the_previous_checkpoint_newest(tmp_path, backend):
    """A model holding NaN is not written (TrainingError naming the tensor); the previous checkpoint stays the
    newest valid one."""
    manager = CheckpointManager(tmp_path, keep_last=None, backend=backend)
    parts = _parts(0)
    _save(manager, parts, 0, (1, 0))
    parts.model[2].bias.data[0] = float("nan")
    with pytest.raises(TrainingError, match=r"refusing to save the checkpoint of epoch 1: '.*2\.bias' holds NaN"):
        _save(manager, parts, 1, (2, 0))
    assert manager.load_latest()[1]["train_state"]["epoch"] == 1
    assert not manager.path_for(1).exists()


def test_the_newest_checkpoint_of_a_directory_is_found_whichever_store_wrote_it(tmp_path):
    """A run that switched strategy has file and DCP checkpoints side by side: the one standing furthest in the run
    wins, and restoring goes through the store that wrote it, whatever this run's own store."""
    parts = _parts(0)
    _save(CheckpointManager(tmp_path, backend="file"), parts, 0, (1, 0))
    parts.model[0].bias.data -= 1
    dcp_path = _save(CheckpointManager(tmp_path, backend="dcp"), parts, None, (1, 4))
    path, state = load_latest(tmp_path)
    assert path == dcp_path and store_for(path) is DCPStore and "dcp" in state
    fresh = _parts(2)
    CheckpointManager(tmp_path, backend="file").restore(path, state, fresh)
    _assert_same(parts, fresh)

    parts.model[0].bias.data += 3
    _save(CheckpointManager(tmp_path, backend="file"), parts, 1, (2, 0))
    path, state = load_latest(tmp_path)
    assert store_for(path) is FileStore and state["train_state"]["epoch"] == 2
    fresh = _parts(3)
    CheckpointManager(tmp_path, backend="dcp").restore(path, state, fresh)
    _assert_same(parts, fresh)
