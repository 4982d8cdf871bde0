"""Linear probing: a frozen encoder with a BatchNorm(affine=False) + Linear head trained by LARS, on cached
features (augment=none) or on augmented images."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import ARCH

from mae.config import load_config
from mae.errors import DataError
from mae.interop import save_model
from mae.interop.classifier_io import load_classifier
from mae.models import build_model
from mae.recipes.classify_common import load_encoder_source
from mae.recipes.linprobe import FeatureBatches, LinprobeConfig, build_probe, run
from mae.train.optim import build_optimizer, param_groups

TINY = ARCH


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model(build_model("mae_vit_micro_patch4_28", **TINY), path)
    return path


def _probe(checkpoint, pool="token"):
    source = load_encoder_source("pretrained", str(checkpoint), None)
    cfg = load_config(LinprobeConfig, None, [f"checkpoint={checkpoint}", f"model.global_pool={pool}"])
    return build_probe(source, cfg.model, 10)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_probe_step_changes_only_the_head(tiny_checkpoint, pool):
    """After a LARS step every encoder parameter and buffer is bit-identical; only the head's Linear changed, the
    encoder stayed in eval mode and the head's BatchNorm (affine=False, eps 1e-6) tracked batch statistics."""
    torch.manual_seed(0)
    model, config, wrapper = _probe(tiny_checkpoint, pool)
    assert config.head == "bn_linear" and not model.head[0].affine and model.head[0].eps == 1e-6
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = param_groups(model, 0.0)
    assert {n for g in groups for n in g["param_names"]} == {"head.1.weight", "head.1.bias"}
    opt = build_optimizer(groups, "lars", lr=0.1, momentum=0.9)
    wrapper.train()
    assert not model.blocks.training and not model.norm.training and model.head.training
    loss = torch.nn.functional.cross_entropy(wrapper(torch.randn(16, 1, 28, 28)), torch.arange(16) % 10)
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed == {"head.1.weight", "head.1.bias", "head.0.running_mean", "head.0.running_var",
                       "head.0.num_batches_tracked"}


def test_probe_head_init_and_features(tiny_checkpoint):
    """Head weights start normal (trunc_normal_ at +-2, as the reference) with std ~0.01 and bias 0; token features
    are the class token after the pre-trained norm, avg features the mean of the normed patch tokens (the pre-trained
    norm is loaded in both)."""
    torch.manual_seed(0)
    model, _, _ = _probe(tiny_checkpoint, "token")
    w = model.head[1].weight
    assert 0.006 < w.std().item() < 0.014 and torch.all(model.head[1].bias == 0)
    avg, _, _ = _probe(tiny_checkpoint, "avg")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        tokens = model.forward_features(x)  # [N, 1+L, D], normed
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
        torch.testing.assert_close(avg.forward_head(avg.forward_features(x), pre_logits=True),
                                   tokens[:, 1:].mean(1))


def test_feature_batches_are_a_function_of_seed_and_epoch():
    """Cached-feature batches: the same (seed, epoch) gives the same order, another epoch another, and an epoch
    covers `steps` full batches without repeats."""
    feats, labels = torch.arange(20.0).unsqueeze(1), torch.arange(20)
    batches = FeatureBatches(feats, labels, batch_size=6, steps=3, seed=1)
    first = [y.tolist() for _, y in batches]
    assert [y.tolist() for _, y in batches] == first and len(first) == 3
    flat = [i for batch in first for i in batch]
    assert len(set(flat)) == 18
    batches.set_epoch(1)
    assert [y.tolist() for _, y in batches] != first


def test_cached_linprobe_runs_end_to_end(tiny_checkpoint, tmp_path):
    """augment=none: features extracted once, the head trains on them (SGD) for 3 epochs and learns; the run
    writes metrics.jsonl (top1/top5 per epoch), param_groups.json (head only), config.yaml and a best checkpoint
    whose reloaded classifier scores the reported top-1 on the images."""
    out = tmp_path / "lp"
    summary = run(load_config(LinprobeConfig, None, [
        f"checkpoint={tiny_checkpoint}", f"output_dir={out}", "epochs=3", "batch_size=32", "data.train_limit=320",
        "data.val_limit=100", "data.num_workers=0", "precision=fp32", "progress=false", "aug.augment=none",
        "optim.warmup_epochs=0", "optim.name=sgd", "optim.base_lr=2.0"]))
    assert summary["protocol"] == "linear probe (cached features)" and summary["best_top1"] > 20.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "top1" in r] == [0, 1, 2]
    groups = json.loads((out / "param_groups.json").read_text())
    assert {n for n, g in groups.items() if g["trainable"]} == {"head.1.weight", "head.1.bias"}
    assert groups["head.1.weight"]["weight_decay"] == 0.0
    assert (out / "config.yaml").is_file()
    from mae.recipes.evaluate import EvaluateConfig
    from mae.recipes.evaluate import run as evaluate_run

    ev = evaluate_run(load_config(EvaluateConfig, None, [f"checkpoint={out}", f"output_dir={tmp_path / 'ev'}",
                                                         "data.val_limit=100", "precision=fp32",
                                                         "data.num_workers=0"]))
    assert ev["top1"] == pytest.approx(summary["best_top1"])
    _, config, _ = load_classifier(out)
    assert config.head == "bn_linear" and config.global_pool == "token"


def test_augmented_linprobe_runs_one_epoch(tiny_checkpoint, tmp_path):
    """The paper's probe (RandomResizedCrop + flip on images, encoder frozen) runs an epoch through the shared
    Engine and leaves the encoder untouched."""
    out = tmp_path / "lp_aug"
    summary = run(load_config(LinprobeConfig, None, [
        f"checkpoint={tiny_checkpoint}", f"output_dir={out}", "epochs=1", "batch_size=32", "data.train_limit=64",
        "data.val_limit=32", "data.num_workers=0", "precision=fp32", "progress=false", "aug.hflip=0"]))
    assert summary["updates"] == 2
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)
    source = load_encoder_source("pretrained", str(tiny_checkpoint), None)
    for key in ("blocks.0.attn.qkv.weight", "cls_token", "norm.weight"):
        assert torch.equal(state["model"][key], source.state_dict[key]), key


def test_unlabelled_folder_is_refused(tiny_checkpoint, tmp_path):
    """A folder of images without class sub-folders cannot be probed: DataError naming the expected layout."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.new("L", (28, 28)).save(tmp_path / "images" / f"{i}.png")
    cfg = load_config(LinprobeConfig, None, [f"checkpoint={tiny_checkpoint}", f"data.path={tmp_path / 'images'}",
                                             f"output_dir={tmp_path / 'out'}", "aug.augment=none"])
    with pytest.raises(DataError, match="class sub-folders"):
        run(cfg)


def test_first_losses_equal_the_stored_reference_curve(tmp_path):
    """The first logged losses of a seeded tiny linear probe (RandomResizedCrop, BatchNorm head, LARS, warm-up)
    equal the stored curve; regenerate deliberately with `python tests/reference_curves.py linprobe`."""
    import reference_curves

    reference_curves.check("linprobe", reference_curves.run_curve("linprobe", tmp_path))


def test_probe_crop_draws_once_and_never_retries():
    """The probe's random-resized crop is the release's TF-style one: exactly four draws of torch's RNG (area,
    aspect, top, left) and the closed-form crop from them, clamped to the image, even where torchvision's crop would
    redraw (a 1000 x 10 strip with scale (0.9, 1) fits no 3/4-4/3 crop: torchvision falls back to a centre crop)."""
    import math

    from mae.data.transforms import SingleDrawResizedCrop

    for height, width, scale in ((1000, 10, (0.9, 1.0)), (224, 300, (0.08, 1.0)), (50, 50, (1.0, 1.0))):
        for seed in range(20):
            torch.manual_seed(seed)
            got = SingleDrawResizedCrop.params(height, width, scale, (3 / 4, 4 / 3))
            after = torch.get_rng_state()
            torch.manual_seed(seed)
            u = torch.rand(2)
            area = height * width * (scale[0] + (scale[1] - scale[0]) * float(u[0]))
            aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(u[1]))
            w = min(round(math.sqrt(area * aspect)), width)
            h = min(round(math.sqrt(area / aspect)), height)
            top, left = int(torch.randint(0, height - h + 1, ())), int(torch.randint(0, width - w + 1, ()))
            assert got == (top, left, h, w)
            assert torch.equal(after, torch.get_rng_state())  # no further draw: no retry loop
            assert 0 <= top <= height - h and 0 <= left <= width - w
    torch.manual_seed(0)
    assert SingleDrawResizedCrop.params(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3))[3] == 10  # width clamped to the image


def test_linprobe_trains_with_the_single_draw_crop(tiny_checkpoint, tmp_path, monkeypatch):
    """aug.augment=rrc gives the probe the single-draw crop (bicubic, to the model's side) and the flip, and a run
    trains through it: every training image of every epoch goes through that crop (with the configured scale), the
    head's Linear moves away from its initialisation and the training loss falls."""
    from mae.data.transforms import SingleDrawResizedCrop
    from mae.recipes import linprobe
    from mae.recipes.linprobe import build_probe_train_transform

    cfg = load_config(LinprobeConfig, None, [f"checkpoint={tiny_checkpoint}", "aug.scale=[0.2,1.0]"])
    tf = build_probe_train_transform(cfg, 28, 1, (0.5,), (0.5,))
    crop = tf.transforms[0]
    assert isinstance(crop, SingleDrawResizedCrop) and crop.size == 28 and crop.scale == (0.2, 1.0)
    from PIL import Image

    assert tf(Image.new("L", (40, 30))).shape == (1, 28, 28)

    crops, initial_heads = [], []
    real_crop, real_build = SingleDrawResizedCrop.__call__, linprobe.build_probe

    def counting_crop(self, image):
        crops.append((self.size, self.scale))
        return real_crop(self, image)

    def build_and_keep_head(*args, **kwargs):
        built = real_build(*args, **kwargs)
        initial_heads.append(built[0].head[1].weight.detach().clone())
        return built

    monkeypatch.setattr(SingleDrawResizedCrop, "__call__", counting_crop)
    monkeypatch.setattr(linprobe, "build_probe", build_and_keep_head)
    out = tmp_path / "lp"
    summary = run(load_config(LinprobeConfig, None, [
        f"checkpoint={tiny_checkpoint}", f"output_dir={out}", "aug.scale=[0.2,1.0]", "epochs=2", "batch_size=16",
        "data.train_limit=32", "data.val_limit=16", "data.num_workers=0", "precision=fp32", "progress=false",
        "log_every=1", "optim.warmup_epochs=0", "optim.name=sgd", "optim.base_lr=2.0"]))
    assert summary["updates"] == 4
    assert crops == [(28, (0.2, 1.0))] * 64  # 32 training images x 2 epochs, each cropped once
    trained = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]["head.1.weight"]
    assert len(initial_heads) == 1 and (trained - initial_heads[0]).abs().max().item() > 1e-3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch_losses = [r["epoch_loss"] for r in records if "epoch_loss" in r]
    assert len(epoch_losses) == 2 and epoch_losses[1] < epoch_losses[0] - 0.05, epoch_losses  # measured: 2.25, 2.00
