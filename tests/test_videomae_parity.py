"""VideoMAE on our core, proven against an implementation we did not write: transformers' VideoMAEForPreTraining.

A tiny random transformers model is converted to our MaskedAutoencoderViT (state_dict and save_pretrained directory,
through the function ``mae convert`` runs) and back; on the same clip and the same boolean mask both
give the same loss (1e-5 relative) and the same predictions of the removed tokens, with and without norm_pix_loss.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from mae.errors import CheckpointError
from mae.interop import load_model
from mae.interop import videomae_hf as vhf
from mae.interop.convert_classifier import convert_checkpoint
from mae.models import MaskedAutoencoderViT, build_model
from mae.models import masking as M
from mae.models.registry import model_config

transformers = pytest.importorskip("transformers")

TINY_HF = {"image_size": 32, "patch_size": 8, "num_channels": 3, "num_frames": 4, "tubelet_size": 2,
           "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
           "decoder_hidden_size": 16, "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 2,
           "decoder_intermediate_size": 64, "use_mean_pooling": False}
RTOL = 1e-5


def _random_hf_model(seed: int = 0, **overrides):
    """A transformers VideoMAEForPreTraining whose every parameter is set here (LayerNorm weights near 1)."""
    config = transformers.VideoMAEConfig(**{**TINY_HF, **overrides}, attn_implementation="eager")
    model = transformers.VideoMAEForPreTraining(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if re.search(r"(layernorm[^.]*|norm)\.weight$", name) else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * 0.1)
    return model


def _clip_and_mask(model: MaskedAutoencoderViT, n: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A clip [N, C, T, H, W] and VideoMAE's tube mask [N, L] (True = removed) for it."""
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(n, *model.token_grid.input_shape, generator=g)
    mask = M.make_masking("tube", model.token_grid, n, 0.75, generator=g).mask.bool()
    return clip, mask


def _losses(ours: MaskedAutoencoderViT, hf_model, clip: torch.Tensor, mask: torch.Tensor):
    with torch.no_grad():
        loss, pred, _ = ours(clip, mask=mask)
        out = hf_model(pixel_values=clip.permute(0, 2, 1, 3, 4), bool_masked_pos=mask)  # HF takes [N, T, C, H, W]
    removed = pred[mask].reshape(clip.shape[0], -1, pred.shape[-1])  # HF's logits: removed tokens, ascending
    return loss, out.loss, (removed - out.logits).abs().max().item()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / b.abs()).item()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_transformers_videomae_converted_to_ours_and_back_gives_the_same_loss(norm_pix):
    """HF state_dict -> ours -> the same loss on the same clip and mask; ours -> HF state_dict -> a fresh HF model
    loads it strictly and gives the same loss again."""
    hf_model = _random_hf_model(norm_pix_loss=norm_pix)
    config = vhf.config_from_hf(hf_model.config.to_dict())
    assert config.target == ("videomae_norm_pixel" if norm_pix else "videomae_pixel")
    ours = MaskedAutoencoderViT(config).eval()
    ours.load_state_dict(vhf.from_hf_state_dict(hf_model.state_dict(), config), strict=True)
    clip, mask = _clip_and_mask(ours)
    loss, hf_loss, logits = _losses(ours, hf_model, clip, mask)
    assert _relative(loss, hf_loss) < RTOL and logits < 1e-4

    back = transformers.VideoMAEForPreTraining(hf_model.config).eval()
    hub = vhf.to_hf_state_dict(ours)
    assert "videomae.encoder.layer.0.attention.attention.q_bias" in hub  # the Hub layout
    missing, unexpected = back.load_state_dict(_as_loaded_by_transformers(hub), strict=False)
    assert not missing and not unexpected
    with torch.no_grad():
        again = back(pixel_values=clip.permute(0, 2, 1, 3, 4), bool_masked_pos=mask).loss
    assert _relative(again, hf_loss) < RTOL


def _as_loaded_by_transformers(hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Hub's q_bias / v_bias under the names transformers 5.x keeps in memory (it renames them on load)."""
    return {k.replace("attention.attention.q_bias", "attention.attention.query.bias")
             .replace("attention.attention.v_bias", "attention.attention.value.bias"): v for k, v in hub.items()}


def test_directories_convert_both_ways_with_the_cli_converter(tmp_path):
    """save_pretrained directory (Hub layout: q_bias / v_bias) -> ``mae convert --to mae`` -> our file -> ``mae
    convert --to hf`` -> from_pretrained:
    nothing missing or unexpected, and the same loss at every step (also without the encoder's final norm)."""
    hf_model = _random_hf_model(seed=3)
    hf_model.save_pretrained(tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "ours.safetensors", to="mae")  # what `mae convert` runs
    ours = load_model(tmp_path / "ours.safetensors").eval()
    assert ours.config == vhf.config_from_hf(hf_model.config.to_dict())
    clip, mask = _clip_and_mask(ours, seed=4)
    loss, hf_loss, _ = _losses(ours, hf_model, clip, mask)
    assert _relative(loss, hf_loss) < RTOL

    convert_checkpoint(tmp_path / "ours.safetensors", tmp_path / "hf_back", to="hf")
    back, info = transformers.VideoMAEForPreTraining.from_pretrained(tmp_path / "hf_back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _, again, _ = _losses(ours, back.eval(), clip, mask)
    assert _relative(again, hf_loss) < RTOL

    pooled = _random_hf_model(seed=5, use_mean_pooling=True, norm_pix_loss=False)  # no videomae.layernorm
    pooled.save_pretrained(tmp_path / "pooled")
    ours = load_model(tmp_path / "pooled").eval()
    assert not ours.config.encoder_norm
    loss, hf_loss, _ = _losses(ours, pooled, clip, mask)
    assert _relative(loss, hf_loss) < RTOL


def test_registered_videomae_base_is_transformers_default_with_the_hub_encoder_norm():
    """mae_videomae_vit_base_patch16_t16 is VideoMAEConfig's defaults as the Hub checkpoints set them
    (use_mean_pooling false): 16 x 224^2, tubelet 2, 768 / 12 / 12, decoder 384 / 4 / 6, eps 1e-12 and 1e-5."""
    assert model_config("mae_videomae_vit_base_patch16_t16") == vhf.config_from_hf({"use_mean_pooling": False})
    large = model_config("mae_videomae_vit_large_patch16_t16")
    assert (large.decoder_embed_dim, large.decoder_num_heads, large.decoder_depth) == (512, 8, 4)


def test_tube_mask_of_the_tiny_videomae_removes_int_ratio_places_in_every_frame():
    """The tiny registered VideoMAE (8 frames of 32^2, 2 x 8 x 8 tubelets) masks int(0.9 * 16) = 14 places per
    frame, the same places in every frame, and trains a step on CPU."""
    model = build_model("mae_videomae_vit_micro_patch8_t8")
    clip = torch.randn(3, *model.token_grid.input_shape)
    loss, _, mask = model(clip)
    frames, places = model.token_grid.grid[0], math.prod(model.token_grid.spatial)
    per_frame = mask.reshape(3, frames, places)
    assert torch.equal(per_frame.sum(-1), torch.full((3, frames), float(int(0.9 * places))))
    assert torch.equal(per_frame, per_frame[:, :1].expand_as(per_frame))
    loss.backward()
    grad, d = model.blocks[0].attn.qkv.bias.grad, model.config.embed_dim  # query / key / value thirds
    assert torch.count_nonzero(grad[d:2 * d]) == 0 and torch.count_nonzero(grad[:d]) > 0


def test_export_refuses_what_videomae_cannot_express():
    """A clip model with a class token and a key bias has no VideoMAEForPreTraining counterpart: one error naming
    both."""
    config = model_config("mae_videomae_vit_micro_patch8_t8", cls_token=True, attn_k_bias=True)
    with pytest.raises(CheckpointError, match=r"class token.*query / value biases only"):
        vhf.hf_config_dict(config)
