"""Weighted k-NN classification on frozen features: ``run(KnnConfig) -> summary`` (``mae knn``), and
`knn_monitor` for tracking representation quality every few epochs of pre-training.

As in InstDisc / DINO: L2-normalised features, cosine similarity of each validation image to every training image,
the k most similar neighbours vote for their class with weight ``exp(similarity / T)``; classes are ranked by their
summed votes (top-1 / top-5). Defaults k = 20, T = 0.07.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from mae.config import save_config
from mae.data import build_eval_transform
from mae.errors import ConfigError, DataError
from mae.eval.classification import all_reduce_sum, eval_loader, extract_features, topk_counts
from mae.files import check_output_folder, config_has_keys, write_json
from mae.models import MaskedAutoencoderViT
from mae.models.classifier import ClassifierConfig
from mae.recipes.classify_common import (
    ClassifierSection,
    ClassifyData,
    build_from_source,
    check_init,
    eval_transform,
    labelled_dataset,
    load_encoder_source,
    skipped_count,
    square_side,
)
from mae.recipes.common import prepare_output_dir, run_distributed, weights_record
from mae.train.distributed import DistInfo
from mae.train.metrics_log import MetricsLogger
from mae.train.precision import resolve_precision
from mae.train.rng import seed_everything
from mae.train.run import RunFields

log = logging.getLogger("mae")

CLI_FLAGS = {"--data": "data.path", "--output-dir": "output_dir", "--checkpoint": "checkpoint",
             "--precision": "precision", "--device": "device"}


@dataclass
class FeatureSection:
    """The frozen encoder's features: the architecture (for init=random), the resolution and the pooling."""

    name: str | None = field(default=None, metadata={
        "help": "registered MAE architecture: the encoder for init=random, and a hint (head count) for checkpoints "
                "that store no config"})
    img_size: int | None = field(default=None, metadata={
        "help": "image side (default: the checkpoint's); another size interpolates the position table (bicubic)"})
    global_pool: str = field(default="token", metadata={
        "help": "token (class token after the final norm, the linear probe's feature) | avg (mean of patch tokens)"})

    def validate(self) -> None:
        ClassifierSection(name=self.name, img_size=self.img_size, global_pool=self.global_pool).validate()


@dataclass
class KnnConfig(RunFields):
    """A k-NN evaluation of frozen features (also the settings of the pre-training monitor)."""

    output_dir: str = field(default="runs/knn", metadata={"help": "metrics.jsonl, summary.json and config.yaml"})
    model: FeatureSection = field(default_factory=FeatureSection)
    data: ClassifyData = field(default_factory=ClassifyData)
    checkpoint: str | None = field(default=None, metadata={
        "help": "pre-trained weights: a run directory, any checkpoint the library reads (mae, reference, HF, timm) "
                "or released weights by name (official:mae_pretrain_vit_base, hf:<org/repo>, timm:<tag>)"})
    init: str = field(default="pretrained", metadata={"help": "pretrained | random (a random-encoder baseline)"})
    k: int = field(default=20, metadata={"help": "neighbours that vote"})
    temperature: float = field(default=0.07, metadata={"help": "vote weight exp(cosine similarity / temperature)"})
    batch_size: int = field(default=256, metadata={"help": "images per forward pass"})
    overwrite: bool = field(default=False, metadata={
        "help": "write into an output_dir that holds files mae knn did not write: files of the same names are "
                "replaced, nothing else is touched; without it such a folder is refused"})

    RANGES: ClassVar[dict[str, str]] = {"temperature": "> 0"}

    def validate(self) -> None:
        super().validate()
        check_init(self.init, self.checkpoint, self.model.name)
        if self.k < 1 or self.batch_size < 1:
            raise ConfigError(f"k and batch_size must be at least 1, got k={self.k}, batch_size={self.batch_size}")


# ---------------------------------------------------------------------------------------------------- the classifier
@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Summed neighbour votes [Q, num_classes] of each query: cosine similarity to every training feature, the `k`
    most similar vote for their label with weight ``exp(sim / temperature)``."""
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(train))
    out = []
    for start in range(0, len(query_feats), chunk):
        q = F.normalize(query_feats[start:start + chunk].float(), dim=1)
        sim, idx = (q @ train.T).topk(k, dim=1)  # [B, k]
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes, device=q.device, dtype=weights.dtype)
        out.append(votes.scatter_add_(1, train_labels[idx], weights))
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=query_feats.device)


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's rows from every rank (ranks may hold different numbers of rows)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return t
    world = tdist.get_world_size()
    n = torch.tensor([len(t)], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    tdist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    tdist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def encoder_features(model: nn.Module, pool: str = "token"):
    """A function images -> pooled frozen features for an MAE (`MaskedAutoencoderViT`) or a timm ViT classifier."""
    if isinstance(model, MaskedAutoencoderViT):
        def mae_features(images: torch.Tensor) -> torch.Tensor:
            tokens = model.forward_features(images)  # [N, 1+L, D], after the final norm
            return tokens[:, 0] if pool == "token" else tokens[:, 1:].mean(dim=1)
        return mae_features

    def vit_features(images: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(images), pre_logits=True)  # type: ignore[operator]  # Module.__getattr__ gives Tensor | Module
    return vit_features


@torch.no_grad()
def knn_evaluate(features, train_loader, val_loader, num_classes: int, device: torch.device, k: int = 20,
                 temperature: float = 0.07, precision: str = "fp32") -> dict[str, float]:
    """k-NN top-1 / top-5 (percent) of `features` (images -> [N, D]): every rank extracts its share, the training
    features are gathered on every rank, each rank scores its validation share, counts are summed."""
    train_feats, train_labels = extract_features(features, train_loader, device, precision)
    train_feats, train_labels = _all_gather_rows(train_feats), _all_gather_rows(train_labels)
    val_feats, val_labels = extract_features(features, val_loader, device, precision)
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    if len(val_feats):
        votes = knn_scores(train_feats, train_labels, val_feats, num_classes, k, temperature)
        c1, c5 = topk_counts(votes, val_labels)
        counts += torch.stack([c1.double(), c5.double(), torch.tensor(float(len(val_labels)), device=device,
                                                                      dtype=torch.float64)])
    all_reduce_sum(counts)
    n = max(counts[2].item(), 1.0)
    return {"knn_top1": 100.0 * counts[0].item() / n, "knn_top5": 100.0 * counts[1].item() / n,
            "knn_images": int(counts[2].item())}


# ---------------------------------------------------------------------------------------------------- monitor
def knn_monitor(model: nn.Module, cfg: KnnConfig | None = None, device: torch.device | None = None
                ) -> dict[str, float]:
    """k-NN top-1 / top-5 of a model being trained (an MAE or a timm ViT), on `cfg.data` (train -> val), with
    `cfg.k`, `cfg.temperature`, `cfg.model.global_pool`. Leaves the model in the mode it found it in. Call it on
    every rank of a distributed run (each extracts its share of the images)."""
    cfg = cfg or KnnConfig()
    config = model.config if hasattr(model, "config") else getattr(model, "classifier_config", None)
    if config is None:
        raise ConfigError("knn_monitor needs an MAE or a classifier built by mae (its config gives the image size)")
    h, w = config.image_hw  # type: ignore[misc, union-attr]  # Module.__getattr__ gives Tensor | Module
    if h != w:
        raise ConfigError(f"the k-NN transforms make square images; img_size {h}x{w} is not square")
    device = device or next(model.parameters()).device
    tf = build_eval_transform(h, config.in_chans, cfg.data.crop_pct, cfg.data.mean, cfg.data.std)  # type: ignore[arg-type, union-attr]  # Module.__getattr__ gives Tensor | Module
    train_set, classes = labelled_dataset(cfg.data, "train", tf, config.in_chans, cfg.data.train_limit, cfg.seed)  # type: ignore[arg-type, union-attr]  # Module.__getattr__ gives Tensor | Module
    val_set, _ = labelled_dataset(cfg.data, "val", tf, config.in_chans, cfg.data.val_limit, cfg.seed)  # type: ignore[arg-type, union-attr]  # Module.__getattr__ gives Tensor | Module
    dist = _dist_info(device)
    was_training = model.training
    model.eval()
    try:
        return knn_evaluate(encoder_features(model, cfg.model.global_pool),
                            eval_loader(train_set, cfg.batch_size, 0, dist),
                            eval_loader(val_set, cfg.batch_size, 0, dist), len(classes), device, cfg.k, cfg.temperature)
    finally:
        model.train(was_training)


def pretrain_knn(model: nn.Module, data: Any, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """The k-NN monitor of ``mae pretrain knn_every=N``: top-1 / top-5 of the encoder's class token on the
    pre-training data's labelled train -> val splits (`data` is the pre-training config's data section)."""
    cfg = KnnConfig(data=ClassifyData(path=data.path, num_workers=0, mean=data.mean, std=data.std,
                                      strict=getattr(data, "strict", False)), k=k, temperature=temperature)
    try:
        return knn_monitor(model, cfg)
    except DataError as e:
        raise DataError(f"knn_every needs labelled data (a builtin dataset or class folders with train/ and val/): "
                        f"{e}") from None


def _dist_info(device: torch.device) -> DistInfo:
    if tdist.is_available() and tdist.is_initialized():
        rank, world = tdist.get_rank(), tdist.get_world_size()
    else:
        rank, world = 0, 1
    return DistInfo(rank=rank, world_size=world, local_rank=rank, device=device, is_main=rank == 0)


# ---------------------------------------------------------------------------------------------------- the command
def run(cfg: KnnConfig) -> dict:
    """k-NN evaluation of a checkpoint's (or a random) encoder; returns top-1 / top-5."""
    check_output_folder(cfg.output_dir, "knn", cfg.overwrite, own=_written_by_knn)
    return run_distributed(cfg.device, lambda dist: _run(cfg, dist))


def _written_by_knn(folder: Path) -> bool:
    """A folder of an earlier `mae knn` (its config.yaml): a rerun writes the same files into it."""
    return config_has_keys(folder, {"k", "temperature", "init"})


def _run(cfg: KnnConfig, dist: DistInfo) -> dict[str, Any]:
    device = dist.device
    precision = resolve_precision(cfg.precision, device)
    out = prepare_output_dir(cfg.output_dir)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    source = load_encoder_source(cfg.init, cfg.checkpoint, cfg.model.name)
    in_chans = source.config.in_chans
    side = square_side(ClassifierConfig.from_mae(source.config, img_size=cfg.model.img_size, num_classes=0))
    tf = eval_transform(cfg.data, side, in_chans)
    train_set, classes = labelled_dataset(cfg.data, "train", tf, in_chans, cfg.data.train_limit, cfg.seed)
    val_set, val_classes = labelled_dataset(cfg.data, "val", tf, in_chans, cfg.data.val_limit, cfg.seed)
    if val_classes != classes:
        raise ConfigError(f"the train and val splits of '{cfg.data.path}' have different classes "
                          f"({len(classes)} vs {len(val_classes)}); give both splits the same class folders")
    model, _ = build_from_source(source, head_init_std=0.0, img_size=cfg.model.img_size, num_classes=0,
                                 global_pool=cfg.model.global_pool, fc_norm=False, drop_path_rate=0.0)
    model.to(device).eval()
    k_used = min(cfg.k, len(train_set))  # type: ignore[arg-type]  # torch types no Dataset.__len__; what `knn_scores` clamps k to: every training image votes
    if k_used < cfg.k and dist.is_main:
        log.warning("k=%d is larger than the training set (%d images): all %d vote, so k=%d is used", cfg.k,
                    len(train_set), len(train_set), k_used)  # type: ignore[arg-type]  # torch types no Dataset.__len__
    result = knn_evaluate(encoder_features(model), eval_loader(train_set, cfg.batch_size, cfg.data.num_workers, dist),
                          eval_loader(val_set, cfg.batch_size, cfg.data.num_workers, dist), len(classes), device,
                          cfg.k, cfg.temperature, precision)
    seconds = time.perf_counter() - t0
    many = len(classes) > 5  # top-5 of 5 classes or fewer is always 100%: not shown
    summary = {"output_dir": str(out), "top1": result["knn_top1"], **({"top5": result["knn_top5"]} if many else {}),
               "best_top1": result["knn_top1"], "k": cfg.k, "k_used": k_used, "temperature": cfg.temperature,
               "train_images": len(train_set), "val_images": result["knn_images"],  # type: ignore[arg-type]  # torch types no Dataset.__len__
               "skipped_files": skipped_count(train_set, val_set), "seconds": seconds}
    if dist.is_main:
        save_config(cfg, out / "config.yaml", run_info=weights_record(source.provenance))
        with MetricsLogger(out, tensorboard=False) as logger:
            logger.log({"epoch": 0, "step": 0, "top1": summary["top1"], **({"top5": summary["top5"]} if many else {}),
                        "k": cfg.k, "temperature": cfg.temperature, "seconds": seconds})
        write_json(out / "summary.json", summary)
    log.info("k-NN (k=%d, T=%g): top-1 %.2f%%%s on %d val images (%d train) in %.1f s", cfg.k, cfg.temperature,
             summary["top1"], f", top-5 {summary['top5']:.2f}%" if many else "", summary["val_images"],
             len(train_set), seconds)  # type: ignore[arg-type]  # torch types no Dataset.__len__
    return summary
