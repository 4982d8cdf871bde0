"""New tools on a pre-trained encoder: `mae embed` (deterministic features equal to forward_features, paths in
order), `mae attention` (class-token attention per head and mean, weights that sum to 1 and reproduce the block's
output), and `mae export --to onnx` (encoder and classifier checked against PyTorch with onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import ARCH

from mae.cli import main
from mae.interop import save_model
from mae.models import build_model

TINY = ARCH




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny MAE checkpoint and a nested folder of 7 grey images of different sizes."""
    root = tmp_path_factory.mktemp("embed")
    torch.manual_seed(0)
    model = build_model("mae_vit_micro_patch4_28", **TINY)
    save_model(model, root / "tiny.safetensors")
    rng = np.random.default_rng(0)
    for i, where in enumerate(["a/x", "a/x", "a", "b", "b", "b/deeper/still", "c"]):
        (root / "images" / where).mkdir(parents=True, exist_ok=True)
        side = 28 + 4 * (i % 3)
        Image.fromarray(rng.integers(0, 255, (side, side + i), dtype=np.uint8)).save(root / "images" / where /
                                                                                      f"img{i}.png")
    return root, model.eval()


def _reference(model, root, pool):
    """What the embedding must be: forward_features on our evaluation transform of each file, sorted by path."""
    from mae.data import build_eval_transform

    paths = sorted(str(p) for p in (root / "images").rglob("*.png"))
    tf = build_eval_transform(28, 1)
    images = torch.stack([tf(Image.open(p).convert("L")) for p in paths])
    with torch.no_grad():
        tokens = model.forward_features(images)
    return (tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)), paths


@pytest.mark.parametrize(("pool", "suffix"), [("cls", ".safetensors"), ("mean", ".npy")])
def test_embed_equals_forward_features_on_every_image_in_path_order(tiny, tmp_path, pool, suffix):
    """`mae embed CKPT --data DIR --out FILE` (batches of 3 over 7 images in nested folders) writes the class token
    or the patch mean of forward_features for every image, with the image paths in the same order; a second run
    (--overwrite: the file exists) writes the same numbers."""
    from mae.recipes.embed import load_embeddings

    root, model = tiny
    out = tmp_path / f"emb{suffix}"
    argv = ["embed", str(root / "tiny.safetensors"), "--data", str(root / "images"), "--out", str(out),
            f"pool={pool}", "batch_size=3", "progress=false", "--device", "cpu"]
    assert main(argv) == 0
    features, paths = load_embeddings(out)
    expected, expected_paths = _reference(model, root, pool)
    assert paths == expected_paths and features.shape == (7, 32)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)
    assert main([*argv, "--overwrite"]) == 0
    assert torch.equal(load_embeddings(out)[0], features)


def test_embed_refuses_what_it_cannot_do(tiny, tmp_path, capsys):
    """A missing checkpoint, an unknown pool or output format are one-line errors with exit code 2."""
    root, _ = tiny
    base = ["embed", str(root / "tiny.safetensors"), "--data", str(root / "images")]
    for extra, fragment in ((["--out", str(tmp_path / "e.txt")], "must end in .safetensors or .npy"),
                            (["--out", str(tmp_path / "e.npy"), "pool=max"], "pool 'max'")):
        assert main([*base, *extra]) == 2
        assert fragment in capsys.readouterr().err
    assert main(["embed", "--data", str(root / "images"), "--out", str(tmp_path / "e.npy")]) == 2
    assert "needs a checkpoint" in capsys.readouterr().err


def test_class_token_attention_sums_to_one_and_reproduces_the_last_block(tiny):
    """The weights recomputed from the last block's qkv input sum to 1 over class token + patches, and weighting the
    values with them (then attn.proj) gives exactly the class-token output of that attention module."""
    from mae.viz.attention import cls_attention

    _, model = tiny
    images = torch.randn(3, 1, 28, 28)
    weights = cls_attention(model, images)  # [N, H, 1+L]
    assert weights.shape == (3, 2, 1 + 49)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 2))
    attn, seen = model.blocks[-1].attn, {}
    handle = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model.forward_features(images)
    handle.remove()
    x = seen["x"]
    v = attn.qkv(x).reshape(3, 50, 3, 2, 16).permute(2, 0, 3, 1, 4)[2]  # [N, H, T, d]
    cls_out = attn.proj((weights.unsqueeze(2) @ v).squeeze(2).reshape(3, 32))
    torch.testing.assert_close(cls_out, seen["out"][:, 0], rtol=0, atol=1e-5)


def test_attention_figure_has_one_panel_per_head_plus_the_mean(tiny, tmp_path):
    """`mae attention CKPT --images ... --out F.png`: one row per image, columns image + each head + mean."""
    from mae.viz.attention import draw_attention, load_image_files

    root, model = tiny
    inputs, shown, names = load_image_files([root / "images" / "a"], 28, 1)
    fig = draw_attention(model, inputs, shown, names)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["image", "head 1", "head 2", "mean of heads"]
    assert len(fig.axes) == len(names) * 4 == 12
    out = tmp_path / "attn.png"
    assert main(["attention", str(root / "tiny.safetensors"), "--images", str(root / "images" / "a"),
                 str(root / "images" / "c"), "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 300


@pytest.fixture
def onnx_tools():
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


def test_onnx_export_of_the_encoder_matches_pytorch_with_a_dynamic_batch(tiny, tmp_path, onnx_tools, capsys):
    """`mae export CKPT --to onnx --out F.onnx`: onnxruntime's features for a batch of another size than the
    example equal forward_features within 1e-4."""
    root, model = tiny
    out = tmp_path / "encoder.onnx"
    assert main(["export", str(root / "tiny.safetensors"), "--to", "onnx", "--out", str(out)]) == 0
    assert "max |difference|" in capsys.readouterr().out
    session = onnx_tools.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 28, 28)
    (theirs,) = session.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(theirs), model.forward_features(x), rtol=0, atol=1e-4)


def test_onnx_export_of_a_finetuned_classifier_matches_its_logits(tiny, tmp_path, onnx_tools):
    """A fine-tuned classifier checkpoint exports its logits; onnxruntime agrees with PyTorch within 1e-4."""
    from mae.interop.classifier_io import classifier_state
    from mae.interop.onnx_export import check_onnx, export_checkpoint_onnx
    from mae.models.classifier import ClassifierConfig, build_classifier, load_encoder_into

    _, mae_model = tiny
    torch.manual_seed(4)
    clf = build_classifier(ClassifierConfig.from_mae(mae_model.config, num_classes=5))
    load_encoder_into(clf, mae_model.state_dict(), mae_model.config)
    for p in clf.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    torch.save(classifier_state(clf, clf.classifier_config, list("abcde")), tmp_path / "checkpoint-best.pth")
    out, module, _ = export_checkpoint_onnx(tmp_path / "checkpoint-best.pth", tmp_path / "clf.onnx")
    x = torch.randn(3, 1, 28, 28)
    assert check_onnx(out, module, x) < 1e-4
    session = onnx_tools.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].name == "logits"
    assert session.run(None, {"pixel_values": x.numpy()})[0].shape == (3, 5)
