"""End-to-end pre-training on embedded data: files written, the stored loss curve, accumulation, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import reference_curves
import torch
from tiny import PRETRAIN

from mae.config import load_config
from mae.errors import ConfigError
from mae.interop import load_model
from mae.recipes.pretrain import PretrainConfig, run
from mae.train.checkpoint import safe_load
from mae.train.engine import Engine, LRSchedule

TINY = PRETRAIN


def tiny_config(out: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [*TINY, f"output_dir={out}", *extra])


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and "epoch_loss" not in r]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pretrain")
    return out, run(tiny_config(out))


def test_run_writes_every_output_file(tiny_run):
    """A seeded tiny run writes config, checkpoints, model, metrics, curves and reconstructions."""
    out, summary = tiny_run
    for name in ("config.yaml", "checkpoint-last.pth", "checkpoint-0001.pth", "checkpoint-0003.pth",
                 "model.safetensors", "metrics.jsonl", "loss.png", "reconstructions.png", "summary.json"):
        assert (out / name).is_file(), name
    assert summary["updates"] == 4 * 256 // 32
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"epoch", "step", "loss", "lr", "images_per_sec"} <= set(rows[0])


def test_first_losses_equal_the_stored_reference_curve(tiny_run):
    """The first logged losses of the seeded run equal the stored curve (catches any change in semantics:
    masking, init, data order, augmentation seeding, schedule, the engine). Regenerate deliberately with
    `python tests/reference_curves.py pretrain` when a change is meant to alter it."""
    out, _ = tiny_run
    reference_curves.check("pretrain", step_losses(out)[:12])


def test_loss_falls(tiny_run):
    """Pre-training lowers the masked-patch loss: the last epoch's mean is below the first's."""
    _, summary = tiny_run
    assert summary["last_epoch_loss"] < summary["first_epoch_loss"]


def test_final_model_reloads_from_run_dir(tiny_run):
    """`load_model` on the finished run directory returns the trained weights (its model.safetensors = the last
    checkpoint)."""
    out, _ = tiny_run
    model = load_model(out)
    state = safe_load(out / "checkpoint-last.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k


def test_resume_reproduces_the_uninterrupted_run(tiny_run, tmp_path):
    """Resuming from the epoch-1 checkpoint gives exactly the uninterrupted run's next per-step losses and
    final weights (data order, augmentation and masking RNG are restored)."""
    out, _ = tiny_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    run(tiny_config(resumed, f"resume={out / 'checkpoint-0001.pth'}"))
    full = dict(step_losses(out))
    again = step_losses(resumed)
    assert again and again[0][0] == 2 * 256 // 32 + 1
    for step, loss in again:
        assert loss == full[step], step
    a, b = safe_load(out / "checkpoint-last.pth")["model"], safe_load(resumed / "checkpoint-last.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_auto_continues_from_the_newest_checkpoint(tmp_path):
    """`resume=auto` in a finished run's directory starts after its last epoch: a longer schedule changes what the
    run computes, so it is refused without allow_config_change and continues with it (recorded)."""
    run(tiny_config(tmp_path, "epochs=2"))
    with pytest.raises(ConfigError, match="epochs 2 -> 3"):
        run(tiny_config(tmp_path, "epochs=3", "resume=auto"))
    summary = run(tiny_config(tmp_path, "epochs=3", "resume=auto", "allow_config_change=true"))
    changes = [json.loads(x) for x in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    assert changes[-1]["changes"] == {"epochs": {"from": 2, "to": 3}}
    assert summary["updates"] == 3 * 256 // 32
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(epochs) == 2 and epochs.count(2) > 0


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    """2 micro-batches of 8 accumulated give the same update as one batch of 16 (same masking noise), to 1e-6."""
    from mae.models import build_model

    torch.manual_seed(0)
    images = torch.randn(16, 1, 28, 28)
    noise = torch.rand(16, 49)
    base = build_model("mae_vit_micro_patch4_28", embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                        decoder_depth=1, decoder_num_heads=2)

    def updated(accum: int) -> dict[str, torch.Tensor]:
        model = build_model("mae_vit_micro_patch4_28", embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
                             decoder_depth=1, decoder_num_heads=2)
        model.load_state_dict(base.state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # update = -gradient
        engine = Engine(model, optimizer, LRSchedule(1.0, total_steps=10, warmup_steps=0, min_lr=1.0),
                        accum_iter=accum, show_progress=False)
        size = 16 // accum
        batches = [(images[i:i + size], noise[i:i + size]) for i in range(0, 16, size)]
        engine.train_epoch(batches, 0, lambda m, b: m(b[0], 0.75, noise=b[1])[0])
        assert engine.step == 1
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    one, two = updated(1), updated(2)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(one["blocks.0.attn.qkv.weight"], base.state_dict()["blocks.0.attn.qkv.weight"])


def test_effective_batch_and_lr_scaling(tmp_path):
    """lr = base_lr x (batch x accum_iter x processes) / 256, reported in the schedule's peak."""
    out = tmp_path / "r"
    run(tiny_config(out, "epochs=1", "accum_iter=2", "batch_size=16", "optim.base_lr=2.56e-3"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "epoch_loss" not in r]
    # one epoch = 256 / (16 x 2) = 8 updates, warm-up 1 epoch: the lr at update k is peak * k / 8,
    # peak = 2.56e-3 * 32 / 256
    peak = 2.56e-3 * 32 / 256
    assert steps[-1]["step"] == 8
    assert steps[3]["lr"] == pytest.approx(peak * 3 / 8)
