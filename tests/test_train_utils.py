"""Training utilities: lr schedule, parameter groups, optimizers, checkpoints, rng state, precision, logging."""

import argparse
import json
import math
import random
import warnings

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mae.errors import CheckpointError, ConfigError, OutputError
from mae.train.checkpoint import CheckpointManager, atomic_save, safe_load
from mae.train.distributed import all_reduce_mean, barrier, cleanup, init_distributed, is_main
from mae.train.metrics_log import MetricsLogger, plot_curves, progress
from mae.train.optim import build_optimizer, param_groups
from mae.train.precision import autocast_context, make_grad_scaler, resolve_precision
from mae.train.rng import capture_rng_state, restore_rng_state, seed_everything
from mae.train.schedule import apply_lr, lr_at, scaled_lr

DEPTH = 3


@pytest.fixture(scope="module")
def vit() -> VisionTransformer:
    """A tiny timm ViT: the same parameter names as the MAE encoder (cls_token, pos_embed, blocks.i, norm, head)."""
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=DEPTH, num_heads=2, num_classes=5)


# ---------------------------------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------------------------------


def test_lr_schedule_matches_hand_computed_values():
    """Linear warm-up from 0 to the peak, then half-cycle cosine to min_lr (MAE reference schedule)."""
    total, warmup, peak, low = 110, 10, 1e-3, 1e-5
    assert lr_at(0, total, warmup, peak, low) == 0.0  # warm-up start
    assert lr_at(5, total, warmup, peak, low) == pytest.approx(5e-4)  # warm-up middle
    assert lr_at(10, total, warmup, peak, low) == pytest.approx(1e-3)  # warm-up end = peak
    assert lr_at(60, total, warmup, peak, low) == pytest.approx((1e-3 + 1e-5) / 2)  # cosine middle
    quarter = low + (peak - low) * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert lr_at(35, total, warmup, peak, low) == pytest.approx(quarter)
    assert lr_at(110, total, warmup, peak, low) == pytest.approx(1e-5)  # end = min_lr
    assert lr_at(500, total, warmup, peak, low) == pytest.approx(1e-5)  # past the end stays at min_lr


def test_lr_schedule_rejects_empty_run():
    """A run of zero steps is a config mistake and says so."""
    with pytest.raises(ConfigError, match="total_steps must be > 0"):
        lr_at(0, 0, 0, 1e-3)


def test_apply_lr_uses_each_groups_lr_scale_and_scaled_lr_rule():
    """apply_lr multiplies by lr_scale (1 when absent); scaled_lr is base_lr * batch / 256."""
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr_scale": 0.5}, {"params": [b]}], lr=1.0)
    apply_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1), pytest.approx(0.2)]
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


# ---------------------------------------------------------------------------------------------------------------------
# parameter groups and optimizers
# ---------------------------------------------------------------------------------------------------------------------


def _wd_of(groups: list[dict]) -> dict[str, float]:
    return {name: g["weight_decay"] for g in groups for name in g["param_names"]}


def test_weight_decay_groups_exclude_biases_norms_and_tokens(vit):
    """Biases, 1-D params and the model's no_weight_decay() names get wd 0; matrices get the given wd."""
    groups = param_groups(vit, weight_decay=0.05)
    wd = _wd_of(groups)
    assert set(wd) == {n for n, _ in vit.named_parameters()}
    for name, param in vit.named_parameters():
        excluded = param.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed")
        assert wd[name] == (0.0 if excluded else 0.05), name
    assert wd["blocks.0.attn.qkv.weight"] == 0.05 and wd["patch_embed.proj.weight"] == 0.05
    assert all(g["lr_scale"] == 1.0 for g in groups)
    for g in groups:  # names and tensors line up, so param_groups.json describes the real groups
        assert len(g["params"]) == len(g["param_names"])
        json.dumps({k: v for k, v in g.items() if k != "params"})


def test_param_groups_skip_frozen_and_honour_extra_no_decay_list(vit):
    """Frozen parameters are left out; names in no_weight_decay_list get wd 0."""
    vit.head.weight.requires_grad_(False)
    try:
        wd = _wd_of(param_groups(vit, weight_decay=0.1, no_weight_decay_list=["blocks.1.mlp.fc1.weight"]))
    finally:
        vit.head.weight.requires_grad_(True)
    assert "head.weight" not in wd
    assert wd["blocks.1.mlp.fc1.weight"] == 0.0 and wd["blocks.1.mlp.fc2.weight"] == 0.1


def test_layer_decay_scales(vit):
    """lr_scale = decay ** (depth + 1 - layer_id): stem 0, blocks.i -> i + 1, norm/head -> depth + 1."""
    decay = 0.75
    groups = param_groups(vit, weight_decay=0.05, layer_decay=decay, num_layers=DEPTH)
    scale = {name: g["lr_scale"] for g in groups for name in g["param_names"]}
    expected_ids = {
        "cls_token": 0,
        "pos_embed": 0,
        "patch_embed.proj.weight": 0,
        "blocks.0.attn.qkv.weight": 1,
        f"blocks.{DEPTH - 1}.mlp.fc2.bias": DEPTH,
        "norm.weight": DEPTH + 1,
        "head.weight": DEPTH + 1,
    }
    for name, layer_id in expected_ids.items():
        assert scale[name] == pytest.approx(decay ** (DEPTH + 1 - layer_id)), name
    assert scale["head.weight"] == 1.0
    assert _wd_of(groups)["head.bias"] == 0.0 and _wd_of(groups)["head.weight"] == 0.05


def test_build_optimizer_variants(vit):
    """adamw/sgd/lars build over the groups, keep lr_scale, use the fused kernels on CPU (this torch has them; foreach
    on request); unknown names are a ConfigError."""
    groups = param_groups(vit, weight_decay=0.05)
    adamw = build_optimizer(groups, "adamw", lr=1e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["betas"] == (0.9, 0.95) and adamw.defaults["fused"] and not adamw.defaults["foreach"]
    foreach = build_optimizer(groups, "adamw", lr=1e-3, fused=False)
    assert foreach.defaults["foreach"] and not foreach.defaults["fused"]
    assert [g["weight_decay"] for g in adamw.param_groups] == [g["weight_decay"] for g in groups]
    assert isinstance(build_optimizer(groups, "sgd", lr=0.1), torch.optim.SGD)
    lars = build_optimizer(groups, "lars", lr=0.1)
    assert type(lars).__name__ == "Lars"
    assert sum(len(g["params"]) for g in lars.param_groups) == sum(len(g["params"]) for g in groups)
    with pytest.raises(ConfigError, match="unknown optimizer 'adam'"):
        build_optimizer(groups, "adam", lr=1e-3)


def test_lars_adapts_matrices_only_like_the_reference():
    """LARS: a matrix steps by lr * 0.001 * |W| / |G| * G, a bias by plain lr * g (reference MAE/MoCo v3 LARS)."""
    head = nn.Linear(4, 3)
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
    opt = build_optimizer(param_groups(head, weight_decay=0.0), "lars", lr=0.1, momentum=0.9)
    g_w, g_b = torch.randn(3, 4), torch.randn(3)
    head.weight.grad, head.bias.grad = g_w.clone(), g_b.clone()
    opt.step()
    trust = 0.001 * w0.norm() / g_w.norm()
    torch.testing.assert_close(head.weight.detach(), w0 - 0.1 * trust * g_w)
    torch.testing.assert_close(head.bias.detach(), b0 - 0.1 * g_b)


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_atomic_save_keeps_old_file_when_disk_is_full(fault):
    """On a real full disk (torch's zip writer then raises its own RuntimeError, "unexpected pos") or a read-only
    one, `atomic_save` raises one OutputError naming the file, the reason and the fix, keeps the previous file and
    leaves no temporary file."""
    from faults import small_disk

    with small_disk(4 << 20) as disk:
        path = disk.path / "checkpoint-last.pth"
        atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
        before = path.read_bytes()
        if fault == "full":
            disk.fill(16 * 4096)  # the zip writer gets part of the way: its own RuntimeError, not an OSError
        else:
            disk.read_only()
        with pytest.raises(OutputError) as info:
            atomic_save({"epoch": 2, "w": torch.zeros(1 << 20)}, path)
        message = str(info.value)
        reason = "No space left on device" if fault == "full" else "Read-only file system"
        assert str(path) in message and reason in message and "--output-dir" in message, message
        assert path.read_bytes() == before
        assert sorted(p.name for p in disk.path.iterdir() if p.name != ".filler") == ["checkpoint-last.pth"]
        assert safe_load(path)["epoch"] == 1


def test_metrics_logger_on_a_full_disk_fails_once_and_closes_cleanly():
    """A metrics line that meets a real full disk: one OutputError, no half line left in metrics.jsonl, and close()
    does not try (and fail) to write it again."""
    from faults import small_disk

    from mae.train.metrics_log import MetricsLogger

    with small_disk(1 << 20) as disk:
        logger = MetricsLogger(disk.path / "run", tensorboard=False)
        logger.log({"step": 0, "loss": 1.0})
        disk.fill(0)
        with pytest.raises(OutputError, match="No space left on device"):
            logger.log({"step": 1, "loss": 0.5, "padding": "x" * 20000})
        logger.close()
        lines = (disk.path / "run" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [0]


class _Payload:
    """A pickle that creates a marker file when unpickled: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_safe_load_refuses_code_in_pickle(tmp_path):
    """A checkpoint whose pickle would call a function is refused (CheckpointError) and nothing runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "x": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError) as info:
        safe_load(path)
    assert not marker.exists()
    message = str(info.value)
    assert "refused" in message and "open" in message and "only weights are loaded" in message
    # the payload is live: an unsafe load would have run it (so the assertion above can fail)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_safe_load_accepts_reference_checkpoint_with_namespace_args(tmp_path):
    """Reference MAE checkpoints pickle argparse.Namespace under 'args'; that class alone is allowed."""
    path = tmp_path / "mae_pretrain.pth"
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, input_size=224)
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}, "args": args, "epoch": 799}, path)
    state = safe_load(path)
    assert state["args"] == args and state["epoch"] == 799
    assert torch.equal(state["model"]["cls_token"], torch.zeros(1, 1, 8))


def test_safe_load_reads_safetensors(tmp_path):
    """.safetensors files load through safetensors into a flat state dict."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(4.0)}, path)
    assert torch.equal(safe_load(path)["w"], torch.arange(4.0))


def test_safe_load_reports_truncated_and_missing_files(tmp_path):
    """A cut-off file raises CheckpointError saying 'truncated'; a missing one names the path."""
    path = tmp_path / "ckpt.pth"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    for size in (0, 20, len(data) // 2, len(data) - 50):
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="truncated"):
            safe_load(path)
    with pytest.raises(CheckpointError, match=r"nope.pth' does not exist"):
        safe_load(tmp_path / "nope.pth")


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def test_checkpoint_manager_prunes_beyond_keep_last(tmp_path):
    """Only the newest keep_last numbered files stay; last and best are never pruned."""
    manager = CheckpointManager(tmp_path, keep_last=2)
    for epoch in range(5):
        manager.save({"w": torch.full((2,), float(epoch))}, epoch, is_best=epoch == 1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-0003.pth", "checkpoint-0004.pth", "checkpoint-best.pth", "checkpoint-last.pth"]
    assert safe_load(manager.best_path)["epoch"] == 1
    assert safe_load(manager.last_path)["epoch"] == 4


def test_latest_valid_skips_damaged_newest(tmp_path):
    """latest_valid returns the newest loadable checkpoint and warns about each damaged one it skips."""
    manager = CheckpointManager(tmp_path, keep_last=3)
    assert manager.latest_valid() is None
    for epoch in (1, 2, 3):
        manager.save({"w": torch.ones(2)}, epoch)
    assert manager.latest_valid() == manager.last_path
    _truncate(manager.last_path)
    _truncate(manager.path_for(3))
    with pytest.warns(UserWarning) as record:
        found = manager.latest_valid()
    assert found == manager.path_for(2)
    warned = " ".join(str(w.message) for w in record)
    assert "checkpoint-last.pth" in warned and "checkpoint-0003.pth" in warned


def test_latest_valid_prefers_numbered_file_newer_than_last(tmp_path):
    """After a crash between writing checkpoint-N and updating last, the newer numbered file wins."""
    manager = CheckpointManager(tmp_path)
    manager.save({"w": torch.ones(2)}, 1)
    atomic_save({"w": torch.ones(2), "epoch": 2}, manager.path_for(2))  # last not yet updated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert manager.latest_valid() == manager.path_for(2)


# ---------------------------------------------------------------------------------------------------------------------
# rng, precision, distributed
# ---------------------------------------------------------------------------------------------------------------------


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


def test_rng_capture_restore_reproduces_draws_through_checkpoint(tmp_path):
    """Restoring a captured state repeats the same python/numpy/torch draws, also after atomic_save + safe_load."""
    seed_everything(123)
    _draws()
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = _draws()
    restore_rng_state(state)
    assert _draws() == expected
    atomic_save({"rng": state}, tmp_path / "rng.pth")
    loaded = safe_load(tmp_path / "rng.pth")["rng"]
    seed_everything(0)
    restore_rng_state(loaded)
    assert _draws() == expected


def test_seed_everything_makes_draws_repeatable():
    """The same seed gives the same draws from every generator."""
    seed_everything(7)
    first = _draws()
    seed_everything(7)
    assert _draws() == first


def test_precision_resolution_and_contexts():
    """fp32 is a no-op context; bf16 autocasts matmuls; fp16 on CPU and unknown names raise ConfigError."""
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "cpu") in ("bf16", "fp32")
    with pytest.raises(ConfigError, match="bf16"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="unknown precision 'half'"):
        resolve_precision("half", "cpu")
    x = torch.randn(2, 2)
    with autocast_context("fp32", "cpu"):
        assert (x @ x).dtype == torch.float32
    with autocast_context("bf16", "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    assert not make_grad_scaler("bf16", "cpu").is_enabled()


def test_single_process_distributed_helpers(monkeypatch):
    """Without torchrun variables the helpers run as one main process and all_reduce_mean copies its input."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert info.device == torch.device("cpu") and is_main()
    barrier()
    x = torch.tensor([1.0, 3.0])
    out = all_reduce_mean(x)
    assert torch.equal(out, x) and out is not x
    cleanup()


# ---------------------------------------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------------------------------------


def test_metrics_logger_writes_jsonl_and_tensorboard_and_plot(tmp_path):
    """Each log() call adds one JSON line (tensors become numbers), TensorBoard gets events (read back: one scalar
    curve per metric, at the logged steps, with the logged values; "step" is the x-axis), plot_curves a PNG."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as logger:
        for step in range(5):
            logger.log({"step": step, "loss": torch.tensor(1.0 / (step + 1)), "lr": 1e-4 * step})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[2]) == {"step": 2, "loss": pytest.approx(1 / 3), "lr": 2e-4}
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr"]
    for tag, expected in (("loss", [1 / (s + 1) for s in range(5)]), ("lr", [1e-4 * s for s in range(5)])):
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == list(range(5)), tag
        assert [e.value for e in scalars] == pytest.approx(expected, rel=1e-6), tag  # stored as float32
    out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_disabled_logger_and_progress_write_nothing(tmp_path):
    """A disabled logger (ranks other than 0) creates no files; a disabled progress bar still iterates."""
    logger = MetricsLogger(tmp_path / "off", enabled=False)
    logger.log({"loss": 1.0})
    logger.close()
    assert not (tmp_path / "off").exists()
    assert list(progress(range(3), total=3, desc="x", enabled=False)) == [0, 1, 2]


def test_auto_precision_is_fp32_where_aten_runs_avx2_kernels(monkeypatch):
    """bf16 only where it is native: AMX, or AVX-512 kernels on a CPU with avx512_bf16; ATen limited to AVX2 (an
    older CPU, or ATEN_CPU_CAPABILITY=avx2 on a new one) emulates bf16, so 'auto' is fp32 whatever /proc/cpuinfo
    says."""
    from mae.train import precision

    for capability, want in (("AVX2", "fp32"), ("DEFAULT", "fp32"), ("AMX", "bf16")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        precision.cpu_has_fast_bf16.cache_clear()
        assert resolve_precision("auto", "cpu") == want, capability
    precision.cpu_has_fast_bf16.cache_clear()
