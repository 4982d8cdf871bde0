"""Transfer to detection and segmentation (paper section 5, A.3, A.4): the ViT pyramid backbone, loading MAE
checkpoints into it, layer-wise lr decay groups, the synthetic dataset, COCO / mIoU scoring, and tiny end-to-end
runs of `mae detect` and `mae segment` on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mae
from mae.config import load_config
from mae.errors import CheckpointError, ConfigError, DataError
from mae.interop import convert, save_model
from mae.models.pos_embed import resize_pos_embed
from mae.presets import PRESETS_DIR
from mae.transfer import (
    SHAPES,
    RelativePositionBias,
    Segmenter,
    ViTPyramid,
    backbone_param_groups,
    build_backbone,
    build_mask_rcnn,
    coco_eval,
    detections_to_coco,
    generate_synthetic,
    segmentation_metrics,
)
from mae.transfer.detection import CocoInstances

CONFIGS = PRESETS_DIR
TINY_ARCH = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "decoder_embed_dim": 32,
             "decoder_depth": 1, "decoder_num_heads": 2}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from several threads, and on a shared CPU OpenMP spinning can slow them 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_mae(tmp_path_factory) -> tuple[mae.MaskedAutoencoderViT, Path]:
    """A tiny MAE (32 px, patch 8, 4 blocks of width 32) saved in this project's safetensors format."""
    torch.manual_seed(0)
    model = mae.create_model("mae_vit_tiny_patch16", **TINY_ARCH).eval()
    path = save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
    return model, path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "data"
    generate_synthetic(root, num_train=4, num_val=2, image_size=64, max_objects=3)
    return root


# ---------------------------------------------------------------------------------------------------- backbone
@pytest.mark.parametrize("pyramid", ["multiscale", "simple"])
@pytest.mark.parametrize(("patch", "size"), [(8, (64, 64)), (8, (96, 160)), (16, (128, 64)), (16, (224, 224))])
def test_pyramid_outputs_strides_4_to_32_at_any_input_size(pyramid, patch, size):
    """Four maps named '0'..'3' at strides 4, 8, 16, 32 with `out_channels` channels, for input sizes other than
    the stored one (the position table is interpolated)."""
    backbone = ViTPyramid(img_size=64, patch_size=patch, embed_dim=32, depth=4, num_heads=2, pyramid=pyramid)
    out = backbone(torch.randn(2, 3, *size))
    assert list(out) == ["0", "1", "2", "3"] == backbone.feature_names
    for (name, fmap), stride in zip(out.items(), (4, 8, 16, 32), strict=True):
        assert tuple(fmap.shape) == (2, backbone.out_channels, size[0] // stride, size[1] // stride), name
    assert backbone.strides == (4, 8, 16, 32)


def test_multiscale_pyramid_taps_the_last_block_of_each_quarter():
    """Paper A.3: the blocks are split into 4 equal groups; 'simple' uses only the last block."""
    assert ViTPyramid(depth=8, embed_dim=32, num_heads=2, img_size=32).out_indices == (1, 3, 5, 7)
    assert ViTPyramid(depth=12, embed_dim=32, num_heads=2, img_size=32).out_indices == (2, 5, 8, 11)
    assert ViTPyramid(depth=6, embed_dim=32, num_heads=2, img_size=32, pyramid="simple").out_indices == (5,)


def test_impossible_pyramids_raise_config_error():
    """Fewer than 4 blocks for the multiscale pyramid, or strides that are not patch x 2^k, are refused clearly."""
    with pytest.raises(ConfigError, match="depth 2 is fewer than 4"):
        ViTPyramid(depth=2, embed_dim=32, num_heads=2, img_size=32)
    with pytest.raises(ConfigError, match="not the patch size 16 times a power of two"):
        ViTPyramid(depth=4, embed_dim=32, num_heads=2, img_size=32, strides=(4, 8, 12, 32))


def test_relative_position_bias_uses_beit_table_layout():
    """Offsets (dy, dx) read row (dy + h-1)(2w-1) + (dx + w-1); the last 3 rows are class->patch, patch->class,
    class->class; on another grid the offset table is resized and the bias has the new token count."""
    rpb = RelativePositionBias(num_heads=2, grid=(3, 4))
    table = rpb.relative_position_bias_table
    with torch.no_grad():
        table.copy_(torch.arange(table.numel(), dtype=torch.float32).reshape(table.shape))
    bias = rpb((3, 4))[0]  # [heads, 1+12, 1+12]
    q, k = 1 + 1 * 4 + 2, 1 + 2 * 4 + 0  # patches (1, 2) and (2, 0): dy = -1, dx = 2
    assert torch.equal(bias[:, q, k], table[(-1 + 2) * 7 + (2 + 3)])
    n = table.shape[0]
    assert torch.equal(bias[:, 0, 5], table[n - 3]) and torch.equal(bias[:, 5, 0], table[n - 2])
    assert torch.equal(bias[:, 0, 0], table[n - 1])
    assert rpb((5, 6)).shape == (1, 2, 31, 31)


def test_pretrained_backbone_reproduces_the_mae_encoder(tiny_mae):
    """With the checkpoint's weights and a zero relative position bias, the last pyramid input equals the MAE
    encoder's normalised patch tokens at the pre-training resolution (nothing is lost in the transfer)."""
    model, path = tiny_mae
    backbone, _ = build_backbone(path, img_size=32, rel_pos_bias=True)
    backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    maps, grid = backbone.forward_tokens(x)
    tokens = model.forward_features(x)[:, 1:]  # [N, L, D]
    assert grid == (4, 4)
    torch.testing.assert_close(maps[-1], tokens.transpose(1, 2).reshape(2, 32, 4, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["mae", "reference"])
def test_pyramid_loads_an_mae_checkpoint_with_only_the_new_keys_missing(tiny_mae, tmp_path, fmt):
    """Every encoder tensor loads (decoder keys skipped); only the pyramid's new modules (relative position bias,
    output norms, resampling convs) are missing; the 4x4 position table is resized bicubically to the 8x8 grid."""
    model, path = tiny_mae
    if fmt == "reference":
        path = convert(path, tmp_path / "tiny.pth", to="reference")
    backbone, report = build_backbone(path, img_size=64, rel_pos_bias=True, arch_overrides={"num_heads": 2})
    assert {k.split(".")[0] for k in report.missing} == {"rel_pos_bias", "out_norms", "resample"}
    assert all(k.startswith(("decoder", "mask_token")) for k in report.skipped) and report.skipped
    sd = model.state_dict()
    for key in report.loaded:
        if key != "pos_embed":
            assert torch.equal(backbone.state_dict()[key], sd[key]), key
    assert len(report.loaded) == len(model.encoder_state_dict())
    torch.testing.assert_close(backbone.pos_embed.data, resize_pos_embed(sd["pos_embed"], (4, 4), (8, 8)))


def test_checkpoint_of_another_architecture_is_refused(tiny_mae, tmp_path):
    """A file whose encoder is wider or shallower than the backbone raises CheckpointError naming the problem."""
    from mae.models.loading import load_weights

    model, _ = tiny_mae
    wide = ViTPyramid(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)
    with pytest.raises(CheckpointError, match=r"cls_token is \[1, 1, 32\] in the file but \[1, 1, 64\]"):
        load_weights(wide, model.state_dict())
    deep = ViTPyramid(img_size=32, patch_size=8, embed_dim=32, depth=8, num_heads=2)
    with pytest.raises(CheckpointError, match=r"missing from the file: blocks.4"):
        load_weights(deep, model.state_dict())


def test_layer_decay_groups_cover_backbone_blocks_and_heads(tiny_mae):
    """In Mask R-CNN, backbone parameters get decay**(depth + 1 - layer_id) (stem 0, block i and its relative bias
    i + 1), the rest (final norm, pyramid convs, FPN, RPN, RoI heads) the full lr; tokens, positions, bias tables,
    biases and norms get no weight decay."""
    _, path = tiny_mae
    backbone, _ = build_backbone(path, img_size=64, rel_pos_bias=True)
    model = build_mask_rcnn(backbone, 3, min_size=64, max_size=64, fpn_channels=16, box_head_dim=32,
                            mask_head_channels=8, anchor_sizes=(8, 16, 32, 64, 128))
    groups = backbone_param_groups(model, backbone, "backbone.body.", weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    body = "backbone.body."
    assert scale[body + "patch_embed.proj.weight"] == scale[body + "cls_token"] == 0.5**5
    for i in range(4):
        assert scale[f"{body}blocks.{i}.attn.qkv.weight"] == 0.5 ** (4 - i)
        assert scale[f"{body}rel_pos_bias.{i}.relative_position_bias_table"] == 0.5 ** (4 - i)
    for name in (body + "norm.weight", body + "resample.0.0.weight", "backbone.fpn.inner_blocks.0.0.weight",
                 "rpn.head.conv.0.0.weight", "roi_heads.box_predictor.cls_score.weight"):
        assert scale[name] == 1.0, name
    assert decay[body + "cls_token"] == decay[body + "rel_pos_bias.0.relative_position_bias_table"] == 0.0
    assert decay[body + "blocks.0.norm1.weight"] == decay[body + "blocks.0.attn.qkv.bias"] == 0.0
    assert decay[body + "blocks.0.attn.qkv.weight"] == decay["backbone.fpn.layer_blocks.0.0.weight"] == 0.05
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(scale) == trainable  # every trainable parameter is in exactly one group


# ---------------------------------------------------------------------------------------------------- data
def test_synthetic_dataset_agrees_across_formats_and_is_deterministic(shapes, tmp_path):
    """For every image the COCO instance masks of class k are exactly the label-PNG pixels of value k + 2, the rest
    is background (1); boxes enclose their masks; a second generation with the same settings is identical, a
    folder with matching meta.json is reused untouched, and one made with other settings is not overwritten."""
    from pycocotools import mask as mask_utils

    data = generate_synthetic(shapes, num_train=4, num_val=2, image_size=64, max_objects=3)
    for split, count in (("training", 4), ("validation", 2)):
        coco = json.loads(data.coco(split).read_text())
        assert [c["name"] for c in coco["categories"]] == list(SHAPES)
        assert len(coco["images"]) == count and coco["annotations"]
        for info in coco["images"]:
            labels = np.asarray(Image.open(data.labels(split) / info["file_name"]))
            expected = np.ones_like(labels)
            for ann in (a for a in coco["annotations"] if a["image_id"] == info["id"]):
                m = mask_utils.decode(ann["segmentation"]).astype(bool)
                assert not (expected[m] != 1).any()  # instances do not overlap
                expected[m] = ann["category_id"] + 1
                ys, xs = np.nonzero(m)
                x, y, w, h = ann["bbox"]
                assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert np.array_equal(labels, expected)
    stamp = data.coco("training").stat().st_mtime_ns
    assert generate_synthetic(shapes, num_train=4, num_val=2, image_size=64, max_objects=3).coco(
        "training").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="other settings"):  # never silently replace data another run may read
        generate_synthetic(shapes, num_train=5, num_val=2, image_size=64, max_objects=3)
    again = generate_synthetic(tmp_path / "again", num_train=4, num_val=2, image_size=64, max_objects=3)
    for name in ("images/training/000003.png", "annotations/validation/000001.png", "coco/instances_training.json"):
        assert (again.root / name).read_bytes() == (data.root / name).read_bytes(), name


def test_coco_dataset_targets_and_flip(shapes):
    """CocoInstances gives torchvision-style targets; a flip mirrors boxes and masks together."""
    from mae.transfer.detection import hflip

    ds = CocoInstances(shapes / "images/training", shapes / "coco/instances_training.json")
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and image.min() >= 0 and image.max() <= 1
    k = len(target["labels"])
    assert target["boxes"].shape == (k, 4) and target["masks"].shape == (k, 64, 64)
    assert ds.classes == list(SHAPES) and set(target["labels"].tolist()) <= set(range(1, 6))
    flipped_image, flipped = hflip(image, target)
    ys, xs = torch.nonzero(flipped["masks"][0], as_tuple=True)
    assert flipped["boxes"][0].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1,
                                            ys.max().item() + 1]
    assert torch.equal(flipped_image.flip(-1), image)


# ---------------------------------------------------------------------------------------------------- metrics
def test_ground_truth_as_detections_scores_100_box_and_mask_ap(shapes):
    """The COCO conversion (xywh boxes, RLE masks, category ids) and COCOeval wiring: perfect predictions give
    AP = 100 for 'bbox' and 'segm'; no detections give 0."""
    ds = CocoInstances(shapes / "images/validation", shapes / "coco/instances_validation.json")
    results = []
    for image_id in ds.ids:
        t = ds.target(image_id, 64, 64)
        output = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                  "masks": t["masks"][:, None].float()}
        results += detections_to_coco(output, image_id, ds.category_ids)
    assert coco_eval(ds.coco, results, "bbox")["AP"] == pytest.approx(100.0)
    assert coco_eval(ds.coco, results, "segm")["AP"] == pytest.approx(100.0)
    assert coco_eval(ds.coco, [], "bbox")["AP"] == 0.0


def test_segmentation_metrics_from_a_known_confusion_matrix():
    """mIoU averages IoU over classes that occur (in ground truth or prediction); aAcc counts pixels; ignored
    pixels are left out of the confusion matrix."""
    from mae.transfer.segmentation import confusion_matrix

    label = torch.tensor([0, 0, 1, 1, 255, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])
    confusion = confusion_matrix(pred, label, num_classes=4)
    assert confusion.sum() == 5
    m = segmentation_metrics(confusion, ["a", "b", "c", "d"])
    iou = {"a": 1 / 3, "b": 2 / 3, "c": 0.0}
    assert m["per_class_IoU"]["d"] is None
    assert m["mIoU"] == pytest.approx(100 * sum(iou.values()) / 3)
    assert m["aAcc"] == pytest.approx(60.0)


def test_segmenter_logits_have_the_input_size(tiny_mae):
    """UperNet + auxiliary head on the pyramid give per-pixel logits at the input size, also for sizes that are
    not multiples of 32; the auxiliary output exists only in training."""
    _, path = tiny_mae
    backbone, _ = build_backbone(path, img_size=64, rel_pos_bias=True)
    model = Segmenter(backbone, num_classes=6, channels=16, aux_channels=8)
    out = model(torch.randn(2, 3, 72, 100))
    assert out["out"].shape == out["aux"].shape == (2, 6, 72, 100)
    assert list(model.eval()(torch.randn(1, 3, 64, 64))) == ["out"]


# ---------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("detect/*.yaml")) + sorted(CONFIGS.glob("segment/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_load(path):
    """Every shipped detect / segment YAML is valid for its dataclass."""
    from mae.recipes.detect import DetectConfig
    from mae.recipes.segment import SegmentConfig

    cls = DetectConfig if path.parent.name == "detect" else SegmentConfig
    cfg = load_config(cls, path, ["backbone.checkpoint=x.safetensors"])
    assert cfg.epochs >= 1


def test_training_without_an_encoder_source_is_refused():
    """mode=train needs a checkpoint (or a model name for random init); the error says which key to set."""
    from mae.recipes.detect import DetectConfig

    with pytest.raises(ConfigError, match=r"backbone.checkpoint"):
        load_config(DetectConfig, None, [])
    with pytest.raises(ConfigError, match="weights="):
        load_config(DetectConfig, None, ["mode=evaluate"])


def test_detect_end_to_end_then_evaluate(tiny_mae, shapes, tmp_path):
    """A tiny Mask R-CNN trains on the synthetic scenes (pre-trained at 32 px, fine-tuned at 64 px), writes its
    files and metrics, and `mode=evaluate` on the saved run reproduces the final box and mask AP."""
    from mae.recipes.detect import DetectConfig, run

    _, ckpt = tiny_mae
    common = [f"data.path=synthetic:{shapes}", "data.synthetic.num_train=4", "data.synthetic.num_val=2",
              "data.synthetic.image_size=64", "data.synthetic.max_objects=3", "device=cpu", "precision=fp32",
              "progress=false", "num_workers=0"]
    cfg = load_config(DetectConfig, CONFIGS / "detect/synthetic_tiny.yaml", [
        *common, f"backbone.checkpoint={ckpt}", f"output_dir={tmp_path / 'run'}", "epochs=2", "batch_size=2",
        "eval_every=1", "head.min_size=64", "head.max_size=64", "head.fpn_channels=16", "head.box_head_dim=32",
        "head.mask_head_channels=8", "head.anchor_sizes=[8,16,32,64,128]"])
    summary = run(cfg)
    assert summary["updates"] == 4 and summary["init"] == "pre-trained"
    for name in ("config.yaml", "checkpoint-last.pth", "checkpoint-best.pth", "metrics.jsonl", "summary.json",
                 "param_groups.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert all(0.0 <= summary[k] <= 100.0 for k in ("box_AP", "mask_AP"))
    last = load_config(DetectConfig, None, [*common, "mode=evaluate", f"weights={tmp_path / 'run/checkpoint-last.pth'}",
                                            f"output_dir={tmp_path / 'eval'}"])
    scored = run(last)
    assert scored["box_AP"] == pytest.approx(summary["box_AP"]) and scored["mask_AP"] == pytest.approx(
        summary["mask_AP"])


def test_segment_cli_end_to_end(tiny_mae, shapes, tmp_path, capsys):
    """`mae segment` trains UperNet (relative position bias on) on the synthetic label PNGs and prints mIoU; the
    loss falls and the saved checkpoint re-scores to the same mIoU with mode=evaluate."""
    from mae.cli import main

    _, ckpt = tiny_mae
    common = [f"--data=synthetic:{shapes}", "data.synthetic.num_train=4", "data.synthetic.num_val=2",
              "data.synthetic.image_size=64", "data.synthetic.max_objects=3", "--device=cpu", "--precision=fp32",
              "progress=false", "num_workers=0", "data.eval_scale=null"]
    code = main(["segment", "--config", str(CONFIGS / "segment/synthetic_tiny.yaml"), f"--checkpoint={ckpt}",
                 f"--output-dir={tmp_path / 'run'}", "--epochs=3", *common, "batch_size=2", "eval_every=3",
                 "data.crop_size=64", "data.scale=64", "head.channels=16", "head.aux_channels=8", "optim.lr=1e-3"])
    assert code == 0
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert "mIoU:" in capsys.readouterr().out
    assert summary["last_epoch_loss"] < summary["first_epoch_loss"]
    assert 0.0 < summary["aAcc"] <= 100.0
    code = main(["segment", "--mode=evaluate", f"--weights={tmp_path / 'run'}", f"--output-dir={tmp_path / 'e'}",
                 *common])
    assert code == 0
    assert json.loads((tmp_path / "e/eval.json").read_text())["mIoU"] == pytest.approx(summary["mIoU"])


# ---------------------------------------------------------------------------------------------------- BEiT-style head
def test_beit_rule_picks_blocks_3_5_7_11_of_vit_b_and_7_11_15_23_of_vit_l():
    """BEiT's segmentation blocks (0-based): 3, 5, 7, 11 for 12 blocks and 7, 11, 15, 23 for 24; explicit
    out_indices win; impossible choices are refused."""
    from mae.transfer.backbone import default_out_indices

    assert default_out_indices(12, "multiscale", "beit") == (3, 5, 7, 11)
    assert default_out_indices(24, "multiscale", "beit") == (7, 11, 15, 23)
    assert default_out_indices(12, "multiscale", "quarters") == (2, 5, 8, 11)
    assert ViTPyramid(depth=8, embed_dim=32, num_heads=2, img_size=32, out_indices=(0, 2, 5, 7)).out_indices == (
        0, 2, 5, 7)
    with pytest.raises(ConfigError, match="4 increasing"):
        ViTPyramid(depth=8, embed_dim=32, num_heads=2, img_size=32, out_indices=(0, 2, 2, 7))
    with pytest.raises(ConfigError, match="deconv_norm"):
        ViTPyramid(depth=4, embed_dim=32, num_heads=2, img_size=32, deconv_norm="gn")


def test_beit_style_pyramid_takes_the_named_blocks_raw():
    """With feature_norm=none the four maps are exactly the outputs of the named blocks (class token dropped),
    resampled: stride 16 is block 7's output itself, stride 32 its max-pool of block 11's, stride 4 goes through
    ConvTranspose -> BatchNorm -> GELU -> ConvTranspose; the position table is a trained parameter."""
    torch.manual_seed(0)
    backbone = ViTPyramid(img_size=64, patch_size=16, embed_dim=32, depth=12, num_heads=2, feature_blocks="beit",
                          feature_norm="none", deconv_norm="batchnorm", learnable_pos_embed=True).eval()
    captured = {}
    for i in (3, 5, 7, 11):
        backbone.blocks[i].register_forward_hook(lambda m, inp, out, i=i: captured.__setitem__(i, out))
    maps = backbone(torch.randn(2, 3, 64, 64))

    def grid(tokens):  # [N, 1+L, D] -> [N, D, 4, 4]
        return tokens[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)

    torch.testing.assert_close(maps["2"], grid(captured[7]))
    torch.testing.assert_close(maps["3"], torch.nn.functional.max_pool2d(grid(captured[11]), 2))
    torch.testing.assert_close(maps["1"], backbone.resample[1](grid(captured[5])))
    kinds = [type(m).__name__ for m in backbone.resample[0]]
    assert kinds == ["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"]
    assert len(backbone.out_norms) == 0 and backbone.pos_embed.requires_grad
    assert backbone.pyramid_options() == {"out_indices": [3, 5, 7, 11], "feature_norm": "none",
                                          "deconv_norm": "batchnorm", "learnable_pos_embed": True}
    old = ViTPyramid(img_size=64, patch_size=16, embed_dim=32, depth=12, num_heads=2)
    assert not old.pos_embed.requires_grad and len(old.out_norms) == 3 and old.out_indices == (2, 5, 8, 11)


def test_sliding_window_inference_averages_overlapping_windows(tiny_mae):
    """On an 80 x 112 image with 48-px windows every 32 px (starts 0, 32 down; 0, 32, 64 across) the logits are
    the per-pixel mean of the windows' logits, computed here window by window; an image no larger than the window
    is scored whole."""
    from mae.transfer.segmentation import slide_logits, window_starts

    _, path = tiny_mae
    backbone, _ = build_backbone(path, img_size=48, feature_norm="none", deconv_norm="batchnorm")
    model = Segmenter(backbone, num_classes=5, channels=16, aux_channels=0).eval()
    assert window_starts(80, 48, 32) == [0, 32] and window_starts(112, 48, 32) == [0, 32, 64]
    assert window_starts(40, 48, 32) == [0]
    image = torch.randn(1, 3, 80, 112)
    total, count = torch.zeros(1, 5, 80, 112), torch.zeros(1, 1, 80, 112)
    with torch.no_grad():
        for top in (0, 32):
            for left in (0, 32, 64):
                total[..., top:top + 48, left:left + 48] += model(image[..., top:top + 48, left:left + 48])["out"]
                count[..., top:top + 48, left:left + 48] += 1
        got = slide_logits(model, image, 5, crop=48, stride=32)
        torch.testing.assert_close(got, total / count)
        assert not torch.allclose(got, model(image)["out"], atol=1e-3)
        small = torch.randn(1, 3, 40, 48)
        torch.testing.assert_close(slide_logits(model, small, 5, crop=48, stride=32), model(small)["out"])


def test_poly_schedule_warms_up_over_1500_steps_then_decays_linearly():
    """BEiT's schedule: lr = peak * (1 - t/T) after warm-up, times a factor rising linearly from 1e-6 to 1 during
    the first 1,500 steps; min_lr at the end; the dataclass is callable like the run layer's LRSchedule."""
    from mae.transfer.segmentation import PolySchedule, poly_lr

    sched = PolySchedule(peak_lr=1e-4, total_steps=16000, warmup_steps=1500)
    assert sched(0) == pytest.approx(1e-4 * 1e-6)
    assert sched(750) == pytest.approx(1e-4 * (1 - 750 / 16000) * (1e-6 + (1 - 1e-6) * 0.5))
    assert sched(1500) == pytest.approx(1e-4 * (1 - 1500 / 16000))
    assert sched(8000) == pytest.approx(0.5e-4)
    assert sched(16000) == 0.0 and poly_lr(100, 200, 0, 1.0, power=2.0) == pytest.approx(0.25)
    lrs = [sched(t) for t in range(0, 16000, 100)]
    assert lrs.index(max(lrs)) == 15  # the peak is at the end of the warm-up


def test_segment_defaults_and_ade20k_presets_are_beit_style():
    """`mae segment`'s defaults and both ADE20K presets use BEiT's choices (blocks, raw features, BatchNorm
    deconvolution, learnable positions, poly + 1,500 warm-up iterations, slide 512 / 341, UperNet as wide as the
    encoder); synthetic_tiny.yaml keeps the earlier head."""
    from mae.recipes.segment import SegmentConfig

    default = load_config(SegmentConfig, None, ["backbone.checkpoint=x"])
    for cfg in (default,
                load_config(SegmentConfig, CONFIGS / "segment/ade20k_vit_base.yaml", ["backbone.checkpoint=x"]),
                load_config(SegmentConfig, CONFIGS / "segment/ade20k_vit_large.yaml", ["backbone.checkpoint=x"])):
        b = cfg.backbone
        assert (b.feature_blocks, b.feature_norm, b.deconv_norm, b.learnable_pos_embed, b.rel_pos_bias) == (
            "beit", "none", "batchnorm", True, True)
        assert (cfg.optim.schedule, cfg.optim.warmup_iters, cfg.test.mode, cfg.test.crop, cfg.test.stride) == (
            "poly", 1500, "slide", 512, 341)
    assert default.head.channels is None  # = the encoder's width
    assert load_config(SegmentConfig, CONFIGS / "segment/ade20k_vit_large.yaml",
                       ["backbone.checkpoint=x"]).head.channels == 1024
    old = load_config(SegmentConfig, CONFIGS / "segment/synthetic_tiny.yaml", ["backbone.checkpoint=x"])
    assert (old.backbone.feature_norm, old.backbone.deconv_norm, old.test.mode) == ("layernorm", "layernorm", "whole")


def test_segment_beit_head_end_to_end_and_evaluate(tiny_mae, shapes, tmp_path):
    """The BEiT-style head trains on the synthetic scenes with sliding-window evaluation (48-px windows over 64-px
    scenes), UperNet as wide as the encoder by default, stores its pyramid choices in the checkpoint, and
    mode=evaluate rebuilds it to the same mIoU."""
    from mae.recipes.segment import SegmentConfig, run

    _, ckpt = tiny_mae
    common = [f"data.path=synthetic:{shapes}", "data.synthetic.num_train=4", "data.synthetic.num_val=2",
              "data.synthetic.image_size=64", "data.synthetic.max_objects=3", "device=cpu", "precision=fp32",
              "progress=false", "num_workers=0", "data.eval_scale=null", "test.crop=48", "test.stride=32"]
    summary = run(load_config(SegmentConfig, CONFIGS / "segment/synthetic_tiny_beit.yaml", [
        *common, f"backbone.checkpoint={ckpt}", f"output_dir={tmp_path / 'run'}", "epochs=2", "batch_size=2",
        "eval_every=2", "data.crop_size=64", "data.scale=64", "head.aux_channels=8", "head.channels=null"]))
    state = torch.load(tmp_path / "run/checkpoint-last.pth", weights_only=True)
    assert state["task"]["backbone"]["feature_norm"] == "none" and state["task"]["head"]["channels"] == 32
    scored = run(load_config(SegmentConfig, None, [*common, "mode=evaluate", f"weights={tmp_path / 'run'}",
                                                   f"output_dir={tmp_path / 'e'}"]))
    assert scored["mIoU"] == pytest.approx(summary["mIoU"])
