"""The token-grid core: patches, position tables, mask strategies and the model on 2-D and 3-D grids.

An image is one case of the grid and must not move (its parity with the reference and Hugging Face lives in
test_interop.py and test_model.py); these tests pin the other cases: tubelets [N, C, T, H, W], channel groups, a
non-square one-channel spectrogram, every mask strategy's exact count and pattern, and ``mask=`` against ``noise=``.
"""

from __future__ import annotations

import math

import pytest
import torch

from mae.errors import ConfigError, InputError
from mae.models import MAEConfig, MaskedAutoencoderViT, build_model
from mae.models import masking as M
from mae.models.grid import TokenGrid
from mae.models.patches import patchify as reference_patchify
from mae.models.pos_embed import position_table, sincos_1d, sincos_2d, sincos_3d, sinusoid_table

IMAGE = TokenGrid((12, 20), (4, 4), 3)  # 3 x 5 places
CLIP = TokenGrid((4, 8, 12), (2, 4, 4), 3)  # 2 x 2 x 3 places
GROUPED = TokenGrid((2, 8, 8), (1, 4, 4), 4, ((0, 1), (2, 3)))  # 2 groups x 2 x 2 x 2 places
SPECTROGRAM = TokenGrid((32, 8), (4, 4), 1)  # Audio-MAE's shape in small: time x mel bins, one channel, 8 x 2 places
GRIDS = [IMAGE, CLIP, GROUPED, SPECTROGRAM]


def tiny(**overrides) -> MAEConfig:
    base = {"img_size": 8, "patch_size": 4, "in_chans": 3, "embed_dim": 32, "depth": 1, "num_heads": 2,
            "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2, "num_frames": 4, "tubelet_size": 2}
    return MAEConfig(**{**base, **overrides})


# ------------------------------------------------------------------ patches
def test_image_patches_are_the_reference_order():
    """On a 2-D grid, patchify is the reference's (row-major places, each patch (p, q, c)) bit for bit."""
    x = torch.randn(2, 3, 12, 20)
    assert torch.equal(IMAGE.patchify(x), reference_patchify(x, 4))


def test_tubelet_patch_vectors_are_time_row_column_channel():
    """A tubelet token at place (t, h, w) lists x[c, t*u + a, h*p + b, w*p + d] in (a, b, d, c) order: MAE-ST's
    and VideoMAE's (u, p, q, c), places in (t, h, w) order."""
    x = torch.randn(2, 3, 4, 8, 12)
    patches = CLIP.patchify(x)  # [2, 12, 2*4*4*3]
    assert patches.shape == (2, 12, 96)
    t, h, w = 1, 0, 2
    token = patches[1, (t * 2 + h) * 3 + w].reshape(2, 4, 4, 3)
    expected = x[1, :, t * 2:t * 2 + 2, h * 4:h * 4 + 4, w * 4:w * 4 + 4].permute(1, 2, 3, 0)
    assert torch.equal(token, expected)


@pytest.mark.parametrize("grid", GRIDS, ids=["image", "clip", "grouped", "spectrogram"])
def test_unpatchify_inverts_patchify(grid):
    x = torch.randn(2, *grid.input_shape)
    group = 0 if grid.channel_groups else None
    patches = grid.patchify(x, group)
    back = grid.unpatchify(patches, group)
    expected = x[:, list(grid.channel_groups[0])] if grid.channel_groups else x
    assert torch.equal(back, expected)


def test_a_grid_the_patch_does_not_divide_is_refused():
    with pytest.raises(ConfigError, match="time extent 5 is not divisible"):
        TokenGrid((5, 8, 8), (2, 4, 4), 3)
    with pytest.raises(ConfigError, match="channel_groups"):
        TokenGrid((8, 8), (4, 4), 3, ((0, 1), (1, 2)))


def test_expand_mask_marks_every_pixel_of_a_removed_tubelet():
    mask = torch.zeros(1, CLIP.num_patches)
    mask[0, 5] = 1  # place (t=0, h=1, w=2)
    pixels = CLIP.expand_mask(mask)
    assert pixels.shape == (1, 1, 4, 8, 12)
    assert pixels.sum() == 2 * 4 * 4 and pixels[0, 0, :2, 4:8, 8:12].all()


# ------------------------------------------------------------------ position tables
def test_image_sincos_is_the_reference_table():
    table = position_table("sincos").fixed(IMAGE, 64, True)[""]  # type: ignore[misc]
    assert torch.equal(table, sincos_2d(64, (3, 5)))


def test_3d_sincos_splits_width_height_time_six_six_four():
    """Prithvi's layout: channels [0, 6D/16) encode the column, [6D/16, 12D/16) the row, the rest the frame."""
    table = sincos_3d(32, (2, 3, 4), cls_token=True)[0]
    assert torch.equal(table[0], torch.zeros(32))
    t, h, w = 1, 2, 3
    row = table[1 + (t * 3 + h) * 4 + w]
    assert torch.allclose(row[:12], sincos_1d(12, torch.tensor([w]))[0].float())
    assert torch.allclose(row[12:24], sincos_1d(12, torch.tensor([h]))[0].float())
    assert torch.allclose(row[24:], sincos_1d(8, torch.tensor([t]))[0].float())


def test_1d_sinusoid_interleaves_sine_and_cosine():
    """VideoMAE's table: position i, channel j is i / 10000^(2 floor(j/2) / D), sine on even j, cosine on odd j."""
    table = sinusoid_table(8, 5)[0]
    i, j = 3, 5
    angle = i / 10000 ** (2 * (j // 2) / 8)
    assert table[i, j].item() == pytest.approx(math.cos(angle), abs=1e-7)
    assert table[i, j - 1].item() == pytest.approx(math.sin(angle), abs=1e-7)


def test_separable_positions_add_a_spatial_and_a_temporal_table():
    """MAE-ST: token (t, s) gets spatial[s] + temporal[t]; the class token its own learned row."""
    model = MaskedAutoencoderViT(tiny(num_frames=4, pos_embed_type="separable"))
    assert {"pos_embed_spatial", "pos_embed_temporal", "pos_embed_class"} <= set(model.state_dict())
    assert model.pos_embed_spatial.requires_grad and "pos_embed" not in dict(model.named_parameters())
    table = model.position_embedding()  # [1, 1 + 2*2*2, 32]
    t, s = 1, 3
    assert torch.equal(table[0, 1 + t * 4 + s], model.pos_embed_spatial[0, s] + model.pos_embed_temporal[0, t])
    assert torch.equal(table[0, 0], model.pos_embed_class[0, 0])
    with pytest.raises(ConfigError, match="separable positions"):
        tiny(num_frames=0, tubelet_size=1, pos_embed_type="separable")


def test_learned_positions_train():
    model = MaskedAutoencoderViT(tiny(pos_embed_type="learned"))
    model(torch.randn(2, 3, 4, 8, 8))[0].backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0


# ------------------------------------------------------------------ mask strategies
def _mask(strategy: str, grid: TokenGrid, ratio: float, n: int = 6, seed: int = 0) -> M.Masking:
    torch.manual_seed(seed)
    return M.make_masking(strategy, grid, n, ratio, generator=torch.Generator().manual_seed(seed), min_block=1)


def _expected_removed(strategy: str, grid: TokenGrid, ratio: float) -> int:
    places = math.prod(grid.spatial)
    leading = grid.num_tokens // places
    if strategy == "random":
        return grid.num_tokens - int(grid.num_tokens * (1 - ratio))
    if strategy in ("block", "consistent"):
        return leading * (places - int(places * (1 - ratio)))
    if strategy == "tube":
        return leading * int(ratio * places)
    if strategy == "grid":
        h, w = grid.spatial
        return leading * (places - ((h + 1) // 2) * ((w + 1) // 2))
    frames = grid.grid[0]  # frame
    return (frames - int(frames * (1 - ratio))) * grid.num_tokens // frames


CASES = [(s, g) for s in M.MASK_STRATEGIES for g in GRIDS if s != "frame" or g.has_time]
CASE_IDS = [f"{s}-{'x'.join(map(str, g.token_shape))}" for s, g in CASES]


@pytest.mark.parametrize(("strategy", "grid"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_every_strategy_removes_its_exact_count_on_every_grid(strategy, grid, ratio):
    """Each sample removes exactly the strategy's count, and ids_keep / ids_restore / mask agree."""
    m = _mask(strategy, grid, ratio)
    removed = _expected_removed(strategy, grid, ratio)
    assert torch.equal(m.mask.sum(1), torch.full((6,), float(removed)))
    assert m.ids_keep.shape == (6, grid.num_tokens - removed)
    expected = torch.ones(6, grid.num_tokens)
    expected.scatter_(1, m.ids_keep, 0.0)
    assert torch.equal(m.mask, expected)
    assert torch.equal(m.ids_restore.sort(1).values, torch.arange(grid.num_tokens).expand(6, -1))


@pytest.mark.parametrize("strategy", ["tube", "consistent", "block", "grid"])
@pytest.mark.parametrize("grid", [CLIP, GROUPED], ids=["clip", "grouped"])
def test_spatial_strategies_share_one_mask_along_time_and_groups(strategy, grid):
    """A tube mask (and every spatial strategy) is the same for every frame and every channel group."""
    m = _mask(strategy, grid, 0.5, n=4, seed=1).mask.reshape(4, -1, math.prod(grid.spatial))
    assert torch.equal(m, m[:, :1].expand_as(m))
    assert not torch.equal(m[0], m[1]) or strategy == "grid"  # samples differ (grid is one pattern by design)


def test_random_masking_is_independent_per_frame_and_group():
    m = _mask("random", GROUPED, 0.5, n=8, seed=2).mask.reshape(8, -1, 4)
    assert any(not torch.equal(row, row[:1].expand_as(row)) for row in m)


def test_frame_masking_removes_whole_frames():
    m = _mask("frame", CLIP, 0.5, n=5).mask.reshape(5, 2, 6)
    per_frame = m.sum(-1)
    assert set(per_frame.flatten().tolist()) <= {0.0, 6.0} and torch.equal(per_frame.sum(1), torch.full((5,), 6.0))
    with pytest.raises(ConfigError, match="time axis"):
        _mask("frame", IMAGE, 0.5)


def test_tube_masking_is_videomaes_count():
    """VideoMAE removes int(ratio * h * w) places per frame: at 90% of 14 x 14, 176 removed and 160 of 1568 kept."""
    grid = TokenGrid((16, 224, 224), (2, 16, 16), 3)
    m = M.make_masking("tube", grid, 2, 0.9)
    assert m.ids_keep.shape == (2, 160)


def test_a_strategy_is_one_function_and_a_registration():
    def every_other(grid, n, ratio, device, noise=None, generator=None, **options):
        mask = (torch.arange(grid.num_tokens) % 2).float().expand(n, -1)
        return M.masking_from_mask(mask.to(device))

    M.register_mask_strategy("every_other", every_other)
    try:
        model = MaskedAutoencoderViT(tiny(mask_strategy="every_other"))
        _, _, mask = model(torch.randn(2, 3, 4, 8, 8))
        assert torch.equal(mask[0], (torch.arange(8) % 2).float())
    finally:
        M._STRATEGIES.pop("every_other")
    with pytest.raises(ConfigError, match=r"unknown mask_strategy 'tubes'.*did you mean 'tube'"):
        tiny(mask_strategy="tubes")


# ------------------------------------------------------------------ the model on other grids
@pytest.mark.parametrize("pos", ["sincos", "sincos_1d", "separable", "learned"])
@pytest.mark.parametrize("cls_token", [True, False])
def test_a_clip_model_trains_on_n_c_t_h_w(pos, cls_token):
    """Forward, loss and backward on [N, C, T, H, W] tubelets with every position table, with and without a class
    token; features cover every token; the reconstruction has the clip's shape."""
    model = MaskedAutoencoderViT(tiny(pos_embed_type=pos, cls_token=cls_token, mask_ratio=0.5))
    clips = torch.randn(2, 3, 4, 8, 8)
    loss, pred, mask = model(clips)
    assert pred.shape == (2, 8, 2 * 4 * 4 * 3) and mask.shape == (2, 8) and torch.isfinite(loss)
    loss.backward()
    assert model.patch_embed.proj.weight.grad is not None
    assert model.forward_features(clips).shape == (2, int(cls_token) + 8, 32)
    assert model.reconstruct(clips)[0].shape == clips.shape
    with pytest.raises(InputError, match=r"expected input \[N, 3, 4, 8, 8\]"):
        model(torch.randn(2, 3, 8, 8))


def test_a_one_frame_signal_keeps_its_time_axis():
    """Prithvi's layout with T = 1: input [N, C, 1, H, W], patches 1 x p x p."""
    model = MaskedAutoencoderViT(tiny(num_frames=1, tubelet_size=1))
    assert model(torch.randn(2, 3, 1, 8, 8))[1].shape == (2, 4, 48)


def test_channel_groups_give_each_group_its_own_tokens_and_embedding():
    model = MaskedAutoencoderViT(tiny(in_chans=4, num_frames=2, tubelet_size=1, channel_groups=[[0, 1], [2, 3]],
                                      mask_strategy="consistent", mask_ratio=0.5))
    assert {"patch_embed.embeds.0.proj.weight", "patch_embed.embeds.1.proj.weight"} <= set(model.state_dict())
    loss, pred, _ = model(torch.randn(2, 4, 2, 8, 8))
    assert pred.shape == (2, 2 * 2 * 4, 1 * 4 * 4 * 2) and torch.isfinite(loss)
    with pytest.raises(ConfigError, match="groups of equal size"):
        tiny(in_chans=3, channel_groups=[[0, 1], [2]])


def test_an_audio_spectrogram_is_a_non_square_one_channel_image():
    """Audio-MAE's input (one log-mel channel, time x frequency, a non-square grid) needs no new model class."""
    model = MaskedAutoencoderViT(tiny(img_size=(32, 8), in_chans=1, num_frames=0, tubelet_size=1))
    assert model.grid_size == (8, 2)
    loss, pred, _ = model(torch.randn(3, 1, 32, 8))
    assert pred.shape == (3, 16, 16) and torch.isfinite(loss)


@pytest.mark.parametrize("config", [{}, {"num_frames": 0, "tubelet_size": 1}], ids=["clip", "image"])
def test_mask_and_noise_give_the_same_result_for_the_same_removed_set(config):
    """``mask=`` (True = removed, Hugging Face's bool_masked_pos) and ``noise=`` that removes the same tokens give
    the same loss and prediction."""
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(tiny(**config)).eval()
    x = torch.randn(2, *model.token_grid.input_shape)
    noise = torch.rand(2, model.token_grid.num_tokens)
    loss_n, pred_n, mask_n = model(x, 0.5, noise=noise)
    loss_m, pred_m, mask_m = model(x, 0.5, mask=mask_n.bool())
    assert torch.equal(mask_n, mask_m)
    assert torch.allclose(loss_n, loss_m, atol=1e-6) and torch.allclose(pred_n, pred_m, atol=1e-5)
    with pytest.raises(InputError, match="mask must have shape"):
        model(x, mask=mask_n[:, :-1].bool())


def test_the_image_model_is_unchanged():
    """The registered image models build the same parameters, keys and tables as before the token grid."""
    model = build_model("mae_vit_micro_patch4_28")
    assert model.grid_size == (7, 7) and model.num_prefix_tokens == 1
    assert model.pos_embed.shape == (1, 50, 128) and not model.pos_embed.requires_grad
    assert torch.equal(model.pos_embed, sincos_2d(128, (7, 7)))
    assert type(model.patch_embed).__name__ == "PatchEmbed"


def test_every_model_field_can_be_set_from_a_recipe_config():
    """The recipes' `model:` section offers exactly the fields of `MAEConfig` (plus the registered name), so a field
    added to the model is settable from YAML and the command line."""
    from dataclasses import fields

    from mae.models.mae import config_fields
    from mae.recipes.common import ModelSection

    assert {f.name for f in fields(ModelSection)} - {"name"} == set(config_fields())
