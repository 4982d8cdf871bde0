"""The masked autoencoder: sizes, fixed position tables, initialisation, encoder / decoder / loss behaviour,
timm compatibility, targets, ablations, errors and the registry.

Every check that compares against "the reference" uses numbers from docs/paper-facts.md or a computation
written here independently (numpy loops), never the library's own helpers.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import mae
import mae.models.mae as mae_module
from mae.errors import ConfigError, InputError
from mae.models import targets as targets_lib
from mae.models.mae import MAEConfig, MaskedAutoencoderViT
from mae.models.patches import patchify, unpatchify
from mae.models.pos_embed import sincos_2d
from mae.models.targets import HOGTarget, PCATarget, TokenTarget

TINY = {"img_size": 32, "patch_size": 8, "in_chans": 3, "embed_dim": 32, "depth": 2, "num_heads": 4,
        "decoder_embed_dim": 16, "decoder_depth": 2, "decoder_num_heads": 2}


def tiny(**overrides) -> MaskedAutoencoderViT:
    """A tiny MAE (4x4 grid of 8x8 patches) for fast behavioural tests."""
    torch.manual_seed(0)
    return MaskedAutoencoderViT(MAEConfig(**{**TINY, **overrides}))


def randomize_(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Perturb every parameter so that zero biases / unit norms cannot hide a wrong wiring."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def images(model: MaskedAutoencoderViT, n: int = 2, seed: int = 1) -> torch.Tensor:
    h, w = model.config.image_hw
    return torch.randn(n, model.in_chans, h, w, generator=torch.Generator().manual_seed(seed))


def noise_for(model: MaskedAutoencoderViT, n: int = 2, seed: int = 2) -> torch.Tensor:
    length = model.grid_size[0] * model.grid_size[1]
    return torch.rand(n, length, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ independent reference computations
def np_sincos_table(dim: int, h: int, w: int) -> np.ndarray:
    """2-D sin-cos table [1 + h*w, dim] as described in paper-facts.md: grid = meshgrid(w, h) so channel half 0
    encodes the column, omega = 1 / 10000**(i / (dim/4)), sin block then cos block, class row zero."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    table = np.zeros((1 + h * w, dim), dtype=np.float64)
    for r in range(h):
        for c in range(w):
            row = 1 + r * w + c
            col_phase, row_phase = c * omega, r * omega
            table[row] = np.concatenate([np.sin(col_phase), np.cos(col_phase), np.sin(row_phase), np.cos(row_phase)])
    return table


def np_patchify(imgs: np.ndarray, p: int) -> np.ndarray:
    """[N, C, H, W] -> [N, h*w, p*p*C] by explicit loops: row-major grid, (row-in-patch, col-in-patch, channel)."""
    n, c, height, width = imgs.shape
    h, w = height // p, width // p
    out = np.zeros((n, h * w, p * p * c), dtype=np.float64)
    for b in range(n):
        for gy in range(h):
            for gx in range(w):
                vec = []
                for i in range(p):
                    for j in range(p):
                        vec.extend(imgs[b, ch, gy * p + i, gx * p + j] for ch in range(c))
                out[b, gy * w + gx] = vec
    return out


def np_mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool) -> float:
    """Mean over removed patches of the per-patch MSE; norm_pix targets use unbiased variance + 1e-6."""
    target = np_patchify(imgs.double().numpy(), p)
    if norm_pix:
        mean = target.mean(-1, keepdims=True)
        var = target.var(-1, ddof=1, keepdims=True)
        target = (target - mean) / np.sqrt(var + 1e-6)
    per_patch = ((pred.detach().double().numpy() - target) ** 2).mean(-1)
    m = mask.double().numpy()
    return float((per_patch * m).sum() / m.sum())


def block_params(dim: int) -> int:
    """One pre-norm Transformer block: two LayerNorms, qkv, proj, MLP (ratio 4), all with biases."""
    return (2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (4 * dim * dim + 4 * dim)
            + (4 * dim * dim + dim))


def vit_encoder_params(dim: int, depth: int, patch: int, chans: int, num_patches: int) -> int:
    """ViT encoder parameters counted by hand: patch conv, class token, position table, blocks, final norm."""
    return (dim * chans * patch * patch + dim) + dim + (num_patches + 1) * dim + depth * block_params(dim) + 2 * dim


def mae_decoder_params(dim: int, ddim: int, ddepth: int, patch: int, chans: int, num_patches: int) -> int:
    """Decoder: embed Linear, mask token, position table, blocks, norm, prediction Linear (p*p*C outputs)."""
    out = patch * patch * chans
    return ((dim * ddim + ddim) + ddim + (num_patches + 1) * ddim + ddepth * block_params(ddim) + 2 * ddim
            + (ddim * out + out))


# ------------------------------------------------------------------ 1. parameter counts
PAPER_SIZES = [
    # name, whole MAE (M, reference), encoder (M, paper table incl. a 1000-class head), width, depth, patch
    ("mae_vit_base_patch16", 111.91, 86, 768, 12, 16),
    ("mae_vit_large_patch16", 329.54, 304, 1024, 24, 16),
    ("mae_vit_huge_patch14", 657.07, 632, 1280, 32, 14),
]


@pytest.mark.parametrize("name,total_m,encoder_m,width,depth,patch", PAPER_SIZES)
def test_parameter_counts_match_the_reference(name, total_m, encoder_m, width, depth, patch):
    """Whole-MAE parameter count equals the reference's (to 0.01 M) and a hand count; the encoder equals a hand
    count and the paper's ViT size (paper counts include the 1000-class head, truncated to whole millions)."""
    with torch.device("meta"):
        model = mae.create_model(name)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total / 1e6 - total_m) < 0.01
    num_patches = (224 // patch) ** 2
    encoder = sum(v.numel() for v in model.encoder_state_dict().values())
    assert encoder == vit_encoder_params(width, depth, patch, 3, num_patches)
    assert total == encoder + mae_decoder_params(width, 512, 8, patch, 3, num_patches)
    assert int((encoder + width * 1000 + 1000) / 1e6) == encoder_m


def test_encoder_count_equals_timm_vit():
    """The encoder part holds exactly as many parameters as timm's ViT-L/16 without a head."""
    with torch.device("meta"):
        model = mae.create_model("mae_vit_large_patch16")
        vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, num_classes=0)
    assert sum(v.numel() for v in model.encoder_state_dict().values()) == sum(p.numel() for p in vit.parameters())


# ------------------------------------------------------------------ 2. position tables
@pytest.mark.parametrize("dim,grid", [(768, (14, 14)), (512, (14, 14)), (32, (3, 5)), (16, (5, 3)), (8, (1, 4))])
def test_sincos_table_matches_independent_computation(dim, grid):
    """sincos_2d equals the numpy table of paper-facts.md (column coordinate first) for square and non-square
    grids, class row zero."""
    table = sincos_2d(dim, grid)
    assert table.shape == (1, 1 + grid[0] * grid[1], dim) and table.dtype == torch.float32
    expected = np_sincos_table(dim, *grid)
    np.testing.assert_allclose(table[0].double().numpy(), expected, atol=1e-6, rtol=0)
    assert torch.count_nonzero(table[0, 0]) == 0


@pytest.mark.parametrize("img_size,patch,grid", [(224, 16, (14, 14)), ((24, 40), 8, (3, 5)), ((40, 24), 8, (5, 3))])
def test_model_position_tables_are_fixed_sincos(img_size, patch, grid):
    """Both model tables (pos_embed, decoder_pos_embed) equal the independent table for the model's grid and
    are not trainable."""
    model = MaskedAutoencoderViT(MAEConfig(**{**TINY, "img_size": img_size, "patch_size": patch}))
    assert model.grid_size == grid
    for name, dim in (("pos_embed", 32), ("decoder_pos_embed", 16)):
        table = getattr(model, name)
        assert not table.requires_grad, name
        np.testing.assert_allclose(table[0].detach().double().numpy(), np_sincos_table(dim, *grid), atol=1e-6)


# ------------------------------------------------------------------ 3. initialisation
@pytest.fixture(scope="module")
def vit_b() -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return mae.create_model("mae_vit_base_patch16")


def _check_xavier_uniform(weight: torch.Tensor, fan_in: int, fan_out: int, what: str) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    w = weight.detach()
    assert w.abs().max() <= bound * (1 + 1e-6), what
    assert w.abs().max() >= 0.99 * bound, what  # uniform fills its interval
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.02 * bound / math.sqrt(3), what
    assert abs(w.mean().item()) < 0.01 * bound, what


def test_linear_layers_are_xavier_uniform_with_zero_bias(vit_b):
    """Every nn.Linear (encoder, decoder, prediction head) is xavier-uniform: inside sqrt(6/(in+out)), std
    bound/sqrt(3) within 2%; biases zero. (PyTorch's default would have bound 1/sqrt(in).)"""
    linears = [(n, m) for n, m in vit_b.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 12 * 4 + 8 * 4 + 2
    for name, layer in linears:
        _check_xavier_uniform(layer.weight, layer.in_features, layer.out_features, name)
        assert torch.count_nonzero(layer.bias) == 0, name


def test_layernorms_are_unit_weight_zero_bias_eps_1e6(vit_b):
    """Every LayerNorm has weight 1, bias 0 and eps 1e-6 (not PyTorch's 1e-5)."""
    norms = [(n, m) for n, m in vit_b.named_modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 12 * 2 + 1 + 8 * 2 + 1
    for name, ln in norms:
        assert ln.eps == 1e-6, name
        assert torch.equal(ln.weight, torch.ones_like(ln.weight)), name
        assert torch.equal(ln.bias, torch.zeros_like(ln.bias)), name


def test_patch_conv_is_xavier_on_its_matrix_view(vit_b):
    """The patch-embedding conv [768, 3, 16, 16] is xavier-uniform as a [768, 768] matrix (not as a 4-D conv,
    whose fans would be 768 and 768*256)."""
    w = vit_b.patch_embed.proj.weight
    assert w.shape == (768, 3, 16, 16)
    _check_xavier_uniform(w.reshape(768, -1), 768, 768, "patch_embed.proj")


def test_tokens_are_normal_std_0_02(vit_b):
    """cls_token and mask_token are drawn from N(0, 0.02^2)."""
    for name in ("cls_token", "mask_token"):
        t = getattr(vit_b, name).detach().double()
        assert abs(t.std().item() - 0.02) < 0.003, name
        assert abs(t.mean().item()) < 0.003, name


def test_small_layers_are_xavier_too():
    """In a tiny model the layers are also xavier-uniform with their own fans: the head [16 -> 192] and the
    patch conv [32, 3*8*8] fill, but do not exceed, sqrt(6 / (fan_in + fan_out))."""
    model = tiny()
    for weight, fan_in, fan_out in ((model.decoder_pred.weight, 16, 192),
                                    (model.patch_embed.proj.weight.reshape(32, -1), 192, 32)):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert bound * 0.9 < weight.abs().max() <= bound


# ------------------------------------------------------------------ 4. patches
def test_patchify_order_on_hand_built_example():
    """patchify flattens each patch as (row-in-patch, col-in-patch, channel), patches row-major over the grid:
    checked value by value on an image whose pixels encode (channel, y, x)."""
    c, p, height, width = 2, 2, 4, 6
    img = torch.zeros(1, c, height, width)
    for ch in range(c):
        for y in range(height):
            for x in range(width):
                img[0, ch, y, x] = 100 * ch + 10 * y + x
    patches = patchify(img, p)
    assert patches.shape == (1, 6, p * p * c)
    for gy in range(2):
        for gx in range(3):
            for i in range(p):
                for j in range(p):
                    for ch in range(c):
                        expected = 100 * ch + 10 * (gy * p + i) + (gx * p + j)
                        assert patches[0, gy * 3 + gx, (i * p + j) * c + ch] == expected
    # spot values: patch 1 (row 0, col 1) starts with pixel (y=0, x=2) of channel 0 then channel 1
    assert patches[0, 1, :4].tolist() == [2.0, 102.0, 3.0, 103.0]


@pytest.mark.parametrize("in_chans", [1, 3, 4])
@pytest.mark.parametrize("hw", [(32, 32), (32, 48), (48, 16)])
def test_patchify_matches_loops_and_round_trips(in_chans, hw):
    """For 1, 3, 4 channels and non-square images, model.patchify equals the loop version and unpatchify
    inverts it exactly."""
    model = MaskedAutoencoderViT(MAEConfig(**{**TINY, "img_size": hw, "in_chans": in_chans}))
    imgs = torch.randn(2, in_chans, *hw)
    patches = model.patchify(imgs)
    assert patches.shape == (2, (hw[0] // 8) * (hw[1] // 8), 64 * in_chans)
    np.testing.assert_array_equal(patches.double().numpy(), np_patchify(imgs.double().numpy(), 8))
    assert torch.equal(model.unpatchify(patches), imgs)


def test_patchify_and_unpatchify_reject_bad_shapes():
    """Non-divisible images and patch tensors that do not fit the grid raise InputError naming the sizes."""
    with pytest.raises(InputError, match="30x32"):
        patchify(torch.zeros(1, 3, 30, 32), 8)
    with pytest.raises(InputError, match="4x4"):
        unpatchify(torch.zeros(1, 15, 192), 8, (4, 4), 3)


# ------------------------------------------------------------------ 5. loss
@pytest.mark.parametrize("target", ["pixel", "norm_pixel"])
def test_loss_equals_hand_computation(target):
    """forward's loss is the mean over removed patches of the per-patch MSE against (normalised) pixels."""
    model = randomize_(tiny(target=target))
    imgs = images(model)
    loss, pred, mask = model(imgs, 0.75, noise_for(model))
    assert mask.sum() == 2 * 12
    expected = np_mae_loss(imgs, pred, mask, 8, norm_pix=target == "norm_pixel")
    assert abs(loss.item() - expected) < 1e-5 * max(1.0, expected)


def test_norm_pix_loss_switch_selects_normalised_targets():
    """The reference switch norm_pix_loss=True trains on normalised pixels (the loss differs from raw pixels)."""
    model = tiny(norm_pix_loss=True)
    assert model.config.target == "norm_pixel"
    imgs = images(model) * 3 + 1
    pred = torch.zeros(2, 16, 192)
    mask = torch.ones(2, 16)
    expected = np_mae_loss(imgs, pred, mask, 8, norm_pix=True)
    assert abs(model.forward_loss(imgs, pred, mask).item() - expected) < 1e-5
    assert abs(tiny().forward_loss(imgs, pred, mask).item() - expected) > 0.1


@pytest.mark.parametrize("target", ["pixel", "norm_pixel"])
def test_loss_ignores_predictions_on_kept_patches(target):
    """Changing predictions at kept patches leaves the loss bit-identical; changing one removed patch's
    prediction changes it."""
    model = tiny(target=target)
    imgs = images(model)
    _, pred, mask = model(imgs, 0.75, noise_for(model))
    pred = pred.detach()
    base = model.forward_loss(imgs, pred, mask)
    kept = mask == 0
    changed = pred.clone()
    changed[kept] += 5.0
    assert torch.equal(model.forward_loss(imgs, changed, mask), base)
    removed_idx = mask[0].nonzero()[0].item()
    changed = pred.clone()
    changed[0, removed_idx] += 1.0
    assert model.forward_loss(imgs, changed, mask) > base


# ------------------------------------------------------------------ 6. encoder, decoder, forward_features
def test_forward_features_deterministic_and_shaped():
    """forward_features runs the full unmasked encoder: [N, 1+L, D], identical on two calls."""
    model = tiny().eval()
    imgs = images(model)
    a, b = model.forward_features(imgs), model.forward_features(imgs)
    assert a.shape == (2, 17, 32)
    assert torch.equal(a, b)


@pytest.mark.parametrize("img_size,in_chans", [(32, 3), ((32, 48), 1), ((48, 32), 4)])
def test_forward_features_equals_timm_vit(img_size, in_chans):
    """The encoder's state_dict loads strictly into a matching timm VisionTransformer, whose forward_features
    then equals ours to 1e-5 (weights randomised first so that no wiring hides behind the init)."""
    model = randomize_(tiny(img_size=img_size, in_chans=in_chans)).eval()
    vit = VisionTransformer(img_size=img_size, patch_size=8, in_chans=in_chans, embed_dim=32, depth=2, num_heads=4,
                            qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0,
                            class_token=True, global_pool="token").eval()
    vit.load_state_dict(model.encoder_state_dict(), strict=True)
    imgs = images(model)
    with torch.no_grad():
        ours, theirs = model.forward_features(imgs), vit.forward_features(imgs)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-5


def test_encoder_state_dict_has_only_encoder_keys():
    """encoder_state_dict holds the timm key names and no decoder, mask token or target entries."""
    keys = set(tiny().encoder_state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "blocks.1.mlp.fc2.bias"} <= keys
    assert not any(k.startswith(("decoder", "mask_token", "target")) for k in keys)


def test_masked_encoder_without_masking_equals_forward_features():
    """With ratio 0 the masked encoder sees every patch: its output is forward_features with patch tokens in
    shuffle order (identity when the noise is increasing)."""
    model = randomize_(tiny()).eval()
    imgs = images(model)
    with torch.no_grad():
        full = model.forward_features(imgs)
        ordered = torch.linspace(0, 0.9, 16).expand(2, -1).contiguous()
        latent, _ = model.forward_encoder(imgs, 0.0, ordered)
        assert torch.allclose(latent, full, atol=1e-5)
        latent, m = model.forward_encoder(imgs, 0.0, noise_for(model))
        expected = torch.gather(full[:, 1:], 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, 32))
        assert torch.allclose(latent[:, 1:], expected, atol=1e-5)
        assert torch.allclose(latent[:, 0], full[:, 0], atol=1e-5)


def test_encoder_runs_on_visible_tokens_only():
    """The default encoder's blocks see 1 + K tokens (K = int(L * 0.25) = 4), the latent is [N, 1+K, D], and
    the pixels of removed patches have no influence on the prediction."""
    model = randomize_(tiny()).eval()
    seen = []
    hook = model.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    imgs, noise = images(model), noise_for(model)
    latent, _ = model.forward_encoder(imgs, 0.75, noise)
    hook.remove()
    assert seen == [1 + 4] and latent.shape == (2, 5, 32)
    with torch.no_grad():
        _, pred, mask = model(imgs, 0.75, noise)
        scrambled = model.unpatchify(torch.where(mask.bool().unsqueeze(-1), torch.randn(2, 16, 192),
                                                 model.patchify(imgs)))
        _, pred2, _ = model(scrambled, 0.75, noise)
    assert not torch.equal(scrambled, imgs)
    assert torch.equal(pred, pred2)


def test_decoder_puts_every_token_back_in_patch_order():
    """With a 0-block decoder (purely per-token), the prediction for kept patch j comes from the latent token
    of patch j and the prediction for a removed patch comes from the mask token plus patch j's position."""
    model = randomize_(tiny(decoder_depth=0)).eval()
    imgs, noise = images(model), noise_for(model)
    with torch.no_grad():
        latent, m = model.forward_encoder(imgs, 0.75, noise)
        pred = model.forward_decoder(latent, m)

        def head(x):
            return model.decoder_pred(model.decoder_norm(x))

        dpos = model.decoder_pos_embed[0]
        for i in range(2):
            token_of = {int(pid): t for t, pid in enumerate(m.ids_keep[i])}
            for j in range(16):
                if m.mask[i, j] == 0:
                    expected = head(model.decoder_embed(latent[i, 1 + token_of[j]]) + dpos[1 + j])
                else:
                    expected = head(model.mask_token[0, 0] + dpos[1 + j])
                assert torch.allclose(pred[i, j], expected, atol=1e-5), (i, j)


def test_same_noise_gives_same_output_and_mask():
    """The noise argument makes forward reproducible: same noise -> same mask, prediction and loss."""
    model = tiny().eval()
    imgs, noise = images(model), noise_for(model)
    a, b = model(imgs, 0.75, noise), model(imgs, 0.75, noise.clone())
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    small_first = torch.linspace(0, 0.9, 16).expand(2, -1).contiguous()
    _, _, mask = model(imgs, 0.75, small_first)
    assert torch.equal(mask[0], torch.cat([torch.zeros(4), torch.ones(12)]))


def test_explicit_mask_and_config_ratio_are_used():
    """forward(mask=...) uses that mask; without a ratio the config's mask_ratio applies."""
    model = tiny(mask_ratio=0.5)
    imgs = images(model)
    _, _, mask = model(imgs)
    assert torch.equal(mask.sum(1), torch.full((2,), 8.0))
    given = torch.zeros(2, 16)
    given[:, [0, 5, 10]] = 1
    _, _, mask = model(imgs, mask=given)
    assert torch.equal(mask, given)


@pytest.mark.parametrize("strategy,removed", [("random", 12), ("block", 12), ("grid", 12)])
def test_every_mask_strategy_runs_through_the_model(strategy, removed):
    """Each strategy gives equal removed counts per sample and a finite loss through the whole model."""
    model = tiny(mask_strategy=strategy, mask_min_block=4)  # 12 of 16 patches: blocks of BEiT's 16 do not fit
    loss, _, mask = model(images(model, 3), 0.75)
    assert torch.isfinite(loss)
    assert torch.equal(mask.sum(1), torch.full((3,), float(removed)))


# ------------------------------------------------------------------ 7. channels and shapes
@pytest.mark.parametrize("in_chans", [1, 3, 4])
@pytest.mark.parametrize("img_size", [32, (32, 48), (16, 40)])
def test_forward_any_channels_and_aspect(in_chans, img_size):
    """The model trains on 1, 3 or 4 channels and non-square images: pred [N, L, p*p*C], finite loss."""
    model = tiny(img_size=img_size, in_chans=in_chans)
    h, w = model.config.image_hw
    loss, pred, mask = model(images(model), 0.75)
    length = (h // 8) * (w // 8)
    assert pred.shape == (2, length, 64 * in_chans) and mask.shape == (2, length)
    assert mask.sum(1).eq(length - int(length * 0.25)).all()
    assert torch.isfinite(loss)
    assert model.unpatchify(pred).shape == (2, in_chans, h, w)


# ------------------------------------------------------------------ 8. ablations
def test_mask_in_encoder_ablation():
    """mask_in_encoder: the encoder blocks see 1 + L tokens, the model has encoder_mask_token but no decoder
    mask_token, removed pixels never reach the encoder, and the loss is still over removed patches only."""
    model = randomize_(tiny(mask_in_encoder=True)).eval()
    assert not hasattr(model, "mask_token")
    names = dict(model.named_parameters())
    assert "encoder_mask_token" in names and "mask_token" not in names
    seen = []
    hook = model.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    imgs, noise = images(model), noise_for(model)
    latent, _ = model.forward_encoder(imgs, 0.75, noise)
    hook.remove()
    assert seen == [17] and latent.shape == (2, 17, 32)
    with torch.no_grad():
        loss, pred, mask = model(imgs, 0.75, noise)
        assert abs(loss.item() - np_mae_loss(imgs, pred, mask, 8, norm_pix=False)) < 1e-5
        changed = pred.clone()
        changed[mask == 0] += 3.0
        assert torch.equal(model.forward_loss(imgs, changed, mask), loss)
        scrambled = model.unpatchify(torch.where(mask.bool().unsqueeze(-1), torch.randn(2, 16, 192),
                                                 model.patchify(imgs)))
        latent2, _ = model.forward_encoder(scrambled, 0.75, noise)
    assert torch.equal(latent, latent2)


def test_grad_checkpointing_gives_same_loss_and_gradients(monkeypatch):
    """Gradient checkpointing recomputes activations only: loss and every gradient match the plain run, and
    the checkpoint function is really used for every block."""
    model = randomize_(tiny()).train()
    imgs, noise = images(model), noise_for(model)

    def run():
        model.zero_grad(set_to_none=True)
        loss, _, _ = model(imgs, 0.75, noise)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_a, grads_a = run()
    calls = []
    real = mae_module.checkpoint
    monkeypatch.setattr(mae_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.set_grad_checkpointing(True)
    loss_b, grads_b = run()
    assert len(calls) == 2 + 2  # encoder and decoder blocks
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5), name


# targets ---------------------------------------------------------------------------------------------------
def test_hog_target_shape_finite_and_normalised():
    """HOG targets have dim C * bins * (p / cell)^2, are finite, and each (patch, channel) histogram has unit
    L2 norm; the model's prediction head matches that width."""
    target = HOGTarget(8, 3, bins=9)
    assert target.dim == 3 * 9 * (8 // 4) ** 2
    imgs = torch.rand(2, 3, 32, 48)
    out = target(imgs)
    assert out.shape == (2, 24, target.dim)
    assert torch.isfinite(out).all()
    norms = out.reshape(2, 24, 3, -1).norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    model = tiny(target="hog")
    assert model.decoder_pred.out_features == model.target.dim == 3 * 9 * 4
    loss, pred, _ = model(images(model), 0.75)
    assert torch.isfinite(loss) and pred.shape == (2, 16, 108)


@pytest.mark.parametrize("direction,expected_bin", [("x", 0), ("y", 4)])
def test_hog_orientation_of_a_ramp(direction, expected_bin):
    """A horizontal intensity ramp puts all gradient mass in orientation bin 0, a vertical one in bin
    int(9 * (pi/2) / pi) = 4; inside the image every cell of a patch gets the same normalised value 1/2."""
    target = HOGTarget(8, 1, bins=9, cell_size=4)
    ramp = torch.arange(32, dtype=torch.float32)
    img = (ramp.view(1, 32) if direction == "x" else ramp.view(32, 1)).expand(32, 32).reshape(1, 1, 32, 32)
    hist = target(img).reshape(16, 2, 2, 9)  # [L, cell row, cell col, bins]
    assert torch.count_nonzero(hist[..., [b for b in range(9) if b != expected_bin]]) == 0
    interior = 1 * 4 + 1  # patch (1, 1) touches no image border
    assert torch.allclose(hist[interior, :, :, expected_bin], torch.full((2, 2), 0.5), atol=1e-6)


def test_pca_target_full_rank_reconstructs_patches():
    """A PCA target fitted on random patches with k = patch dim has orthonormal axes, explains all variance, and
    its coefficients reconstruct the patches: coef @ components + mean == patch."""
    target = PCATarget(4, 1, num_components=16)
    g = torch.Generator().manual_seed(0)
    data = [torch.rand(8, 1, 16, 16, generator=g) for _ in range(3)]
    ratio = target.fit(data)
    assert abs(float(ratio) - 1.0) < 1e-6
    assert torch.allclose(target.components @ target.components.T, torch.eye(16), atol=1e-4)
    imgs = torch.rand(2, 1, 16, 16, generator=g)
    coef = target(imgs)
    assert coef.shape == (2, 16, 16)
    recon = coef @ target.components + target.mean
    assert torch.allclose(recon, patchify(imgs, 4), atol=1e-4)


def test_pca_target_finds_a_low_rank_subspace():
    """Patches that live in a 3-D affine subspace are reconstructed exactly from k = 3 coefficients, and the
    explained-variance ratio is 1."""
    g = torch.Generator().manual_seed(1)
    basis, offset = torch.randn(3, 12, generator=g), torch.randn(12, generator=g)

    def batch(n):
        patches = torch.randn(n, 16, 3, generator=g) @ basis + offset  # [n, L, 2*2*3]
        return unpatchify(patches, 2, (4, 4), 3)

    target = PCATarget(2, 3, num_components=3)
    ratio = target.fit([batch(20)])
    assert abs(float(ratio) - 1.0) < 1e-5
    imgs = batch(2)
    recon = target(imgs) @ target.components + target.mean
    assert torch.allclose(recon, patchify(imgs, 2), atol=1e-4)


def test_unfitted_pca_raises_a_clear_error():
    """Using a PCA target before fitting it raises InputError telling the user to call fit."""
    with pytest.raises(InputError, match="fit"):
        PCATarget(4, 1, 8)(torch.rand(1, 1, 8, 8))
    model = tiny(target="pca", pca_components=12)
    assert model.decoder_pred.out_features == 12
    with pytest.raises(InputError, match="fit"):
        model(images(model))
    with pytest.raises(ConfigError, match="500"):
        tiny(target="pca", pca_components=500)


def _toy_tokenizer(imgs: torch.Tensor) -> torch.Tensor:
    """Token of a patch = its mean pixel in [0, 1) quantised into 8 bins."""
    return (patchify(imgs, 8).mean(-1).clamp(0, 0.999) * 8).long()


def test_token_target_trains_with_cross_entropy(monkeypatch):
    """A target registered with register_target (TokenTarget with a toy 8-bin tokenizer) is built by the model,
    scores removed patches with cross-entropy, and its loss decreases over a few Adam steps."""
    monkeypatch.setattr(targets_lib, "_TARGETS", dict(targets_lib._TARGETS))
    targets_lib.register_target("toy_tokens", lambda patch_size, in_chans, **kw: TokenTarget(_toy_tokenizer, 8))
    assert "toy_tokens" in targets_lib.target_names()
    model = tiny(target="toy_tokens").train()
    assert isinstance(model.target, TokenTarget) and model.decoder_pred.out_features == 8
    imgs = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = noise_for(model, 4)
    loss, pred, mask = model(imgs, 0.75, noise)
    tokens = _toy_tokenizer(imgs)
    ce = F.cross_entropy(pred.detach().reshape(-1, 8), tokens.reshape(-1), reduction="none").reshape(4, 16)
    assert torch.allclose(loss, (ce * mask).sum() / mask.sum(), atol=1e-6)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss, _, _ = model(imgs, 0.75, noise)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_token_target_keeps_and_freezes_a_module_tokenizer():
    """A tokenizer module is frozen and is not re-initialised by the model's weight init."""
    tok = nn.Linear(4, 4)
    with torch.no_grad():
        tok.weight.fill_(0.5)
        tok.bias.fill_(0.25)
    model = MaskedAutoencoderViT(MAEConfig(**TINY))
    model.target = TokenTarget(tok, 4)
    model.initialize_weights()
    assert not tok.weight.requires_grad
    assert torch.all(tok.weight == 0.5) and torch.all(tok.bias == 0.25)


def test_token_target_rejects_non_integer_tokens():
    """A tokenizer returning floats is refused with InputError naming the dtype."""
    with pytest.raises(InputError, match="float32"):
        TokenTarget(lambda imgs: torch.zeros(1, 4), 8)(torch.zeros(1, 3, 16, 16))


def test_unknown_target_suggests_a_close_name():
    """target='norm_pixl' raises ConfigError naming the bad value and suggesting 'norm_pixel'."""
    with pytest.raises(ConfigError, match=r"norm_pixl.*norm_pixel"):
        tiny(target="norm_pixl")


# ------------------------------------------------------------------ 9. errors
def test_unknown_model_name_suggests_a_close_one():
    """A misspelt model name raises ConfigError naming it and suggesting the real one."""
    with pytest.raises(ConfigError, match=r"mae_vit_bse_patch16.*mae_vit_base_patch16"):
        mae.create_model("mae_vit_bse_patch16")


def test_unknown_override_field_is_named():
    """An override that is no config field raises ConfigError naming it and the close valid field."""
    with pytest.raises(ConfigError, match=r"embed_dims.*'embed_dim'"):
        mae.model_config("mae_vit_tiny_patch16", embed_dims=64)


@pytest.mark.parametrize("overrides,pattern", [
    ({"img_size": 30}, r"30x30.*patch_size 8"),
    ({"img_size": (32, 36)}, r"32x36.*patch_size 8"),
    ({"mask_ratio": 1.0}, r"mask_ratio.*1\.0"),
    ({"mask_ratio": -0.1}, r"mask_ratio.*-0\.1"),
    ({"embed_dim": 30, "num_heads": 4}, r"embed_dim 30.*num_heads 4"),
    ({"decoder_embed_dim": 18, "decoder_num_heads": 4}, r"decoder_embed_dim 18.*decoder_num_heads 4"),
    ({"mask_strategy": "blocks"}, r"blocks"),
    ({"depth": 0}, r"depth"),
])
def test_bad_config_values_raise_config_error(overrides, pattern):
    """Impossible architecture values raise ConfigError with a message naming the bad value."""
    with pytest.raises(ConfigError, match=pattern):
        MAEConfig(**{**TINY, **overrides})


def test_forward_mask_ratio_out_of_range_is_refused():
    """forward(mask_ratio=1.0) would keep no patch: InputError naming the ratio."""
    model = tiny()
    with pytest.raises(InputError, match=r"1.0"):
        model(images(model), 1.0)


@pytest.mark.parametrize("shape,pattern", [((2, 1, 32, 32), r"\[2, 1, 32, 32\]"), ((2, 3, 32, 48), r"\[2, 3, 32, 48\]"),
                                           ((3, 32, 32), r"\[3, 32, 32\]")])
def test_wrong_input_shape_is_refused(shape, pattern):
    """Images with the wrong channel count, size or rank raise InputError giving the expected and actual shape,
    in training forward and in forward_features."""
    model = tiny()
    with pytest.raises(InputError, match=pattern) as info:
        model(torch.zeros(shape))
    assert "[N, 3, 32, 32]" in str(info.value)
    with pytest.raises(InputError, match=pattern):
        model.forward_features(torch.zeros(shape))


def test_norm_pix_loss_with_a_non_pixel_target_is_refused():
    """norm_pix_loss=True together with target='hog' is contradictory and must raise ConfigError, not be ignored."""
    with pytest.raises(ConfigError, match="hog"):
        mae.model_config("mae_vit_tiny_patch16", norm_pix_loss=True, target="hog")


def test_overriding_target_of_an_existing_config_takes_effect():
    """MaskedAutoencoderViT(config, target='pixel') on a norm-pixel config trains on raw pixels."""
    cfg = MAEConfig(**{**TINY, "norm_pix_loss": True})
    model = MaskedAutoencoderViT(cfg, target="pixel")
    assert model.config.target == "pixel"


# ------------------------------------------------------------------ 10. registry
@pytest.mark.parametrize("size,width,depth,heads", [("tiny", 192, 12, 3), ("small", 384, 12, 6), ("base", 768, 12, 12),
                                                    ("large", 1024, 24, 16), ("huge", 1280, 32, 16)])
@pytest.mark.parametrize("patch", [16, 14])
def test_registry_has_every_vit_size_with_the_paper_decoder(size, width, depth, heads, patch):
    """mae_vit_{size}_patch{16,14} are registered with the ViT encoder sizes and the default decoder
    (512 wide, 8 deep, 16 heads) at 224 px, 3 channels, random 75% masking on pixels."""
    name = f"mae_vit_{size}_patch{patch}"
    assert name in mae.list_models()
    cfg = mae.model_config(name)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (width, depth, heads, patch)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (512, 8, 16)
    assert (cfg.img_size, cfg.in_chans, cfg.mlp_ratio, cfg.norm_eps) == (224, 3, 4.0, 1e-6)
    assert (cfg.mask_strategy, cfg.mask_ratio, cfg.target, cfg.mask_in_encoder) == ("random", 0.75, "pixel", False)


@pytest.mark.parametrize("suffix,depth", [("_dec512d1b", 1), ("_dec512d8b", 8)])
def test_registry_has_decoder_depth_variants(suffix, depth):
    """The Table-1 decoder-depth variants (1 block, 8 blocks; 512 wide) exist for ViT-L/16."""
    cfg = mae.model_config("mae_vit_large_patch16" + suffix)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.embed_dim) == (512, depth, 1024)


def test_list_models_filters_by_pattern_and_overrides_apply():
    """list_models('*huge*') lists only huge models; create_model passes overrides through to the config."""
    huge = mae.list_models("*huge*")
    assert huge and all("huge" in n for n in huge)
    with torch.device("meta"):
        model = mae.create_model("mae_vit_base_patch16", norm_pix_loss=True, decoder_depth=1, img_size=112)
    assert model.config.target == "norm_pixel"
    assert len(model.decoder_blocks) == 1 and model.grid_size == (7, 7)


# ------------------------------------------------------------------ 11. gradients
@pytest.mark.parametrize("overrides", [{}, {"mask_in_encoder": True}, {"target": "norm_pixel", "in_chans": 1}])
def test_backward_gives_finite_gradients_to_every_trainable_parameter(overrides):
    """One backward pass gives every trainable parameter a finite, not-all-zero gradient; the fixed position
    tables are frozen and get none."""
    model = tiny(**overrides).train()
    loss, _, _ = model(images(model), 0.75)
    loss.backward()
    for name in ("pos_embed", "decoder_pos_embed"):
        table = getattr(model, name)
        assert not table.requires_grad and table.grad is None, name
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == sum(1 for _ in model.parameters()) - 2
    for name, p in trainable:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert torch.count_nonzero(p.grad) > 0, name


def test_replacing_norm_pix_loss_alone_switches_the_pixel_target():
    """`config.replace(norm_pix_loss=False)` on a normalised-pixel config gives the plain pixel target (the two
    spellings of the same switch never disagree)."""
    import mae

    cfg = mae.create_model("mae_vit_micro_patch4_28", norm_pix_loss=True).config
    assert cfg.target == "norm_pixel"
    off = cfg.replace(norm_pix_loss=False)
    assert off.target == "pixel" and off.norm_pix_loss is False
    assert off.replace(norm_pix_loss=True).target == "norm_pixel"


def test_attention_matches_timm_and_keeps_its_keys():
    """Our Attention (fp32 attention product on CPU under bf16 autocast) has timm's keys and gives timm's output in
    fp32 exactly and under bf16 autocast to bf16 precision; dropout in the attention only while training.

    Under bf16 autocast the product that reaches `proj` is, bit for bit, the fp32 product of the bf16 q, k, v
    rounded to bf16; a bf16 product differs from it in about a third of its entries on this input (each by up to a
    bf16 step, far inside the 0.05 that the comparison with timm allows)."""
    from timm.layers import Attention as TimmAttention

    from mae.models.mae import Attention

    torch.manual_seed(0)
    ours, ref = Attention(64, num_heads=4, qkv_bias=True), TimmAttention(64, num_heads=4, qkv_bias=True)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    seen = {}
    hooks = [ours.qkv.register_forward_hook(lambda m, args, out: seen.update(qkv=out)),
             ours.proj.register_forward_pre_hook(lambda m, args: seen.update(product=args[0]))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, slow = ours(x), ref(x)
    for hook in hooks:
        hook.remove()
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), slow.float(), rtol=0.05, atol=0.05)
    q, k, v = seen["qkv"].reshape(2, 10, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
    assert q.dtype == torch.bfloat16

    def product(dtype):
        out = torch.nn.functional.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))
        return out.to(torch.bfloat16).transpose(1, 2).reshape(2, 10, 64)

    assert torch.equal(seen["product"], product(torch.float32))
    assert not torch.equal(product(torch.bfloat16), product(torch.float32))  # the input tells the two apart
    dropping = Attention(64, num_heads=4, qkv_bias=True, attn_drop=0.5)
    dropping.load_state_dict(ours.state_dict())
    assert torch.equal(dropping.eval()(x), ours(x)) and not torch.equal(dropping.train()(x), ours(x))
    with pytest.raises(ConfigError, match="must divide"):
        Attention(64, num_heads=5)
