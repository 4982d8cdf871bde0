"""Released weights named everywhere a checkpoint is taken (`mae.weights` names read through the one resolver,
`mae.train.run_dir.resolve_run`): the Python API, the commands, ``mae pretrain --init``, and the provenance a run
started from them records and its exports carry.

The "release" is a local mirror: an http.server on 127.0.0.1 (a thread of this process) serving files in the
official layout (``mae/<folder>/<file>.pth`` holding ``{'model': state_dict}``) written from a tiny MAE of this
library; ``MAE_WEIGHTS_MIRROR`` points at it and ``MAE_HOME`` is a fresh cache per test, so every test downloads
for real. The catalogue's entries are patched per test (`monkeypatch`) in two ways, said where used: their
architecture is a tiny architecture registered for the test (the real ones are ViT-B/L/H, which a 32-wide file does
not fit; the RGB encoder the transfer recipes start from has its own), and an entry with a published md5 prefix gets
the prefix of the test's file (the download still checks it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny import RUN

from mae.cli import main
from mae.interop.keys import part_of
from mae.models import ARCHITECTURES, build_model
from mae.models.classifier import ClassifierConfig, build_classifier, load_encoder_into
from mae.train.checkpoint import safe_load
from mae.weights import CATALOGUE

TINY_ARCH = "mae_vit_test_weights_tiny"
TINY = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2,
        "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}
MODEL = ["model.name=mae_vit_micro_patch4_28", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
         "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]
SHORT = [*[r for r in RUN if not r.startswith("data.train_limit")], "data.train_limit=64", "epochs=1",
         "visualize=false"]
VISUALIZE = "official:mae_visualize_vit_base"  # encoder + decoder, pixel target, no published md5
FULL = "official:mae_pretrain_vit_base_full"  # encoder + decoder, norm_pixel target, no published md5
ENCODER = "official:mae_pretrain_vit_base"  # encoder only, norm_pixel target, published md5 (patched per test)
FINETUNED = "official:mae_finetuned_vit_base"  # 1000-class classifier, published md5 (patched per test)
TRANSFER = "official:mae_pretrain_vit_large"  # encoder only, RGB (detection / segmentation images), md5 patched
TRANSFER_ARCH = "mae_vit_test_weights_rgb"
RGB = {"img_size": 32, "patch_size": 8, "in_chans": 3, "embed_dim": 32, "depth": 4, "num_heads": 2,
       "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}
ARCH_OF = {TRANSFER: TRANSFER_ARCH}  # the catalogue entry's architecture; every other served name: TINY_ARCH


def _tiny_mae(seed: int):
    torch.manual_seed(seed)
    return build_model("mae_vit_micro_patch4_28", **{k: v for k, v in TINY.items() if k not in
                                                    ("img_size", "patch_size", "in_chans")})


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # silent: the test output stays readable
        pass


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The served folder (official layout) with its files' state dicts, and the mirror's URL."""
    root = tmp_path_factory.mktemp("release")
    full = _tiny_mae(1).state_dict()
    encoder = {k: v for k, v in _tiny_mae(2).state_dict().items() if part_of(k) == "encoder"}
    pretrained = _tiny_mae(3)
    classifier = build_classifier(ClassifierConfig.from_mae(pretrained.config, num_classes=1000, global_pool="avg"))
    load_encoder_into(classifier, pretrained.state_dict(), pretrained.config)
    finetuned = {k: v for k, v in classifier.state_dict().items() if not k.startswith("norm.")}
    torch.manual_seed(4)
    rgb = {k: v for k, v in build_model("mae_vit_micro_patch4_28", **RGB).state_dict().items()
           if part_of(k) == "encoder"}
    files = {VISUALIZE: full, FULL: full, ENCODER: encoder, FINETUNED: finetuned, TRANSFER: rgb}
    for name, sd in files.items():
        path = root / "mae" / CATALOGUE[name].location
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": sd}, path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"root": root, "url": f"http://127.0.0.1:{server.server_address[1]}", "sd": files}
    server.shutdown()
    server.server_close()


def local_file(release, name: str) -> Path:
    return release["root"] / "mae" / CATALOGUE[name].location


@pytest.fixture(autouse=True)
def weights_env(release, tmp_path, monkeypatch):
    """A fresh cache, the local mirror, the tiny architecture registered and named by the catalogue's entries, and
    the published md5 prefixes replaced by those of the served files."""
    monkeypatch.setenv("MAE_HOME", str(tmp_path / "mae_home"))
    monkeypatch.setenv("MAE_WEIGHTS_MIRROR", release["url"])
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("MAE_OFFLINE", raising=False)
    monkeypatch.setitem(ARCHITECTURES, TINY_ARCH, dict(TINY))
    monkeypatch.setitem(ARCHITECTURES, TRANSFER_ARCH, dict(RGB))
    for name in release["sd"]:
        md5 = hashlib.md5(local_file(release, name).read_bytes(), usedforsecurity=False).hexdigest()
        entry = CATALOGUE[name]
        monkeypatch.setitem(CATALOGUE, name, dataclasses.replace(
            entry, architecture=ARCH_OF.get(name, TINY_ARCH), md5_prefix=md5[:6] if entry.md5_prefix else None))


def _equal_states(a: dict, b: dict, keys=None) -> None:
    keys = sorted(b) if keys is None else keys
    for k in keys:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _config_yaml(folder: Path) -> dict:
    return yaml.safe_load((folder / "config.yaml").read_text())


def test_a_name_loads_as_its_file_does_in_the_python_api(release, tmp_path):
    """`load_model(NAME)`, `create_model(..., checkpoint_path=NAME)` and `load_checkpoint` give the weights and
    architecture of the same file read by path; the download lands in MAE_HOME."""
    from mae import create_model
    from mae.interop import load_model, read_checkpoint

    by_name = load_model(VISUALIZE)
    by_path = load_model(local_file(release, VISUALIZE))
    assert by_name.config == by_path.config and by_name.config.embed_dim == 32
    _equal_states(by_name.state_dict(), by_path.state_dict(), sorted(by_path.state_dict()))
    _equal_states(by_name.state_dict(), release["sd"][VISUALIZE])
    assert (tmp_path / "mae_home" / "official" / "visualize" / "mae_visualize_vit_base.pth").is_file()
    created = create_model(TINY_ARCH, checkpoint_path=VISUALIZE)
    _equal_states(created.state_dict(), release["sd"][VISUALIZE])
    ckpt = read_checkpoint(FULL)
    assert ckpt.weights is not None and ckpt.weights.name == FULL and ckpt.target == "norm_pixel"
    assert load_model(FULL).config.target == "norm_pixel"  # the catalogue's target, which the file cannot say


def test_a_name_on_the_command_line_draws_what_its_file_draws(release, tmp_path):
    """`mae visualize NAME` writes the same picture as `mae visualize FILE` (same model, same masks)."""
    common = ["--data", "builtin:mnist5k", "--num-images", "2", "--seed", "3"]
    assert main(["visualize", VISUALIZE, *common, "--out", str(tmp_path / "name.png")]) == 0
    assert main(["visualize", str(local_file(release, VISUALIZE)), *common, "--out", str(tmp_path / "path.png")]) == 0
    name, path = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("name", "path"))
    assert name.shape == path.shape and np.array_equal(name, path)


def test_a_released_classifier_comes_with_the_imagenet_class_names(release):
    """`load_classifier(NAME)` of a fine-tuned release (a 1000-class head, fc_norm, no norm) reads its weights and
    names its classes with the ImageNet-1k WordNet ids, in timm's order (the folder names of ImageNet)."""
    from timm.data import ImageNetInfo

    from mae import load_classifier

    model, config, names = load_classifier(FINETUNED)
    assert config.num_classes == 1000 and config.global_pool == "avg"
    assert names == list(ImageNetInfo().label_names()) and names[0] == "n01440764"
    _equal_states(model.state_dict(), release["sd"][FINETUNED])


@pytest.fixture
def spy_spec(monkeypatch):
    """The model of each pre-training run as built, before its first step (what `build_spec` returns)."""
    from mae.recipes import pretrain

    built: list[dict] = []
    real = pretrain.build_spec

    def spy(cfg, run):
        spec = real(cfg, run)
        built.append({k: v.detach().clone() for k, v in spec.model.state_dict().items()})
        return spec

    monkeypatch.setattr(pretrain, "build_spec", spy)
    return built


def test_pretrain_init_with_a_decoder_starts_from_the_files_weights_and_architecture(release, tmp_path, spy_spec,
                                                                                    caplog):
    """`mae pretrain --init NAME` with model.name left at its default: the file's architecture (the registered name
    its catalogue entry gives), every weight (decoder included) equal to the file's at step 0, the file's target
    (norm_pixel) said in one info line, the provenance in config.yaml's run record and the checkpoints; a resume
    continues the checkpoint and does not load the weights again."""
    out = tmp_path / "pre"
    with caplog.at_level("INFO", logger="mae"):
        assert main(["pretrain", "--init", FULL, "--output-dir", str(out), *SHORT]) == 0
    assert len(spy_spec) == 1
    _equal_states(spy_spec[0], release["sd"][FULL])
    saved = _config_yaml(out)
    assert saved["init"] == FULL and saved["model"]["name"] == TINY_ARCH and saved["model"]["embed_dim"] == 32
    assert saved["model"]["target"] == "norm_pixel"
    assert sum("init: model.target=norm_pixel" in r.getMessage() for r in caplog.records) == 1
    weights = saved["_run"]["weights"]
    assert weights["name"] == FULL and weights["source"] == "official" and weights["licence"] == "CC-BY-NC-4.0"
    assert weights["checksum"].startswith("sha256:")
    checkpoint = safe_load(out / "checkpoint-last.pth")
    assert checkpoint["weights"] == weights

    caplog.clear()
    with caplog.at_level("INFO", logger="mae"):
        assert main(["pretrain", "--init", FULL, "--output-dir", str(out), *SHORT, "epochs=2", "--resume", "auto",
                     "--allow-config-change"]) == 0
    assert any("is not applied: the run resumes" in r.getMessage() for r in caplog.records)
    assert _config_yaml(out)["_run"]["weights"] == weights  # still recorded, from the checkpoint


def test_pretrain_init_without_a_decoder_warns_once_and_trains_a_fresh_one(release, tmp_path, spy_spec):
    """`mae pretrain --init NAME` of an encoder-only file with the architecture named (model.*): the encoder equals
    the file's at step 0, the decoder is freshly initialised with one warning saying so, and the target is switched
    to the file's (norm_pixel)."""
    out = tmp_path / "pre"
    with pytest.warns(UserWarning) as caught:
        assert main(["pretrain", "--init", ENCODER, "--output-dir", str(out), *MODEL, *SHORT]) == 0
    decoder_warnings = [w for w in caught if "holds the encoder only" in str(w.message)]
    assert len(decoder_warnings) == 1
    encoder = release["sd"][ENCODER]
    _equal_states(spy_spec[0], encoder)
    decoder = [k for k in spy_spec[0] if part_of(k) == "decoder"]
    assert decoder and not set(decoder) & set(encoder)
    assert not torch.equal(spy_spec[0]["decoder_pred.weight"], release["sd"][FULL]["decoder_pred.weight"])
    saved = _config_yaml(out)
    assert saved["model"]["target"] == "norm_pixel" and saved["_run"]["weights"]["name"] == ENCODER


def test_pretrain_init_warns_when_the_target_is_set_to_another_and_refuses_weights_that_do_not_fit(release,
                                                                                                   tmp_path, capsys):
    """An explicit model.target other than the file's is kept, with a warning; a model.name whose shapes the file
    does not fit is one line naming the shapes and the fix."""
    from mae.interop import read_checkpoint
    from mae.recipes.common import ModelSection
    from mae.recipes.pretrain import init_model_config

    section = ModelSection(name=TINY_ARCH, target="pixel")
    with pytest.warns(UserWarning, match="model.target=pixel but .* was trained to predict norm_pixel"):
        config, _ = init_model_config(section, read_checkpoint(FULL))
    assert config.target == "pixel"
    bad = ["pretrain", "--init", FULL, "--output-dir", str(tmp_path / "bad"), "model.name=mae_vit_micro_patch4_28"]
    assert main([*bad, *SHORT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is [" in err[0] and "leave model.name at its default" in err[0], err


def _timm_carries(pretrained_cfg: dict, weights: dict) -> None:
    """timm's own fields of an export's pretrained_cfg: the licence (a Hub id) and the provenance lines in notes."""
    assert pretrained_cfg["license"] == "cc-by-nc-4.0"
    notes = "\n".join(pretrained_cfg["notes"])
    assert f"initial weights: {weights['name']}" in notes and weights["checksum"] in notes, notes
    assert "initial weights licence: CC-BY-NC-4.0" in notes


def test_finetune_and_knn_from_a_name_record_its_provenance_and_the_export_carries_its_licence(release, tmp_path):
    """`mae finetune --checkpoint NAME` writes name, source, checksum and licence into config.yaml's run record, and
    its transformers export's model card carries them and the licence (cc-by-nc-4.0), as do its timm exports
    (``export=[timm]``'s file and `mae convert RUN --to timm`'s directory: ``license`` and ``notes`` in timm's
    pretrained_cfg, which timm still loads); `mae knn --checkpoint NAME` records them too."""
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", VISUALIZE, "--output-dir", str(out), "epochs=1", "batch_size=32",
                 "data.train_limit=64", "data.val_limit=32", "data.num_workers=0", "precision=fp32", "device=cpu",
                 "progress=false", "aug.hflip=0", "optim.warmup_epochs=0", "model.global_pool=token",
                 "export=[hf,timm]"]) == 0
    weights = _config_yaml(out)["_run"]["weights"]
    assert weights["name"] == VISUALIZE and weights["source"] == "official" and weights["licence"] == "CC-BY-NC-4.0"
    assert weights["checksum"].startswith("sha256:")
    card = (out / "hf" / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card and VISUALIZE in card and weights["checksum"] in card
    _timm_carries(json.loads((out / "model_timm.json").read_text())["pretrained_cfg"], weights)
    converted = tmp_path / "timm_dir"
    assert main(["convert", str(out), str(converted), "--to", "timm"]) == 0
    _timm_carries(json.loads((converted / "config.json").read_text())["pretrained_cfg"], weights)
    import timm

    loaded = timm.create_model(f"local-dir:{converted}", pretrained=True)
    assert loaded.pretrained_cfg["license"] == "cc-by-nc-4.0"
    knn = tmp_path / "knn"
    assert main(["knn", "--checkpoint", VISUALIZE, "--output-dir", str(knn), "data.train_limit=64",
                 "data.val_limit=32", "data.num_workers=0", "precision=fp32", "device=cpu"]) == 0
    assert _config_yaml(knn)["_run"]["weights"] == weights


def test_an_unknown_name_is_one_line_and_exit_2(tmp_path, capsys):
    """A misspelt name is one line naming it and the closest valid names, exit 2, wherever a checkpoint is taken."""
    for argv in (["visualize", "official:mae_visualise_vit_base", "--data", "builtin:mnist5k",
                  "--out", str(tmp_path / "r.png")],
                 ["finetune", "--checkpoint", "official:mae_visualise_vit_base", "--output-dir", str(tmp_path / "f"),
                  "data.num_workers=0", "device=cpu"],
                 ["pretrain", "--init", "official:mae_visualise_vit_base", "--output-dir", str(tmp_path / "p"),
                  *SHORT]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"mae {argv[0]}: error: unknown weights name"), err
        assert "official:mae_visualize_vit_base" in err[0]


def test_segment_from_a_name_records_its_provenance(release, tmp_path):
    """`mae segment --checkpoint NAME` (the backbone's checkpoint) writes the weights' name, source, checksum (the
    sha256 of the served file) and licence into config.yaml's run record, as fine-tuning does."""
    out = tmp_path / "seg"
    assert main(["segment", "--config", "segment/synthetic_tiny", f"--checkpoint={TRANSFER}", f"--output-dir={out}",
                 f"--data=synthetic:{tmp_path / 'shapes'}", "data.synthetic.num_train=2", "data.synthetic.num_val=1",
                 "data.synthetic.image_size=64", "data.synthetic.max_objects=2", "data.eval_scale=null",
                 "data.crop_size=64", "data.scale=64", "--epochs=1", "batch_size=2", "eval_every=1",
                 "head.channels=8", "head.aux_channels=8", "num_workers=0", "progress=false", "--device=cpu",
                 "--precision=fp32"]) == 0
    sha256 = hashlib.sha256(local_file(release, TRANSFER).read_bytes()).hexdigest()
    assert _config_yaml(out)["_run"]["weights"] == {"name": TRANSFER, "source": "official",
                                                    "checksum": f"sha256:{sha256}", "licence": "CC-BY-NC-4.0"}


def test_evaluate_of_a_name_records_its_provenance_in_its_summary(release, tmp_path):
    """`mae evaluate --checkpoint NAME` (no training run) keeps the weights' provenance in summary.json and in
    config.yaml's run record."""
    class_map = tmp_path / "classes.txt"
    class_map.write_text("".join(f"{i}\n" for i in range(10)))
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", FINETUNED, "--data", "builtin:mnist5k", "--output-dir", str(out),
                 "--class-map", str(class_map), "data.val_limit=16", "batch_size=16", "data.num_workers=0",
                 "--device=cpu", "--precision=fp32"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights"]["name"] == FINETUNED and summary["weights"]["licence"] == "CC-BY-NC-4.0"
    assert summary["weights"]["checksum"].startswith("sha256:")
    assert _config_yaml(out)["_run"]["weights"] == summary["weights"]
