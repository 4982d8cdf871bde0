"""Fine-tuning: the classifier built on an MAE encoder, what loads into it, layer-wise lr decay, partial
fine-tuning, position-table interpolation, export to timm / transformers, and a one-epoch end-to-end run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from mae.config import load_config
from mae.errors import CheckpointError, ConfigError, DataError
from mae.interop import save_model
from mae.interop.classifier_export import (
    save_hf_classifier,
    timm_classifier_kwargs,
    to_hf_classifier_state_dict,
    to_timm_classifier_state_dict,
)
from mae.interop.classifier_io import load_classifier
from mae.models import build_model
from mae.models.classifier import (
    ClassifierConfig,
    PartiallyFrozen,
    build_classifier,
    load_encoder_into,
    trainable_prefixes,
)
from mae.recipes.finetune import FinetuneConfig, run
from mae.train.optim import param_groups

TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
        "decoder_num_heads": 2}


def tiny_mae(**overrides):
    torch.manual_seed(0)
    return build_model("mae_vit_micro_patch4_28", **{**TINY, **overrides})


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model(tiny_mae(), path)
    return path


def tiny_classifier(**fields) -> VisionTransformer:
    torch.manual_seed(1)
    mae = tiny_mae()
    cfg = ClassifierConfig.from_mae(mae.config, num_classes=10, **fields)
    model = build_classifier(cfg)
    load_encoder_into(model, mae.state_dict(), mae.config)
    return model


def _reference_layer_id(name: str, depth: int) -> int:
    """The paper's mapping, written out independently: stem 0, blocks.i -> i + 1, everything else depth + 1."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1


def test_layer_decay_scale_of_every_parameter_follows_the_paper_mapping():
    """Each trainable parameter's lr_scale is decay ** (depth + 1 - layer_id) with the paper's layer-id mapping,
    and biases / norms / tokens get no weight decay."""
    model = tiny_classifier()
    depth = 3
    groups = param_groups(model, 0.05, layer_decay=0.75, num_layers=depth)
    seen = {}
    for g in groups:
        for name in g["param_names"]:
            seen[name] = (g["lr_scale"], g["weight_decay"])
    assert set(seen) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        scale, wd = seen[name]
        assert scale == pytest.approx(0.75 ** (depth + 1 - _reference_layer_id(name, depth))), name
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed")
        assert wd == (0.0 if no_decay else 0.05), name
    assert seen["head.weight"][0] == 1.0 and seen["cls_token"][0] == pytest.approx(0.75**4)


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_loading_a_pretraining_checkpoint_leaves_only_the_expected_keys_out(pool):
    """A full MAE (with decoder) loads into the classifier with exactly head.* (and fc_norm.* for avg pooling)
    missing; only decoder keys (and, with avg pooling + fc_norm, the unused final norm) are unexpected; every
    encoder tensor is copied exactly."""
    mae = tiny_mae()
    model = build_classifier(ClassifierConfig.from_mae(mae.config, num_classes=10, global_pool=pool))
    report = load_encoder_into(model, mae.state_dict(), mae.config)
    expected_missing = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if pool == "avg" else set())
    assert set(report.missing) == expected_missing
    decoder = {k for k in mae.state_dict() if k.startswith("decoder_") or k == "mask_token"}
    assert decoder
    assert set(report.skipped) == decoder | ({"norm.weight", "norm.bias"} if pool == "avg" else set())
    sd = model.state_dict()
    for key, value in mae.encoder_state_dict().items():
        if key in sd:
            assert torch.equal(sd[key], value), key


def test_checkpoint_of_another_architecture_is_refused():
    """An encoder of another width does not load silently: CheckpointError naming a mismatching tensor."""
    other = tiny_mae(embed_dim=64, num_heads=2)
    model = build_classifier(ClassifierConfig.from_mae(tiny_mae().config, num_classes=10))
    with pytest.raises(CheckpointError, match="another architecture"):
        load_encoder_into(model, other.state_dict(), other.config)


@pytest.mark.parametrize("img_size", [40, (28, 36)])
def test_position_table_interpolation_matches_timm_resample(img_size):
    """A 7x7 table loaded into a 10x10 (or 7x9, rectangular) classifier equals timm's independent bicubic
    resampling of the same table, and the classifier runs at the new size."""
    mae = tiny_mae()
    model = build_classifier(ClassifierConfig.from_mae(mae.config, num_classes=10, img_size=img_size))
    report = load_encoder_into(model, mae.state_dict(), mae.config)
    assert report.resized == ["pos_embed"]
    new_grid = list(model.patch_embed.grid_size)
    expected = resample_abs_pos_embed(mae.pos_embed.data, new_grid, [7, 7], num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=False)
    torch.testing.assert_close(model.pos_embed.data, expected, rtol=0, atol=1e-6)
    assert torch.equal(model.pos_embed.data[:, 0], mae.pos_embed.data[:, 0])  # class-token slot copied
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    assert model(torch.randn(2, 1, h, w)).shape == (2, 10)


def _changed(before: dict, model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def _one_step(wrapper: PartiallyFrozen, model: torch.nn.Module) -> set[str]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    wrapper.train()
    loss = torch.nn.functional.cross_entropy(wrapper(torch.randn(8, 1, 28, 28)), torch.arange(8))
    loss.backward()
    opt.step()
    return _changed(before, model)


@pytest.mark.parametrize("k", [1, 2])
def test_partial_finetuning_trains_exactly_the_last_k_blocks(k):
    """trainable_blocks=k: after a step, the last k blocks, the final norms and the head changed; every other
    parameter is bit-identical, and the frozen blocks stay in eval mode (no drop path) while the rest trains."""
    model = tiny_classifier(drop_path_rate=0.2)
    wrapper = PartiallyFrozen(model, trainable_prefixes(3, trainable_blocks=k))
    changed = _one_step(wrapper, model)
    trainable_blocks = tuple(f"blocks.{i}." for i in range(3 - k, 3))
    expected = {n for n, _ in model.named_parameters() if n.startswith((*trainable_blocks, "fc_norm.", "head."))}
    assert changed == expected
    assert not model.blocks[0].training and model.blocks[2].training and model.head.training


def test_mlp_only_trains_only_the_last_blocks_mlp():
    """mlp_only: only the last block's MLP sub-block (its norm2 and mlp) plus fc_norm and head change; its attention
    half stays frozen and in eval mode."""
    model = tiny_classifier(drop_path_rate=0.2)
    wrapper = PartiallyFrozen(model, trainable_prefixes(3, mlp_only=True))
    changed = _one_step(wrapper, model)
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(("blocks.2.mlp.", "blocks.2.norm2.", "fc_norm.", "head."))}
    assert changed == expected
    assert model.blocks[2].mlp.training and not model.blocks[2].attn.training
    assert not model.blocks[2].drop_path1.training and model.blocks[2].drop_path2.training


def test_timm_export_loads_strictly_and_gives_the_same_logits():
    """The exported state_dict loads with strict=True into timm's VisionTransformer (avg pool + fc_norm, token pool,
    and a probe's BatchNorm head folded into a Linear) and gives our logits within 1e-5."""
    x = torch.randn(4, 1, 28, 28)
    for fields in ({"global_pool": "avg"}, {"global_pool": "token"},
                   {"global_pool": "token", "fc_norm": False, "head": "bn_linear"}):
        model = tiny_classifier(**fields).eval()
        for p in model.parameters():  # make the head and norms matter
            p.data.add_(0.1 * torch.randn_like(p))
        if fields.get("head") == "bn_linear":
            model.head[0].running_mean.normal_()
            model.head[0].running_var.uniform_(0.5, 2.0)
        timm_model = VisionTransformer(**timm_classifier_kwargs(model.classifier_config)).eval()
        timm_model.load_state_dict(to_timm_classifier_state_dict(model), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(timm_model(x), model(x), rtol=0, atol=1e-5)


def test_hf_export_gives_the_same_logits_and_avg_pool_is_refused(tmp_path):
    """A class-token classifier saved as a ViTForImageClassification directory loads there with every key (nothing
    missing, unexpected or mismatched) and gives our logits within 1e-4; an avg-pool + fc_norm model raises."""
    transformers = pytest.importorskip("transformers")
    model = tiny_classifier(global_pool="token").eval()
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    save_hf_classifier(model, tmp_path / "hf", class_names=[f"digit{i}" for i in range(10)])
    hf, info = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(pixel_values=x).logits, model(x), rtol=0, atol=1e-4)
    assert hf.config.id2label[3] == "digit3"
    back, _, _ = load_classifier(tmp_path / "hf")  # and it reads back
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=1e-5)
    with pytest.raises(CheckpointError, match="pool=token"):
        to_hf_classifier_state_dict(tiny_classifier(global_pool="avg"))


def test_k0_partial_finetuning_is_refused_with_a_pointer_to_linprobe():
    """trainable_blocks=0 (Figure 9's k = 0) is the linear-probe protocol, not a frozen fine-tune: the config is
    refused with one line that names `mae linprobe`; k >= 1 and null still load."""
    with pytest.raises(ConfigError, match=r"trainable_blocks=0 is the linear probe.*mae linprobe"):
        load_config(FinetuneConfig, None, ["checkpoint=x", "trainable_blocks=0"])
    with pytest.raises(ConfigError, match=">= 1"):
        load_config(FinetuneConfig, None, ["checkpoint=x", "trainable_blocks=-2"])
    assert load_config(FinetuneConfig, None, ["checkpoint=x", "trainable_blocks=1"]).trainable_blocks == 1


def test_config_errors_name_the_fix():
    """Impossible settings fail at start-up with one line naming the value and the fix."""
    with pytest.raises(ConfigError, match="checkpoint="):
        load_config(FinetuneConfig, None, [])
    with pytest.raises(ConfigError, match=r"model.name"):
        load_config(FinetuneConfig, None, ["init=scratch"])
    with pytest.raises(ConfigError, match="even batch_size"):
        load_config(FinetuneConfig, None, ["checkpoint=x", "batch_size=7"])
    with pytest.raises(ConfigError, match="global_pool=token"):
        load_config(FinetuneConfig, None, ["checkpoint=x", "export=[hf]"])


def test_finetune_runs_end_to_end_and_writes_its_files(tiny_checkpoint, tmp_path):
    """One epoch on 128 digits from a pre-training checkpoint: summary with best top-1, metrics.jsonl with per-step
    and per-epoch records (top1/top5), param_groups.json with the decayed lr scales, config.yaml, best/last
    checkpoints that reload to the reported accuracy, and a timm export; resume=auto then trains only epoch 1."""
    out = tmp_path / "ft"
    overrides = [f"checkpoint={tiny_checkpoint}", f"output_dir={out}", "epochs=1", "batch_size=32",
                 "data.train_limit=128", "data.val_limit=64", "data.num_workers=0", "precision=fp32", "progress=false",
                 "log_every=1", "aug.hflip=0", "ema=true", "ema_decay=0.9", "export=[timm]", "optim.warmup_epochs=0"]
    summary = run(load_config(FinetuneConfig, None, overrides))
    assert 0.0 <= summary["best_top1"] <= 100.0 and summary["updates"] == 4
    for name in ("config.yaml", "param_groups.json", "metrics.jsonl", "checkpoint-best.pth", "checkpoint-last.pth",
                 "model_timm.safetensors", "summary.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in records) == 4
    epoch = [r for r in records if "top1" in r]
    assert len(epoch) == 1 and {"top5", "ema_top1", "val_loss", "best_top1"} <= set(epoch[0])
    groups = json.loads((out / "param_groups.json").read_text())
    for name, g in groups.items():
        assert g["lr_scale"] == pytest.approx(0.75 ** (4 - _reference_layer_id(name, 3))), name
    _, config, names = load_classifier(out)
    assert names == [str(i) for i in range(10)] and config.global_pool == "avg"
    from mae.recipes.evaluate import EvaluateConfig
    from mae.recipes.evaluate import run as evaluate_run

    ev = evaluate_run(load_config(EvaluateConfig, None, [f"checkpoint={out}", f"output_dir={tmp_path / 'ev'}",
                                                         "data.val_limit=64", "precision=fp32",
                                                         "data.num_workers=0"]))
    assert ev["top1"] == pytest.approx(summary["best_top1"])
    longer = [*overrides[:2], "epochs=2", "resume=auto", *overrides[3:]]
    with pytest.raises(ConfigError, match="epochs 1 -> 2"):  # a longer schedule changes what the run computes
        run(load_config(FinetuneConfig, None, longer))
    resumed = run(load_config(FinetuneConfig, None, [*longer, "allow_config_change=true"]))
    assert resumed["updates"] == 8  # only epoch 1 was trained, continuing the update count
    epochs = [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "top1" in r]
    assert epochs == [0, 1]


def test_shipped_presets_load_against_the_config_classes():
    """Every YAML preset in mae/configs/finetune and mae/configs/linprobe builds its config dataclass without
    error."""
    from mae.presets import PRESETS_DIR
    from mae.recipes.linprobe import LinprobeConfig

    root = PRESETS_DIR
    presets = sorted((root / "finetune").glob("*.yaml")) + sorted((root / "linprobe").glob("*.yaml"))
    assert len(presets) >= 12
    for path in presets:
        cls = LinprobeConfig if path.parent.name == "linprobe" else FinetuneConfig
        cfg = load_config(cls, path, ["checkpoint=x"])
        assert cfg.epochs >= 1, path


def test_first_losses_equal_the_stored_reference_curve(tmp_path):
    """The first logged losses of a seeded tiny fine-tuning (mixup, cutmix, RandAugment, drop path, layer decay,
    warm-up) equal the stored curve; regenerate deliberately with `python tests/reference_curves.py finetune`."""
    import reference_curves

    reference_curves.check("finetune", reference_curves.run_curve("finetune", tmp_path))


def _write_images(root: Path, rels: list[str], size: int = 28) -> None:
    rng = np.random.default_rng(0)
    for rel in rels:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def test_inaturalist_json_splits_train_a_classifier_for_one_epoch(tiny_checkpoint, tmp_path):
    """An iNaturalist-style folder (train2018.json / val2018.json with images / annotations / categories, images
    under train_val2018/) is read by `mae finetune --data <folder>`: labels follow the category ids, class names are
    the category names, and one epoch trains and evaluates."""
    from mae.data import build_dataset

    root = tmp_path / "inat"
    categories = [{"id": 0, "name": "Aves"}, {"id": 1, "name": "Plantae"}, {"id": 2, "name": "Fungi"}]
    for split, n in (("train", 8), ("val", 4)):
        rels = [f"train_val2018/{categories[i % 3]['name']}/{split}{i}.jpg" for i in range(n)]
        _write_images(root, rels)
        doc = {"images": [{"id": 100 + i, "file_name": rel} for i, rel in enumerate(rels)],
               "annotations": [{"id": i, "image_id": 100 + i, "category_id": i % 3} for i in range(n)],
               "categories": categories}
        (root / f"{split}2018.json").write_text(json.dumps(doc))
    (root / "test2018.json").write_text(json.dumps({"images": [], "categories": categories}))  # never a split
    ds = build_dataset(str(root), "train")
    assert ds.classes == ["Aves", "Plantae", "Fungi"] and ds.targets == [0, 1, 2, 0, 1, 2, 0, 1]
    out = tmp_path / "ft"
    summary = run(load_config(FinetuneConfig, None, [
        f"checkpoint={tiny_checkpoint}", f"data.path={root}", f"output_dir={out}", "epochs=1", "batch_size=4",
        "data.num_workers=0", "precision=fp32", "progress=false", "aug.mixup=0", "aug.cutmix=0",
        "aug.rand_augment=null", "device=cpu"]))
    assert summary["updates"] == 2 and 0.0 <= summary["best_top1"] <= 100.0
    _, _, names = load_classifier(out / "checkpoint-best.pth")
    assert names == ["Aves", "Plantae", "Fungi"]


def test_places_file_lists_train_a_classifier_for_one_epoch(tiny_checkpoint, tmp_path):
    """A Places365-style folder (places365_train_standard.txt with '/a/airfield/1.jpg 0' lines, images under
    data_256/; places365_val.txt with bare names under val_256/; categories_places365.txt) is read by
    `mae finetune --data <folder>`, and one epoch trains and evaluates; a malformed line is refused with its
    number."""
    from mae.data import build_dataset

    root = tmp_path / "places"
    names = ["/a/airfield", "/b/bakery", "/c/canyon"]
    train = [(f"{names[i % 3]}/{i:08d}.jpg", i % 3) for i in range(8)]
    val = [(f"Places365_val_{i:08d}.jpg", i % 3) for i in range(4)]
    _write_images(root / "data_256", [p.lstrip("/") for p, _ in train])
    _write_images(root / "val_256", [p for p, _ in val])
    (root / "places365_train_standard.txt").write_text("".join(f"{p} {c}\n" for p, c in train))
    (root / "places365_val.txt").write_text("".join(f"{p} {c}\n" for p, c in val))
    (root / "categories_places365.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    (root / "notes_train.txt").write_text("how the training set was downloaded\n")  # not a list: ignored
    ds = build_dataset(str(root), "val")
    assert ds.classes == ["a/airfield", "b/bakery", "c/canyon"] and ds.targets == [0, 1, 2, 0]
    assert ds.samples[0][0] == str(root / "val_256" / "Places365_val_00000000.jpg")
    summary = run(load_config(FinetuneConfig, None, [
        f"checkpoint={tiny_checkpoint}", f"data.path={root}", f"output_dir={tmp_path / 'ft'}", "epochs=1",
        "batch_size=4", "data.num_workers=0", "precision=fp32", "progress=false", "aug.mixup=0", "aug.cutmix=0",
        "aug.rand_augment=null", "device=cpu"]))
    assert summary["updates"] == 2 and 0.0 <= summary["best_top1"] <= 100.0
    (root / "places365_val.txt").write_text("Places365_val_00000000.jpg 0\nPlaces365_val_00000001.jpg\n")
    with pytest.raises(DataError, match="line 2"):
        build_dataset(str(root), "val")


def test_inat_and_places_presets_follow_table_9_with_adjusted_epochs():
    """The A.5 presets keep Table 9's recipe (base lr 1e-3, layer decay 0.75, batch 1024, RandAug, mixup, cutmix)
    and adjust the epochs, saying so."""
    configs = Path(__file__).resolve().parents[1] / "src" / "mae" / "configs" / "finetune"
    for name, epochs in (("inat2018_vit_b.yaml", 300), ("places365_vit_b.yaml", 70)):
        cfg = load_config(FinetuneConfig, configs / name, ["checkpoint=x"])
        assert (cfg.optim.base_lr, cfg.optim.layer_decay, cfg.aug.mixup, cfg.aug.cutmix) == (1e-3, 0.75, 0.8, 1.0)
        assert cfg.epochs == epochs and cfg.batch_size * 8 == 1024
        assert "adjusts" in (configs / name).read_text()
