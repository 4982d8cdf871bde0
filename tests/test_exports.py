"""Exports that other libraries load with their own public APIs and nothing hand-edited: timm (``create_model`` with
the written config, strict), transformers (``from_pretrained`` + ``AutoImageProcessor``), classifier conversion
with a linear probe's BatchNorm head folded, and the model cards."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny import ARCH

from mae.interop import save_model
from mae.interop.classifier_export import save_hf_classifier, save_timm_classifier
from mae.interop.classifier_io import CLASSIFIER_FORMAT, classifier_state, is_classifier_checkpoint, load_classifier
from mae.interop.convert_classifier import convert_checkpoint
from mae.interop.huggingface import save_hf_pretrained
from mae.models import build_model
from mae.models.classifier import ClassifierConfig, build_classifier, load_encoder_into

timm = pytest.importorskip("timm")

TINY = ARCH
NAMES = [f"digit {i}" for i in range(10)]


def tiny_mae(**overrides):
    torch.manual_seed(0)
    return build_model("mae_vit_micro_patch4_28", **{**TINY, **overrides})


def tiny_classifier(**fields):
    """A tiny classifier whose every parameter (head and norms included) and BatchNorm statistic matter."""
    torch.manual_seed(1)
    mae_model = tiny_mae()
    model = build_classifier(ClassifierConfig.from_mae(mae_model.config, num_classes=10, **fields))
    load_encoder_into(model, mae_model.state_dict(), mae_model.config)
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    if fields.get("head") == "bn_linear":
        model.head[0].running_mean.normal_()
        model.head[0].running_var.uniform_(0.5, 2.0)
    return model.eval()


def _timm_from_file(weights):
    """timm's own loader with only the written files: the .json beside the weights is create_model's arguments."""
    cfg = json.loads(weights.with_suffix(".json").read_text())
    return timm.create_model(cfg["pretrained_cfg"]["architecture"], pretrained=True,
                             pretrained_cfg_overlay={"file": str(weights)}, **cfg).eval()


@pytest.mark.parametrize("fields", [{"global_pool": "avg"}, {"global_pool": "token"},
                                    {"global_pool": "token", "fc_norm": False, "head": "bn_linear"}],
                         ids=["avg", "token", "probe_bn_head"])
def test_timm_export_loads_with_timm_create_model_and_gives_our_logits(tmp_path, fields):
    """A directory export loads with ``timm.create_model('local-dir:DIR', pretrained=True)`` and a file export with
    ``create_model(**json)`` + ``pretrained_cfg_overlay={'file': ...}`` (timm loads strictly); both give our logits
    within 1e-5 and carry the preprocessing and label names in timm's pretrained_cfg."""
    model = tiny_classifier(**fields)
    x = torch.randn(3, 1, 28, 28)
    save_timm_classifier(model, tmp_path / "timm_dir", class_names=NAMES)
    save_timm_classifier(model, tmp_path / "model_timm.safetensors", class_names=NAMES, mean=[0.1307], std=[0.3081])
    from_dir = timm.create_model(f"local-dir:{tmp_path / 'timm_dir'}", pretrained=True).eval()
    from_file = _timm_from_file(tmp_path / "model_timm.safetensors")
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(from_dir(x), ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(from_file(x), ours, rtol=0, atol=1e-5)
    assert from_dir.pretrained_cfg["label_names"] == NAMES
    data = timm.data.resolve_data_config({}, model=from_file)
    assert tuple(data["input_size"]) == (1, 28, 28) and data["interpolation"] == "bicubic" and data["crop_pct"] == 1.0
    assert list(data["mean"]) == [0.1307] and list(data["std"]) == [0.3081]
    assert "norm_eps" not in json.loads((tmp_path / "model_timm.json").read_text())


def test_timm_export_still_reads_back_with_load_classifier(tmp_path):
    """The file export (weights + .json) is still a classifier file of this library: same logits after reading."""
    model = tiny_classifier(global_pool="avg")
    path = save_timm_classifier(model, tmp_path / "model_timm.safetensors")
    back, config, _ = load_classifier(path)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=1e-6)
    assert config.global_pool == "avg" and config.uses_fc_norm


def _probe_checkpoint(tmp_path):
    """A linear-probe checkpoint as `mae linprobe` writes it: mae-classifier format, BatchNorm + Linear head."""
    model = tiny_classifier(global_pool="token", fc_norm=False, head="bn_linear")
    path = tmp_path / "checkpoint-best.pth"
    torch.save(classifier_state(model, model.classifier_config, NAMES, epoch=0), path)
    assert torch.load(path, weights_only=True)["format"] == CLASSIFIER_FORMAT
    assert "head.0.running_mean" in torch.load(path, weights_only=True)["model"]
    return model, path


def test_convert_of_a_linear_probe_folds_its_batchnorm_head_for_timm(tmp_path):
    """`mae convert <probe checkpoint> --to timm` (file and, through the CLI, directory) writes a plain Linear head
    (no head.0 / head.1 keys) that timm loads strictly with the probe's logits; --to hf and --to reference keep the
    same logits too."""
    model, path = _probe_checkpoint(tmp_path)
    assert is_classifier_checkpoint(path) and is_classifier_checkpoint(tmp_path)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ours = model(x)
    out = convert_checkpoint(path, tmp_path / "probe.safetensors", to="timm")
    from safetensors.torch import load_file

    assert not any(k.startswith(("head.0", "head.1")) for k in load_file(out))
    with torch.no_grad():
        torch.testing.assert_close(_timm_from_file(out)(x), ours, rtol=0, atol=1e-5)
    from mae.cli import main

    assert main(["convert", str(path), str(tmp_path / "cli_timm"), "--to", "timm"]) == 0  # the command line's route
    with torch.no_grad():
        from_dir = timm.create_model(f"local-dir:{tmp_path / 'cli_timm'}", pretrained=True).eval()
        torch.testing.assert_close(from_dir(x), ours, rtol=0, atol=1e-5)
    transformers = pytest.importorskip("transformers")
    hf_dir = convert_checkpoint(path, tmp_path / "probe_hf", to="hf")
    hf = transformers.ViTForImageClassification.from_pretrained(hf_dir).eval()
    ref = convert_checkpoint(path, tmp_path / "probe_ref.pth", to="reference")
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **_args(model.classifier_config)).eval()
    vit.load_state_dict(torch.load(ref, weights_only=True)["model"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, ours, rtol=0, atol=1e-4)
        torch.testing.assert_close(vit(x), ours, rtol=0, atol=1e-5)
    assert hf.config.id2label[3] == "digit 3"


def _args(config):
    from mae.interop.classifier_export import timm_classifier_kwargs

    return timm_classifier_kwargs(config)


def test_a_pretrained_mae_is_not_taken_for_a_classifier(tmp_path):
    """Pre-training files (no head.*) keep going through the MAE converter."""
    path = save_model(tiny_mae(), tmp_path / "mae.safetensors")
    assert not is_classifier_checkpoint(path)


def _square_image(side: int, channels: int) -> Image.Image:
    torch.manual_seed(5)
    arr = (torch.rand(side, side, channels) * 255).to(torch.uint8).squeeze(-1).numpy()
    return Image.fromarray(arr)


def test_hf_mae_export_has_a_preprocessor_and_a_model_card(tmp_path):
    """`mae convert --to hf` of a pre-training run: AutoImageProcessor.from_pretrained(dir) gives the same pixels as
    our evaluation transform, ViTMAEForPreTraining loads every one of its weights from the file (no missing,
    unexpected or mismatched key: transformers only warns of those and initialises the rest at random) and they are
    ours, and README.md has metadata (library, license, pipeline) and the run's data and epochs."""
    transformers = pytest.importorskip("transformers")
    from mae.data import build_eval_transform

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name: mae_vit_micro_patch4_28\n  mask_ratio: 0.75\n"
                                     "data:\n  path: builtin:mnist5k\nepochs: 3\n")
    ours = tiny_mae()
    save_model(ours, run / "model.safetensors")
    out = convert_checkpoint(run / "model.safetensors", tmp_path / "hf", to="hf", license="apache-2.0")
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    image = _square_image(40, 1)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels[0], build_eval_transform(28, 1)(image), rtol=0, atol=1e-5)
    hf, loading = transformers.ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    assert loading.keys() >= {"missing_keys", "unexpected_keys", "mismatched_keys"}
    assert not any(loading.values()), loading
    assert torch.equal(hf.vit.embeddings.patch_embeddings.projection.weight, ours.patch_embed.proj.weight)
    assert torch.equal(hf.decoder.decoder_pred.weight, ours.decoder_pred.weight)
    card = (out / "README.md").read_text()
    head = card.split("---")[1]
    assert "library_name: transformers" in head and "license: apache-2.0" in head and "pipeline_tag:" in head
    assert "pre-training data: builtin:mnist5k" in card and "pre-training epochs: 3" in card


def test_hf_classifier_export_runs_through_autoimageprocessor_to_our_logits(tmp_path):
    """An RGB class-token classifier saved for transformers: processor + ViTForImageClassification on a photo give
    our classifier's logits on our evaluation transform (1e-4); the card says the data is unknown and the license
    field is there."""
    transformers = pytest.importorskip("transformers")
    from mae.data import build_eval_transform

    torch.manual_seed(2)
    mae_model = build_model("mae_vit_micro_patch4_28", **TINY, in_chans=3, img_size=64, patch_size=8)
    model = build_classifier(ClassifierConfig.from_mae(mae_model.config, num_classes=3, global_pool="token"))
    load_encoder_into(model, mae_model.state_dict(), mae_model.config)
    model.eval()
    out = save_hf_classifier(model, tmp_path / "hf", class_names=["a", "b", "c"])
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    hf = transformers.ViTForImageClassification.from_pretrained(out).eval()
    image = _square_image(80, 3)
    with torch.no_grad():
        theirs = hf(**processor(images=image, return_tensors="pt")).logits
        ours = model(build_eval_transform(64, 3)(image)[None])
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    card = (out / "README.md").read_text()
    assert "license: unknown" in card and "pre-training data and epochs unknown" in card


def test_save_hf_pretrained_writes_the_extras_for_a_model(tmp_path):
    """save_hf_pretrained (the Python API) writes preprocessor_config.json and README.md next to the weights."""
    out = save_hf_pretrained(tiny_mae(), tmp_path / "hf")
    prep = json.loads((out / "preprocessor_config.json").read_text())
    assert prep["crop_size"] == {"height": 28, "width": 28} and prep["image_mean"] == [0.5]
    assert (out / "README.md").read_text().startswith("---\n")
