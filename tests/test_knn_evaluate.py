"""Weighted k-NN on frozen features (command and pre-training monitor) and `mae evaluate` (top-1 / top-5, class
subsets, per-class CSV, confusion matrix, exact distributed counting)."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch
from tiny import ARCH
from torch.utils.data import DataLoader, TensorDataset

from mae.config import load_config
from mae.errors import DataError
from mae.eval.classification import ShardSampler, evaluate, score_logits
from mae.interop import save_model
from mae.interop.classifier_io import classifier_state
from mae.models import build_model
from mae.models.classifier import ClassifierConfig, build_classifier
from mae.recipes.evaluate import EvaluateConfig, class_index_for, read_class_map
from mae.recipes.evaluate import run as evaluate_run
from mae.recipes.knn import KnnConfig, knn_monitor, knn_scores
from mae.recipes.knn import run as knn_run
from mae.train.checkpoint import atomic_save

TINY = ARCH
FAST = ["precision=fp32", "data.num_workers=0"]


@pytest.fixture(scope="module")
def tiny_mae():
    torch.manual_seed(0)
    return build_model("mae_vit_micro_patch4_28", **TINY)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_mae, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model(tiny_mae, path)
    return path


@pytest.fixture(scope="module")
def classifier_checkpoint(tiny_mae, tmp_path_factory):
    """A 10-class classifier checkpoint (random head made decisive) in the finetune recipe's format."""
    torch.manual_seed(1)
    config = ClassifierConfig.from_mae(tiny_mae.config, num_classes=10, global_pool="token")
    model = build_classifier(config)
    torch.nn.init.normal_(model.head.weight, std=1.0)
    path = tmp_path_factory.mktemp("cls") / "checkpoint-best.pth"
    atomic_save(classifier_state(model, config, [str(i) for i in range(10)], epoch=0), path)
    return path, model


def test_knn_votes_match_a_brute_force_computation():
    """Votes: cosine similarity to every training feature, the k most similar vote exp(sim / T) for their label;
    checked against an independent per-query loop."""
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(40, 8, generator=g), torch.randint(0, 4, (40,), generator=g)
    query = torch.randn(9, 8, generator=g)
    votes = knn_scores(train, labels, query, num_classes=4, k=5, temperature=0.1, chunk=4)
    for qi in range(len(query)):
        sims = [float(torch.dot(query[qi], t) / (query[qi].norm() * t.norm())) for t in train]
        nearest = sorted(range(len(train)), key=lambda i: -sims[i])[:5]
        expected = [0.0] * 4
        for i in nearest:
            expected[int(labels[i])] += math.exp(sims[i] / 0.1)
        torch.testing.assert_close(votes[qi], torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_knn_with_k1_finds_identical_points():
    """A query equal to a training point (up to scale) gets that point's label: 1-NN on the train set is 100%."""
    train, labels = torch.randn(30, 6), torch.arange(30) % 3
    votes = knn_scores(train, labels, 2.0 * train, num_classes=3, k=1)
    assert torch.equal(votes.argmax(1), labels)


def test_knn_command_and_monitor_agree(tiny_mae, tiny_checkpoint, tmp_path):
    """`mae knn` on a checkpoint and the pre-training monitor on the same MAE give the same top-1 / top-5 (the
    class token after the final norm, the same images); the monitor leaves the model in training mode; the command
    writes summary.json and metrics.jsonl."""
    overrides = [f"checkpoint={tiny_checkpoint}", f"output_dir={tmp_path / 'knn'}", "data.train_limit=200",
                 "data.val_limit=60", "k=10", *FAST]
    cfg = load_config(KnnConfig, None, overrides)
    summary = knn_run(cfg)
    assert summary["val_images"] == 60 and summary["train_images"] == 200
    assert 0 <= summary["top1"] <= summary["top5"] <= 100
    tiny_mae.train()
    monitored = knn_monitor(tiny_mae, cfg)
    assert tiny_mae.training
    assert monitored["knn_top1"] == pytest.approx(summary["top1"]) and monitored["knn_top5"] == pytest.approx(
        summary["top5"])
    record = json.loads((tmp_path / "knn" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["top1"] == pytest.approx(summary["top1"])
    assert json.loads((tmp_path / "knn" / "summary.json").read_text())["best_top1"] == pytest.approx(summary["top1"])


def test_knn_on_a_random_encoder_runs(tmp_path, monkeypatch):
    """init=random with a registered name builds a fresh MAE-initialised encoder (the baseline of the protocol): the
    encoder that is scored has the MAE's fixed sin-cos positions and xavier-uniform linears with zero biases, not
    the timm classifier's own initialisation (learned positions, linears drawn with std 0.02)."""
    import mae.recipes.knn as knn_module
    from mae.models.pos_embed import sincos_2d

    real_build, built = knn_module.build_from_source, []

    def build_and_keep(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(knn_module, "build_from_source", build_and_keep)
    summary = knn_run(load_config(KnnConfig, None, [
        "init=random", "model.name=mae_vit_micro_patch4_28", "model.img_size=28", f"output_dir={tmp_path}",
        "data.train_limit=50", "data.val_limit=20", *FAST]))
    assert summary["val_images"] == 20
    (model, _), = built
    dim = model.embed_dim  # the registered micro encoder: 128 wide, 7 x 7 patches
    assert torch.equal(model.pos_embed, sincos_2d(dim, 7))
    for name, module in model.blocks.named_modules():
        if isinstance(module, torch.nn.Linear):
            out_f, in_f = module.weight.shape
            xavier = (2 / (in_f + out_f)) ** 0.5
            assert module.weight.std().item() == pytest.approx(xavier, rel=0.1), name
            assert torch.all(module.bias == 0), name
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.3)


def test_shard_sampler_counts_every_index_once():
    """Over all ranks each index appears exactly once, without the padding DistributedSampler adds."""
    for size in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            seen = [i for r in range(world) for i in ShardSampler(size, r, world)]
            assert sorted(seen) == list(range(size))
            assert sum(len(ShardSampler(size, r, world)) for r in range(world)) == size


def _distributed_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    logits = torch.eye(4)[torch.tensor([0, 1, 2, 3, 0, 1, 3])] * 5  # 7 images; the last one is misclassified
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    idx = list(ShardSampler(7, rank, world))
    result = score_logits(iter([(logits[idx], target[idx])]), torch.device("cpu"), num_classes=4)
    if rank == 0:
        torch.save({"count": result.count, "top1": result.top1, "confusion": result.confusion}, out_file)
    torch.distributed.destroy_process_group()


def test_distributed_evaluation_counts_every_image_once(tmp_path):
    """Two gloo processes each scoring their shard of 7 images report 7 images and 6/7 top-1 (no duplicates)."""
    import torch.multiprocessing as mp

    out = tmp_path / "result.pt"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    assert result["count"] == 7 and result["top1"] == pytest.approx(600 / 7)
    assert int(result["confusion"].sum()) == 7 and int(result["confusion"][2, 3]) == 1


def _csv_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class _FixedLogits(torch.nn.Module):
    """Returns the logits stored in the first pixel's index: a model whose predictions the test chooses."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]


def test_class_subset_restricts_the_logits():
    """With a class map, predictions are taken among the mapped model classes only: an image whose overall best
    class lies outside the subset is still right when its class wins inside the subset."""
    table = torch.tensor([[0.0, 3.0, 0.0, 1.0, 9.0],  # image 0: best overall 4 (unmapped), best in subset: 1
                          [0.0, 1.0, 0.0, 3.0, 9.0]])  # image 1: best in subset: 3
    model = _FixedLogits(table)
    loader = DataLoader(TensorDataset(torch.tensor([[0.0], [1.0]]), torch.tensor([0, 1])), batch_size=2)
    index = torch.tensor([1, 3, 0])  # dataset class 0 -> model 1, 1 -> 3, 2 -> 0
    restricted = evaluate(model, loader, torch.device("cpu"), class_index=index, confusion_classes=3)
    assert restricted.top1 == 100.0 and restricted.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    loader = DataLoader(TensorDataset(torch.tensor([[0.0], [1.0]]), torch.tensor([1, 3])), batch_size=2)
    assert evaluate(model, loader, torch.device("cpu")).top1 == 0.0


def test_class_map_file_forms(tmp_path):
    """A class map gives one model class per dataset class: by line order or by folder name, as an index or a
    stored class name; bad maps raise DataError naming the problem."""
    folders, names = ["cat", "dog"], ["ant", "cat", "dog", "eel"]
    (tmp_path / "order.txt").write_text("# comment\n2\n1\n")
    assert read_class_map(tmp_path / "order.txt", folders, names, 4).tolist() == [2, 1]
    (tmp_path / "named.txt").write_text("dog eel\ncat 0\n")
    assert read_class_map(tmp_path / "named.txt", folders, names, 4).tolist() == [0, 3]
    (tmp_path / "bad.txt").write_text("7\n1\n")
    with pytest.raises(DataError, match="outside"):
        read_class_map(tmp_path / "bad.txt", folders, names, 4)
    (tmp_path / "short.txt").write_text("cat 1\n")
    with pytest.raises(DataError, match="dog"):
        read_class_map(tmp_path / "short.txt", folders, names, 4)
    assert class_index_for(folders, names, 4).tolist() == [1, 2]  # by stored names, no map needed
    with pytest.raises(DataError, match="class_map"):
        class_index_for(folders, None, 4)


def test_evaluate_writes_per_class_csv_and_confusion(classifier_checkpoint, tmp_path):
    """`mae evaluate` reports the top-1 the model really has on the images, a CSV row per class whose counts add up,
    a confusion-matrix PNG; at another resolution (32 px: 8x8 grid) it still runs."""
    path, model = classifier_checkpoint
    out = tmp_path / "ev"
    summary = evaluate_run(load_config(EvaluateConfig, None, [f"checkpoint={path}", f"output_dir={out}",
                                                              "data.val_limit=50", *FAST]))
    from mae.data import build_dataset, build_eval_transform

    ds = build_dataset("builtin:mnist5k", "val", transform=build_eval_transform(28, 1), mode="L")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:50].sort().values
    images = torch.stack([ds[int(i)][0] for i in order])
    labels = torch.tensor([ds[int(i)][1] for i in order])
    with torch.no_grad():
        expected = 100.0 * (model.eval()(images).argmax(1) == labels).float().mean().item()
    assert summary["top1"] == pytest.approx(expected) and summary["images"] == 50
    rows = _csv_rows(out / "per_class_accuracy.csv")
    assert [r["class"] for r in rows] == [str(i) for i in range(10)]
    assert sum(int(r["images"]) for r in rows) == 50
    assert sum(int(r["correct"]) for r in rows) == round(expected / 2)
    assert (out / "confusion.png").stat().st_size > 1000
    bigger = evaluate_run(load_config(EvaluateConfig, None, [f"checkpoint={path}", f"output_dir={tmp_path / 'b'}",
                                                             "data.val_limit=20", "model.img_size=32", *FAST]))
    assert bigger["img_size"] == 32 and bigger["images"] == 20


def test_evaluate_on_a_class_folder_subset(classifier_checkpoint, tmp_path):
    """A class-folder tree holding 3 of the model's 10 classes, with a class map: only those 3 logits compete and
    the CSV lists the 3 folders with their model classes."""

    from mae.data import build_dataset

    path, _ = classifier_checkpoint
    ds = build_dataset("builtin:mnist5k", "val", mode="L")
    wanted = {"three": 3, "seven": 7, "zero": 0}
    counts = dict.fromkeys(wanted, 0)
    for i in range(len(ds)):
        image, label = ds[i]
        for folder, digit in wanted.items():
            if label == digit and counts[folder] < 4:
                os.makedirs(tmp_path / "tree" / "val" / folder, exist_ok=True)
                image.save(tmp_path / "tree" / "val" / folder / f"{i}.png")
                counts[folder] += 1
        if all(c == 4 for c in counts.values()):
            break
    (tmp_path / "map.txt").write_text("three 3\nseven 7\nzero 0\n")
    out = tmp_path / "ev"
    summary = evaluate_run(load_config(EvaluateConfig, None, [
        f"checkpoint={path}", f"data.path={tmp_path / 'tree'}", f"class_map={tmp_path / 'map.txt'}",
        f"output_dir={out}", *FAST]))
    assert summary["images"] == 12 and summary["classes"] == 3
    rows = _csv_rows(out / "per_class_accuracy.csv")
    assert [(r["class"], r["model_class"]) for r in rows] == [("seven", "7"), ("three", "3"), ("zero", "0")]


def test_pretraining_logs_the_knn_monitor_every_n_epochs(tmp_path):
    """`mae pretrain knn_every=2` over 3 epochs logs knn_top1 / knn_top5 after epochs 1 and 2 (the last) in
    metrics.jsonl, on the labelled splits of the pre-training data (all 359 validation digits)."""
    from mae.recipes.pretrain import PretrainConfig
    from mae.recipes.pretrain import run as pretrain_run

    pretrain_run(load_config(PretrainConfig, None, [
        "data.path=builtin:digits", "data.train_limit=256", f"output_dir={tmp_path}",
        "model.name=mae_vit_micro_patch4_28",
        "model.img_size=8", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.decoder_depth=1",
        "epochs=3", "knn_every=2", "batch_size=256", "precision=fp32", "visualize=false", "progress=false",
        "data.num_workers=0"]))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in records if "knn_top1" in r]
    assert [r["epoch"] for r in knn] == [1, 2]
    assert all(0 < r["knn_top1"] <= r["knn_top5"] <= 100 and r["knn_images"] == 359 for r in knn)
