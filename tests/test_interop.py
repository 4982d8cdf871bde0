"""mae.interop: checkpoints of the reference release, transformers, timm and this project, read and written
losslessly, with exact numerical parity against transformers' ViTMAEForPreTraining and timm's VisionTransformer.

Parity tests perturb every parameter first (zero biases and unit norms would hide a swapped query / key / value
or a misplaced bias) and compare against the other library's own forward pass, not against our helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mae import create_model
from mae.errors import CheckpointError
from mae.interop import (
    config_from_hf,
    convert,
    encoder_for_timm,
    from_hf_state_dict,
    hf_config_dict,
    infer_config,
    load_checkpoint,
    load_model,
    load_state_dict_any,
    save_hf_pretrained,
    save_model,
    timm_vit_kwargs,
    to_hf_state_dict,
    to_reference_checkpoint,
)
from mae.models.mae import MAEConfig, MaskedAutoencoderViT
from mae.models.pos_embed import sincos_2d

TINY = {"img_size": 32, "patch_size": 4, "in_chans": 3, "embed_dim": 64, "depth": 2, "num_heads": 4,
        "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4}
# ViT-B widths, depths and heads at a low resolution (4 x 4 grid of 16 x 16 patches) with the paper's decoder
BASE_LOWRES = {"img_size": 64, "patch_size": 16, "in_chans": 3, "embed_dim": 768, "depth": 12, "num_heads": 12,
               "decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}


def randomize_(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Perturb every floating-point parameter and buffer (position tables and tokens included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * std)
    return module


def build(arch: dict, seed: int = 0, **overrides) -> MaskedAutoencoderViT:
    torch.manual_seed(seed)
    return randomize_(MaskedAutoencoderViT(MAEConfig(**{**arch, **overrides})), seed).eval()


def same_weights(model: nn.Module, config: MAEConfig) -> MaskedAutoencoderViT:
    """Another MAE config on ``model``'s very tensors (no initialisation cost): e.g. the norm_pix_loss twin."""
    with torch.device("meta"):
        twin = MaskedAutoencoderViT(config)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.eval()


def assert_state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k, v in a.items():
        assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k


def inputs(model: MaskedAutoencoderViT, n: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = model.config.image_hw
    length = model.grid_size[0] * model.grid_size[1]
    return torch.randn(n, model.in_chans, h, w, generator=g), torch.rand(n, length, generator=g)


def random_model(arch: dict, seed: int = 0, **overrides) -> MaskedAutoencoderViT:
    """An MAE whose every tensor is drawn here, skipping the xavier initialisation (fast even at ViT-B size):
    normal(0, 0.05), plus 1 for LayerNorm weights."""
    with torch.device("meta"):
        model = MaskedAutoencoderViT(MAEConfig(**{**arch, **overrides}))
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            base = 1.0 if re.search(r"norm\d?\.weight$", name) else 0.0
            t.copy_(base + torch.randn(t.shape, generator=g) * 0.05) if t.is_floating_point() else t.zero_()
    return model.eval()


# ------------------------------------------------------------------------------------------ transformers parity
def _hf_from_dir(directory: Path):
    pytest.importorskip("transformers")
    from transformers import ViTMAEForPreTraining

    model, info = ViTMAEForPreTraining.from_pretrained(directory, output_loading_info=True,
                                                       attn_implementation="eager", dtype=torch.float32)
    return model.eval(), info


def _check_against_hf(ours: MaskedAutoencoderViT, hf_model) -> None:
    """Same pixels and noise: same mask, loss within 1e-5 relative, predictions (HF logits) within 1e-4."""
    assert hf_model.config.norm_pix_loss is ours.config.norm_pix_loss
    x, noise = inputs(ours)
    with torch.no_grad():
        loss, pred, mask = ours(x, noise=noise)
        out = hf_model(pixel_values=x, noise=noise)
    assert torch.equal(mask, out.mask)
    rel = ((loss - out.loss).abs() / out.loss.abs()).item()
    pred_diff = (pred - out.logits).abs().max().item()
    print(f"[{ours.config.embed_dim}-wide, norm_pix_loss={ours.config.norm_pix_loss}] loss rel diff {rel:.3g}, "
          f"pred max abs diff {pred_diff:.3g}")  # shown with pytest -s
    assert rel <= 1e-5, rel
    assert pred_diff <= 1e-4, pred_diff


def _written_and_loaded_by_transformers(ours: MaskedAutoencoderViT, directory: Path):
    """Our writer -> from_pretrained; asserts no missing / unexpected / mismatched keys and that every tensor
    transformers computes with (its in-memory names, whatever it re-initialises) equals ours."""
    save_hf_pretrained(ours, directory)
    hf_model, info = _hf_from_dir(directory)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf_model.config.layer_norm_eps == 1e-6
    assert_state_dicts_equal(from_hf_state_dict(hf_model.state_dict()), ours.state_dict())
    return hf_model


@pytest.fixture(scope="module")
def vit_b_pair(tmp_path_factory):
    """A ViT-B-shaped MAE (random weights, norm_pix_loss) and the transformers model our writer made of it."""
    ours = random_model(BASE_LOWRES, norm_pix_loss=True)
    return ours, _written_and_loaded_by_transformers(ours, tmp_path_factory.mktemp("vit_b_hf"))


def _flip_norm_pix(ours: MaskedAutoencoderViT) -> MaskedAutoencoderViT:
    flipped = not ours.config.norm_pix_loss
    return same_weights(ours, MAEConfig(**{**ours.config.to_dict(), "norm_pix_loss": flipped,
                                          "target": "norm_pixel" if flipped else "pixel"}))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_tiny_model_written_as_hf_directory_loads_in_transformers_with_identical_outputs(norm_pix, tmp_path):
    """Our HF writer -> ViTMAEForPreTraining.from_pretrained: no missing / unexpected keys, every HF tensor equal
    to ours, and with the same pixels and noise the same mask, loss (1e-5 relative) and logits (1e-4 absolute);
    img 32, patch 4, 64 wide x 2 blocks x 4 heads, decoder 32 x 1 x 4, with and without norm_pix_loss."""
    ours = build(TINY, norm_pix_loss=norm_pix)
    hf_model = _written_and_loaded_by_transformers(ours, tmp_path)
    assert hf_model.config.norm_pix_loss is norm_pix  # the flag travels through config.json
    _check_against_hf(ours, hf_model)


def test_the_demo_model_with_2x_mlps_and_one_channel_matches_transformers(tmp_path):
    """The demo's nano MAE (MLP ratio 2 in encoder and decoder, grey 28 px digits, normalised-pixel target) through
    our HF writer: intermediate sizes 256 / 128, and the same mask, loss and logits in transformers."""
    ours = create_model("mae_vit_nano_patch4_28", target="norm_pixel")
    hf_model = _written_and_loaded_by_transformers(ours, tmp_path)
    assert (hf_model.config.intermediate_size, hf_model.config.decoder_intermediate_size) == (256, 128)
    assert hf_model.config.num_channels == 1
    _check_against_hf(ours, hf_model)


def test_vit_b_shaped_model_written_as_hf_directory_gives_identical_outputs_in_transformers(vit_b_pair):
    """The same checks at ViT-B size (768 wide, 12 blocks, 12 heads, decoder 512 x 8 x 16, img 64 patch 16):
    every tensor equal after from_pretrained, then the same mask / loss / logits with norm_pix_loss on (as
    written) and off (flipped on both models, same weights)."""
    ours, hf_model = vit_b_pair
    _check_against_hf(ours, hf_model)
    hf_model.config.norm_pix_loss = False
    try:
        _check_against_hf(_flip_norm_pix(ours), hf_model)
    finally:
        hf_model.config.norm_pix_loss = True


def _random_hf_model(config_kwargs: dict, seed: int = 0):
    """A transformers ViTMAEForPreTraining whose every tensor is set here (its own init may zero the tables)."""
    pytest.importorskip("transformers")
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    model = ViTMAEForPreTraining(ViTMAEConfig(**config_kwargs, attn_implementation="eager")).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if re.search(r"(layernorm|norm)[^.]*\.weight$", name) else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * 0.05)
    return model


TINY_HF = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
           "image_size": 32, "patch_size": 4, "decoder_hidden_size": 32, "decoder_num_hidden_layers": 1,
           "decoder_num_attention_heads": 4, "decoder_intermediate_size": 128, "layer_norm_eps": 1e-6}


@pytest.mark.parametrize("norm_pix", [False, True])
def test_transformers_save_pretrained_directory_reads_into_our_model_with_identical_outputs(norm_pix, tmp_path):
    """A transformers model with explicit random weights, saved by its own save_pretrained (whatever layout the
    installed version writes), read by load_model: the architecture comes from config.json, and the same pixels
    and noise give the same mask, loss (1e-5 relative) and predictions (1e-4)."""
    hf_model = _random_hf_model({**TINY_HF, "norm_pix_loss": norm_pix})
    hf_model.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    assert {k: getattr(ours.config, k) for k in TINY} == TINY
    assert ours.config.norm_pix_loss is norm_pix and ours.config.norm_eps == 1e-6
    _check_against_hf(ours, hf_model)


def test_vit_b_shaped_transformers_save_pretrained_reads_into_our_model_with_identical_outputs(vit_b_pair, tmp_path):
    """The ViT-B-shaped transformers model saved by transformers' own save_pretrained and read by load_model gives
    the same config, the same tensors and the same mask / loss / logits."""
    ours, hf_model = vit_b_pair
    hf_model.save_pretrained(tmp_path)
    back = load_model(tmp_path).eval()
    assert back.config == ours.config
    _check_against_hf(back, hf_model)


def test_hf_reader_accepts_hub_layout_5x_disk_layout_and_in_memory_names(tmp_path):
    """The same transformers weights under the Hub layout (decoder.decoder_layers.j...attention.attention.query),
    the layout transformers 5.x save_pretrained writes (decoder.decoder_encoder.layer.j) and the 5.x in-memory
    names (vit.layers.i.attention.q_proj, mlp.fc1) all convert to the same state_dict."""
    hf_model = _random_hf_model({**TINY_HF, "decoder_num_hidden_layers": 2})
    hf_model.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    from_memory = from_hf_state_dict(hf_model.state_dict())
    from_disk = from_hf_state_dict(on_disk)
    assert_state_dicts_equal(from_disk, from_memory)
    hub = to_hf_state_dict(from_disk)
    assert "decoder.decoder_layers.1.attention.attention.query.weight" in hub
    assert "vit.encoder.layer.1.attention.attention.value.bias" in hub
    assert_state_dicts_equal(from_hf_state_dict(hub), from_disk)
    # whatever the installed transformers writes is one of the layouts the reader knows
    assert {k.split(".")[1] for k in on_disk if k.startswith("decoder.") and ".0." in k} <= {
        "decoder_layers", "decoder_encoder"}
    assert len(from_disk) == len(MaskedAutoencoderViT(MAEConfig(**{**TINY, "decoder_depth": 2})).state_dict())


def test_hf_config_json_has_every_vitmae_field_with_mae_eps():
    """hf_config_dict writes ViTMAEConfig's fields: widths, depths, heads, MLP sizes = mlp_ratio x width,
    layer_norm_eps 1e-6 explicitly (HF's default is 1e-12), qkv_bias, gelu, model_type and architectures; and
    config_from_hf inverts it."""
    cfg = MAEConfig(**BASE_LOWRES, norm_pix_loss=True, mask_ratio=0.6)
    hf = hf_config_dict(cfg)
    assert hf["layer_norm_eps"] == 1e-6 and hf["qkv_bias"] is True and hf["hidden_act"] == "gelu"
    assert (hf["model_type"], hf["architectures"]) == ("vit_mae", ["ViTMAEForPreTraining"])
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"], hf["intermediate_size"]) == (
        768, 12, 12, 3072)
    assert (hf["decoder_hidden_size"], hf["decoder_num_hidden_layers"], hf["decoder_num_attention_heads"],
            hf["decoder_intermediate_size"]) == (512, 8, 16, 2048)
    assert (hf["image_size"], hf["patch_size"], hf["num_channels"]) == (64, 16, 3)
    assert hf["norm_pix_loss"] is True and hf["mask_ratio"] == 0.6
    assert config_from_hf(hf) == cfg


def test_hf_export_refuses_what_vitmae_cannot_express():
    """A HOG-target model, one with mask tokens in the encoder, or a non-square one has no ViTMAEForPreTraining
    equivalent: a clear CheckpointError rather than a lossy or unloadable directory."""
    with pytest.raises(CheckpointError, match=r"pixels only.*hog"):
        hf_config_dict(MAEConfig(**TINY, target="hog"))
    with pytest.raises(CheckpointError, match="mask_in_encoder"):
        hf_config_dict(MAEConfig(**TINY, mask_in_encoder=True))
    with pytest.raises(CheckpointError, match=r"square images only.*32x48"):
        hf_config_dict(MAEConfig(**{**TINY, "img_size": (32, 48)}))


def test_hf_image_size_lists_are_read_and_non_square_is_really_unsupported_by_transformers():
    """config.json may give image_size as a list: [32, 32] reads as 32, [32, 48] as (32, 48). Writing non-square
    is refused above because the installed transformers cannot even build such a ViTMAEForPreTraining (its decoder
    table assumes a square grid); if a release fixes that, this test fails and export can be enabled."""
    pytest.importorskip("transformers")
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    assert config_from_hf({**TINY_HF, "image_size": [32, 32]}).img_size == 32
    assert config_from_hf({**TINY_HF, "image_size": [32, 48]}).img_size == (32, 48)
    with pytest.raises(RuntimeError):
        ViTMAEForPreTraining(ViTMAEConfig(**{**TINY_HF, "image_size": [32, 48]}))


# ------------------------------------------------------------------------------------------------ timm parity
def test_exported_encoder_loads_strictly_into_a_matching_timm_vit_with_equal_features():
    """encoder_for_timm -> timm VisionTransformer(**timm_vit_kwargs(cfg)) with strict=True; forward_features
    equal within 1e-5 for a tiny custom ViT (batch 2, fp32)."""
    from timm.models.vision_transformer import VisionTransformer

    ours = build(TINY)
    vit = VisionTransformer(**timm_vit_kwargs(ours.config)).eval()
    vit.load_state_dict(encoder_for_timm(ours), strict=True)
    x, _ = inputs(ours)
    with torch.no_grad():
        diff = (vit.forward_features(x) - ours.forward_features(x)).abs().max().item()
    print(f"timm tiny forward_features max abs diff {diff:.3g}")
    assert diff <= 1e-5


def test_exported_vit_b_encoder_loads_into_timm_vit_base_patch16_224_strictly():
    """The documented recipe: timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=0) +
    load_state_dict(strict=True) gives the same forward_features (<= 1e-5, batch 2); with a head the only missing
    keys under strict=False are head.weight / head.bias."""
    import timm

    ours = random_model({**BASE_LOWRES, "img_size": 224, "decoder_depth": 0})
    sd = encoder_for_timm(ours)
    with torch.device("meta"):  # skip timm's initialisation: every tensor comes from sd (assign=True)
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    vit.load_state_dict(sd, strict=True, assign=True)
    x, _ = inputs(ours)
    with torch.no_grad():
        diff = (vit.forward_features(x) - ours.forward_features(x)).abs().max().item()
    print(f"timm vit_base_patch16_224 forward_features max abs diff {diff:.3g}")
    assert diff <= 1e-5
    with torch.device("meta"):
        with_head = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    result = with_head.load_state_dict(sd, strict=False, assign=True)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys


# ------------------------------------------------------------------------------------------------- round trips
def test_every_format_round_trips_bit_for_bit(tmp_path):
    """ours -> mae file / mae directory / hf / reference -> ours gives torch.equal tensors for every key, and the
    mae and hf formats rebuild the same config (a non-square one too); ours -> timm -> ours keeps the encoder
    exactly and leaves the decoder as it was."""
    ours = build(TINY, norm_pix_loss=True, mask_ratio=0.6)
    sd = ours.state_dict()

    save_model(ours, tmp_path / "m.safetensors")
    save_model(ours, tmp_path / "mdir")
    for path in (tmp_path / "m.safetensors", tmp_path / "mdir"):
        back = load_model(path)
        assert back.config == ours.config
        assert_state_dicts_equal(back.state_dict(), sd)
    assert json.loads((tmp_path / "mdir" / "config.json").read_text())["embed_dim"] == 64
    assert load_model(tmp_path / "m.safetensors", norm_pix_loss=False).config.target == "pixel"  # override wins
    wide = build({**TINY, "img_size": (32, 48)})
    save_model(wide, tmp_path / "wide.safetensors")
    back = load_model(tmp_path / "wide.safetensors")
    assert back.config.img_size == (32, 48) and back.config == wide.config
    assert_state_dicts_equal(back.state_dict(), wide.state_dict())

    convert(tmp_path / "m.safetensors", tmp_path / "hf", to="hf")
    back = load_model(tmp_path / "hf")
    assert back.config == ours.config
    assert_state_dicts_equal(back.state_dict(), sd)
    assert load_state_dict_any(tmp_path / "hf")[1:] == ("hf", ours.config.to_dict())

    convert(tmp_path / "m.safetensors", tmp_path / "ref.pth", to="reference")
    back = load_model(tmp_path / "ref.pth", num_heads=4, decoder_num_heads=4, target="norm_pixel", mask_ratio=0.6)
    assert back.config == ours.config
    assert_state_dicts_equal(back.state_dict(), sd)
    convert(tmp_path / "ref.pth", tmp_path / "from_ref.safetensors", to="mae", num_heads=4, decoder_num_heads=4)
    assert_state_dicts_equal(load_state_dict_any(tmp_path / "from_ref.safetensors")[0], sd)

    for name in ("timm.pth", "timm.safetensors"):
        convert(tmp_path / "m.safetensors", tmp_path / name, to="timm")
        enc, fmt, cfg = load_state_dict_any(tmp_path / name)
        assert (fmt, cfg) == ("timm", None)
        assert_state_dicts_equal(enc, ours.encoder_state_dict())
        fresh = build(TINY, seed=5)
        decoder_before = {k: v.clone() for k, v in fresh.state_dict().items() if k not in enc}
        with pytest.warns(UserWarning, match="encoder only"):
            load_checkpoint(fresh, tmp_path / name)
        assert_state_dicts_equal({k: v for k, v in fresh.state_dict().items() if k in enc}, enc)
        assert_state_dicts_equal({k: v for k, v in fresh.state_dict().items() if k not in enc}, decoder_before)


def test_encoder_only_reference_file_round_trips_and_leaves_the_decoder_fresh(tmp_path):
    """A "pretrain"-style reference file (encoder only): reference -> mae -> reference is bit for bit, and loading
    it keeps the encoder exact while the decoder keeps its initialisation (with a warning saying so)."""
    ours = build(TINY)
    torch.save(to_reference_checkpoint(ours, encoder_only=True), tmp_path / "pretrain.pth")
    enc, fmt, cfg = load_state_dict_any(tmp_path / "pretrain.pth")
    assert (fmt, cfg) == ("reference", None)
    assert_state_dicts_equal(enc, ours.encoder_state_dict())
    with pytest.warns(UserWarning, match="encoder only"):
        convert(tmp_path / "pretrain.pth", tmp_path / "enc.safetensors", to="mae", num_heads=4)
    convert(tmp_path / "enc.safetensors", tmp_path / "again.pth", to="reference")
    assert_state_dicts_equal(torch.load(tmp_path / "again.pth", weights_only=True)["model"], enc)
    with pytest.warns(UserWarning, match="encoder only"):
        model = load_model(tmp_path / "enc.safetensors")
    assert model.config.num_heads == 4 and model.config.decoder_embed_dim == 512  # decoder: MAEConfig defaults
    assert_state_dicts_equal(model.encoder_state_dict(), enc)


def test_reference_checkpoint_with_argparse_namespace_loads_and_its_args_name_the_architecture(tmp_path):
    """A file as the reference training code writes it ({'model', 'optimizer', 'epoch', 'args': Namespace}) loads
    through the weights-only loader; args.model and args.norm_pix_loss supply what shapes cannot (heads, target)."""
    torch.manual_seed(0)
    ours = randomize_(create_model("mae_vit_micro_patch4_28", norm_pix_loss=True))
    args = argparse.Namespace(model="mae_vit_micro_patch4_28", norm_pix_loss=True, mask_ratio=0.75, input_size=28,
                              blr=1.5e-4)
    torch.save({**to_reference_checkpoint(ours), "optimizer": {"state": {}}, "epoch": 3, "args": args},
               tmp_path / "checkpoint-3.pth")
    _, fmt, _ = load_state_dict_any(tmp_path / "checkpoint-3.pth")
    assert fmt == "reference"
    back = load_model(tmp_path / "checkpoint-3.pth")
    assert back.config == ours.config
    assert_state_dicts_equal(back.state_dict(), ours.state_dict())
    model = create_model("mae_vit_micro_patch4_28", checkpoint_path=tmp_path / "checkpoint-3.pth")
    assert_state_dicts_equal(model.state_dict(), ours.state_dict())


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    """A .pth whose unpickling would create a marker directory (via __reduce__) raises CheckpointError from every
    entry point, and the marker never appears."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.makedirs, (str(marker),)

    ours = build(TINY)
    torch.save({**to_reference_checkpoint(ours), "args": Exploit()}, tmp_path / "evil.pth")
    for call in (lambda: load_state_dict_any(tmp_path / "evil.pth"),
                 lambda: load_checkpoint(build(TINY), tmp_path / "evil.pth"),
                 lambda: convert(tmp_path / "evil.pth", tmp_path / "out.safetensors", to="mae")):
        with pytest.raises(CheckpointError, match="refused"):
            call()
    assert not marker.exists()


def test_checkpoint_of_another_architecture_names_the_key_and_both_shapes(tmp_path):
    """Loading a ViT-L-shaped file into a ViT-B-shaped model fails with CheckpointError naming the model, a
    mismatched key, its shape in the file and in the model, and how many more mismatches there are."""
    large = {**BASE_LOWRES, "embed_dim": 1024, "num_heads": 16, "depth": 1, "decoder_depth": 1}
    with torch.device("meta"):
        shapes = MaskedAutoencoderViT(MAEConfig(**large)).state_dict()
    save_file({k: torch.zeros(v.shape) for k, v in shapes.items()}, tmp_path / "large.safetensors")
    with torch.device("meta"):
        target = MaskedAutoencoderViT(MAEConfig(**{**BASE_LOWRES, "depth": 1, "decoder_depth": 1}))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(target, tmp_path / "large.safetensors")
    text = str(err.value)
    assert "does not fit the model (embed_dim 768, depth 1" in text
    assert "cls_token is [1, 1, 1024] in the file but [1, 1, 768] in the model" in text
    assert re.search(r"\(\+\d+ more\)", text)
    # the same file, only its blocks: the first mismatch is the attention projection
    blocks = {k: torch.zeros(v.shape) for k, v in shapes.items() if k.startswith("blocks.")}
    torch.save({"model": blocks}, tmp_path / "blocks.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.norm1\.weight is \[1024\] in the file but \[768\] in the "
                       r"model; blocks\.0\.norm1\.bias .*; blocks\.0\.attn\.qkv\.weight is \[3072, 1024\] in the file "
                       r"but \[2304, 768\] in the model"):
        load_checkpoint(target, tmp_path / "blocks.pth")
    # through the registry, the message names the registered model
    save_model(build(TINY), tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match=r"does not fit mae_vit_micro_patch4_28: cls_token is \[1, 1, 64\] in "
                       r"the file but \[1, 1, 128\] in the model"):
        create_model("mae_vit_micro_patch4_28", checkpoint_path=tmp_path / "tiny.safetensors")


def test_fine_tuned_reference_file_loads_the_encoder_and_reports_the_skipped_head(tmp_path):
    """A fine-tuned file (fc_norm + head instead of norm): its encoder blocks load into an MAE, the skipped
    classifier keys are named in a warning and the report, norm keeps its values; converting it to 'hf' is refused
    with a reason, converting it to 'timm' keeps it intact for a global-average-pool timm ViT (strict)."""
    from timm.models.vision_transformer import VisionTransformer

    ours = build(TINY)
    cfg = ours.config
    vit = VisionTransformer(**{**timm_vit_kwargs(cfg), "global_pool": "avg", "num_classes": 7})
    randomize_(vit)
    assert "fc_norm.weight" in vit.state_dict() and "norm.weight" not in vit.state_dict()
    torch.save({"model": vit.state_dict(), "epoch": 99}, tmp_path / "finetuned.pth")
    model = build(TINY, seed=3)
    norm_before = model.norm.weight.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = load_checkpoint(model, tmp_path / "finetuned.pth")
    messages = " | ".join(str(w.message) for w in caught)
    assert "skipped the classifier keys fc_norm.bias, fc_norm.weight, head.bias, head.weight" in messages
    assert "norm.* keeps its initialisation" in messages and "encoder only" in messages
    assert sorted(report.skipped) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert "norm.weight" in report.missing and torch.equal(model.norm.weight, norm_before)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    with pytest.raises(CheckpointError, match="fine-tuned classifier"):
        convert(tmp_path / "finetuned.pth", tmp_path / "hf", to="hf", num_heads=4)
    convert(tmp_path / "finetuned.pth", tmp_path / "ft_timm.safetensors", to="timm")
    again = VisionTransformer(**{**timm_vit_kwargs(cfg), "global_pool": "avg", "num_classes": 7})
    again.load_state_dict(load_file(tmp_path / "ft_timm.safetensors"), strict=True)
    assert_state_dicts_equal(again.state_dict(), vit.state_dict())


def test_reference_export_drops_our_extra_buffers_and_warns_only_when_they_hold_information():
    """to_reference_checkpoint writes reference names only: an unfitted PCA basis (all zeros) is dropped silently,
    a fitted one with a warning that names it."""
    model = build(TINY, target="pca", pca_components=8)
    with torch.no_grad():  # randomize_ perturbed the buffers too: make it an unfitted (all zero) basis again
        for b in model.target.buffers():
            b.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = to_reference_checkpoint(model)["model"]
    assert not any(k.startswith("target.") for k in sd) and "decoder_pred.weight" in sd
    model.target.fit([torch.randn(4, 3, 32, 32)])
    with pytest.warns(UserWarning, match=r"target\.components"):
        to_reference_checkpoint(model)


def test_position_tables_follow_the_model_grid_when_resolution_differs(tmp_path):
    """Loading a 32 px checkpoint into a 48 px model: the fixed sin-cos tables are regenerated exactly for the
    6 x 6 grid, every other tensor loads unchanged."""
    small = build(TINY)
    with torch.no_grad():
        small.pos_embed.copy_(sincos_2d(64, (8, 8)))
        small.decoder_pos_embed.copy_(sincos_2d(32, (8, 8)))
    save_model(small, tmp_path / "small.safetensors")
    big = MaskedAutoencoderViT(MAEConfig(**{**TINY, "img_size": 48}))
    load_checkpoint(big, tmp_path / "small.safetensors")
    assert torch.equal(big.pos_embed, sincos_2d(64, (12, 12)))
    assert torch.equal(big.decoder_pos_embed, sincos_2d(32, (12, 12)))
    assert torch.equal(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)


def test_format_detection_and_architecture_inference(tmp_path):
    """load_state_dict_any names each format (sharded and .bin transformers directories too); for files without a
    config, infer_config reads patch size, channels, grid, widths, depths and MLP ratio from shapes and heads from
    the registry's width table; junk and missing files raise CheckpointError."""
    torch.manual_seed(0)
    micro = create_model("mae_vit_micro_patch4_28")
    torch.save(to_reference_checkpoint(micro), tmp_path / "ref.pth")
    torch.save(micro.encoder_state_dict(), tmp_path / "timm.pth")
    save_model(micro, tmp_path / "m.safetensors")
    save_hf_pretrained(micro, tmp_path / "hf")
    save_file(to_hf_state_dict(micro), tmp_path / "bare_hf.safetensors")
    found = {p: load_state_dict_any(tmp_path / p) for p in ("ref.pth", "timm.pth", "m.safetensors", "hf",
                                                           "bare_hf.safetensors")}
    assert [v[1] for v in found.values()] == ["reference", "timm", "mae", "hf", "hf"]
    assert [v[2] is None for v in found.values()] == [True, True, False, False, True]
    for sd, _, _ in found.values():
        assert torch.equal(sd["blocks.5.attn.qkv.bias"], micro.state_dict()["blocks.5.attn.qkv.bias"])
    assert infer_config(found["ref.pth"][0]) == micro.config
    assert infer_config(found["bare_hf.safetensors"][0]) == micro.config
    # transformers directories with sharded safetensors or a pytorch_model.bin
    hub = to_hf_state_dict(micro)
    names = sorted(hub)
    (tmp_path / "sharded").mkdir()
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        save_file({k: hub[k].contiguous() for k in part}, tmp_path / "sharded" / f"model-0000{i + 1}.safetensors")
    weight_map = {k: f"model-0000{1 + (k in names[len(names) // 2:])}.safetensors" for k in names}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "bin").mkdir()
    torch.save(hub, tmp_path / "bin" / "pytorch_model.bin")
    for d in ("sharded", "bin"):
        (tmp_path / d / "config.json").write_text(json.dumps(hf_config_dict(micro.config)))
        assert load_model(tmp_path / d).config == micro.config
        assert_state_dicts_equal(load_state_dict_any(tmp_path / d)[0], micro.state_dict())
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"truncated or corrupt|not a weights-only"):
        load_state_dict_any(tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict_any(tmp_path / "missing.pth")


def test_missing_encoder_keys_are_an_error_unless_strict_encoder_is_off(tmp_path):
    """A file lacking an encoder block's weights fails with strict_encoder=True (naming the key) and loads the
    rest with a warning under strict_encoder=False."""
    ours = build(TINY)
    sd = {k: v for k, v in ours.state_dict().items() if k != "blocks.1.mlp.fc2.weight"}
    torch.save({"model": sd}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing from the file: blocks\.1\.mlp\.fc2\.weight"):
        load_checkpoint(build(TINY, seed=2), tmp_path / "partial.pth")
    model = build(TINY, seed=2)
    with pytest.warns(UserWarning, match="loaded what matches"):
        report = load_checkpoint(model, tmp_path / "partial.pth", strict_encoder=False)
    assert report.missing == ["blocks.1.mlp.fc2.weight"]
    assert torch.equal(model.blocks[0].attn.qkv.weight, ours.blocks[0].attn.qkv.weight)
