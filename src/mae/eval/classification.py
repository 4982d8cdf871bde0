"""Exact classification evaluation over any number of processes: top-1 / top-5 / loss / confusion summed over all
ranks (`evaluate`, `score_logits`), the in-order loader that gives every image to exactly one rank (`eval_loader`),
and feature extraction for the frozen-encoder protocols (`extract_features`)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mae.data.workers import ignore_stop_signals
from mae.errors import DataError
from mae.train.distributed import DistInfo
from mae.train.precision import autocast_context

__all__ = ["EvalResult", "ShardSampler", "all_reduce_sum", "eval_loader", "evaluate", "extract_features",
           "score_logits", "topk_counts"]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in order: over all ranks every index exactly once.

    Unlike DistributedSampler it pads nothing, so summed counts are exact even when the size does not divide.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, dist: DistInfo | None = None) -> DataLoader:
    """In-order loader over this rank's share of `dataset` (every image counted once over all ranks)."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world),  # type: ignore[arg-type]  # torch types no Dataset.__len__
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals)


@dataclass
class EvalResult:
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, classes))
    loss: float  # mean cross-entropy
    count: int  # images evaluated over all ranks
    confusion: torch.Tensor | None = None  # [true class, predicted class] counts

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}top1": self.top1, f"{prefix}top5": self.top5, f"{prefix}loss": self.loss}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t)
    return t


def topk_counts(logits: torch.Tensor, target: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Numbers of samples whose true class is the top-1 / among the top-k predictions."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices  # [N, k]
    hits = top == target[:, None]
    return hits[:, 0].sum(), hits.any(dim=1).sum()


def score_logits(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 num_classes: int | None = None) -> EvalResult:
    """Top-1 / top-5 / loss over (logits, target) batches of this rank, summed over all ranks; with `num_classes`
    also the confusion matrix."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1 hits, top5 hits, loss sum, count
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device) if num_classes else None
    for batch_logits, batch_target in batches:
        logits, target = batch_logits.float(), batch_target.to(batch_logits.device)
        c1, c5 = topk_counts(logits, target)
        sums += torch.stack([c1.double(), c5.double(), F.cross_entropy(logits, target, reduction="sum").double(),
                             torch.tensor(float(len(target)), dtype=torch.float64, device=device)])
        if cm is not None:
            cm.index_put_((target, logits.argmax(1)), torch.ones_like(target), accumulate=True)
    all_reduce_sum(sums)
    if cm is not None:
        all_reduce_sum(cm)
    n = int(sums[3].item())
    if n == 0:
        raise DataError("no validation images to evaluate")
    return EvalResult(top1=100.0 * sums[0].item() / n, top5=100.0 * sums[1].item() / n, loss=sums[2].item() / n,
                      count=n, confusion=cm.cpu() if cm is not None else None)


def _batches_short(model: nn.Module, done: int, device: torch.device) -> int:
    """How many batches fewer than the busiest rank this rank ran (0 unless the model is FSDP-sharded)."""
    if "torch.distributed.fsdp" not in sys.modules or not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return 0
    from torch.distributed.fsdp import FSDPModule  # loaded already (checked above): no import cost for others

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return 0
    most = torch.tensor([done], device=device)
    tdist.all_reduce(most, op=tdist.ReduceOp.MAX)
    return int(most) - done


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32",
             class_index: torch.Tensor | None = None, confusion_classes: int | None = None) -> EvalResult:
    """Top-1 / top-5 of `model` on this rank's share of `loader`, exact over all ranks. `class_index` restricts the
    logits to the model classes of a dataset's classes (dataset class i = model class ``class_index[i]``);
    `confusion_classes` adds the confusion matrix of that many (dataset) classes."""
    was_training = model.training
    model.eval()
    index = class_index.to(device) if class_index is not None else None

    def batches():
        # A sharded (FSDP) model's forward is a collective: a rank with fewer batches than the busiest one runs (and
        # ignores) as many forwards more, after its own (agreed before any forward).
        short, images = _batches_short(model, len(loader), device), None
        for images, target in loader:
            with autocast_context(precision, device):
                logits = model(images.to(device, non_blocking=True))
            logits = logits.float()
            yield (logits[:, index] if index is not None else logits), target.to(device)
        for _ in range(short):
            if images is None:
                raise DataError("a process got no validation images under distributed.strategy=fsdp; use fewer "
                                "processes or more validation images")
            with autocast_context(precision, device):
                model(images[:1].to(device))

    try:
        return score_logits(batches(), device, confusion_classes)
    finally:
        model.train(was_training)


@torch.no_grad()
def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device: torch.device,
                     precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(images)`` over this rank's share of `loader`: (features float32 [N, D], labels [N]) on `device`."""
    feats, labels = [], []
    for images, target in loader:
        with autocast_context(precision, device):
            out = fn(images.to(device, non_blocking=True))
        feats.append(out.float())
        labels.append(target.to(device))
    if not feats:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(feats), torch.cat(labels)
