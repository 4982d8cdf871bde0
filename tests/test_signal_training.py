"""A second signal through the real run layer: a toy clip model (a 3-D grid of tiny tubelets) pre-trains as every
recipe does (a `TrainSpec` handed to `run_training`: the run folder, the `Trainer`, its checkpoints), and a run
that crashes in its second epoch and is resumed ends with the weights of the run that never stopped, bit for bit.

The clips are made by the test: a bright square that moves one pixel per frame over a dark background, its start and
direction drawn from the sample's index. Nothing here is specific to video: the model core reads the token grid.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from mae.config import load_config
from mae.data import WithMaskNoise, build_loader
from mae.models import MAEConfig, MaskedAutoencoderViT
from mae.recipes.common import run_distributed
from mae.recipes.pretrain import PretrainConfig
from mae.train.checkpoint import safe_load
from mae.train.optim import param_groups
from mae.train.spec import TrainSpec, run_training
from mae.train.trainer import Best

CLIP = {"img_size": 8, "patch_size": 4, "in_chans": 1, "num_frames": 4, "tubelet_size": 2, "embed_dim": 32,
        "depth": 1, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2,
        "mask_strategy": "tube", "mask_ratio": 0.5, "target": "norm_pixel"}


class MovingSquares(Dataset):
    """Clips [1, 4, 8, 8] of a 3 x 3 square moving one pixel per frame (and a label 0)."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(index)
        top, left = (int(v) for v in torch.randint(0, 6, (2,), generator=g))
        dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
        clip = torch.full((1, 4, 8, 8), -1.0)
        for t in range(4):
            y, x = min(max(top + dy * t, 0), 5), min(max(left + dx * t, 0), 5)
            clip[0, t, y:y + 3, x:x + 3] = 1.0
        return clip, 0


class Crash(Exception):
    """Stands for whatever kills a run (the lifecycle tests use SIGKILL on the CLI)."""


def _pretrain_clips(out: Path, epochs: int = 3, resume: bool = False, crash_at: int | None = None) -> dict:
    cfg = load_config(PretrainConfig, None, [f"output_dir={out}", f"epochs={epochs}", "batch_size=4", "seed=0",
                                             "device=cpu", "precision=fp32", "save_every=1", "save_every_minutes=0",
                                             "optim.warmup_epochs=1", "optim.lr=0.01", "visualize=false",
                                             *(["resume=auto"] if resume else [])])
    model_cfg = MAEConfig(**CLIP)

    def build(run) -> TrainSpec:
        torch.manual_seed(cfg.seed)
        model = MaskedAutoencoderViT(model_cfg)
        dataset = MovingSquares(16)  # the masking noise comes from each sample's seeded RNG, as in pre-training
        loader = build_loader(WithMaskNoise(dataset, model_cfg.num_patches), 4, seed=cfg.seed, drop_last=True)
        return TrainSpec(model=model, train_set=dataset, loader=loader,
                         loss_fn=lambda m, batch: m(batch[0], noise=batch[1])[0],
                         param_groups=param_groups(model, 0.05), optimizer="adamw",
                         optim={"base_lr": None, "lr": cfg.optim.lr, "warmup_epochs": 1, "betas": (0.9, 0.95),
                                "weight_decay": 0.05},
                         best=Best("epoch_loss", "min"), save_on_best=False,
                         summarize=lambda result: {"epochs": epochs, "history": result.history},
                         on_epoch_end=lambda epoch, record: _crash() if epoch == crash_at else None,
                         meta={"model_config": model_cfg.to_dict()}, resolved_sections={"clip": CLIP}, result_file=None)

    return run_distributed("cpu", lambda dist: run_training(cfg, dist, "pretrain", build))


def _crash() -> None:
    raise Crash("the run dies here")


def test_a_clip_model_pretrains_checkpoints_and_resumes_bit_exactly(tmp_path):
    whole = _pretrain_clips(tmp_path / "whole")
    losses = [record["epoch_loss"] for record in whole["history"]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]

    with pytest.raises(Crash):
        _pretrain_clips(tmp_path / "stopped", crash_at=1)  # dies in its second epoch, after checkpoint-0000
    assert sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-0*")) == ["checkpoint-0000.pth"]
    resumed = _pretrain_clips(tmp_path / "stopped", resume=True)
    assert [r["epoch_loss"] for r in resumed["history"]] == losses
    a = safe_load(tmp_path / "whole" / "checkpoint-last.pth")["model"]
    b = safe_load(tmp_path / "stopped" / "checkpoint-last.pth")["model"]
    assert a.keys() == b.keys() and "patch_embed.proj.weight" in a and a["patch_embed.proj.weight"].dim() == 5
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert safe_load(tmp_path / "whole" / "checkpoint-last.pth")["model_config"]["num_frames"] == 4
