"""A shipped preset's DataLoader worker count (the paper's cluster: 10 per GPU) never overrules the machine: on a
2-CPU laptop it is lowered to the machine-aware default with one log line naming the way to force it, for every
recipe through `load_config`; the same value from the user (command line, own YAML file) is kept."""

from __future__ import annotations

import logging
import shutil
import warnings

import pytest
import yaml
from tiny import micro_mae

from mae import threads
from mae.cli import main
from mae.config import load_config
from mae.presets import resolve_preset
from mae.recipes.finetune import FinetuneConfig
from mae.recipes.linprobe import LinprobeConfig
from mae.recipes.pretrain import PretrainConfig


def _cpus(monkeypatch, n: int) -> None:
    """This process sees `n` CPUs: its affinity (read by `mae.threads` and by PyTorch's DataLoader check), no quota."""
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def _clamp_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mae" and "usable CPUs" in r.getMessage()]


@pytest.mark.parametrize(("cls", "preset", "get"), [
    (FinetuneConfig, "finetune/vit_b", lambda c: c.data.num_workers),
    (LinprobeConfig, "linprobe/vit_b", lambda c: c.data.num_workers),
    (PretrainConfig, "pretrain/vit_l_800ep", lambda c: c.data.num_workers),
])
def test_a_presets_worker_count_above_the_machine_is_lowered_with_one_line(monkeypatch, caplog, cls, preset, get):
    """On 2 CPUs the cluster presets' data.num_workers=10 becomes the machine-aware default (1, as with no preset),
    and one log line names the preset, the value and the override that keeps it."""
    _cpus(monkeypatch, 2)
    assert threads.default_workers() == 1
    with caplog.at_level(logging.INFO, logger="mae"):
        cfg = load_config(cls, preset, ["checkpoint=x"] if cls is not PretrainConfig else [])
    assert get(cfg) == 1
    lines = _clamp_lines(caplog)
    assert len(lines) == 1, lines
    assert f"preset {preset} sets data.num_workers=10" in lines[0] and "2 usable CPUs" in lines[0]
    assert "using 1" in lines[0] and "Pass data.num_workers=10 on the command line" in lines[0]


def test_the_transfer_recipes_top_level_worker_count_is_lowered_too(monkeypatch, caplog):
    """`num_workers` at the top level of a detection preset (8) is the same kind of field: lowered the same way."""
    from mae.recipes.detect import DetectConfig

    _cpus(monkeypatch, 2)
    with caplog.at_level(logging.INFO, logger="mae"):
        cfg = load_config(DetectConfig, "detect/coco_vit_base", ["backbone.checkpoint=x"])
    assert cfg.num_workers == 1
    assert len(_clamp_lines(caplog)) == 1 and "sets num_workers=8" in _clamp_lines(caplog)[0]


def test_worker_counts_the_user_sets_or_the_machine_allows_are_kept(monkeypatch, caplog, tmp_path):
    """Kept as given, without a line: data.num_workers=10 on the command line, the same preset copied into the user's
    own YAML file, and the preset on a 16-CPU machine (10 <= 15)."""
    _cpus(monkeypatch, 2)
    mine = tmp_path / "my_finetune.yaml"
    shutil.copy(resolve_preset("finetune/vit_b"), mine)
    with caplog.at_level(logging.INFO, logger="mae"):
        assert load_config(FinetuneConfig, "finetune/vit_b", ["checkpoint=x", "data.num_workers=10"]) \
            .data.num_workers == 10
        assert load_config(FinetuneConfig, mine, ["checkpoint=x"]).data.num_workers == 10
        assert load_config(FinetuneConfig, "finetune/vit_b", ["checkpoint=x", "data.num_workers=0"]) \
            .data.num_workers == 0
        _cpus(monkeypatch, 16)
        assert load_config(FinetuneConfig, "finetune/vit_b", ["checkpoint=x"]).data.num_workers == 10
    assert _clamp_lines(caplog) == []


def test_finetune_with_the_cluster_preset_on_two_cpus_starts_no_pytorch_worker_warning(monkeypatch, caplog, tmp_path):
    """`mae finetune --config finetune/vit_b --checkpoint CKPT --data ...` on a 2-CPU machine (a tiny model and data
    set by overrides, not the worker count) trains with the machine's 1 worker: one log line about the preset's 10,
    and no PyTorch "worker processes" UserWarning (it warns for 10 workers on 2 CPUs, as the check below shows)."""
    from torch.utils.data import DataLoader

    from mae.interop import save_model

    _cpus(monkeypatch, 2)
    with pytest.warns(UserWarning, match="worker processes"):  # the warning this test must not see
        DataLoader(list(range(4)), num_workers=10)
    save_model(micro_mae(), tmp_path / "mae.safetensors")
    argv = ["finetune", "--config", "finetune/vit_b", "--checkpoint", str(tmp_path / "mae.safetensors"),
            "--data", "builtin:mnist5k", "--output-dir", str(tmp_path / "ft"), "epochs=1", "batch_size=16",
            "data.train_limit=32", "data.val_limit=16", "precision=fp32", "device=cpu", "progress=false",
            "optim.warmup_epochs=0", "aug.rand_augment=null", "aug.mixup=0", "aug.cutmix=0"]
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO, logger="mae"):
        warnings.simplefilter("always")
        assert main(argv) == 0
    assert [str(w.message) for w in seen if "worker processes" in str(w.message)] == []
    assert len(_clamp_lines(caplog)) == 1
    resolved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert resolved["data"]["num_workers"] == 1  # the resolved config says what ran
