"""The tiny architecture and run settings the tests share (one definition; files add only what they change).

`MODEL` + `RUN` are the command-line overrides of a tiny pre-training run on 256 embedded MNIST digits (a few
seconds on one CPU thread); `ARCH` is the micro encoder's tiny size as `build_model` keyword arguments.
"""

from __future__ import annotations

import torch

MODEL = ["model.name=mae_vit_micro_patch4_28", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
         "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]
RUN = ["data.path=builtin:mnist5k", "data.train_limit=256", "data.num_workers=0", "batch_size=32",
       "optim.warmup_epochs=1", "optim.base_lr=1e-3", "precision=fp32", "device=cpu", "log_every=1", "progress=false",
       "seed=0"]
PRETRAIN = [*MODEL, *RUN, "epochs=4", "save_every=2"]
"""The run of the stored pre-training reference curve (tests/data/pretrain_reference_loss.json)."""

ARCH = {"embed_dim": 32, "depth": 2, "num_heads": 2,
        "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
"""`mae_vit_micro_patch4_28` cut down to a 2-block, 32-wide encoder (the classification tests' encoder)."""


def micro_mae(seed: int = 0, **overrides):
    """A seeded tiny MAE on 28 x 28 grey digits (7 x 7 patches of 4 px)."""
    from mae.models import build_model

    torch.manual_seed(seed)
    return build_model("mae_vit_micro_patch4_28", **{**ARCH, **overrides})
