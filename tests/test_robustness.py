"""Robustness benchmarks of paper Table 13: ImageNet-C corruptions, folders and mCE against a hand computation;
the shipped ImageNet-A / ImageNet-R class lists and `class_map=imagenet-r`."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae.config import load_config
from mae.data import build_eval_transform
from mae.data import corruptions as C
from mae.errors import ConfigError, DataError
from mae.eval.imagenet_c import ALEXNET_ERRORS, corruption_report
from mae.interop.classifier_io import classifier_state
from mae.models import build_model
from mae.models.classifier import ClassifierConfig, build_classifier
from mae.recipes.corrupt import CorruptConfig
from mae.recipes.corrupt import run as corrupt_run
from mae.recipes.evaluate import CLASS_LISTS, EvaluateConfig, class_list_path
from mae.recipes.evaluate import run as evaluate_run
from mae.train.checkpoint import atomic_save

FAST = ["precision=fp32", "data.num_workers=0", "device=cpu"]


def _classifier(num_classes: int, img_size: int = 32, seed: int = 1) -> tuple[torch.nn.Module, ClassifierConfig]:
    torch.manual_seed(seed)
    mae = build_model("mae_vit_micro_patch4_28", img_size=img_size, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                       decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    config = ClassifierConfig.from_mae(mae.config, num_classes=num_classes, global_pool="token")
    model = build_classifier(config)
    torch.nn.init.normal_(model.head.weight, std=1.0)  # decisive, image-dependent predictions
    return model.eval(), config


def _save_classifier(model, config, path: Path, names: list[str]) -> Path:
    atomic_save(classifier_state(model, config, names, epoch=0), path)
    return path


def _photo_folder(root: Path, classes: int = 3, per_class: int = 3, size: int = 48) -> Path:
    """Class folders of small PNGs with structure (gradients + noise), so corruptions change predictions."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            base = np.stack([np.sin(6 * xx + c + i), np.cos(5 * yy - c), xx * yy + 0.3 * c], -1)
            img = np.clip(0.5 + 0.35 * base + 0.1 * rng.standard_normal((size, size, 3)), 0, 1)
            Image.fromarray(np.uint8(img * 255)).save(folder / f"img{i}.png")
    return root


# ------------------------------------------------------------------ corruptions
def test_alexnet_table_matches_the_published_means():
    """AlexNet's per-severity errors average to the per-corruption values the benchmark's users normalise by
    (AugMix's ALEXNET_ERR list, e.g. 0.886428 for gaussian noise, 0.5646 for brightness); 15 corruptions x 5."""
    published_means = [0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816, 0.826572,
                       0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500]
    assert tuple(ALEXNET_ERRORS) == C.CORRUPTIONS
    for name, mean in zip(C.CORRUPTIONS, published_means, strict=True):
        assert len(ALEXNET_ERRORS[name]) == 5
        assert sum(ALEXNET_ERRORS[name]) / 5 == pytest.approx(mean, abs=1e-6), name


def test_alexnet_scores_an_mce_of_100():
    """By definition AlexNet's own errors give CE = 100 for every corruption and mCE = 100, on the full benchmark
    and on any subset of severities."""
    full = corruption_report({n: {s + 1: 100 * e for s, e in enumerate(v)} for n, v in ALEXNET_ERRORS.items()})
    assert full.complete and full.mce == pytest.approx(100.0)
    part = corruption_report({"fog": {2: 100 * ALEXNET_ERRORS["fog"][1]}})
    assert not part.complete and part.ce["fog"] == pytest.approx(100.0)


@pytest.mark.parametrize("name", C.FALLBACK_CORRUPTIONS)
def test_fallback_corruptions_change_the_image_and_grow_with_severity(name, monkeypatch, tmp_path):
    """Without the imagecorruptions package the 7 fallback corruptions still work: same size, reproducible from the
    seed, and severity 5 moves the pixels further from the original than severity 1."""
    monkeypatch.setattr(C, "has_imagecorruptions", lambda: False)
    image = Image.open(_photo_folder(tmp_path, 1, 1) / "class0" / "img0.png").convert("RGB")
    x = np.asarray(image, dtype=np.float64)
    dist = {}
    for s in (1, 5):
        a, b = C.corrupt(image, name, s, seed=3), C.corrupt(image, name, s, seed=3)
        assert a.size == image.size and np.array_equal(np.asarray(a), np.asarray(b))
        dist[s] = np.abs(np.asarray(a, dtype=np.float64) - x).mean()
    assert dist[5] > dist[1] > 0


def test_without_the_package_only_the_subset_is_offered(monkeypatch):
    """Asking for a corruption the fallback lacks names the package to install."""
    monkeypatch.setattr(C, "has_imagecorruptions", lambda: False)
    assert C.available_corruptions() == C.FALLBACK_CORRUPTIONS and len(C.FALLBACK_CORRUPTIONS) == 7
    with pytest.raises(ConfigError, match="imagecorruptions"):
        C.check_corruptions(["frost"])
    with pytest.raises(ConfigError, match="not an ImageNet-C corruption"):
        C.check_corruptions(["rain"])


def test_all_15_corruptions_with_the_package():
    """With imagecorruptions installed every benchmark corruption runs and is reproducible from the seed."""
    pytest.importorskip("imagecorruptions")
    image = Image.fromarray(np.uint8(np.random.default_rng(0).integers(0, 256, (40, 40, 3))))
    for name in C.CORRUPTIONS:
        a, b = C.corrupt(image, name, 3, seed=5), C.corrupt(image, name, 3, seed=5)
        assert a.size == (40, 40) and np.array_equal(np.asarray(a), np.asarray(b)), name


def test_corrupt_writes_the_imagenet_c_layout(tmp_path):
    """`mae corrupt` writes <corruption>/<severity>/<class>/<image>.JPEG for every image, plus clean/, cropped to
    image_size, and the same files again on a rerun (seeded)."""
    src = _photo_folder(tmp_path / "val", classes=2, per_class=2)
    cfg = load_config(CorruptConfig, None, [f"data={src}", f"output_dir={tmp_path / 'c'}", "image_size=32",
                                            "corruptions=[gaussian_noise,contrast]", "severities=[1,4]"])
    summary = corrupt_run(cfg)
    assert summary["written"] == 4 * 2 * 2 and not summary["complete"]
    files = sorted(p.relative_to(tmp_path / "c").as_posix() for p in (tmp_path / "c").rglob("*.JPEG"))
    assert len(files) == 16 + 4 and "gaussian_noise/4/class1/img0.JPEG" in files and "clean/class0/img1.JPEG" in files
    with Image.open(tmp_path / "c" / "contrast" / "1" / "class0" / "img0.JPEG") as f:
        assert f.size == (32, 32)
    first = (tmp_path / "c" / "gaussian_noise" / "4" / "class1" / "img0.JPEG").read_bytes()
    corrupt_run(cfg)
    assert (tmp_path / "c" / "gaussian_noise" / "4" / "class1" / "img0.JPEG").read_bytes() == first
    with pytest.raises(ConfigError, match="severities"):
        load_config(CorruptConfig, None, ["severities=[0,6]"])


def test_corrupt_reads_a_labelled_builtin_set_with_a_per_class_limit(tmp_path):
    """A built-in set (no files) is corrupted too: limit_per_class=1 writes one image per class (10 digits),
    upsampled to image_size."""
    summary = corrupt_run(load_config(CorruptConfig, None, [
        "data=builtin:digits", f"output_dir={tmp_path}", "image_size=32", "corruptions=[pixelate]",
        "severities=[2]", "limit_per_class=1"]))
    assert summary["images"] == 10 and summary["written"] == 10 and summary["classes"] == 10
    files = sorted((tmp_path / "pixelate" / "2").rglob("*.JPEG"))
    assert len(files) == 10 and len({f.parent.name for f in files}) == 10


# ------------------------------------------------------------------ mCE
def test_imagenet_c_mce_equals_a_hand_computation(tmp_path):
    """protocol=imagenet-c on a generated corruption set and a tiny model: every error, CE and the mCE equal an
    independent per-image computation (error summed over severities / AlexNet's sum, mean over corruptions); the
    per-corruption CSV and Markdown tables and the clean-vs-corrupted gap are written."""
    src = _photo_folder(tmp_path / "val", classes=3, per_class=3)
    root = tmp_path / "inc"
    corrupt_run(load_config(CorruptConfig, None, [f"data={src}", f"output_dir={root}", "image_size=32",
                                                  "corruptions=[gaussian_noise,brightness,pixelate]",
                                                  "severities=[1,3,5]"]))
    model, config = _classifier(3)
    ckpt = _save_classifier(model, config, tmp_path / "checkpoint-best.pth", ["class0", "class1", "class2"])
    summary = evaluate_run(load_config(EvaluateConfig, None, [
        f"checkpoint={ckpt}", f"data.path={root}", "protocol=imagenet-c", f"output_dir={tmp_path / 'out'}",
        "data.crop_pct=1.0", "batch_size=4", *FAST]))

    tf = build_eval_transform(32, 3, crop_pct=1.0)

    def error(folder: Path) -> float:
        wrong = total = 0
        for label, cls in enumerate(["class0", "class1", "class2"]):
            for path in sorted((folder / cls).iterdir()):
                with Image.open(path) as f, torch.no_grad():
                    wrong += int(model(tf(f.convert("RGB"))[None]).argmax() != label)
                total += 1
        return 100.0 * wrong / total

    ces = {}
    for name in ("gaussian_noise", "brightness", "pixelate"):
        errs = {s: error(root / name / str(s)) for s in (1, 3, 5)}
        for s, e in errs.items():
            assert summary["errors"][name][str(s)] == pytest.approx(e, abs=1e-9)
        ces[name] = 100 * sum(e / 100 for e in errs.values()) / sum(ALEXNET_ERRORS[name][s - 1] for s in (1, 3, 5))
        assert summary["corruption_errors"][name] == pytest.approx(ces[name], abs=1e-9)
    assert summary["mCE"] == pytest.approx(sum(ces.values()) / 3, abs=1e-9)
    clean = error(root / "clean")
    assert summary["clean_error"] == pytest.approx(clean, abs=1e-9)
    mean_err = sum(float(v) for e in summary["errors"].values() for v in e.values()) / 9
    assert summary["clean_corrupted_gap"] == pytest.approx(mean_err - clean, abs=1e-9)
    assert summary["complete"] is False and "frost" in summary["corruptions_missing"]

    rows = list(csv.DictReader((tmp_path / "out" / "imagenet_c.csv").read_text().splitlines()))
    assert [r["corruption"] for r in rows] == ["gaussian_noise", "brightness", "pixelate", "mCE"]
    assert float(rows[0]["ce"]) == pytest.approx(ces["gaussian_noise"], abs=1e-3) and rows[0]["error_s2"] == ""
    assert float(rows[-1]["ce"]) == pytest.approx(summary["mCE"], abs=1e-3)
    md = (tmp_path / "out" / "imagenet_c.md").read_text()
    assert f"**mCE {summary['mCE']:.1f}**" in md and "| pixelate |" in md and "not comparable" in md


def test_imagenet_c_refuses_a_folder_without_the_layout(tmp_path):
    """A plain class folder is not an ImageNet-C tree: one line naming the expected layout."""
    src = _photo_folder(tmp_path / "val", classes=2, per_class=1)
    model, config = _classifier(2)
    ckpt = _save_classifier(model, config, tmp_path / "c.pth", ["class0", "class1"])
    with pytest.raises(DataError, match="<corruption>/<severity>/<class>"):
        evaluate_run(load_config(EvaluateConfig, None, [f"checkpoint={ckpt}", f"data.path={src}",
                                                        "protocol=imagenet-c", f"output_dir={tmp_path / 'o'}", *FAST]))


# ------------------------------------------------------------------ ImageNet-A / ImageNet-R
def _read_list(name: str) -> list[tuple[str, int]]:
    rows = [ln.split() for ln in class_list_path(name).read_text().splitlines() if ln and not ln.startswith("#")]
    return [(wnid, int(i)) for wnid, i in rows]


@pytest.mark.parametrize("name", list(CLASS_LISTS))
def test_shipped_class_lists_have_200_imagenet_classes_and_agree_with_timm(name):
    """Each shipped list names 200 distinct WordNet ids with increasing ImageNet-1K indices; where timm ships the
    same lists, ours equals them (WordNet ids and indices)."""
    rows = _read_list(name)
    assert len(rows) == 200 and len({w for w, _ in rows}) == 200
    indices = [i for _, i in rows]
    assert indices == sorted(indices) and indices[0] >= 0 and indices[-1] < 1000
    info = Path(pytest.importorskip("timm").__file__).parent / "data" / "_info"
    stem = name.replace("-", "_")
    if not (info / f"{stem}_synsets.txt").is_file():
        pytest.skip("this timm ships no ImageNet-A/R lists")
    assert [w for w, _ in rows] == (info / f"{stem}_synsets.txt").read_text().split()
    assert indices == [int(x) for x in (info / f"{stem}_indices.txt").read_text().split()]
    assert {w for w, i in rows} <= set((info / "imagenet_synsets.txt").read_text().split())


def test_class_map_imagenet_r_restricts_the_logits_to_its_200_classes(tmp_path):
    """class_map=imagenet-r on a 200-folder dataset against a 1000-class model: the logits are cut to exactly the
    200 listed classes. The model's head always prefers class 0 (tench, not in ImageNet-R), then listed class
    #5: restricted, every image is predicted as folder #5 (top-1 = 1/200 = 0.5%); the per-class CSV maps each
    folder to its listed ImageNet index."""
    rows = _read_list("imagenet-r")
    data = tmp_path / "imagenet-r"
    for wnid, _ in rows:
        (data / wnid).mkdir(parents=True)
        Image.new("RGB", (32, 32), (120, 60, 30)).save(data / wnid / "a.png")
    model, config = _classifier(1000)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[0] = 10.0  # not an ImageNet-R class
        model.head.bias[rows[5][1]] = 5.0
    ckpt = _save_classifier(model, config, tmp_path / "c.pth", [f"n{i:08d}" for i in range(1000)])
    summary = evaluate_run(load_config(EvaluateConfig, None, [
        f"checkpoint={ckpt}", f"data.path={data}", "class_map=imagenet-r", f"output_dir={tmp_path / 'o'}",
        "batch_size=50", *FAST]))
    assert summary["classes"] == 200 and summary["images"] == 200
    assert summary["top1"] == pytest.approx(0.5)
    per_class = list(csv.DictReader((tmp_path / "o" / "per_class_accuracy.csv").read_text().splitlines()))
    assert [(r["class"], int(r["model_class"])) for r in per_class] == rows
    assert [r["top1"] for r in per_class].count("100.00") == 1 and per_class[5]["top1"] == "100.00"


def test_named_class_map_needs_the_benchmark_folders(tmp_path):
    """class_map=imagenet-a on a folder that lacks most of its 200 classes is refused with a line that says how
    many are missing; an unknown list name is refused at config time."""
    data = tmp_path / "a"
    for wnid, _ in _read_list("imagenet-a")[:3]:
        (data / wnid).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(data / wnid / "x.png")
    model, config = _classifier(1000)
    ckpt = _save_classifier(model, config, tmp_path / "c.pth", [str(i) for i in range(1000)])
    with pytest.raises(DataError, match="imagenet-a covers 200 classes but the dataset has 3"):
        evaluate_run(load_config(EvaluateConfig, None, [f"checkpoint={ckpt}", f"data.path={data}",
                                                        "class_map=ImageNet_A", f"output_dir={tmp_path / 'o'}",
                                                        *FAST]))
    with pytest.raises(ConfigError, match="imagenet-a, imagenet-r"):
        load_config(EvaluateConfig, None, ["checkpoint=x", "class_map=imagenet-x"])
