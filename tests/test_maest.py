"""MAE-ST (Feichtenhofer et al., 2022) as a configuration of our core: its target (one frame per tubelet, normalised
per patch), its separable learned positions, its space-time random masking at 90%, and the registered tiny model
training on a clip. The target is checked against one built here with plain tensor indexing."""

from __future__ import annotations

import pytest
import torch

from mae.errors import ConfigError
from mae.models import build_model
from mae.models.registry import model_config
from mae.models.targets import build_target, maest_target_frames

TINY = "mae_maest_vit_micro_patch8_t8"


def test_target_frames_for_16_frames_in_tubelets_of_2_are_maest_s():
    """16 frames, 8 time tokens: frames 0, 2, ..., 12 and 15 (the last is the second frame of its tubelet)."""
    assert maest_target_frames(16, 8).tolist() == [0, 2, 4, 6, 8, 10, 12, 15]
    assert maest_target_frames(8, 4).tolist() == [0, 2, 4, 7]


def _hand_target(clip: torch.Tensor, frames: list[int], p: int, normalize: bool) -> torch.Tensor:
    """[N, C, T, H, W] -> [N, t*h*w, p*p*C], built token by token: frame frames[t], rows h*p.., columns w*p..,
    each vector (p, q, c) with the channel last."""
    n, _, _, height, width = clip.shape
    rows = []
    for i in range(n):
        tokens = []
        for f in frames:
            for h in range(height // p):
                for w in range(width // p):
                    patch = clip[i, :, f, h * p:(h + 1) * p, w * p:(w + 1) * p]  # [C, p, q]
                    vec = patch.permute(1, 2, 0).reshape(-1)  # (p, q, c)
                    if normalize:
                        vec = (vec - vec.mean()) / (vec.var(unbiased=True) + 1e-6) ** 0.5
                    tokens.append(vec)
        rows.append(torch.stack(tokens))
    return torch.stack(rows)


@pytest.mark.parametrize("normalize", [True, False], ids=["maest_norm_pixel", "maest_pixel"])
def test_target_equals_one_built_by_hand(normalize):
    """The registered targets cut frames [0, 2, 4, 7] of an 8-frame clip into 8x8 patches, token order (t, h, w)."""
    cfg = model_config(TINY, target="maest_norm_pixel" if normalize else "maest_pixel")
    target = build_target(cfg.target, cfg.patch_size, cfg.in_chans, **cfg.target_options())
    clip = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = _hand_target(clip, [0, 2, 4, 7], 8, normalize)
    assert target.dim == 8 * 8 * 3
    assert torch.allclose(target(clip), expected, atol=1e-5)


def test_maest_target_needs_a_clip():
    """An image model asked for MAE-ST's target is refused with a message naming the fix."""
    with pytest.raises(ConfigError, match="maest targets need a clip"):
        build_model("mae_vit_micro_patch4_28", target="maest_norm_pixel")


def test_decoder_predicts_one_frame_per_token():
    """The prediction head is as wide as the target (p*q*C), not the tubelet (u*p*q*C); ViT-L/16 at 16 frames
    predicts 768 values per token and has 8 x 14 x 14 tokens."""
    with torch.device("meta"):
        large = build_model("mae_maest_vit_large_patch16_t16")
    assert large.decoder_pred.out_features == 16 * 16 * 3 and large.config.num_patches == 8 * 14 * 14
    assert (large.config.decoder_embed_dim, large.config.decoder_depth, large.config.norm_eps) == (512, 4, 1e-6)
    assert large.pos_embed_spatial.shape == (1, 196, 1024) and large.pos_embed_temporal.shape == (1, 8, 1024)
    assert large.decoder_pos_embed_spatial.shape == (1, 196, 512) and large.pos_embed_class.shape == (1, 1, 1024)


def test_separable_table_is_the_same_spatial_part_at_every_time_step():
    """Encoder and decoder tables [1, 1 + t*h*w, D]: minus the temporal row of step t, every step holds the one
    spatial table; the class token's row is its own parameter."""
    model = build_model(TINY)
    for decoder, prefix in ((False, "pos_embed"), (True, "decoder_pos_embed")):
        table = model.position_embedding(decoder=decoder)
        spatial, temporal = getattr(model, prefix + "_spatial"), getattr(model, prefix + "_temporal")
        t, hw, dim = temporal.shape[1], spatial.shape[1], spatial.shape[2]
        assert table.shape == (1, 1 + t * hw, dim) and (t, hw) == (4, 16)
        grid = table[0, 1:].reshape(t, hw, dim) - temporal[0].unsqueeze(1)  # [t, h*w, D]
        for step in range(t):
            assert torch.allclose(grid[step], spatial[0], atol=1e-6)
        assert torch.equal(table[0, 0], getattr(model, prefix + "_class")[0, 0])
        assert all(p.requires_grad for p in (spatial, temporal))


def test_random_masking_at_90_percent_keeps_int_tenth_of_all_space_time_tokens():
    """Random masking over all T*H*W tokens keeps int(0.1 * L) per sample (156 of 1568 at full size)."""
    model = build_model(TINY)
    clip = torch.randn(3, 3, 8, 32, 32)
    latent, m = model.forward_encoder(clip, 0.9)
    assert latent.shape[1] == 1 + int(0.1 * 64) and (m.mask.sum(1) == 64 - int(0.1 * 64)).all()
    assert int(1568 * (1 - 0.9)) == int(0.1 * 1568) == 156
    assert not torch.equal(m.mask[0], m.mask[1])  # per-sample, not one tube for the batch


def test_mask_and_noise_give_the_same_loss():
    """``mask=`` with the removed set that ``noise=`` picked gives the same loss and predictions."""
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    clip = torch.randn(2, 3, 8, 32, 32)
    noise = torch.rand(2, model.config.num_patches)
    loss_n, pred_n, mask_n = model(clip, noise=noise)
    loss_m, pred_m, _ = model(clip, mask=mask_n.bool())
    assert torch.allclose(loss_n, loss_m, atol=1e-6) and torch.allclose(pred_n, pred_m, atol=1e-5)


def test_tiny_model_trains_on_one_batch():
    """A few AdamW steps on one fixed batch and mask: the loss is finite and goes down."""
    torch.manual_seed(0)
    model = build_model(TINY)
    clip = torch.randn(4, 3, 8, 32, 32)
    noise = torch.rand(4, model.config.num_patches)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss, pred, _ = model(clip, noise=noise)
        assert pred.shape == (4, 64, 192)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
